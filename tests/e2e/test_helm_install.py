"""`helm install` on the real single-node cluster, as the README's "Install on kind" has users do
it (through scripts/install-local.sh, the local cluster's `make cluster-install`): the chart
brings the controller up from the locally built image, with its bundled Redis on a persistent
volume; the MapReduce example succeeds through it; its metrics come through
`kubectl port-forward`; `helm uninstall` takes it all away."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import Controller, Kubectl

pytestmark = pytest.mark.e2e

RELEASE = "e2e"
FULLNAME = "e2e-agentainer"
NAMESPACE = "agentainer-e2e"
WORKFLOW = "mapreduce-wordcount-pods"


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
        [str(ROOT / "scripts" / "install-local.sh"), "--set", f"watchNamespaces={{{NAMESPACE}}}"],
        capture_output=True, text=True, timeout=1500,
        env={**os.environ, "KUBECONFIG": kubeconfig, "RELEASE": RELEASE,
             "NAMESPACE": NAMESPACE, "TAG": "e2e", "PYTHON": sys.executable})


def _controller_log(kubectl: Kubectl) -> str:
    result = kubectl("logs", "-n", NAMESPACE, f"deployment/{FULLNAME}", "--tail=40", check=False)
    return result.stdout + result.stderr


def _redis_keys(kubectl: Kubectl, pattern: str) -> list[str]:
    listed = kubectl("exec", "-n", NAMESPACE, f"{FULLNAME}-redis-0", "--", "redis-cli",
                     "--scan", "--pattern", pattern)
    return sorted(listed.stdout.split())


def _metrics_through_port_forward(kubectl: Kubectl) -> str:
    forward = subprocess.Popen(
        ["kubectl", "port-forward", "-n", NAMESPACE, f"svc/{FULLNAME}-metrics", ":8080"],
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

        # The controller's state went to the bundled Redis, on the persistent volume, and
        # outlives the Redis pod.
        claim = kubectl.get("pvc", f"data-{FULLNAME}-redis-0", namespace=NAMESPACE)
        assert claim["status"]["phase"] == "Bound"
        assert list(redis_volume.rglob("appendonly*")), "Redis wrote no append-only file"
        uid = workflow["metadata"]["uid"]
        before = _redis_keys(kubectl, f"agentainer:workflow:{uid}*")
        assert f"agentainer:workflow:{uid}" in before, before
        kubectl("delete", "pod", "-n", NAMESPACE, f"{FULLNAME}-redis-0")
        kubectl("wait", "-n", NAMESPACE, "--for=condition=Ready", "--timeout=120s",
                f"pod/{FULLNAME}-redis-0")
        assert _redis_keys(kubectl, f"agentainer:workflow:{uid}*") == before

        metrics = _metrics_through_port_forward(kubectl)
        assert 'agentainer_workflows_finished_total{phase="Succeeded"} 1.0' in metrics
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
