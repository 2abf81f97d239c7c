"""Workflows per minute through the operator, against a plain script doing the same container or
pod work without it, in one run on the local cluster.

For each backend (``pods``: every agent a pod; ``docker``: a container on this machine's
engine), N single-step workflows (``echo``) are applied at once to a controller started here
(`agentainer controller`, its own Redis), and timed until all have succeeded. Printed per
backend: workflows/min; the same N agents run by a plain script (pods: create all, wait for
them on one watch, read each log, delete; Docker: create, start, wait, read the log and remove
each, 64 at a time) and the ratio of the two rates; the p50 and p99 lag from an agent's end to
the Workflow's status showing it (the end as the engine noted it, the status as a watch of the
Workflows delivered it); the API server's requests
for pods per agent (from its own ``apiserver_request_total``: pods, their logs and attach, not
the node's status updates; in brackets, the plain script's pods counted the same way, the node's
own reads of each pod included); and the controller's peak RSS and CPU seconds per workflow.

Timing is measured here and printed; nothing is asserted about it. A workflow that does not
succeed exits 1.

    make cluster && eval "$(.venv/bin/python scripts/cluster.py env)"
    .venv/bin/python benchmarks/throughput.py [--workflows N] [--backends pods,docker]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import urllib.request
from pathlib import Path
from typing import Any

import docker
import kubernetes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, start_redis  # noqa: E402

IMAGE = "agentainer/busybox:latest"
COMMAND = ["sh", "-c", "echo done"]
LIMIT_SECONDS = 600
POD_REQUESTS = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<count>\S+)$')


def fail(message: str) -> None:
    print(f"WRONG: {message}", file=sys.stderr)
    sys.exit(1)


def moment(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def pod_requests() -> float:
    """Requests the API server answered for pods, their logs and attach (not the status the
    node writes, nor bindings), summed over verbs and codes."""
    text = subprocess.run(["kubectl", "get", "--raw", "/metrics"], check=True,
                          capture_output=True, text=True).stdout
    total = 0.0
    for line in text.splitlines():
        found = POD_REQUESTS.match(line)
        if not found:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group("labels")))
        if labels.get("resource") == "pods" and labels.get("subresource", "") in (
                "", "log", "attach"):
            total += float(found.group("count"))
    return total


class Controller:
    """`agentainer controller` as a process of its own, with its peak RSS and CPU time."""

    def __init__(self, redis_url: str, backend: str, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "AGENTAINER_REDIS_URL": redis_url,
               "AGENTAINER_DEFAULT_BACKEND": backend, "AGENTAINER_METRICS_HOST": "127.0.0.1",
               "AGENTAINER_METRICS_PORT": str(self.port)}
        with log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "controller.cli",
                                             "controller"], cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    fail(f"the controller did not come up; see {log}")
                time.sleep(0.2)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def workflow(name: str, namespace: str, backend: str) -> dict[str, Any]:
    return {"apiVersion": "agentainer.dev/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"backend": backend, "cleanup": "Always",
                     "steps": [{"name": "echo", "image": IMAGE, "command": COMMAND}]}}


def through_the_operator(objects: Any, core: Any, namespace: str, backend: str,
                         count: int) -> tuple[float, list[float]]:
    """Seconds until all ``count`` workflows succeeded, and each agent's status lag."""
    names = [f"bench-{backend[:4]}-{i:04d}" for i in range(count)]
    seen: dict[str, float] = {}
    lags: list[float] = []
    done = threading.Event()

    def watch() -> None:
        stream = kubernetes.watch.Watch()
        for event in stream.stream(objects.list_namespaced_custom_object, "agentainer.dev",
                                   "v1alpha1", namespace, "workflows",
                                   timeout_seconds=LIMIT_SECONDS):
            body = event["object"]
            name = body["metadata"]["name"]
            status = body.get("status") or {}
            for step in status.get("steps", []):
                for agent in step.get("agents", []):
                    if agent.get("finishedAt") and agent["id"] + name not in seen:
                        seen[agent["id"] + name] = time.time()
                        lags.append(time.time() - moment(agent["finishedAt"]))
            if status.get("phase") in ("Failed", "Cancelled", "Stopped"):
                fail(f"{name}: {status.get('phase')}: {status.get('message')}")
            if status.get("phase") == "Succeeded":
                seen[name] = time.time()
                if sum(n in seen for n in names) == count:
                    done.set()
                    stream.stop()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.5)
    began = time.monotonic()
    for name in names:
        objects.create_namespaced_custom_object("agentainer.dev", "v1alpha1", namespace,
                                                "workflows", workflow(name, namespace,
                                                                      backend))
    if not done.wait(LIMIT_SECONDS):
        fail(f"{count - sum(n in seen for n in names)} workflows had not succeeded after "
             f"{LIMIT_SECONDS} s")
    return time.monotonic() - began, lags


def plain_pods(core: Any, namespace: str, count: int) -> float:
    """The same agents as pods, made by hand: create all, wait on one watch, read, delete."""
    label = f"plain={uuid.uuid4().hex[:8]}"
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"plain-{i:04d}", "labels": dict([label.split("=")])},
             "spec": {"restartPolicy": "Never", "containers": [{
                 "name": "agent", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                 "command": COMMAND}]}} for i in range(count)]
    began = time.monotonic()
    stream = kubernetes.watch.Watch()
    ended: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: core.create_namespaced_pod(namespace, p), pods))
        for event in stream.stream(core.list_namespaced_pod, namespace, label_selector=label,
                                   timeout_seconds=LIMIT_SECONDS):
            pod = event["object"]
            if pod.status.phase in ("Succeeded", "Failed"):
                ended.add(pod.metadata.name)
            if len(ended) == count:
                stream.stop()
        list(pool.map(lambda p: core.read_namespaced_pod_log(p["metadata"]["name"], namespace),
                      pods))
        list(pool.map(lambda p: core.delete_namespaced_pod(p["metadata"]["name"], namespace,
                                                           grace_period_seconds=0), pods))
    return time.monotonic() - began


def plain_docker(count: int) -> float:
    """The same agents as containers, made by hand, 64 at a time."""
    client = docker.from_env(max_pool_size=64)

    def one(index: int) -> None:
        container = client.containers.create(IMAGE, COMMAND, name=f"plain-{uuid.uuid4().hex}")
        container.start()
        container.wait()
        container.logs()
        container.remove(force=True)

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(count)))
    client.close()
    return time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=100)
    parser.add_argument("--backends", default="pods,docker")
    args = parser.parse_args()
    kubernetes.config.load_kube_config()
    core = kubernetes.client.CoreV1Api()
    objects = kubernetes.client.CustomObjectsApi()
    subprocess.run(["kubectl", "apply", "-f", str(ROOT / "crds")], check=True,
                   capture_output=True)
    folder = Path(tempfile.mkdtemp(prefix="agentainer-throughput-"))
    (folder / "redis").mkdir()
    redis, port = start_redis(folder / "redis")
    print(f"machine: {os.cpu_count()} CPUs; {args.workflows} single-step workflows at once; "
          f"controller log in {folder}")
    print(f"{'backend':<8} {'wf/min':>8} {'plain/min':>10} {'ratio':>6} {'lag p50':>8} "
          f"{'lag p99':>8} {'req/agent':>11} {'RSS MiB':>8} {'CPU s/wf':>9}")
    try:
        for backend in args.backends.split(","):
            kind = "kubernetes" if backend == "pods" else "docker"
            namespace = f"bench-{uuid.uuid4().hex[:6]}"
            core.create_namespace({"metadata": {"name": namespace}})
            controller = Controller(f"redis://127.0.0.1:{port}/0", kind,
                                    folder / f"controller-{backend}.log")
            try:
                cpu, requests = controller.cpu_seconds(), pod_requests()
                took, lags = through_the_operator(objects, core, namespace, kind,
                                                  args.workflows)
                requests = pod_requests() - requests
                cpu = controller.cpu_seconds() - cpu
                rss = controller.peak_rss_mib()
                objects.delete_collection_namespaced_custom_object(
                    "agentainer.dev", "v1alpha1", namespace, "workflows")
            finally:
                controller.stop()
            baseline = pod_requests()
            plain = plain_pods(core, namespace, args.workflows) if backend == "pods" \
                else plain_docker(args.workflows)
            baseline = pod_requests() - baseline
            core.delete_namespace(namespace)
            rate, plain_rate = args.workflows / took * 60, args.workflows / plain * 60
            print(f"{backend:<8} {rate:8.0f} {plain_rate:10.0f} {rate / plain_rate:6.2f} "
                  f"{statistics.median(lags):8.2f} {percentile(lags, 0.99):8.2f} "
                  + (f"{requests / args.workflows:5.1f} ({baseline / args.workflows:.1f})"
                     if backend == "pods" else f"{'-':>11}")
                  + f" {rss:8.0f} {cpu / args.workflows:9.3f}", flush=True)
    finally:
        redis.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
