"""Finally steps: they run once every other step has ended, whatever the outcome (success,
failure, cancellation, timeout), read {{ workflow.status }} and {{ workflow.failures }}, and
change the workflow's phase only when they fail; a restart during them runs nothing twice."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from controller.models import Shutdown, StepPhase, WorkflowPhase, parse_workflow
from controller.store import MemoryStore
from tests.conftest import IMAGE, workflow_doc
from tests.unit.test_models import assert_reported, problems_of
from tests.unit.fake_backend import Behaviour, FakeBackend
from tests.unit.test_engine import (
    by_step,
    new_run,
    quick_timeouts,
    run,
    scenario,
    until,
    with_quick_timeouts,
    with_uid,
)

CLEANUP = {"name": "cleanup", "image": IMAGE, "env": [
    {"name": "STATUS", "value": "{{ workflow.status }}"},
    {"name": "FAILURES", "value": "{{ workflow.failures }}"}]}


def with_finally(*steps: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return with_uid(workflow_doc(*steps, **{"finally": [CLEANUP, {"name": "notify", "image": IMAGE}]}, **spec))


def told(fake: FakeBackend) -> dict[str, str]:
    (agent,) = [a for a in fake.started if a.step == "cleanup"]  # type: ignore[attr-defined]
    return {"status": agent.spec.env["STATUS"], "failures": agent.spec.env["FAILURES"]}


def test_finally_steps_run_after_a_success_and_leave_it_a_success() -> None:
    status, fake = run(with_finally({"name": "build"}, {"name": "test"}))
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert told(fake) == {"status": "Succeeded", "failures": "[]"}
    starts = [a.step for a in fake.started]  # type: ignore[attr-defined]
    assert starts[:2] == ["build", "test"] and set(starts[2:]) == {"cleanup", "notify"}
    assert status.progress == "4/4"


def test_finally_steps_run_after_a_failure_which_stays_the_workflows() -> None:
    status, fake = run(with_finally({"name": "build"}, {"name": "test"}),
                       by_step({"build": Behaviour(exit_code=2)}))
    assert status.phase is WorkflowPhase.FAILED
    assert status.message and status.message.startswith("step build failed")
    assert told(fake) == {"status": "Failed", "failures": json.dumps(["build"])}
    assert status.step("test").phase is StepPhase.SKIPPED
    assert status.step("notify").phase is StepPhase.SUCCEEDED


def test_a_finally_step_reads_the_output_of_any_step_however_it_ended() -> None:
    """A notifier that quotes outputs runs in the very case it is for: the output of a step
    that failed, was skipped by its condition or never started reads empty (its phase says
    why), and one that succeeded reads whole."""
    reads = "{{ steps.made.output }}|{{ steps.broke.output }}|{{ steps.skipped.outputs }}|" \
            "{{ steps.after.output }}|{{ steps.broke.phase }}"
    document = with_uid(workflow_doc(
        {"name": "made"}, {"name": "broke", "dependsOn": ["made"]},
        {"name": "skipped", "dependsOn": [], "parallel": {"replicas": 2},
         "when": [{"input": "a", "operator": "in", "values": ["b"]}]},
        {"name": "after", "dependsOn": ["broke"]},
        **{"finally": [{"name": "notify", "image": IMAGE,
                        "env": [{"name": "READ", "value": reads}]}]}))
    status, fake = run(document, lambda spec: Behaviour(
        stdout="partial", exit_code=4) if spec.env.get("AGENTAINER_STEP") == "broke"
        else Behaviour(stdout="made"))

    assert status.phase is WorkflowPhase.FAILED
    assert status.step("notify").phase is StepPhase.SUCCEEDED, status.step("notify").message
    (notify,) = [a for a in fake.started if a.step == "notify"]  # type: ignore[attr-defined]
    assert notify.spec.env["READ"] == "made||[]||Failed"


def test_a_failing_finally_step_fails_the_workflow_but_not_the_other_finally_steps() -> None:
    status, _ = run(with_finally({"name": "build"}),
                    by_step({"cleanup": Behaviour(exit_code=1)}))
    assert status.phase is WorkflowPhase.FAILED
    assert status.message and status.message.startswith("finally step cleanup failed")
    assert status.step("notify").phase is StepPhase.SUCCEEDED


@quick_timeouts
@pytest.mark.parametrize("how", ["cancelled", "timed out"])
def test_finally_steps_run_after_a_cancellation_or_the_timeout(how: str) -> None:
    document = with_quick_timeouts(with_finally(
        {"name": "long"}, **({"timeoutSeconds": 1} if how == "timed out" else {})))
    fake = FakeBackend(by_step({"long": Behaviour(30)}))

    async def play() -> Any:
        workflow_run = new_run(document, fake, MemoryStore())
        execution = asyncio.ensure_future(workflow_run.execute())
        if how == "cancelled":
            await until(lambda: bool(fake.running()))
            workflow_run.cancel()
        return await execution

    status = scenario(play())
    assert status.phase is (WorkflowPhase.CANCELLED if how == "cancelled"
                            else WorkflowPhase.FAILED)
    assert told(fake)["status"] == "Failed"
    assert status.step("cleanup").phase is StepPhase.SUCCEEDED
    assert status.step("notify").phase is StepPhase.SUCCEEDED


@pytest.mark.parametrize("shutdown", [Shutdown.TERMINATE, Shutdown.STOP])
def test_a_stop_or_terminate_that_comes_as_the_finally_steps_run_lets_them_finish(
        shutdown: Shutdown) -> None:
    """What a stop or terminate ends is over once the finally steps run, and they are what it
    runs next: they finish, and the workflow ends as its other steps made it end."""
    document = with_finally({"name": "build"}, {"name": "test"})
    fake = FakeBackend(by_step({"build": Behaviour(exit_code=2), "cleanup": Behaviour(0.1)}))

    async def play() -> Any:
        workflow_run = new_run(document, fake, MemoryStore())
        execution = asyncio.ensure_future(workflow_run.execute())
        await until(lambda: any(a.step == "cleanup" for a in fake.running()))  # type: ignore
        workflow_run.steer(False, shutdown)
        return await execution

    status = scenario(play())
    assert status.step("cleanup").phase is StepPhase.SUCCEEDED
    assert not any(a.killed for a in fake.started)
    assert status.phase is WorkflowPhase.FAILED
    assert status.message and status.message.startswith("step build failed")


def test_a_restart_during_the_finally_steps_runs_nothing_twice() -> None:
    document = with_finally({"name": "build"})
    store = MemoryStore()
    fake = FakeBackend(by_step({"cleanup": Behaviour(0.1), "notify": Behaviour(0.1)}))

    async def play() -> Any:
        first = new_run(document, fake, store)
        execution = asyncio.ensure_future(first.execute())
        await until(lambda: any(a.step == "cleanup" for a in fake.running()))  # type: ignore
        first.detach()
        await execution
        return await new_run(document, fake, store).execute()

    status = scenario(play())
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert set(fake.starts_per_agent().values()) == {1}
    assert status.step("cleanup").phase is StepPhase.SUCCEEDED


@pytest.mark.parametrize(("document", "path", "words"), [
    (workflow_doc({"name": "build"}, **{"finally": [{"name": "x", "dependsOn": ["build"]}]}),
     "spec.finally[0].dependsOn[0]", "may depend only on other finally steps"),
    (workflow_doc({"name": "build", "command": ["{{ workflow.status }}"]}),
     "spec.steps[0].command[0]", "only set in a finally step"),
    (workflow_doc({"name": "build"}, **{"finally": [{"name": "build"}]}),
     "spec.finally[0].name", "duplicate step name 'build'"),
    (workflow_doc({"name": "build", "dependsOn": ["x"]}, **{"finally": [{"name": "x"}]}),
     "spec.steps[0].dependsOn[0]", "'x' is a finally step"),
    (workflow_doc({"name": "build"}, **{"finally": [{"name": "x", "image": IMAGE, "command": [
        "{{ steps.build.output }}"]}]}), None, None),
], ids=["finally-on-a-step", "status-outside-finally", "same-name", "step-on-finally",
        "finally-reads-a-step"])
def test_finally_steps_are_checked_before_anything_runs(document: dict[str, Any],
                                                        path: str | None,
                                                        words: str | None) -> None:
    if path is None:
        parse_workflow(document)  # a finally step may read any step's output
        return
    assert words is not None
    assert_reported(problems_of(document), path, (words,))


def test_a_workflow_being_deleted_runs_no_finally_step() -> None:
    fake = FakeBackend(by_step({"long": Behaviour(30)}))

    async def play() -> Any:
        workflow_run = new_run(with_finally({"name": "long"}), fake, MemoryStore())
        execution = asyncio.ensure_future(workflow_run.execute())
        await until(lambda: bool(fake.running()))
        workflow_run.cancel(finally_steps=False)
        return await execution

    status = scenario(play())
    assert status.phase is WorkflowPhase.CANCELLED
    assert [a.step for a in fake.started] == ["long"]  # type: ignore[attr-defined]
    assert status.step("cleanup").phase is StepPhase.SKIPPED
