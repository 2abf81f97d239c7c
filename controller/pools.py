"""AgentPools: warm agents of one image, leased to pooled steps and returned after each task.

Backend-neutral and kopf-free. The pool's truth is in the store (agents, the idle set, leases
with a TTL), so that several processes can share a pool and a crashed one loses nothing; the
containers themselves are found again by their labels.

A task: lease (the warmest idle agent, or a new one up to ``maxSize``, or wait at most
``leaseTimeoutSeconds``), run it through the agent's task runner (which ends every process the
task left and removes every file it left), run the ``resetCommand`` hook, return the agent. An
agent is replaced instead of returned when its runner could not prove it clean, its task was
cancelled or its runner stopped answering, its reset failed, it is gone, or it has served
``maxUses`` tasks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from controller.agents import build_pool_agent_spec
from controller.backends import runner
from controller.backends.base import (
    LABEL_POOL_UID,
    LABEL_RUNNER,
    AgentHandle,
    AgentSpec,
    Backend,
    TaskResult,
)
from controller.config import Settings
from controller.errors import AgentainerError, AgentLostError, PoolUnavailableError
from controller.models import AgentPool, AgentPoolStatus, EnvSource
from controller.store import PoolAgent, PoolStore

logger = logging.getLogger(__name__)

RESET_TIMEOUT_SECONDS = 30.0
PENDING = "pending-"
# Tasks waiting for an agent look for agents whose holder died at most this often.
RECLAIM_SECONDS = 1.0
FIRST_LOOK_SECONDS = 0.05
LOOK_CAP_SECONDS = 1.0
"""The task first in turn for a full pool looks again in the store after FIRST_LOOK_SECONDS,
then twice as long each time up to LOOK_CAP_SECONDS, for what other processes return; an
agent returned, or a place freed, in this process wakes it at once."""


class PoolEventKind(StrEnum):
    LEASED = "leased"            # value: seconds waited for the agent
    TASK_DONE = "task_done"      # value: seconds the task took on the agent
    RECYCLED = "recycled"        # an agent served maxUses tasks
    REPLACED = "replaced"        # an agent died, timed out, failed its reset, or was reclaimed


@dataclass(frozen=True)
class PoolEvent:
    kind: PoolEventKind
    pool: str
    value: float = 0.0


PoolObserver = Callable[[PoolEvent], None]


@dataclass
class Lease:
    """An agent held by one task, until it is released (whatever ends the task)."""

    pool: PoolState
    agent: AgentHandle
    holder: str
    waited: float
    renewer: asyncio.Task[None] | None = None
    released: bool = False


@dataclass
class PoolState:
    """One pool as this process knows it."""

    pool: AgentPool
    uid: str
    backend: Backend
    handles: dict[str, AgentHandle] = field(default_factory=dict)
    returned: asyncio.Event = field(default_factory=asyncio.Event)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by the one task of this process looking for an agent; the others queue for it."""
    busy: int = 0
    starting: int = 0
    """Agents this process is starting: draining waits for their starts to return."""
    draining: bool = False
    reclaimed_at: float = 0.0
    """When a task waiting here last looked for agents whose holder died (monotonic)."""

    @property
    def name(self) -> str:
        return self.pool.metadata.name

    @property
    def owner(self) -> str | None:
        """The uid its agents' ownerReference names (the resource's: none for a pool of a
        file that `agentainer run` runs)."""
        return self.uid if self.pool.metadata.uid else None


def _record(handle: AgentHandle) -> PoolAgent:
    return PoolAgent(name=handle.name, id=handle.id, labels=dict(handle.labels))


def _placeholder(spec: AgentSpec) -> str:
    """The name a reserved place is held under while its agent starts: it names the agent, so
    that reconcile leaves it to its starter, and is held like a lease: should the starter die,
    it lapses and the place is taken back."""
    return f"{PENDING}{spec.name}"


class PoolManager:
    """Every pool of one process: leases, tasks, reconciliation, draining."""

    def __init__(self, store: PoolStore, settings: Settings,
                 observer: PoolObserver | None = None) -> None:
        self.store = store
        self.settings = settings
        self.observer = observer
        self.pools: dict[tuple[str, str], PoolState] = {}
        self.drained: set[str] = set()  # uids of pools deleted here: never warmed up again
        self.holder = f"{secrets.token_hex(4)}"

    def _emit(self, kind: PoolEventKind, state: PoolState, value: float = 0.0) -> None:
        if self.observer is not None:
            self.observer(PoolEvent(kind, state.name, value))

    # --- registry -------------------------------------------------------------------------------

    def register(self, pool: AgentPool, uid: str, backend: Backend) -> PoolState:
        """Know this pool (again): its spec may have changed; its agents stay."""
        key = (pool.metadata.namespace, pool.metadata.name)
        state = self.pools.get(key)
        if state is None or state.uid != uid:
            state = self.pools[key] = PoolState(pool, uid, backend)
        state.pool = pool
        state.draining = state.draining or uid in self.drained
        return state

    async def find(self, namespace: str, name: str, wait_seconds: float) -> PoolState:
        """The pool, waiting up to ``wait_seconds`` for it to appear: a Workflow and its
        AgentPool applied together may reach the controller in either order."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                return self.get(namespace, name)
            except PoolUnavailableError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.2)

    def get(self, namespace: str, name: str) -> PoolState:
        state = self.pools.get((namespace, name))
        if state is None or state.draining:
            raise PoolUnavailableError(
                f"AgentPool {name} is not available in namespace {namespace}"
                + (" (it is being deleted)" if state else ""))
        return state

    # --- leasing and tasks ----------------------------------------------------------------------

    async def lease(self, state: PoolState) -> Lease:
        """The warmest idle agent, a new one while below maxSize, or wait for one; a clear
        error after ``leaseTimeoutSeconds``.

        Tasks waiting here take turns, first come first served: only the first looks (in the
        store, and is woken by an agent returned in this process), so that a thousand waiting
        tasks cost the store what one does. One that finds room for a new agent starts it out
        of turn, for itself: the next in turn looks meanwhile, so that a pool grows by as many
        agents at once as tasks wait for them."""
        started = time.monotonic()
        deadline = started + state.pool.spec.lease_timeout_seconds
        holder = f"{self.holder}-{secrets.token_hex(4)}"
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await state.turn.acquire()
            except TimeoutError:
                raise self._all_busy(state) from None
            try:
                found = await self._look(state, holder, deadline)
            finally:
                state.turn.release()
            if isinstance(found, AgentSpec):
                new = await self._start(state, found, holder)
                if new is None:
                    continue  # its place lapsed as it started: a reconcile adopts it
                found = new
            lease = Lease(state, found, holder, time.monotonic() - started)
            lease.renewer = asyncio.create_task(self._keep_held(state.uid, found.name, holder))
            state.busy += 1
            self._emit(PoolEventKind.LEASED, state, lease.waited)
            return lease

    async def _look(self, state: PoolState, holder: str,
                    deadline: float) -> AgentHandle | AgentSpec:
        """In turn: an idle agent leased to ``holder``, or the spec of one to start in a place
        reserved for it, waiting until the deadline for either."""
        ttl_ms = self.settings.lease_ttl_seconds * 1000
        pause = FIRST_LOOK_SECONDS
        while True:
            if state.draining:
                raise PoolUnavailableError(f"AgentPool {state.name} is being deleted")
            state.returned.clear()  # before looking: a return from now on wakes the wait
            agent_id = await self.store.pool_acquire(state.uid, holder, ttl_ms)
            if agent_id is not None:
                handle = await self._known_handle(state, agent_id)
                if handle is not None:
                    return handle
                await self.store.pool_remove(state.uid, agent_id)
                continue
            if (spec := await self._reserve(state)) is not None:
                return spec
            if time.monotonic() - state.reclaimed_at > RECLAIM_SECONDS:
                state.reclaimed_at = time.monotonic()
                if await self._reclaim(state):
                    continue  # an agent whose holder died left room: grow into it
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._all_busy(state)
            try:  # a return in this process wakes us at once; other processes' in the pause
                async with asyncio.timeout(min(pause, remaining)):
                    await state.returned.wait()
                pause = FIRST_LOOK_SECONDS
            except TimeoutError:
                pause = min(pause * 2, LOOK_CAP_SECONDS)

    @staticmethod
    def _all_busy(state: PoolState) -> PoolUnavailableError:
        return PoolUnavailableError(
            f"AgentPool {state.name}: all {state.pool.spec.max_size} agents stayed busy "
            f"for leaseTimeoutSeconds ({state.pool.spec.lease_timeout_seconds}s)")

    async def _known_handle(self, state: PoolState, agent_id: str) -> AgentHandle | None:
        """The agent a lease in the store names. What the store says is data to check, not
        authority (whoever could write to it could send the next task, env and all, into a
        pod of their choice): an agent this process did not start itself must be one the
        backend lists as this pool's (in its namespace, owned by it), under the same name and
        id. None for anything else, whose record is then dropped."""
        handle = state.handles.get(agent_id)
        if handle is not None:
            return handle
        record = (await self.store.pool_agents(state.uid)).get(agent_id)
        real = (await self._containers(state)).get(agent_id)
        if record is None or real is None or record.id != real.id:
            logger.warning("pool %s: the store names agent %s (id %r), which is not one of "
                           "the pool's own: record dropped", state.name, agent_id,
                           record.id if record else None)
            return None
        state.handles[agent_id] = real
        return real

    async def _grow(self, state: PoolState, up_to: int | None = None) -> bool:
        """Start one more agent if the pool (every process's share of it) is below ``up_to``
        (default maxSize); False when it is full."""
        spec = await self._reserve(state, up_to)
        if spec is None:
            return False
        await self._start(state, spec)
        return True

    async def _reserve(self, state: PoolState, up_to: int | None = None) -> AgentSpec | None:
        """A place for one more agent if the pool (every process's share of it) is below
        ``up_to`` (default maxSize): the spec of the agent to start in it; None when full."""
        if state.draining:
            return None
        limit = min(up_to if up_to is not None else state.pool.spec.max_size,
                    state.pool.spec.max_size)
        spec = build_pool_agent_spec(state.pool, state.uid)
        if not await self.store.pool_reserve(state.uid, _placeholder(spec), limit,
                                             self.holder,
                                             self.settings.lease_ttl_seconds * 1000):
            return None
        return spec

    async def _start(self, state: PoolState, spec: AgentSpec,
                     holder: str = "") -> AgentHandle | None:
        """Start the agent of a reserved place and record it, idle, or leased to ``holder``
        when one is given; None when its place lapsed while it started (the store away)."""
        placeholder = _placeholder(spec)
        holding = asyncio.create_task(self._keep_held(state.uid, placeholder, self.holder))
        state.starting += 1
        try:
            handle = await state.backend.start(spec)
        except BaseException:
            holding.cancel()
            await asyncio.shield(self.store.pool_remove(state.uid, placeholder))
            state.returned.set()  # its place is free again
            raise
        finally:
            state.starting -= 1
        holding.cancel()
        state.handles[handle.name] = handle
        if not await self.store.pool_add(state.uid, _record(handle), replaces=placeholder,
                                         holder=holder,
                                         ttl_ms=self.settings.lease_ttl_seconds * 1000):
            # Its place lapsed while it started (the store was away): a reconcile adopts it.
            logger.info("pool %s: %s started after its place lapsed", state.name, handle.name)
            return None
        if not holder:
            state.returned.set()
        return handle

    async def _keep_held(self, uid: str, agent: str, holder: str) -> None:
        """Renew a lease (or a placeholder's) every third of its time to live."""
        period = self.settings.lease_ttl_seconds / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self.store.pool_renew(uid, agent, holder,
                                            self.settings.lease_ttl_seconds * 1000)
            except AgentainerError as error:
                logger.warning("renewing the lease of %s: %s", agent, error)

    async def run(self, lease: Lease, argv: list[str], env: dict[str, str],
                  timeout: float | None,
                  env_refs: Mapping[str, EnvSource] | None = None) -> TaskResult:
        """Run one task on a leased agent, then return it, or replace it when its runner could
        not prove it clean (or the ``resetCommand`` hook failed, or anything went wrong).

        The engine away for now (its error retryable, the agent not lost) is found before the
        task is sent: the lease is kept, for the caller to try again or let go. ``env_refs``
        are read (from the pool's namespace) just before the task is sent, with it alone."""
        state = lease.pool
        if env_refs:
            try:
                env = env | await state.backend.env_values(state.pool.metadata.namespace,
                                                           env_refs)
            except AgentainerError as error:
                if not error.retryable:  # nothing ran: the agent is as clean as it was
                    await asyncio.shield(self.release(lease, keep=True))
                raise
        keep, held = False, False
        started = time.monotonic()
        try:
            result = await state.backend.run_task(lease.agent, argv, env, timeout)
            self._emit(PoolEventKind.TASK_DONE, state, time.monotonic() - started)
            keep = self._clean(lease, result, "its task") and await self._reset(lease)
            return result
        except AgentainerError as error:
            held = error.retryable and not isinstance(error, AgentLostError)
            raise
        finally:
            if not held:
                await asyncio.shield(self.release(lease, keep))

    @staticmethod
    def _clean(lease: Lease, result: TaskResult, what: str) -> bool:
        if not result.clean:
            logger.warning("pool %s: replacing %s, which its runner could not prove clean "
                           "after %s: %s", lease.pool.name, lease.agent.name, what, result.note)
        return result.clean

    async def _reset(self, lease: Lease) -> bool:
        command = lease.pool.pool.spec.reset_command
        if not command:
            return True
        try:
            result = await lease.pool.backend.run_task(lease.agent, command, {},
                                                       RESET_TIMEOUT_SECONDS)
        except (AgentainerError, TimeoutError) as error:
            logger.warning("resetting %s failed: %s", lease.agent.name, error)
            return False
        if result.exit_code != 0 or result.timed_out:
            logger.warning("resetting %s exited %d: %s", lease.agent.name, result.exit_code,
                           result.stderr.strip()[-200:])
            return False
        return self._clean(lease, result, "its resetCommand")

    async def release(self, lease: Lease, keep: bool) -> None:
        """Return the agent to the idle set, or replace it; once per lease."""
        if lease.released:
            return
        lease.released = True
        state = lease.pool
        if lease.renewer is not None:
            lease.renewer.cancel()
        state.busy -= 1
        uses = await self.store.pool_release(state.uid, lease.agent.name, lease.holder, keep,
                                             state.pool.spec.max_uses)
        if uses > 0:
            state.returned.set()
        else:
            await self._retire(state, lease.agent, recycled=keep and uses == 0)

    async def _retire(self, state: PoolState, agent: AgentHandle, recycled: bool) -> None:
        """Remove an agent for good; the pool is topped up to minSize again. An agent that
        cannot be removed now (the engine away) stays recorded, held for a lease's time: then
        a reconcile, or a task waiting for an agent, takes it up again."""
        try:
            await state.backend.remove(agent)
        except AgentainerError as error:
            logger.warning("pool %s: removing %s failed, again later: %s", state.name,
                           agent.name, error)
            return
        await self.store.pool_remove(state.uid, agent.name)
        state.handles.pop(agent.name, None)
        state.returned.set()  # its place is free: a task waiting may start an agent in it
        self._emit(PoolEventKind.RECYCLED if recycled else PoolEventKind.REPLACED, state)
        if not state.draining and state.pool.spec.warm_up:
            await self._top_up(state)

    async def _top_up(self, state: PoolState) -> None:
        while await self._grow(state, up_to=state.pool.spec.min_size):
            pass

    # --- reconciliation -------------------------------------------------------------------------

    async def reconcile(self, state: PoolState) -> AgentPoolStatus:
        """Converge the pool on its spec and report it; a converged pool is left alone.

        Agents whose container stopped are dropped (and so replaced); containers of the pool
        that the store does not know (started by a process that died before recording them)
        are adopted as idle; agents whose lease lapsed (their holder died) are replaced;
        agents idle longer than ``idleTimeoutSeconds`` above ``minSize`` are removed; then the
        pool is topped up to ``minSize`` (with ``warmUp``) and trimmed to ``maxSize``.
        """
        spec = state.pool.spec
        if state.draining:
            return await self.status(state)
        containers = await self._containers(state)
        records = await self.store.pool_agents(state.uid)
        starting = set()
        for name, record in list(records.items()):
            if record.pending_since is not None:  # being started, here or by another process
                starting.add(name.removeprefix(PENDING))
                del records[name]
        for name, handle in containers.items():
            if name in starting:
                continue  # its starter records it (or removes it) when it is up
            if handle.state != "running" or \
                    handle.labels.get(LABEL_RUNNER) != runner.VERSION_LABEL_VALUE:
                # Stopped, or started by a controller whose runner spoke another protocol.
                await state.backend.remove(handle)
                if name in records:
                    await self.store.pool_remove(state.uid, name)
                    self._emit(PoolEventKind.REPLACED, state)
                records.pop(name, None)
            elif name not in records:
                await self.store.pool_add(state.uid, _record(handle))
                records[name] = _record(handle)
        if any(name not in containers for name in records):
            # Recorded since the listing (just started), or gone: look again before dropping.
            containers = await self._containers(state)
        for name in [n for n in records if n not in containers]:
            await self.store.pool_remove(state.uid, name)
            self._emit(PoolEventKind.REPLACED, state)
            del records[name]
        # Neither idle nor leased nor being started, in one atomic read: its holder died, and
        # it is out of the pool before anyone can lease it. Its state is unknown: replace it.
        for name in await self._reclaim(state, containers):
            records.pop(name, None)
        keep = spec.min_size if spec.warm_up else 0
        for name in await self.store.pool_take_idle(
                state.uid, time.time() - spec.idle_timeout_seconds, keep):
            await state.backend.remove(containers[name])
            await self.store.pool_remove(state.uid, name)
            state.handles.pop(name, None)
        if spec.warm_up:
            await self._top_up(state)
        for name in await self.store.pool_take_idle(state.uid, float("inf"), spec.max_size):
            # Only an agent the backend lists as the pool's is removed, whatever a record says.
            listed = state.handles.get(name) or containers.get(name)
            if listed is not None:
                await state.backend.remove(listed)
            await self.store.pool_remove(state.uid, name)
            state.handles.pop(name, None)
        state.returned.set()  # what it freed or adopted, a task waiting looks at now
        return await self.status(state)

    async def _reclaim(self, state: PoolState,
                       containers: dict[str, AgentHandle] | None = None) -> list[str]:
        """Replace the agents whose holder died: neither idle nor leased nor being started, in
        one atomic read, and out of the pool before anyone can lease them. Their state is
        unknown. Also what a task waiting for an agent does, so that a pool heals as soon as
        a lease lapses."""
        lapsed = await self.store.pool_reclaim(state.uid)
        if lapsed and containers is None:
            containers = await self._containers(state)
        for name in lapsed:
            handle = (containers or {}).get(name.removeprefix(PENDING))
            if name.startswith(PENDING):  # its starter died while starting it
                if handle is not None and handle.state == "running" and \
                        handle.labels.get(LABEL_RUNNER) == runner.VERSION_LABEL_VALUE:
                    logger.info("pool %s: adopting %s, whose starter is gone", state.name,
                                handle.name)
                    await self.store.pool_add(state.uid, _record(handle))
                elif handle is not None:
                    await state.backend.remove(handle)
                continue
            logger.info("pool %s: reclaiming %s, whose lease lapsed", state.name, name)
            if handle is not None:
                await self._retire(state, handle, recycled=False)
        return lapsed

    @staticmethod
    async def _containers(state: PoolState) -> dict[str, AgentHandle]:
        return {h.name: h for h in await state.backend.list_agents(
            state.pool.metadata.namespace, {LABEL_POOL_UID: state.uid}, state.owner)}

    async def status(self, state: PoolState) -> AgentPoolStatus:
        total, ready = await self.store.pool_counts(state.uid)
        return AgentPoolStatus(ready=ready, busy=total - ready, total=total,
                               observed_generation=state.pool.metadata.generation)

    @staticmethod
    async def _listed(state: PoolState) -> list[AgentHandle]:
        return await state.backend.list_agents(
            state.pool.metadata.namespace, {LABEL_POOL_UID: state.uid}, state.owner)

    async def drain(self, state: PoolState, timeout: float = 300.0) -> int:
        """Stop leasing; let running tasks finish (up to ``timeout``); remove every agent."""
        state.draining = True
        self.drained.add(state.uid)
        deadline = time.monotonic() + timeout
        while (state.busy > 0 or state.starting > 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        removed = 0
        # Again until none is left: another process may still be starting one.
        agents = await self._listed(state)
        while agents:
            for agent in agents:
                await state.backend.remove(agent)
            removed += len(agents)
            if agents := await self._listed(state):
                if time.monotonic() > deadline:
                    logger.warning("pool %s: agents still listed after draining", state.name)
                    break
                await asyncio.sleep(0.2)
        await self.store.pool_delete(state.uid)
        self.pools.pop((state.pool.metadata.namespace, state.name), None)
        return removed
