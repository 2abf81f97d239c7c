"""Fan-out from a step's output (``parallel.itemsFrom``): a planner prints a JSON array, the
workers get one agent per element, exactly as ``parallel.items`` would give them; what cannot
be items fails the step saying why, quoting the output; a restart in the middle runs nothing
twice. On the fake backend; tests/integration/test_engine_docker.py runs it on Docker."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest

from controller.engine import Engine
from controller.errors import InvalidSpecError
from controller.models import StepPhase, WorkflowPhase, parse_workflow
from controller.store import MemoryStore
from tests.conftest import workflow_doc
from tests.unit.test_models import assert_reported, problems_of
from tests.unit.fake_backend import Behaviour, FakeBackend
from tests.unit.test_engine import SETTINGS, by_step, new_run, run, scenario, until, with_uid

PLAN = [{"task": "read", "n": 1}, "write", 3]


def planned(plan: str, **workers: Any) -> dict[str, Any]:
    return with_uid(workflow_doc(
        {"name": "plan", "command": ["plan"]},
        {"name": "work", "parallel": {"itemsFrom": "{{ steps.plan.output }}", **workers},
         "command": ["work", "{{ item }}"]},
        {"name": "review", "command": ["review"],
         "env": [{"name": "RESULTS", "value": "{{ steps.work.outputs }}"}]}))


def echo_items(plan: str) -> Any:
    def script(spec: Any) -> Behaviour:
        step = spec.labels["agentainer.dev/step"]
        if step == "plan":
            return Behaviour(stdout=plan)
        if step == "work":
            return Behaviour(0.01, stdout=f"did {spec.env['AGENTAINER_ITEM']}")
        return Behaviour(stdout=spec.env.get("RESULTS", ""))
    return script


def test_workers_fan_out_over_the_array_the_planner_printed() -> None:
    status, fake = run(planned(json.dumps(PLAN), maxWorkers=2), echo_items(json.dumps(PLAN)))
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    work = status.step("work")
    assert work.outputs == ['did {"n": 1, "task": "read"}', "did write", "did 3"]
    assert json.loads(status.step("review").output or "") == work.outputs
    assert status.progress == "5/5"
    commands = sorted(a.spec.command for a in fake.started if a.step == "work")  # type: ignore
    assert commands == [["work", "3"], ["work", "write"], ["work", '{"n": 1, "task": "read"}']]


def test_one_item_is_still_a_fan_out_and_none_succeeds_with_no_agents() -> None:
    status, _ = run(planned('["only"]'), echo_items('["only"]'))
    assert status.step("work").output == '["did only"]'
    status, fake = run(planned("[]"), echo_items("[]"))
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("work").output == "[]"
    assert not [a for a in fake.started if a.step == "work"]


@pytest.mark.parametrize(("plan", "words"), [
    ("Here are the tasks: read, write", "is not JSON: 'Here are the tasks: read, write'"),
    ('{"tasks": ["read"]}', "is not a JSON array: '{\"tasks\": [\"read\"]}'"),
    ("[" * 5000 + "]" * 5000, "is not JSON"),
    (json.dumps(list(range(11))), "has 11 items, more than AGENTAINER_MAX_ITEMS_FROM (10)"),
    ("[1, 1e400]", "is not JSON: '[1, 1e400]'"),  # Infinity, which no JSON has
    ("[NaN]", "is not JSON: '[NaN]'"),
], ids=["prose", "object", "too-deep", "too-many", "too-large-a-number", "nan"])
def test_an_output_that_cannot_be_items_fails_the_step_quoting_it(plan: str,
                                                                  words: str) -> None:
    fake = FakeBackend(echo_items(plan))
    run_ = Engine(fake, MemoryStore(), replace(SETTINGS, max_items_from=10)).prepare(
        parse_workflow(planned(plan)))
    status = scenario(run_.execute())
    assert status.phase is WorkflowPhase.FAILED
    work = status.step("work")
    assert work.phase is StepPhase.FAILED
    assert "step work: parallel.itemsFrom ({{ steps.plan.output }})" in (work.message or "")
    assert words in (work.message or "")
    assert len(work.message or "") < 400  # the start of the output, not all of it
    assert status.step("review").phase is StepPhase.SKIPPED
    assert not [a for a in fake.started if a.step == "work"]


def test_a_restart_in_the_middle_of_the_fan_out_runs_nothing_twice() -> None:
    plan = json.dumps([f"task {n}" for n in range(6)])
    document = planned(plan, maxWorkers=3)
    store = MemoryStore()
    fake = FakeBackend(by_step({"plan": Behaviour(stdout=plan),
                                "work": Behaviour(0.05, stdout="done")}))

    async def play() -> Any:
        first = new_run(document, fake, store)
        execution = asyncio.ensure_future(first.execute())
        await until(lambda: len([a for a in fake.started if a.step == "work"]) >= 4)
        first.detach()
        await execution
        return await new_run(document, fake, store).execute()

    status = scenario(play())
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("work").outputs == ["done"] * 6
    assert set(fake.starts_per_agent().values()) == {1}
    assert status.progress == "8/8"


@pytest.mark.parametrize(("work", "path", "words"), [
    ({"itemsFrom": "plan: {{ steps.plan.output }}"}, "spec.steps[1].parallel.itemsFrom",
     "one step reference and nothing else"),
    ({"itemsFrom": "{{ params.x }}"}, "spec.steps[1].parallel.itemsFrom",
     "one step reference"),
    ({"itemsFrom": "{{ steps.later.output }}"}, "spec.steps[1].parallel.itemsFrom",
     "does not depend on 'later'"),
    ({"itemsFrom": "{{ steps.plan.output }}", "replicas": 2}, "spec.steps[1].parallel",
     "exactly one of items, replicas or itemsFrom"),
], ids=["text-around", "not-a-step", "not-upstream", "with-replicas"])
def test_items_from_is_checked_before_anything_runs(work: dict[str, Any], path: str,
                                                   words: str) -> None:
    document = workflow_doc({"name": "plan"}, {"name": "work", "parallel": work},
                            {"name": "later"})
    assert_reported(problems_of(document), path, (words,))


def test_a_fan_outs_single_output_cannot_be_read() -> None:
    document = workflow_doc(
        {"name": "plan"}, {"name": "work", "parallel": {"itemsFrom": "{{ steps.plan.output }}"}},
        {"name": "review", "command": ["{{ steps.work.output }}"]})
    with pytest.raises(InvalidSpecError, match="use {{ steps.work.outputs }}"):
        parse_workflow(document)


def test_a_pooled_step_fans_out_over_the_plan_too() -> None:
    from tests.unit.test_env_refs import run_with_pool

    document = with_uid(workflow_doc(
        {"name": "plan", "image": "agent:1"},
        {"name": "work", "pool": "warm", "command": ["do", "{{ item }}"],
         "parallel": {"itemsFrom": "{{ steps.plan.output }}", "maxWorkers": 1}}))
    status, _ = run_with_pool(document, FakeBackend(lambda spec: Behaviour(
        stdout='["a", "b"]') if spec.labels.get("agentainer.dev/step") == "plan"
        else Behaviour()))
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("work").outputs == ["do a", "do b"]  # the fake pool echoes the task
