"""The workflow engine on a fake backend with the in-memory store: scheduling, fan-out, retries,
timeouts, fail-fast, cancellation, cleanup, templates, and resuming after a restart.

Agents are scripted (``tests/unit/fake_backend.py``) to run for milliseconds, so what the
integration tests prove on real Docker in seconds is proven here in a blink; the tests of
``timeoutSeconds`` (whole seconds by the schema) give the engine a fifth of one
(:func:`with_quick_timeouts`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from controller.agents import build_agent_spec
from controller.backends.base import LABEL_STEP, LABEL_WORKFLOW_UID, AgentHandle, AgentSpec
from controller.config import Settings
from controller.engine import Engine, WorkflowRun, attempts
from controller.engine.events import Event, EventKind
from controller.engine.run import MAX_UNCOUNTED_ATTEMPTS
from controller.errors import BackendError, ImageNotFoundError
from controller.models import (
    AgentPhase,
    AgentReason,
    StepPhase,
    Workflow,
    WorkflowPhase,
    WorkflowStatus,
    parse_workflow,
)
from controller.store import Change, MemoryStore
from tests.conftest import workflow_doc
from tests.unit.fake_backend import KILLED, Behaviour, FakeAgent, FakeBackend, Script, succeed

SETTINGS = Settings.from_env({}, store="memory", stop_grace_seconds=0)
LIMIT_SECONDS = 10
"""No scenario takes this long; an engine that hangs fails the test instead of stalling it."""

T = TypeVar("T")


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def short_retry_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls that fail for now are made again after 20 ms, not half a second: the same
    doubling, in a blink."""
    monkeypatch.setattr(attempts, "FIRST_RETRY_PAUSE_SECONDS", 0.02)


def step_of(spec: AgentSpec) -> str:
    return spec.labels[LABEL_STEP]


def index_of(spec: AgentSpec) -> int:
    return int(spec.env["AGENTAINER_ITEM_INDEX"])


def attempt_of(spec: AgentSpec) -> int:
    return int(spec.env["AGENTAINER_ATTEMPT"])


def by_step(behaviours: dict[str, Behaviour]) -> Script:
    """Every agent of a step does the same; steps not named succeed at once."""
    return lambda spec: behaviours.get(step_of(spec), Behaviour())


def with_uid(document: dict[str, Any]) -> dict[str, Any]:
    """The document with a uid of its own, as the cluster gives every resource."""
    document["metadata"]["uid"] = str(uuid.uuid4())
    return document


def new_run(document: dict[str, Any] | Workflow, fake: FakeBackend,
            store: MemoryStore) -> WorkflowRun:
    workflow = document if isinstance(document, Workflow) else parse_workflow(document)
    return Engine(fake, store, SETTINGS).prepare(workflow)


QUICK_TIMEOUT = 0.2
"""Seconds: a timeout shorter than the schema's whole seconds. The engine takes any number, so
its timeout tests need not wait a second each; the tests on real Docker use whole seconds."""
quick_timeouts = pytest.mark.filterwarnings(  # the spec, stored, says its int is a float
    "ignore:Pydantic serializer warnings:UserWarning")


def with_quick_timeouts(document: dict[str, Any]) -> Workflow:
    """``document`` parsed, with its timeouts (the workflow's, its steps') of 1 s made
    QUICK_TIMEOUT."""
    workflow = parse_workflow(document)
    spec = workflow.spec
    quick: dict[str, Any] = {"timeout_seconds": QUICK_TIMEOUT}
    update: dict[str, Any] = {"steps": [step.model_copy(update=quick)
                                        if step.timeout_seconds == 1 else step
                                        for step in spec.steps]}
    if spec.timeout_seconds == 1:
        update |= quick
    return workflow.model_copy(update={"spec": spec.model_copy(update=update)})


def scenario(coroutine: Coroutine[Any, Any, T]) -> T:
    """Play a scenario in an event loop of its own, within ``LIMIT_SECONDS``."""
    return asyncio.run(asyncio.wait_for(coroutine, LIMIT_SECONDS))


def run(document: dict[str, Any] | Workflow,
        script: Script = succeed) -> tuple[WorkflowStatus, FakeBackend]:
    """Run a workflow to its end on a fresh fake backend and store."""
    fake = FakeBackend(script)
    return scenario(new_run(document, fake, MemoryStore()).execute()), fake


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the fake never got there"
        await asyncio.sleep(0.001)


async def detached_once(run: WorkflowRun, condition: Callable[[], bool]) -> WorkflowStatus:
    """Run ``run`` until ``condition`` holds, then let it go as a stopping controller does:
    its agents run on, for a later run to adopt. Its status as it was let go."""
    execution = asyncio.ensure_future(run.execute())
    await until(condition)
    run.detach()
    await execution
    return run.status


def map_reduce_aside() -> dict[str, Any]:
    """A fan-out over two words, a step that reads all their outputs, and one that reads none."""
    return with_uid(workflow_doc(
        {"name": "map", "parallel": {"items": ["a", "b"]},
         "env": [{"name": "WORD", "value": "{{ item }}"}]},
        {"name": "reduce", "env": [{"name": "ALL", "value": "{{ steps.map.outputs }}"}]},
        {"name": "aside", "dependsOn": ["map"]}))


def only(agents: list[FakeAgent]) -> FakeAgent:
    assert len(agents) == 1, agents
    return agents[0]


def interval(agent: FakeAgent) -> tuple[float, float]:
    assert agent.started_at is not None and agent.finished_at is not None
    return agent.started_at, agent.finished_at


# --- the DAG --------------------------------------------------------------------------------------


def test_steps_wait_for_their_dependencies_and_independent_branches_run_at_once() -> None:
    status, fake = run(workflow_doc(
        {"name": "root"},
        {"name": "left", "dependsOn": ["root"]},
        {"name": "right", "dependsOn": ["root"]},
        {"name": "join", "dependsOn": ["left", "right"]},
    ), by_step({"root": Behaviour(0.02), "left": Behaviour(0.03), "right": Behaviour(0.06)}))

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.progress == "4/4"
    root = interval(only(fake.starts("root")))
    left = interval(only(fake.starts("left")))
    right = interval(only(fake.starts("right")))
    join = interval(only(fake.starts("join")))
    assert root[1] <= min(left[0], right[0])
    assert left[0] < right[1] and right[0] < left[1]  # the branches ran at the same time
    assert join[0] >= max(left[1], right[1])


def test_steps_without_depends_on_run_one_after_the_other() -> None:
    status, fake = run(workflow_doc({"name": "one"}, {"name": "two"}, {"name": "three"}),
                       lambda spec: Behaviour(0.01))

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert [a.step for a in fake.starts()] == ["one", "two", "three"]
    assert fake.most_at_once() == 1


def test_templates_give_a_later_step_the_output_and_outputs_of_earlier_steps() -> None:
    def agent(spec: AgentSpec) -> Behaviour:
        if step_of(spec) == "first":
            return Behaviour(stdout="  one\n")  # an output is the trimmed stdout
        if step_of(spec) == "fan":
            return Behaviour(stdout=f"{spec.env['AGENTAINER_ITEM']}!\n")
        return Behaviour(stdout=spec.env["MESSAGE"] + "\n")

    status, fake = run(workflow_doc(
        {"name": "first"},
        {"name": "fan", "parallel": {"items": ["a", "b", "c"]}},
        {"name": "last", "dependsOn": ["first", "fan"],
         "env": [{"name": "MESSAGE",
                  "value": "{{ steps.first.output }} {{ steps.fan.outputs }}"}],
         "args": ["{{ steps.first.output }}"]},
    ), agent)

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("first").output == "one"
    assert status.step("last").output == 'one ["a!", "b!", "c!"]'
    assert only(fake.starts("last")).spec.args == ["one"]


# --- fan-out --------------------------------------------------------------------------------------


def test_fan_out_over_items_runs_one_agent_per_item_and_keeps_outputs_in_item_order() -> None:
    items = ["apple", "banana", "cherry", "date"]

    def agent(spec: AgentSpec) -> Behaviour:  # the first item finishes last
        return Behaviour(0.02 * (len(items) - index_of(spec)),
                         stdout=spec.env["AGENTAINER_ITEM"].upper())

    status, fake = run(workflow_doc({"name": "fan", "parallel": {"items": items}}), agent)

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert status.step("fan").outputs == ["APPLE", "BANANA", "CHERRY", "DATE"]
    assert sorted(a.spec.env["AGENTAINER_ITEM"] for a in fake.starts("fan")) == sorted(items)
    assert len({a.name for a in fake.starts("fan")}) == 4
    finished = sorted(fake.starts("fan"), key=lambda a: a.finished_at or 0)
    assert finished[0].spec.env["AGENTAINER_ITEM"] == "date"  # order is not finishing order
    assert status.progress == "4/4"


@pytest.mark.parametrize(("max_workers", "at_once"), [(None, 6), (2, 2), (1, 1)])
def test_max_workers_bounds_how_many_agents_of_a_fan_out_run_at_once(
        max_workers: int | None, at_once: int) -> None:
    parallel: dict[str, Any] = {"replicas": 6}
    if max_workers is not None:
        parallel["maxWorkers"] = max_workers

    status, fake = run(workflow_doc({"name": "fan", "parallel": parallel}),
                       lambda spec: Behaviour(0.05, stdout=str(index_of(spec))))

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert status.step("fan").outputs == ["0", "1", "2", "3", "4", "5"]
    assert status.step("fan").output == '["0", "1", "2", "3", "4", "5"]'
    assert len(fake.starts("fan")) == 6
    assert fake.most_at_once("fan") == at_once


# --- retries --------------------------------------------------------------------------------------


def test_failing_agent_is_retried_as_new_agents_after_growing_delays_until_it_succeeds() -> None:
    def flaky(spec: AgentSpec) -> Behaviour:
        attempt = attempt_of(spec)
        if attempt < 3:
            return Behaviour(exit_code=3, stderr="boom\n")
        return Behaviour(stdout=f"attempt {attempt}")

    status, fake = run(workflow_doc(
        {"name": "flaky", "retries": {"limit": 3, "backoffSeconds": 0.02, "backoffFactor": 3}},
    ), flaky)

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    step = status.step("flaky")
    assert step.output == "attempt 3"
    assert step.attempts == 3
    assert [(a.attempt, a.exit_code, a.phase) for a in step.agents] == [
        (1, 3, AgentPhase.FAILED), (2, 3, AgentPhase.FAILED), (3, 0, AgentPhase.SUCCEEDED)]
    first, second, third = fake.starts("flaky")
    assert [a.attempt for a in (first, second, third)] == [1, 2, 3]
    assert len({first.name, second.name, third.name}) == 3  # each attempt a new agent
    assert interval(second)[0] - interval(first)[1] >= 0.02 - 0.001
    assert interval(third)[0] - interval(second)[1] >= 0.06 - 0.001  # 0.02 * 3
    # OnSuccess keeps the failed attempts for debugging.
    assert {a.name for a in fake.held()} == {first.name, second.name}


def test_each_retry_of_a_fan_out_names_the_agent_that_failed_and_its_own_failure() -> None:
    """Agents of a fan-out fail while others start: each retry's event is of the agent that
    failed, and says its failure (it named whichever agent had started last, with the step's
    latest message)."""
    retries: list[tuple[str, int, str]] = []

    def observe(event: Event, status: WorkflowStatus) -> None:
        if event.kind is EventKind.AGENT_RETRYING and event.agent is not None:
            retries.append((event.agent.name, event.agent.index, event.message))

    def script(spec: AgentSpec) -> Behaviour:
        index = index_of(spec)
        return Behaviour(0.002 * (index % 4), exit_code=index + 1 if attempt_of(spec) == 1
                         and index % 2 == 0 else 0)

    workflow = parse_workflow(workflow_doc(
        {"name": "fan", "parallel": {"replicas": 12, "maxWorkers": 5},
         "retries": {"limit": 1, "backoffSeconds": 0}}))
    run = Engine(FakeBackend(script), MemoryStore(), SETTINGS).prepare(workflow, observe)
    status = scenario(run.execute())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert sorted(index for _, index, _ in retries) == [0, 2, 4, 6, 8, 10]
    for name, index, message in retries:
        assert message.startswith(f"agent {name} failed (agent {name} exited with code "
                                  f"{index + 1}"), message


def test_a_fan_out_that_fails_says_the_failure_that_stopped_it_not_the_last_one() -> None:
    """The first agent's failure stops the fan-out (no new agent starts); agents already running
    end as they do, failing too here: the step and the workflow say the first."""
    status, _ = run(workflow_doc({"name": "fan", "parallel": {"replicas": 3}}), lambda spec: (
        Behaviour(exit_code=3, stderr="first\n") if index_of(spec) == 0 else
        Behaviour(0.05, exit_code=4, stderr="later\n")))

    assert status.phase is WorkflowPhase.FAILED
    assert "exited with code 3: first" in (status.step("fan").message or "")
    assert (status.message or "").startswith("step fan failed: agent ")
    assert "exited with code 3: first" in (status.message or "")


def test_agent_that_keeps_failing_fails_the_workflow_after_its_last_retry() -> None:
    status, fake = run(workflow_doc(
        {"name": "broken", "retries": {"limit": 2, "backoffSeconds": 0}},
        {"name": "after"},
    ), by_step({"broken": Behaviour(exit_code=7, stderr="warming up\nno such table\n")}))

    assert status.phase is WorkflowPhase.FAILED
    broken = status.step("broken")
    assert broken.phase is StepPhase.FAILED
    assert broken.attempts == 3
    assert [a.attempt for a in fake.starts("broken")] == [1, 2, 3]
    assert "exited with code 7: no such table" in (broken.message or "")
    assert (status.message or "").startswith("step broken failed: ")
    assert status.step("after").phase is StepPhase.SKIPPED
    assert fake.starts("after") == []


def test_agent_whose_image_is_missing_is_not_retried() -> None:
    def agent(spec: AgentSpec) -> Behaviour:
        return Behaviour(start_error=ImageNotFoundError("image 'ghost:1' is not there"))

    status, _ = run(workflow_doc({"name": "ghost", "retries": {"limit": 3, "backoffSeconds": 0}}),
                    agent)

    ghost = status.step("ghost")
    assert ghost.phase is StepPhase.FAILED
    assert ghost.attempts == 1
    assert "image 'ghost:1' is not there" in (ghost.message or "")


def test_a_start_that_fails_for_now_is_retried_as_the_same_agent_not_counted_as_its_failure(
) -> None:
    fake = FakeBackend(lambda spec: Behaviour(stdout="fine"))
    # The engine answered an error, but had created the container: the start must not be
    # repeated blindly (the name is taken), nor count as a failed attempt.
    fake.hiccups["start"] = [BackendError("the engine hung up")]
    fake.hiccups["wait"] = [BackendError("the engine restarted")]
    store = MemoryStore()
    status = scenario(new_run(workflow_doc({"name": "hiccup"}), fake, store).execute())

    hiccup = status.step("hiccup")
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert hiccup.attempts == 1 and hiccup.agents[0].reason is AgentReason.COMPLETED
    assert hiccup.output == "fine"
    assert len(fake.starts("hiccup")) == 1


def test_an_agent_that_exists_already_is_adopted_even_when_the_store_forgot_it() -> None:
    """The store lost its last second (a Redis restart): the agent's container is found by its
    name and labels, and adopted; it is never started a second time."""
    document = with_uid(workflow_doc({"name": "one"}))
    workflow = parse_workflow(document)
    fake = FakeBackend(lambda spec: Behaviour(0.05, stdout="from before"))

    async def play() -> WorkflowStatus:
        spec = build_agent_spec(workflow, workflow.metadata.uid or "", workflow.spec.steps[0],
                                0, 1, {})
        await fake.hold(spec)
        return await new_run(document, fake, MemoryStore()).execute()

    status = scenario(play())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("one").output == "from before"
    assert fake.starts("one") == []  # adopted, not started


def test_an_agent_lost_from_under_the_engine_is_retried_per_retries_and_says_why() -> None:
    fake = FakeBackend(lambda spec: Behaviour(0.15 if attempt_of(spec) == 1 else 0,
                                              stdout=f"attempt {attempt_of(spec)}"))

    async def play() -> WorkflowStatus:
        run = new_run(workflow_doc({"name": "evicted", "retries": {"limit": 1,
                                                                   "backoffSeconds": 0}}),
                      fake, MemoryStore())
        execution = asyncio.ensure_future(run.execute())
        while not fake.running():
            await asyncio.sleep(0.01)
        fake.lose(fake.running()[0])
        return await execution

    status = scenario(play())

    evicted = status.step("evicted")
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert evicted.output == "attempt 2"
    first = evicted.agents[0]
    assert first.reason is AgentReason.LOST and first.phase is AgentPhase.FAILED


def test_an_engine_away_longer_than_the_retry_window_lets_the_run_go_without_failing_it() -> None:
    settings = Settings.from_env({}, store="memory", stop_grace_seconds=0,
                                 backend_retry_seconds=0.3)
    fake = FakeBackend(lambda spec: Behaviour(stdout="fine"))
    fake.hiccups["wait"] = [BackendError("the engine is down")] * 10

    async def play() -> WorkflowRun:
        run = Engine(fake, MemoryStore(), settings).prepare(
            parse_workflow(workflow_doc({"name": "one"})))
        with pytest.raises(BackendError, match="the engine is down"):
            await run.execute()
        return run

    run = scenario(play())

    assert run.detached  # not failed: whoever resumes it goes on
    assert run.status.step("one").phase is not StepPhase.FAILED
    assert [a.phase for a in run.status.step("one").agents] == [AgentPhase.RUNNING]


# --- timeouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 2])
def test_an_agent_the_engine_stopped_as_it_shut_down_runs_again_without_using_a_retry(
        retries: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker, restarted with live-restore, may stop the containers it finds starting: the
    agent did not fail, so it runs again whatever its retries, and says why."""
    monkeypatch.setattr("controller.engine.run.UNCOUNTED_PAUSE_SECONDS", 0.01)
    document = with_uid(workflow_doc({"name": "only", "retries": {"limit": retries,
                                                                  "backoffSeconds": 1}}))
    document["spec"]["steps"][0] = {k: v for k, v in document["spec"]["steps"][0].items()
                                    if retries or k != "retries"}
    status, fake = run(document, lambda spec: Behaviour(
        exit_code=143 if attempt_of(spec) == 1 else 0, interrupted=attempt_of(spec) == 1,
        stdout="done"))

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    agents = status.step("only").agents
    assert [(a.attempt, a.reason) for a in agents] == [
        (1, AgentReason.INTERRUPTED), (2, AgentReason.COMPLETED)]
    assert status.step("only").output == "done"


def test_an_engine_that_stops_an_agent_again_and_again_fails_the_step_in_the_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.engine.run.UNCOUNTED_PAUSE_SECONDS", 0.01)
    status, fake = run(with_uid(workflow_doc({"name": "only"})),
                       lambda spec: Behaviour(exit_code=143, interrupted=True))

    assert status.phase is WorkflowPhase.FAILED
    agents = status.step("only").agents
    assert len(agents) == MAX_UNCOUNTED_ATTEMPTS + 1
    assert {a.reason for a in agents} == {AgentReason.INTERRUPTED}
    assert "stopped by its container engine" in (status.step("only").message or "")


@quick_timeouts
def test_attempt_past_its_timeout_is_killed_with_reason_deadline_exceeded() -> None:
    began = time.monotonic()
    status, fake = run(with_quick_timeouts(workflow_doc(
        {"name": "slow", "timeoutSeconds": 1}, cleanup="Never")), lambda spec: Behaviour(60))

    assert time.monotonic() - began < 10  # killed, not left to run its 60 s
    assert status.phase is WorkflowPhase.FAILED
    slow = status.step("slow")
    assert slow.agents[0].reason is AgentReason.DEADLINE_EXCEEDED
    assert slow.agents[0].exit_code == KILLED
    assert f"ran past timeoutSeconds ({QUICK_TIMEOUT}) and was killed" in (slow.message or "")
    agent = only(fake.held())
    assert agent.killed and agent.state == "exited"
    assert QUICK_TIMEOUT <= interval(agent)[1] - interval(agent)[0] < 5


def test_agents_waiting_for_a_node_say_so_in_their_steps_message_until_none_does() -> None:
    """Pods no node has room for yet: while they wait their step's message says why, and how
    many more of its agents wait; it is cleared once none does, and the run goes on."""
    why = "no node takes its pod yet: 0/1 nodes are available: 1 Insufficient cpu."
    seen: list[tuple[str, str | None]] = []

    def observe(event: Event, status: WorkflowStatus) -> None:
        if event.kind is EventKind.AGENT_WAITING:
            seen.append((event.message, status.step("wide").message))

    fake = FakeBackend(lambda spec: Behaviour(0.04 + 0.08 * index_of(spec), waits_for=why))
    document = with_uid(workflow_doc({"name": "wide", "parallel": {"replicas": 2}}))
    status = scenario(Engine(fake, MemoryStore(), SETTINGS).prepare(
        parse_workflow(document), observe).execute())

    assert status.phase is WorkflowPhase.SUCCEEDED
    first, second = (f"agent {agent.name} waits: {why}" for agent in status.step("wide").agents)
    assert seen == [(first, first),
                    (second, f"{first} (and 1 more agents of the step wait)"),
                    ("", second),  # the first no longer waits
                    ("", None)]
    assert status.step("wide").message is None


@quick_timeouts
def test_workflow_past_its_timeout_fails_and_its_running_agents_are_stopped() -> None:
    status, fake = run(with_quick_timeouts(workflow_doc(
        {"name": "forever", "parallel": {"replicas": 2}},
        {"name": "later"},
        timeoutSeconds=1, cleanup="OnSuccess",
    )), lambda spec: Behaviour(60))

    assert status.phase is WorkflowPhase.FAILED
    assert status.message == f"workflow exceeded its timeoutSeconds ({QUICK_TIMEOUT})"
    assert status.conditions[0].reason == "DeadlineExceeded"
    assert status.step("forever").phase is StepPhase.FAILED
    assert {a.reason for a in status.step("forever").agents} == {AgentReason.DEADLINE_EXCEEDED}
    assert status.step("later").phase is StepPhase.SKIPPED
    assert fake.starts("later") == []
    assert fake.running() == []
    assert len(fake.held("forever")) == 2  # OnSuccess keeps them for debugging, stopped
    assert all(a.killed for a in fake.held())


# --- fail fast ------------------------------------------------------------------------------------


def test_failed_step_fails_the_workflow_and_its_dependents_never_start() -> None:
    status, fake = run(workflow_doc(
        {"name": "prepare"},
        {"name": "crash"},  # depends on prepare, as the step before
        {"name": "after"},  # depends on crash
        {"name": "side", "dependsOn": ["prepare"]},
        {"name": "late", "dependsOn": ["side"]},
        cleanup="Never",
    ), by_step({"crash": Behaviour(0.01, exit_code=1), "side": Behaviour(0.1, stdout="side")}))

    assert status.phase is WorkflowPhase.FAILED
    assert status.step("crash").phase is StepPhase.FAILED
    assert (status.message or "").startswith("step crash failed")
    # An independent step that was already running is allowed to finish ...
    assert status.step("side").phase is StepPhase.SUCCEEDED
    assert status.step("side").output == "side"
    assert not only(fake.starts("side")).killed
    # ... but nothing new starts: neither the dependent nor a step whose dependency succeeded.
    assert status.step("after").phase is StepPhase.SKIPPED
    assert "dependency crash did not succeed" in (status.step("after").message or "")
    assert status.step("late").phase is StepPhase.SKIPPED
    assert "step crash failed" in (status.step("late").message or "")
    assert fake.starts("after") == fake.starts("late") == []
    assert status.step("after").agents == status.step("late").agents == []


def test_fan_out_starts_no_new_agent_once_one_failed_and_lets_running_ones_finish() -> None:
    def agent(spec: AgentSpec) -> Behaviour:
        index = index_of(spec)
        if index == 0:
            return Behaviour(0.1, stdout="slow but fine")
        return Behaviour(0.01, exit_code=1 if index == 1 else 0)

    status, fake = run(workflow_doc(
        {"name": "fan", "parallel": {"replicas": 6, "maxWorkers": 2}}, cleanup="Never",
    ), agent)

    assert status.phase is WorkflowPhase.FAILED
    assert status.step("fan").phase is StepPhase.FAILED
    assert sorted(index_of(a.spec) for a in fake.starts("fan")) == [0, 1]
    running_one = next(a for a in fake.starts("fan") if index_of(a.spec) == 0)
    assert running_one.exit_code == 0 and not running_one.killed
    assert [a.phase for a in status.step("fan").agents] == [AgentPhase.SUCCEEDED,
                                                            AgentPhase.FAILED]


# --- cancellation ---------------------------------------------------------------------------------


def test_cancelling_a_run_stops_its_agents_and_ends_cancelled() -> None:
    document = workflow_doc(
        {"name": "busy", "parallel": {"replicas": 3}},
        {"name": "later"},
        cleanup="Always",
    )
    fake = FakeBackend(lambda spec: Behaviour(60))
    store = MemoryStore()

    async def go() -> tuple[WorkflowStatus, WorkflowRun]:
        run = new_run(document, fake, store)
        task = asyncio.create_task(run.execute())
        await until(lambda: len(fake.running()) == 3)
        run.cancel()
        return await task, run

    began = time.monotonic()
    status, run = scenario(go())

    assert time.monotonic() - began < 2
    assert status.phase is WorkflowPhase.CANCELLED
    assert status.step("busy").phase is StepPhase.CANCELLED
    assert {a.reason for a in status.step("busy").agents} == {AgentReason.CANCELLED}
    assert status.step("later").phase is StepPhase.SKIPPED
    assert "cancelled" in (status.step("later").message or "")
    assert all(a.killed for a in fake.starts("busy"))
    assert fake.running() == [] and fake.held() == []  # Always: stopped and removed
    assert fake.starts("later") == []
    recorded = asyncio.run(store.workflow(run.uid))
    assert recorded is not None and recorded.phase is WorkflowPhase.CANCELLED


# --- cleanup --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "kept"), [
    ("Always", set()),
    ("OnSuccess", {"bad"}),
    ("Never", {"good", "bad"}),
])
def test_cleanup_policy_decides_which_agents_are_left(policy: str, kept: set[str]) -> None:
    status, fake = run(workflow_doc(
        {"name": "good"},
        {"name": "bad", "dependsOn": []},
        cleanup=policy,
    ), by_step({"bad": Behaviour(exit_code=2)}))

    assert status.phase is WorkflowPhase.FAILED
    assert {a.step for a in fake.held()} == kept
    assert {a.step for a in fake.removed} == {"good", "bad"} - kept
    assert fake.running() == []


def test_removals_hold_up_neither_the_next_step_nor_the_outcome_but_the_run_waits_for_them(
        ) -> None:
    """A removal that takes its time: the next step starts meanwhile, and the run's outcome
    is out before it ends; the run itself returns only once every agent is removed."""
    removing = asyncio.Event()

    class SlowRemovals(FakeBackend):
        async def remove(self, agent: AgentHandle) -> None:
            await removing.wait()
            await super().remove(agent)

    fake = SlowRemovals()
    seen: list[tuple[EventKind, int]] = []

    def observer(event: Event, status: WorkflowStatus) -> None:
        seen.append((event.kind, len(fake.removed)))
        if event.kind is EventKind.WORKFLOW_FINISHED:
            removing.set()

    document = with_uid(workflow_doc({"name": "a"}, {"name": "b", "dependsOn": ["a"]},
                                     cleanup="Always"))
    status = scenario(Engine(fake, MemoryStore(), SETTINGS).prepare(
        parse_workflow(document), observer).execute())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert [step_of(agent.spec) for agent in fake.started] == ["a", "b"]
    assert (EventKind.WORKFLOW_FINISHED, 0) in seen  # out before any removal ended
    assert {step_of(agent.spec) for agent in fake.removed} == {"a", "b"}
    assert fake.held() == []


def test_a_removal_that_fails_unexpectedly_is_logged_and_the_outcome_stands(
        caplog: pytest.LogCaptureFixture) -> None:
    class BrokenRemovals(FakeBackend):
        async def remove(self, agent: AgentHandle) -> None:
            raise RuntimeError("something no one expected")

    with caplog.at_level(logging.ERROR, logger="controller.engine.attempts"):
        status = scenario(new_run(workflow_doc({"name": "a"}, cleanup="Always"),
                                  BrokenRemovals(), MemoryStore()).execute())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert "removing agent" in caplog.text and "failed unexpectedly" in caplog.text


# --- restarts -------------------------------------------------------------------------------------


async def let_go(run: WorkflowRun, task: asyncio.Task[WorkflowStatus], how: str) -> None:
    """The first process lets go of a run: it detaches, or its task is cancelled from outside
    (the process is going away)."""
    if how == "detach":
        run.detach()
        assert (await task).phase is WorkflowPhase.RUNNING  # left as it was, not cancelled
    else:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("how", ["detach", "cancel the task"])
def test_a_restarted_run_keeps_finished_steps_and_adopts_running_agents(how: str) -> None:
    document = with_uid(workflow_doc(
        {"name": "first"},
        {"name": "fan", "parallel": {"replicas": 3}},
        {"name": "last", "env": [{"name": "ALL",
                                  "value": "{{ steps.first.output }} {{ steps.fan.outputs }}"}]},
    ))

    def agent(spec: AgentSpec) -> Behaviour:
        if step_of(spec) == "first":
            return Behaviour(stdout="one")
        if step_of(spec) == "fan":  # agent 0 is done before the restart, 1 and 2 are not
            return Behaviour(0.01 if index_of(spec) == 0 else 0.2, stdout=str(index_of(spec)))
        return Behaviour(stdout=spec.env["ALL"])

    fake = FakeBackend(agent)
    store = MemoryStore()

    async def go() -> WorkflowStatus:
        first = new_run(document, fake, store)
        task = asyncio.create_task(first.execute())
        await until(lambda: [a.phase for a in first.status.step("fan").agents] == [
            AgentPhase.SUCCEEDED, AgentPhase.RUNNING, AgentPhase.RUNNING])
        await let_go(first, task, how)
        assert len(fake.running()) == 2 and not any(a.killed for a in fake.started)
        second = new_run(document, fake, store)
        assert second.uid == first.uid
        return await second.execute()

    status = scenario(go())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("first").output == "one"  # restored, not run again
    assert status.step("fan").outputs == ["0", "1", "2"]
    assert status.step("last").output == 'one ["0", "1", "2"]'
    assert [a.attempt for a in status.step("fan").agents] == [1, 1, 1]
    assert fake.starts_per_agent() == {"first.0.1": 1, "fan.0.1": 1, "fan.1.1": 1,
                                       "fan.2.1": 1, "last.0.1": 1}
    assert status.progress == "5/5"
    assert fake.held() == []  # OnSuccess: the adopted agents were removed too


def test_a_restarted_run_reads_agents_that_ended_unwatched_and_retries_the_failed_one() -> None:
    document = with_uid(workflow_doc(
        {"name": "fan", "parallel": {"replicas": 2}, "retries": {"limit": 1, "backoffSeconds": 0}},
    ))

    def agent(spec: AgentSpec) -> Behaviour:
        fails = index_of(spec) == 1 and attempt_of(spec) == 1
        return Behaviour(0.1, exit_code=1 if fails else 0, stdout=f"{index_of(spec)}")

    fake = FakeBackend(agent)
    store = MemoryStore()

    async def go() -> WorkflowStatus:
        first = new_run(document, fake, store)
        await detached_once(first, lambda: len(fake.running()) == 2)
        await until(lambda: fake.running() == [])  # both ended with nobody watching
        return await new_run(document, fake, store).execute()

    status = scenario(go())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("fan").outputs == ["0", "1"]
    assert fake.starts_per_agent() == {"fan.0.1": 1, "fan.1.1": 1, "fan.1.2": 1}
    assert [(a.id, a.phase) for a in status.step("fan").agents] == [
        ("fan.0.1", AgentPhase.SUCCEEDED), ("fan.1.1", AgentPhase.FAILED),
        ("fan.1.2", AgentPhase.SUCCEEDED)]


def test_an_agent_only_created_before_a_restart_is_replaced_by_one_that_runs() -> None:
    document = with_uid(workflow_doc({"name": "pull", "image": "big/image:1"}))
    fake = FakeBackend(lambda spec: Behaviour(start_seconds=60))  # a pull that never ends
    store = MemoryStore()

    async def go() -> WorkflowStatus:
        first = new_run(document, fake, store)
        await detached_once(first, lambda: [a.state for a in fake.held()] == ["created"])
        fake.script = lambda spec: Behaviour(stdout="pulled")
        return await new_run(document, fake, store).execute()

    status = scenario(go())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("pull").output == "pulled"
    assert [a.attempt for a in status.step("pull").agents] == [1]
    stale, fresh = fake.starts("pull")
    assert stale.name == fresh.name
    assert stale in fake.removed and stale.started_at is None  # removed, never ran
    assert fresh.exit_code == 0


def test_a_restarted_run_adopts_only_the_agents_of_its_own_workflow_uid() -> None:
    """A Workflow deleted and created again has the same name and another uid; the agents of
    the old one must not be taken for the new one's."""
    document = workflow_doc({"name": "fan", "parallel": {"replicas": 2}}, name="twice")
    document["metadata"]["uid"] = "new00000-uid"
    old = parse_workflow({**document, "metadata": {"name": "twice", "uid": "old00000-uid"}})
    fake = FakeBackend(lambda spec: Behaviour(0.1, stdout=f"new {index_of(spec)}"))
    store = MemoryStore()

    async def go() -> WorkflowStatus:
        for index in (0, 1):
            spec = build_agent_spec(old, "old00000-uid", old.spec.steps[0], index, 1, {})
            await fake.hold(spec, Behaviour(0.1, stdout=f"old {index}"))
        first = new_run(document, fake, store)
        await detached_once(first, lambda: len(fake.running()) == 4)
        return await new_run(document, fake, store).execute()

    status = scenario(go())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("fan").outputs == ["new 0", "new 1"]
    assert fake.starts_per_agent() == {"fan.0.1": 1, "fan.1.1": 1}
    old_agents = [a for a in fake.agents.values()
                  if a.spec.labels[LABEL_WORKFLOW_UID] == "old00000-uid"]
    assert [a.stdout for a in old_agents] == ["old 0", "old 1"]  # left alone to finish
    assert not any(a.killed for a in old_agents)


def test_running_a_finished_workflow_again_starts_nothing_and_reports_its_outcome() -> None:
    document = with_uid(workflow_doc({"name": "only"}))
    fake = FakeBackend(lambda spec: Behaviour(stdout="done"))
    store = MemoryStore()

    async def go() -> tuple[WorkflowStatus, WorkflowStatus]:
        once = await new_run(document, fake, store).execute()
        return once, await new_run(document, fake, store).execute()

    once, again = scenario(go())

    assert once.phase is again.phase is WorkflowPhase.SUCCEEDED
    assert again.step("only").output == "done"
    assert again.finished_at == once.finished_at
    assert len(fake.started) == 1


def test_a_restarted_run_goes_on_with_the_spec_it_started_with() -> None:
    """The resource's spec changed while no one watched (a controller down): the run still
    runs the spec it started with, and reports that spec's generation."""
    old = with_uid(workflow_doc(
        {"name": "fan", "parallel": {"items": ["a", "b"]},
         "env": [{"name": "WORD", "value": "old {{ item }}"}]}))
    old["metadata"]["generation"] = 1
    new = {**old, "metadata": {**old["metadata"], "generation": 2},
           "spec": workflow_doc({"name": "fan", "parallel": {"items": ["x", "y", "z"]},
                                 "env": [{"name": "WORD", "value": "new"}]})["spec"]}
    fake = FakeBackend(lambda spec: Behaviour(0.1 if spec.env["WORD"].endswith("b") else 0,
                                              stdout=spec.env["WORD"]))
    store = MemoryStore()

    async def play() -> WorkflowStatus:
        first = new_run(old, fake, store)
        await detached_once(first, lambda: first.status.progress == "1/2")
        return await new_run(new, fake, store).execute()

    status = scenario(play())

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("fan").outputs == ["old a", "old b"]
    assert status.observed_generation == 1
    assert [a.spec.env["WORD"] for a in fake.started] == ["old a", "old b"]


def test_an_output_lost_from_the_store_fails_the_step_that_reads_it_loudly() -> None:
    """Never an empty string in its place: the step that needs it fails, saying why; a step
    that does not read it still runs."""
    from controller.store import Keys

    document = map_reduce_aside()
    fake = FakeBackend(lambda spec: Behaviour(0.15 if step_of(spec) == "reduce" else 0,
                                              stdout=spec.env.get("WORD", "x")))
    store = MemoryStore()

    async def play() -> WorkflowStatus:
        first = new_run(document, fake, store)
        await detached_once(first, lambda: bool(fake.running()) and
                            step_of(fake.running()[0].spec) == "reduce")
        for agent in fake.held("reduce"):
            await fake.remove(agent.handle())
        store.data[Keys.outputs(first.uid, "map")].pop("1")  # lost with a Redis restart
        return await new_run(document, fake, store).execute()

    status = scenario(play())

    reduce = status.step("reduce")
    assert status.phase is WorkflowPhase.FAILED
    assert reduce.phase is StepPhase.FAILED
    assert "output of its agent 1 is missing from the store" in (reduce.message or "")
    assert status.step("aside").phase is StepPhase.SUCCEEDED


def shown(status: WorkflowStatus, output_limit: int = 4096) -> WorkflowStatus:
    """The status as the resource carries it (cut as the controller writes it), read back."""
    from controller.handlers.reporting import compact_status

    return WorkflowStatus.model_validate(compact_status(status, output_limit, 100))


@pytest.mark.parametrize("cut", [False, True])
def test_a_store_that_lost_the_run_resumes_it_from_the_status_of_its_resource(cut: bool) -> None:
    """Redis emptied (or restarted without its last second) under a running workflow: what the
    resource's status shows finished is not run again; its outputs are taken from there when
    shown whole, else the step that reads them fails saying they are lost; a running agent is
    adopted by its labels."""
    document = map_reduce_aside()
    fake = FakeBackend(lambda spec: Behaviour(0.15 if step_of(spec) == "reduce" else 0,
                                              stdout=spec.env.get("ALL") or spec.env.get("WORD", "")))

    async def play() -> WorkflowStatus:
        first = new_run(document, fake, MemoryStore())
        await detached_once(first, lambda: first.status.step("reduce").phase is
                            StepPhase.RUNNING and first.status.step("aside").phase is
                            StepPhase.SUCCEEDED and bool(fake.running()))
        last_known = shown(first.status, output_limit=3 if cut else 4096)
        emptied = MemoryStore()
        return await Engine(fake, emptied, SETTINGS).prepare(
            parse_workflow(document), last_known=last_known).execute()

    status = scenario(play())

    assert fake.starts_per_agent() == {"map.0.1": 1, "map.1.1": 1, "reduce.0.1": 1,
                                       "aside.0.1": 1}
    assert status.step("aside").phase is StepPhase.SUCCEEDED
    if cut:
        assert status.phase is WorkflowPhase.FAILED
        assert "missing from the store" in (status.step("reduce").message or "")
    else:
        assert status.phase is WorkflowPhase.SUCCEEDED, status.message
        assert status.step("reduce").output == '["a", "b"]'


def test_the_spec_is_written_to_the_store_when_a_run_begins_and_ends_not_by_each_agent() -> None:
    """The store keeps the spec a run goes on with after a restart. It is written when the run
    begins and when it ends; an agent's end writes the progress beside it, not the spec again
    (a spec of 10,000 items, written by each of its 10,000 agents, once sent Redis 5 GB)."""

    class Recording(MemoryStore):
        specs = 0
        progress = 0

        async def record(self, uid: str, change: Change) -> None:
            if change.workflow is not None:
                self.specs += change.workflow.spec is not None
                self.progress += change.workflow.spec is None
            await super().record(uid, change)

    store = Recording()
    document = with_uid(workflow_doc({"name": "wide", "parallel": {"items": list(range(20))}}))
    status = scenario(new_run(document, FakeBackend(), store).execute())

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert (store.specs, store.progress) == (2, 20)
    record = scenario(store.workflow(document["metadata"]["uid"]))
    assert record is not None and record.spec == parse_workflow(document).spec
    assert record.progress == "20/20"


def test_a_run_keeping_outputs_short_holds_whole_only_those_a_step_reads() -> None:
    """The controller's runs hold the head of an output no step reads (what the status shows,
    and one more character to tell it was cut); an output a step reads is held whole, and
    the store has every one whole. So a fan-out of chatty agents costs the controller little
    memory, also once a restarted run took the outputs back from the store."""
    long = "x" * 50
    document = with_uid(workflow_doc(
        {"name": "chatty", "parallel": {"replicas": 3}},
        {"name": "read", "dependsOn": []},
        {"name": "reader", "dependsOn": ["read"],
         "env": [{"name": "ALL", "value": "{{ steps.read.output }}"}]},
        {"name": "slow", "dependsOn": ["chatty"]}))
    fake = FakeBackend(lambda spec: Behaviour(0.1 if step_of(spec) == "slow" else 0,
                                              stdout=spec.env.get("ALL", long)))
    store = MemoryStore()
    engine = Engine(fake, store, SETTINGS, output_kept=11)

    async def play() -> tuple[WorkflowStatus, WorkflowStatus]:
        first = engine.prepare(parse_workflow(document))
        before = await detached_once(first, lambda: first.status.step("reader").phase is
                                     StepPhase.SUCCEEDED and first.status.step("slow").phase is
                                     StepPhase.RUNNING and bool(fake.running()))
        return before, await engine.prepare(parse_workflow(document)).execute()

    before, after = scenario(play())

    for status in (before, after):
        assert status.step("chatty").outputs == ["x" * 11] * 3
        assert status.step("read").output == long
    assert after.phase is WorkflowPhase.SUCCEEDED
    assert [agent.spec.env["ALL"] for agent in fake.starts("reader")] == [long]
    assert after.step("reader").output == "x" * 11  # read by none
    assert after.step("slow").output == "x" * 11
    stored = scenario(store.outputs(document["metadata"]["uid"], "chatty"))
    assert stored == {0: long, 1: long, 2: long}


@pytest.mark.parametrize("restarted", [False, True])
def test_a_workflows_outputs_past_its_limit_are_kept_cut_and_said_once(restarted: bool) -> None:
    """One workflow keeps at most AGENTAINER_WORKFLOW_OUTPUT_LIMIT_BYTES of outputs whole
    (bytes, not characters); past it each output is kept as the status shows one (a short one
    whole), marked truncated, and one event says so. A restarted run counts what it kept."""
    settings = Settings.from_env({}, store="memory", stop_grace_seconds=0,
                                 workflow_output_limit_bytes=100, status_output_limit=8)
    document = with_uid(workflow_doc(
        {"name": "fan", "parallel": {"replicas": 6, "maxWorkers": 1}}))
    printed = ["é" * 20, "x" * 40, "y" * 40, "z" * 40, "w" * 40, "short"]  # é: 2 bytes
    fake = FakeBackend(lambda spec: Behaviour(0.01 if index_of(spec) < 2 else 0.05,
                                              stdout=printed[index_of(spec)]))
    store = MemoryStore()
    events: list[Event] = []
    engine = Engine(fake, store, settings)

    async def play() -> WorkflowStatus:
        run = engine.prepare(parse_workflow(document), lambda event, _: events.append(event))
        if restarted:
            await detached_once(run, lambda: run.state.units_done == 2)
            run = engine.prepare(parse_workflow(document),
                                 lambda event, _: events.append(event))
        return await run.execute()

    status = scenario(play())

    assert status.phase is WorkflowPhase.SUCCEEDED
    kept = ["é" * 20, "x" * 40, "yyyyyyyy", "zzzzzzzz", "wwwwwwww", "short"]
    assert status.step("fan").outputs == kept
    assert scenario(store.outputs(document["metadata"]["uid"], "fan")) == dict(enumerate(kept))
    assert [bool(agent.output_truncated) for agent in status.step("fan").agents] == [
        False, False, True, True, True, False]
    (said,) = [event for event in events if event.kind is EventKind.OUTPUTS_CUT]
    assert "passed 100 bytes (AGENTAINER_WORKFLOW_OUTPUT_LIMIT_BYTES)" in said.message
    assert said.agent is not None and said.agent.index == 2


def test_items_waiting_their_turn_cost_no_task() -> None:
    """A fan-out of 10,000 replicas, 5 at once: the tasks alive stay a handful, not one per
    item (a million items once took 1.4 GiB)."""
    fake = FakeBackend(lambda spec: Behaviour(0.005))

    async def play() -> int:
        run = new_run(workflow_doc({"name": "wide", "parallel": {"replicas": 10000,
                                                                  "maxWorkers": 5}}),
                      fake, MemoryStore())
        execution = asyncio.ensure_future(run.execute())
        most = 0
        while len(fake.started) < 50:
            most = max(most, len(asyncio.all_tasks()))
            await asyncio.sleep(0.002)
        run.detach()
        await execution
        return most

    assert scenario(play()) < 40


def test_a_workflow_runs_at_most_its_cap_of_agents_at_once_over_all_its_steps() -> None:
    settings = Settings.from_env({}, store="memory", stop_grace_seconds=0,
                                 max_agents_per_workflow=4)
    fake = FakeBackend(lambda spec: Behaviour(0.05))
    workflow = parse_workflow(workflow_doc(
        {"name": "left", "parallel": {"replicas": 10}},
        {"name": "right", "dependsOn": [], "parallel": {"replicas": 10, "maxWorkers": 10}}))

    status = scenario(Engine(fake, MemoryStore(), settings).run(workflow))

    assert status.phase is WorkflowPhase.SUCCEEDED
    assert fake.most_at_once() == 4


def test_a_lease_taken_just_before_the_store_failed_is_given_back_not_held_for_ever() -> None:
    """The pooled task never ran (the store failed as it recorded the lease): its agent goes
    back, instead of a renewer holding it while every later task waits for it in vain."""
    from controller.errors import StoreUnavailableError
    from controller.models import parse_agent_pool
    from controller.pools import PoolManager

    class FailingOnce(MemoryStore):
        failed = False

        async def record(self, uid: str, change: Any) -> None:
            agent = change.agent
            if agent is not None and agent.status.name.startswith("pool-") and not self.failed:
                self.failed = True
                raise StoreUnavailableError("Redis went away")
            await super().record(uid, change)

    store = FailingOnce()
    fake = FakeBackend()
    pools = PoolManager(store, SETTINGS)
    pool = parse_agent_pool({"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                             "metadata": {"name": "warm"},
                             "spec": {"image": "agent:1", "minSize": 1, "maxSize": 1}})
    document = with_uid(workflow_doc({"name": "task", "pool": "warm", "command": ["echo"]}))

    async def play() -> tuple[int, int, WorkflowStatus]:
        state = pools.register(pool, "pool-uid", fake)
        await pools.reconcile(state)
        with pytest.raises(StoreUnavailableError):
            await Engine(fake, store, SETTINGS, pools).run(parse_workflow(document))
        held = await store.pool_counts(state.uid)
        resumed = await Engine(fake, store, SETTINGS, pools).run(parse_workflow(document))
        await pools.drain(state, timeout=1)
        return held[0] - held[1], len(fake.removed), resumed

    busy, removed, status = scenario(play())

    assert busy == 0  # nothing holds an agent after the run let go
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message


def test_a_task_waiting_for_a_full_pool_looks_ever_less_often_and_gets_a_return_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first in turn for a full pool looks in the store again after a pause that doubles
    while nothing comes (other processes' returns), and is woken at once by a return here."""
    from controller import pools as pools_module
    from controller.models import parse_agent_pool
    from controller.pools import PoolManager

    monkeypatch.setattr(pools_module, "FIRST_LOOK_SECONDS", 0.003)
    monkeypatch.setattr(pools_module, "LOOK_CAP_SECONDS", 1.0)

    class Counting(MemoryStore):
        looks = 0

        async def pool_acquire(self, uid: str, holder: str, ttl_ms: int) -> str | None:
            self.looks += 1
            return await super().pool_acquire(uid, holder, ttl_ms)

    store, fake = Counting(), FakeBackend()
    pools = PoolManager(store, SETTINGS)
    pool = parse_agent_pool({"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                             "metadata": {"name": "one"},
                             "spec": {"image": "agent:1", "minSize": 1, "maxSize": 1}})

    async def play() -> tuple[int, float]:
        state = pools.register(pool, "pool-uid", fake)
        await pools.reconcile(state)
        first = await pools.lease(state)
        second = asyncio.create_task(pools.lease(state))
        looks = store.looks
        await asyncio.sleep(0.2)  # by then it looks again only after 0.19 s
        looks = store.looks - looks
        began = time.monotonic()
        await pools.release(first, keep=True)
        lease = await asyncio.wait_for(second, 1)
        took = time.monotonic() - began
        await pools.release(lease, keep=True)
        await pools.drain(state, timeout=1)
        return looks, took

    looks, took = scenario(play())

    assert looks <= 10  # at a fixed 3 ms, 66
    assert took < 0.1  # woken by the return, not by its next look
