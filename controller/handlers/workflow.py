"""Workflow handlers: a kopf daemon per Workflow runs it through the engine, with its status,
Events and metrics as observers; deletion stops and removes its agents and state."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from controller.agents import workspace_spec
from controller.clock import age_seconds
from controller.backends.base import LABEL_WORKFLOW_UID, WorkspaceSpec
from controller.engine import Engine, Event
from controller.errors import AgentainerError, InvalidSpecError
from controller.handlers import reporting
from controller.handlers.context import Services
from controller.handlers.reporting import WORKFLOWS, StatusWriter
from controller.metrics import WorkflowMetrics
from controller.models import (
    API_GROUP,
    API_VERSION,
    ConditionType,
    WorkflowPhase,
    WorkflowStatus,
    missing_params,
    parse_workflow,
)

DETACH_SECONDS = 20.0  # how long a cancelled daemon waits for its run to let go


async def _refuse(services: Services, body: kopf.Body, kind: ConditionType,
                  message: str) -> None:
    """Record that this Workflow will never run as written."""
    kopf.warn(body, reason=kind.value, message=message)
    await services.patch_status(WORKFLOWS, body.metadata.namespace or "default",
                                body.metadata.name or "",
                                reporting.refused_status(kind, message,
                                                         body.metadata.get("generation")))
    services.workflow_phase(body.metadata.uid or "", WorkflowPhase.FAILED)


# Deletion sets `stopped` and the run stops its agents within seconds; should it not, kopf
# cancels the daemon after cancellation_timeout and the delete handler removes the agents.
@kopf.daemon(API_GROUP, API_VERSION, WORKFLOWS, cancellation_timeout=30.0)
async def run_workflow(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                       logger: kopf.Logger, retry: int, **_: Any) -> None:
    """Reconcile one Workflow: run it to the end (resuming what an earlier controller
    started), or leave it alone when it has ended. Deletion cancels it; the controller
    shutting down detaches from it, so that the agents run on and are adopted on restart."""
    services: Services = memo.services
    phase = (body.get("status") or {}).get("phase")
    if phase in {p.value for p in WorkflowPhase if p.finished}:
        services.workflow_phase(body.metadata.uid or "", WorkflowPhase(phase))
        await _expire(services, body, (body.get("status") or {}).get("finishedAt"), stopped,
                      logger, retry)
        return
    try:
        workflow = parse_workflow(dict(body), f"workflow {body.metadata.name}")
        if missing := missing_params(workflow.spec):
            raise InvalidSpecError(missing)
    except InvalidSpecError as error:
        await _refuse(services, body, ConditionType.INVALID,
                      "; ".join(str(p) for p in error.problems))
        return
    kind = services.backend_kind(workflow.spec.backend)
    try:
        backend = await services.backend(kind)
    except AgentainerError as error:
        if error.retryable:
            raise reporting.reconcile_failed(services, "Workflow", error, retry) from error
        await _refuse(services, body, ConditionType.BACKEND_UNAVAILABLE, str(error))
        return
    writer = StatusWriter(services, body.metadata.namespace or "default",
                          body.metadata.name or "", body.metadata.uid or "", body)
    metrics = WorkflowMetrics(services.metrics, kind.value)
    events = reporting.post_event(body)

    def observe(event: Event, status: WorkflowStatus) -> None:
        writer(event, status)
        metrics(event, status)
        events(event, status)

    run = Engine(backend, services.store, services.settings, services.pools).prepare(
        workflow, observe, reporting.last_known_status(body))
    writer.follow(run.status)
    writer.start()
    execution = asyncio.create_task(run.execute(), name=f"workflow-{workflow.metadata.name}")
    stop = asyncio.ensure_future(stopped.wait())
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
                run.cancel(finally_steps=False)
            else:
                logger.info("controller stopping: leaving the agents to be adopted on restart")
                run.detach()
        await execution
    except AgentainerError as error:
        raise reporting.reconcile_failed(services, "Workflow", error, retry) from error
    finally:
        stop.cancel()
        if run.detached:
            writer.abandon()
        else:
            await _final_status(services, writer, retry)
    if not run.detached:
        await _expire(services, body, run.status.finished_at, stopped, logger, retry)


async def _expire(services: Services, body: kopf.Body, finished_at: str | None,
                  stopped: kopf.DaemonStopped, logger: kopf.Logger, retry: int) -> None:
    """Once a finished Workflow's ``ttlSecondsAfterFinished`` (else the controller's
    AGENTAINER_WORKFLOW_TTL_SECONDS) has passed, delete it: its delete handler then removes
    what it left (kept agents, its workspace, its state in Redis)."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    if ttl is None:
        ttl = services.settings.workflow_ttl_seconds or None
    if ttl is None or not finished_at:
        return
    remaining = ttl - age_seconds(finished_at)
    if remaining > 0 and await stopped.wait(remaining):
        return  # deleted, or the controller is stopping: the next one waits the rest
    name, namespace = body.metadata.name or "", body.metadata.namespace or "default"
    try:
        await services.delete_resource(WORKFLOWS, namespace, name)
    except AgentainerError as error:
        raise reporting.reconcile_failed(services, "Workflow", error, retry) from error
    logger.info("deleted: finished %.0f s ago, past its time to live (%d s)",
                age_seconds(finished_at), ttl)


def _workspace(body: kopf.Body) -> WorkspaceSpec | None:
    """The workspace of a Workflow being deleted, if it has one (and is valid at all)."""
    try:
        workflow = parse_workflow(dict(body))
    except InvalidSpecError:
        return None
    if workflow.spec.workspace is None:
        return None
    return workspace_spec(workflow, body.metadata.uid or "")


async def _final_status(services: Services, writer: StatusWriter, retry: int) -> None:
    """The last word of a run. Should it not land (the API server away), the daemon is run
    again later: it finds the run finished in the store and writes this status then."""
    try:
        await writer.stop()
    except AgentainerError as error:
        raise reporting.reconcile_failed(services, "Workflow", error, retry) from error


@kopf.on.update(API_GROUP, API_VERSION, WORKFLOWS, field="spec")
async def spec_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Workflow runs the spec it started with; a later change is said, in an Event and a
    condition (which its run's status writer keeps while it runs, restarts included)."""
    services: Services = memo.services
    status = body.get("status") or {}
    ignored = reporting.spec_change_ignored(body, status.get("observedGeneration"))
    if ignored is None:
        return
    kopf.warn(body, reason=ignored.type, message=ignored.message)
    if status.get("phase") in {p.value for p in WorkflowPhase if p.finished}:
        conditions = [c for c in status.get("conditions", []) if c.get("type") != ignored.type]
        await services.patch_status(WORKFLOWS, body.metadata.namespace or "default",
                                    body.metadata.name or "",
                                    {"conditions": conditions + reporting.dumped([ignored])})


@kopf.on.delete(API_GROUP, API_VERSION, WORKFLOWS)
async def workflow_deleted(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, retry: int,
                           **_: Any) -> None:
    """Remove every agent the workflow left (kept failed ones too) and its stored state."""
    services: Services = memo.services
    uid = body.metadata.uid or ""
    try:
        backend = await services.backend(
            services.backend_kind((body.get("spec") or {}).get("backend")))
        for agent in await backend.list_agents(body.metadata.namespace or "default",
                                               {LABEL_WORKFLOW_UID: uid}, uid):
            await backend.remove(agent)
        if (workspace := _workspace(body)) is not None:
            await backend.remove_workspace(workspace)
        await services.store.delete(uid)
    except AgentainerError as error:
        raise reporting.reconcile_failed(services, "Workflow", error, retry,
                                         converge=True) from error
    services.workflow_phase(uid, None)
    logger.info("removed the agents and state of the workflow")
