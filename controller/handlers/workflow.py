"""Workflow handlers: a kopf daemon per Workflow runs it through the engine, writes its status,
posts Events; deletion stops and removes its agents and state."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from controller.backends.base import LABEL_WORKFLOW_UID
from controller.engine import Event, EventKind, WorkflowRun, compact_status, now
from controller.errors import AgentainerError, InvalidSpecError
from controller.handlers.context import Context
from controller.metrics import WorkflowMetrics
from controller.models import (
    API_GROUP,
    API_VERSION,
    Backend,
    Condition,
    ConditionStatus,
    StepPhase,
    WorkflowPhase,
    WorkflowStatus,
    parse_workflow,
)

PLURAL = "workflows"
DETACH_SECONDS = 20.0  # how long a cancelled daemon waits for its run to let go


class StatusWriter:
    """Engine observer that writes the status to the resource, at most once per interval."""

    def __init__(self, context: Context, body: kopf.Body, run: WorkflowRun) -> None:
        self.context = context
        self.namespace = body.metadata.namespace or "default"
        self.name = body.metadata.name or ""
        self.run = run
        self._dirty = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __call__(self, event: Event, status: WorkflowStatus) -> None:
        self._dirty.set()
        self.context.workflow_phase(self.run.uid, status.phase)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"status-{self.name}")

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            if self._closing.is_set():
                return
            self._dirty.clear()
            try:
                await self.flush()
            except AgentainerError as error:
                logging.getLogger(__name__).warning("status of %s: %s", self.name, error)
            try:  # the interval between writes, cut short by stop()
                await asyncio.wait_for(self._closing.wait(),
                                       self.context.settings.status_interval_seconds)
            except TimeoutError:
                pass

    async def flush(self) -> None:
        status = compact_status(self.run.status, self.context.settings.status_output_limit)
        extra = self.context.extra_conditions.get(self.run.uid, [])
        status["conditions"] = status.get("conditions", []) + [
            c.model_dump(mode="json", by_alias=True) for c in extra]
        await self.context.patch_status(PLURAL, self.namespace, self.name, status)

    async def stop(self) -> None:
        """Write the final status. The loop is let finish, not cancelled: a patch it has in
        flight runs on in its thread whatever happens to the task, and landing after the final
        one it would put an older status back."""
        self._closing.set()
        self._dirty.set()
        if self._task is not None:
            await self._task
        await self.flush()

    def abandon(self) -> None:
        """Stop writing without a last word (the run was detached; another process goes on)."""
        if self._task is not None:
            self._task.cancel()


def post_event(body: kopf.Body) -> Any:
    """Engine observer that posts Kubernetes Events for what people care about: starts, ends,
    failures and retries (not one per agent, which a large fan-out would flood)."""

    def observe(event: Event, status: WorkflowStatus) -> None:
        step = event.step
        match event.kind:
            case EventKind.WORKFLOW_STARTED:
                kopf.info(body, reason="Started", message=event.message)
            case EventKind.STEP_STARTED:
                kopf.info(body, reason="StepStarted", message=event.message)
            case EventKind.STEP_FINISHED if step is not None:
                if step.phase is StepPhase.SUCCEEDED:
                    kopf.info(body, reason="StepSucceeded", message=event.message)
                elif step.phase is StepPhase.FAILED:
                    kopf.warn(body, reason="StepFailed", message=f"step {step.name}: "
                              f"{step.message}")
            case EventKind.AGENT_RETRYING:
                kopf.warn(body, reason="Retrying", message=event.message)
            case EventKind.WORKFLOW_FINISHED:
                if status.phase is WorkflowPhase.SUCCEEDED:
                    kopf.info(body, reason="Succeeded", message=event.message)
                else:
                    kopf.warn(body, reason=status.phase.value,
                              message=status.message or event.message)

    return observe


def refused_status(reason: str, message: str, generation: int | None) -> dict[str, Any]:
    """The status of a Workflow that will never run as written."""
    at = now()
    return WorkflowStatus(
        phase=WorkflowPhase.FAILED, message=message, observed_generation=generation,
        started_at=at, finished_at=at,
        conditions=[Condition(type=reason, status=ConditionStatus.TRUE, reason=reason,
                              message=message, last_transition_time=at)],
    ).to_dict()


# Deletion sets `stopped` and the run stops its agents within seconds; should it not, kopf
# cancels the daemon after cancellation_timeout and the delete handler removes the agents.
@kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=30.0)
async def run_workflow(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                       logger: kopf.Logger, **_: Any) -> None:
    """Reconcile one Workflow: run it to the end (resuming what an earlier controller
    started), or leave it alone when it has ended. Deletion cancels it; the controller
    shutting down detaches from it, so that the agents run on and are adopted on restart."""
    context: Context = memo.context
    uid = body.metadata.uid or ""
    phase = (body.get("status") or {}).get("phase")
    if phase in {p.value for p in WorkflowPhase if p.finished}:
        context.workflow_phase(uid, WorkflowPhase(phase))
        return
    try:
        workflow = parse_workflow(dict(body), f"workflow {body.metadata.name}")
    except InvalidSpecError as error:
        message = "; ".join(str(p) for p in error.problems)
        kopf.warn(body, reason="Invalid", message=message)
        await context.patch_status(PLURAL, body.metadata.namespace or "default",
                                   body.metadata.name or "",
                                   refused_status("Invalid", message, body.metadata.get("generation")))
        context.workflow_phase(uid, WorkflowPhase.FAILED)
        return
    backend_name = workflow.spec.backend or Backend(context.settings.default_backend)
    try:
        backend = await context.backend(backend_name.value)
    except AgentainerError as error:
        if error.retryable:
            raise kopf.TemporaryError(str(error), delay=error.delay) from error
        kopf.warn(body, reason="BackendUnavailable", message=str(error))
        await context.patch_status(PLURAL, body.metadata.namespace or "default",
                                   body.metadata.name or "",
                                   refused_status("BackendUnavailable", str(error),
                                                  body.metadata.get("generation")))
        context.workflow_phase(uid, WorkflowPhase.FAILED)
        return
    run = WorkflowRun(workflow, backend, context.store, context.settings, pools=context.pools)
    writer = StatusWriter(context, body, run)
    metrics = WorkflowMetrics(context.metrics, backend_name.value)
    events = post_event(body)

    def observe(event: Event, status: WorkflowStatus) -> None:
        writer(event, status)
        metrics(event, status)
        events(event, status)

    run.observer = observe
    writer.start()
    execution = asyncio.create_task(run.execute(), name=f"workflow-{workflow.metadata.name}")
    stop = asyncio.ensure_future(_until_stopped(stopped))
    try:
        try:
            await asyncio.wait({execution, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # kopf cancels daemons outright when the operator exits.
            logger.info("controller stopping: leaving the agents to be adopted on restart")
            run.detach()
            await asyncio.wait({execution}, timeout=DETACH_SECONDS)
            raise
        if not execution.done():
            reason = stopped.reason or kopf.DaemonStoppingReason(0)
            if reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
                logger.info("workflow deleted: stopping its agents")
                run.cancel()
            else:
                logger.info("controller stopping: leaving the agents to be adopted on restart")
                run.detach()
        await execution
    except AgentainerError as error:
        context.metrics.reconcile_errors.labels("Workflow", type(error).__name__).inc()
        raise kopf.TemporaryError(str(error), delay=error.delay) from error
    finally:
        stop.cancel()
        if run.detached:
            writer.abandon()
        else:
            await writer.stop()


async def _until_stopped(stopped: kopf.DaemonStopped) -> None:
    await stopped.wait()


@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
async def spec_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Workflow runs the spec it started with; later changes are recorded and ignored."""
    context: Context = memo.context
    status = body.get("status") or {}
    running = status.get("observedGeneration")
    generation = body.metadata.get("generation")
    message = (f"spec changed to generation {generation} after generation "
               f"{running} started; a Workflow runs the spec it started with (delete and "
               "re-create it to run the new one)")
    condition = Condition(type="SpecChangeIgnored", status=ConditionStatus.TRUE,
                          reason="SpecChangedAfterStart", message=message,
                          last_transition_time=now())
    uid = body.metadata.uid or ""
    context.extra_conditions[uid] = [condition]
    kopf.warn(body, reason="SpecChangeIgnored", message=message)
    if context.phases.get(uid) in {p for p in WorkflowPhase if p.finished}:
        conditions = [c for c in status.get("conditions", []) if c.get("type") != condition.type]
        conditions.append(condition.model_dump(mode="json", by_alias=True))
        await context.patch_status(PLURAL, body.metadata.namespace or "default",
                                   body.metadata.name or "", {"conditions": conditions})


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
async def workflow_deleted(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                           **_: Any) -> None:
    """Remove every agent the workflow left (kept failed ones too) and its stored state."""
    context: Context = memo.context
    uid = body.metadata.uid or ""
    backend_name = (body.get("spec") or {}).get("backend") or context.settings.default_backend
    try:
        backend = await context.backend(backend_name)
        for agent in await backend.list_agents({LABEL_WORKFLOW_UID: uid}):
            await backend.remove(agent)
        await context.store.delete(uid)
    except AgentainerError as error:
        context.metrics.reconcile_errors.labels("Workflow", type(error).__name__).inc()
        raise kopf.TemporaryError(str(error), delay=error.delay) from error
    context.workflow_phase(uid, None)
    context.extra_conditions.pop(uid, None)
    logger.info("removed the agents and state of the workflow")
