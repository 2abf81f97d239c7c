"""The `agentainer` CLI against the local cluster and its controller, and nothing else: submit
with a param and --wait, list, get, logs (live from a pod, and of agents whose containers are
gone), watch, stop, terminate, suspend and resume, retry keeping what succeeded, resubmit,
delete, the time to live, and `kubectl wait --for=condition=Succeeded`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.conftest import ROOT, readme_commands, sh, workflow_doc
from tests.e2e.conftest import Controller, Kubectl

pytestmark = pytest.mark.e2e


class Cli:
    """`agentainer` as a user runs it: the admin's kubeconfig, the store's URL."""

    def __init__(self, kubeconfig: str, redis_url: str) -> None:
        self.env = {**os.environ, "KUBECONFIG": kubeconfig, "AGENTAINER_REDIS_URL": redis_url}

    def __call__(self, *args: str, code: int | None = 0,
                 timeout: float = 180) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=ROOT,
                                env=self.env, capture_output=True, text=True, timeout=timeout)
        if code is not None:
            assert result.returncode == code, (
                f"agentainer {' '.join(args)}: exit {result.returncode}\n{result.stdout}\n"
                f"{result.stderr}")
        return result

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self("get", name, "-o", "json").stdout)
        return found

    def until(self, name: str, check: Callable[[dict[str, Any]], bool],
              seconds: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            body = self.get(name)
            if check(body):
                return body
            assert time.monotonic() < deadline, json.dumps(body.get("status"), indent=1)
            time.sleep(0.3)


@pytest.fixture(scope="module")
def cli(kubeconfig: str, redis_url: str, controller: Controller) -> Cli:
    return Cli(kubeconfig, redis_url)


def written(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / f"{document['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def step(body: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in body["status"]["steps"] if s["name"] == name)


def running_agents(body: dict[str, Any], name: str) -> int:
    return sum(a["phase"] == "Running" for a in step(body, name).get("agents", []))


def containers_of(uid: str, running_only: bool = False) -> list[Any]:
    client = docker.from_env()
    try:
        return list(client.containers.list(all=not running_only, ignore_removed=True,
                                           filters={"label": f"agentainer.dev/workflow-uid={uid}"}))
    finally:
        client.close()


def test_submit_wait_list_get_logs_resubmit_delete(cli: Cli, kubectl: Kubectl,
                                                   tmp_path: Path) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    document = workflow_doc(
        {"name": "greet", "command": sh("echo hello {{ params.who }}; echo a note >&2")},
        name=name, params=[{"name": "who"}])
    path = written(tmp_path, document)

    refused = cli("submit", path, code=2)  # a required param is missing: said, not created
    assert "spec.params[0].value" in refused.stderr and "-p NAME=VALUE" in refused.stderr
    done = cli("submit", path, "-p", "who=world", "--wait")
    assert f"workflow.agentainer.dev/{name} created" in done.stdout
    assert f"{name}: Succeeded" in done.stdout
    kubectl("wait", "--for=condition=Succeeded", f"workflows.agentainer.dev/{name}",
            "--timeout=10s")

    listed = cli("list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "PHASE", "PROGRESS", "AGE"]
    assert any(line.split()[:3] == [name, "Succeeded", "1/1"] for line in listed)
    assert f"workflow.agentainer.dev/{name}" in cli("list", "-o", "name").stdout
    assert name in [item["metadata"]["name"]
                    for item in json.loads(cli("list", "-o", "json").stdout)["items"]]
    assert any(line.split()[:2] == ["default", name]
               for line in cli("list", "-A", "-o", "wide").stdout.splitlines())

    described = cli("get", name).stdout
    assert "Phase:       Succeeded" in described and "greet.0.1" in described
    assert "hello world" in described
    body = yaml.safe_load(cli("get", name, "-o", "yaml").stdout)
    uid = body["metadata"]["uid"]
    assert containers_of(uid) == []  # the agent succeeded: its container was removed
    logs = cli("logs", name).stdout
    assert "==> greet.0.1" in logs and "hello world" in logs and "a note" in logs
    assert "a note" in cli("logs", name, "--step", "greet", "--agent", "greet.0.1").stdout
    assert cli("logs", name, "--step", "nope", code=1).stderr.strip() == \
        f"no agent of {name} matches"

    again = cli("resubmit", name, "--wait").stdout
    second = again.split("workflow.agentainer.dev/", 1)[1].split()[0]
    assert second.startswith(f"{name}-") and f"{second}: Succeeded" in again
    assert cli("get", second, "-o", "json").stdout.count("hello world") >= 1

    cli("delete", name, second)
    assert "not found" in cli("get", name, code=2).stderr


def test_stop_lets_running_agents_finish_and_terminate_stops_them_now(
        cli: Cli, tmp_path: Path) -> None:
    stop_name, term_name = (f"cli-{word}-{uuid.uuid4().hex[:6]}" for word in ("stop", "term"))
    for name, seconds in ((stop_name, 8), (term_name, 300)):
        cli("submit", written(tmp_path, workflow_doc(
            {"name": "work", "parallel": {"replicas": 2},
             "command": sh(f"sleep {seconds}; echo worked")},
            {"name": "next", "command": sh("echo next")},
            name=name, **{"finally": [{"name": "report", "image": "agentainer/busybox:latest",
                                       "command": sh("echo {{ workflow.status }}")}]})))
    for name in (stop_name, term_name):  # each stopped while its agents still run
        cli.until(name, lambda b: b.get("status", {}).get("steps") and
                  running_agents(b, "work") == 2)
        if name == stop_name:
            cli("stop", stop_name)
    assert cli("watch", stop_name, "--timeout", "60", code=1).stdout.splitlines()[-1] \
        .startswith(f"{stop_name}: Stopped")
    body = cli.get(stop_name)
    assert [a["exitCode"] for a in step(body, "work")["agents"]] == [0, 0]  # they finished
    assert step(body, "next")["phase"] == "Skipped"
    assert step(body, "report")["phase"] == "Succeeded"
    succeeded = next(c for c in body["status"]["conditions"] if c["type"] == "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("False", "Stopped")

    began = time.monotonic()
    cli("terminate", term_name)
    cli("watch", term_name, "--timeout", "60", code=130)
    took = time.monotonic() - began
    body = cli.get(term_name)
    assert body["status"]["phase"] == "Cancelled" and took < 20, took
    assert containers_of(body["metadata"]["uid"], running_only=True) == []
    assert step(body, "report")["phase"] == "Succeeded"
    succeeded = next(c for c in body["status"]["conditions"] if c["type"] == "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("False", "Terminated")
    assert "already finished" in cli("stop", term_name, code=1).stderr
    cli("delete", stop_name, term_name)


def test_suspend_holds_new_agents_back_until_resume(cli: Cli, tmp_path: Path) -> None:
    name = f"cli-susp-{uuid.uuid4().hex[:6]}"
    cli("submit", written(tmp_path, workflow_doc(
        {"name": "first", "command": sh("sleep 6; echo one")},
        {"name": "second", "command": sh("echo two")}, name=name)))
    cli.until(name, lambda b: b.get("status", {}).get("steps") and
              running_agents(b, "first") == 1)
    cli("suspend", name)
    body = cli.until(name, lambda b: step(b, "first")["phase"] == "Succeeded")
    time.sleep(2)  # were it not held back, the second step would have started by now
    body = cli.get(name)
    assert step(body, "second")["phase"] == "Pending" and body["status"]["phase"] == "Running"
    suspended = next(c for c in body["status"]["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "True"
    assert any(line.split()[:3] == [name, "Running", "(Suspended)"]
               for line in cli("list").stdout.splitlines())
    assert not any(c["type"] == "SpecChangeIgnored" for c in body["status"]["conditions"])
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    cli("resume", name)
    assert cli("watch", name, "--timeout", "60").stdout.splitlines()[-1].startswith(
        f"{name}: Succeeded")
    ended = {c["type"]: (c["status"], c["reason"]) for c in cli.get(name)["status"]["conditions"]}
    assert ended["Suspended"] == ("False", "Resumed") and ended["Succeeded"][0] == "True"
    cli("delete", name)


def test_retry_runs_again_only_what_did_not_succeed(cli: Cli, tmp_path: Path) -> None:
    name = f"cli-retry-{uuid.uuid4().hex[:6]}"
    flaky = ('if [ "$AGENTAINER_ITEM_INDEX" = 2 ] && [ "$AGENTAINER_ATTEMPT" = 1 ]; then '
             'exit 3; fi; echo "out-$AGENTAINER_ITEM_INDEX"')
    cli("submit", written(tmp_path, workflow_doc(
        {"name": "first", "command": sh("echo first")},
        {"name": "fan", "parallel": {"replicas": 3}, "command": sh(flaky)},
        {"name": "last", "command": sh("echo '{{ steps.fan.outputs }}'")}, name=name)),
        "--wait", code=1)
    failed = cli.get(name)
    assert step(failed, "fan")["phase"] == "Failed" and step(failed, "last")["phase"] == "Skipped"
    assert "retrying" in cli("retry", name, "--wait").stdout
    body = cli.get(name)
    assert body["status"]["phase"] == "Succeeded" and body["status"]["retries"] == 1
    assert "message" not in body["status"]  # the retry's "retrying fan, last" is gone
    assert [a["id"] for a in step(body, "first")["agents"]] == ["first.0.1"]  # not run again
    fan = sorted(a["id"] for a in step(body, "fan")["agents"])
    assert fan == ["fan.0.1", "fan.1.1", "fan.2.1", "fan.2.2"]  # only the failed one again
    assert json.loads(step(body, "last")["output"]) == ["out-0", "out-1", "out-2"]
    assert "cannot be retried: it succeeded" in cli("retry", name, code=1).stderr
    cli("delete", name)


def test_a_stopped_workflow_is_retried_once_its_stop_is_gone(cli: Cli, kubectl: Kubectl,
                                                               tmp_path: Path) -> None:
    """A retry with spec.shutdown still set would stop at once: the annotation alone is refused
    saying so; `agentainer retry` removes the stop with it, and the rest runs."""
    name = f"cli-stopped-{uuid.uuid4().hex[:6]}"
    cli("submit", written(tmp_path, workflow_doc(
        {"name": "first", "command": sh("sleep 4; echo first")},
        {"name": "then", "command": sh("echo then")}, name=name)))
    cli.until(name, lambda b: b.get("status", {}).get("phase") == "Running", seconds=60)
    cli("stop", name)
    stopped = cli.until(name, lambda b: b.get("status", {}).get("phase") == "Stopped",
                        seconds=60)
    assert step(stopped, "then")["phase"] == "Skipped"
    kubectl("annotate", "workflow", name, "workflows.agentainer.dev/retry=by-hand")
    refused = cli.until(name, lambda b: b.get("status", {}).get("retried") == "by-hand",
                        seconds=60)
    assert refused["status"]["phase"] == "Stopped"
    events = json.loads(kubectl("get", "events", "--field-selector",
                                f"involvedObject.name={name}", "-o", "json").stdout)["items"]
    assert any(e["reason"] == "RetryRefused" and "spec.shutdown is Stop" in e["message"]
               for e in events), [e["message"] for e in events]
    cli("retry", name, "--wait")
    body = cli.get(name)
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert step(body, "then")["output"] == "then" and "shutdown" not in body["spec"]
    cli("delete", name)


def test_logs_follow_a_pod_live_and_a_finished_workflow_expires(cli: Cli, tmp_path: Path) -> None:
    name = f"cli-pod-{uuid.uuid4().hex[:6]}"
    cli("submit", written(tmp_path, workflow_doc(
        {"name": "talk", "command": sh("echo first line; sleep 3; echo second line")},
        name=name, backend="kubernetes", ttlSecondsAfterFinished=3)))
    cli.until(name, lambda b: b.get("status", {}).get("steps") and
              running_agents(b, "talk") == 1, seconds=120)
    followed = cli("logs", name, "-f", "--timeout", "60").stdout
    assert "[talk.0.1] first line" in followed and "[talk.0.1] second line" in followed
    deadline = time.monotonic() + 60
    while cli("get", name, code=None).returncode == 0:  # deleted after its time to live
        assert time.monotonic() < deadline, "the finished workflow was never deleted"
        time.sleep(0.5)


def test_the_readme_s_cli_and_kubectl_commands_work_as_written(cli: Cli, kubectl: Kubectl) -> None:
    env = {**cli.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(command: str) -> str:
        result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stderr}"
        return result.stdout

    commands = readme_commands("tests/e2e/test_cli.py")
    assert commands[0].startswith("agentainer submit") and commands[-1].startswith(
        "agentainer delete")
    outputs = [run(command) for command in commands]
    assert "greeting: Succeeded" in outputs[1] and "hello, Ada" in outputs[4]
    resubmitted = outputs[5].split("workflow.agentainer.dev/", 1)[1].split()[0]
    kubectl("delete", "awf", resubmitted)
    kubectl("wait", "--for=delete", "awf/greeting", "--timeout=60s")

    run(commands[0])  # the kubectl commands, on a workflow of the same name, finished
    cli("watch", "greeting", "--timeout", "60")
    for command in readme_commands("tests/e2e/test_cli.py", after=1):
        run(command)
    kubectl("delete", "awf", "greeting")
