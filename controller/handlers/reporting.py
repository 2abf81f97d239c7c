"""What the handlers tell Kubernetes: statuses, conditions and Events, and errors as kopf's retries.

The one place where the project's errors become kopf's: a retryable error becomes a
TemporaryError whose delay doubles with every retry of the same handler (up to five minutes), the
rest a PermanentError, after the caller has recorded a False condition that names the reason.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kopf
import pydantic

from controller.clock import now
from controller.engine import Event, EventKind, Observer
from controller.errors import AgentainerError, InvalidSpecError
from controller.handlers.context import Services, Urgency
from controller.models import (
    AgentCounts,
    AgentPhase,
    AgentStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    StepPhase,
    StepStatus,
    WorkflowPhase,
    WorkflowSpec,
    WorkflowStatus,
    parse_workflow,
)

logger = logging.getLogger(__name__)

WORKFLOWS = "workflows"
BACKOFF_CAP_SECONDS = 300.0


# --- errors as kopf's retries -------------------------------------------------------------------


def backoff(error: AgentainerError, retry: int) -> float:
    """Seconds before the next try of a handler that has failed ``retry`` times already: the
    error's own hint (or a second), doubled with every retry, at most five minutes."""
    return float(min((error.delay or 1.0) * 2 ** min(retry, 16), BACKOFF_CAP_SECONDS))


def to_kopf(error: AgentainerError, retry: int,
            converge: bool = False) -> kopf.TemporaryError | kopf.PermanentError:
    """The kopf error to raise for ``error``. ``converge``: the resource is converged on for as
    long as it exists (a pool's image may be loaded later, a deletion's rights granted later),
    so even an error that is not retryable is retried, with the same growing delay."""
    if error.retryable or converge:
        return kopf.TemporaryError(str(error), delay=backoff(error, retry))
    return kopf.PermanentError(str(error))


def reconcile_failed(services: Services, kind: str, error: AgentainerError, retry: int,
                     converge: bool = False) -> kopf.TemporaryError | kopf.PermanentError:
    """:func:`to_kopf`, counted in the metrics by kind and error."""
    services.metrics.reconcile_errors.labels(kind, type(error).__name__).inc()
    return to_kopf(error, retry, converge)


def error_reason(error: AgentainerError) -> str:
    """A condition's reason for an error: its class, in one CamelCase word."""
    return type(error).__name__.removesuffix("Error") or "Error"


# --- conditions ---------------------------------------------------------------------------------


def condition(kind: ConditionType, true: bool, reason: str, message: str,
              previous: Iterable[dict[str, Any]] = ()) -> Condition:
    """A condition whose ``lastTransitionTime`` moves only when its status changes."""
    status = ConditionStatus.TRUE if true else ConditionStatus.FALSE
    old = next((c for c in previous if c.get("type") == kind.value), {})
    since = old.get("lastTransitionTime") if old.get("status") == status.value else None
    return Condition(type=kind.value, status=status, reason=reason, message=message,
                     last_transition_time=since or now())


def dumped(conditions: Iterable[Condition]) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json", by_alias=True) for c in conditions]


def spec_change_ignored(body: kopf.Body, running: int | None) -> Condition | None:
    """SpecChangeIgnored, when the Workflow's spec changed after its run started with
    generation ``running``: a Workflow runs the spec it started with."""
    generation = body.metadata.get("generation")
    if running is None or generation is None or generation == running:
        return None
    message = (f"spec changed to generation {generation} after generation {running} started; "
               "a Workflow runs the spec it started with (delete and re-create it to run the "
               "new one)")
    return condition(ConditionType.SPEC_CHANGE_IGNORED, True, "SpecChangedAfterStart",
                     message, (body.get("status") or {}).get("conditions", []))


def spec_change_recorded(status: Mapping[str, Any] | None, generation: int | None) -> bool:
    """Whether the status's SpecChangeIgnored condition already tells of that generation."""
    return any(c.get("type") == ConditionType.SPEC_CHANGE_IGNORED.value and
               str(c.get("message", "")).startswith(f"spec changed to generation {generation} ")
               for c in (status or {}).get("conditions", []))


# --- a Workflow's status and Events -------------------------------------------------------------


TEXT_SHARES = 32
"""The outputs and messages of a Workflow's status keep at most this many times
``status_output_limit`` characters in all (each at most once that), so that a workflow of 200
steps keeps its resource far below etcd's limit too."""
SHOWN_FIRST = (AgentPhase.CREATED, AgentPhase.RUNNING), (AgentPhase.FAILED,)
"""Which agents the status lists first when it cannot list all: those still going, then the
failed ones; the last of the rest fill what room is left."""


def compact_status(status: WorkflowStatus, output_limit: int,
                   agent_limit: int) -> dict[str, Any]:
    """The status as written to the custom resource, small whatever the size of the workflow:
    each step's agents counted by phase but at most ``agent_limit`` of them listed over all
    steps (:func:`shown_agents`), outputs and messages cut (``output_limit`` characters each,
    less when they are many: :func:`text_limit`), full output lists left out. The full status
    is the engine's (``agentainer run -o json`` prints it), and every agent is in the store."""
    shown = shown_agents(status.steps, agent_limit)
    lengths = [min(len(text), output_limit) for step in status.steps
               for text in (step.output, step.message) if text is not None]
    limit = text_limit(lengths, output_limit * TEXT_SHARES)
    steps = []
    for step, agents in zip(status.steps, shown, strict=True):
        compact = step.model_copy(update={
            "agents": agents, "outputs": None,
            "agent_counts": agent_counts(step.agents),
            "agents_omitted": len(step.agents) - len(agents) or None})
        if step.output is not None and len(step.output) > limit:
            compact.output = step.output[:limit]
            compact.output_truncated = True
        if step.message is not None and len(step.message) > limit:
            compact.message = step.message[:limit] + "..."
        steps.append(compact)
    return status.model_copy(update={"steps": steps}).to_dict()


def text_limit(lengths: list[int], budget: int) -> int:
    """The most characters each of texts of these ``lengths`` may keep so that together they
    keep at most ``budget``: the short ones keep all they have, leaving the rest to the long
    ones, which share it evenly."""
    remaining = budget
    for left, length in zip(range(len(lengths), 0, -1), sorted(lengths), strict=True):
        share = remaining // left
        if length > share:
            return share
        remaining -= length
    return max(lengths, default=0)


def shown_agents(steps: list[StepStatus], limit: int) -> list[list[AgentStatus]]:
    """Per step, the agents worth listing, at most ``limit`` over all steps, each step's in
    their order. All of them when there are no more; else the running ones, then the failed,
    then the last ones; within each kind the latest of every step before the second latest of
    any, so that every step shows its own."""
    ranked: list[tuple[tuple[int, int, int], int, int]] = []
    for step_number, step in enumerate(steps):
        seen = [0] * (len(SHOWN_FIRST) + 1)
        for position in reversed(range(len(step.agents))):
            phase = step.agents[position].phase
            kind = next((k for k, phases in enumerate(SHOWN_FIRST) if phase in phases),
                        len(SHOWN_FIRST))
            ranked.append(((kind, seen[kind], step_number), step_number, position))
            seen[kind] += 1
    chosen: list[list[int]] = [[] for _ in steps]
    for _, step_number, position in heapq.nsmallest(limit, ranked):
        chosen[step_number].append(position)
    return [[step.agents[p] for p in sorted(positions)]
            for step, positions in zip(steps, chosen, strict=True)]


def agent_counts(agents: list[AgentStatus]) -> AgentCounts | None:
    """How many of these agents are in each phase; None when there are none."""
    if not agents:
        return None
    counts = collections.Counter(agent.phase for agent in agents)
    return AgentCounts(created=counts[AgentPhase.CREATED] or None,
                       running=counts[AgentPhase.RUNNING] or None,
                       succeeded=counts[AgentPhase.SUCCEEDED] or None,
                       failed=counts[AgentPhase.FAILED] or None)


def refused_status(kind: ConditionType, message: str, generation: int | None) -> dict[str, Any]:
    """The status of a Workflow that will never run as written."""
    at = now()
    return WorkflowStatus(
        phase=WorkflowPhase.FAILED, message=message, observed_generation=generation,
        started_at=at, finished_at=at,
        conditions=[condition(kind, True, kind.value, message),
                    condition(ConditionType.COMPLETED, True, kind.value, message),
                    condition(ConditionType.SUCCEEDED, False, kind.value, message)],
    ).to_dict()


def retried_status(status: dict[str, Any], again: list[str], request: str) -> dict[str, Any]:
    """The status patch of a finished Workflow retried: running again, the steps in ``again``
    Pending (their agents kept as history), the others as they ended."""
    steps = []
    for step in status.get("steps") or []:
        if step.get("name") in again:
            agents = step.get("agents") or []
            step = {key: value for key, value in {
                "name": step["name"], "phase": StepPhase.PENDING.value, "agents": agents,
                "agentCounts": step.get("agentCounts"),
                "agentsOmitted": step.get("agentsOmitted"),
                "attempts": step.get("attempts", 0),
                "attemptsBeforeRetry": max((a.get("attempt", 0) for a in agents), default=0)
                or None}.items() if value is not None}
        steps.append(step)
    return {"phase": WorkflowPhase.RUNNING.value, "finishedAt": None,
            "message": "retrying " + ", ".join(again), "retried": request,
            "retries": (status.get("retries") or 0) + 1, "steps": steps,
            "conditions": dumped([Condition(
                type=ConditionType.SUCCEEDED.value, status=ConditionStatus.UNKNOWN,
                reason="Retrying", message="running again what did not succeed",
                last_transition_time=now())])}


def last_known_status(body: kopf.Body) -> WorkflowStatus | None:
    """The status the resource carries, for a run whose store lost what it had done; None when
    it has none, or one that cannot be read (written by hand, or by another version)."""
    status = body.get("status")
    if not status:
        return None
    try:
        return WorkflowStatus.model_validate(dict(status))
    except pydantic.ValidationError as error:
        logger.warning("workflow %s: its status cannot be read, so it is not resumed from it: "
                       "%s", body.metadata.name, error.errors()[:1])
        return None


class StatusWriter:
    """Engine observer that writes the status to the resource, at most once per interval."""

    def __init__(self, services: Services, namespace: str, name: str, uid: str,
                 body: kopf.Body | None = None) -> None:
        self.services = services
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.body = body
        """The resource, as kopf keeps it up to date: its generation now, against the one the
        run started with, says whether its spec changed since."""
        self._status: WorkflowStatus | None = None  # the run's, as the engine keeps it
        self._running: Callable[[], WorkflowSpec] | None = None
        self._checked: int | None = None  # the last generation compared with the run's spec
        self._dirty = asyncio.Event()
        self._closing = asyncio.Event()
        self._hurry = asyncio.Event()  # cuts a pause short: the final status, or stop()
        self._task: asyncio.Task[None] | None = None
        self._counted = False  # among the services' running writers
        self._sending = False  # a write of it has left for the API server
        self._landed: dict[str, Any] | None = None  # the last status the API server took

    def follow(self, status: WorkflowStatus,
               running: Callable[[], WorkflowSpec] | None = None) -> None:
        """Write this status, the run's (the engine keeps it up to date): even a run restored
        as finished, which has nothing left to say, gets its final status written.
        ``running``: the spec the run runs, against which a new generation is compared."""
        self._status = status
        self._running = running

    def _observe_controls(self, body: kopf.Body, status: WorkflowStatus) -> None:
        """A new generation that changed only the spec's controls (suspend, shutdown, its time
        to live) is the one being run: they steer the run, they do not change it."""
        generation = body.metadata.get("generation")
        if self._running is None or generation is None or \
                generation in (status.observed_generation, self._checked):
            return
        self._checked = generation
        try:
            spec = parse_workflow(dict(body)).spec
        except InvalidSpecError:
            return
        if spec.running_part() == self._running().running_part():
            status.observed_generation = generation

    def __call__(self, event: Event, status: WorkflowStatus) -> None:
        self._status = status
        self._dirty.set()
        if status.phase.finished:
            self._hurry.set()
        self.services.workflow_phase(self.uid, status.phase)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"status-{self.name}")
        self.services.running += 1
        self._counted = True

    async def _loop(self) -> None:
        """Each change a moment (the status interval) after it came, with all that came
        meanwhile, the first too: a run's start and its first agent's make one write, and the
        few changes of a short agent (created, running, ended) one more, or none when the run
        ends in that moment, its final status saying them all. Under load the moment after a
        change of a run already shown grows with the interval between writes (a short agent's
        changes then come with its end); the start's does not, so a run shows as Running
        within the interval whatever the load. Writes are the interval apart at least. The
        final status is written as soon as the run's outcome is out (before its clean-up)."""
        window = self.services.settings.status_interval_seconds
        while True:
            await self._dirty.wait()
            if not self._final():
                await self._pause(self.services.status_interval() if self._written else window)
            if self._closing.is_set():
                return
            final = self._final()
            self._dirty.clear()
            try:
                await self.flush(Urgency.LAST_WORD if final else
                                 Urgency.PROGRESS if self._written else Urgency.FIRST)
            except AgentainerError as error:
                logger.warning("status of %s: %s", self.name, error)
            except Exception:  # whatever it was, the next write may land: never stop writing
                logger.exception("status of %s: the write failed unexpectedly", self.name)

    def _final(self) -> bool:
        return self._status is not None and self._status.phase.finished

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, cut short by the final status or stop()."""
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._hurry.wait()
        except TimeoutError:
            pass

    async def flush(self, urgency: Urgency = Urgency.LAST_WORD) -> None:
        if self._status is None or self._status.phase is WorkflowPhase.PENDING and \
                self._status.started_at is None:
            # The run has not begun (its store away as it read what was done): its empty
            # status would put the resource's, a running workflow's, back to Pending.
            return
        made: dict[str, Any] | None = None

        def sent() -> dict[str, Any] | None:
            """The status as it is when the write's turn has come (the write leaves now), or
            None when it is the one the API server last took (nothing to write: a progress
            write that, waiting its turn, came to carry the final status makes the final one
            idle)."""
            nonlocal made
            made = self._made_now()
            if made == self._landed:
                return None
            self._sending = True
            return made

        try:
            await self.services.patch_status(WORKFLOWS, self.namespace, self.name, sent,
                                             urgency)
        finally:
            self._sending = False
        if made is not None:
            self._landed = made

    @property
    def _written(self) -> bool:
        """Its first status has landed."""
        return self._landed is not None

    def _made_now(self) -> dict[str, Any]:
        assert self._status is not None
        settings = self.services.settings
        status = compact_status(self._status, settings.status_output_limit,
                                settings.status_agent_limit)
        # A merge patch keeps what it does not name: the message of before ("retrying ...",
        # written with the retry) would stay on a run that ended without one.
        status.setdefault("message", None)
        if self.body is not None:
            self._observe_controls(self.body, self._status)
            ignored = spec_change_ignored(self.body, self._status.observed_generation)
            status["conditions"] = status.get("conditions", []) + dumped(
                [ignored] if ignored else [])
        return status

    async def stop(self) -> None:
        """Write the final status. A write of the loop that has left is let land first (it
        runs on in its thread whatever happens to the task, and landing after the final one
        it would put an older status back); one still waiting for its turn is called off."""
        self._closing.set()
        self._hurry.set()
        self._dirty.set()
        self._forget()
        if self._task is not None:
            if not self._sending:
                self._task.cancel()
            await asyncio.wait({self._task})
        await self.flush()

    def abandon(self) -> None:
        """Stop writing without a last word (the run was detached; another process goes on)."""
        self._forget()
        if self._task is not None:
            self._task.cancel()

    def _forget(self) -> None:
        """No longer counted among the running writers (once)."""
        if self._counted:
            self._counted = False
            self.services.running -= 1


def post_event(body: kopf.Body) -> Observer:
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
            case EventKind.OUTPUTS_CUT:
                kopf.warn(body, reason="OutputsCut", message=event.message)
            case EventKind.AGENT_WAITING if event.message:  # not once it no longer waits
                kopf.warn(body, reason="AgentWaiting", message=event.message)
            case EventKind.WORKFLOW_SUSPENDED:
                kopf.info(body, reason="Suspended", message=event.message)
            case EventKind.WORKFLOW_RESUMED:
                kopf.info(body, reason="Resumed", message=event.message)
            case EventKind.WORKFLOW_STOPPING:
                kopf.info(body, reason="Stopping", message=event.message)
            case EventKind.WORKFLOW_FINISHED:
                if status.phase is WorkflowPhase.SUCCEEDED:
                    kopf.info(body, reason="Succeeded", message=event.message)
                else:
                    kopf.warn(body, reason=status.phase.value,
                              message=status.message or event.message)

    return observe
