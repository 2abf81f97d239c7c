"""What the handlers write to Kubernetes: a Workflow's status small at any size of workflow, and
a status writer that outlives any failed write."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from controller.config import Settings
from controller.engine import Event, EventKind
from controller.handlers.context import Urgency
from controller.handlers.reporting import (
    StatusWriter,
    compact_status,
    refused_status,
    retried_status,
    text_limit,
)
from controller.models import (
    AgentPhase,
    AgentReason,
    AgentStatus,
    ConditionType,
    StepPhase,
    StepStatus,
    WorkflowPhase,
    WorkflowStatus,
)

KiB = 1024
RESOURCE_BOUND = 256 * KiB
AT = "2026-01-01T00:00:00.000000+00:00"
SETTINGS = Settings()


def agent(step: str, index: int, phase: AgentPhase = AgentPhase.SUCCEEDED,
          attempt: int = 1) -> AgentStatus:
    """An agent with every field set, as long as they get (names of 63 characters)."""
    finished = phase in (AgentPhase.SUCCEEDED, AgentPhase.FAILED)
    return AgentStatus(
        id=f"{step}.{index}.{attempt}", name=f"{step}-{index}-{'x' * 63}"[:63], index=index,
        attempt=attempt, phase=phase, created_at=AT, started_at=AT,
        exit_code=(0 if phase is AgentPhase.SUCCEEDED else 1) if finished else None,
        reason=(AgentReason.COMPLETED if phase is AgentPhase.SUCCEEDED else AgentReason.ERROR)
        if finished else None,
        output_truncated=True if finished else None, finished_at=AT if finished else None)


def step(name: str, agents: list[AgentStatus], phase: StepPhase = StepPhase.SUCCEEDED,
         message: str | None = None) -> StepStatus:
    """A step whose every agent printed 40 double quotes (which JSON escapes, twice)."""
    outputs = ['"' * 40 for _ in agents]
    return StepStatus(name=name, phase=phase, agents=agents, attempts=len(agents),
                      output=json.dumps(outputs), outputs=outputs, started_at=AT,
                      finished_at=AT, message=message)


def compact(status: WorkflowStatus, agent_limit: int = SETTINGS.status_agent_limit
            ) -> dict[str, Any]:
    return compact_status(status, SETTINGS.status_output_limit, agent_limit)


def listed(compact: dict[str, Any]) -> int:
    return sum(len(step.get("agents", [])) for step in compact["steps"])


def test_status_of_one_step_of_10000_agents_stays_under_256_kib() -> None:
    name = "s" * 63
    agents = [agent(name, i, AgentPhase.RUNNING if i >= 9993 else
                    AgentPhase.FAILED if i in (10, 20, 30) else AgentPhase.SUCCEEDED)
              for i in range(10_000)]
    status = WorkflowStatus(phase=WorkflowPhase.RUNNING, steps=[step(name, agents)])

    written = compact(status)

    size = len(json.dumps(written))
    print(f"status of 1 step x 10,000 agents: {size} bytes "
          f"(all listed: {len(json.dumps(status.to_dict()))} bytes)")
    assert size < RESOURCE_BOUND
    (summary,) = written["steps"]
    assert summary["agentCounts"] == {"Succeeded": 9990, "Failed": 3, "Running": 7}
    assert summary["attempts"] == 10_000
    assert len(summary["agents"]) == SETTINGS.status_agent_limit
    assert summary["agentsOmitted"] == 10_000 - SETTINGS.status_agent_limit
    indexes = [a["index"] for a in summary["agents"]]
    assert {10, 20, 30, *range(9993, 10_000)} <= set(indexes)  # the failed and the running
    assert indexes == sorted(indexes)  # in their order


def test_status_of_200_steps_of_50_agents_stays_under_256_kib() -> None:
    status = WorkflowStatus(phase=WorkflowPhase.FAILED, message="m" * 2000, steps=[
        step(f"step-{k}-{'s' * 50}", [agent(f"step-{k}", i) for i in range(50)],
             message=f"step {k} failed: {'why ' * 300}")
        for k in range(200)])

    written = compact(status)

    size = len(json.dumps(written))
    print(f"status of 200 steps x 50 agents: {size} bytes "
          f"(all listed: {len(json.dumps(status.to_dict()))} bytes)")
    assert size < RESOURCE_BOUND
    assert listed(written) == SETTINGS.status_agent_limit
    assert sum(s.get("agentsOmitted", 0) for s in written["steps"]) == \
        200 * 50 - SETTINGS.status_agent_limit
    assert all(s["agentCounts"] == {"Succeeded": 50} for s in written["steps"])
    assert all(s["outputTruncated"] for s in written["steps"])


def test_small_workflow_lists_every_agent_in_its_order() -> None:
    status = WorkflowStatus(steps=[
        step("fan", [agent("fan", i) for i in range(3)]),
        step("retried", [agent("retried", 0, AgentPhase.FAILED, attempt=1),
                         agent("retried", 0, AgentPhase.SUCCEEDED, attempt=2)])])

    written = compact(status)

    fan, retried = written["steps"]
    assert [a["attempt"] for a in fan["agents"]] == [1, 1, 1]
    assert [a["index"] for a in fan["agents"]] == [0, 1, 2]
    assert [(a["attempt"], a["reason"]) for a in retried["agents"]] == [(1, "Error"),
                                                                         (2, "Completed")]
    assert "agentsOmitted" not in fan and "agentsOmitted" not in retried
    assert retried["agentCounts"] == {"Failed": 1, "Succeeded": 1}


def test_a_step_without_agents_has_no_counts() -> None:
    written = compact(WorkflowStatus(steps=[StepStatus(name="later")]))

    assert "agentCounts" not in written["steps"][0]
    assert written["steps"][0]["agents"] == []


def test_every_step_lists_its_last_agents_when_not_all_fit() -> None:
    status = WorkflowStatus(steps=[step(f"s{k}", [agent(f"s{k}", i) for i in range(50)])
                                   for k in range(20)])

    written = compact(status, agent_limit=100)

    assert [[a["index"] for a in s["agents"]] for s in written["steps"]] == \
        [[45, 46, 47, 48, 49]] * 20
    assert [s["agentsOmitted"] for s in written["steps"]] == [45] * 20


def test_running_agents_come_first_then_the_failed_then_the_last() -> None:
    done = step("done", [agent("done", i) for i in range(10)])
    failing = step("failing", [agent("failing", i, AgentPhase.FAILED if i < 3 else
                                     AgentPhase.SUCCEEDED) for i in range(10)])
    going = step("going", [agent("going", i, AgentPhase.RUNNING) for i in range(6)]
                 + [agent("going", 6, AgentPhase.CREATED)], phase=StepPhase.RUNNING)
    status = WorkflowStatus(steps=[done, failing, going])

    shown = [{s["name"]: [a["index"] for a in s["agents"]] for s in compact(
        status, agent_limit=limit)["steps"]} for limit in (5, 9, 12)]

    assert shown == [
        {"done": [], "failing": [], "going": [2, 3, 4, 5, 6]},  # the latest of those going
        {"done": [], "failing": [1, 2], "going": list(range(7))},
        {"done": [9], "failing": [0, 1, 2, 9], "going": list(range(7))},
    ]


def test_an_agent_limit_of_zero_lists_none_and_counts_all() -> None:
    written = compact(WorkflowStatus(steps=[step("a", [agent("a", 0), agent("a", 1)])]),
                      agent_limit=0)

    assert written["steps"][0]["agents"] == []
    assert written["steps"][0]["agentsOmitted"] == 2
    assert written["steps"][0]["agentCounts"] == {"Succeeded": 2}


def test_compacting_leaves_the_engines_status_whole() -> None:
    status = WorkflowStatus(steps=[step("big", [agent("big", i) for i in range(500)],
                                        message="x" * 5000)])

    compact(status)

    assert len(status.step("big").agents) == 500
    assert status.step("big").agent_counts is None
    assert status.step("big").message == "x" * 5000
    assert len(status.step("big").outputs or []) == 500


def test_a_long_failure_message_is_kept_whole_among_many_short_texts() -> None:
    steps = [StepStatus(name=f"s{k}", output=str(k)) for k in range(199)]
    steps.append(StepStatus(name="broken", phase=StepPhase.FAILED, message="why " * 250))

    written = compact(WorkflowStatus(steps=steps))

    assert written["steps"][-1]["message"] == ("why " * 250)[:SETTINGS.status_output_limit]
    assert [s.get("output") for s in written["steps"][:199]] == [str(k) for k in range(199)]


def test_long_texts_share_what_short_ones_leave() -> None:
    assert text_limit([10, 20, 1000, 1000], budget=1030) == 500
    assert text_limit([10, 20, 30], budget=1000) == 30  # all fit: none is cut
    assert text_limit([1024] * 200, budget=32 * 1024) == 163
    assert text_limit([], budget=100) == 0


def test_messages_are_cut_like_outputs_and_say_so() -> None:
    written = compact_status(WorkflowStatus(steps=[
        StepStatus(name="a", message="m" * 50, output="o" * 50)]), output_limit=10,
        agent_limit=100)

    assert written["steps"][0]["message"] == "m" * 10 + "..."
    assert written["steps"][0]["output"] == "o" * 10


# --- the status writer ------------------------------------------------------------------------


class FlakyServices:
    """What a StatusWriter uses of Services; ``patch_status`` raises each of ``failures`` once,
    in turn, then works."""

    def __init__(self, *failures: BaseException) -> None:
        self.settings = Settings(status_interval_seconds=0)
        self.failures = list(failures)
        self.patched: list[dict[str, Any]] = []
        self.urgencies: list[Urgency] = []
        self.running = 0

    def status_interval(self) -> float:
        return 0.0

    def workflow_phase(self, uid: str, phase: WorkflowPhase | None) -> None:
        pass

    async def patch_status(self, plural: str, namespace: str, name: str,
                           status: dict[str, Any] | Callable[[], dict[str, Any] | None],
                           urgency: Urgency = Urgency.LAST_WORD) -> None:
        if self.failures:
            raise self.failures.pop(0)
        made = status() if callable(status) else status
        if made is not None:  # as Services: None is no write
            self.patched.append(made)
            self.urgencies.append(urgency)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


@pytest.mark.parametrize("failure", [
    RuntimeError("something no one expected"), TypeError("not JSON serializable"),
    ConnectionResetError(104, "reset")])
def test_status_writer_logs_a_write_that_raises_anything_and_writes_the_next(
        caplog: pytest.LogCaptureFixture, failure: Exception) -> None:
    services = FlakyServices(failure)

    async def run() -> None:
        writer = StatusWriter(services, "team", "wf", "uid-1")  # type: ignore[arg-type]
        writer.start()
        writer(Event(EventKind.WORKFLOW_STARTED, "started"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING))
        await until(lambda: not services.failures)  # the first write has failed
        writer(Event(EventKind.WORKFLOW_FINISHED, "done"),
               WorkflowStatus(phase=WorkflowPhase.SUCCEEDED))
        await until(lambda: bool(services.patched))  # the writer wrote on
        await writer.stop()

    with caplog.at_level(logging.ERROR, logger="controller.handlers.reporting"):
        asyncio.run(run())

    assert services.patched[0]["phase"] == "Succeeded"
    assert services.patched[-1]["phase"] == "Succeeded"  # the final write, by stop()
    assert "status of wf: the write failed unexpectedly" in caplog.text


def test_a_runs_first_status_then_its_progress_then_its_last_word_are_told_apart() -> None:
    services = FlakyServices()

    async def run() -> None:
        writer = StatusWriter(services, "team", "wf", "uid-1")  # type: ignore[arg-type]
        writer.start()
        writer(Event(EventKind.WORKFLOW_STARTED, "started"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING))
        await until(lambda: len(services.patched) == 1)
        writer(Event(EventKind.STEP_STARTED, "step a started"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING, progress="0/1"))
        await until(lambda: len(services.patched) == 2)
        writer(Event(EventKind.WORKFLOW_FINISHED, "done"),
               WorkflowStatus(phase=WorkflowPhase.SUCCEEDED))
        await writer.stop()

    asyncio.run(run())

    assert services.urgencies[:2] == [Urgency.FIRST, Urgency.PROGRESS]
    assert services.urgencies[-1] is Urgency.LAST_WORD


def test_a_status_without_a_message_removes_the_one_the_resource_had() -> None:
    """A merge patch keeps what it does not name: a retried workflow's "retrying ..." would
    stay on it once the run succeeded."""
    services = FlakyServices()

    async def run() -> None:
        writer = StatusWriter(services, "team", "wf", "uid-1")  # type: ignore[arg-type]
        writer.follow(WorkflowStatus(phase=WorkflowPhase.SUCCEEDED))
        await writer.stop()

    asyncio.run(run())

    assert services.patched[-1]["message"] is None


def test_a_run_that_never_began_writes_no_status_over_the_resources() -> None:
    """A run whose store was away as it read what was done has begun nothing: its empty status
    (Pending, no steps) written as its last word would put a running workflow's back, its
    conditions gone, until the store came back."""
    services = FlakyServices()

    async def run() -> None:
        writer = StatusWriter(services, "team", "wf", "uid-1")  # type: ignore[arg-type]
        writer.follow(WorkflowStatus())
        writer.start()
        await writer.stop()

    asyncio.run(run())

    assert services.patched == []


class PacedServices(FlakyServices):
    """Writes a running workflow's status ``interval`` seconds after a change at most (a tenth
    of one), or ``loaded`` seconds apart when so many run."""

    def __init__(self, interval: float = 0.1, loaded: float | None = None) -> None:
        super().__init__()
        self.settings = Settings(status_interval_seconds=interval)
        self.loaded = interval if loaded is None else loaded

    def status_interval(self) -> float:
        return self.loaded


def test_changes_that_come_in_one_moment_make_one_write_and_a_run_ending_in_it_none() -> None:
    """The run's start is written a moment after it came; the changes of the next moment (an
    agent created, running, ended) make one write, with the last of them; a change followed by
    the end of the run within the moment is written only by the final status."""
    services = PacedServices()

    async def run() -> None:
        writer = await running_writer(services)
        for message in ("created", "running", "ended"):
            writer(Event(EventKind.AGENT_STARTED, message),
                   WorkflowStatus(phase=WorkflowPhase.RUNNING, message=message))
            await asyncio.sleep(0.01)
        await until(lambda: len(services.patched) == 2)
        await asyncio.sleep(0.25)  # nothing more changed: nothing more is written
        assert len(services.patched) == 2
        writer(Event(EventKind.STEP_FINISHED, "step done"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING, message="step done"))
        await asyncio.sleep(0.02)
        writer(Event(EventKind.WORKFLOW_FINISHED, "done"),
               WorkflowStatus(phase=WorkflowPhase.SUCCEEDED, message="done"))
        await writer.stop()

    asyncio.run(run())

    assert [patch.get("message") for patch in services.patched] == [None, "ended", "done"]
    assert services.urgencies == [Urgency.FIRST, Urgency.PROGRESS, Urgency.LAST_WORD]


def test_under_load_a_run_shows_its_start_at_once_and_a_short_agent_only_with_its_end() -> None:
    """The start is written the configured moment after it came, whatever the load; a later
    change (after a quiet while) waits the longer interval of the load, so that an agent
    created, run and ended within it is written once, by the final status."""
    services = PacedServices(interval=0.05, loaded=0.3)  # so many run: writes 0.3 s apart

    async def run() -> float:
        began = asyncio.get_running_loop().time()
        writer = await running_writer(services)
        shown = asyncio.get_running_loop().time() - began
        await asyncio.sleep(0.35)  # the agent waits for its turn: no change for a while
        writer(Event(EventKind.AGENT_STARTED, "created"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING, message="created"))
        await asyncio.sleep(0.15)  # within the interval of the load: nothing written yet
        assert len(services.patched) == 1
        writer(Event(EventKind.WORKFLOW_FINISHED, "done"),
               WorkflowStatus(phase=WorkflowPhase.SUCCEEDED, message="done"))
        await until(lambda: len(services.patched) == 2, timeout=0.15)  # at once
        await writer.stop()
        return shown

    shown = asyncio.run(run())

    assert shown < 0.25  # the configured moment, not the interval of the load
    assert [patch.get("message") for patch in services.patched] == [None, "done"]
    assert services.urgencies == [Urgency.FIRST, Urgency.LAST_WORD]


async def running_writer(services: FlakyServices) -> StatusWriter:
    """A started writer whose run has begun, its first status (Running) written, the status
    interval after the start."""
    writer = StatusWriter(services, "team", "wf", "uid-1")  # type: ignore[arg-type]
    writer.start()
    writer(Event(EventKind.WORKFLOW_STARTED, "started"),
           WorkflowStatus(phase=WorkflowPhase.RUNNING))
    await until(lambda: len(services.patched) == 1)
    return writer


def test_the_final_status_cuts_short_the_wait_of_a_change_before_it() -> None:
    """A change waits the status interval to be written with those that follow, the run's
    start too; the final status that follows is written at once, saying them all, as the one
    write (the interval here: a minute)."""
    services = PacedServices(interval=60, loaded=0.1)

    async def run() -> None:
        writer = StatusWriter(services, "team", "wf", "uid-1")  # type: ignore[arg-type]
        writer.start()
        writer(Event(EventKind.WORKFLOW_STARTED, "started"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING))
        writer(Event(EventKind.AGENT_FINISHED, "ended"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING, message="ended"))
        await asyncio.sleep(0.05)
        assert services.patched == []
        writer(Event(EventKind.WORKFLOW_FINISHED, "done"),
               WorkflowStatus(phase=WorkflowPhase.SUCCEEDED, message="done"))
        await until(lambda: len(services.patched) == 1, timeout=2)  # not a minute later
        await writer.stop()

    asyncio.run(run())

    assert [patch.get("message") for patch in services.patched] == ["done"]
    assert services.urgencies == [Urgency.LAST_WORD]


def test_a_status_the_api_server_already_took_is_not_written_again() -> None:
    """A progress write that, waiting for its turn, came to carry the final status makes the
    final write idle; so does any event that changed nothing the status shows."""
    services = FlakyServices()

    async def run() -> None:
        writer = await running_writer(services)
        writer(Event(EventKind.AGENT_STARTED, "nothing shown changed"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING))
        await asyncio.sleep(0.1)
        writer(Event(EventKind.WORKFLOW_FINISHED, "done"),
               WorkflowStatus(phase=WorkflowPhase.SUCCEEDED))
        await until(lambda: len(services.patched) == 2)  # the loop wrote the final status
        await writer.stop()

    asyncio.run(run())

    assert [patch["phase"] for patch in services.patched] == ["Running", "Succeeded"]


def test_a_final_status_whose_progress_write_failed_is_still_written() -> None:
    services = FlakyServices()

    async def run() -> None:
        writer = await running_writer(services)
        services.failures.append(ConnectionResetError(104, "reset"))
        writer(Event(EventKind.WORKFLOW_FINISHED, "done"),
               WorkflowStatus(phase=WorkflowPhase.SUCCEEDED))
        await until(lambda: not services.failures)  # the loop's write of it failed
        await writer.stop()

    asyncio.run(run())

    assert [patch["phase"] for patch in services.patched] == ["Running", "Succeeded"]


def test_status_writer_is_still_stopped_by_cancellation() -> None:
    class Hanging(FlakyServices):
        async def patch_status(self, plural: str, namespace: str, name: str,
                               status: dict[str, Any],
                               urgency: Urgency = Urgency.LAST_WORD) -> None:
            await asyncio.Event().wait()

    async def run() -> set[str]:
        writer = StatusWriter(Hanging(), "team", "wf", "uid-1")  # type: ignore[arg-type]
        writer.start()
        writer(Event(EventKind.WORKFLOW_STARTED, "started"), WorkflowStatus())
        await asyncio.sleep(0.05)
        writer.abandon()
        await asyncio.sleep(0.05)
        return {task.get_name() for task in asyncio.all_tasks()}

    assert "status-wf" not in asyncio.run(run())


def test_a_run_restored_as_finished_gets_its_final_status_written_without_any_event() -> None:
    """A run that ended while the API server was away is found finished by the next daemon: it
    has nothing to say, yet its final status must land (else the resource says Running)."""
    services = FlakyServices()

    async def run() -> None:
        writer = StatusWriter(services, "team", "wf", "uid-1")  # type: ignore[arg-type]
        writer.follow(WorkflowStatus(phase=WorkflowPhase.SUCCEEDED, progress="6/6"))
        writer.start()
        await writer.stop()

    asyncio.run(run())

    assert [(s["phase"], s["progress"]) for s in services.patched] == [("Succeeded", "6/6")]


def test_the_status_written_is_read_back_as_the_last_known_status() -> None:
    """What a run resumes from when its store lost it: the status as written, read back; one
    that cannot be read (edited by hand) is none, never a crash."""
    import kopf

    from controller.handlers.reporting import last_known_status

    status = WorkflowStatus(phase=WorkflowPhase.RUNNING, started_at=AT, progress="2/3", steps=[
        step("map", [agent("map", 0), agent("map", 1)]),
        step("reduce", [agent("reduce", 0, AgentPhase.RUNNING)])])
    status.steps[0].phase = StepPhase.SUCCEEDED
    status.steps[0].output = '["a", "b"]'
    written = compact(status)

    def body(status: Any) -> kopf.Body:
        return kopf.Body({"metadata": {"name": "w"}, "status": status})

    known = last_known_status(body(written))
    assert known is not None
    assert known.started_at == AT and known.progress == "2/3"
    assert known.step("map").phase is StepPhase.SUCCEEDED
    assert known.step("map").output == '["a", "b"]'
    assert [a.phase for a in known.step("reduce").agents] == [AgentPhase.RUNNING]
    assert last_known_status(body({})) is None
    assert last_known_status(body({"phase": "Sideways", "steps": "?"})) is None


def test_a_retried_status_is_running_again_with_the_steps_to_run_pending_and_history_kept(
) -> None:
    agents = [{"id": f"fan.{i}.{a}", "name": f"n{i}{a}", "index": i, "attempt": a,
               "phase": phase} for i, a, phase in [(0, 1, "Succeeded"), (1, 1, "Failed"),
                                                   (1, 2, "Failed")]]
    status = {"phase": "Failed", "finishedAt": "t", "message": "step fan failed", "retries": 1,
              "steps": [{"name": "first", "phase": "Succeeded", "output": "x"},
                        {"name": "fan", "phase": "Failed", "attempts": 3, "agents": agents,
                         "message": "agent n12 failed", "finishedAt": "t"},
                        {"name": "last", "phase": "Skipped", "message": "not started"}]}
    patch = retried_status(status, ["fan", "last"], "r2")
    assert (patch["phase"], patch["finishedAt"], patch["retried"], patch["retries"]) == (
        "Running", None, "r2", 2)  # None: a merge patch removes finishedAt
    first, fan, last = patch["steps"]
    assert first == status["steps"][0]
    assert fan == {"name": "fan", "phase": "Pending", "agents": agents, "attempts": 3,
                   "attemptsBeforeRetry": 2}
    assert last == {"name": "last", "phase": "Pending", "agents": [], "attempts": 0}
    (succeeded,) = patch["conditions"]
    assert (succeeded["type"], succeeded["status"], succeeded["reason"]) == (
        "Succeeded", "Unknown", "Retrying")


def test_a_refused_workflow_is_completed_and_did_not_succeed() -> None:
    conditions = {c["type"]: (c["status"], c["reason"]) for c in refused_status(
        ConditionType.INVALID, "spec.steps[0]: bad", 1)["conditions"]}
    assert conditions == {"Invalid": ("True", "Invalid"), "Completed": ("True", "Invalid"),
                          "Succeeded": ("False", "Invalid")}
