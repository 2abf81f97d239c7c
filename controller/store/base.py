"""What the engine and the pools need of a store: two protocols, one per concern."""

from __future__ import annotations

from typing import Protocol

from controller.models import StepStatus
from controller.store.records import AgentRecord, Change, PoolAgent, WorkflowRecord


class WorkflowStore(Protocol):
    """Workflow state, agent records and full outputs, by workflow uid."""

    async def record(self, uid: str, change: Change) -> None:
        """Write every part of ``change`` at once, or none of it."""

    async def reopen(self, uid: str) -> None:
        """A finished workflow runs again: its state no longer expires."""

    async def workflow(self, uid: str) -> WorkflowRecord | None: ...
    async def steps(self, uid: str) -> dict[str, StepStatus]: ...
    async def agents(self, uid: str) -> dict[str, AgentRecord]: ...
    async def outputs(self, uid: str, step: str) -> dict[int, str]: ...

    async def logs(self, uid: str) -> dict[str, str]:
        """Each agent's stderr (its tail), by agent id."""

    async def uids(self) -> list[str]:
        """Every workflow the store knows, the latest started first."""

    async def delete(self, uid: str) -> None:
        """Forget a workflow (its resource was deleted)."""

    async def close(self) -> None: ...


class PoolStore(Protocol):
    """The agents of each pool, its idle set, the uses of each agent, and leases with a TTL,
    shared by every process that uses the pool."""

    async def pool_reserve(self, uid: str, placeholder: str, max_size: int, holder: str,
                           ttl_ms: int) -> bool:
        """Hold a place for an agent about to start, unless the pool has ``max_size``; the
        place is leased to ``holder`` (renewed like a lease; it lapses if the holder dies)."""

    async def pool_add(self, uid: str, agent: PoolAgent, replaces: str = "",
                       holder: str = "", ttl_ms: int = 0) -> bool:
        """An agent that is up, idle from now (or, given a ``holder``, leased to it for
        ``ttl_ms``), in place of its placeholder: False (and not added) when the placeholder
        lapsed meanwhile."""

    async def pool_acquire(self, uid: str, holder: str, ttl_ms: int) -> str | None:
        """Lease the most recently returned idle agent, or None."""

    async def pool_renew(self, uid: str, agent: str, holder: str, ttl_ms: int) -> bool: ...

    async def pool_release(self, uid: str, agent: str, holder: str, keep: bool,
                           max_uses: int) -> int:
        """Return an agent: its uses, 0 when it is to be recycled, -1 when the lease was no
        longer the holder's."""

    async def pool_remove(self, uid: str, agent: str) -> None: ...
    async def pool_agents(self, uid: str) -> dict[str, PoolAgent]: ...

    async def pool_reclaim(self, uid: str) -> list[str]:
        """Take out of the pool, in one atomic step, the agents and placeholders that are
        neither idle nor held: their holder died."""

    async def pool_counts(self, uid: str) -> tuple[int, int]:
        """(agents, idle agents) of one moment; agents being started are not counted."""

    async def pool_take_idle(self, uid: str, idle_before: float, keep: int) -> list[str]:
        """Take idle agents idle since before ``idle_before``, keeping ``keep`` in the pool."""

    async def pool_delete(self, uid: str) -> None: ...


class Store(WorkflowStore, PoolStore, Protocol):
    """Both: what one controller process opens."""
