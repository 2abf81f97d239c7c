"""One attempt of one item (or replica) of a step: an agent of its own, started (or adopted after
a restart) and waited for, or a task on an agent leased from a pool; then recorded, reported
and cleaned up the same way whichever it was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from controller import templating
from controller.agents import agent_id, build_agent_spec, check_exec_limits, should_remove
from controller.backends.base import (
    LABEL_AGENT_ID,
    LABEL_WORKFLOW_UID,
    AgentHandle,
    AgentResult,
    AgentSpec,
    Backend,
)
from controller.clock import age_seconds, now
from controller.config import Settings
from controller.engine.events import Emitter, EventKind
from controller.engine.journal import Journal
from controller.errors import (
    AgentainerError,
    AgentInterruptedError,
    AgentLostError,
    ConflictError,
    NotFoundError,
    PoolUnavailableError,
)
from controller.models import (
    AgentPhase,
    AgentReason,
    AgentStatus,
    Step,
    StepStatus,
    Workflow,
    WorkflowStatus,
)
from controller.pools import Lease, PoolManager

logger = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_RETRY_PAUSE_SECONDS = 0.5
"""The first pause before a call that failed for now is made again; each next one doubles."""
RETRY_PAUSE_CAP_SECONDS = 10.0

# Where the backend enforces deadlines (pods' activeDeadlineSeconds), the engine waits this
# much longer before killing the agent itself, so that the backend's reason is the one reported.
BACKEND_DEADLINE_MARGIN_SECONDS = 30


class StopReason(StrEnum):
    CANCELLED = "Cancelled"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    DETACHED = "Detached"
    STOPPED = "Stopped"
    """No new step or agent starts; those running finish (the others stop them)."""


@dataclass
class RunState:
    """What a run shares with its attempts: its progress, and whether it is being stopped."""

    units_total: int
    agents_at_once: asyncio.Semaphore
    """Held by each agent (with its retries) while it runs: the run's cap on agents at once."""
    output_room: int
    """Bytes of outputs the run may still keep whole (its workflow's limit less what it kept)."""
    units_done: int = 0
    stop_reason: StopReason | None = None
    outputs_cut: bool = False
    """An output was cut for want of room (said once)."""

    @property
    def progress(self) -> str:
        return f"{self.units_done}/{self.units_total}"

    @property
    def leaves_agents(self) -> bool:
        """Agents are stopped only when the run is stopped on purpose (cancel, deadline). When
        it is detached, or cancelled from outside (the process is going away), they run on,
        to be adopted by whoever resumes the workflow."""
        return self.stop_reason not in (StopReason.CANCELLED, StopReason.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class AttemptOutcome:
    succeeded: bool
    output: str = ""
    retryable: bool = True
    counted: bool = True
    """False when the container engine cut the attempt short: not one of the step's retries."""
    agent: AgentStatus | None = None
    """The attempt's agent (None: no attempt ran; a step's list of agents ends with whichever
    started last)."""
    failure: str = ""
    """Why the attempt failed (the step's message may be another agent's by the time it is
    read)."""


@dataclass
class Attempts:
    """Runs the attempts of one workflow run."""

    workflow: Workflow
    uid: str
    backend: Backend
    pools: PoolManager | None
    settings: Settings
    journal: Journal
    emit: Emitter
    state: RunState
    status: WorkflowStatus
    removals: set[asyncio.Task[None]] = field(default_factory=set)
    """Removals of ended agents under way."""
    waiting: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per step, its agents that wait for something outside them (a node), and what."""

    async def run(self, step: Step, status: StepStatus, index: int, attempt: int,
                  earlier: AgentStatus | None, outputs: dict[str, list[str]],
                  shared: templating.Context | None = None) -> AttemptOutcome:
        """One attempt. ``earlier``: the agent an earlier process recorded as started for it
        (adopted when its container runs on; a pooled task is run again: its lease went)."""
        spec = build_agent_spec(self.workflow, self.uid, step, index, attempt, outputs, shared)
        place: _Place = _Leased(self, step, spec) if step.pool else _Started(self, step, spec)
        handle = await place.adoptable(earlier)
        agent = earlier
        if agent is None:
            agent = AgentStatus(id=agent_id(step.name, index, attempt), name=place.name,
                                index=index, attempt=attempt, phase=AgentPhase.CREATED,
                                created_at=now())
            status.agents.append(agent)
            status.attempts += 1
        if handle is None:
            await self.journal.agent(agent, step=status)
        try:
            if handle is None:
                check_exec_limits(spec)
                handle = await place.start(agent, status)
            else:
                place.adopt(agent, status)
            result, reason = await place.result(handle, agent, status)
        except asyncio.CancelledError:
            await asyncio.shield(place.let_go())
            if self.state.leaves_agents:
                raise  # the agent runs on, to be adopted
            handle = handle or await place.starting()
            await asyncio.shield(self._abort(agent, handle if place.owned else None, status))
            raise
        except AgentainerError as error:
            await asyncio.shield(place.let_go())
            if error.retryable and not isinstance(error, AgentLostError):
                # The backend or the store is away, not the agent: nothing failed. The run
                # lets go; whoever resumes it adopts the agent (or runs a pooled task again).
                raise
            return await self._errored(agent, handle, status, error, place.owned)
        return await self._finished(agent, handle, result, reason, status, step, place.owned)

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call``, again after a growing pause while it fails for now (the engine restarting,
        the API server away), for up to ``backend_retry_seconds``; then its error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.backend_retry_seconds
        pause = FIRST_RETRY_PAUSE_SECONDS
        while True:
            try:
                return await call()
            except AgentainerError as error:
                if not error.retryable or isinstance(error, AgentLostError) or \
                        loop.time() + pause > deadline:
                    raise
                logger.warning("%s failed for now, again in %gs: %s", what, pause, error)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_PAUSE_CAP_SECONDS)

    async def _errored(self, agent: AgentStatus, handle: AgentHandle | None,
                       status: StepStatus, error: AgentainerError,
                       owned: bool) -> AttemptOutcome:
        agent.phase = AgentPhase.FAILED
        agent.reason = (AgentReason.INTERRUPTED if isinstance(error, AgentInterruptedError)
                        else AgentReason.LOST if isinstance(error, AgentLostError)
                        else AgentReason.BACKEND_ERROR)
        agent.finished_at = now()
        status.message = str(error)
        await self.journal.agent(agent, handle.id if handle else "", status)
        self.emit(EventKind.AGENT_FINISHED, f"agent {agent.name} failed: {error}", status, agent)
        if handle is not None and owned:
            await self._cleanup(handle, succeeded=False)
        return AttemptOutcome(False, retryable=error.retryable,
                              counted=not isinstance(error, AgentInterruptedError),
                              agent=agent, failure=str(error))

    async def _finished(self, agent: AgentStatus, handle: AgentHandle, result: AgentResult,
                        reason: AgentReason, status: StepStatus, step: Step,
                        owned: bool) -> AttemptOutcome:
        succeeded = reason is AgentReason.COMPLETED
        agent.phase = AgentPhase.SUCCEEDED if succeeded else AgentPhase.FAILED
        agent.exit_code = result.exit_code
        agent.reason = reason
        agent.output_truncated = result.output_truncated or None
        agent.finished_at = now()
        output = result.stdout.strip()
        failure = "" if succeeded else _failure_message(agent, step, result)
        if succeeded:
            output = self._room_for(output, agent, status)
            self.state.units_done += 1
            self.status.progress = self.state.progress
        else:
            status.message = failure
        await self.journal.agent_ended(agent, handle.id, status, self.status,
                                       output if succeeded else None, result.stderr)
        self.emit(EventKind.AGENT_FINISHED,
                  f"agent {agent.name} {agent.phase.value.lower()} (exit {result.exit_code})",
                  status, agent)
        if owned:
            await self._cleanup(handle, succeeded)
        return AttemptOutcome(succeeded, output, agent=agent, failure=failure)

    def _room_for(self, output: str, agent: AgentStatus, status: StepStatus) -> str:
        """``output`` as the run keeps it: whole while the workflow's outputs fit in their
        limit, else its head as the status shows it, the agent's output marked truncated."""
        state = self.state
        size = len(output.encode())
        if size > state.output_room and \
                len(output) > (shown := self.settings.status_output_limit):
            output = output[:shown]
            size = len(output.encode())
            agent.output_truncated = True
            if not state.outputs_cut:
                state.outputs_cut = True
                limit = self.settings.workflow_output_limit_bytes
                self.emit(EventKind.OUTPUTS_CUT,
                          f"the outputs of this workflow passed {limit} bytes "
                          f"(AGENTAINER_WORKFLOW_OUTPUT_LIMIT_BYTES): from agent {agent.name} "
                          f"on, an output is kept to its first "
                          f"{self.settings.status_output_limit} characters (outputTruncated)",
                          status, agent)
        state.output_room = max(0, state.output_room - size)
        return output

    def told_waiting(self, agent: AgentStatus, status: StepStatus, why: str | None) -> None:
        """An agent that has not begun to run waits for something outside it (``why``), or
        no longer does (None): its step's message says what the first of its waiting agents
        waits for, and how many more wait; it is cleared once none does."""
        waits = self.waiting.setdefault(status.name, {})
        before = _waiting_message(waits)
        if why is None:
            waits.pop(agent.name, None)
        else:
            waits[agent.name] = why
        after = _waiting_message(waits)
        if not waits:
            self.waiting.pop(status.name, None)
        if after == before:
            return
        if why is not None or status.message == before:  # another message is left as it is
            status.message = after
        self.emit(EventKind.AGENT_WAITING, f"agent {agent.name} waits: {why}" if why else "",
                  status, agent)

    async def _abort(self, agent: AgentStatus, handle: AgentHandle | None,
                     status: StepStatus) -> None:
        """The run is being stopped: stop this agent, record it, clean up per the policy."""
        if handle is not None:
            try:
                await self.backend.stop(handle, self.settings.stop_grace_seconds)
            except AgentainerError as error:
                logger.warning("could not stop agent %s: %s", agent.name, error)
        agent.phase = AgentPhase.FAILED
        agent.reason = (AgentReason.DEADLINE_EXCEEDED
                        if self.state.stop_reason is StopReason.DEADLINE_EXCEEDED
                        else AgentReason.CANCELLED)
        agent.finished_at = now()
        try:
            await self.journal.agent(agent, handle.id if handle else "", status)
        except AgentainerError as error:
            logger.warning("could not record agent %s: %s", agent.name, error)
        self.emit(EventKind.AGENT_FINISHED, f"agent {agent.name} stopped ({agent.reason})",
                  status, agent)
        if handle is not None:
            await self._cleanup(handle, succeeded=False)

    async def _cleanup(self, handle: AgentHandle, succeeded: bool) -> None:
        """Remove an ended agent per the cleanup policy, in the background: neither the next
        step nor the run's final status waits for it; the run does, once its outcome is out."""
        if not should_remove(self.workflow.spec.cleanup, succeeded):
            return
        removal = asyncio.create_task(self._remove(handle), name=f"remove-{handle.name}")
        self.removals.add(removal)
        removal.add_done_callback(self.removals.discard)

    async def _remove(self, handle: AgentHandle) -> None:
        try:
            await self.backend.remove(handle)
        except AgentainerError as error:
            logger.warning("could not remove agent %s: %s", handle.name, error)
        except Exception:  # nobody awaits its outcome: said here, never lost
            logger.exception("removing agent %s failed unexpectedly", handle.name)

    async def removed(self) -> None:
        """Wait for the removals under way (each ends: the backend's calls have deadlines)."""
        while self.removals:
            await asyncio.wait(set(self.removals))


class _Place:
    """Where an attempt's agent comes from, and how its result is had."""

    owned = True
    """The agent is the attempt's own: stopped when the run is, removed per the cleanup."""

    def __init__(self, attempts: Attempts, step: Step, spec: AgentSpec) -> None:
        self.attempts = attempts
        self.step = step
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    async def adoptable(self, earlier: AgentStatus | None) -> AgentHandle | None:
        return None

    def adopt(self, agent: AgentStatus, status: StepStatus) -> None:
        raise NotImplementedError

    async def start(self, agent: AgentStatus, status: StepStatus) -> AgentHandle:
        raise NotImplementedError

    async def result(self, handle: AgentHandle, agent: AgentStatus,
                     status: StepStatus) -> tuple[AgentResult, AgentReason]:
        raise NotImplementedError

    async def starting(self) -> AgentHandle | None:
        """The agent whose start the cancellation cut off, once it has started."""
        return None

    async def let_go(self) -> None:
        """The attempt ends without a result: give back what it holds of others."""

    async def _running(self, agent: AgentStatus, handle: AgentHandle, status: StepStatus,
                       message: str) -> None:
        agent.name = handle.name
        agent.phase = AgentPhase.RUNNING
        agent.started_at = now()
        await self.attempts.journal.agent(agent, handle.id)
        self.attempts.emit(EventKind.AGENT_STARTED, message, status, agent)


class _Started(_Place):
    """A container or pod of the attempt's own. Starting it is idempotent: its name and labels
    are the attempt's, so one that exists already is this attempt's, adopted, never started a
    second time, whether or not the store remembers it."""

    _start: asyncio.Future[tuple[AgentHandle, bool]] | None = None
    _deadline: float | None = None

    async def adoptable(self, earlier: AgentStatus | None) -> AgentHandle | None:
        """The container of an agent recorded by an earlier process, if it got to start."""
        return await self._existing() if earlier is not None else None

    async def _existing(self) -> AgentHandle | None:
        """This attempt's agent, found by its labels; one that was only created (its start
        cut off) is removed, to be started afresh under the same name."""
        found = await self._find()
        for handle in found:
            if handle.state != "created":
                return handle
        for handle in found:
            await self.attempts.backend.remove(handle)
        return None

    async def _find(self) -> list[AgentHandle]:
        backend = self.attempts.backend
        labels = {LABEL_WORKFLOW_UID: self.attempts.uid,
                  LABEL_AGENT_ID: self.spec.labels[LABEL_AGENT_ID]}
        namespace, owner = self.spec.namespace, self.attempts.workflow.metadata.uid
        return await self.attempts.retrying(f"finding agent {self.spec.name}",
                                            lambda: backend.list_agents(namespace, labels, owner))

    def adopt(self, agent: AgentStatus, status: StepStatus) -> None:
        agent.phase = AgentPhase.RUNNING
        agent.started_at = agent.started_at or now()
        self._set_deadline(agent.started_at)
        self.attempts.emit(EventKind.AGENT_STARTED, f"agent {agent.name} adopted", status,
                           agent)

    def _set_deadline(self, started_at: str | None) -> None:
        """An attempt's deadline counts from when its agent started, before any restart."""
        timeout: float | None = self.step.timeout_seconds
        if timeout and self.attempts.backend.enforces_deadlines:
            timeout += BACKEND_DEADLINE_MARGIN_SECONDS  # the backend's own deadline first
        if timeout:
            self._deadline = (asyncio.get_running_loop().time() + timeout
                              - age_seconds(started_at))

    async def start(self, agent: AgentStatus, status: StepStatus) -> AgentHandle:
        # Shielded: a start cut off half-way would leave an agent nobody knows of.
        self._start = asyncio.ensure_future(self._launch())
        handle, adopted = await asyncio.shield(self._start)
        if adopted:  # started before, by a process whose record of it was lost
            self.adopt(agent, status)
            await self.attempts.journal.agent(agent, handle.id)
        else:
            await self._running(agent, handle, status, f"agent {agent.name} started")
            self._set_deadline(agent.started_at)
        return handle

    async def _launch(self) -> tuple[AgentHandle, bool]:
        """Start the agent, or find it started already; True when it was found."""
        backend = self.attempts.backend
        for _ in range(3):  # a start cut off after creating it leaves it to be removed first
            try:
                return await self.attempts.retrying(f"starting agent {self.spec.name}",
                                                    lambda: backend.start(self.spec)), False
            except ConflictError:
                found = await self._find()
                if not found:
                    raise  # the name is held by something that is not this attempt's
                existing = await self._existing()
                if existing is not None:
                    return existing, True
        raise ConflictError(f"agent {self.spec.name} was created, removed and created again "
                            "by someone else meanwhile")

    async def result(self, handle: AgentHandle, agent: AgentStatus,
                     status: StepStatus) -> tuple[AgentResult, AgentReason]:
        try:
            return await self._result(handle, agent, status)
        finally:
            self.attempts.told_waiting(agent, status, None)  # whatever it waited for is over

    async def _result(self, handle: AgentHandle, agent: AgentStatus,
                      status: StepStatus) -> tuple[AgentResult, AgentReason]:
        backend = self.attempts.backend
        loop = asyncio.get_running_loop()

        def waiting(why: str | None) -> None:
            self.attempts.told_waiting(agent, status, why)

        try:
            remaining = None if self._deadline is None else max(0.0, self._deadline - loop.time())
            async with asyncio.timeout(remaining):
                result = await self.attempts.retrying(f"watching agent {agent.name}",
                                                      lambda: backend.wait(handle, waiting))
        except TimeoutError:
            await self.attempts.retrying(f"stopping agent {agent.name}",
                                         lambda: backend.stop(handle, 0))
            result = await self.attempts.retrying(f"watching agent {agent.name}",
                                                  lambda: backend.wait(handle))
            return result, AgentReason.DEADLINE_EXCEEDED
        except (NotFoundError, ConflictError) as error:  # gone, or being removed
            raise AgentLostError(f"agent {agent.name} was lost before it ended: its container "
                                 f"or pod is gone (deleted, evicted or preempted): {error}"
                                 ) from error
        if result.interrupted:
            agent.exit_code = result.exit_code
            raise AgentInterruptedError(
                f"agent {agent.name} was stopped by its container engine as the engine shut "
                f"down (exit {result.exit_code}), not by itself: it runs again")
        return result, (AgentReason.OOM_KILLED if result.oom_killed else
                        AgentReason.DEADLINE_EXCEEDED if result.deadline_exceeded else
                        AgentReason.COMPLETED if result.exit_code == 0 else AgentReason.ERROR)

    async def starting(self) -> AgentHandle | None:
        """Cancelled while the backend was creating it: let that finish, so that it can be
        stopped and no agent is left behind."""
        if self._start is None:
            return None
        try:
            return (await self._start)[0]
        except (AgentainerError, asyncio.CancelledError):
            return None


class _Leased(_Place):
    """A task on an agent leased from the step's pool; the pool cleans and keeps the agent.
    A task cut off by a restart is run again: its agent was reclaimed with its lease."""

    owned = False
    _lease: Lease

    @property
    def name(self) -> str:
        return f"{self.step.pool} (leasing)"

    async def start(self, agent: AgentStatus, status: StepStatus) -> AgentHandle:
        pools, pool_name = self.attempts.pools, self.step.pool or ""
        if pools is None:
            raise PoolUnavailableError(
                f"AgentPool {pool_name} is not available: put it in the same file as the "
                "workflow (agentainer run) or create it in the workflow's namespace")
        pool = await pools.find(self.attempts.workflow.metadata.namespace, pool_name,
                                self.attempts.settings.pool_wait_seconds)
        self._lease = await pools.lease(pool)
        handle = self._lease.agent
        await self._running(agent, handle, status, f"agent {handle.name} leased from "
                            f"{pool_name} in {self._lease.waited * 1000:.1f} ms")
        return handle

    async def let_go(self) -> None:
        """A lease taken but not run (the store failed right after, say) is given back, not
        left to a renewer that would hold the agent for ever."""
        lease = getattr(self, "_lease", None)
        if lease is not None and self.attempts.pools is not None:
            try:
                await self.attempts.pools.release(lease, keep=False)
            except AgentainerError as error:
                logger.warning("returning %s failed (its lease lapses): %s", lease.agent.name,
                               error)

    async def result(self, handle: AgentHandle, agent: AgentStatus,
                     status: StepStatus) -> tuple[AgentResult, AgentReason]:
        assert self.attempts.pools is not None
        argv = [*(self.spec.command or []), *(self.spec.args or [])]
        pools = self.attempts.pools
        try:
            task = await self.attempts.retrying(
                f"running a task on {handle.name}",
                lambda: pools.run(self._lease, argv, self.spec.env, self.step.timeout_seconds,
                                  self.spec.env_refs))
        except TimeoutError:  # its runner stopped answering: the agent is replaced
            return AgentResult(137, "", ""), AgentReason.DEADLINE_EXCEEDED
        return (AgentResult(task.exit_code, task.stdout, task.stderr,
                            deadline_exceeded=task.timed_out,
                            output_truncated=task.stdout_truncated),
                AgentReason.DEADLINE_EXCEEDED if task.timed_out else
                AgentReason.COMPLETED if task.exit_code == 0 else AgentReason.ERROR)


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


def _waiting_message(waits: dict[str, str]) -> str | None:
    """A step's message while agents of it wait: the first's, and how many more wait."""
    if not waits:
        return None
    name, why = next(iter(waits.items()))
    more = len(waits) - 1
    return f"agent {name} waits: {why}" + (f" (and {more} more agents of the step wait)"
                                            if more else "")
