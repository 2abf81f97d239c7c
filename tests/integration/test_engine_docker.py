"""The engine on the real Docker engine with a real Redis: agents really run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import socket
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import redis
import yaml

from controller.agents import MAX_ARG_BYTES
from controller.backends.base import LABEL_STEP
from controller.backends import docker as docker_backend
from controller.backends.docker import DockerBackend
from controller.engine import Engine, WorkflowRun
from controller.errors import BackendError
from controller.models import AgentReason, StepPhase, WorkflowPhase, WorkflowStatus
from controller.store import Keys, RedisStore
from tests.conftest import IMAGE, ROOT, sh, workflow_doc
from tests.integration.conftest import Runner

MiB = 1 << 20

pytestmark = pytest.mark.integration

MAPREDUCE = ROOT / "examples" / "mapreduce.yaml"


def docker_interval(container: Any) -> tuple[datetime, datetime]:
    """When Docker says the container ran: the engine's own records are not trusted here."""
    state = container.attrs["State"]

    def parse(value: str) -> datetime:
        head, _, fraction = value.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00")

    return parse(state["StartedAt"]), parse(state["FinishedAt"])


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda edge: (edge[0], edge[1]))
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


async def agents_running(run: WorkflowRun, step: str, count: int) -> None:
    while sum(a.phase.value == "Running" for a in run.status.step(step).agents) < count:
        await asyncio.sleep(0.05)


def mapreduce_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(MAPREDUCE.read_text())
    return document


def test_mapreduce_example_counts_every_word(runner: Runner) -> None:
    document = mapreduce_document()
    items = document["spec"]["steps"][1]["parallel"]["items"]
    expected = sum(len(item.split()) for item in items)

    status, run = runner.run(document)

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("map").outputs == [str(len(item.split())) for item in items]
    assert status.step("reduce").output == str(expected)
    assert status.step("report").output is not None
    assert status.step("report").output.startswith(f"total words: {expected} ")
    assert status.progress == "8/8"
    assert runner.containers(run.uid) == []  # OnSuccess: every agent succeeded, none is kept


def test_state_and_full_outputs_are_in_redis_after_a_run(runner: Runner, redis_url: str) -> None:
    status, run = runner.run(mapreduce_document())
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    workflow = client.hgetall(Keys.workflow(run.uid))
    assert workflow["phase"] == "Succeeded"
    assert workflow["name"] == "mapreduce-wordcount"
    assert workflow["progress"] == "8/8"
    assert run.uid in client.zrange(Keys.workflows, 0, -1)
    steps = client.hgetall(Keys.steps(run.uid))
    assert set(steps) == {"initialize", "map", "reduce", "report"}
    assert '"phase": "Succeeded"' in steps["map"]
    outputs = client.hgetall(Keys.outputs(run.uid, "map"))
    assert [outputs[str(i)] for i in range(5)] == status.step("map").outputs
    assert client.hget(Keys.outputs(run.uid, "reduce"), "0") == status.step("reduce").output

    agents = {key: json.loads(value) for key, value in client.hgetall(Keys.agents(run.uid)).items()}
    assert len(agents) == 8
    for record in agents.values():
        assert record["workflowUid"] == run.uid
        assert record["phase"] == "Succeeded" and record["exitCode"] == 0
        assert record["container"]  # the Docker container id
        assert record["createdAt"] <= record["startedAt"] <= record["finishedAt"]
    assert {record["step"] for record in agents.values()} == set(steps)
    # Finished state expires instead of piling up: every key of it, written or not before.
    for key in Keys.workflow_keys(run.uid, sorted(steps)):
        assert not client.exists(key) or 0 < client.ttl(key) <= 7 * 24 * 3600, key
    assert 0 < client.ttl(Keys.workflow(run.uid)) <= 7 * 24 * 3600
    client.close()


def test_max_workers_caps_the_agents_running_at_once(runner: Runner) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "fan", "parallel": {"replicas": 6, "maxWorkers": 2},
         "command": sh("sleep 0.6; echo $AGENTAINER_ITEM_INDEX")},
        cleanup="Never",
    ))

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert status.step("fan").outputs == ["0", "1", "2", "3", "4", "5"]
    containers = runner.containers(run.uid)
    assert len(containers) == 6
    assert most_at_once([docker_interval(c) for c in containers]) == 2


def test_calls_to_the_engine_share_a_few_connections_kept_open(runner: Runner) -> None:
    """Thirty agents, each created, started, waited for, read and removed, four at a time:
    the engine's socket is one pool of connections, opened about as often as calls ran at
    once (docker-py's own kept a pool per URL and opened one for nearly every call)."""
    async def go() -> tuple[WorkflowStatus, Any]:
        run, store, backend = await runner.start(workflow_doc(
            {"name": "fan", "parallel": {"replicas": 30, "maxWorkers": 4},
             "command": sh("echo $AGENTAINER_ITEM_INDEX")}))
        try:
            status = await run.execute()
            adapter = backend._client.api.get_adapter("http+docker://localhost")
            with adapter.pools.lock:
                pools = [adapter.pools[key] for key in adapter.pools.keys()]
            return status, pools
        finally:
            await backend.close()
            await store.close()

    status, pools = asyncio.run(go())

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert len(pools) == 1
    assert pools[0].num_connections <= 16, f"{pools[0].num_connections} connections opened"


def test_agents_running_past_the_engine_call_slots_hold_none_of_them(runner: Runner) -> None:
    """Waiting for agents takes no call to the engine: with two call slots and three agents
    running on, another agent still starts, ends and is read at once (each wait held a slot,
    and the quick one waited for the long ones to end)."""
    runner.settings = dataclasses.replace(runner.settings, docker_threads=2)

    async def go() -> tuple[WorkflowStatus, float]:
        run, store, backend = await runner.start(workflow_doc(
            {"name": "long", "parallel": {"replicas": 3}, "command": sh("sleep 60")},
            {"name": "gate", "dependsOn": [], "command": sh("sleep 1; echo go")},
            {"name": "quick", "dependsOn": ["gate"], "command": sh("echo quick")},
            cleanup="Always"))
        task = asyncio.create_task(run.execute())
        try:
            await asyncio.wait_for(agents_running(run, "long", 3), 30)
            began = asyncio.get_running_loop().time()
            async with asyncio.timeout(30):
                while run.status.step("quick").phase is not StepPhase.SUCCEEDED:
                    await asyncio.sleep(0.05)
            took = asyncio.get_running_loop().time() - began
            assert run.status.step("long").phase is StepPhase.RUNNING
            run.cancel()
            return await asyncio.wait_for(task, 30), took
        finally:
            await backend.close()
            await store.close()

    status, took = asyncio.run(go())

    assert status.step("quick").output == "quick"
    assert took < 20, f"the quick agent took {took:.1f} s behind three running ones"
    assert status.step("long").phase is StepPhase.CANCELLED


class EventsRefusingProxy:
    """A proxy in front of the engine's socket that lets every call through but those for
    its events (as socket proxies configured to pass only some calls do): it answers those
    403, and counts them."""

    EVENTS = re.compile(rb"^GET /(v[0-9.]+/)?events", re.MULTILINE)
    FORBIDDEN = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: 9\r\nConnection: close\r\n\r\nforbidden")

    def __init__(self, path: Path, engine: str) -> None:
        self.path, self.engine, self.refused = path, engine, 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.engine)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests and self.EVENTS.search(data):
                    self.refused += 1
                    source.sendall(self.FORBIDDEN)
                    break
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def test_an_engine_behind_a_proxy_that_refuses_its_events_still_runs_agents(
        runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Agents' ends are then waited for call by call, as without the engine's events: no
    wait fails, as it would were the refusal taken for the engine away."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip(f"the engine is not on a local socket ({host})")
    proxy = EventsRefusingProxy(tmp_path / "proxy.sock", host.removeprefix("unix://"))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{proxy.path}")
    try:
        status, _ = runner.run(workflow_doc(
            {"name": "first", "command": sh("echo one")},
            {"name": "fan", "parallel": {"replicas": 2}, "command": sh("sleep 1; echo two")},
        ))
    finally:
        proxy.close()

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("first").output == "one"
    assert status.step("fan").outputs == ["two", "two"]
    assert proxy.refused >= 1
    assert [r.getMessage() for r in caplog.records if "failed for now" in r.getMessage()] == []
    assert "Docker refused it: forbidden; waiting for each agent on a call of its own" in \
        caplog.text


def test_failing_agent_is_retried_and_every_attempt_recorded(runner: Runner) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "flaky", "retries": {"limit": 3, "backoffSeconds": 0.1},
         "command": sh('echo "attempt $AGENTAINER_ATTEMPT"; '
                       '[ "$AGENTAINER_ATTEMPT" -ge 3 ] || { echo boom >&2; exit 3; }')},
    ))

    assert status.phase is WorkflowPhase.SUCCEEDED
    step = status.step("flaky")
    assert step.attempts == 3
    assert [(a.attempt, a.exit_code, a.phase.value) for a in step.agents] == [
        (1, 3, "Failed"), (2, 3, "Failed"), (3, 0, "Succeeded")]
    assert step.output == "attempt 3"
    # OnSuccess keeps the two failed attempts for debugging, each under its own name.
    kept = sorted(c.name for c in runner.containers(run.uid))
    assert kept == sorted(a.name for a in step.agents[:2])


def test_retries_run_out_and_the_step_fails_with_the_agents_error(runner: Runner) -> None:
    status, _ = runner.run(workflow_doc(
        {"name": "broken", "retries": {"limit": 1, "backoffSeconds": 0},
         "command": sh("echo 'no such table' >&2; exit 7")},
    ))

    assert status.phase is WorkflowPhase.FAILED
    step = status.step("broken")
    assert step.phase is StepPhase.FAILED
    assert step.attempts == 2
    assert "exited with code 7: no such table" in (step.message or "")
    assert "step broken failed" in (status.message or "")


def test_agent_past_its_timeout_is_killed(runner: Runner) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "slow", "timeoutSeconds": 1, "command": sh("sleep 60")},
        cleanup="Never",
    ))

    assert status.phase is WorkflowPhase.FAILED
    agent = status.step("slow").agents[0]
    assert agent.reason is AgentReason.DEADLINE_EXCEEDED
    assert "timeoutSeconds (1)" in (status.step("slow").message or "")
    (container,) = runner.containers(run.uid)
    assert container.attrs["State"]["Running"] is False
    started, finished = docker_interval(container)
    assert (finished - started).total_seconds() < 30  # killed, not left to sleep its 60s


def test_failed_step_fails_the_workflow_and_its_dependents_never_start(runner: Runner) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "prepare", "command": sh("echo ok")},
        {"name": "crash", "command": sh("exit 1")},
        {"name": "after", "command": sh("echo never")},
        {"name": "side", "dependsOn": ["prepare"], "command": sh("sleep 1; echo side")},
        cleanup="Always",
    ))

    assert status.phase is WorkflowPhase.FAILED
    assert status.step("crash").phase is StepPhase.FAILED
    assert status.step("after").phase is StepPhase.SKIPPED
    assert status.step("after").agents == []
    assert "dependency crash" in (status.step("after").message or "")
    # An independent step that was already running is allowed to finish.
    assert status.step("side").phase is StepPhase.SUCCEEDED
    assert runner.containers(run.uid) == []


@pytest.mark.parametrize(("policy", "kept"), [
    ("Always", set()),
    ("OnSuccess", {"bad"}),
    ("Never", {"good", "bad"}),
])
def test_cleanup_policy_leaves_exactly_the_agents_it_should(
    runner: Runner, policy: str, kept: set[str]
) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "good", "dependsOn": [], "command": sh("echo fine")},
        {"name": "bad", "dependsOn": [], "command": sh("exit 2")},
        cleanup=policy,
    ))

    assert status.phase is WorkflowPhase.FAILED
    left = {c.labels["agentainer.dev/step"] for c in runner.containers(run.uid)}
    assert left == kept


def test_limits_and_hardening_are_visible_in_docker_inspect(runner: Runner) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "limited", "resources": {"cpu": "500m", "memory": "64Mi"},
         "command": sh("cat /sys/fs/cgroup/memory.max 2>/dev/null "
                       "|| cat /sys/fs/cgroup/memory/memory.limit_in_bytes")},
        cleanup="Never",
    ))

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert status.step("limited").output == str(64 * 1024 * 1024)  # enforced by the kernel
    (container,) = runner.containers(run.uid)
    host = container.attrs["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["MemorySwap"] == 64 * 1024 * 1024
    assert host["Privileged"] is False
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["NetworkMode"] == "bridge"
    labels = container.labels
    assert labels["agentainer.dev/workflow-uid"] == run.uid
    assert labels["agentainer.dev/step"] == "limited"
    assert labels["app.kubernetes.io/managed-by"] == "agentainer"
    assert container.name == status.step("limited").agents[0].name


CAP_NET_RAW, CAP_MKNOD, CAP_CHOWN = 13, 27, 0


@pytest.mark.parametrize("added", [[], ["NET_RAW"]], ids=["defaults", "NET_RAW added"])
def test_agents_keep_few_capabilities_and_a_capped_log_unless_the_workflow_adds(
        runner: Runner, added: list[str]) -> None:
    """What the kernel says the agent may do (its bounding set), not what was asked: raw
    sockets (spoofing, sniffing the bridge) only when the workflow adds NET_RAW."""
    status, run = runner.run(workflow_doc(
        {"name": "caps", "command": sh("grep CapBnd /proc/self/status | cut -f2")},
        cleanup="Never", **({"capabilities": {"add": added}} if added else {})))

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    bounding = int(status.step("caps").output, 16)
    assert bool(bounding & 1 << CAP_NET_RAW) == bool(added)
    assert not bounding & 1 << CAP_MKNOD
    assert bounding & 1 << CAP_CHOWN
    (container,) = runner.containers(run.uid)
    host = container.attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert host["LogConfig"] == {"Type": "json-file", "Config": {
        "max-file": "1", "max-size": str(runner.settings.agent_log_bytes)}}
    assert host["PidsLimit"] == runner.settings.agent_pids_limit


def test_independent_branches_of_a_dag_run_at_the_same_time(runner: Runner) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "root", "command": sh("echo go")},
        {"name": "left", "dependsOn": ["root"], "command": sh("sleep 1; echo left")},
        {"name": "right", "dependsOn": ["root"], "command": sh("sleep 1; echo right")},
        {"name": "join", "dependsOn": ["left", "right"],
         "env": [{"name": "BOTH", "value": "{{ steps.left.output }}+{{ steps.right.output }}"}],
         "command": sh('echo "$BOTH"')},
        cleanup="Never",
    ))

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert status.step("join").output == "left+right"
    by_step = {c.labels["agentainer.dev/step"]: docker_interval(c)
               for c in runner.containers(run.uid)}
    (left_start, left_end), (right_start, right_end) = by_step["left"], by_step["right"]
    assert left_start < right_end and right_start < left_end  # they overlapped
    assert by_step["join"][0] >= max(left_end, right_end)
    assert by_step["root"][1] <= min(left_start, right_start)


HOSTILE_ITEMS = [
    "$(touch /tmp/pwned)",
    "`touch /tmp/pwned`; touch /tmp/pwned",
    "it's \"quoted\" and 'single' \\ back",
    "two\nlines && touch /tmp/pwned",
    "{{ workflow.uid }} stays text",
]


def test_items_with_shell_metacharacters_reach_the_agent_as_data(runner: Runner) -> None:
    check = "[ -e /tmp/pwned ] && echo PWNED"
    status, _ = runner.run(workflow_doc(
        {"name": "by-env", "parallel": {"items": HOSTILE_ITEMS},
         "command": sh(f'printf "%s" "$AGENTAINER_ITEM"; {check}; true')},
        {"name": "by-args", "dependsOn": [], "parallel": {"items": HOSTILE_ITEMS},
         "command": ["sh", "-c", f'printf "%s" "$1"; {check}; true', "agent"],
         "args": ["{{ item }}"]},
    ))

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert status.step("by-env").outputs == HOSTILE_ITEMS
    assert status.step("by-args").outputs == HOSTILE_ITEMS


def test_workflow_timeout_stops_running_agents(runner: Runner) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "forever", "parallel": {"replicas": 2}, "command": sh("sleep 60")},
        {"name": "later", "command": sh("echo never")},
        timeoutSeconds=2, cleanup="OnSuccess",
    ))

    assert status.phase is WorkflowPhase.FAILED
    assert "timeoutSeconds (2)" in (status.message or "")
    assert status.conditions[0].reason == "DeadlineExceeded"
    assert status.step("forever").phase is StepPhase.FAILED
    assert status.step("later").phase is StepPhase.SKIPPED
    assert {a.reason for a in status.step("forever").agents} == {AgentReason.DEADLINE_EXCEEDED}
    containers = runner.containers(run.uid)
    assert len(containers) == 2  # OnSuccess keeps them for debugging ...
    assert all(not c.attrs["State"]["Running"] for c in containers)  # ... stopped


def test_cancelling_a_run_stops_its_agents_and_records_cancelled(
    runner: Runner, redis_url: str
) -> None:
    async def go() -> Any:
        run, store, backend = await runner.start(workflow_doc(
            {"name": "busy", "parallel": {"replicas": 3}, "command": sh("sleep 60")},
            cleanup="Always",
        ))
        task = asyncio.create_task(run.execute())
        await agents_running(run, "busy", 3)
        run.cancel()
        status = await task
        await backend.close()
        await store.close()
        return status, run

    status, run = asyncio.run(go())

    assert status.phase is WorkflowPhase.CANCELLED
    assert status.step("busy").phase is StepPhase.CANCELLED
    assert {a.reason for a in status.step("busy").agents} == {AgentReason.CANCELLED}
    assert runner.containers(run.uid) == []
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.hget(Keys.workflow(run.uid), "phase") == "Cancelled"
    client.close()


def test_agent_removed_from_under_the_engine_is_retried_and_says_why(runner: Runner) -> None:
    """Not its own exit: its container was removed (by a person, a cleanup, a node's end)."""
    async def go() -> Any:
        run, store, backend = await runner.start(workflow_doc(
            {"name": "victim", "retries": {"limit": 1, "backoffSeconds": 0},
             "command": sh('[ "$AGENTAINER_ATTEMPT" = 1 ] && sleep 60; echo survived')}))
        task = asyncio.create_task(run.execute())
        await agents_running(run, "victim", 1)
        for container in runner.containers(run.uid):
            container.remove(force=True)
        status = await task
        await backend.close()
        await store.close()
        return status

    status = asyncio.run(go())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    victim = status.step("victim")
    assert victim.output == "survived"
    assert victim.agents[0].reason is AgentReason.LOST


def test_missing_image_fails_the_step_with_a_message_a_user_can_act_on(runner: Runner) -> None:
    status, _ = runner.run(workflow_doc(
        {"name": "ghost", "image": "agentainer/does-not-exist:1.0",
         "retries": {"limit": 3, "backoffSeconds": 0}, "command": sh("true")},
    ))

    assert status.phase is WorkflowPhase.FAILED
    step = status.step("ghost")
    assert step.attempts == 1  # a missing image is not retried
    assert "agentainer/does-not-exist:1.0" in (step.message or "")
    assert "is not on the Docker engine" in (step.message or "")


def test_missing_executable_is_reported_with_the_programs_name(runner: Runner) -> None:
    status, _ = runner.run(workflow_doc({"name": "typo", "command": ["no-such-program"]}))

    assert status.phase is WorkflowPhase.FAILED
    assert status.step("typo").agents[0].exit_code == 127
    assert "no-such-program" in (status.step("typo").message or "")


def test_a_variable_longer_than_linux_starts_a_program_with_fails_its_agent_unstarted(
        runner: Runner) -> None:
    """An output read through a template as a variable: the longest Linux takes reaches the
    agent whole; one byte more fails the agent before any container is made, naming the
    variable and the limit, and is not retried (the engine would refuse it every time)."""
    longest = MAX_ARG_BYTES - len("BIG=") - 1  # its closing NUL counts

    def reader(name: str, source: str, *after: str) -> dict[str, Any]:
        return {"name": name, "dependsOn": [source, *after],
                "retries": {"limit": 2, "backoffSeconds": 0},
                "command": sh('echo "${#BIG}"'),
                "env": [{"name": "BIG", "value": f"{{{{ steps.{source}.output }}}}"}]}

    status, run = runner.run(workflow_doc(
        {"name": "longest", "command": sh(f"head -c {longest} /dev/zero | tr '\\0' x")},
        {"name": "longer", "dependsOn": [],
         "command": sh(f"head -c {longest + 1} /dev/zero | tr '\\0' x")},
        reader("fits", "longest"), reader("over", "longer", "fits"), cleanup="Never"))

    assert status.step("fits").phase is StepPhase.SUCCEEDED
    assert status.step("fits").output == str(longest)
    over = status.step("over")
    assert over.phase is StepPhase.FAILED and over.attempts == 1
    assert f"env BIG is {MAX_ARG_BYTES + 1:,} bytes" in (over.message or "")
    assert f"over the {MAX_ARG_BYTES:,}" in (over.message or "")
    made = [c.labels[LABEL_STEP] for c in runner.containers(run.uid)]
    assert sorted(made) == ["fits", "longer", "longest"]


def test_an_output_with_a_nul_character_fails_the_agent_that_reads_it_unstarted(
        runner: Runner) -> None:
    """Docker would refuse the variable ("invalid argument") on every retry."""
    status, run = runner.run(workflow_doc(
        {"name": "binary", "command": sh("printf 'a\\000b'")},
        {"name": "reads", "dependsOn": ["binary"], "retries": {"limit": 2, "backoffSeconds": 0},
         "command": sh('echo "$X"'), "env": [{"name": "X", "value": "{{ steps.binary.output }}"}]},
        cleanup="Never"))

    reads = status.step("reads")
    assert reads.phase is StepPhase.FAILED and reads.attempts == 1
    assert "env X holds a NUL character" in (reads.message or "")
    assert [c.labels[LABEL_STEP] for c in runner.containers(run.uid)] == ["binary"]


def test_agent_over_its_memory_limit_is_reported_oom_killed(runner: Runner) -> None:
    status, _ = runner.run(workflow_doc(
        {"name": "hog", "resources": {"memory": "16Mi"},
         "command": sh("x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}")},
    ))

    assert status.phase is WorkflowPhase.FAILED
    agent = status.step("hog").agents[0]
    assert agent.reason is AgentReason.OOM_KILLED
    assert "ran out of memory (limit 16Mi)" in (status.step("hog").message or "")


def test_a_failing_agents_long_stderr_is_read_to_its_end_for_the_reason(
        runner: Runner, redis_url: str) -> None:
    status, run = runner.run(workflow_doc({"name": "noisy", "command": sh(
        "head -c 20000000 /dev/zero | tr '\\0' e >&2; echo >&2; "
        "echo 'disk full: the real reason' >&2; exit 3")}, cleanup="Always"))

    assert status.phase is WorkflowPhase.FAILED
    assert (status.step("noisy").message or "").endswith(
        "exited with code 3: disk full: the real reason")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    log = client.hget(Keys.logs(run.uid), "noisy.0.1") or ""
    client.close()
    assert log.endswith("e\ndisk full: the real reason\n")
    assert len(log.encode()) == 64 * 1024  # the store keeps the last 64 KiB of it


def test_an_agent_past_its_output_limit_keeps_its_heads_output_and_its_stderrs_end(
        runner: Runner, redis_url: str) -> None:
    """stdout and stderr come interleaved in one log: stdout past its limit stops that read,
    and the tail of stderr is still read to its end."""
    status, run = runner.run(workflow_doc({"name": "both", "command": sh(
        "for i in 1 2 3; do head -c 700000 /dev/zero | tr '\\0' o; echo; "
        "echo \"err $i\" >&2; done; echo 'the last word' >&2")}))

    step = status.step("both")
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert step.agents[0].output_truncated is True
    assert step.output == "o" * 700000 + "\n" + "o" * (MiB - 700001)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    log = client.hget(Keys.logs(run.uid), "both.0.1") or ""
    client.close()
    assert log == "err 1\nerr 2\nerr 3\nthe last word\n"


def test_a_new_run_resumes_from_redis_and_adopts_running_agents(runner: Runner) -> None:
    """What a restarted controller does: the first run goes away mid-fan-out without touching
    anything; a second run of the same uid finishes the work without starting any agent twice."""
    document = workflow_doc(
        {"name": "first", "command": sh("echo one")},
        {"name": "fan", "parallel": {"replicas": 3}, "command": sh("sleep 2; echo $AGENTAINER_ITEM_INDEX")},
        {"name": "last", "env": [{"name": "ALL", "value": "{{ steps.fan.outputs }}"}],
         "command": sh('echo "$ALL"')},
        cleanup="Never",
    )
    document["metadata"]["uid"] = str(uuid.uuid4())

    async def go() -> Any:
        run, store, backend = await runner.start(document)
        task = asyncio.create_task(run.execute())
        await agents_running(run, "fan", 3)
        run.detach()
        interrupted = await task
        await backend.close()
        await store.close()
        second, store, backend = await runner.start(document)
        final = await second.execute()
        await backend.close()
        await store.close()
        return interrupted, final

    interrupted, status = asyncio.run(go())

    assert interrupted.phase is WorkflowPhase.RUNNING  # detached, not cancelled
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("fan").outputs == ["0", "1", "2"]
    assert status.step("last").output == '["0", "1", "2"]'
    assert [a.attempt for a in status.step("fan").agents] == [1, 1, 1]
    containers = runner.containers(document["metadata"]["uid"])
    by_step: dict[str, int] = {}
    for container in containers:
        step = container.labels["agentainer.dev/step"]
        by_step[step] = by_step.get(step, 0) + 1
    assert by_step == {"first": 1, "fan": 3, "last": 1}  # nothing ran twice


def run_with_pools(runner: Runner, path: Path) -> Any:
    from controller.manifests import load_run
    from controller.pools import PoolManager

    workflow, agent_pools = load_run(path)

    async def go() -> Any:
        store = await RedisStore.connect(runner.settings.redis_url)
        backend = await DockerBackend.connect(runner.settings)
        pools = PoolManager(store, runner.settings)
        states = [pools.register(pool, str(uuid.uuid4()), backend) for pool in agent_pools]
        try:
            for state in states:
                await pools.reconcile(state)
            run = Engine(backend, store, runner.settings, pools).prepare(workflow)
            runner.uids.append(run.uid)
            return await run.execute()
        finally:
            for state in states:
                await pools.drain(state)
            await backend.close()
            await store.close()

    return asyncio.run(go())


def test_pooled_mapreduce_gives_the_same_total_as_the_cold_one(runner: Runner) -> None:
    cold, _ = runner.run(mapreduce_document())
    pooled = run_with_pools(runner, ROOT / "examples" / "mapreduce-pooled.yaml")

    assert pooled.phase is WorkflowPhase.SUCCEEDED, pooled.message
    assert pooled.step("map").outputs == cold.step("map").outputs
    assert pooled.step("reduce").output == cold.step("reduce").output == "60"
    assert pooled.step("map").agents[0].name.startswith("pool-busybox-pool-")


def test_pooled_step_naming_a_missing_pool_fails_with_a_clear_message(runner: Runner) -> None:
    status, _ = runner.run(workflow_doc(
        {"name": "lonely", "pool": "nowhere", "command": sh("true")}))

    assert status.phase is WorkflowPhase.FAILED
    assert "AgentPool nowhere is not available" in (status.step("lonely").message or "")


def test_workers_fan_out_over_what_the_planner_printed(runner: Runner) -> None:
    status, _ = runner.run(workflow_doc(
        {"name": "plan", "command": sh("""echo '["alpha", {"file": "b.txt"}, 3]'""")},
        {"name": "work", "parallel": {"itemsFrom": "{{ steps.plan.output }}", "maxWorkers": 2},
         "command": sh('echo "worked on $AGENTAINER_ITEM"')},
        {"name": "review", "env": [{"name": "RESULTS", "value": "{{ steps.work.outputs }}"}],
         "command": sh('echo "$RESULTS"')},
        cleanup="Always"))

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("work").outputs == [
        "worked on alpha", 'worked on {"file": "b.txt"}', "worked on 3"]
    assert json.loads(status.step("review").output or "") == status.step("work").outputs
    assert status.progress == "5/5"


def test_a_reviewers_verdict_decides_which_step_runs(runner: Runner) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "review", "command": sh("echo retry")},
        {"name": "fix", "dependsOn": ["review"], "command": sh("echo fixed"),
         "when": [{"input": "{{ steps.review.output }}", "operator": "in", "values": ["retry"]}]},
        {"name": "publish", "dependsOn": ["review"], "command": sh("echo published"),
         "when": [{"input": "{{ steps.review.output }}", "operator": "notin",
                   "values": ["retry"]}]},
        {"name": "notify", "dependsOn": ["fix", "publish"], "command": sh("echo told")},
        cleanup="Never"))

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert [(s.name, s.phase.value) for s in status.steps] == [
        ("review", "Succeeded"), ("fix", "Succeeded"), ("publish", "Skipped"),
        ("notify", "Succeeded")]
    assert status.step("publish").message == "skipped: when[0]: 'retry' is in ['retry']"
    started = {c.labels["agentainer.dev/step"] for c in runner.containers(run.uid)}
    assert started == {"review", "fix", "notify"}  # no container for the skipped step


def test_finally_steps_report_a_failed_run(runner: Runner) -> None:
    document = workflow_doc({"name": "build", "command": sh("exit 3")},
                            {"name": "test", "command": sh("echo never")}, cleanup="Always")
    document["spec"]["finally"] = [{
        "name": "report", "image": IMAGE, "command": sh('echo "$STATUS: $FAILED"'),
        "env": [{"name": "STATUS", "value": "{{ workflow.status }}"},
                {"name": "FAILED", "value": "{{ workflow.failures }}"}]}]
    status, _ = runner.run(document)

    assert status.phase is WorkflowPhase.FAILED
    assert status.message and status.message.startswith("step build failed")
    assert status.step("test").phase.value == "Skipped"
    assert status.step("report").output == 'Failed: ["build"]'


@pytest.mark.parametrize("cleanup", ["Always", "Never"])
def test_agents_share_a_workspace_that_goes_with_the_workflow(runner: Runner,
                                                               cleanup: str) -> None:
    status, run = runner.run(workflow_doc(
        {"name": "plan", "command": sh("stat -c %a /workspace; echo plan > /workspace/notes")},
        {"name": "work", "parallel": {"replicas": 3},
         "command": sh('echo "work $AGENTAINER_ITEM_INDEX" > /workspace/part-$AGENTAINER_ITEM_INDEX')},
        {"name": "review", "command": sh("cat /workspace/notes /workspace/part-*")},
        cleanup=cleanup, workspace={"size": "64Mi"}))

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("plan").output == "1777"  # writable by any agent's user
    assert status.step("review").output == "plan\nwork 0\nwork 1\nwork 2"
    volumes = runner.docker.volumes.list(
        filters={"label": f"agentainer.dev/workflow-uid={run.uid}"})
    assert len(volumes) == (1 if cleanup == "Never" else 0)
    for volume in volumes:
        for container in runner.containers(run.uid):
            container.remove(force=True)
        volume.remove()



def test_helper_containers_a_process_left_go_and_a_hung_one_fails_in_time(
        runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's image fills volumes in short-lived containers: those a process ended before
    removing are removed when the next process connects (one exited at once, one never started
    once older than ``HELPER_SECONDS``), and one that does not finish fails its call in time,
    removed too. Any other container is left alone."""
    tag = uuid.uuid4().hex[:8]

    def made(name: str, helper: str, start: bool) -> Any:
        container = runner.docker.containers.create(
            IMAGE, ["true"], name=f"{name}-{tag}", labels={
                "app.kubernetes.io/managed-by": "agentainer",
                **({"agentainer.dev/helper": helper} if helper else {})})
        if start:
            container.start()
            container.wait(timeout=30)
        return container

    def left() -> set[str]:
        return {c.name for c in runner.docker.containers.list(all=True)
                if c.name.endswith(tag)}

    async def connect() -> DockerBackend:
        return await DockerBackend.connect(dataclasses.replace(runner.settings,
                                                               runner_image=IMAGE))

    async def go() -> None:
        await (await connect()).close()
        assert left() == {f"unstarted-{tag}", f"other-{tag}"}
        monkeypatch.setattr(docker_backend, "HELPER_SECONDS", -1)  # now older than that
        await (await connect()).close()
        assert left() == {f"other-{tag}"}
        monkeypatch.setattr(docker_backend, "HELPER_SECONDS", 1)
        backend = await connect()
        try:
            with pytest.raises(BackendError, match=r"did not finish 'sleep' within 1 s"):
                await asyncio.to_thread(backend._run_runner, ["sleep", "30"],
                                        f"hung-{tag}", "/hung", "filling a volume")
        finally:
            await backend.close()

    containers = [made("exited", "install", start=True),
                  made("unstarted", "workspace", start=False), made("other", "", start=True)]
    try:
        asyncio.run(go())
        assert left() == {f"other-{tag}"}
        assert runner.docker.containers.list(
            all=True, filters={"label": "agentainer.dev/helper=sleep"}) == []
    finally:
        for container in containers:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
        try:
            runner.docker.volumes.get(f"hung-{tag}").remove(force=True)
        except docker.errors.NotFound:
            pass
