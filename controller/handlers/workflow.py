"""Workflow handlers: a kopf daemon per Workflow runs it through the engine, with its status,
Events and metrics as observers; deletion stops and removes its agents and state."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kopf

from controller.agents import workspace_spec
from controller.clock import age_seconds
from controller.backends.base import LABEL_WORKFLOW_UID, WorkspaceSpec
from controller.engine import Engine, Event, WorkflowRun
from controller.engine.journal import Journal
from controller.errors import AgentainerError, InvalidSpecError
from controller.handlers import reporting
from controller.handlers.context import Services
from controller.handlers.reporting import WORKFLOWS, StatusWriter
from controller.metrics import WorkflowMetrics
from controller.models import (
    API_GROUP,
    API_VERSION,
    RETRY_ANNOTATION,
    ConditionType,
    Shutdown,
    StepPhase,
    WorkflowPhase,
    WorkflowSpec,
    WorkflowStatus,
    missing_params,
    parse_workflow,
)

DETACH_SECONDS = 20.0  # how long a cancelled daemon waits for its run to let go
STOP_SECONDS = 30.0
"""How long kopf lets a daemon asked to stop (its Workflow deleted or finished) end on its own
before cancelling it; a run stops its agents within seconds."""
RELEASE_SECONDS = 60.0
"""How long a daemon whose run ended waits for kopf to see the final phase and stop it: a
daemon stopped so (not one that returned) is started again should a retry reopen the run."""
FINISHED = {phase.value for phase in WorkflowPhase if phase.finished}


def _finished(status: Mapping[str, Any] | None) -> bool:
    return (status or {}).get("phase") in FINISHED


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return not _finished(status)


def _expiring(spec: kopf.Spec, status: kopf.Status, memo: Any, **_: Any) -> bool:
    return _finished(status) and _ttl(spec, memo.services) is not None


def _ttl(spec: Mapping[str, Any] | None, services: Services) -> int | None:
    ttl = (spec or {}).get("ttlSecondsAfterFinished")
    return services.settings.workflow_ttl_seconds or None if ttl is None else int(ttl)


def _steer(services: Services, run: WorkflowRun, body: kopf.Body) -> None:
    """Have the run follow its controls as the resource says them now."""
    spec = body.get("spec") or {}
    try:
        shutdown = Shutdown(spec["shutdown"]) if spec.get("shutdown") else None
    except ValueError:
        shutdown = None  # the schema allows none other; one written around it is ignored
    run.steer(bool(spec.get("suspend")), shutdown)
    services.heeded[run.uid] = body.metadata.get("generation")


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
# cancels the daemon after cancellation_backoff and the delete handler removes the agents.
# Only an unfinished Workflow has one: a retry that makes it unfinished again starts it anew.
@kopf.daemon(API_GROUP, API_VERSION, WORKFLOWS, cancellation_backoff=STOP_SECONDS,
             cancellation_timeout=STOP_SECONDS, when=_unfinished)
async def run_workflow(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                       logger: kopf.Logger, retry: int, **_: Any) -> None:
    """Reconcile one Workflow: run it to the end (resuming what an earlier controller
    started). Deletion cancels it; the controller shutting down detaches from it, so that the
    agents run on and are adopted on restart."""
    services: Services = memo.services
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

    # The status shows at most status_output_limit characters of an output: one more tells
    # that it was cut.
    run = Engine(backend, services.store, services.settings, services.pools,
                 output_kept=services.settings.status_output_limit + 1).prepare(
        workflow, observe, reporting.last_known_status(body))
    writer.follow(run.status, lambda: run.workflow.spec)
    writer.start()
    services.runs[run.uid] = run
    _steer(services, run, body)
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
            elif reason & kopf.DaemonStoppingReason.FILTERS_MISMATCH:
                pass  # its own final phase, written as the run ends: let it end
            else:
                logger.info("controller stopping: leaving the agents to be adopted on restart")
                run.detach()
        await execution
    except AgentainerError as error:
        raise reporting.reconcile_failed(services, "Workflow", error, retry) from error
    finally:
        stop.cancel()
        services.runs.pop(run.uid, None)
        services.heeded.pop(run.uid, None)
        if run.detached:
            writer.abandon()
        else:
            await _final_status(services, writer, retry)
    if not run.detached and not await stopped.wait(RELEASE_SECONDS):
        logger.warning("the final phase was not seen within %.0f s: a retry of this workflow "
                       "starts only after the controller restarts", RELEASE_SECONDS)


@kopf.daemon(API_GROUP, API_VERSION, WORKFLOWS, cancellation_backoff=STOP_SECONDS,
             when=_expiring)
async def expire_workflow(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                          logger: kopf.Logger, retry: int, **_: Any) -> None:
    """Once a finished Workflow's ``ttlSecondsAfterFinished`` (else the controller's
    AGENTAINER_WORKFLOW_TTL_SECONDS) has passed, delete it: its delete handler then removes
    what it left (kept agents, its workspace, its state in Redis). A retry or a change of its
    time to live stops the wait (the filter no longer matches, or matches anew)."""
    services: Services = memo.services
    ttl = _ttl(body.get("spec"), services)
    finished_at = (body.get("status") or {}).get("finishedAt")
    if ttl is None or not finished_at:
        return
    remaining = ttl - age_seconds(finished_at)
    if remaining > 0 and await stopped.wait(remaining):
        return  # deleted, retried, or the controller is stopping: the next one waits the rest
    name, namespace = body.metadata.name or "", body.metadata.namespace or "default"
    try:
        await services.delete_resource(WORKFLOWS, namespace, name)
    except AgentainerError as error:
        raise reporting.reconcile_failed(services, "Workflow", error, retry) from error
    logger.info("deleted: finished %.0f s ago, past its time to live (%d s)",
                age_seconds(finished_at), ttl)


def _finished_phase(status: kopf.Status, **_: Any) -> bool:
    return _finished(status)


@kopf.index(API_GROUP, API_VERSION, WORKFLOWS, when=_finished_phase)
async def finished_phases(uid: str, status: kopf.Status, memo: kopf.Memo, **_: Any) -> None:
    """Note the phase of each finished workflow in the gauge of workflows by phase (running
    ones are noted by their runs as they go). An indexer, as kopf calls one on every event
    without a word; it indexes nothing. Asynchronous and filtered, as it is called on every
    event of every Workflow: kopf runs a synchronous one on a thread."""
    services: Services | None = getattr(memo, "services", None)
    if services is not None:
        services.workflow_phase(uid, WorkflowPhase(status["phase"]))


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


# Neither the spec's changes nor the retry annotation's are told by kopf (which would keep the
# spec last seen in an annotation of each Workflow, one more write per Workflow): each event
# is compared with what the run runs, the status, and the store.


def _unheeded(body: kopf.Body, status: kopf.Status, memo: Any, type: str | None,
              **_: Any) -> bool:
    """A generation of the spec this process has not acted on: one a run here is not steered
    by yet, or one a finished Workflow's status does not account for. Not one of a Workflow
    being deleted (its deletion is a generation too)."""
    services: Services | None = getattr(memo, "services", None)
    uid, generation = body.metadata.uid or "", body.metadata.get("generation")
    if services is None or type == "DELETED" or body.metadata.deletion_timestamp or \
            services.heeded.get(uid, -1) == generation:
        return False
    if uid in services.runs:
        return True
    observed = status.get("observedGeneration")
    return _finished(status) and observed is not None and generation != observed and \
        not reporting.spec_change_recorded(status, generation)


@kopf.on.event(API_GROUP, API_VERSION, WORKFLOWS, when=_unheeded)
async def spec_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                       **_: Any) -> None:
    """Its controls (suspend, shutdown) steer its run at once. Otherwise a Workflow runs the
    spec it started with; a later change is said, in an Event and a condition (which its run's
    status writer keeps while it runs, restarts included). A finished Workflow is compared
    with the spec its run kept in the store: a change of its controls alone is observed, as it
    was while it ran."""
    services: Services = memo.services
    uid, generation = body.metadata.uid or "", body.metadata.get("generation")
    if (run := services.runs.get(uid)) is not None:
        _steer(services, run, body)
        if _changed_from(body, run.workflow.spec):
            ignored = reporting.spec_change_ignored(body, run.status.observed_generation)
            if ignored is not None:
                kopf.warn(body, reason=ignored.type, message=ignored.message)
        return
    try:
        await _note_change_after_the_end(services, body)
    except AgentainerError as error:  # the store or the API server away: its next event
        logger.warning("generation %s of the spec not compared with what ran: %s",
                       generation, error)
        return
    services.heeded[uid] = generation


async def _note_change_after_the_end(services: Services, body: kopf.Body) -> None:
    record = await services.store.workflow(body.metadata.uid or "")
    if record is None or record.spec is None:
        return  # the spec it ran is no longer kept: nothing to compare with
    status = body.get("status") or {}
    namespace, name = body.metadata.namespace or "default", body.metadata.name or ""
    if not _changed_from(body, record.spec):
        if not any(c.get("type") == ConditionType.SPEC_CHANGE_IGNORED.value
                   for c in status.get("conditions", [])):
            await services.patch_status(WORKFLOWS, namespace, name,
                                        {"observedGeneration": body.metadata.get("generation")})
    elif (ignored := reporting.spec_change_ignored(body, status.get("observedGeneration"))):
        kopf.warn(body, reason=ignored.type, message=ignored.message)
        conditions = [c for c in status.get("conditions", []) if c.get("type") != ignored.type]
        await services.patch_status(WORKFLOWS, namespace, name,
                                    {"conditions": conditions + reporting.dumped([ignored])})


def _changed_from(body: kopf.Body, ran: WorkflowSpec) -> bool:
    """Whether the resource's spec says to run other than ``ran`` (its controls aside)."""
    try:
        spec = parse_workflow(dict(body)).spec
    except InvalidSpecError:
        return True
    return spec.running_part() != ran.running_part()


def _retry_asked(body: kopf.Body, status: kopf.Status, **_: Any) -> bool:
    asked = body.metadata.annotations.get(RETRY_ANNOTATION)
    return bool(asked) and status.get("retried") != asked


# kopf looks for the annotation before it calls the filter (which costs it the filter's
# arguments, on every event of every Workflow): most Workflows never have one.
@kopf.daemon(API_GROUP, API_VERSION, WORKFLOWS, cancellation_backoff=STOP_SECONDS,
             annotations={RETRY_ANNOTATION: kopf.PRESENT}, when=_retry_asked)
async def retry_workflow(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                         logger: kopf.Logger, retry: int, **_: Any) -> None:
    """A new value of the retry annotation on a Workflow that failed (or was stopped): run
    again the steps that did not succeed, keeping the outputs of those that did. Each value is
    acted on once (``status.retried`` keeps the last). A daemon, so that a failure (the store
    away) is tried again; it lives until kopf sees the value acted on."""
    new = body.metadata.annotations.get(RETRY_ANNOTATION)
    if new and (body.get("status") or {}).get("retried") != new:
        await _retry(memo.services, body, new, logger, retry)
    if not await stopped.wait(RELEASE_SECONDS):
        logger.warning("the retry %s was not seen acted on within %.0f s: another retry of this "
                       "workflow is acted on only after the controller restarts", new,
                       RELEASE_SECONDS)


async def _retry(services: Services, body: kopf.Body, new: str, logger: kopf.Logger,
                 retry: int) -> None:
    status = dict(body.get("status") or {})
    namespace, name = body.metadata.namespace or "default", body.metadata.name or ""

    async def refuse(why: str) -> None:
        kopf.warn(body, reason="RetryRefused", message=f"retry {new}: {why}")
        await services.patch_status(WORKFLOWS, namespace, name, {"retried": new})

    if not _finished(status):
        return await refuse("the workflow has not finished")
    if status.get("phase") == WorkflowPhase.SUCCEEDED.value:
        return await refuse("it succeeded: nothing to run again (resubmit runs it anew)")
    if shutdown := (body.get("spec") or {}).get("shutdown"):
        return await refuse(f"spec.shutdown is {shutdown}, which would stop the run again at "
                            "once: remove it, then retry (agentainer retry does both)")
    try:
        workflow = parse_workflow(dict(body), f"workflow {name}")
    except InvalidSpecError as error:
        return await refuse(f"its spec is invalid: {error}")
    last_known = reporting.last_known_status(body)
    try:
        again = None if last_known is None or not any(
            step.agents or step.phase is not StepPhase.PENDING for step in last_known.steps
        ) else await Journal(services.store, workflow, body.metadata.uid or "").reopen(
            last_known)
    except AgentainerError as error:
        raise reporting.reconcile_failed(services, "Workflow", error, retry) from error
    if again is None:
        return await refuse("it never ran: fix what stopped it and resubmit")
    await services.patch_status(WORKFLOWS, namespace, name,
                                reporting.retried_status(status, again, new))
    message = f"retry {new}: running again " + ", ".join(again)
    kopf.info(body, reason="Retrying", message=message)
    logger.info(message)


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
    services.heeded.pop(uid, None)
    logger.info("removed the agents and state of the workflow")
