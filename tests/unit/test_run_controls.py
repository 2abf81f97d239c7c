"""Steering a run while it goes: suspend and resume, stop, terminate, and a retry of a finished
run that keeps what succeeded (engine on the fake backend and the in-memory store)."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.backends.base import AgentSpec
from controller.engine import WorkflowRun
from controller.engine.journal import Journal
from controller.models import (
    AgentPhase,
    AgentReason,
    ConditionType,
    Shutdown,
    StepPhase,
    WorkflowPhase,
    WorkflowStatus,
    parse_workflow,
)
from controller.store import MemoryStore
from tests.conftest import workflow_doc
from tests.unit.fake_backend import Behaviour, FakeBackend
from tests.unit.test_engine import (
    attempt_of,
    by_step,
    index_of,
    new_run,
    scenario,
    step_of,
    until,
    with_uid,
)


def condition(status: WorkflowStatus, kind: ConditionType) -> tuple[str, str] | None:
    found = next((c for c in status.conditions if c.type == kind.value), None)
    return None if found is None else (found.status.value, found.reason)


def two_slow_steps() -> dict[str, Any]:
    """A fan-out of four, two at a time; a step after it; a finally step."""
    return with_uid(workflow_doc(
        {"name": "first", "parallel": {"replicas": 4, "maxWorkers": 2}},
        {"name": "second"},
        cleanup="Always",
        **{"finally": [{"name": "report", "image": "busybox:1.36"}]}))


def test_a_suspended_run_starts_no_agent_until_resumed_and_running_ones_finish() -> None:
    fake = FakeBackend(by_step({"first": Behaviour(0.05)}))

    async def go() -> tuple[WorkflowStatus, list[int], WorkflowRun]:
        run = new_run(two_slow_steps(), fake, MemoryStore())
        task = asyncio.create_task(run.execute())
        await until(lambda: len(fake.running()) == 2)
        run.suspend(True)
        assert condition(run.status, ConditionType.SUSPENDED) == ("True", "Suspended")
        await asyncio.sleep(0.2)  # the two running finish; none starts meanwhile
        held = [len(fake.starts("first")), len(fake.running())]
        run.suspend(False)
        return await task, held, run

    status, held, run = scenario(go())
    assert held == [2, 0]
    assert status.phase is WorkflowPhase.SUCCEEDED
    assert len(fake.starts("first")) == 4 and len(fake.starts("second")) == 1
    # The outcome's conditions, and the Suspended one as it was last: it was held back.
    assert condition(status, ConditionType.SUSPENDED) == ("False", "Resumed")
    assert [c.type for c in status.conditions][:2] == ["Completed", "Succeeded"]


def test_a_run_suspended_before_it_starts_waits_for_its_resume() -> None:
    fake = FakeBackend(by_step({}))

    async def go() -> tuple[WorkflowStatus, int]:
        run = new_run(two_slow_steps(), fake, MemoryStore())
        run.suspend(True)
        task = asyncio.create_task(run.execute())
        await asyncio.sleep(0.1)
        started = len(fake.started)
        run.suspend(False)
        return await task, started

    status, started = scenario(go())
    assert started == 0
    assert status.phase is WorkflowPhase.SUCCEEDED and len(fake.starts("report")) == 1


def test_stop_lets_running_agents_finish_starts_nothing_new_and_runs_finally() -> None:
    fake = FakeBackend(by_step({"first": Behaviour(0.1, stdout="x")}))

    async def go() -> WorkflowStatus:
        run = new_run(two_slow_steps(), fake, MemoryStore())
        task = asyncio.create_task(run.execute())
        await until(lambda: len(fake.running()) == 2)
        run.stop()
        return await task

    status = scenario(go())
    assert status.phase is WorkflowPhase.STOPPED
    first = fake.starts("first")
    assert len(first) == 2 and all(a.exit_code == 0 and not a.killed for a in first)
    assert status.step("first").phase is StepPhase.CANCELLED
    assert status.step("second").phase is StepPhase.SKIPPED
    assert "stopped" in (status.step("second").message or "")
    assert status.step("report").phase is StepPhase.SUCCEEDED
    assert condition(status, ConditionType.SUCCEEDED) == ("False", "Stopped")


def test_terminate_stops_running_agents_now_even_after_a_stop_and_says_so() -> None:
    fake = FakeBackend(by_step({"first": Behaviour(60)}))

    async def go() -> WorkflowStatus:
        run = new_run(two_slow_steps(), fake, MemoryStore())
        task = asyncio.create_task(run.execute())
        await until(lambda: len(fake.running()) == 2)
        run.stop()
        await asyncio.sleep(0.05)
        run.cancel(cause="terminated (spec.shutdown: Terminate)")
        return await task

    status = scenario(go())
    assert status.phase is WorkflowPhase.CANCELLED
    assert all(a.killed for a in fake.starts("first"))
    assert "terminated" in (status.message or "")
    assert condition(status, ConditionType.SUCCEEDED) == ("False", "Terminated")
    assert status.step("report").phase is StepPhase.SUCCEEDED


def test_a_retry_runs_the_failed_and_skipped_steps_again_and_keeps_what_succeeded() -> None:
    document = with_uid(workflow_doc(
        {"name": "fan", "parallel": {"replicas": 3},
         "retries": {"limit": 1, "backoffSeconds": 0}},
        {"name": "after"},
        cleanup="Never", **{"finally": [{"name": "report", "image": "busybox:1.36"}]}))
    broken = {"on": True}

    def agent(spec: AgentSpec) -> Behaviour:  # index 2 of the fan-out fails while "broken"
        fails = step_of(spec) == "fan" and index_of(spec) == 2 and broken["on"]
        return Behaviour(0.01, exit_code=1 if fails else 0, stdout=f"out-{attempt_of(spec)}")

    fake = FakeBackend(agent)
    store = MemoryStore()

    async def go() -> tuple[WorkflowStatus, WorkflowStatus, list[str] | None]:
        first = await new_run(document, fake, store).execute()
        broken["on"] = False
        workflow = parse_workflow(document)
        again = await Journal(store, workflow, workflow.metadata.uid or "").reopen(first)
        second = await new_run(document, fake, store).execute()
        return first, second, again

    first, second, again = scenario(go())
    assert first.phase is WorkflowPhase.FAILED
    assert again == ["fan", "after", "report"]
    assert second.phase is WorkflowPhase.SUCCEEDED
    fan = fake.starts("fan")
    # index 0 and 1 ran once; index 2 twice (limit 1) and then once more in the retry
    assert sorted(index_of(a.spec) for a in fan) == [0, 1, 2, 2, 2]
    assert [attempt_of(a.spec) for a in fan if index_of(a.spec) == 2] == [1, 2, 3]
    assert second.step("fan").attempts_before_retry == 2
    assert second.step("fan").outputs == ["out-1", "out-1", "out-3"]
    assert len(fake.starts("after")) == 1 and len(fake.starts("report")) == 2
    phases = [a.phase for a in second.step("fan").agents if a.index == 2]
    assert phases == [AgentPhase.FAILED, AgentPhase.FAILED, AgentPhase.SUCCEEDED]


def test_a_retried_step_gets_its_retries_again() -> None:
    document = with_uid(workflow_doc(
        {"name": "flaky", "retries": {"limit": 1, "backoffSeconds": 0}}, cleanup="Always"))
    fake = FakeBackend(lambda spec: Behaviour(0.01, exit_code=0 if attempt_of(spec) == 4 else 1))
    store = MemoryStore()

    async def go() -> WorkflowStatus:
        first = await new_run(document, fake, store).execute()
        assert first.phase is WorkflowPhase.FAILED
        workflow = parse_workflow(document)
        await Journal(store, workflow, workflow.metadata.uid or "").reopen(first)
        return await new_run(document, fake, store).execute()

    status = scenario(go())
    assert status.phase is WorkflowPhase.SUCCEEDED  # attempts 3 and 4: its limit of 1 again
    assert [attempt_of(a.spec) for a in fake.starts("flaky")] == [1, 2, 3, 4]


def test_a_run_stopped_while_no_controller_watched_waits_for_the_agents_it_left_running(
) -> None:
    document = two_slow_steps()
    fake = FakeBackend(by_step({"first": Behaviour(0.15, stdout="x")}))
    store = MemoryStore()

    async def go() -> WorkflowStatus:
        earlier = new_run(document, fake, store)
        task = asyncio.create_task(earlier.execute())
        await until(lambda: len(fake.running()) == 2)
        earlier.detach()  # the controller goes away; then spec.shutdown: Stop is set
        await task
        later = new_run(document, fake, store)
        later.steer(False, Shutdown.STOP)
        return await later.execute()

    status = scenario(go())
    first = fake.starts("first")
    assert len(first) == 2 and not any(a.killed for a in first)  # adopted, not started again
    assert [a.phase for a in status.step("first").agents] == [AgentPhase.SUCCEEDED] * 2
    assert status.step("first").phase is StepPhase.CANCELLED  # two of its four never started
    assert status.step("second").phase is StepPhase.SKIPPED
    assert status.phase is WorkflowPhase.STOPPED


def test_a_run_terminated_while_no_controller_watched_stops_the_agents_it_left_running(
) -> None:
    document = two_slow_steps()
    fake = FakeBackend(by_step({"first": Behaviour(60)}))
    store = MemoryStore()

    async def go() -> WorkflowStatus:
        earlier = new_run(document, fake, store)
        task = asyncio.create_task(earlier.execute())
        await until(lambda: len(fake.running()) == 2)
        earlier.detach()
        await task
        later = new_run(document, fake, store)
        later.steer(False, Shutdown.TERMINATE)
        return await later.execute()

    status = scenario(go())
    assert fake.running() == [] and all(a.killed for a in fake.starts("first"))
    assert fake.held() == []  # cleanup Always: removed too
    assert {a.reason for a in status.step("first").agents} == {AgentReason.CANCELLED}
    assert status.step("first").phase is StepPhase.CANCELLED
    assert status.phase is WorkflowPhase.CANCELLED and "terminated" in (status.message or "")
