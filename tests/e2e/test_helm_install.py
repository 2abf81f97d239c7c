"""`helm install` on the real single-node cluster, as the README's "Install on kind" has users do
it (through scripts/install-local.sh, the local cluster's `make cluster-install`): the chart
brings two controller replicas up from the locally built image, one leading on a Lease, with
its bundled Redis (password, NetworkPolicy) on a persistent volume; the MapReduce example
succeeds through it; a fan-out survives the leader's pod being deleted, the standby taking
over; metrics come through `kubectl port-forward`; `helm uninstall` takes it all away."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.store import Keys
from tests.conftest import ROOT, sh, workflow_doc
from tests.e2e.conftest import Controller, Kubectl

pytestmark = pytest.mark.e2e

RELEASE = "e2e"
FULLNAME = "e2e-agentainer"
NAMESPACE = "agentainer-e2e"
WORKFLOW = "mapreduce-wordcount-pods"
FAN_OUT = 6


@pytest.fixture
def only_the_installed_controller(controller: Controller) -> Iterator[None]:
    """The session's own controller watches every namespace: it steps aside while the installed
    one works, as a cluster runs one operator."""
    controller.stop()
    try:
        yield
    finally:
        controller.start()


def _install(kubeconfig: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "install-local.sh"), "--set", f"watchNamespaces={{{NAMESPACE}}}",
         "--set", "replicaCount=2"],
        capture_output=True, text=True, timeout=1500,
        env={**os.environ, "KUBECONFIG": kubeconfig, "RELEASE": RELEASE,
             "NAMESPACE": NAMESPACE, "TAG": "e2e", "PYTHON": sys.executable})


def _controller_log(kubectl: Kubectl) -> str:
    result = kubectl("logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=controller",
                     "--tail=40", "--prefix", check=False)
    return result.stdout + result.stderr


def _redis_keys(kubectl: Kubectl, pattern: str) -> list[str]:
    listed = kubectl("exec", "-n", NAMESPACE, f"{FULLNAME}-redis-0", "--", "sh", "-c",
                     f'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --scan --pattern "{pattern}"')
    return sorted(listed.stdout.split())


def _leader(kubectl: Kubectl) -> str:
    """The pod holding the Lease (its identity is its host name, then a random part)."""
    lease = kubectl.get("lease", FULLNAME, namespace=NAMESPACE)
    return str(lease["spec"].get("holderIdentity") or "").rpartition("_")[0]


def _redis_from_an_agent_pod(kubectl: Kubectl, image: str) -> str:
    """What an agent's pod (any image, any code) gets from the bundled Redis."""
    kubectl("run", "-n", NAMESPACE, "intruder", f"--image={image}", "--image-pull-policy=Never",
            "--restart=Never", "--", "sh", "-c",
            f"timeout 10 redis-cli -h {FULLNAME}-redis --scan 2>&1; echo done")
    try:
        kubectl("wait", "-n", NAMESPACE, "--for=jsonpath={.status.phase}=Succeeded",
                "--timeout=60s", "pod/intruder")
        return kubectl("logs", "-n", NAMESPACE, "intruder").stdout
    finally:
        kubectl("delete", "pod", "-n", NAMESPACE, "intruder", "--wait=false", check=False)


def _survives_the_leaders_death(kubectl: Kubectl) -> None:
    """A fan-out on pods runs; the pod holding the Lease is deleted; the standby takes over,
    adopts the agents, and the workflow succeeds with every agent started once."""
    name = "fan-out-across-leaders"
    fan = {"name": "fan", "parallel": {"replicas": FAN_OUT},
           "command": sh("sleep 20; echo $AGENTAINER_INDEX")}
    kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(
        workflow_doc(fan, name=name, backend="kubernetes", cleanup="Never")))
    kubectl.wait_for("workflow", name, lambda w: any(
        agent.get("phase") == "Running" for step in w.get("status", {}).get("steps", [])
        for agent in step.get("agents", [])), timeout=120, namespace=NAMESPACE)
    leader = _leader(kubectl)
    pods = kubectl("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=controller",
                   "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    assert leader in pods, (leader, pods)
    began = time.monotonic()
    kubectl("delete", "pod", "-n", NAMESPACE, leader, "--wait=false")
    deadline = began + 60
    while (holder := _leader(kubectl)) in ("", leader):
        assert time.monotonic() < deadline, "no replica took the Lease over in 60 s"
        time.sleep(0.2)
    takeover = time.monotonic() - began
    standby = "the standby" if holder in pods else "the replica that replaced it"
    print(f"\nleader {leader} deleted; {holder} ({standby}) holds the Lease "
          f"{takeover:.1f} s later")
    workflow = kubectl.wait_for(
        "workflow", name, lambda w: w.get("status", {}).get("phase") in {"Succeeded", "Failed"},
        timeout=180, namespace=NAMESPACE)
    assert workflow["status"]["phase"] == "Succeeded", workflow["status"]
    uid = workflow["metadata"]["uid"]
    agents = json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                f"agentainer.dev/workflow-uid={uid}", "-o", "json").stdout)
    indexes = sorted(int(p["metadata"]["labels"]["agentainer.dev/index"])
                     for p in agents["items"])
    assert indexes == list(range(FAN_OUT)), "an agent was started more than once (or not)"
    assert takeover < 30, f"the standby took {takeover:.1f} s to take over"


def _metrics_through_port_forward(kubectl: Kubectl) -> str:
    forward = subprocess.Popen(
        # The leader's: a standby has run nothing.
        ["kubectl", "port-forward", "-n", NAMESPACE, f"pod/{_leader(kubectl)}", ":8080"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "KUBECONFIG": kubectl.kubeconfig})
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        found = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert found, f"kubectl port-forward said: {line}"
        with urllib.request.urlopen(f"http://127.0.0.1:{found[1]}/metrics",
                                    timeout=10) as response:
            return str(response.read().decode())
    finally:
        forward.terminate()
        forward.wait(timeout=10)


@pytest.mark.timeout(1800)
@pytest.mark.usefixtures("only_the_installed_controller")
def test_helm_install_runs_the_mapreduce_example(helm: str, kubectl: Kubectl) -> None:
    installed = _install(kubectl.kubeconfig)
    redis_volume = Path(kubectl.kubeconfig).parent / "volumes" / f"{NAMESPACE}-{FULLNAME}-redis"
    try:
        assert installed.returncode == 0, (installed.stdout + installed.stderr
                                           + _controller_log(kubectl))
        kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "mapreduce-pods.yaml"))
        try:
            workflow = kubectl.wait_for(
                "workflow", WORKFLOW,
                lambda w: w.get("status", {}).get("phase") in {"Succeeded", "Failed"},
                timeout=300, namespace=NAMESPACE)
        except AssertionError as error:
            raise AssertionError(f"{error}\ncontroller log:\n{_controller_log(kubectl)}") from None
        status = workflow["status"]
        assert status["phase"] == "Succeeded", status
        assert status["steps"][-1]["output"].startswith("total words: 60"), status["steps"][-1]

        # Redis wants its password from whoever reaches it; on a network that enforces
        # NetworkPolicy (the local cluster's bridge does not) agents do not reach it at all.
        assert kubectl.get("networkpolicy", f"{FULLNAME}-redis", namespace=NAMESPACE)
        redis_image = kubectl.get("statefulset", f"{FULLNAME}-redis", namespace=NAMESPACE)[
            "spec"]["template"]["spec"]["containers"][0]["image"]
        answer = _redis_from_an_agent_pod(kubectl, redis_image)
        assert "NOAUTH" in answer or "Could not connect" in answer, answer
        assert "agentainer:" not in answer, answer
        print(f"\nRedis to an agent pod: {answer.strip().splitlines()[0]}")

        _survives_the_leaders_death(kubectl)

        # The controller's state went to the bundled Redis, on the persistent volume, and
        # outlives the Redis pod.
        claim = kubectl.get("pvc", f"data-{FULLNAME}-redis-0", namespace=NAMESPACE)
        assert claim["status"]["phase"] == "Bound"
        assert list(redis_volume.rglob("appendonly*")), "Redis wrote no append-only file"
        uid = workflow["metadata"]["uid"]
        before = _redis_keys(kubectl, Keys.workflow(uid) + "*")
        assert Keys.workflow(uid) in before, before
        kubectl("delete", "pod", "-n", NAMESPACE, f"{FULLNAME}-redis-0")
        kubectl("wait", "-n", NAMESPACE, "--for=condition=Ready", "--timeout=120s",
                f"pod/{FULLNAME}-redis-0")
        assert _redis_keys(kubectl, Keys.workflow(uid) + "*") == before

        metrics = _metrics_through_port_forward(kubectl)
        assert 'agentainer_workflows_finished_total{phase="Succeeded"}' in metrics
        assert "agentainer_agents_started_total" in metrics
    finally:
        kubectl("delete", "workflows.agentainer.dev", "--all", "-n", NAMESPACE, "--wait=true",
                "--timeout=60s", check=False)
        uninstalled = subprocess.run(
            [helm, "uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "2m"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "KUBECONFIG": kubectl.kubeconfig})
        kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=120s", check=False)
        kubectl("delete", "pv", f"{NAMESPACE}-{FULLNAME}-redis", check=False)
    assert uninstalled.returncode == 0, uninstalled.stderr
    deadline = time.monotonic() + 60
    while kubectl("get", "pods", "-n", NAMESPACE, "-o", "name", check=False).stdout.strip():
        assert time.monotonic() < deadline, "the release's pods outlived helm uninstall"
        time.sleep(1)
