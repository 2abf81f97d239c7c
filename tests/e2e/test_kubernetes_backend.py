"""backend: kubernetes on a real node (kubelet on containerd): agents are pods."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest
import yaml

from controller.store import Keys
from tests.conftest import ROOT, sh, workflow_doc
from tests.e2e.conftest import Controller, Kubectl
from tests.e2e.test_operator import apply, finished

pytestmark = pytest.mark.e2e


def pods(kubectl: Kubectl, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        kubectl("get", "pods", "-A", "-l", selector, "-o", "json").stdout)["items"]
    return items


def no_pods_left(kubectl: Kubectl, selector: str, timeout: float = 60) -> bool:
    """Pod deletion is asynchronous: removed pods may be terminating for a moment."""
    deadline = time.monotonic() + timeout
    while left := pods(kubectl, selector):
        if time.monotonic() > deadline:
            raise AssertionError("pods left: " + ", ".join(
                f"{p['metadata']['name']} {p['status'].get('phase')} "
                f"deleting={p['metadata'].get('deletionTimestamp')}" for p in left))
        time.sleep(0.5)
    return True


def on_pods(*steps: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return workflow_doc(*steps, backend="kubernetes", **spec)


def test_mapreduce_on_pods_gives_the_right_total(kubectl: Kubectl,
                                                 controller: Controller) -> None:
    kubectl("apply", "-f", str(ROOT / "examples" / "mapreduce-pods.yaml"))
    name = "mapreduce-wordcount-pods"

    status = kubectl.wait_for("workflow", name, finished, timeout=180)["status"]

    assert status["phase"] == "Succeeded", status
    steps = {step["name"]: step for step in status["steps"]}
    assert steps["reduce"]["output"] == "60"
    assert no_pods_left(kubectl, f"agentainer.dev/workflow={name}")  # OnSuccess: all removed


def test_agent_pods_are_built_restricted_and_owned_by_the_workflow(
        kubectl: Kubectl, controller: Controller) -> None:
    name = apply(kubectl, on_pods(
        {"name": "one", "command": sh("echo ok"), "resources": {"cpu": "250m",
                                                                 "memory": "32Mi"},
         "pod": {"nodeSelector": {"kubernetes.io/hostname": "localhost"}}},
        cleanup="Never"))
    body = kubectl.wait_for("workflow", name, finished, timeout=120)
    assert body["status"]["phase"] == "Succeeded", body["status"]

    (pod,) = pods(kubectl, f"agentainer.dev/workflow={name}")
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "Workflow", name, body["metadata"]["uid"])
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["resources"]["limits"] == {"cpu": "250m", "memory": str(32 * 2**20)}
    assert pod["spec"]["restartPolicy"] == "Never"
    # A map of the spec reaches the pod: the API server keeps its keys.
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "localhost"}
    assert pod["metadata"]["labels"]["agentainer.dev/step"] == "one"
    managed = json.loads(kubectl("get", "pod", "-n", pod["metadata"]["namespace"],
                                 pod["metadata"]["name"], "-o", "json",
                                 "--show-managed-fields").stdout)["metadata"]["managedFields"]
    assert "agentainer" in {entry["manager"] for entry in managed  # its creator, named
                            if not entry.get("subresource")}

    kubectl("delete", "workflow", name, "--timeout=90s")
    assert no_pods_left(kubectl, f"agentainer.dev/workflow={name}")  # deleting removes them


def test_pod_over_its_memory_limit_is_reported_oom_killed(kubectl: Kubectl,
                                                          controller: Controller) -> None:
    name = apply(kubectl, on_pods(
        {"name": "hog", "resources": {"memory": "16Mi"},
         "command": sh("x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}")}))

    status = kubectl.wait_for("workflow", name, finished, timeout=120)["status"]

    assert status["phase"] == "Failed"
    agent = status["steps"][0]["agents"][0]
    assert agent["reason"] == "OOMKilled"
    assert "ran out of memory" in status["steps"][0]["message"]


def test_pod_past_its_timeout_is_reported_deadline_exceeded(kubectl: Kubectl,
                                                            controller: Controller) -> None:
    name = apply(kubectl, on_pods({"name": "slow", "timeoutSeconds": 3,
                                   "command": sh("sleep 120")}))

    status = kubectl.wait_for("workflow", name, finished, timeout=120)["status"]

    assert status["phase"] == "Failed"
    assert status["steps"][0]["agents"][0]["reason"] == "DeadlineExceeded"
    assert "timeoutSeconds (3)" in status["steps"][0]["message"]
    # Ended by the kubelet's SIGTERM (143), not by its SIGKILL once the grace period had
    # passed (137), as when the command was the pod's PID 1, which ignores SIGTERM.
    assert status["steps"][0]["agents"][0]["exitCode"] == 143


def test_a_pod_no_node_has_room_for_is_said_in_its_steps_message_and_an_event(
        kubectl: Kubectl, controller: Controller) -> None:
    name = apply(kubectl, on_pods({"name": "big", "resources": {"cpu": "64"},
                                   "command": sh("echo never")}))

    def waiting(body: dict[str, Any]) -> bool:
        steps = (body.get("status") or {}).get("steps") or [{}]
        return "Insufficient cpu" in (steps[0].get("message") or "")

    status = kubectl.wait_for("workflow", name, waiting, timeout=60)["status"]

    assert status["phase"] == "Running"
    assert status["steps"][0]["message"].startswith(
        f"agent {status['steps'][0]['agents'][0]['name']} waits: no node takes its pod yet: ")
    events = json.loads(kubectl("get", "events", "--field-selector",
                                f"involvedObject.name={name}", "-o", "json").stdout)["items"]
    assert any(event["reason"] == "AgentWaiting" and "Insufficient cpu" in event["message"]
               for event in events), [event["reason"] for event in events]
    kubectl("delete", "workflow", name, "--wait", "--timeout=60s")
    assert no_pods_left(kubectl, f"agentainer.dev/workflow={name}")


def test_missing_image_is_reported_from_the_pod_status(kubectl: Kubectl,
                                                       controller: Controller) -> None:
    name = apply(kubectl, on_pods({"name": "ghost", "image": "agentainer/not-here:1",
                                   "command": sh("true")}))

    status = kubectl.wait_for("workflow", name, finished, timeout=120)["status"]

    assert status["phase"] == "Failed"
    message = status["steps"][0]["message"]
    assert "ErrImagePull" in message or "ImagePullBackOff" in message


def test_pooled_step_on_pods(kubectl: Kubectl, controller: Controller) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": "pod-pool"},
        "spec": {"backend": "kubernetes", "image": "agentainer/busybox:latest",
                 "minSize": 1, "maxSize": 2, "resetCommand": sh("rm -rf /tmp/*")}}))
    name = apply(kubectl, on_pods(
        {"name": "fan", "pool": "pod-pool", "parallel": {"items": ["a b", "c d e", "f"]},
         "command": sh('echo "$AGENTAINER_ITEM" | wc -w')}))

    status = kubectl.wait_for("workflow", name, finished, timeout=180)["status"]

    assert status["phase"] == "Succeeded", status
    assert json.loads(status["steps"][0]["output"]) == ["2", "3", "1"]
    pool_pods = pods(kubectl, "agentainer.dev/pool=pod-pool")
    assert 1 <= len(pool_pods) <= 2
    assert all(p["status"]["phase"] == "Running" for p in pool_pods)
    kubectl("delete", "agentpool", "pod-pool", "--timeout=90s")
    assert no_pods_left(kubectl, "agentainer.dev/pool=pod-pool")


def test_pod_deleted_from_under_its_agent_is_retried_and_says_why(
        kubectl: Kubectl, controller: Controller) -> None:
    """A drain, a preemption or a person deletes the pod (the API answers 404 for it from
    then on): not the agent's own exit, so the step's retries run it again."""
    name = apply(kubectl, on_pods(
        {"name": "victim", "retries": {"limit": 1, "backoffSeconds": 0},
         "command": sh('[ "$AGENTAINER_ATTEMPT" = 1 ] && sleep 120; echo survived')}))
    deadline = time.monotonic() + 90
    while not (running := [p for p in pods(kubectl, f"agentainer.dev/workflow={name}")
                           if p["status"]["phase"] == "Running"]):
        assert time.monotonic() < deadline, "the pod never ran"
        time.sleep(0.5)
    kubectl("delete", "pod", running[0]["metadata"]["name"], "--grace-period=0", "--force")

    status = kubectl.wait_for("workflow", name, finished, timeout=120)["status"]

    assert status["phase"] == "Succeeded", status
    assert status["steps"][0]["output"] == "survived"
    first = status["steps"][0]["agents"][0]
    assert first["reason"] == "Lost", first


def test_controller_restarted_mid_run_adopts_its_pods(kubectl: Kubectl,
                                                      controller: Controller) -> None:
    name = apply(kubectl, on_pods(
        {"name": "fan", "parallel": {"replicas": 3},
         "command": sh("sleep 8; echo $AGENTAINER_ITEM_INDEX")}, cleanup="Never"))
    deadline = time.monotonic() + 90
    while len([p for p in pods(kubectl, f"agentainer.dev/workflow={name}")
               if p["status"]["phase"] == "Running"]) < 3:
        assert time.monotonic() < deadline, "the pods never ran"
        time.sleep(0.5)

    controller.kill()
    controller.start()
    status = kubectl.wait_for("workflow", name, finished, timeout=120)["status"]

    assert status["phase"] == "Succeeded", status
    assert json.loads(status["steps"][0]["output"]) == ["0", "1", "2"]
    assert [a["attempt"] for a in status["steps"][0]["agents"]] == [1, 1, 1]
    assert len(pods(kubectl, f"agentainer.dev/workflow={name}")) == 3  # none started twice


def test_a_pod_no_node_can_take_fails_its_agent_in_time_with_the_schedulers_reason(
        kubectl: Kubectl, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod asking for more CPU than the node has: with a scheduling limit, its agent fails
    once that has passed, saying why, and the pod is removed."""
    import asyncio

    from controller.backends.base import AgentSpec
    from controller.backends.kubernetes import KubernetesBackend
    from controller.config import Settings
    from controller.errors import AgentUnschedulableError

    import kubernetes

    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        kubectl.kubeconfig)
    labels = {"agentainer.dev/test": "unschedulable"}

    async def scenario() -> tuple[str, float]:
        backend = await KubernetesBackend.connect(Settings.from_env(pod_scheduling_seconds=3))
        agent = await backend.start(AgentSpec(
            name="too-big", image="agentainer/busybox:latest", command=sh("echo never"),
            args=None, env={}, labels=labels, nano_cpus=64_000_000_000))
        began = time.monotonic()
        try:
            with pytest.raises(AgentUnschedulableError) as raised:
                await asyncio.wait_for(backend.wait(agent), 60)
            return str(raised.value), time.monotonic() - began
        finally:
            await backend.remove(agent)

    message, took = asyncio.run(scenario())
    assert "no node took it in 3s" in message and "Insufficient cpu" in message, message
    assert took < 30
    assert no_pods_left(kubectl, "agentainer.dev/test=unschedulable")


def test_websocket_calls_do_not_disturb_concurrent_api_calls(kubectl: Kubectl,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Attach websockets to a pool pod's runner are opened (ten at once) while agents are
    listed from other threads at the same moment: every call gets its own answer."""
    import asyncio

    from controller.backends import kubernetes as backend_module
    from controller.backends.base import AgentSpec
    from controller.backends.kubernetes import KubernetesBackend, PodAttachChannel
    from controller.config import Settings

    import kubernetes

    # What KUBECONFIG says, read by the client when it was imported.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        kubectl.kubeconfig)
    labels = {"agentainer.dev/test": "websockets"}

    async def attach_and_greet(name: str) -> str:
        client = await asyncio.to_thread(
            backend_module._stream, "connect_get_namespaced_pod_attach", name, "default",
            container=backend_module.CONTAINER, stdin=True, stdout=True, stderr=True,
            tty=False, _preload_content=False)
        channel = PodAttachChannel(client, name)
        try:
            return (await channel.hello()).mode
        finally:
            channel.close()

    async def scenario() -> tuple[list[Any], int]:
        backend = await KubernetesBackend.connect(Settings.from_env())
        agent = await backend.start(AgentSpec(
            name="websockets", image="agentainer/busybox:latest", command=None, args=None,
            env={}, labels=labels, resident=True))
        try:
            greetings = [attach_and_greet(agent.name) for _ in range(10)]
            listings = [backend.list_agents("default", labels) for _ in range(60)]
            results = await asyncio.gather(*greetings, *listings, return_exceptions=True)
            task = await backend.run_task(agent, sh("echo still fine"), {}, 60)
        finally:
            await backend.remove(agent)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert results[:10] == ["user"] * 10 or errors, results[:10]
        assert task.stdout == "still fine\n"
        return errors, len(results)

    errors, count = asyncio.run(scenario())
    assert not errors, f"{len(errors)} of {count} calls failed, first: {errors[0]!r}"
    assert no_pods_left(kubectl, "agentainer.dev/test=websockets")


def test_pods_carrying_a_pools_labels_are_not_adopted_unless_it_owns_them(
        kubectl: Kubectl, controller: Controller, redis_url: str) -> None:
    """Whoever may create a pod can copy a pool's labels: neither such a pod in another
    namespace nor one in the pool's own without its ownerReference joins the pool (where it
    would get the pool's next tasks, env and all)."""
    for namespace in ("victim-team", "other-team"):
        kubectl("create", "namespace", namespace, check=False)
    name = "victim"
    kubectl("apply", "-n", "victim-team", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": name},
        "spec": {"image": "agentainer/busybox:latest", "backend": "kubernetes",
                 "minSize": 1, "maxSize": 3}}))
    try:
        body = kubectl.wait_for("agentpool", name,
                                lambda b: (b.get("status") or {}).get("ready") == 1,
                                namespace="victim-team")
        uid = body["metadata"]["uid"]
        labels = {"agentainer.dev/pool-uid": uid, "agentainer.dev/pool": name,
                  "agentainer.dev/runner": "1", "app.kubernetes.io/managed-by": "agentainer"}
        for namespace in ("victim-team", "other-team"):
            kubectl("apply", "-f", "-", input=yaml.safe_dump({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "decoy", "namespace": namespace, "labels": labels},
                "spec": {"containers": [{
                    "name": "agent", "image": "agentainer/busybox:latest",
                    "imagePullPolicy": "Never", "command": ["sleep", "600"],
                    "securityContext": {"allowPrivilegeEscalation": False}}]}}))
        for namespace in ("victim-team", "other-team"):
            kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s",
                    "pod/decoy")
        # Two reconciles of the pool (every 10 s) see the decoys, and leave them be.
        time.sleep(25)
        body = kubectl.get("agentpool", name, namespace="victim-team")
        assert body["status"]["total"] == 1, body["status"]
        recorded = subprocess.run(
            ["redis-cli", "-u", redis_url, "HKEYS", Keys.pool_agents(uid)],
            capture_output=True, text=True, check=True).stdout.split()
        assert len(recorded) == 1 and "decoy" not in recorded, recorded
        for namespace in ("victim-team", "other-team"):
            decoy = kubectl.get("pod", "decoy", namespace=namespace)
            assert decoy["status"]["phase"] == "Running"
            assert not decoy["metadata"].get("deletionTimestamp")
        assert "carries the labels of" in controller.log.read_text()
    finally:
        for namespace in ("victim-team", "other-team"):
            kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s",
                    check=False)
