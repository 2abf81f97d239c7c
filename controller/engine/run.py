"""One run of one Workflow: its steps as a DAG, each step's fan-out with its retries, and how the
run ends (succeeded, failed fast, timed out, cancelled, or detached for another process).

Semantics worth knowing (the README says the same to users):

- A step waits for the steps it depends on; steps whose dependencies are met run at once.
- A fan-out runs one agent per item (or replica), at most ``maxWorkers`` at a time.
- A failed agent is run again, as a new agent, up to ``retries.limit`` times, with backoff.
- ``timeoutSeconds`` of a step bounds each attempt: the agent is killed and the attempt fails
  with reason DeadlineExceeded.
- Fail fast, as Argo's DAGs do: once a step fails, no new step (and no new agent of the failing
  step) is started; agents already running are allowed to finish. Steps that depend on the
  failed one, and steps that never got to start, end as Skipped. The workflow is Failed.
- Workflow ``timeoutSeconds`` and cancellation (``shutdown: Terminate``) stop every running
  agent (SIGTERM, then SIGKILL after ``stop_grace_seconds``); the workflow ends Failed
  (DeadlineExceeded) or Cancelled.
- ``shutdown: Stop`` starts nothing new and lets running agents finish: the workflow ends
  Stopped. ``suspend`` holds new agents back until it is lifted (the timeout keeps counting).
  Finally steps run after either.
- A retry (``Journal.reopen``) runs again the steps that did not succeed, counting their
  attempts afresh; what succeeded keeps its outputs.
- Cleanup: ``Always`` removes every agent once it stops, ``OnSuccess`` removes the agents that
  succeeded and keeps the others for debugging, ``Never`` keeps all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from controller.backends.base import LABEL_WORKFLOW_UID, Backend
from controller.clock import age_seconds, now
from controller.config import Settings
from controller.engine.attempts import Attempts, AttemptOutcome, RunState, StopReason
from controller.engine.events import Emitter, EventKind, Observer
from controller.engine.journal import Journal, Restored
from controller.engine.steps import (
    SKIPPED_BY_CONDITION,
    ItemsError,
    fails_workflow,
    items_of,
    skip_reason,
    topological,
)
from controller.errors import AgentainerError, StoreDataError
from controller import templating
from controller.models import (
    AgentPhase,
    AgentReason,
    AgentStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    Shutdown,
    Step,
    StepPhase,
    StepStatus,
    Workflow,
    WorkflowPhase,
    WorkflowStatus,
)
from controller.agents import should_remove, workspace_spec
from controller.pools import PoolManager
from controller.store import WorkflowStore

logger = logging.getLogger(__name__)

MAX_UNCOUNTED_ATTEMPTS = 5
"""Attempts of one item the container engine may cut short (stopping it as the engine shuts
down) before they count as the step's retries: an engine restarting in a loop fails it."""
UNCOUNTED_PAUSE_SECONDS = 1.0


class WorkflowRun:
    """One execution of one Workflow. Create it (``Engine.prepare``), then ``await
    run.execute()``."""

    def __init__(self, workflow: Workflow, backend: Backend, store: WorkflowStore,
                 settings: Settings, observer: Observer | None = None,
                 pools: PoolManager | None = None,
                 last_known: WorkflowStatus | None = None,
                 output_kept: int | None = None) -> None:
        self.last_known = last_known
        """The status the resource carries: what the run had done, should the store have lost
        it."""
        self.output_kept = output_kept
        """Characters of an output no later step reads that the run holds (None: all)."""
        self.uid = workflow.metadata.uid or str(uuid.uuid4())
        self.settings = settings
        self.status = WorkflowStatus()
        self.state = RunState(units_total=0, agents_at_once=asyncio.Semaphore(
            settings.max_agents_per_workflow), output_room=settings.workflow_output_limit_bytes)
        self.journal = Journal(store, workflow, self.uid)
        self.emit = Emitter(workflow.metadata.name, self.status, observer)
        self.attempts = Attempts(workflow, self.uid, backend, pools, settings, self.journal,
                                 self.emit, self.state, self.status)
        self._plan(workflow)
        self.outputs: dict[str, list[str]] = {}
        self.failed_step: str | None = None
        self.interrupted_by: AgentainerError | None = None
        self._wake = asyncio.Event()
        """Set when the schedule has something new to look at: a stop, a resume."""
        self._unsuspended = asyncio.Event()
        self._unsuspended.set()
        self._cancel_cause = "cancelled"
        self._step_tasks: dict[str, asyncio.Task[bool]] = {}
        self._restored_outputs: dict[str, dict[int, str]] = {}
        self._lost_outputs: dict[str, list[int]] = {}

    def _plan(self, workflow: Workflow) -> None:
        """Take ``workflow``'s spec as the one to run."""
        self.workflow = self.journal.workflow = self.attempts.workflow = workflow
        self._read = {name for step in workflow.spec.all_steps for name in step.inputs()}
        """The steps whose outputs a step reads (through templates, ``itemsFrom``, ``when``)."""
        self.dependencies = workflow.spec.dependency_map()
        self.steps = {step.name: step for step in workflow.spec.all_steps}
        self._finally = {step.name for step in workflow.spec.finally_steps}
        self._now_running = set(self.steps) - self._finally  # finally steps come after
        self._order = {name: number for number, name in enumerate(
            topological(self.dependencies))}
        self.status.observed_generation = workflow.metadata.generation
        self.status.steps = [StepStatus(name=step.name) for step in workflow.spec.all_steps]
        self.state.units_total = sum(step.width for step in workflow.spec.all_steps)
        self._outcome: tuple[str, list[str]] | None = None
        self._finally_wanted = True
        self._run_failure: str | None = None

    @property
    def units_total(self) -> int:
        return self.state.units_total

    @property
    def stop_reason(self) -> StopReason | None:
        return self.state.stop_reason

    def cancel(self, finally_steps: bool = True, cause: str = "cancelled") -> None:
        """Stop the run: running agents are stopped and cleaned up, the phase is Cancelled
        (``cause`` says why, in its message). Its finally steps run then, unless
        ``finally_steps`` is False (the workflow is being deleted: nothing may start for it any
        more)."""
        self._finally_wanted = self._finally_wanted and finally_steps
        if self.stop_reason in (None, StopReason.STOPPED):
            self._cancel_cause = cause
            self.emit(EventKind.WORKFLOW_STOPPING,
                      f"workflow {self.workflow.metadata.name} {cause}")
        self._stop_for(StopReason.CANCELLED)

    def stop(self) -> None:
        """Start nothing new: running agents finish, finally steps run, the phase is Stopped."""
        if self.stop_reason is None:
            self.emit(EventKind.WORKFLOW_STOPPING,
                      f"workflow {self.workflow.metadata.name} stopping: no new step starts; "
                      "running agents finish")
        self._stop_for(StopReason.STOPPED)

    def suspend(self, suspended: bool) -> None:
        """Hold new agents back (running ones finish), or let them start again."""
        if suspended == (not self._unsuspended.is_set()) or self.stop_reason is not None:
            return
        name = self.workflow.metadata.name
        if suspended:
            self._unsuspended.clear()
            message = "suspended: no new agent starts until spec.suspend is false"
        else:
            self._unsuspended.set()
            message = "resumed"
        self.status.conditions = [c for c in self.status.conditions
                                  if c.type != ConditionType.SUSPENDED.value] + [Condition(
            type=ConditionType.SUSPENDED.value, reason="Suspended" if suspended else "Resumed",
            status=ConditionStatus.TRUE if suspended else ConditionStatus.FALSE,
            message=message, last_transition_time=now())]
        self._wake.set()
        self.emit(EventKind.WORKFLOW_SUSPENDED if suspended else EventKind.WORKFLOW_RESUMED,
                  f"workflow {name} {message}")

    def steer(self, suspend: bool, shutdown: Shutdown | None) -> None:
        """Follow the run's controls as they are now (``spec.suspend``, ``spec.shutdown``)."""
        self.suspend(suspend)
        if shutdown is not None and self._outcome is not None:
            # The other steps have ended: what a stop or terminate ends is over, and the finally
            # steps running now are what it runs next. They finish, within their grace period;
            # the outcome stays the one the other steps made.
            self.emit(EventKind.WORKFLOW_STOPPING,
                      f"workflow {self.workflow.metadata.name}: spec.shutdown {shutdown.value} "
                      "came as its finally steps ran: they finish")
        elif shutdown is Shutdown.TERMINATE:
            self.cancel(cause="terminated (spec.shutdown: Terminate)")
        elif shutdown is Shutdown.STOP:
            self.stop()

    @property
    def suspended(self) -> bool:
        return not self._unsuspended.is_set()

    def detach(self) -> None:
        """Stop watching without touching anything: agents run on and the state stays as it is,
        for another process (a restarted controller) to resume from the store and the labels."""
        self._stop_for(StopReason.DETACHED)

    def _stop_for(self, reason: StopReason) -> None:
        # A graceful stop gives way to any other: terminate, the deadline, detaching.
        if self.state.stop_reason in (None, StopReason.STOPPED):
            self.state.stop_reason = reason
        self._unsuspended.set()  # nothing waits for a resume that would start nothing
        self._wake.set()

    async def _unheld(self) -> None:
        """Wait while the run is suspended."""
        await self._unsuspended.wait()

    @property
    def detached(self) -> bool:
        return self.stop_reason is StopReason.DETACHED

    # --- the whole run --------------------------------------------------------------------------

    async def execute(self) -> WorkflowStatus:
        """Run to the end; returns the final status (also kept in ``self.status``)."""
        status = self.status
        restored = await self.journal.restore(self.last_known)
        if restored is not None:
            self._take_up(restored)
            if status.phase.finished:
                return status
            self.emit(EventKind.WORKFLOW_STARTED,
                      f"workflow {self.workflow.metadata.name} resumed at {status.progress}")
        else:
            status.started_at = now()
            status.progress = self.state.progress
            self.emit(EventKind.WORKFLOW_STARTED,
                      f"workflow {self.workflow.metadata.name} started")
        status.phase = WorkflowPhase.RUNNING
        if not any(c.type == ConditionType.SUCCEEDED.value for c in status.conditions):
            status.conditions.append(Condition(
                type=ConditionType.SUCCEEDED.value, status=ConditionStatus.UNKNOWN,
                reason="Running", message="running", last_transition_time=now()))
        await self.journal.began(status)
        workspace = (workspace_spec(self.workflow, self.uid) if self.workflow.spec.workspace
                     else None)
        if workspace is not None:
            try:
                await self.attempts.retrying(f"preparing the workspace {workspace.name}",
                                             lambda: self.attempts.backend.prepare_workspace(workspace))
            except AgentainerError as error:
                if error.retryable:
                    raise
                return await self._end_without_steps(f"the workspace cannot be used: {error}")
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
        if self.stop_reason in (StopReason.CANCELLED, StopReason.DEADLINE_EXCEEDED):
            await self._stop_leftovers()
        await self._skip_unstarted()
        if self._finally and self._finally_wanted:
            main_stop, main_failed = self.stop_reason, self.failed_step
            await self._run_finally()
            if self.interrupted_by is not None:
                raise self.interrupted_by
            if self.detached:
                return status
            if self.stop_reason is not StopReason.CANCELLED:  # a terminate then stands
                self.state.stop_reason = main_stop
            self.failed_step = main_failed
        elif self._finally:  # being deleted: they are not started
            self._now_running = set(self._finally)
            await self._skip_unstarted()
        self._conclude(timeout)
        await self.journal.ended(status, self.settings.state_ttl_seconds)
        self.emit(EventKind.WORKFLOW_FINISHED,
                  f"workflow {self.workflow.metadata.name} {status.phase.value.lower()}")
        # The outcome is out (its status need not wait for this): the agents, then the
        # workspace they used, are removed as the cleanup policy says.
        await self.attempts.removed()
        if workspace is not None and should_remove(self.workflow.spec.cleanup,
                                                   status.phase is WorkflowPhase.SUCCEEDED):
            try:
                await self.attempts.backend.remove_workspace(workspace)
            except AgentainerError as error:  # the run's outcome stands; the volume stays
                logger.warning("workflow %s: removing its workspace %s failed: %s",
                               self.workflow.metadata.name, workspace.name, error)
        return status

    async def _stop_leftovers(self) -> None:
        """A run stopped on purpose leaves no agent running: those an earlier process started
        and this one never got to adopt (terminated, or past its timeout, as it resumed) are
        stopped now, recorded as such, and removed as the cleanup policy says."""
        backend = self.attempts.backend
        try:
            found = await backend.list_agents(self.workflow.metadata.namespace,
                                              {LABEL_WORKFLOW_UID: self.uid}, self.uid)
            for handle in found:
                if handle.state == "exited":
                    continue
                await backend.stop(handle, self.settings.stop_grace_seconds)
                if should_remove(self.workflow.spec.cleanup, False):
                    await backend.remove(handle)
        except AgentainerError as error:  # the delete handler removes what is left
            logger.warning("workflow %s: stopping its agents failed: %s",
                           self.workflow.metadata.name, error)
        deadline = self.stop_reason is StopReason.DEADLINE_EXCEEDED
        for step in self.status.steps:
            left = [a for a in step.agents if a.phase.live]
            for agent in left:
                agent.phase, agent.finished_at = AgentPhase.FAILED, now()
                agent.reason = AgentReason.DEADLINE_EXCEEDED if deadline else \
                    AgentReason.CANCELLED
                await self.journal.agent(agent, step=step)
            if left and step.phase is not StepPhase.SUCCEEDED:  # skipped as not started
                step.phase = StepPhase.FAILED if deadline else StepPhase.CANCELLED
                step.message = ("stopped: the workflow exceeded its timeout" if deadline
                                else self._cancel_cause)
                step.finished_at = now()
                await self.journal.step(step)

    async def _end_without_steps(self, message: str) -> WorkflowStatus:
        """A run that fails before any step can start."""
        status = self.status
        for step in status.steps:
            step.phase, step.message = StepPhase.SKIPPED, f"not started: {message}"
        self._run_failure = message
        self._conclude(None)
        await self.journal.ended(status, self.settings.state_ttl_seconds)
        self.emit(EventKind.WORKFLOW_FINISHED,
                  f"workflow {self.workflow.metadata.name} failed: {message}")
        return status

    async def _run_finally(self) -> None:
        """The finally steps, once every other step has ended, whatever the outcome: a run
        cancelled or past its timeout gets them too, within the grace period."""
        failed = [step.name for step in self.status.steps if step.name not in self._finally
                  and step.phase in (StepPhase.FAILED, StepPhase.CANCELLED)]
        succeeded = self.stop_reason is None and self.failed_step is None and not failed
        self._outcome = ("Succeeded" if succeeded else "Failed", failed)
        # They may read every other step's output: one that did not succeed (failed, skipped,
        # cancelled, never started) gave none, and reads empty; its phase says why.
        for name in self.steps:
            if name not in self._finally:
                self.outputs.setdefault(name, [])
        self.state.stop_reason, self.failed_step = None, None
        if self.suspended:  # the grace period is short: finally steps are not held back
            self._unsuspended.set()
        self._now_running = set(self._finally)
        grace = time.monotonic() + self.settings.finally_grace_seconds
        try:
            await self._schedule(grace)
        finally:
            await self._stop_steps()
        if not self.detached and self.interrupted_by is None:
            await self._skip_unstarted()

    def _fails(self, step: Step) -> bool:
        """Whether the step failing fails the workflow at once (finally steps fail it only in
        the end, and do not stop each other)."""
        return fails_workflow(step) and step.name not in self._finally

    def _conclude(self, timeout: int | None) -> None:
        status = self.status
        finally_failed = next((step for step in status.steps if step.name in self._finally
                               and step.phase is StepPhase.FAILED), None)
        if self._run_failure is not None:
            status.phase = WorkflowPhase.FAILED
            status.message = self._run_failure
        elif self.stop_reason is StopReason.CANCELLED:
            status.phase = WorkflowPhase.CANCELLED
            status.message = self._cancel_cause
        elif self.stop_reason is StopReason.STOPPED:
            status.phase = WorkflowPhase.STOPPED
            status.message = "stopped: no new step was started after spec.shutdown: Stop"
        elif self.stop_reason is StopReason.DEADLINE_EXCEEDED:
            status.phase = WorkflowPhase.FAILED
            status.message = f"workflow exceeded its timeoutSeconds ({timeout})"
        elif self.failed_step is not None:
            status.phase = WorkflowPhase.FAILED
            failed = status.step(self.failed_step)
            status.message = f"step {failed.name} failed: {failed.message}"
        elif finally_failed is not None:
            status.phase = WorkflowPhase.FAILED
            status.message = f"finally step {finally_failed.name} failed: {finally_failed.message}"
        else:
            status.phase = WorkflowPhase.SUCCEEDED
            status.message = None
        status.finished_at = now()
        reason = self.stop_reason.value if self.stop_reason else status.phase.value
        if self.stop_reason is StopReason.CANCELLED and self._cancel_cause != "cancelled":
            reason = "Terminated"
        message = status.message or "all steps succeeded"
        suspended = [c for c in status.conditions if c.type == ConditionType.SUSPENDED.value]
        status.conditions = [Condition(
            type=ConditionType.COMPLETED.value, status=ConditionStatus.TRUE, reason=reason,
            message=message, last_transition_time=status.finished_at,
        ), Condition(
            type=ConditionType.SUCCEEDED.value, reason=reason, message=message,
            status=ConditionStatus.TRUE if status.phase is WorkflowPhase.SUCCEEDED
            else ConditionStatus.FALSE, last_transition_time=status.finished_at,
        ), *suspended]  # whether it was held back stays said

    def _take_up(self, restored: Restored) -> None:
        """Take up what an earlier process recorded. The run goes on with the spec it started
        with (changed since or not). Steps that succeeded keep their outputs and are not run
        again; agents that were running are adopted by ``_run_unit`` through their labels,
        never started a second time."""
        recorded = restored.workflow
        if recorded.spec is not None and \
                recorded.spec.running_part() != self.workflow.spec.running_part():
            metadata = self.workflow.metadata.model_copy(
                update={"generation": recorded.generation})
            self._plan(self.workflow.model_copy(update={"spec": recorded.spec,
                                                        "metadata": metadata}))
        status = self.status
        status.started_at = restored.workflow.started_at or now()
        for name, agents in restored.agents.items():
            status.step(name).agents.extend(agents)
        for name, state in sorted(restored.steps.items(),
                                  key=lambda item: self._order[item[0]]):
            step = status.step(name)
            step.attempts = len(step.agents)
            step.started_at, step.finished_at = state.started_at, state.finished_at
            step.message = state.message
            step.attempts_before_retry = state.attempts_before_retry
            kept = restored.outputs.get(name, {})
            self.state.output_room = max(0, self.state.output_room - sum(
                len(output.encode()) for output in kept.values()))
            outputs = {index: self._kept(name, output) for index, output in kept.items()}
            self._restored_outputs[name] = outputs
            self.state.units_done += len(outputs)
            if state.phase is StepPhase.SUCCEEDED:
                if self.steps[name].items_from is not None:
                    try:
                        self._resolve_items(self.steps[name])
                    except ItemsError:  # it succeeded with them once: what it recorded stands
                        self.steps[name] = self.steps[name].with_items([None] * len(outputs))
                width = self.steps[name].width
                self._lost_outputs[name] = [i for i in range(width) if i not in outputs]
                self._step_succeeded(self.steps[name], step,
                                     [outputs.get(i, "") for i in range(width)])
            elif state.phase in (StepPhase.FAILED, StepPhase.SKIPPED, StepPhase.CANCELLED):
                step.phase = state.phase
                if (state.message or "").startswith(SKIPPED_BY_CONDITION):
                    self.state.units_total -= self.steps[name].width
                if state.phase is StepPhase.FAILED and self._fails(self.steps[name]):
                    self.failed_step = self.failed_step or name
        status.progress = self.state.progress
        if restored.workflow.phase.finished:
            status.phase = restored.workflow.phase
            status.finished_at = restored.workflow.finished_at
            status.message = restored.workflow.message

    def _kept(self, step: str, output: str) -> str:
        """An agent's output as the run holds it: whole when a step reads it, else its head
        (``output_kept``; the store has it whole). A fan-out of chatty agents (a MiB each)
        would otherwise hold the controller's memory for as long as the run lasts."""
        if self.output_kept is None or step in self._read:
            return output
        return output[:self.output_kept]

    def _step_succeeded(self, step: Step, status: StepStatus, outputs: list[str]) -> None:
        self.outputs[step.name] = outputs
        status.phase = StepPhase.SUCCEEDED
        status.message = None  # what failed on the way is in its agents' reasons
        status.outputs = outputs
        status.output = json.dumps(outputs) if step.fans_out else outputs[0]

    # --- the DAG --------------------------------------------------------------------------------

    def _ready_steps(self) -> list[str]:
        ready = []
        for step in self.status.steps:
            if step.phase is not StepPhase.PENDING or step.name in self._step_tasks or \
                    step.name not in self._now_running:
                continue
            deps = [self.status.step(d) for d in self.dependencies[step.name]]
            # A dependency skipped by its conditions lets the step run (unless the step reads
            # its output: then it is skipped too, saying why).
            if all(d.phase in (StepPhase.SUCCEEDED, StepPhase.SKIPPED) or
                   d.phase is StepPhase.FAILED and not self._fails(self.steps[d.name])
                   for d in deps):
                ready.append(step.name)
        return ready

    async def _schedule(self, deadline: float | None) -> None:
        while True:
            self._wake.clear()
            startable = self.failed_step is None and self.stop_reason is None
            adopting = self.stop_reason in (None, StopReason.STOPPED)
            for name in self._ready_steps():
                # Steps with agents running since an earlier process are taken up whatever
                # holds the others back: those agents finish and are waited for.
                if startable and not self.suspended or adopting and self._live_step(name):
                    self._step_tasks[name] = asyncio.create_task(
                        self._run_step(self.steps[name]), name=f"step-{name}"
                    )
            running = {t for t in self._step_tasks.values() if not t.done()}
            if not running and not (startable and self.suspended and self._ready_steps()):
                break
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                done, _ = await asyncio.wait(running | {waker}, timeout=remaining,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
            for task in done - {waker}:
                if not task.cancelled() and (error := task.exception()) is not None:
                    await self._step_crashed(task, error)
            if deadline is not None and time.monotonic() >= deadline:
                self._stop_for(StopReason.DEADLINE_EXCEEDED)
            if self.stop_reason not in (None, StopReason.STOPPED):
                break
        await self._skip_unstarted()

    def _live_step(self, name: str) -> bool:
        """Whether an earlier process left agents of this step running."""
        return any(agent.phase.live for agent in self.status.step(name).agents)

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
            self._stop_for(StopReason.DETACHED)
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
        self.emit(EventKind.STEP_FINISHED, f"step {name} failed: {message}", status)
        try:
            await self.journal.step(status)
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
            if step.phase is not StepPhase.PENDING or step.name not in self._now_running:
                continue
            failed_deps = [d for d in self.dependencies[step.name]
                           if self.status.step(d).phase not in (StepPhase.SUCCEEDED,
                                                                StepPhase.SKIPPED)]
            step.phase = StepPhase.SKIPPED
            if self.stop_reason is StopReason.CANCELLED:
                step.message = f"not started: the workflow was {self._cancel_cause}"
            elif self.stop_reason is StopReason.STOPPED:
                step.message = "not started: the workflow was stopped"
            elif self.stop_reason is StopReason.DEADLINE_EXCEEDED:
                step.message = "not started: the workflow exceeded its timeout"
            elif failed_deps:
                step.message = f"not started: dependency {failed_deps[0]} did not succeed"
            else:
                step.message = f"not started: step {self.failed_step} failed"
            await self.journal.step(step)

    # --- one step -------------------------------------------------------------------------------

    async def _run_step(self, step: Step) -> bool:
        if (reason := self._skip_reason(step)) is not None:
            return await self._step_skipped(step, reason)
        for name in sorted(step.inputs()):
            if self._lost_outputs.get(name):
                raise StoreDataError(
                    f"step {step.name} reads the outputs of step {name}, but the output of its "
                    f"agent {self._lost_outputs[name][0]} is missing from the store: it was "
                    "lost; run the workflow again")
        status = self.status.step(step.name)
        status.phase = StepPhase.RUNNING
        status.started_at = status.started_at or now()
        if step.items_from is not None and step.parallel is not None \
                and step.parallel.items is None:
            try:
                step = self._resolve_items(step)
            except ItemsError as error:
                return await self._step_refused(step, status, str(error))
        await self.journal.step(status)
        self.emit(EventKind.STEP_STARTED,
                  f"step {step.name} started: {step.width} agent(s), "
                  f"at most {step.max_workers} at once", status)
        results: list[str | None] = [None] * step.width
        failures: list[str] = []
        pending = iter(range(step.width))  # taken one by one: a waiting item costs no task
        base = status.attempts_before_retry or 0
        recorded: dict[int, list[AgentStatus]] = {}
        """Each item's attempts an earlier process (or run, before a retry) recorded, in order."""
        for agent in status.agents:
            if agent.attempt > base:
                recorded.setdefault(agent.index, []).append(agent)
        live = {index for index, agents in recorded.items()
                if any(a.phase.live for a in agents)}
        """Items whose agent an earlier process started: waited for whatever happens since."""

        def stopping() -> bool:  # fail fast: no new agents once something failed
            return bool(failures) or self.failed_step is not None or self.stop_reason is not None

        async def worker() -> None:
            for index in pending:
                if index not in live:
                    await self._unheld()
                    if stopping():
                        continue  # none starts; a later item may have one to wait for
                async with self.state.agents_at_once:
                    if stopping() and index not in live:
                        continue
                    outcome = await self._run_unit(step, status, index,
                                                   recorded.pop(index, []))
                if outcome.succeeded:
                    results[index] = self._kept(step.name, outcome.output)
                else:  # the step's message may be another agent's by now
                    failures.append(outcome.failure or status.message or "failed")

        try:
            # A TaskGroup, unlike gather, waits for every agent to be stopped when cancelled.
            async with asyncio.TaskGroup() as group:
                for number in range(step.max_workers):
                    group.create_task(worker(), name=f"{step.name}-worker-{number}")
        except asyncio.CancelledError:
            if self.state.leaves_agents:
                raise
            deadline = self.stop_reason is StopReason.DEADLINE_EXCEEDED
            status.phase = StepPhase.FAILED if deadline else StepPhase.CANCELLED
            status.message = ("stopped: the workflow exceeded its timeout" if deadline
                              else "cancelled")
            status.finished_at = now()
            await self.journal.step(status)
            self.emit(EventKind.STEP_FINISHED, f"step {step.name} {status.message}", status)
            raise
        status.finished_at = now()
        if not failures and self.stop_reason is StopReason.STOPPED and \
                any(r is None for r in results):
            status.phase = StepPhase.CANCELLED
            status.message = "stopped: the workflow was stopped before all its agents started"
        elif failures or any(r is None for r in results):
            status.phase = StepPhase.FAILED
            # The first failure, which stopped the rest (not whichever came last).
            status.message = failures[0] if failures else "stopped: another step failed"
            if self.failed_step is None and self._fails(step):
                self.failed_step = step.name
        else:
            self._step_succeeded(step, status, [r or "" for r in results])
        await self.journal.step(status)
        self.emit(EventKind.STEP_FINISHED, f"step {step.name} {status.phase.value.lower()}",
                  status)
        return status.phase is StepPhase.SUCCEEDED

    def _context(self) -> templating.Context:
        """What a step's templates see, but an agent's own item."""
        return templating.Context(
            self.workflow.metadata.name, self.uid, outputs=self.outputs,
            params={p.name: p.value for p in self.workflow.spec.params if p.value is not None},
            phases=self._phases(),
            outcome=self._outcome[0] if self._outcome else None,
            failures=self._outcome[1] if self._outcome else [])

    def _phases(self) -> dict[str, str]:
        """How the steps that ended ended: ``{{ steps.NAME.phase }}``."""
        return {step.name: step.phase.value for step in self.status.steps
                if step.phase in (StepPhase.SUCCEEDED, StepPhase.FAILED, StepPhase.SKIPPED)}

    def _skip_reason(self, step: Step) -> str | None:
        # A finally step reads any other step's output, however that step ended.
        phases = {status.name: status.phase for status in self.status.steps
                  if step.name not in self._finally or status.name in self._finally}
        return skip_reason(step, phases, self._context())

    async def _step_skipped(self, step: Step, reason: str) -> bool:
        status = self.status.step(step.name)
        status.phase = StepPhase.SKIPPED
        status.message = f"{SKIPPED_BY_CONDITION}{reason}"
        status.finished_at = now()
        self.state.units_total -= step.width  # they will never run
        self.status.progress = self.state.progress
        await self.journal.step(status)
        self.emit(EventKind.STEP_FINISHED, f"step {step.name} skipped: {reason}", status)
        return True

    def _resolve_items(self, step: Step) -> Step:
        """The ``itemsFrom`` step with its items, taken as the run's (ItemsError if none)."""
        items = items_of(step, self._context(), self.settings.max_items_from)
        resolved = self.steps[step.name] = step.with_items(items)
        self.state.units_total += resolved.width
        self.status.progress = self.state.progress
        return resolved

    async def _step_refused(self, step: Step, status: StepStatus, message: str) -> bool:
        """A step that fails before any agent starts."""
        status.phase = StepPhase.FAILED
        status.message = message
        status.finished_at = now()
        if self._fails(step):
            self.failed_step = self.failed_step or step.name
        await self.journal.step(status)
        self.emit(EventKind.STEP_FINISHED, f"step {step.name} failed: {message}", status)
        return False

    async def _run_unit(self, step: Step, status: StepStatus, index: int,
                        recorded: list[AgentStatus]) -> AttemptOutcome:
        """One item (or replica) of a step, with its retries, after the attempts ``recorded``
        for it before (by an earlier process; a retry counts its attempts afresh)."""
        retries = step.retries.limit if step.retries else 0
        restored = self._restored_outputs.get(step.name, {})
        if index in restored:
            return AttemptOutcome(True, restored[index])  # finished before a restart
        base = status.attempts_before_retry or 0
        attempt = base + 1
        earlier: AgentStatus | None = None
        # Attempts the container engine cut short are not the step's retries (up to a bound).
        uncounted = sum(a.reason is AgentReason.INTERRUPTED for a in recorded)
        if recorded:
            last = recorded[-1]
            if last.phase.live:
                attempt, earlier = last.attempt, last
            elif last.phase is AgentPhase.SUCCEEDED:  # but its output is not in the store
                status.message = (f"agent {last.name} succeeded, but its output is missing "
                                  "from the store: it was lost; run the workflow again")
                return AttemptOutcome(False, retryable=False)
            elif last.attempt - base - min(uncounted, MAX_UNCOUNTED_ATTEMPTS) > retries:
                status.message = status.message or f"agent {last.name} failed"
                return AttemptOutcome(False, retryable=False)
            else:
                attempt = last.attempt + 1
        while True:
            outcome = await self.attempts.run(step, status, index, attempt, earlier,
                                              self.outputs, self._context())
            earlier = None
            if outcome.succeeded or self.stop_reason is not None:
                return outcome
            agent = outcome.agent
            assert agent is not None  # every attempt's outcome has its agent
            if not outcome.counted and uncounted < MAX_UNCOUNTED_ATTEMPTS:
                uncounted += 1
                self.emit(EventKind.AGENT_RETRYING,
                          f"agent {agent.name} was cut short by its container engine; run "
                          "again, not counted as a retry", status, agent)
                await asyncio.sleep(UNCOUNTED_PAUSE_SECONDS)
                attempt += 1
                continue
            counted = attempt - base - uncounted
            if not outcome.retryable or counted > retries:
                return outcome
            assert step.retries is not None
            delay = step.retries.delay(counted)
            self.emit(EventKind.AGENT_RETRYING,
                      f"agent {agent.name} failed ({outcome.failure}); "
                      f"retry {counted} of {retries} in {delay:g}s", status, agent)
            await asyncio.sleep(delay)
            await self._unheld()
            if self.stop_reason is not None:
                return outcome
            attempt += 1


class Engine:
    """Runs Workflows on one backend with one store (and the pools of this process)."""

    def __init__(self, backend: Backend, store: WorkflowStore, settings: Settings,
                 pools: PoolManager | None = None, output_kept: int | None = None) -> None:
        self.backend = backend
        self.store = store
        self.settings = settings
        self.pools = pools
        self.output_kept = output_kept
        """Characters of an output no later step reads that a run's status keeps (None: all
        of it, as ``agentainer run -o json`` prints). The controller keeps what its status
        shows: every output is whole in the store."""

    def prepare(self, workflow: Workflow, observer: Observer | None = None,
                last_known: WorkflowStatus | None = None) -> WorkflowRun:
        """A run of ``workflow``; ``last_known``: the status its resource carries, if any."""
        return WorkflowRun(workflow, self.backend, self.store, self.settings, observer,
                           self.pools, last_known, self.output_kept)

    async def run(self, workflow: Workflow, observer: Observer | None = None) -> WorkflowStatus:
        return await self.prepare(workflow, observer).execute()
