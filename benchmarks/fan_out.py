"""Fan-out width: the engine's own cost per agent, from a hundred agents in a step to 10,000.

What it measures. One workflow of two steps, ``wide`` (a fan-out over W items) and ``sum``
(one agent reading all of ``wide``'s outputs), run by ``controller.engine.Engine`` on a backend
whose agents do nothing and end at once: the fake container engine of the unit tests, which
keeps its agents in memory. Containers cost nothing there, so the wall time is the engine's
own: scheduling, templating, state records in the store, status, events. It is run for each
width of ``--widths``, and the figure is milliseconds per agent.

How to read it. A cost per agent that stays flat as the width grows tenfold means the engine's
work per agent does not depend on how many agents the step has: ``ratio`` is each width's cost
per agent over the smallest width's, and stays near 1 when nothing is quadratic. The store is
in memory by default; ``--store redis`` adds its round trips (Redis at
``$AGENTAINER_REDIS_URL``). Rounds alternate widths; the median of ``--rounds`` is shown. The
script prints figures and never asserts timing: it exits 0 whatever they are, and 1 when a
run does not succeed with every output read.

    .venv/bin/python benchmarks/fan_out.py [--widths 100,1000,10000] [--rounds 3]
                                           [--store memory|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runnable from a checkout without the editable install

from controller.config import Settings  # noqa: E402
from controller.engine import Engine  # noqa: E402
from controller.models import WorkflowPhase, parse_workflow  # noqa: E402
from controller.store import open_store  # noqa: E402
from tests.unit.fake_backend import Behaviour, FakeBackend  # noqa: E402


def document(width: int) -> dict[str, Any]:
    """Two steps: W agents each printing its item's index, then one agent given all their
    outputs. The items are sentences, so that the spec grows with the width as a real one
    does."""
    return {
        "apiVersion": "agentainer.dev/v1alpha1", "kind": "Workflow",
        "metadata": {"name": f"wide-{width}", "namespace": "default",
                     "uid": str(uuid.uuid4())},
        "spec": {"backend": "docker", "cleanup": "Always", "steps": [
            {"name": "wide", "image": "agentainer/busybox:latest",
             "command": ["sh", "-c", "echo $AGENTAINER_ITEM_INDEX"],
             "env": [{"name": "TEXT", "value": "{{ item }}"}],
             "parallel": {"items": [f"the text of item {index}, about sixty characters long"
                                    for index in range(width)]}},
            {"name": "sum", "image": "agentainer/busybox:latest", "dependsOn": ["wide"],
             "command": ["sh", "-c", "echo $ALL"],
             "env": [{"name": "ALL", "value": "{{ steps.wide.outputs }}"}]},
        ]},
    }


def behaviour(spec: Any) -> Behaviour:
    """What the commands above print: an agent of the fan-out its item's index, the last step
    its ``ALL``."""
    if "ALL" in spec.env:
        return Behaviour(0, stdout=spec.env["ALL"] + "\n")
    return Behaviour(0, stdout=spec.env["AGENTAINER_ITEM_INDEX"] + "\n")


async def one_run(settings: Settings, width: int) -> float:
    """Seconds for one workflow of ``width`` agents, start to end; checks what it computed."""
    store = await open_store(settings)
    backend = FakeBackend(behaviour)
    try:
        run = Engine(backend, store, settings).prepare(parse_workflow(document(width)))
        began = time.perf_counter()
        status = await run.execute()
        took = time.perf_counter() - began
        if status.phase is not WorkflowPhase.SUCCEEDED:
            raise SystemExit(f"width {width}: the workflow ended {status.phase.value}: "
                             f"{status.message}")
        seen = json.loads(status.step("sum").output or "[]")
        if seen != [str(index) for index in range(width)]:
            raise SystemExit(f"width {width}: the last step read {len(seen)} outputs, "
                             "not every item's index in order")
        await store.delete(run.uid)
        return took
    finally:
        await store.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="100,1000,10000",
                        help="fan-out widths, comma-separated (default 100,1000,10000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per width (default 3)")
    parser.add_argument("--store", choices=["memory", "redis"], default="memory",
                        help="the engine's store (default memory)")
    args = parser.parse_args(argv)
    try:
        args.widths = sorted({int(w) for w in args.widths.split(",")})
    except ValueError:
        parser.error(f"--widths: {args.widths!r} is not a list of numbers")
    if not args.widths or min(args.widths) < 1 or max(args.widths) > 10000:
        parser.error("--widths: each between 1 and 10000")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = Settings.from_env(store=args.store, stop_grace_seconds=0)
    seconds: dict[int, list[float]] = {width: [] for width in args.widths}
    for _ in range(args.rounds):
        for width in args.widths:
            seconds[width].append(asyncio.run(one_run(settings, width)))
    print(f"the engine's own cost per agent of a fan-out (store: {args.store}, "
          f"median of {args.rounds})")
    print(f"{'width':>7} {'seconds':>9} {'ms/agent':>9} {'ratio':>6}")
    smallest: float | None = None
    for width in args.widths:
        per_agent = statistics.median(seconds[width]) / (width + 1) * 1000
        smallest = smallest or per_agent
        print(f"{width:>7} {statistics.median(seconds[width]):9.2f} {per_agent:9.3f} "
              f"{per_agent / smallest:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
