"""The CLI's cluster commands on a fake cluster: what each sends to the API server, what it
prints in each output format, and its exit codes. The real API server: tests/e2e/test_cli.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller import commands
from controller.cli import main
from controller.cluster import Target
from controller.errors import ConflictError, NotFoundError
from tests.conftest import workflow_doc

NOW = "2026-11-26T10:00:00Z"


def stored(name: str, phase: str | None = None, namespace: str = "default",
           **status: Any) -> dict[str, Any]:
    body = workflow_doc({"name": "work", "command": ["true"]}, name=name)
    body["metadata"].update(namespace=namespace, uid=f"uid-{name}", creationTimestamp=NOW,
                            generation=1, annotations={"agentainer.dev/last-handled-"
                                                       "configuration": "{}",
                                                       "team": "blue"})
    if phase is not None:
        body["status"] = {"phase": phase, "progress": "1/1", **status}
    return body


class FakeCluster:
    """The API server as the commands see it: objects by name, and what was sent."""

    instances: list[FakeCluster] = []

    def __init__(self, target: Target) -> None:
        self.target = target
        self.namespace = target.namespace or "default"
        self.objects: dict[str, dict[str, Any]] = {}
        self.created: list[tuple[str, dict[str, Any]]] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[str] = []
        self.watched: list[dict[str, Any]] = []
        FakeCluster.instances.append(self)
        for body in SEEDED:
            self.objects[body["metadata"]["name"]] = body

    def create(self, body: dict[str, Any], plural: str = "workflows") -> dict[str, Any]:
        name = body["metadata"].get("name") or body["metadata"]["generateName"] + "x1y2z"
        if plural == "agentpools" and name == "taken":
            raise ConflictError("exists")
        self.created.append((plural, body))
        return {**body, "metadata": {**body["metadata"], "name": name}}

    def get(self, name: str, plural: str = "workflows") -> dict[str, Any]:
        if name not in self.objects:
            raise NotFoundError(f"reading workflows/{name} in {self.namespace}: not found")
        return self.objects[name]

    def all(self, plural: str = "workflows") -> list[dict[str, Any]]:
        return list(self.objects.values())

    def patch(self, name: str, patch: dict[str, Any], plural: str = "workflows") -> dict[str, Any]:
        self.patches.append((name, patch))
        return self.objects[name]

    def delete(self, name: str, plural: str = "workflows") -> None:
        self.deleted.append(name)

    def watch(self, name: str, seconds: float) -> Iterator[dict[str, Any]]:
        yield from self.watched or [self.get(name)]


SEEDED: list[dict[str, Any]] = []


@pytest.fixture(autouse=True)
def fake_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(commands, "Cluster", FakeCluster)
    FakeCluster.instances.clear()
    SEEDED.clear()
    yield


def cluster() -> FakeCluster:
    return FakeCluster.instances[-1]


def test_list_prints_a_table_and_kubectl_s_other_formats(
        capsys: pytest.CaptureFixture[str]) -> None:
    SEEDED.extend([stored("b-run", "Running", startedAt=NOW),
                   stored("a-done", "Failed", namespace="team", message="step work failed"),
                   stored("c-new")])
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "AGE"]
    assert [line.split()[:2] for line in lines[1:]] == [  # by namespace, then name
        ["b-run", "Running"], ["c-new", "Pending"], ["a-done", "Failed"]]

    assert main(["list", "-A", "-o", "wide"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "PHASE", "PROGRESS", "AGE", "DURATION",
                                "MESSAGE"]
    assert lines[-1].split()[:2] == ["team", "a-done"] and "step work failed" in lines[-1]
    assert cluster().target.all_namespaces

    assert main(["list", "-o", "name"]) == 0
    assert capsys.readouterr().out.split() == [
        "workflow.agentainer.dev/b-run", "workflow.agentainer.dev/c-new",
        "workflow.agentainer.dev/a-done"]
    assert main(["list", "-o", "json", "-n", "team", "--context", "lab"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "List" and len(listed["items"]) == 3
    assert (cluster().target.namespace, cluster().target.context) == ("team", "lab")
    assert main(["list", "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["items"][0]["metadata"]["name"] == "b-run"


def test_list_of_an_empty_namespace_says_so_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "-n", "empty"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "No workflows in namespace empty."


def test_get_shows_steps_and_agents_and_says_when_some_are_only_in_the_store(
        capsys: pytest.CaptureFixture[str]) -> None:
    agent = {"id": "work.0.1", "name": "w-work-0", "index": 0, "attempt": 1,
             "phase": "Failed", "exitCode": 3, "reason": "Error",
             "startedAt": "2026-11-26T10:00:01Z", "finishedAt": "2026-11-26T10:00:04Z"}
    SEEDED.append(stored("w", "Failed", startedAt=NOW, finishedAt="2026-11-26T10:00:05Z",
                         message="step work failed", conditions=[
                             {"type": "Succeeded", "status": "False", "reason": "Failed",
                              "message": "m", "lastTransitionTime": NOW}],
                         steps=[{"name": "work", "phase": "Failed", "attempts": 9,
                                 "agents": [agent], "agentsOmitted": 8,
                                 "message": "agent w-work-0 exited 3"}]))
    assert main(["get", "w", "--redis-url", "redis://127.0.0.1:1/0"]) == 0
    out = capsys.readouterr().out
    assert "Phase:       Failed" in out and "Succeeded=False (Failed)" in out
    assert "Finished:    2026-11-26T10:00:05Z (5s)" in out
    assert any(line.split() == ["work", "Failed", "9", "agent", "w-work-0", "exited", "3"]
               for line in out.splitlines())
    assert any(line.split() == ["work.0.1", "w-work-0", "Failed", "3", "Error", "3s"]
               for line in out.splitlines())
    assert "8 more agents are in the store, not listed here: the store could not be read" in out

    assert main(["get", "w", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"]["phase"] == "Failed"
    assert main(["get", "nothing"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: reading workflows/nothing in default: not found"


@pytest.mark.parametrize(("command", "patch"), [
    ("stop", {"spec": {"shutdown": "Stop"}}),
    ("terminate", {"spec": {"shutdown": "Terminate"}}),
    ("suspend", {"spec": {"suspend": True}}),
    ("resume", {"spec": {"suspend": False}}),
])
def test_each_action_on_a_running_workflow_is_a_field_of_its_spec(
        command: str, patch: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    SEEDED.extend([stored("run", "Running"), stored("done", "Succeeded")])
    assert main([command, "run", "-n", "default"]) == 0
    assert cluster().patches == [("run", patch)]
    assert capsys.readouterr().out.startswith("workflow.agentainer.dev/run ")
    assert main([command, "done"]) == 1
    assert cluster().patches == []
    assert capsys.readouterr().err.strip() == "error: done has already finished (Succeeded)"


def test_retry_annotates_a_failed_workflow_with_a_new_value_and_refuses_the_others(
        capsys: pytest.CaptureFixture[str]) -> None:
    SEEDED.extend([stored("failed", "Failed"), stored("stopped", "Stopped"),
                   stored("run", "Running"), stored("good", "Succeeded")])
    values = []
    for name in ("failed", "stopped", "failed"):
        assert main(["retry", name]) == 0
        (patched, patch), = cluster().patches
        assert patched == name
        values.append(patch["metadata"]["annotations"]["workflows.agentainer.dev/retry"])
        assert patch["spec"] == {"shutdown": None}  # a stop that ended it would stop it again
    assert len(set(values)) == 3  # each retry a value of its own: each is acted on once
    capsys.readouterr()
    assert main(["retry", "run"]) == 1
    assert "cannot be retried: it has not finished" in capsys.readouterr().err
    assert main(["retry", "good"]) == 1
    assert "it succeeded (resubmit runs it anew)" in capsys.readouterr().err


def test_submit_creates_the_workflow_with_its_params_and_the_pools_beside_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workflow = workflow_doc({"name": "greet", "command": ["echo", "{{ params.who }}"]},
                            name="hello", params=[{"name": "who"}, {"name": "how",
                                                                     "value": "loud"}])
    pools = [{"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
              "metadata": {"name": name}, "spec": {"image": "agentainer/busybox:latest"}}
             for name in ("fresh", "taken")]
    path = tmp_path / "hello.yaml"
    path.write_text(yaml.safe_dump_all([*pools, workflow]))

    assert main(["submit", str(path), "-p", "who=world", "-n", "team"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["agentpool.agentainer.dev/fresh created",
                   "agentpool.agentainer.dev/taken exists: left as it is",
                   "workflow.agentainer.dev/hello created"]
    (plural, body), = [c for c in cluster().created if c[0] == "workflows"]
    assert body["metadata"]["namespace"] == "team"
    assert body["spec"]["params"] == [{"name": "who", "value": "world"},
                                      {"name": "how", "value": "loud"}]

    assert main(["submit", str(path)]) == 2  # the required param is missing
    assert "spec.params[0].value" in capsys.readouterr().err
    assert main(["submit", str(path), "-p", "nope=1", "-p", "who=x"]) == 2
    assert "-p nope: the workflow has no parameter 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: one way to wait
        main(["submit", str(path), "--wait", "--watch"])
    assert exited.value.code == 2


def test_resubmit_makes_a_new_workflow_of_the_same_spec_without_its_controls(
        capsys: pytest.CaptureFixture[str]) -> None:
    old = stored("nightly", "Failed")
    old["spec"].update(shutdown="Stop", suspend=True, ttlSecondsAfterFinished=60)
    old["metadata"]["annotations"]["workflows.agentainer.dev/retry"] = "1"
    SEEDED.append(old)
    assert main(["resubmit", "nightly"]) == 0
    (_, body), = cluster().created
    assert body["metadata"]["generateName"] == "nightly-" and "name" not in body["metadata"]
    assert body["metadata"]["annotations"] == {"team": "blue"}
    assert "shutdown" not in body["spec"] and "suspend" not in body["spec"]
    assert body["spec"]["ttlSecondsAfterFinished"] == 60
    assert capsys.readouterr().out.strip() == "workflow.agentainer.dev/nightly-x1y2z created"


def test_delete_deletes_each_named_workflow(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["delete", "a", "b"]) == 0
    assert cluster().deleted == ["a", "b"]
    assert capsys.readouterr().out.splitlines() == ["workflow.agentainer.dev/a deleted",
                                                    "workflow.agentainer.dev/b deleted"]


def progress(phase: str, steps: list[dict[str, Any]], **status: Any) -> dict[str, Any]:
    body = stored("w", phase, **status)
    body["status"]["steps"] = steps
    return body


def test_watch_prints_what_changed_and_exits_with_the_outcome(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    agent = {"id": "work.0.1", "name": "w-work-0", "index": 0, "attempt": 1}
    bodies = [
        progress("Running", [{"name": "work", "phase": "Running",
                              "agents": [{**agent, "phase": "Running"}]}]),
        progress("Running", [{"name": "work", "phase": "Running",
                              "agents": [{**agent, "phase": "Running"}]}]),
        progress("Stopped", [{"name": "work", "phase": "Cancelled", "message": "stopped",
                              "agents": [{**agent, "phase": "Succeeded", "exitCode": 0}]}],
                 startedAt=NOW, finishedAt="2026-11-26T10:00:02Z", message="stopped: ..."),
    ]
    SEEDED.append(bodies[0])
    monkeypatch.setattr(FakeCluster, "watch", lambda self, name, seconds: iter(bodies))
    assert main(["watch", "w"]) == 1  # Stopped: not a success
    assert capsys.readouterr().out.splitlines() == [
        "w: Running",
        "         work: agent work.0.1 running (progress 1/1)",
        "  start  work",
        "w: Stopped",
        "         work: agent work.0.1 succeeded exit=0 (progress 1/1)",
        "  cancel work: stopped",
        "w: Stopped in 2.0s (1/1 agents): stopped: ...",
    ]
    monkeypatch.setattr(FakeCluster, "watch", lambda self, name, seconds: iter(bodies[:2]))
    assert main(["watch", "w", "--timeout", "5"]) == 124
    assert "w had not finished after 5 s (--timeout); it is Running at 1/1" in \
        capsys.readouterr().err


@pytest.mark.parametrize(("seconds", "shown"), [(None, ""), (0.4, "0s"), (45, "45s"),
                                                (192, "3m12s"), (700, "11m"),
                                                (7500, "2h5m"), (356400, "4d3h")])
def test_durations_read_as_kubectl_prints_them(seconds: float | None, shown: str) -> None:
    assert commands.duration(seconds) == shown


def test_what_an_agent_printed_cannot_drive_the_terminal_of_get_and_watch() -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07done\x9b31m\n  next"
    assert commands.short(hostile, 200) == "?[2J?]0;owned?done?31m next"
