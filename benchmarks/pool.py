"""Pooled agents vs cold agents, on the real Docker engine, in one run.

Two figures:

1. **Per task.** The same image and command (``sh -c 'echo $X'``), many times:
   (a) *cold*: a new agent per task, as a workflow step without a pool makes it (create, start,
   wait, read stdout and stderr, inspect, remove: ``DockerBackend.start/wait/remove``);
   (b) *pooled*: lease + run + return on a warm AgentPool (``PoolManager.lease/run``), state
   in the store, with the agent's task runner isolating every task (the task user, its own
   session and env, every process it left killed and every file it left removed).
   Prints p50 and p95 of both, the ratio of the p50s (target: at least 50x), and where a pooled
   task's time goes: lease, the task itself and the clean-up (as the runner measured them),
   the channel (framing and the engine's socket), and the return.
2. **Per workflow.** A fan-out of 50 short tasks (``maxWorkers`` 10) run by the engine, once on
   cold agents and once on a pool of 10 warm agents; prints both wall times and their ratio.

Timing is measured here and printed; nothing is asserted about it. A wrong output exits 1.

    .venv/bin/python benchmarks/pool.py [--cold N] [--pooled N] [--store redis|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.backends.base import AgentHandle, AgentSpec, TaskResult  # noqa: E402
from controller.backends.docker import DockerBackend  # noqa: E402
from controller.config import Settings  # noqa: E402
from controller.engine import Engine  # noqa: E402
from controller.models import WorkflowPhase, parse_agent_pool, parse_workflow  # noqa: E402
from controller.pools import PoolManager  # noqa: E402
from controller.store import open_store  # noqa: E402

IMAGE = "agentainer/busybox:latest"
COMMAND = ["sh", "-c", "echo $X"]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def fail(message: str) -> None:
    print(f"WRONG: {message}", file=sys.stderr)
    sys.exit(1)


def pool_document(name: str, size: int) -> dict[str, Any]:
    return {"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
            "metadata": {"name": name},
            "spec": {"image": IMAGE, "minSize": size, "maxSize": size, "maxUses": 100000,
                     "idleTimeoutSeconds": 3600}}


class TimedDockerBackend(DockerBackend):
    """Remembers how long the last task took on the engine's side of the channel."""

    last_task_seconds = 0.0

    async def run_task(self, agent: AgentHandle, argv: list[str], env: dict[str, str],
                       timeout: float | None) -> TaskResult:
        began = time.perf_counter()
        try:
            return await super().run_task(agent, argv, env, timeout)
        finally:
            self.last_task_seconds = time.perf_counter() - began


async def per_task(backend: TimedDockerBackend, pools: PoolManager, cold_n: int,
                   pooled_n: int) -> tuple[list[float], list[float], dict[str, list[float]]]:
    cold: list[float] = []
    for i in range(cold_n):
        spec = AgentSpec(name=f"bench-cold-{uuid.uuid4().hex[:8]}", image=IMAGE,
                         command=COMMAND, args=None, env={"X": str(i)},
                         labels={"agentainer.dev/benchmark": "pool"})
        began = time.perf_counter()
        agent = await backend.start(spec)
        result = await backend.wait(agent)
        await backend.remove(agent)
        cold.append(time.perf_counter() - began)
        if result.stdout.strip() != str(i):
            fail(f"cold task {i} printed {result.stdout!r}")

    state = pools.register(parse_agent_pool(pool_document("bench-pool", 1)),
                           str(uuid.uuid4()), backend)
    await pools.reconcile(state)  # warm: the pool exists before the tasks, as in production
    pooled: list[float] = []
    parts: dict[str, list[float]] = {part: [] for part in PARTS}
    try:
        for i in range(pooled_n):
            began = time.perf_counter()
            lease = await pools.lease(state)
            leased = time.perf_counter()
            result = await pools.run(lease, COMMAND, {"X": str(i)}, 30)
            done = time.perf_counter()
            pooled.append(done - began)
            if result.stdout.strip() != str(i) or not result.clean:
                fail(f"pooled task {i} printed {result.stdout!r} (clean: {result.clean})")
            on_engine = backend.last_task_seconds
            parts["lease"].append(leased - began)
            parts["task"].append(result.run_seconds)
            parts["clean-up"].append(result.cleanup_seconds)
            parts["channel"].append(on_engine - result.run_seconds - result.cleanup_seconds)
            parts["return"].append(done - leased - on_engine)
    finally:
        await pools.drain(state)
    return cold, pooled, parts


PARTS = ("lease", "task", "clean-up", "channel", "return")


def fan_out(name: str, pooled: bool, width: int, workers: int) -> dict[str, Any]:
    step: dict[str, Any] = {"name": "fan", "parallel": {"replicas": width, "maxWorkers": workers},
                            "command": ["sh", "-c", "echo $((AGENTAINER_ITEM_INDEX * 2))"]}
    step |= {"pool": "bench-fan"} if pooled else {"image": IMAGE}
    return {"apiVersion": "agentainer.dev/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name}, "spec": {"cleanup": "Always", "steps": [step]}}


async def per_workflow(backend: DockerBackend, pools: PoolManager, store: Any,
                       settings: Settings, width: int, workers: int) -> tuple[float, float]:
    engine = Engine(backend, store, settings, pools)
    expected = [str(i * 2) for i in range(width)]
    walls = []
    state = pools.register(parse_agent_pool(pool_document("bench-fan", workers)),
                           str(uuid.uuid4()), backend)
    await pools.reconcile(state)
    try:
        for pooled in (False, True):
            workflow = parse_workflow(fan_out(f"bench-{'pooled' if pooled else 'cold'}",
                                              pooled, width, workers))
            began = time.perf_counter()
            status = await engine.run(workflow)
            walls.append(time.perf_counter() - began)
            if status.phase is not WorkflowPhase.SUCCEEDED or status.step("fan").outputs != expected:
                fail(f"{'pooled' if pooled else 'cold'} fan-out: {status.phase} {status.message}")
    finally:
        await pools.drain(state)
    return walls[0], walls[1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=40, help="cold tasks (default 40)")
    parser.add_argument("--pooled", type=int, default=1000, help="pooled tasks (default 1000)")
    parser.add_argument("--width", type=int, default=50, help="fan-out width (default 50)")
    parser.add_argument("--workers", type=int, default=10, help="maxWorkers (default 10)")
    parser.add_argument("--store", choices=["redis", "memory"], default=None)
    args = parser.parse_args()
    settings = Settings.from_env(store=args.store, pool_wait_seconds=0)
    store = await open_store(settings)
    backend = await TimedDockerBackend.connect(settings)
    pools = PoolManager(store, settings)
    try:
        print(f"pool benchmark: image {IMAGE}, store {settings.store}")
        cold, pooled, parts = await per_task(backend, pools, args.cold, args.pooled)
        cold_wall, pooled_wall = await per_workflow(backend, pools, store, settings,
                                                    args.width, args.workers)
    finally:
        await backend.close()
        await store.close()
    ms = 1000
    print(f"per task   cold   n={len(cold):5d}  p50 {statistics.median(cold) * ms:8.2f} ms  "
          f"p95 {percentile(cold, 0.95) * ms:8.2f} ms")
    print(f"per task   pooled n={len(pooled):5d}  p50 {statistics.median(pooled) * ms:8.2f} ms  "
          f"p95 {percentile(pooled, 0.95) * ms:8.2f} ms  (lease + run + return, isolated)")
    print("per task   pooled p50 by part: " + ", ".join(
        f"{part} {statistics.median(values) * ms:.2f} ms" for part, values in parts.items()))
    ratio = statistics.median(cold) / statistics.median(pooled)
    print(f"per task   p50 ratio cold/pooled = {ratio:.1f}x  (target >= 50x: "
          f"{'met' if ratio >= 50 else 'NOT met'})")
    print(f"workflow   fan-out of {args.width} (maxWorkers {args.workers}): cold {cold_wall:.2f} s, "
          f"pooled {pooled_wall:.2f} s, ratio {cold_wall / pooled_wall:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
