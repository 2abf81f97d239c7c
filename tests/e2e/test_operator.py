"""The operator end to end: kubectl against a real API server, the controller running, agents on
the real Docker engine, state in a real Redis."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import docker
import pytest
import redis
import yaml

from controller.store import Keys
from tests.conftest import ROOT, sh, workflow_doc
from tests.e2e.conftest import Controller, Kubectl

pytestmark = pytest.mark.e2e


def finished(body: dict[str, Any]) -> bool:
    return (body.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled", "Stopped")


def apply(kubectl: Kubectl, document: dict[str, Any]) -> str:
    kubectl("apply", "-f", "-", input=yaml.safe_dump(document))
    return str(document["metadata"]["name"])


def agents_of(client: docker.DockerClient, name: str, **labels: str) -> list[Any]:
    selectors = [f"agentainer.dev/workflow={name}"] + [f"agentainer.dev/{k}={v}"
                                                        for k, v in labels.items()]
    # One the engine removed between listing and reading it is gone, not an error.
    return list(client.containers.list(all=True, filters={"label": selectors},
                                       ignore_removed=True))


@pytest.fixture(scope="module")
def docker_client() -> Any:
    client = docker.from_env()
    yield client
    client.close()


def test_mapreduce_example_succeeds_with_the_right_total(kubectl: Kubectl,
                                                         controller: Controller) -> None:
    kubectl("apply", "-f", str(ROOT / "examples" / "mapreduce.yaml"))

    body = kubectl.wait_for("workflow", "mapreduce-wordcount", finished)

    status = body["status"]
    assert status["phase"] == "Succeeded", status
    steps = {step["name"]: step for step in status["steps"]}
    assert steps["reduce"]["output"] == "60"
    assert steps["report"]["output"].startswith("total words: 60")
    assert status["progress"] == "8/8"
    assert status["observedGeneration"] == body["metadata"]["generation"]
    assert status["conditions"][0]["type"] == "Completed"
    assert "outputs" not in steps["map"]  # full outputs stay in Redis, the status stays small
    table = kubectl("get", "workflows").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "AGE"]
    row = next(line for line in table if line.startswith("mapreduce-wordcount"))
    assert row.split()[1:3] == ["Succeeded", "8/8"]
    events = kubectl("get", "events", "--field-selector",
                     "involvedObject.name=mapreduce-wordcount", "-o", "json").stdout
    reasons = {event["reason"] for event in json.loads(events)["items"]}
    assert {"Started", "StepStarted", "StepSucceeded", "Succeeded"} <= reasons
    managed = json.loads(kubectl("get", "workflow", "mapreduce-wordcount", "-o", "json",
                                 "--show-managed-fields").stdout)["metadata"]["managedFields"]
    assert {entry["manager"] for entry in managed
            if entry.get("subresource") == "status"} == {"agentainer"}  # the controller, named


BAD_STEPS: list[tuple[dict[str, Any], str]] = [
    ({"steps": [{"name": "Map_Step", "image": "x"}]}, "spec.steps[0].name"),
    ({"cleanup": "Sometimes", "steps": [{"name": "a", "image": "x"}]}, "spec.cleanup"),
    ({"steps": [{"name": "a", "image": "x", "parallel": {"replicas": 3, "maxWorkers": 0}}]},
     "spec.steps[0].parallel.maxWorkers"),
    ({"steps": [{"name": "a", "image": "x", "pool": "warm"}]}, "set exactly one of image or pool"),
    ({"steps": [{"name": "a", "image": "x", "resources": {"memory": "lots"}}]},
     "spec.steps[0].resources.memory"),
    ({"steps": [{"name": "a", "image": "x"}, {"name": "a", "image": "x"}]},
     "step names must be unique"),
    ({"steps": []}, "spec.steps"),
]


@pytest.mark.parametrize(("spec", "named"), BAD_STEPS)
def test_invalid_manifest_is_refused_by_the_api_server(kubectl: Kubectl, spec: dict[str, Any],
                                                       named: str) -> None:
    document = {"apiVersion": "agentainer.dev/v1alpha1", "kind": "Workflow",
                "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"}, "spec": spec}

    result = kubectl("apply", "-f", "-", input=yaml.safe_dump(document), check=False)

    assert result.returncode != 0
    assert named in result.stderr
    assert kubectl("get", "workflow", document["metadata"]["name"], check=False).returncode != 0


@pytest.mark.parametrize(("spec", "named"), [
    ({"runAsUser": 1000, "pod": {"runAsUser": 2000}}, "pod.runAsUser and runAsUser must be"),
    ({"runAsUser": -1}, "spec.runAsUser"),
    ({"pod": {"runtimeClassName": "Not_A_Name"}}, "spec.pod.runtimeClassName"),
])
def test_invalid_agent_pool_is_refused_by_the_api_server(kubectl: Kubectl, spec: dict[str, Any],
                                                         named: str) -> None:
    document = {"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"},
                "spec": {"image": "agentainer/busybox:latest", **spec}}

    result = kubectl("apply", "-f", "-", input=yaml.safe_dump(document), check=False)

    assert result.returncode != 0 and named in result.stderr, result.stderr


def test_invalid_dag_fails_with_an_invalid_condition_and_others_still_run(
        kubectl: Kubectl, controller: Controller) -> None:
    cyclic = apply(kubectl, workflow_doc(
        {"name": "a", "dependsOn": ["b"], "command": sh("true")},
        {"name": "b", "dependsOn": ["a"], "command": sh("true")}))
    fine = apply(kubectl, workflow_doc({"name": "only", "command": sh("echo fine")}))

    status = kubectl.wait_for("workflow", cyclic, finished)["status"]

    assert status["phase"] == "Failed"
    condition, completed, succeeded = status["conditions"]
    assert condition["type"] == "Invalid" and condition["status"] == "True"
    assert (completed["type"], completed["status"]) == ("Completed", "True")
    assert "dependency cycle: a -> b -> a" in condition["message"]
    assert (succeeded["type"], succeeded["status"]) == ("Succeeded", "False")
    assert kubectl.wait_for("workflow", fine, finished)["status"]["phase"] == "Succeeded"


def test_controller_killed_during_the_fan_out_resumes_without_running_agents_twice(
        kubectl: Kubectl, controller: Controller, docker_client: Any, redis_url: str) -> None:
    document = workflow_doc(
        {"name": "prepare", "command": sh("echo ready")},
        {"name": "map", "parallel": {"items": [1, 2, 3, 4, 5], "maxWorkers": 5},
         "command": sh('sleep 4; echo $((AGENTAINER_ITEM * 10))')},
        {"name": "reduce", "env": [{"name": "ALL", "value": "{{ steps.map.outputs }}"}],
         "command": sh('echo "$ALL" | tr -d \'[]" \' | tr , "\\n" | awk \'{s+=$1} END {print s}\'')},
    )
    name = apply(kubectl, document)
    since = datetime.now(timezone.utc)
    deadline = time.monotonic() + 60
    while len([c for c in agents_of(docker_client, name, step="map")
               if c.status == "running"]) < 5:
        assert time.monotonic() < deadline, "the map agents never ran"
        time.sleep(0.2)

    controller.kill()
    time.sleep(1)
    controller.start()
    body = kubectl.wait_for("workflow", name, finished)

    assert body["status"]["phase"] == "Succeeded", body["status"]
    steps = {step["name"]: step for step in body["status"]["steps"]}
    assert steps["reduce"]["output"] == "150"
    assert [a["attempt"] for a in steps["map"]["agents"]] == [1, 1, 1, 1, 1]
    starts = docker_client.events(since=since, until=datetime.now(timezone.utc), decode=True,
                                  filters={"event": "start", "type": "container",
                                           "label": [f"agentainer.dev/workflow={name}",
                                                     "agentainer.dev/step=map"]})
    assert len(list(starts)) == 5  # each map agent started exactly once
    deadline = time.monotonic() + 30  # all succeeded: nothing left behind, once removed
    while left := agents_of(docker_client, name):
        assert time.monotonic() < deadline, f"agents left: {[c.name for c in left]}"
        time.sleep(0.2)
    records = redis.Redis.from_url(redis_url).hlen(Keys.agents(body["metadata"]["uid"]))
    assert records == 7


def test_controller_stopped_cleanly_leaves_agents_running_for_the_next_one(
        kubectl: Kubectl, controller: Controller, docker_client: Any) -> None:
    name = apply(kubectl, workflow_doc(
        {"name": "work", "parallel": {"replicas": 2}, "command": sh("sleep 15; echo ok")}))
    deadline = time.monotonic() + 60
    while len([c for c in agents_of(docker_client, name) if c.status == "running"]) < 2:
        assert time.monotonic() < deadline, "the agents never ran"
        time.sleep(0.2)

    controller.stop()  # SIGTERM, as a rolling upgrade does
    still_running = [c for c in agents_of(docker_client, name) if c.status == "running"]
    controller.start()
    body = kubectl.wait_for("workflow", name, finished)

    assert len(still_running) == 2
    assert body["status"]["phase"] == "Succeeded"
    assert [a["attempt"] for a in body["status"]["steps"][0]["agents"]] == [1, 1]


def test_deleting_a_running_workflow_stops_and_removes_its_agents(
        kubectl: Kubectl, controller: Controller, docker_client: Any, redis_url: str) -> None:
    name = apply(kubectl, workflow_doc(
        {"name": "long", "parallel": {"replicas": 2}, "command": sh("sleep 300")},
        cleanup="Never"))
    deadline = time.monotonic() + 60
    while len([c for c in agents_of(docker_client, name) if c.status == "running"]) < 2:
        assert time.monotonic() < deadline, "the agents never ran"
        time.sleep(0.2)
    uid = kubectl.get("workflow", name)["metadata"]["uid"]

    kubectl("delete", "workflow", name, "--timeout=90s")

    assert agents_of(docker_client, name) == []
    assert redis.Redis.from_url(redis_url).exists(Keys.workflow(uid)) == 0


def test_spec_change_after_the_run_is_recorded_and_ignored(kubectl: Kubectl,
                                                           controller: Controller) -> None:
    name = apply(kubectl, workflow_doc({"name": "once", "command": sh("echo first")}))
    kubectl.wait_for("workflow", name, finished)

    kubectl("patch", "workflow", name, "--type=merge", "-p",
            json.dumps({"spec": {"description": "changed"}}))

    body = kubectl.wait_for("workflow", name, lambda b: any(
        c["type"] == "SpecChangeIgnored" for c in b["status"].get("conditions", [])))
    assert body["status"]["phase"] == "Succeeded"
    assert body["status"]["steps"][0]["output"] == "first"
    # kopf was told of no change: it keeps no copy of a Workflow's spec (a write per Workflow)
    assert not any(key.endswith("last-handled-configuration")
                   for key in body["metadata"].get("annotations", {}))


def test_spec_edited_while_the_controller_is_down_is_not_run_on_restart(
        kubectl: Kubectl, controller: Controller) -> None:
    """The run goes on with the spec it started with: the items and command of the edit are
    never run, and the SpecChangeIgnored condition says so, after the restart too."""
    name = apply(kubectl, workflow_doc(
        {"name": "fan", "parallel": {"items": ["a", "b"]},
         "command": sh('[ "$AGENTAINER_ITEM" = b ] && sleep 6; echo "old $AGENTAINER_ITEM"')}))
    kubectl.wait_for("workflow", name, lambda b: (b.get("status") or {}).get("progress")
                     == "1/2", timeout=60)

    controller.kill()
    try:
        kubectl("patch", "workflow", name, "--type=json", "-p", json.dumps([
            {"op": "replace", "path": "/spec/steps/0/parallel/items", "value": ["x", "y", "z"]},
            {"op": "replace", "path": "/spec/steps/0/command",
             "value": sh('echo "new $AGENTAINER_ITEM"')}]))
    finally:
        controller.start()
    body = kubectl.wait_for("workflow", name, finished, timeout=120)

    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert json.loads(body["status"]["steps"][0]["output"]) == ["old a", "old b"]
    assert body["status"]["observedGeneration"] < body["metadata"]["generation"]
    assert any(c["type"] == "SpecChangeIgnored" for c in body["status"]["conditions"])


def test_agent_pool_keeps_its_minimum_warm_and_drains_on_delete(
        kubectl: Kubectl, controller: Controller, docker_client: Any) -> None:
    name = f"pool-{uuid.uuid4().hex[:6]}"
    kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": name},
        "spec": {"image": "agentainer/busybox:latest", "minSize": 2, "maxSize": 4}}))

    body = kubectl.wait_for("agentpool", name,
                            lambda b: (b.get("status") or {}).get("ready") == 2)

    assert body["status"]["total"] == 2
    assert body["status"]["conditions"][0]["type"] == "Ready"
    uid = body["metadata"]["uid"]
    pool_agents = docker_client.containers.list(filters={"label": f"agentainer.dev/pool-uid={uid}"})
    assert len(pool_agents) == 2
    row = next(line for line in kubectl("get", "apool").stdout.splitlines()
               if line.startswith(name))
    assert row.split()[1:5] == ["2", "0", "2", "4"]

    kubectl("delete", "agentpool", name, "--timeout=60s")
    assert docker_client.containers.list(
        all=True, filters={"label": f"agentainer.dev/pool-uid={uid}"}) == []


def test_pooled_workflow_and_its_pool_applied_together_succeed(
        kubectl: Kubectl, controller: Controller, docker_client: Any) -> None:
    kubectl("apply", "-f", str(ROOT / "examples" / "mapreduce-pooled.yaml"))

    body = kubectl.wait_for("workflow", "mapreduce-wordcount-pooled", finished)

    assert body["status"]["phase"] == "Succeeded", body["status"]
    steps = {step["name"]: step for step in body["status"]["steps"]}
    assert steps["reduce"]["output"] == "60"
    assert all(a["name"].startswith("pool-busybox-pool-") for a in steps["map"]["agents"])
    pool = kubectl.wait_for("agentpool", "busybox-pool",
                            lambda b: (b.get("status") or {}).get("ready", 0) >= 2)
    assert pool["status"]["busy"] == 0
    text = controller.metrics()
    assert 'agentainer_pool_lease_wait_seconds_count{pool="busybox-pool"}' in text
    kubectl("delete", "-f", str(ROOT / "examples" / "mapreduce-pooled.yaml"), "--timeout=90s")
    uid = pool["metadata"]["uid"]
    assert docker_client.containers.list(
        all=True, filters={"label": f"agentainer.dev/pool-uid={uid}"}) == []


def test_metrics_endpoint_reports_the_runs(kubectl: Kubectl, controller: Controller) -> None:
    name = apply(kubectl, workflow_doc({"name": "counted", "command": sh("echo 1")}))
    kubectl.wait_for("workflow", name, finished)

    text = controller.metrics()

    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['agentainer_workflows_finished_total{phase="Succeeded"}'] >= 1
    assert samples['agentainer_agents_started_total{backend="docker"}'] >= 1
    assert samples['agentainer_workflows{phase="Succeeded"}'] >= 1
    assert any(key.startswith("agentainer_step_duration_seconds_bucket") for key in samples)
    assert not any("uid" in key for key in samples)  # bounded labels only


def test_agent_pool_whose_image_is_missing_is_retried_later_and_later_saying_why(
        kubectl: Kubectl, controller: Controller) -> None:
    """Not in a loop: each retry waits twice as long as the one before; its Ready condition
    names the reason, so that `kubectl describe` tells the user what to fix."""
    name = f"ghost-{uuid.uuid4().hex[:6]}"
    image = f"agentainer/not-here-{name}:1"
    kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": name}, "spec": {"image": image, "minSize": 1, "maxSize": 1}}))

    def not_ready(body: dict[str, Any]) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "False" and
                   c["reason"] == "ImageNotFound"
                   for c in body.get("status", {}).get("conditions", []))

    body = kubectl.wait_for("agentpool", name, not_ready, timeout=60)
    time.sleep(16)  # long enough for a few retries of the create handler: 1, 2, 4, 8 s
    attempts = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                for line in controller.log.read_text().splitlines()
                if "pool_changed' failed temporarily" in line and image in line]
    kubectl("delete", "agentpool", name, "--timeout=60s")

    (ready,) = [c for c in body["status"]["conditions"] if c["type"] == "Ready"]
    assert image in ready["message"]
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:], strict=False)]
    assert 3 <= len(attempts) <= 8, gaps  # not a loop, and not given up
    assert all(later > earlier * 1.5 for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps


def test_agent_pool_invalid_beyond_the_schema_says_so_in_the_same_words_as_a_workflow(
        kubectl: Kubectl, controller: Controller) -> None:
    """One condition vocabulary: Invalid=True on both kinds, and the pool is not Ready."""
    name = f"bad-pool-{uuid.uuid4().hex[:6]}"
    kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": name},
        "spec": {"image": "agentainer/busybox:latest", "runAsUser": 0,
                 "pod": {"runAsNonRoot": True}}}))

    def conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in body.get("status", {}).get("conditions", [])}

    body = kubectl.wait_for("agentpool", name, lambda b: "Invalid" in conditions(b), timeout=60)
    kubectl("delete", "agentpool", name, "--timeout=60s")

    invalid, ready = conditions(body)["Invalid"], conditions(body)["Ready"]
    assert invalid["status"] == "True" and "spec.runAsUser" in invalid["message"]
    assert (ready["status"], ready["reason"]) == ("False", "Invalid")
