"""A real control plane (etcd + kube-apiserver built from source), the CRDs applied with kubectl,
and the controller running as users run it; agents on the real Docker engine."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, free_port


def load_cluster_module() -> Any:
    """scripts/cluster.py, which is a script, not a package."""
    spec = importlib.util.spec_from_file_location("cluster", ROOT / "scripts" / "cluster.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cluster() -> Any:
    return load_cluster_module()


@pytest.fixture(scope="session")
def cluster_plane(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fresh etcd + kube-apiserver and a node for the session, always torn down.

    A cluster that did not come up is torn down and started once more (a machine busy with its
    first start can be slow); should it fail again, every test needing it fails with the reason
    (the script says it with SystemExit, which pytest would neither keep nor show again)."""
    directory = tmp_path_factory.mktemp("control-plane")
    try:
        try:
            plane = cluster.up(directory, node=True)
        except SystemExit as first:
            print(f"the local cluster did not come up, trying once more: {first}", file=sys.stderr)
            cluster.down(directory)
            try:
                plane = cluster.up(directory, node=True)
            except SystemExit as second:
                raise RuntimeError(f"{second}\n(the first attempt: {first})") from None
        yield plane
    finally:
        cluster.down(directory)


@pytest.fixture(scope="session")
def node_images(cluster: Any, cluster_plane: Any) -> Callable[..., None]:
    """Copies images from Docker into the node, as `kind load docker-image` does."""
    def load(*images: str) -> None:
        cluster.import_images(cluster_plane.containerd_socket, list(images))

    return load


@pytest.fixture(scope="session")
def kubeconfig(cluster_plane: Any) -> Iterator[str]:
    plane = cluster_plane
    # kubectl of the cluster's own version, built with it, for every kubectl the tests run.
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{Path(plane.kube_binary).parent}{os.pathsep}{path}"
    try:
        yield plane.kubeconfig
    finally:
        os.environ["PATH"] = path


@dataclass
class Kubectl:
    kubeconfig: str

    def __call__(self, *args: str, input: str | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True,
                                env={**os.environ, "KUBECONFIG": self.kubeconfig}, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        result: dict[str, Any] = json.loads(
            self("get", kind, name, "-n", namespace, "-o", "json").stdout)
        return result

    def wait_for(self, kind: str, name: str, check: Callable[[dict[str, Any]], bool],
                 timeout: float = 120, namespace: str = "default") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            result = self("get", kind, name, "-n", namespace, "-o", "json", check=False)
            if result.returncode == 0:
                last = json.loads(result.stdout)
                if check(last):
                    return last
            time.sleep(0.5)
        raise AssertionError(f"{kind}/{name} never got there; last seen: "
                             f"{json.dumps(last.get('status'), indent=1)}")


@pytest.fixture(scope="session")
def helm() -> str:
    """helm, built from its Go module (cached outside the repository)."""
    built = subprocess.run([str(ROOT / "scripts" / "build-helm.sh")], capture_output=True,
                           text=True, timeout=1800)
    assert built.returncode == 0, built.stderr
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def kubectl(kubeconfig: str) -> Kubectl:
    kubectl = Kubectl(kubeconfig)
    kubectl("apply", "-f", str(ROOT / "crds"))
    # Polled, not `kubectl wait`: that fails at once on a CRD the API server has not yet given
    # any status conditions ("accessor error: <nil>"), as a just-made one may not have.
    for crd in ("workflows.agentainer.dev", "agentpools.agentainer.dev"):
        kubectl.wait_for("crd", crd, established, timeout=60)
    return kubectl


def established(crd: dict[str, Any]) -> bool:
    return any(condition.get("type") == "Established" and condition.get("status") == "True"
               for condition in (crd.get("status") or {}).get("conditions") or [])


@dataclass
class Controller:
    """`agentainer controller` as a process of its own, which tests may kill and restart."""

    env: dict[str, str]
    log: Path
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", "controller"], cwd=ROOT,
                env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT)
        self.starts.append(time.time())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"controller exited; see {self.log}"
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"controller did not come up; see {self.log}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url("/metrics"), timeout=5) as response:
            return str(response.read().decode())


@pytest.fixture(scope="session")
def controller_kubeconfig(kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kubeconfig with the controller's service-account token: the e2e controller has
    exactly the rights of manifests/rbac.yaml, not the admin's."""
    kubectl("apply", "-f", str(ROOT / "manifests" / "rbac.yaml"))
    token = kubectl("create", "token", "agentainer", "-n", "agentainer-system",
                    "--duration=4h").stdout.strip()
    config = yaml.safe_load(Path(kubectl.kubeconfig).read_text())
    config["users"] = [{"name": "agentainer-controller", "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = "agentainer-controller"
    path = tmp_path_factory.mktemp("controller-auth") / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="session")
def controller(kubectl: Kubectl, controller_kubeconfig: str, redis_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    port = free_port()
    log = tmp_path_factory.mktemp("controller") / "controller.log"
    controller = Controller(
        env={"KUBECONFIG": controller_kubeconfig, "AGENTAINER_REDIS_URL": redis_url,
             "AGENTAINER_METRICS_HOST": "127.0.0.1", "AGENTAINER_METRICS_PORT": str(port),
             "AGENTAINER_STOP_GRACE_SECONDS": "1"},
        log=log, metrics_port=port)
    controller.start()
    yield controller
    controller.stop()
    print(f"controller log: {log}")
