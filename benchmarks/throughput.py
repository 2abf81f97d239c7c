"""Workflows per minute through the operator, against a plain script doing the same container or
pod work without it, in one run on the local cluster.

For each backend (``pods``: every agent a pod; ``docker``: a container on this machine's
engine; ``pooled-docker`` and ``pooled-pods``: every step a task on a warm agent of an AgentPool
of POOL_SIZE, leased, run and returned), N single-step workflows (``echo``) are applied at once
to a controller started here (`agentainer controller`, its own Redis) by SUBMITTERS clients at
once, and timed from the first submission until all have succeeded. Printed per backend:
workflows/min; the rate of the same N agents run by a plain script before the operator's run
and again after it (both runs together: the machine's speed drifts; pods:
create all, wait for them on one watch, read each log, delete; Docker: create, start, wait, read
the log and remove each, 64 at a time; pooled: the same command run by ``docker exec`` or a pod
exec in POOL_SIZE warm containers or pods, one at a time in each), and the ratio of the two
rates; the p50 and p99 lag from an agent's end to
the Workflow's status showing it (the end as the engine noted it, the status as a watch of the
Workflows delivered it); the API server's requests
for pods per agent (from its own ``apiserver_request_total``: pods, their logs and attach, not
the node's status updates; in brackets, the plain script's pods counted the same way, the node's
own reads of each pod included); the controller's peak RSS and CPU seconds per workflow; and
the whole machine's CPU per workflow in the plain script's first run and in the operator's run,
with the processes that took most of it (where the operator's cost goes: its own process, the
API server, etcd, or the container engine).

Timing is measured here and printed; nothing is asserted about it. A workflow that does not
succeed exits 1.

    make cluster && eval "$(.venv/bin/python scripts/cluster.py env)"
    .venv/bin/python benchmarks/throughput.py [--workflows N]
        [--backends pods,docker,pooled-docker,pooled-pods]
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
from collections.abc import Callable
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
POOL = "bench-pool"
POOL_SIZE = 16
SUBMITTERS = 8
"""Clients creating the Workflows at once."""
BACKSTOP_SECONDS = 30
"""How often the Workflows are listed besides being watched."""
BACKENDS = ("pods", "docker", "pooled-docker", "pooled-pods")
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


class MachineCPU:
    """The machine's CPU time over a stretch, in all and by process (named by its program, the
    controller and this benchmark by role): where a workflow's cost goes, the operator's and
    the Docker engine's and the API server's alike. Processes that ended within it (runc,
    short-lived shims) count in the total alone."""

    def __init__(self, roles: dict[int, str]) -> None:
        self.roles = roles
        self.busy, self.processes = self._read()

    def _read(self) -> tuple[int, dict[int, tuple[str, int]]]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        busy = sum(int(f) for f in fields) - int(fields[3]) - int(fields[4])  # idle, iowait
        processes = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                program = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue  # ended meanwhile
            name = self.roles.get(int(entry.name)) or \
                os.path.basename(program.decode().split(" ")[0]) or "kernel"  # no program
            processes[int(entry.name)] = (name, int(stat[11]) + int(stat[12]))
        return busy, processes

    def since(self, count: int) -> str:
        """Milliseconds of CPU per workflow since this was made: the machine's, and the
        processes' that took most."""
        busy, processes = self._read()
        tick = os.sysconf("SC_CLK_TCK")
        spent: dict[str, int] = {}
        for pid, (name, ticks) in processes.items():
            before = self.processes.get(pid)
            spent[name] = spent.get(name, 0) + ticks - (
                before[1] if before is not None and before[0] == name else 0)
        top = sorted(spent.items(), key=lambda item: -item[1])[:6]
        return (f"{(busy - self.busy) / tick / count * 1000:.0f} ms, of which " + ", ".join(
            f"{name} {ticks / tick / count * 1000:.1f}" for name, ticks in top if ticks))


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


def workflow(name: str, namespace: str, backend: str, pooled: bool,
             **step: Any) -> dict[str, Any]:
    step = {"name": "echo", "command": COMMAND, **({"pool": POOL} if pooled else {"image": IMAGE}),
            **step}
    return {"apiVersion": "agentainer.dev/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"backend": backend, "cleanup": "Always", "steps": [step]}}


PROBE = "bench-timeout"
PROBE_TIMEOUT_SECONDS = 3
"""A workflow submitted just before the burst, whose agent sleeps past this timeout while the
burst is under way: how late its agent is stopped says whether timeouts act at once under
load."""


def probe(namespace: str, backend: str, pooled: bool) -> dict[str, Any]:
    return workflow(PROBE, namespace, backend, pooled, command=["sleep", "300"],
                    timeoutSeconds=PROBE_TIMEOUT_SECONDS)


def overrun(body: dict[str, Any]) -> float | None:
    """Seconds the probe's agent ran past its timeout, as its status says (None: it did not
    end by its timeout)."""
    for step in (body.get("status") or {}).get("steps", []):
        for agent in step.get("agents", []):
            if agent.get("reason") == "DeadlineExceeded" and agent.get("finishedAt"):
                return moment(agent["finishedAt"]) - moment(agent["startedAt"]) \
                    - PROBE_TIMEOUT_SECONDS
    return None


def warm_pool(objects: Any, namespace: str, backend: str) -> None:
    """An AgentPool of POOL_SIZE warm agents, once they are all ready."""
    objects.create_namespaced_custom_object("agentainer.dev", "v1alpha1", namespace,
                                            "agentpools", {
        "apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": POOL, "namespace": namespace},
        "spec": {"backend": backend, "image": IMAGE, "minSize": POOL_SIZE,
                 "maxSize": POOL_SIZE, "warmUp": True, "maxUses": 1000000}})
    status: dict[str, Any] = {}

    def ready() -> bool:
        nonlocal status
        status = objects.get_namespaced_custom_object(
            "agentainer.dev", "v1alpha1", namespace, "agentpools", POOL).get("status") or {}
        return bool(status.get("ready", 0) >= POOL_SIZE)

    wait_until(ready, lambda: f"the pool had not {POOL_SIZE} ready agents ({status})")


def through_the_operator(objects: Any, core: Any, namespace: str, backend: str,
                         pooled: bool, count: int) -> tuple[float, list[float], float]:
    """Seconds until all ``count`` workflows succeeded, each agent's status lag, and how late
    the probe's agent was stopped past its timeout."""
    names = [f"bench-{backend[:4]}-{i:04d}" for i in range(count)]
    seen: dict[str, float] = {}
    lags: list[float] = []
    done = threading.Event()

    failed: list[str] = []
    late: list[float] = []

    def note_probe(body: dict[str, Any]) -> bool:
        """Whether the probe's agent has ended past its timeout (noted once)."""
        if not late and (past := overrun(body)) is not None:
            late.append(past)
        return bool(late)

    def note(body: dict[str, Any], watched: bool = True) -> None:
        """What a Workflow's status says; the lags only from the watch, as they happen."""
        name = body["metadata"]["name"]
        status = body.get("status") or {}
        if name == PROBE:
            note_probe(body)
            return
        for step in status.get("steps", []) if watched else []:
            for agent in step.get("agents", []):
                if agent.get("finishedAt") and agent["id"] + name not in seen:
                    seen[agent["id"] + name] = time.time()
                    lags.append(time.time() - moment(agent["finishedAt"]))
        if status.get("phase") in ("Failed", "Cancelled", "Stopped"):
            failed.append(f"{name}: {status.get('phase')}: {status.get('message')}")
        if status.get("phase") == "Succeeded":
            seen[name] = time.time()

    def watch() -> None:  # watched again should it break (the list below is the backstop)
        while not done.is_set():
            stream = kubernetes.watch.Watch()
            try:
                for event in stream.stream(objects.list_namespaced_custom_object,
                                           "agentainer.dev", "v1alpha1", namespace,
                                           "workflows", timeout_seconds=LIMIT_SECONDS):
                    note(event["object"])
                    if failed or sum(n in seen for n in names) == count:
                        done.set()
                        stream.stop()
            except Exception as error:  # noqa: BLE001 - a broken watch is watched again
                print(f"  (the watch of the Workflows broke, watching again: {error})",
                      file=sys.stderr)
                time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.5)
    objects.create_namespaced_custom_object("agentainer.dev", "v1alpha1", namespace, "workflows",
                                            probe(namespace, backend, pooled))
    began_wall = time.time()
    with concurrent.futures.ThreadPoolExecutor(SUBMITTERS) as submit:  # as many clients would
        list(submit.map(lambda name: objects.create_namespaced_custom_object(
            "agentainer.dev", "v1alpha1", namespace, "workflows",
            workflow(name, namespace, backend, pooled)), names))
    print(f"  ({backend}: {count} workflows submitted in {time.time() - began_wall:.1f} s)",
          file=sys.stderr)
    deadline = time.monotonic() + LIMIT_SECONDS
    # And a list now and then, should the watch have broken: seldom, and from the API server's
    # cache, as listing every Workflow costs the machine being measured (every 5 s from etcd,
    # it was a tenth of the API server's work).
    while not done.wait(BACKSTOP_SECONDS):
        listed = objects.list_namespaced_custom_object("agentainer.dev", "v1alpha1", namespace,
                                                       "workflows", resource_version="0")["items"]
        for body in listed:
            if body["metadata"]["name"] not in seen:
                note(body, watched=False)
        if failed or sum(n in seen for n in names) == count:
            done.set()
        elif time.monotonic() > deadline:
            fail(f"{count - sum(n in seen for n in names)} workflows had not succeeded after "
                 f"{LIMIT_SECONDS} s")
    if failed:
        fail(f"{len(failed)} workflows did not succeed; the first: {failed[0]}")
    took = max(seen.get(name, time.time()) for name in names) - began_wall

    # The watch has stopped: the probe is read, should it not have ended by now.
    wait_until(lambda: bool(late) or note_probe(objects.get_namespaced_custom_object(
        "agentainer.dev", "v1alpha1", namespace, "workflows", PROBE)),
        f"the probe's agent had not ended by its timeout ({PROBE_TIMEOUT_SECONDS} s)")
    return took, lags, late[0]


def deleted(objects: Any, namespace: str) -> None:
    """Delete the Workflows and AgentPools and wait until they are gone: the controller, which
    removes their finalizers, must not be stopped before (their namespace would never go)."""
    for plural in ("workflows", "agentpools"):
        objects.delete_collection_namespaced_custom_object(
            "agentainer.dev", "v1alpha1", namespace, plural)

        def none_left(kind: str = plural) -> bool:
            return not objects.list_namespaced_custom_object(
                "agentainer.dev", "v1alpha1", namespace, kind, limit=1)["items"]

        wait_until(none_left, f"the {plural} of {namespace} were not gone")


def gone(core: Any, namespace: str) -> None:
    """Delete the namespace and wait until it is gone (its pods and agents with it), so that
    the next backend's run does not share the machine with the deletion."""
    core.delete_namespace(namespace)

    def absent() -> bool:
        try:
            core.read_namespace(namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return True
            raise
        return False

    wait_until(absent, f"namespace {namespace} was not gone")


def plain_pods(core: Any, namespace: str, count: int) -> float:
    """The same agents as pods, made by hand: create all, wait on one watch, read, delete."""
    run = uuid.uuid4().hex[:8]
    label = f"plain={run}"
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"plain-{run}-{i:04d}", "labels": {"plain": run}},
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
    took = time.monotonic() - began
    pods_gone(core, namespace, label)
    return took


def pods_gone(core: Any, namespace: str, label: str) -> None:
    """Wait until the plain script's pods are gone: what runs next must not share the machine
    with their deletion."""
    wait_until(lambda: not core.list_namespaced_pod(namespace, label_selector=label,
                                                    limit=1).items,
               f"the plain script's pods ({label}) were not gone")


def wait_until(condition: Callable[[], bool], what: str | Callable[[], str],
               seconds: float = 300) -> None:
    """Ask ``condition`` every half second until it holds; after ``seconds``, fail saying
    what did not happen (``what``, or what it says then)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            fail(f"{what if isinstance(what, str) else what()} after {seconds:.0f} s")
        time.sleep(0.5)


def docker_client(connections: int) -> docker.DockerClient:
    """docker-py, its connections kept as the backend keeps them: the plain scripts then pay
    for the containers' work, not for a connection per call."""
    from controller.backends.docker import OneSocketAdapter

    client = docker.from_env(max_pool_size=connections)
    OneSocketAdapter.install(client)
    return client


def plain_docker(count: int) -> float:
    """The same agents as containers, made by hand, 64 at a time."""
    client = docker_client(64)

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


def backend_alone(count: int) -> float:
    """The same agents through the Docker backend alone (its hardening, task runner and exact
    output included), 64 at a time: what the operator adds is the rest."""
    import asyncio

    from controller.backends.base import AgentSpec
    from controller.backends.docker import DockerBackend
    from controller.config import Settings

    async def run() -> float:
        backend = await DockerBackend.connect(Settings())
        turns = asyncio.Semaphore(64)

        async def one() -> None:
            async with turns:
                agent = await backend.start(AgentSpec(
                    name=f"alone-{uuid.uuid4().hex[:12]}", image=IMAGE, command=COMMAND,
                    args=None, env={}, labels={"agentainer.dev/benchmark": "alone"}))
                result = await backend.wait(agent)
                await backend.remove(agent)
                if result.exit_code != 0:
                    fail(f"an agent of the backend alone exited {result.exit_code}")

        began = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        took = time.monotonic() - began
        await backend.close()
        return took

    return asyncio.run(run())


def plain_pooled_docker(count: int) -> float:
    """The same command by ``docker exec`` in POOL_SIZE warm containers, one at a time each."""
    client = docker_client(POOL_SIZE)
    warm = [client.containers.run(IMAGE, ["sleep", "3600"], detach=True, remove=True)
            for _ in range(POOL_SIZE)]
    tasks = iter(range(count))
    lock = threading.Lock()

    def serve(container: Any) -> None:
        while True:
            with lock:
                if next(tasks, None) is None:
                    return
            container.exec_run(COMMAND)

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(POOL_SIZE) as pool:
        list(pool.map(serve, warm))
    took = time.monotonic() - began
    for container in warm:
        container.remove(force=True)
    client.close()
    return took


def plain_pooled_pods(core: Any, namespace: str, count: int) -> float:
    """The same command by a pod exec in POOL_SIZE warm pods, one at a time each."""
    from kubernetes.stream import stream

    run = uuid.uuid4().hex[:8]
    label = f"plain={run}"
    names = [f"warm-{run}-{i:02d}" for i in range(POOL_SIZE)]
    for name in names:
        core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"plain": run}},
            "spec": {"containers": [{"name": "agent", "image": IMAGE,
                                     "imagePullPolicy": "IfNotPresent",
                                     "command": ["sleep", "3600"]}]}})
    wait_until(lambda: all(core.read_namespaced_pod(n, namespace).status.phase == "Running"
                           for n in names),
               "the plain script's warm pods were not running")
    tasks = iter(range(count))
    lock = threading.Lock()

    def serve(name: str) -> None:
        with kubernetes.client.ApiClient() as api:  # exec swaps its client's transport
            own = kubernetes.client.CoreV1Api(api)
            while True:
                with lock:
                    if next(tasks, None) is None:
                        return
                stream(own.connect_get_namespaced_pod_exec, name, namespace, command=COMMAND,
                       stderr=True, stdin=False, stdout=True, tty=False)

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(POOL_SIZE) as pool:
        list(pool.map(serve, names))
    took = time.monotonic() - began
    for name in names:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    pods_gone(core, namespace, label)
    return took


def plain(backend: str, core: Any, namespace: str, count: int) -> float:
    """Seconds the plain script took for ``count`` agents."""
    return {"pods": lambda: plain_pods(core, namespace, count),
            "docker": lambda: plain_docker(count),
            "pooled-docker": lambda: plain_pooled_docker(count),
            "pooled-pods": lambda: plain_pooled_pods(core, namespace, count)}[backend]()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=100)
    parser.add_argument("--backends", default=",".join(BACKENDS))
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
    print(f"{'backend':<13} {'wf/min':>8} {'plain/min':>10} {'ratio':>6} {'lag p50':>8} "
          f"{'lag p99':>8} {'req/agent':>11} {'RSS MiB':>8} {'CPU s/wf':>9}")
    try:
        for backend in args.backends.split(","):
            if backend not in BACKENDS:
                fail(f"--backends: {backend!r} is not one of {', '.join(BACKENDS)}")
            kind = "kubernetes" if backend.endswith("pods") else "docker"
            pooled = backend.startswith("pooled")
            namespace = f"bench-{uuid.uuid4().hex[:6]}"
            core.create_namespace({"metadata": {"name": namespace}})
            # The plain script runs before the operator and after it, and its rate is that of
            # the two together: the machine's own speed drifts within minutes (other tenants),
            # and the operator's run is compared with the machine as it was around it.
            roles = {os.getpid(): "benchmark"}
            machine = MachineCPU(roles)
            plain_before = plain(backend, core, namespace, args.workflows)
            plain_cpu = machine.since(args.workflows)
            controller = Controller(f"redis://127.0.0.1:{port}/0", kind,
                                    folder / f"controller-{backend}.log")
            try:
                if pooled:
                    warm_pool(objects, namespace, kind)
                cpu, requests = controller.cpu_seconds(), pod_requests()
                roles[controller.process.pid] = "controller"
                machine = MachineCPU(roles)
                took, lags, late = through_the_operator(objects, core, namespace, kind, pooled,
                                                        args.workflows)
                operator_cpu = machine.since(args.workflows)
                requests = pod_requests() - requests
                cpu = controller.cpu_seconds() - cpu
                rss = controller.peak_rss_mib()
                deleted(objects, namespace)
            finally:
                controller.stop()
            baseline = pod_requests()
            plain_took = plain(backend, core, namespace, args.workflows)
            baseline = pod_requests() - baseline
            gone(core, namespace)
            rate = args.workflows / took * 60
            plain_rate = 2 * args.workflows / (plain_before + plain_took) * 60
            print(f"{backend:<13} {rate:8.0f} {plain_rate:10.0f} {rate / plain_rate:6.2f} "
                  + (f"{statistics.median(lags):8.2f} {percentile(lags, 0.99):8.2f} "
                     if lags else f"{'-':>8} {'-':>8} ")
                  + (f"{requests / args.workflows:5.1f} ({baseline / args.workflows:.1f})"
                     if kind == "kubernetes" else f"{'-':>11}")
                  + f" {rss:8.0f} {cpu / args.workflows:9.3f}", flush=True)
            print(f"  (a {PROBE_TIMEOUT_SECONDS} s timeout under that load: its agent ended "
                  f"{late:.2f} s past it)", flush=True)
            print(f"  (the machine's CPU per workflow: the plain script's first run {plain_cpu}; "
                  f"the operator's run {operator_cpu})", flush=True)
            if backend == "docker":
                alone = args.workflows / backend_alone(args.workflows) * 60
                print(f"{'  backend alone':<13} {alone:8.0f} {plain_rate:10.0f} "
                      f"{alone / plain_rate:6.2f}", flush=True)
    finally:
        redis.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
