"""Faults at random moments, through the operator: workflows of fan-outs (Docker agents and
pods) and pooled steps run while the controller is SIGKILLed, Redis is SIGKILLed and
restarted, the Docker engine is restarted (live-restore) and the API server is restarted,
each several times.

Prints a table: workflows succeeded, agents started more than once, containers and pods left,
outputs lost. All but the first must be 0, and every workflow must succeed with no retries
at all: no fault here is the agents' own, so none may fail an agent, let alone a workflow. The
seed of the faults' order and timing is printed; AGENTAINER_FAULT_SEED replays one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.conftest import free_port, restart_dockerd, sh, workflow_doc
from tests.e2e.conftest import Controller, Kubectl

pytestmark = pytest.mark.e2e

FANOUTS, POOLED, ON_PODS = 3, 3, 2
WIDTH = 5
POOL = "fault-pool"


@dataclass
class Redis:
    """A Redis of the test's own, keeping an append-only file, that faults may kill."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "redis-server did not come back"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def faulty_controller(controller: Controller, kubectl: Kubectl, controller_kubeconfig: str,
                      tmp_path: Path) -> Iterator[tuple[Controller, Redis]]:
    """The operator on a Redis of its own that faults may kill: the session's controller
    steps aside meanwhile, as a cluster runs one operator."""
    redis = Redis(tmp_path / "redis")
    redis.directory.mkdir()
    redis.start()
    controller.stop()
    port = free_port()
    faulty = Controller(env={**controller.env, "AGENTAINER_REDIS_URL": redis.url,
                             "AGENTAINER_METRICS_PORT": str(port),
                             "AGENTAINER_BACKEND_RETRY_SECONDS": "60"},
                        log=tmp_path / "controller.log", metrics_port=port)
    faulty.start()
    try:
        yield faulty, redis
    finally:
        faulty.stop()
        redis.kill()
        controller.start()
        print(f"faulty controller log: {faulty.log}")


def documents(run: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [{
        "apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": POOL},
        "spec": {"image": "agentainer/busybox:latest", "minSize": 2, "maxSize": 3}}]
    fan = {"name": "fan", "parallel": {"replicas": WIDTH, "maxWorkers": 3},
           "command": sh('sleep $((AGENTAINER_ITEM_INDEX % 3 + 1)); '
                         'echo "$AGENTAINER_WORKFLOW $AGENTAINER_ITEM_INDEX"')}
    count = {"name": "count", "env": [{"name": "ALL", "value": "{{ steps.fan.outputs }}"}],
             "command": sh('echo "$ALL" | tr -cd , | wc -c')}
    for i in range(FANOUTS):
        docs.append(workflow_doc(fan, count, name=f"{run}-fan-{i}", cleanup="Never",
                                 backend="docker"))
    for i in range(ON_PODS):
        docs.append(workflow_doc(fan, count, name=f"{run}-pods-{i}", cleanup="Never",
                                 backend="kubernetes"))
    for i in range(POOLED):
        pooled = {**fan, "pool": POOL}
        pooled_count = {**count, "pool": POOL}
        docs.append(workflow_doc(pooled, pooled_count, name=f"{run}-pooled-{i}",
                                 backend="docker"))
    return docs


def expected_outputs(name: str) -> list[str]:
    return [f"{name} {index}" for index in range(WIDTH)]


@pytest.mark.timeout(900)
def test_workflows_live_through_faults_at_random_moments(
        kubectl: Kubectl, faulty_controller: tuple[Controller, Redis], live_restore: None,
        cluster: Any, cluster_plane: Any) -> None:
    controller, redis = faulty_controller
    seed = int(os.environ.get("AGENTAINER_FAULT_SEED") or random.randrange(10**6))
    rng = random.Random(seed)
    run = f"fault{seed % 1000:03d}"
    faults: dict[str, Callable[[], None]] = {
        "controller SIGKILL": lambda: (controller.kill(), time.sleep(rng.uniform(0.5, 2)),
                                       controller.start()),
        "Redis SIGKILL": lambda: (redis.kill(), time.sleep(rng.uniform(0.5, 2)),
                                  redis.start()),
        "dockerd restart": lambda: restart_dockerd(rng.uniform(0, 2)),
        "API server restart": lambda: cluster.restart_apiserver(cluster_plane,
                                                                rng.uniform(0.5, 2)),
    }
    plan = [name for name in faults for _ in range(2)]
    rng.shuffle(plan)
    print(f"\nfault seed {seed}: {', '.join(plan)}")

    began = time.time()
    docs = documents(run)
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "Workflow"]
    for fault in plan:
        time.sleep(rng.uniform(1, 4))
        started = time.monotonic()
        faults[fault]()
        print(f"  {time.time() - began:6.1f}s  {fault} ({time.monotonic() - started:.1f}s)")

    bodies = {name: kubectl.wait_for("workflow", name, _finished, timeout=300)
              for name in names}
    elapsed = time.time() - began
    uids = {name: body["metadata"]["uid"] for name, body in bodies.items()}

    succeeded = sum(b["status"]["phase"] == "Succeeded" for b in bodies.values())
    docker_client = docker.from_env()  # connected after the engine's last restart
    twice, stopped = _started_twice(docker_client, kubectl, bodies)
    lost = sum(_outputs_lost(name, body) for name, body in bodies.items())
    pool_uid = kubectl.get("agentpool", POOL)["metadata"]["uid"]
    kubectl("delete", "workflow", *names, "--timeout=120s")
    kubectl("delete", "agentpool", POOL, "--timeout=120s")
    left = _left(docker_client, kubectl, uids, pool_uid)

    table = [("workflows succeeded", f"{succeeded}/{len(names)}"),
             ("agents started more than once", str(twice)),
             ("run again, stopped by the engine", str(stopped)),
             ("containers and pods left", str(left)), ("outputs lost", str(lost))]
    print(f"faults survived in {elapsed:.0f}s (seed {seed}):")
    for what, value in table:
        print(f"  {what:32s} {value}")
    for name, body in bodies.items():  # why any agent was started again
        for step in body["status"].get("steps", []):
            for agent in step.get("agents", []):
                if agent.get("phase") == "Failed":
                    print(f"  {name}: agent {agent['name']} failed: {agent.get('reason')} "
                          f"(exit {agent.get('exitCode')}); step says {step.get('message')}")
    failed = {n: b["status"].get("message") for n, b in bodies.items()
              if b["status"]["phase"] != "Succeeded"}
    assert succeeded == len(names), f"failed: {failed}; log {controller.log}"
    assert (twice, left, lost) == (0, 0, 0), table


def _finished(body: dict[str, Any]) -> bool:
    return (body.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled")


def _outputs_lost(name: str, body: dict[str, Any]) -> int:
    steps = {step["name"]: step for step in body["status"].get("steps", [])}
    if body["status"]["phase"] != "Succeeded":
        return 0  # counted as not succeeded
    got = (json.loads(steps["fan"]["output"]), steps["count"]["output"])
    expected = (expected_outputs(name), str(WIDTH - 1))
    if got != expected:
        print(f"  {name}: outputs {got}, expected {expected}")
    return sum(g != e for g, e in zip(got, expected, strict=True))


def _started_twice(client: docker.DockerClient, kubectl: Kubectl,
                   bodies: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """Items of a step that got more than one agent (containers and pods are all kept:
    cleanup Never), and of those the ones whose earlier agents the container engine stopped
    as it shut down (each recorded so, with reason Interrupted: run again by design, as is a
    pooled task after a lost lease, which is not counted). No agent here fails by itself, so
    any other second agent is a duplicate start."""
    wanted = {body["metadata"]["uid"] for body in bodies.values()}
    interrupted = {agent["name"] for body in bodies.values()
                   for step in body["status"].get("steps", []) for agent in step.get("agents", [])
                   if agent.get("reason") == "Interrupted"}
    units: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    labelled = [(c.labels, c.name, f"{c.status} exit {c.attrs['State']['ExitCode']} "
                 f"created {c.attrs['Created']}")
                for uid in wanted for c in client.containers.list(
                    all=True, filters={"label": f"agentainer.dev/workflow-uid={uid}"},
                    ignore_removed=True)]
    labelled += [(p["metadata"]["labels"], p["metadata"]["name"],
                  f"{p['status'].get('phase')} created {p['metadata']['creationTimestamp']}")
                 for p in json.loads(kubectl(
                     "get", "pods", "-A", "-l", "app.kubernetes.io/managed-by=agentainer",
                     "-o", "json").stdout)["items"]]
    for labels, name, what in labelled:
        if labels.get("agentainer.dev/workflow-uid") in wanted:
            unit = (labels["agentainer.dev/workflow-uid"], labels["agentainer.dev/step"],
                    labels["agentainer.dev/index"])
            units.setdefault(unit, []).append((labels["agentainer.dev/attempt"], name, what))
    twice = stopped = 0
    for unit, agents in units.items():
        if len(agents) == 1:
            continue
        earlier = [name for _, name, _ in sorted(agents, key=lambda a: int(a[0]))[:-1]]
        by_engine = all(name in interrupted for name in earlier)
        stopped += by_engine
        twice += not by_engine
        kind = "run again after the engine stopped it" if by_engine else "started"
        print(f"  {kind} ({len(agents)} agents): {unit}: " +
              "; ".join(f"{name} {what}" for _, name, what in sorted(agents)))
    return twice, stopped


def _left(client: docker.DockerClient, kubectl: Kubectl, uids: dict[str, str],
          pool_uid: str) -> int:
    deadline = time.monotonic() + 60
    while True:
        containers = [c for uid in uids.values() for c in client.containers.list(
            all=True, filters={"label": f"agentainer.dev/workflow-uid={uid}"},
            ignore_removed=True)]
        containers += client.containers.list(
            all=True, filters={"label": f"agentainer.dev/pool-uid={pool_uid}"},
            ignore_removed=True)
        pods = [p for p in json.loads(kubectl("get", "pods", "-A", "-l",
                                              "app.kubernetes.io/managed-by=agentainer",
                                              "-o", "json").stdout)["items"]
                if p["metadata"]["labels"].get("agentainer.dev/workflow-uid") in uids.values()]
        if not containers and not pods or time.monotonic() > deadline:
            return len(containers) + len(pods)
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
