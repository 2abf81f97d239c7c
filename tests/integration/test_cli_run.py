"""``agentainer run`` as a user runs it: a real process, the real Docker engine and Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
import yaml

from controller.backends.base import LABEL_WORKFLOW
from controller.store import Keys
from tests.conftest import IMAGE, ROOT, free_port, sh, start_redis, workflow_doc

pytestmark = pytest.mark.integration

AGENTAINER = [sys.executable, "-m", "controller.cli"]
MiB = 1 << 20


def agentainer(*args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENTAINER, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def write(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


@pytest.fixture
def redis_env(redis_url: str) -> dict[str, str]:
    return {"AGENTAINER_REDIS_URL": redis_url}


def test_run_json_prints_the_final_status_with_full_outputs(redis_env: dict[str, str]) -> None:
    result = agentainer("run", "examples/mapreduce.yaml", "--output", "json", env=redis_env)

    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)  # stdout is the JSON alone; progress went to stderr
    assert status["phase"] == "Succeeded"
    assert status["progress"] == "8/8"
    steps = {step["name"]: step for step in status["steps"]}
    assert steps["map"]["outputs"] == ["12"] * 5
    assert steps["reduce"]["output"] == "60"
    assert steps["map"]["agents"][0]["phase"] == "Succeeded"
    assert status["conditions"][0]["type"] == "Completed"
    assert "start  map" in result.stderr


def test_run_text_shows_progress_and_the_total(redis_env: dict[str, str]) -> None:
    result = agentainer("run", "examples/mapreduce.yaml", env=redis_env)

    assert result.returncode == 0, result.stderr
    assert "start  map: 5 agent(s), at most 5 at once" in result.stdout
    assert "total words: 60" in result.stdout
    assert "mapreduce-wordcount: Succeeded" in result.stdout


def test_run_exits_1_when_the_workflow_fails(tmp_path: Path, redis_env: dict[str, str]) -> None:
    path = write(tmp_path, workflow_doc({"name": "boom", "command": sh("exit 4")},
                                        cleanup="Always"))

    result = agentainer("run", path, env=redis_env)

    assert result.returncode == 1
    assert "exited with code 4" in result.stdout


def test_ctrl_c_stops_the_agents_and_exits_130(tmp_path: Path, redis_env: dict[str, str]) -> None:
    document = workflow_doc({"name": "wait", "parallel": {"replicas": 2},
                             "command": sh("sleep 120")}, cleanup="Always")
    name = document["metadata"]["name"]
    path = write(tmp_path, document)
    client = docker.from_env()
    process = subprocess.Popen([*AGENTAINER, "run", path, "--output", "json"], cwd=ROOT,
                               env={**os.environ, **redis_env}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(client.containers.list(filters={"label": f"{LABEL_WORKFLOW}={name}"})) < 2:
            assert time.monotonic() < deadline, "the agents never started"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()

    assert process.returncode == 130, stderr
    assert json.loads(stdout)["phase"] == "Cancelled"
    assert "cancelling" in stderr
    assert "Traceback" not in stderr
    assert client.containers.list(all=True, filters={"label": f"{LABEL_WORKFLOW}={name}"}) == []
    client.close()


def as_in_a_terminal() -> None:
    """Ctrl-C as a terminal's command gets it: a test run started in the background (`make test
    &`) ignores SIGINT, and so would the commands it starts, their interpreter then taking none
    until the command sets its own handlers."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_before_the_run_has_its_handlers_still_interrupts_it(
        tmp_path: Path, redis_env: dict[str, str]) -> None:
    """Ctrl-C in the moment before the run's own handlers are in place (asyncio's cancels the
    run then) interrupts it at once, also when a Redis call comes next: the process is made to
    get its SIGINT in that moment, just before the handlers go in."""
    document = workflow_doc({"name": "wait", "parallel": {"replicas": 2},
                             "command": sh("sleep 120")}, cleanup="Always")
    early = ("import os, signal, sys; import controller.cli as cli; "
             "handlers = cli._cancel_on_signals; "
             "cli._cancel_on_signals = lambda *a: (os.kill(os.getpid(), signal.SIGINT), "
             "handlers(*a)); sys.exit(cli.main())")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", early, "run", write(tmp_path, document)],
                            capture_output=True, text=True, cwd=ROOT, timeout=100,
                            env={**os.environ, **redis_env}, preexec_fn=as_in_a_terminal)

    assert result.returncode == 130, result.stderr
    assert time.monotonic() - started < 30  # not after its agents' 120 s
    assert "Traceback" not in result.stderr
    client = docker.from_env()
    assert client.containers.list(all=True, filters={
        "label": f"{LABEL_WORKFLOW}={document['metadata']['name']}"}) == []
    client.close()


def test_a_finally_step_quoting_a_failed_steps_output_runs(tmp_path: Path) -> None:
    document = workflow_doc({"name": "work", "command": sh("echo partial; exit 4")},
                            cleanup="Always", **{"finally": [{
                                "name": "notify", "image": IMAGE,
                                "command": sh('echo "out=$OUT $PHASE"'),
                                "env": [{"name": "OUT", "value": "{{ steps.work.output }}"},
                                        {"name": "PHASE", "value": "{{ steps.work.phase }}"}]}]})
    result = agentainer("run", write(tmp_path, document), "--store", "memory", "-o", "json")

    assert result.returncode == 1, result.stderr
    steps = {step["name"]: step for step in json.loads(result.stdout)["steps"]}
    assert steps["notify"]["output"] == "out= Failed", steps["notify"]


@pytest.mark.parametrize("after", [0.25, 0.5])
def test_ctrl_c_while_the_command_starts_says_interrupted_without_a_traceback(
        after: float) -> None:
    """Ctrl-C at any moment of the command's start (its modules still being imported, or its
    run beginning) ends it with 130 and one word."""
    process = subprocess.Popen([str(Path(sys.executable).parent / "agentainer"), "run",
                                "examples/mapreduce.yaml", "--store", "memory"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_in_a_terminal)
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr


def test_unreachable_redis_is_reported_clearly() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    result = agentainer("run", "examples/mapreduce.yaml", env={"AGENTAINER_REDIS_URL": url})

    assert result.returncode == 2
    assert f"Redis at {url} failed while connecting" in result.stderr
    assert "--store memory" in result.stderr
    assert "Traceback" not in result.stderr


def test_memory_store_runs_without_redis() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    result = agentainer("run", "examples/mapreduce.yaml", "--store", "memory",
                        env={"AGENTAINER_REDIS_URL": url})

    assert result.returncode == 0, result.stderr
    assert "total words: 60" in result.stdout


def test_unreachable_docker_is_reported_clearly(tmp_path: Path) -> None:
    result = agentainer("run", "examples/mapreduce.yaml", "--store", "memory",
                        env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})

    assert result.returncode == 2
    assert "cannot reach the Docker engine" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_workflow_is_refused_before_anything_runs(tmp_path: Path) -> None:
    document = workflow_doc({"name": "a", "command": sh("true")},
                            {"name": "b", "dependsOn": ["nope"], "command": sh("true")})

    result = agentainer("run", write(tmp_path, document), "--store", "memory")

    assert result.returncode == 2
    assert "spec.steps[1].dependsOn[0]: unknown step 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_redis_lost_mid_run_is_reported_and_no_agent_is_left(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    document = workflow_doc({"name": "slow", "parallel": {"replicas": 2},
                             "command": sh("sleep 3; echo done")}, cleanup="OnSuccess")
    name = document["metadata"]["name"]
    client = docker.from_env()
    try:
        time.sleep(0.5)
        process = subprocess.Popen(
            [*AGENTAINER, "run", write(tmp_path, document)], cwd=ROOT, text=True,
            env={**os.environ, "AGENTAINER_REDIS_URL": f"redis://127.0.0.1:{port}/0"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(client.containers.list(filters={"label": f"{LABEL_WORKFLOW}={name}"})) < 2:
            assert time.monotonic() < deadline, "the agents never started"
            time.sleep(0.1)
        server.kill()
        _, stderr = process.communicate(timeout=60)
    finally:
        server.kill()

    assert process.returncode == 2
    assert "Redis at redis://127.0.0.1" in stderr
    assert "Traceback" not in stderr
    assert client.containers.list(all=True, filters={"label": f"{LABEL_WORKFLOW}={name}"}) == []
    client.close()


def test_a_full_redis_is_named_as_such_and_no_agent_is_left(tmp_path: Path) -> None:
    """Agents whose outputs Redis has no room for (its maxmemory, refusing writes): the run
    stops saying that Redis is full and what to do, not that it is away."""
    server, port = start_redis(tmp_path, "--maxmemory", "3mb",
                               "--maxmemory-policy", "noeviction")
    document = workflow_doc({"name": "chatty", "parallel": {"replicas": 5},
                             "command": sh("head -c 900000 /dev/zero | tr '\\0' x")},
                            {"name": "after", "command": sh("echo never")}, cleanup="Always")
    name = document["metadata"]["name"]
    client = docker.from_env()
    try:
        result = agentainer("run", write(tmp_path, document),
                            env={"AGENTAINER_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    finally:
        server.kill()

    assert result.returncode == 2, result.stderr
    assert f"Redis at redis://127.0.0.1:{port}/0 is full (its maxmemory)" in result.stderr
    assert "AGENTAINER_STATE_TTL_SECONDS" in result.stderr
    assert "Traceback" not in result.stderr
    assert client.containers.list(all=True, filters={"label": f"{LABEL_WORKFLOW}={name}"}) == []
    client.close()


def test_a_chatty_fan_out_keeps_its_outputs_within_the_workflows_limit_and_redis_has_room(
        tmp_path: Path) -> None:
    """Twenty agents printing 600 kB each would fill this Redis (its maxmemory 8 MB, refusing
    writes then, as the chart's does at 192 MB); with the workflow's limit at 2 MiB its first
    three outputs are kept whole, the others cut as the status shows them, said once, and a
    workflow after it still runs."""
    server, port = start_redis(tmp_path, "--maxmemory", "8mb",
                               "--maxmemory-policy", "noeviction")
    env = {"AGENTAINER_REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "AGENTAINER_WORKFLOW_OUTPUT_LIMIT_BYTES": str(2 * MiB)}
    chatty = workflow_doc({"name": "chatty", "parallel": {"replicas": 20, "maxWorkers": 4},
                           "command": sh("head -c 600000 /dev/zero | tr '\\0' x")},
                          cleanup="Always")
    try:
        result = agentainer("run", write(tmp_path, chatty), "--output", "json", env=env)
        after = agentainer("run", "examples/mapreduce.yaml", env=env)
        used = int(redis.Redis(port=port).info("memory")["used_memory"])
    finally:
        server.kill()

    assert result.returncode == 0, result.stderr
    (step,) = json.loads(result.stdout)["steps"]
    lengths = sorted(len(output) for output in step["outputs"])
    assert lengths == [1024] * 17 + [600000] * 3, lengths
    assert sum(bool(agent.get("outputTruncated")) for agent in step["agents"]) == 17
    cut = [line for line in result.stderr.splitlines() if line.startswith("  cut    chatty:")]
    assert len(cut) == 1 and "passed 2097152 bytes (AGENTAINER_WORKFLOW_OUTPUT_LIMIT_BYTES)" \
        in cut[0], result.stderr
    assert after.returncode == 0, after.stderr
    assert used < 6 * MiB, used


def test_output_more_than_the_containers_log_holds_is_read_from_its_start(
        tmp_path: Path, redis_url: str) -> None:
    """Short lines (and bytes JSON escapes) take the engine's json-file log many times their
    size: past its max-size it drops its start. 60,000 lines of `seq` (389 kB) take a 1 MiB
    log past that: the output is still whole from its first line, and a failure says its
    stderr's last line; the log says where it stopped."""
    document = workflow_doc(
        {"name": "count", "command": ["seq", "1", "60000"]},
        {"name": "zeros", "command": sh("head -c 600000 /dev/zero; seq 1 20000 >&2; exit 3"),
         "continueOn": {"failed": True}}, cleanup="OnSuccess")
    env = {"AGENTAINER_REDIS_URL": redis_url, "AGENTAINER_AGENT_LOG_BYTES": str(MiB)}
    result = agentainer("run", write(tmp_path, document), "--output", "json", env=env)

    assert result.returncode == 0, result.stderr
    steps = {step["name"]: step for step in json.loads(result.stdout)["steps"]}
    assert steps["count"]["output"] == "\n".join(str(n) for n in range(1, 60001))
    assert not steps["count"]["agents"][0].get("outputTruncated")
    assert steps["zeros"]["phase"] == "Failed"
    assert steps["zeros"]["message"].endswith("exited with code 3: 20000")  # its last line
    client = docker.from_env()
    (kept,) = client.containers.list(all=True, filters={  # failed: kept, as OnSuccess says
        "label": f"{LABEL_WORKFLOW}={document['metadata']['name']}"})
    try:
        assert kept.logs(stdout=False, stderr=True).endswith(
            b"agentainer-runner: the log is full: the rest of the output is not logged\n")
    finally:
        kept.remove(force=True)
        client.close()


def test_an_agent_printing_200_mb_has_its_output_cut_at_the_limit_in_bounded_memory(
        tmp_path: Path, redis_url: str) -> None:
    document = workflow_doc({"name": "loud", "command": sh(
        "head -c 200000000 /dev/zero | tr '\\0' a")}, cleanup="Always")
    name = document["metadata"]["name"]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    redis_before = int(client.info("memory")["used_memory"])
    with (tmp_path / "stdout").open("w") as stdout, (tmp_path / "stderr").open("w") as stderr:
        process = subprocess.Popen(
            [*AGENTAINER, "run", write(tmp_path, document), "--output", "json"], cwd=ROOT,
            env={**os.environ, "AGENTAINER_REDIS_URL": redis_url}, stdout=stdout, stderr=stderr)
        _, wait_status, usage = os.wait4(process.pid, 0)  # this child's own peak, no other's
        process.returncode = os.waitstatus_to_exitcode(wait_status)
    peak_rss = usage.ru_maxrss * 1024  # kilobytes on Linux
    redis_growth = int(client.info("memory")["used_memory"]) - redis_before
    print(f"agentainer run of an agent printing 200 MB: peak RSS {peak_rss / MiB:.0f} MiB, "
          f"Redis grew by {redis_growth / MiB:.2f} MiB")

    assert process.returncode == 0, (tmp_path / "stderr").read_text()
    status = json.loads((tmp_path / "stdout").read_text())
    (step,) = status["steps"]
    assert step["outputs"] == ["a" * MiB]
    assert step["agents"][0]["outputTruncated"] is True
    uid = next(uid for uid in client.zrange(Keys.workflows, 0, -1)
               if client.hget(Keys.workflow(uid), "name") == name)
    assert client.hget(Keys.outputs(uid, "loud"), "0") == "a" * MiB
    assert json.loads(client.hget(Keys.agents(uid), "loud.0.1") or "{}")["outputTruncated"]
    assert peak_rss < 300 * MiB  # a guard that the output is not read whole, not a budget
    assert redis_growth < 16 * MiB
    client.close()


def redis_dump(url: str) -> str:
    """Every key and value in Redis, as text."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        found = []
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            value: Any = (client.hgetall(key) if kind == "hash" else
                          client.zrange(key, 0, -1) if kind == "zset" else
                          client.lrange(key, 0, -1) if kind == "list" else
                          client.smembers(key) if kind == "set" else client.get(key))
            found.append(f"{key} {value}")
        return "\n".join(found)
    finally:
        client.close()


def test_run_gives_secrets_from_an_env_file_and_the_environment_and_keeps_them_nowhere(
        tmp_path: Path, redis_env: dict[str, str], redis_url: str) -> None:
    import hashlib

    secret, model = "sk-live-0f9e8d7c6b5a", "model-from-the-environment"
    (tmp_path / "llm.env").write_text(f"# the model's key\napi-key={secret}\n")
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "llm", "key": "api-key"}}},
           {"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "settings",
                                                               "key": "AGENT_MODEL"}}}]
    digest = 'printf %s "$KEY" | sha256sum | cut -c1-16; echo "$MODEL"'
    pool = {"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
            "metadata": {"name": "warm"},
            "spec": {"image": "agentainer/busybox:latest", "minSize": 1, "maxSize": 1}}
    workflow = workflow_doc({"name": "fresh", "command": sh(digest), "env": env},
                            {"name": "pooled", "pool": "warm", "command": sh(digest),
                             "env": env}, name="secrets", cleanup="Always")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump_all([pool, workflow]))

    result = agentainer("run", str(path), "--output", "json", "--secret",
                        f"llm={tmp_path / 'llm.env'}", "--config-map", "settings",
                        env={**redis_env, "AGENT_MODEL": model})

    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    expected = f"{hashlib.sha256(secret.encode()).hexdigest()[:16]}\n{model}"
    assert [step["output"] for step in status["steps"]] == [expected, expected]
    assert secret not in result.stdout + result.stderr
    assert secret not in redis_dump(redis_url)

    missing = agentainer("run", str(path), env=redis_env)
    assert missing.returncode == 1
    assert "env KEY: Secret default/llm was not given" in missing.stdout + missing.stderr


def test_run_takes_params_and_refuses_unknown_ones_before_anything_runs(
        redis_env: dict[str, str]) -> None:
    result = agentainer("run", "examples/greeting-params.yaml", "-p", "name=Ada", "-p",
                        "times=3", "--output", "json", env=redis_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"][0]["output"] == "hello, Ada\n" * 2 + "hello, Ada"

    unknown = agentainer("run", "examples/greeting-params.yaml", "-p", "nmae=Ada", env=redis_env)
    assert unknown.returncode == 2
    assert "-p nmae: the workflow has no parameter 'nmae' (spec.params: name, times)" in \
        unknown.stderr
    assert "start" not in unknown.stdout


def test_the_planner_workers_reviewer_example_plans_works_reviews_and_reports(
        redis_env: dict[str, str]) -> None:
    result = agentainer("run", "examples/planner-workers-reviewer.yaml", "-p", "job=a, b",
                        "--output", "json", env=redis_env)

    assert result.returncode == 0, result.stderr
    steps = {step["name"]: step for step in json.loads(result.stdout)["steps"]}
    assert json.loads(steps["plan"]["output"]) == ["a", "b"]
    assert steps["work"]["outputs"] == ["done: a", "done: b"]
    assert steps["fix"]["phase"] == "Skipped"
    assert steps["publish"]["output"] == "published 2 parts"
    assert steps["report"]["output"] == "workflow Succeeded; failed steps: []"


@pytest.mark.parametrize(("example", "last"), [
    ("greeting-params.yaml", "hello, world\nhello, world"),
    ("planner-workers.yaml", "3 parts done"),
    ("continue-on.yaml", "lint Failed, fix Succeeded"),
])
def test_the_workflow_language_examples_run_as_their_comments_say(
        redis_env: dict[str, str], example: str, last: str,
        docker_client: docker.DockerClient) -> None:
    name = yaml.safe_load((ROOT / "examples" / example).read_text())["metadata"]["name"]
    try:
        result = agentainer("run", f"examples/{example}", "--output", "json", env=redis_env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["steps"][-1]["output"] == last
    finally:  # what the example's cleanup policy keeps (a failed agent, to debug) goes
        for container in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_WORKFLOW}={name}"}):
            container.remove(force=True)


def test_logs_read_back_what_the_agents_printed_after_their_containers_are_gone(
        tmp_path: Path, redis_env: dict[str, str]) -> None:
    name = f"logs-{os.getpid()}-{time.monotonic_ns() % 100000}"
    path = write(tmp_path, workflow_doc(
        {"name": "talk", "parallel": {"replicas": 2},
         "command": sh('echo "said $AGENTAINER_ITEM_INDEX"; echo "warned $AGENTAINER_ITEM_INDEX" >&2')},
        {"name": "fail", "command": sh("echo 'why: no disk' >&2; exit 3")},
        name=name, cleanup="Always"))
    assert agentainer("run", path, env=redis_env).returncode == 1

    shown = agentainer("logs", name, env=redis_env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"==> talk.0.1 {name}-talk-0-")
    assert lines[0].endswith(" Succeeded exit 0 <==")
    assert lines[1:4] == ["said 0", "--- stderr ---", "warned 0"]
    assert "said 1" in shown.stdout and "warned 1" in shown.stdout
    assert "fail.0.1" in shown.stdout and "Failed exit 3" in shown.stdout
    assert "why: no disk" in shown.stdout
    only = agentainer("logs", name, "--step", "fail", env=redis_env)
    assert "said" not in only.stdout and "why: no disk" in only.stdout
    missing = agentainer("logs", "no-such-run", env=redis_env)
    assert missing.returncode == 2 and "no workflow named 'no-such-run'" in missing.stderr
