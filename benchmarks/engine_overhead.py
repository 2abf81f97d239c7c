"""Engine overhead: the MapReduce example through the engine vs. a plain script of docker calls.

What it measures. The wall time of one run of ``examples/mapreduce.yaml`` (initialize, a map
fan-out of 5 agents with at most ``maxWorkers`` at once, reduce, report), two ways, against the
same Docker engine:

- **engine**: ``controller.engine.Engine`` with the real ``DockerBackend`` and the store of
  ``controller.store.open_store`` (Redis at ``$AGENTAINER_REDIS_URL`` by default, or
  ``--store memory``): DAG scheduling, templating, state records in the store, events, cleanup.
- **plain**: a straight-line Python script making the same docker-py calls in the same shape:
  for each step in order, for each agent, ``containers.create`` (the very arguments the backend
  would pass: built with ``engine.build_agent_spec`` and ``backends.docker.container_config``),
  ``start``, ``wait``, ``logs(stdout)``, ``logs(stderr)``, ``inspect``, ``remove``; the map
  step's agents on threads, at most ``maxWorkers`` at once; nothing recorded anywhere.

Both must compute the right total (the sum of the word counts of the map items); a wrong total,
or an agent that fails, ends the benchmark with exit code 1. Connecting to Docker and to the
store happens once, before timing, for both sides (as in the long-running controller); each
timed run starts with the workflow already parsed and ends when its last agent is removed.

How to read it. Containers dominate both sides, so ``engine - plain`` is what the engine's own
machinery costs per workflow, and ``ratio = median(engine) / median(plain)`` is that cost
relative to the work. The target is ``ratio <= 1.15``. Rounds alternate which side goes first,
after one uncounted warm-up of each, so that neither side always runs on a warmer engine. On a
small machine the spread between rounds can be as large as the difference itself: look at the
per-round figures before believing a ratio, and raise ``--rounds`` when they scatter. The script
prints figures and never asserts timing: it exits 0 whatever the ratio.

    .venv/bin/python benchmarks/engine_overhead.py [--rounds N] [--store redis|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runnable from a checkout without the editable install

import docker  # noqa: E402
import redis  # noqa: E402

from controller.backends.base import LABEL_WORKFLOW_UID  # noqa: E402
from controller.backends.docker import DockerBackend, container_config  # noqa: E402
from controller.config import Settings  # noqa: E402
from controller.agents import build_agent_spec  # noqa: E402
from controller.engine import Engine  # noqa: E402
from controller.manifests import load_workflow  # noqa: E402
from controller.models import Step, Workflow, WorkflowPhase  # noqa: E402
from controller.store import Keys, Store, open_store  # noqa: E402

logger = logging.getLogger("benchmarks.engine_overhead")

WORKFLOW_FILE = ROOT / "examples" / "mapreduce.yaml"
MAP_STEP = "map"
REDUCE_STEP = "reduce"
TARGET_RATIO = 1.15


class WrongResult(Exception):
    """A run did not compute what the workflow should: the figures would mean nothing."""


@dataclass(frozen=True)
class Timing:
    side: str
    seconds: float


def expected_total(workflow: Workflow) -> int:
    """What the reduce step must print: the words of every map item, as ``wc -w`` counts them."""
    step = next(s for s in workflow.spec.steps if s.name == MAP_STEP)
    assert step.parallel is not None and step.parallel.items is not None
    return sum(len(str(item).split()) for item in step.parallel.items)


def with_uid(workflow: Workflow, uid: str) -> Workflow:
    """The workflow as if the API server had given it ``uid``, so that we know its agents."""
    metadata = workflow.metadata.model_copy(update={"uid": uid})
    return workflow.model_copy(update={"metadata": metadata})


def check_total(side: str, reduce_output: str | None, expected: int) -> None:
    if reduce_output is None or reduce_output.strip() != str(expected):
        raise WrongResult(f"{side}: reduce printed {reduce_output!r}, expected {expected}")


# --- (a) the engine ----------------------------------------------------------------------------


class EngineSide:
    """The real engine, backend and store, connected once like the controller's."""

    def __init__(self, runner: asyncio.Runner, settings: Settings) -> None:
        self.runner = runner
        self.settings = settings
        self.store: Store = runner.run(open_store(settings))
        self.backend = runner.run(DockerBackend.connect(settings))
        self.engine = Engine(self.backend, self.store, settings)
        self.uids: list[str] = []

    def run(self, workflow: Workflow, expected: int) -> float:
        uid = str(uuid.uuid4())
        self.uids.append(uid)
        workflow = with_uid(workflow, uid)
        started = time.perf_counter()
        status = self.runner.run(self.engine.run(workflow))
        elapsed = time.perf_counter() - started
        if status.phase is not WorkflowPhase.SUCCEEDED:
            raise WrongResult(f"engine: workflow ended {status.phase.value}: {status.message}")
        check_total("engine", status.step(REDUCE_STEP).output, expected)
        stored = self.runner.run(self.store.outputs(uid, REDUCE_STEP))
        check_total("engine (store)", stored.get(0), expected)
        return elapsed

    def close(self) -> None:
        self.runner.run(self.backend.close())
        self.runner.run(self.store.close())


# --- (b) the plain script ----------------------------------------------------------------------


class PlainSide:
    """The same containers, made by hand: no scheduler, no store, no events."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = docker.from_env(max_pool_size=settings.docker_threads)
        self.client.ping()
        self.created: list[str] = []  # every container id, to remove leftovers after a failure

    def run_agent(self, workflow: Workflow, uid: str, step: Step, index: int,
                  outputs: dict[str, list[str]]) -> str:
        spec = build_agent_spec(workflow, uid, step, index, 1, outputs)
        config = container_config(spec, self.settings.docker_network)
        container = self.client.containers.create(**config)
        container_id = str(container.id)
        self.created.append(container_id)
        container.start()
        api = self.client.api
        exit_code = int(api.wait(container_id).get("StatusCode", -1))
        stdout = api.logs(container_id, stdout=True, stderr=False).decode("utf-8", "replace")
        stderr = api.logs(container_id, stdout=False, stderr=True).decode("utf-8", "replace")
        state = api.inspect_container(container_id)["State"]
        if exit_code != 0 or state.get("OOMKilled"):
            raise WrongResult(f"plain: agent {spec.name} exited {exit_code}: {stderr.strip()}")
        api.remove_container(container_id, v=True, force=True)
        return stdout.strip()

    def run(self, workflow: Workflow, expected: int) -> float:
        uid = str(uuid.uuid4())
        outputs: dict[str, list[str]] = {}
        started = time.perf_counter()
        for step in workflow.spec.steps:
            if step.width == 1:
                outputs[step.name] = [self.run_agent(workflow, uid, step, 0, outputs)]
                continue
            with ThreadPoolExecutor(max_workers=step.max_workers) as pool:
                futures = [pool.submit(self.run_agent, workflow, uid, step, index, outputs)
                           for index in range(step.width)]
                outputs[step.name] = [future.result() for future in futures]
        elapsed = time.perf_counter() - started
        check_total("plain", outputs[REDUCE_STEP][0], expected)
        return elapsed

    def close(self) -> None:
        self.client.close()


# --- cleanup -----------------------------------------------------------------------------------


def remove_leftovers(client: docker.DockerClient, plain_ids: list[str],
                     engine_uids: list[str]) -> None:
    """Remove what this script made and left behind (after a failure); nothing else."""
    existing = {str(c.id) for c in client.containers.list(all=True)}
    leftovers = {i for i in plain_ids if i in existing}
    for uid in engine_uids:
        found = client.containers.list(all=True, filters={"label": f"{LABEL_WORKFLOW_UID}={uid}"})
        leftovers.update(str(c.id) for c in found)
    for container_id in leftovers:
        logger.warning("removing leftover container %s", container_id[:12])
        client.api.remove_container(container_id, v=True, force=True)


def forget_state(settings: Settings, workflow: Workflow, uids: list[str]) -> None:
    """Delete the engine's Redis keys for the benchmark's runs: they are not real workflows."""
    if settings.store != "redis" or not uids:
        return
    client = redis.Redis.from_url(settings.redis_url)
    try:
        steps = [step.name for step in workflow.spec.steps]
        with client.pipeline(transaction=True) as pipe:
            for uid in uids:
                pipe.delete(Keys.workflow(uid), Keys.steps(uid), Keys.agents(uid),
                            Keys.logs(uid), *(Keys.outputs(uid, step) for step in steps))
            pipe.zrem(Keys.workflows, *uids)
            pipe.execute()
    finally:
        client.close()


# --- the report --------------------------------------------------------------------------------


def report(rounds: list[tuple[Timing, Timing]], settings: Settings, workflow: Workflow) -> None:
    agents = sum(step.width for step in workflow.spec.steps)
    print(f"engine overhead: {workflow.metadata.name}, {len(workflow.spec.steps)} steps, "
          f"{agents} agents; store={settings.store}, docker network={settings.docker_network}")
    print(f"{'round':>5}  {'first':<6}  {'engine s':>9}  {'plain s':>9}  {'ratio':>6}")
    for number, (first, second) in enumerate(rounds, start=1):
        by_side = {first.side: first.seconds, second.side: second.seconds}
        print(f"{number:>5}  {first.side:<6}  {by_side['engine']:>9.3f}  {by_side['plain']:>9.3f}"
              f"  {by_side['engine'] / by_side['plain']:>6.3f}")
    engine = statistics.median(t.seconds for pair in rounds for t in pair if t.side == "engine")
    plain = statistics.median(t.seconds for pair in rounds for t in pair if t.side == "plain")
    ratio = engine / plain
    print(f"median engine {engine:.3f}s, median plain {plain:.3f}s, "
          f"difference {engine - plain:+.3f}s per workflow")
    print(f"ratio engine/plain = {ratio:.3f}")
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"verdict: {verdict} the target ratio <= {TARGET_RATIO} ({ratio:.3f})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    parser.add_argument("--store", choices=["redis", "memory"], default="redis",
                        help="the engine's store (default redis at $AGENTAINER_REDIS_URL)")
    parser.add_argument("--file", type=Path, default=WORKFLOW_FILE,
                        help="the MapReduce workflow (default examples/mapreduce.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each run")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(store=args.store)
    workflow = load_workflow(args.file)
    expected = expected_total(workflow)
    logger.info("expected total: %d", expected)

    plain = PlainSide(settings)
    rounds: list[tuple[Timing, Timing]] = []
    with asyncio.Runner() as runner:
        engine = EngineSide(runner, settings)
        sides: dict[str, EngineSide | PlainSide] = {"engine": engine, "plain": plain}
        try:
            for number in range(args.rounds + 1):  # round 0 is the uncounted warm-up
                order = ("engine", "plain") if number % 2 == 0 else ("plain", "engine")
                pair = tuple(Timing(side, sides[side].run(workflow, expected)) for side in order)
                logger.info("round %d: %s", number, pair)
                if number > 0:
                    rounds.append((pair[0], pair[1]))
        except WrongResult as error:
            logger.error("wrong result, no figures: %s", error)
            return 1
        finally:
            remove_leftovers(plain.client, plain.created, engine.uids)
            forget_state(settings, workflow, engine.uids)
            engine.close()
            plain.close()
    report(rounds, settings, workflow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
