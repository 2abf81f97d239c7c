"""The store's layout in this process's memory, for ``--store memory`` and fast tests; gone
when the process exits. Workflow records are kept encoded, as in Redis, so that the format is
the same whichever store wrote it."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from controller.models import StepStatus
from controller.store.keys import Keys
from controller.store.records import (
    AgentRecord,
    Change,
    PoolAgent,
    WorkflowRecord,
    decode_agent,
    decode_step,
    encode_agent,
    encode_step,
    tail,
)


@dataclass
class MemoryStore:
    """The same layout in this process's memory, for ``--store memory``; gone when it exits."""

    data: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    index: dict[str, float] = field(default_factory=dict)

    async def record(self, uid: str, change: Change) -> None:
        # ``expire_seconds`` is not kept: nothing here outlives the process anyway.
        if change.started_at is not None:
            self.index[uid] = change.started_at
        if change.workflow:
            self.data[Keys.workflow(uid)].update(change.workflow.fields())
        if change.forget_outputs is not None:
            self.data.pop(Keys.outputs(uid, change.forget_outputs), None)
        if change.step:
            self.data[Keys.steps(uid)][change.step.name] = encode_step(change.step)
        if change.agent:
            self.data[Keys.agents(uid)][change.agent.status.id] = encode_agent(change.agent)
        if change.output:
            output = change.output
            self.data[Keys.outputs(uid, output.step)][str(output.index)] = output.text
        if change.log:
            self.data[Keys.logs(uid)][change.log[0]] = tail(change.log[1])

    async def reopen(self, uid: str) -> None:
        """Nothing expires here."""

    async def delete(self, uid: str) -> None:
        self.index.pop(uid, None)
        prefix = Keys.workflow(uid)
        for key in [k for k in self.data if k == prefix or k.startswith(prefix + ":")]:
            del self.data[key]

    async def workflow(self, uid: str) -> WorkflowRecord | None:
        return WorkflowRecord.from_fields(dict(self.data.get(Keys.workflow(uid), {})))

    async def steps(self, uid: str) -> dict[str, StepStatus]:
        return {k: decode_step(v) for k, v in self.data.get(Keys.steps(uid), {}).items()}

    async def agents(self, uid: str) -> dict[str, AgentRecord]:
        return {k: decode_agent(v) for k, v in self.data.get(Keys.agents(uid), {}).items()}

    async def outputs(self, uid: str, step: str) -> dict[int, str]:
        return {int(k): v for k, v in self.data.get(Keys.outputs(uid, step), {}).items()}

    async def logs(self, uid: str) -> dict[str, str]:
        return dict(self.data.get(Keys.logs(uid), {}))

    async def uids(self) -> list[str]:
        return sorted(self.index, key=lambda uid: self.index[uid], reverse=True)

    async def close(self) -> None:
        """Nothing to release."""

    # --- pools: the same rules, one process -----------------------------------------------------

    pools: dict[str, MemoryPool] = field(default_factory=dict)

    def _pool(self, uid: str) -> MemoryPool:
        return self.pools.setdefault(uid, MemoryPool())

    async def pool_reserve(self, uid: str, placeholder: str, max_size: int, holder: str,
                           ttl_ms: int) -> bool:
        pool = self._pool(uid)
        if len(pool.agents) >= max_size:
            return False
        pool.agents[placeholder] = PoolAgent(placeholder, pending_since=time.time())
        pool.leases[placeholder] = (holder, time.monotonic() + ttl_ms / 1000)
        return True

    async def pool_add(self, uid: str, agent: PoolAgent, replaces: str = "",
                       holder: str = "", ttl_ms: int = 0) -> bool:
        pool = self._pool(uid)
        if replaces:
            if replaces not in pool.agents:
                return False
            del pool.agents[replaces]
            pool.leases.pop(replaces, None)
        pool.agents[agent.name] = agent
        if holder:
            pool.leases[agent.name] = (holder, time.monotonic() + ttl_ms / 1000)
        else:
            pool.idle[agent.name] = time.time()
        return True

    async def pool_acquire(self, uid: str, holder: str, ttl_ms: int) -> str | None:
        pool = self._pool(uid)
        if not pool.idle:
            return None
        agent = max(pool.idle, key=lambda a: pool.idle[a])
        del pool.idle[agent]
        pool.leases[agent] = (holder, time.monotonic() + ttl_ms / 1000)
        return agent

    async def pool_renew(self, uid: str, agent: str, holder: str, ttl_ms: int) -> bool:
        pool = self._pool(uid)
        if pool.holder(agent) != holder:
            return False
        pool.leases[agent] = (holder, time.monotonic() + ttl_ms / 1000)
        return True

    async def pool_release(self, uid: str, agent: str, holder: str, keep: bool,
                           max_uses: int) -> int:
        pool = self._pool(uid)
        if pool.holder(agent) != holder:
            return -1
        del pool.leases[agent]
        pool.uses[agent] = uses = pool.uses.get(agent, 0) + 1
        if keep and uses < max_uses:
            pool.idle[agent] = time.time()
            return uses
        pool.leases[agent] = ("retiring", time.monotonic() + 30)  # held while removed
        return 0

    async def pool_remove(self, uid: str, agent: str) -> None:
        pool = self._pool(uid)
        for table in (pool.agents, pool.idle, pool.uses, pool.leases):
            table.pop(agent, None)

    async def pool_agents(self, uid: str) -> dict[str, PoolAgent]:
        return dict(self._pool(uid).agents)

    async def pool_counts(self, uid: str) -> tuple[int, int]:
        pool = self._pool(uid)
        return sum(1 for a in pool.agents.values() if a.pending_since is None), len(pool.idle)

    async def pool_reclaim(self, uid: str) -> list[str]:
        pool = self._pool(uid)
        lapsed = [agent for agent in pool.agents
                  if agent not in pool.idle and pool.holder(agent) is None]
        for agent in lapsed:
            pool.agents.pop(agent)
            pool.uses.pop(agent, None)
        return lapsed

    async def pool_take_idle(self, uid: str, idle_before: float, keep: int) -> list[str]:
        pool = self._pool(uid)
        spare = len(pool.agents) - keep
        old = sorted((t, a) for a, t in pool.idle.items() if t <= idle_before)[:max(0, spare)]
        for _, agent in old:
            del pool.idle[agent]
        return [agent for _, agent in old]

    async def pool_delete(self, uid: str) -> None:
        self.pools.pop(uid, None)


@dataclass
class MemoryPool:
    agents: dict[str, PoolAgent] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)
    uses: dict[str, int] = field(default_factory=dict)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)

    def holder(self, agent: str) -> str | None:
        lease = self.leases.get(agent)
        if lease is None or lease[1] < time.monotonic():
            return None
        return lease[0]


