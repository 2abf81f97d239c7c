"""The workflow engine: runs a Workflow's steps as a DAG of agents on a backend.

The same code runs a Workflow for the kopf controller and for ``agentainer run``; it imports no
kopf. Semantics worth knowing (the README says the same to users):

- A step waits for the steps it depends on; steps whose dependencies are met run at once.
- A fan-out runs one agent per item (or replica), at most ``maxWorkers`` at a time.
- A failed agent is run again, as a new agent, up to ``retries.limit`` times, with backoff.
- ``timeoutSeconds`` of a step bounds each attempt: the agent is killed and the attempt fails
  with reason DeadlineExceeded.
- Fail fast, as Argo's DAGs do: once a step fails, no new step (and no new agent of the failing
  step) is started; agents already running are allowed to finish. Steps that depend on the
  failed one, and steps that never got to start, end as Skipped. The workflow is Failed.
- Workflow ``timeoutSeconds`` and cancellation stop every running agent (SIGTERM, then SIGKILL
  after ``stop_grace_seconds``); the workflow ends Failed (DeadlineExceeded) or Cancelled.
- Cleanup: ``Always`` removes every agent once it stops, ``OnSuccess`` removes the agents that
  succeeded and keeps the others for debugging, ``Never`` keeps all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from controller.agents import agent_id, build_agent_spec, label_value, should_remove
from controller.clock import age_seconds, now
from controller.backends.base import (
    LABEL_AGENT_ID,
    LABEL_WORKFLOW_UID,
    AgentHandle,
    AgentResult,
    Backend,
)
from controller.config import Settings
from controller.errors import AgentainerError, PoolUnavailableError
from controller.models import (
    AgentPhase,
    AgentReason,
    AgentStatus,
    Condition,
    ConditionStatus,
    Step,
    StepPhase,
    StepStatus,
    Workflow,
    WorkflowPhase,
    WorkflowStatus,
)
from controller.pools import PoolManager
from controller.store import Record, Store

logger = logging.getLogger(__name__)

# Where the backend enforces deadlines (pods' activeDeadlineSeconds), the engine waits this
# much longer before killing the agent itself, so that the backend's reason is the one reported.
BACKEND_DEADLINE_MARGIN_SECONDS = 30


# --- events -------------------------------------------------------------------------------------


class EventKind(StrEnum):
    WORKFLOW_STARTED = "WorkflowStarted"
    STEP_STARTED = "StepStarted"
    AGENT_STARTED = "AgentStarted"
    AGENT_FINISHED = "AgentFinished"
    AGENT_RETRYING = "AgentRetrying"
    STEP_FINISHED = "StepFinished"
    WORKFLOW_FINISHED = "WorkflowFinished"


@dataclass(frozen=True)
class Event:
    """Something that happened in a run, for progress displays and Kubernetes Events."""

    kind: EventKind
    message: str
    step: StepStatus | None = None
    agent: AgentStatus | None = None


Observer = Callable[[Event, WorkflowStatus], None]


# --- running ------------------------------------------------------------------------------------


class StopReason(StrEnum):
    CANCELLED = "Cancelled"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    DETACHED = "Detached"


@dataclass(frozen=True)
class AttemptOutcome:
    succeeded: bool
    output: str = ""
    retryable: bool = True


class WorkflowRun:
    """One execution of one Workflow. Create it, then ``await run.execute()``."""

    def __init__(
        self,
        workflow: Workflow,
        backend: Backend,
        store: Store,
        settings: Settings,
        observer: Observer | None = None,
        pools: PoolManager | None = None,
    ) -> None:
        self.workflow = workflow
        self.pools = pools
        self.uid = workflow.metadata.uid or str(uuid.uuid4())
        self.backend = backend
        self.store = store
        self.settings = settings
        self.observer = observer
        self.dependencies = workflow.spec.dependency_map()
        self.steps = {step.name: step for step in workflow.spec.steps}
        self.status = WorkflowStatus(
            observed_generation=workflow.metadata.generation,
            steps=[StepStatus(name=step.name) for step in workflow.spec.steps],
        )
        self.outputs: dict[str, list[str]] = {}
        self.units_total = sum(step.width for step in workflow.spec.steps)
        self.units_done = 0
        self.failed_step: str | None = None
        self.stop_reason: StopReason | None = None
        self._stop = asyncio.Event()
        self._step_tasks: dict[str, asyncio.Task[bool]] = {}
        self._restored_outputs: dict[str, dict[int, str]] = {}
        self.interrupted_by: AgentainerError | None = None

    def cancel(self) -> None:
        """Stop the run: running agents are stopped and cleaned up, the phase is Cancelled."""
        if self.stop_reason is None:
            self.stop_reason = StopReason.CANCELLED
        self._stop.set()

    def detach(self) -> None:
        """Stop watching without touching anything: agents run on and the state stays as it is,
        for another process (a restarted controller) to resume from the store and the labels."""
        if self.stop_reason is None:
            self.stop_reason = StopReason.DETACHED
        self._stop.set()

    @property
    def detached(self) -> bool:
        return self.stop_reason is StopReason.DETACHED

    @property
    def _leaves_agents(self) -> bool:
        """Agents are stopped only when the run is stopped on purpose (cancel, deadline). When
        it is detached, or cancelled from outside (the process is going away), they run on,
        to be adopted by whoever resumes the workflow."""
        return self.stop_reason not in (StopReason.CANCELLED, StopReason.DEADLINE_EXCEEDED)

    # --- recording ------------------------------------------------------------------------------

    def _emit(self, kind: EventKind, message: str, step: StepStatus | None = None,
              agent: AgentStatus | None = None) -> None:
        logger.debug("%s: %s", self.workflow.metadata.name, message)
        if self.observer is not None:
            self.observer(Event(kind, message, step, agent), self.status)

    def _workflow_fields(self) -> dict[str, str]:
        status = self.status
        fields = {
            "name": self.workflow.metadata.name,
            "namespace": self.workflow.metadata.namespace,
            "phase": status.phase.value,
            "progress": status.progress,
            "startedAt": status.started_at or "",
            "finishedAt": status.finished_at or "",
            "message": status.message or "",
        }
        return fields

    @staticmethod
    def _step_fields(step: StepStatus) -> dict[str, Any]:
        return step.model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude={"agents", "outputs", "output"}
        )

    async def _record_step(self, step: StepStatus) -> None:
        await self.store.record(self.uid, Record(step=(step.name, self._step_fields(step))))

    def _agent_fields(self, agent: AgentStatus, handle: AgentHandle | None) -> dict[str, Any]:
        fields = agent.model_dump(mode="json", by_alias=True, exclude_none=True)
        fields.update(workflow=self.workflow.metadata.name, workflowUid=self.uid,
                      step=agent.id.split(".")[0], container=handle.id if handle else "")
        return fields

    # --- the DAG --------------------------------------------------------------------------------

    async def execute(self) -> WorkflowStatus:
        """Run to the end; returns the final status (also kept in ``self.status``)."""
        status = self.status
        if await self._restore():
            if status.phase.finished:
                return status
            self._emit(EventKind.WORKFLOW_STARTED,
                       f"workflow {self.workflow.metadata.name} resumed at {status.progress}")
        else:
            status.started_at = now()
            status.progress = f"0/{self.units_total}"
            self._emit(EventKind.WORKFLOW_STARTED,
                       f"workflow {self.workflow.metadata.name} started")
        status.phase = WorkflowPhase.RUNNING
        await self.store.record(self.uid, Record(workflow=self._workflow_fields(),
                                                 started_at=time.time()))
        timeout = self.workflow.spec.timeout_seconds
        deadline = None
        if timeout:
            deadline = time.monotonic() + timeout - age_seconds(status.started_at)
        try:
            await self._schedule(deadline)
        finally:
            # Whatever ended the run, no step task may outlive it.
            await self._stop_steps()
        if self.interrupted_by is not None:
            raise self.interrupted_by
        if self.detached:
            return status
        await self._skip_unstarted()
        if self.stop_reason is StopReason.CANCELLED:
            status.phase = WorkflowPhase.CANCELLED
            status.message = "cancelled"
        elif self.stop_reason is StopReason.DEADLINE_EXCEEDED:
            status.phase = WorkflowPhase.FAILED
            status.message = f"workflow exceeded its timeoutSeconds ({timeout})"
        elif self.failed_step is not None:
            status.phase = WorkflowPhase.FAILED
            failed = status.step(self.failed_step)
            status.message = f"step {failed.name} failed: {failed.message}"
        else:
            status.phase = WorkflowPhase.SUCCEEDED
            status.message = None
        status.finished_at = now()
        reason = self.stop_reason.value if self.stop_reason else status.phase.value
        status.conditions = [Condition(
            type="Completed", status=ConditionStatus.TRUE, reason=reason,
            message=status.message or "all steps succeeded", last_transition_time=status.finished_at,
        )]
        await self.store.record(self.uid, Record(workflow=self._workflow_fields()))
        await self.store.finish(self.uid, self.settings.state_ttl_seconds)
        self._emit(EventKind.WORKFLOW_FINISHED,
                   f"workflow {self.workflow.metadata.name} {status.phase.value.lower()}")
        return status

    async def _restore(self) -> bool:
        """Take up what an earlier process recorded for this uid; False when there is nothing.

        Steps that succeeded keep their outputs and are not run again; agents that were running
        are adopted by ``_run_unit`` through their labels, never started a second time.
        """
        workflow = await self.store.workflow(self.uid)
        if not workflow:
            return False
        status = self.status
        status.started_at = workflow.get("startedAt") or now()
        records = await self.store.agents(self.uid)
        for record in sorted(records.values(), key=lambda r: (r["index"], r["attempt"])):
            if record.get("step") in self.steps:
                status.step(record["step"]).agents.append(AgentStatus.model_validate(record))
        for name, state in (await self.store.steps(self.uid)).items():
            if name not in self.steps:
                continue
            step = status.step(name)
            step.attempts = len(step.agents)
            step.started_at = state.get("startedAt")
            step.finished_at = state.get("finishedAt")
            step.message = state.get("message")
            outputs = await self.store.outputs(self.uid, name)
            self._restored_outputs[name] = outputs
            self.units_done += len(outputs)
            phase = StepPhase(state.get("phase", StepPhase.PENDING))
            if phase is StepPhase.SUCCEEDED:
                self._step_succeeded(self.steps[name], step,
                                     [outputs.get(i, "") for i in range(self.steps[name].width)])
            elif phase in (StepPhase.FAILED, StepPhase.SKIPPED, StepPhase.CANCELLED):
                step.phase = phase
                if phase is StepPhase.FAILED:
                    self.failed_step = self.failed_step or name
        status.progress = f"{self.units_done}/{self.units_total}"
        stored_phase = WorkflowPhase(workflow.get("phase") or WorkflowPhase.PENDING)
        if stored_phase.finished:
            status.phase = stored_phase
            status.finished_at = workflow.get("finishedAt") or None
            status.message = workflow.get("message") or None
        return True

    def _step_succeeded(self, step: Step, status: StepStatus, outputs: list[str]) -> None:
        self.outputs[step.name] = outputs
        status.phase = StepPhase.SUCCEEDED
        status.outputs = outputs
        status.output = outputs[0] if step.width == 1 else json.dumps(outputs)

    def _ready_steps(self) -> list[str]:
        ready = []
        for step in self.status.steps:
            if step.phase is not StepPhase.PENDING or step.name in self._step_tasks:
                continue
            deps = [self.status.step(d) for d in self.dependencies[step.name]]
            if all(d.phase is StepPhase.SUCCEEDED for d in deps):
                ready.append(step.name)
        return ready

    async def _schedule(self, deadline: float | None) -> None:
        stop_waiter = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                if self.failed_step is None and self.stop_reason is None:
                    for name in self._ready_steps():
                        self._step_tasks[name] = asyncio.create_task(
                            self._run_step(self.steps[name]), name=f"step-{name}"
                        )
                running = {t for t in self._step_tasks.values() if not t.done()}
                if not running:
                    break
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait(running | {stop_waiter}, timeout=remaining,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done - {stop_waiter}:
                    if not task.cancelled() and (error := task.exception()) is not None:
                        await self._step_crashed(task, error)
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop_reason = self.stop_reason or StopReason.DEADLINE_EXCEEDED
                if self.stop_reason is not None:
                    break
        finally:
            stop_waiter.cancel()
        await self._skip_unstarted()

    async def _step_crashed(self, task: asyncio.Task[bool], error: BaseException) -> None:
        """A step ended by an error of ours or of the store, not of its agents."""
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        name = next(name for name, t in self._step_tasks.items() if t is task)
        if isinstance(error, AgentainerError) and error.retryable:
            # Redis or the engine is away for now: nothing failed for good, so stop watching
            # and let the caller retry; a later run of the same uid resumes from the store.
            logger.warning("step %s interrupted: %s", name, error)
            self.interrupted_by = error
            self.stop_reason = self.stop_reason or StopReason.DETACHED
            return
        status = self.status.step(name)
        if isinstance(error, AgentainerError):
            message = str(error)
        else:
            logger.error("step %s crashed", name, exc_info=error)
            message = f"internal error: {error!r}"
        status.phase = StepPhase.FAILED
        status.message = message
        status.finished_at = now()
        self.failed_step = self.failed_step or name
        self._emit(EventKind.STEP_FINISHED, f"step {name} failed: {message}", status)
        try:
            await self._record_step(status)
        except AgentainerError as record_error:
            logger.warning("could not record step %s: %s", name, record_error)

    async def _stop_steps(self) -> None:
        tasks = [t for t in self._step_tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _skip_unstarted(self) -> None:
        if self.detached:
            return
        for step in self.status.steps:
            if step.phase is not StepPhase.PENDING:
                continue
            failed_deps = [d for d in self.dependencies[step.name]
                           if self.status.step(d).phase is not StepPhase.SUCCEEDED]
            step.phase = StepPhase.SKIPPED
            if self.stop_reason is StopReason.CANCELLED:
                step.message = "not started: the workflow was cancelled"
            elif self.stop_reason is StopReason.DEADLINE_EXCEEDED:
                step.message = "not started: the workflow exceeded its timeout"
            elif failed_deps:
                step.message = f"not started: dependency {failed_deps[0]} did not succeed"
            else:
                step.message = f"not started: step {self.failed_step} failed"
            await self._record_step(step)

    # --- one step -------------------------------------------------------------------------------

    async def _run_step(self, step: Step) -> bool:
        status = self.status.step(step.name)
        status.phase = StepPhase.RUNNING
        status.started_at = status.started_at or now()
        await self._record_step(status)
        self._emit(EventKind.STEP_STARTED,
                   f"step {step.name} started: {step.width} agent(s), "
                   f"at most {step.max_workers} at once", status)
        results: list[str | None] = [None] * step.width
        gate = asyncio.Semaphore(step.max_workers)
        failures: list[str] = []

        async def unit(index: int) -> None:
            async with gate:
                if failures or self.failed_step is not None or self.stop_reason is not None:
                    return  # fail fast: no new agents once something failed
                outcome = await self._run_unit(step, status, index)
                if outcome.succeeded:
                    results[index] = outcome.output
                else:
                    failures.append(status.message or "failed")

        try:
            # A TaskGroup, unlike gather, waits for every agent to be stopped when cancelled.
            async with asyncio.TaskGroup() as group:
                for index in range(step.width):
                    group.create_task(unit(index), name=f"{step.name}-{index}")
        except asyncio.CancelledError:
            if self._leaves_agents:
                raise
            deadline = self.stop_reason is StopReason.DEADLINE_EXCEEDED
            status.phase = StepPhase.FAILED if deadline else StepPhase.CANCELLED
            status.message = ("stopped: the workflow exceeded its timeout" if deadline
                              else "cancelled")
            status.finished_at = now()
            await self._record_step(status)
            self._emit(EventKind.STEP_FINISHED, f"step {step.name} {status.message}", status)
            raise
        status.finished_at = now()
        if failures or any(r is None for r in results):
            status.phase = StepPhase.FAILED
            if not failures:
                status.message = "stopped: another step failed"
            if self.failed_step is None:
                self.failed_step = step.name
        else:
            self._step_succeeded(step, status, [r or "" for r in results])
        await self._record_step(status)
        self._emit(EventKind.STEP_FINISHED, f"step {step.name} {status.phase.value.lower()}",
                   status)
        return status.phase is StepPhase.SUCCEEDED

    async def _run_unit(self, step: Step, status: StepStatus, index: int) -> AttemptOutcome:
        """One item (or replica) of a step, with its retries."""
        retries = step.retries.limit if step.retries else 0
        restored = self._restored_outputs.get(step.name, {})
        if index in restored:
            return AttemptOutcome(True, restored[index])  # finished before a restart
        attempt = 1
        adopt: AgentStatus | None = None
        earlier = [a for a in status.agents if a.index == index]
        if earlier:
            last = earlier[-1]
            if last.phase in (AgentPhase.CREATED, AgentPhase.RUNNING):
                attempt, adopt = last.attempt, last
            elif last.attempt > retries:
                status.message = status.message or f"agent {last.name} failed"
                return AttemptOutcome(False, retryable=False)
            else:
                attempt = last.attempt + 1
        while True:
            if step.pool is not None:
                outcome = await self._run_pooled_attempt(step, status, index, attempt, adopt)
            else:
                outcome = await self._run_attempt(step, status, index, attempt, adopt)
            adopt = None
            if outcome.succeeded:
                return outcome
            if not outcome.retryable or attempt > retries or self.stop_reason is not None:
                return outcome
            assert step.retries is not None
            delay = step.retries.delay(attempt)
            agent = status.agents[-1]
            self._emit(EventKind.AGENT_RETRYING,
                       f"agent {agent.name} failed ({status.message}); "
                       f"retry {attempt} of {retries} in {delay:g}s", status, agent)
            await asyncio.sleep(delay)
            attempt += 1

    async def _adoptable(self, agent: AgentStatus) -> AgentHandle | None:
        """The container of an agent recorded by an earlier process, if it got to start;
        one that was only created is removed, to be started afresh under the same name."""
        found = await self.backend.list_agents({LABEL_WORKFLOW_UID: self.uid,
                                                LABEL_AGENT_ID: label_value(agent.id)})
        for handle in found:
            if handle.state != "created":
                return handle
            await self.backend.remove(handle)
        return None

    async def _run_attempt(self, step: Step, status: StepStatus, index: int, attempt: int,
                           adopt: AgentStatus | None = None) -> AttemptOutcome:
        """Start one agent (or adopt the one an earlier process started), wait for it, record
        it, clean it up."""
        spec = build_agent_spec(self.workflow, self.uid, step, index, attempt, self.outputs)
        handle: AgentHandle | None = await self._adoptable(adopt) if adopt else None
        if adopt is not None:
            agent = adopt
        else:
            agent = AgentStatus(id=agent_id(step.name, index, attempt), name=spec.name,
                                index=index, attempt=attempt, phase=AgentPhase.CREATED,
                                created_at=now())
            status.agents.append(agent)
            status.attempts += 1
            await self._record_agent(agent, None, status)
        timeout: float | None = step.timeout_seconds
        starting: asyncio.Future[AgentHandle] | None = None
        try:
            if handle is None:
                starting = asyncio.ensure_future(self.backend.start(spec))
                handle = await asyncio.shield(starting)
                agent.phase = AgentPhase.RUNNING
                agent.started_at = now()
                await self._record_agent(agent, handle)
                self._emit(EventKind.AGENT_STARTED, f"agent {agent.name} started", status, agent)
            else:
                agent.phase = AgentPhase.RUNNING
                agent.started_at = agent.started_at or now()
                if timeout:
                    timeout = max(0.0, timeout - age_seconds(agent.started_at))
                self._emit(EventKind.AGENT_STARTED, f"agent {agent.name} adopted", status, agent)
            if timeout and self.backend.enforces_deadlines:
                timeout += BACKEND_DEADLINE_MARGIN_SECONDS  # the backend's own deadline first
            try:
                result = await asyncio.wait_for(self.backend.wait(handle), timeout)
                reason = (AgentReason.OOM_KILLED if result.oom_killed else
                          AgentReason.DEADLINE_EXCEEDED if result.deadline_exceeded else
                          AgentReason.COMPLETED if result.exit_code == 0 else AgentReason.ERROR)
            except TimeoutError:
                await self.backend.stop(handle, 0)
                result = await self.backend.wait(handle)
                reason = AgentReason.DEADLINE_EXCEEDED
        except asyncio.CancelledError:
            if self._leaves_agents:
                raise  # the agent runs on, to be adopted
            if handle is None and starting is not None:
                # Cancelled while the backend was creating it: let that finish, then stop it,
                # so that no agent is left behind.
                handle = await _settled(starting)
            await asyncio.shield(self._abort_agent(agent, handle, status))
            raise
        except AgentainerError as error:
            return await self._agent_errored(agent, handle, status, error, cleanup=True)
        return await self._finish_agent(agent, handle, result, reason, status, step)

    async def _run_pooled_attempt(self, step: Step, status: StepStatus, index: int,
                                  attempt: int, retry_of: AgentStatus | None) -> AttemptOutcome:
        """Run one attempt as a task on an agent leased from the step's AgentPool. A pooled
        task cut off by a restart is run again: its agent was reclaimed with its lease."""
        assert step.pool is not None
        spec = build_agent_spec(self.workflow, self.uid, step, index, attempt, self.outputs)
        argv = [*(spec.command or []), *(spec.args or [])]
        agent = retry_of or AgentStatus(
            id=agent_id(step.name, index, attempt), name=f"{step.pool} (leasing)", index=index,
            attempt=attempt, phase=AgentPhase.CREATED, created_at=now())
        if retry_of is None:
            status.agents.append(agent)
            status.attempts += 1
        await self._record_agent(agent, None, status)
        handle: AgentHandle | None = None
        try:
            if self.pools is None:
                raise PoolUnavailableError(
                    f"AgentPool {step.pool} is not available: put it in the same file as the "
                    "workflow (agentainer run) or create it in the workflow's namespace")
            pool = await self.pools.find(self.workflow.metadata.namespace, step.pool,
                                         self.settings.pool_wait_seconds)
            lease = await self.pools.lease(pool)
            handle = lease.agent
            agent.name = handle.name
            agent.phase = AgentPhase.RUNNING
            agent.started_at = now()
            await self._record_agent(agent, handle)
            self._emit(EventKind.AGENT_STARTED,
                       f"agent {agent.name} leased from {step.pool} in {lease.waited * 1000:.1f} ms",
                       status, agent)
            try:
                task = await self.pools.run(lease, argv, spec.env, step.timeout_seconds)
                result = AgentResult(task.exit_code, task.stdout, task.stderr,
                                     deadline_exceeded=task.timed_out,
                                     output_truncated=task.stdout_truncated)
                reason = (AgentReason.DEADLINE_EXCEEDED if task.timed_out else
                          AgentReason.COMPLETED if task.exit_code == 0 else AgentReason.ERROR)
            except TimeoutError:
                result = AgentResult(137, "", "")  # its runner stopped answering: replaced
                reason = AgentReason.DEADLINE_EXCEEDED
        except asyncio.CancelledError:
            if not self._leaves_agents:
                await asyncio.shield(self._abort_agent(agent, None, status))
            raise
        except AgentainerError as error:
            return await self._agent_errored(agent, handle, status, error, cleanup=False)
        return await self._finish_agent(agent, handle, result, reason, status, step,
                                        cleanup=False)

    async def _agent_errored(self, agent: AgentStatus, handle: AgentHandle | None,
                             status: StepStatus, error: AgentainerError,
                             cleanup: bool) -> AttemptOutcome:
        agent.phase = AgentPhase.FAILED
        agent.reason = AgentReason.BACKEND_ERROR
        agent.finished_at = now()
        status.message = str(error)
        await self._record_agent(agent, handle, status)
        self._emit(EventKind.AGENT_FINISHED, f"agent {agent.name} failed: {error}",
                   status, agent)
        if handle is not None and cleanup:
            await self._cleanup(handle, succeeded=False)
        return AttemptOutcome(False, retryable=error.retryable)

    async def _finish_agent(self, agent: AgentStatus, handle: AgentHandle | None,
                            result: AgentResult, reason: AgentReason, status: StepStatus,
                            step: Step, cleanup: bool = True) -> AttemptOutcome:
        succeeded = reason is AgentReason.COMPLETED
        agent.phase = AgentPhase.SUCCEEDED if succeeded else AgentPhase.FAILED
        agent.exit_code = result.exit_code
        agent.reason = reason
        agent.output_truncated = result.output_truncated or None
        agent.finished_at = now()
        output = result.stdout.strip()
        if succeeded:
            self.units_done += 1
            self.status.progress = f"{self.units_done}/{self.units_total}"
        else:
            status.message = _failure_message(agent, step, result)
        # The agent, its output and the progress change together, or not at all.
        await self.store.record(self.uid, Record(
            agent=(agent.id, self._agent_fields(agent, handle)),
            step=(status.name, self._step_fields(status)),
            output=(step.name, agent.index, output) if succeeded else None,
            workflow={"progress": self.status.progress} if succeeded else None,
            logs=(agent.id, result.stderr) if result.stderr else None,
        ))
        self._emit(EventKind.AGENT_FINISHED,
                   f"agent {agent.name} {agent.phase.value.lower()} (exit {result.exit_code})",
                   status, agent)
        if handle is not None and cleanup:
            await self._cleanup(handle, succeeded)
        return AttemptOutcome(succeeded, output)

    async def _abort_agent(self, agent: AgentStatus, handle: AgentHandle | None,
                           status: StepStatus) -> None:
        """The run is being stopped: stop this agent, record it, clean up per the policy."""
        if handle is not None:
            try:
                await self.backend.stop(handle, self.settings.stop_grace_seconds)
            except AgentainerError as error:
                logger.warning("could not stop agent %s: %s", agent.name, error)
        agent.phase = AgentPhase.FAILED
        agent.reason = (AgentReason.DEADLINE_EXCEEDED
                        if self.stop_reason is StopReason.DEADLINE_EXCEEDED
                        else AgentReason.CANCELLED)
        agent.finished_at = now()
        try:
            await self._record_agent(agent, handle, status)
        except AgentainerError as error:
            logger.warning("could not record agent %s: %s", agent.name, error)
        self._emit(EventKind.AGENT_FINISHED, f"agent {agent.name} stopped ({agent.reason})",
                   status, agent)
        if handle is not None:
            await self._cleanup(handle, succeeded=False)

    async def _record_agent(self, agent: AgentStatus, handle: AgentHandle | None,
                            status: StepStatus | None = None) -> None:
        await self.store.record(self.uid, Record(
            agent=(agent.id, self._agent_fields(agent, handle)),
            step=(status.name, self._step_fields(status)) if status else None,
        ))

    async def _cleanup(self, handle: AgentHandle, succeeded: bool) -> None:
        if not should_remove(self.workflow.spec.cleanup, succeeded):
            return
        try:
            await self.backend.remove(handle)
        except AgentainerError as error:
            logger.warning("could not remove agent %s: %s", handle.name, error)


async def _settled(starting: asyncio.Future[AgentHandle]) -> AgentHandle | None:
    try:
        return await starting
    except (AgentainerError, asyncio.CancelledError):
        return None


def _failure_message(agent: AgentStatus, step: Step, result: AgentResult) -> str:
    if agent.reason is AgentReason.DEADLINE_EXCEEDED:
        return f"agent {agent.name} ran past timeoutSeconds ({step.timeout_seconds}) and was killed"
    if agent.reason is AgentReason.OOM_KILLED:
        limit = step.resources.memory if step.resources else "?"
        return f"agent {agent.name} ran out of memory (limit {limit}) and was killed"
    if result.message:
        return f"agent {agent.name} failed: {result.message}"
    last_line = result.stderr.strip().splitlines()[-1:] or [""]
    detail = f": {last_line[0][:200]}" if last_line[0] else ""
    return f"agent {agent.name} exited with code {result.exit_code}{detail}"


class Engine:
    """Runs Workflows on one backend with one store (and the pools of this process)."""

    def __init__(self, backend: Backend, store: Store, settings: Settings,
                 pools: PoolManager | None = None) -> None:
        self.backend = backend
        self.store = store
        self.settings = settings
        self.pools = pools

    def prepare(self, workflow: Workflow, observer: Observer | None = None) -> WorkflowRun:
        return WorkflowRun(workflow, self.backend, self.store, self.settings, observer,
                           self.pools)

    async def run(self, workflow: Workflow, observer: Observer | None = None) -> WorkflowStatus:
        return await self.prepare(workflow, observer).execute()
