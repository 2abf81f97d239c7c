"""Workflow state, agent records and full outputs, in Redis (or in memory for one-off runs).

Every key lives under ``agentainer:`` and is built by :class:`Keys`, the one place that knows
the layout. Each call of :meth:`Store.record` writes all of its parts in one transaction, so a
reader never sees an agent finished without its output, or a step done without its agents.

Layout, for a workflow with uid ``U``:

- ``agentainer:workflows``: sorted set of workflow uids, scored by start time (seconds);
- ``agentainer:workflow:U``: hash of the workflow (name, namespace, phase, times, message);
- ``agentainer:workflow:U:steps``: hash, step name -> JSON step state (phase, attempts, times);
- ``agentainer:workflow:U:agents``: hash, agent id -> JSON agent record (workflow, step,
  index, attempt, container, phase, exit code, reason, created/started/finished times);
- ``agentainer:workflow:U:outputs:STEP``: hash, agent index -> full output (trimmed stdout);
- ``agentainer:workflow:U:logs``: hash, agent id -> the agent's stderr (the last 64 KiB).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions

from controller.config import Settings
from controller.errors import StoreUnavailableError

logger = logging.getLogger(__name__)

PREFIX = "agentainer:"
LOG_LIMIT_BYTES = 64 * 1024


class Keys:
    """Every Redis key of the project."""

    workflows = PREFIX + "workflows"

    @staticmethod
    def workflow(uid: str) -> str:
        return f"{PREFIX}workflow:{uid}"

    @staticmethod
    def steps(uid: str) -> str:
        return f"{PREFIX}workflow:{uid}:steps"

    @staticmethod
    def agents(uid: str) -> str:
        return f"{PREFIX}workflow:{uid}:agents"

    @staticmethod
    def outputs(uid: str, step: str) -> str:
        return f"{PREFIX}workflow:{uid}:outputs:{step}"

    @staticmethod
    def logs(uid: str) -> str:
        return f"{PREFIX}workflow:{uid}:logs"

    @staticmethod
    def pool_agents(uid: str) -> str:
        return f"{PREFIX}pool:{uid}:agents"

    @staticmethod
    def pool_idle(uid: str) -> str:
        return f"{PREFIX}pool:{uid}:idle"

    @staticmethod
    def pool_uses(uid: str) -> str:
        return f"{PREFIX}pool:{uid}:uses"

    @staticmethod
    def pool_lease(uid: str, agent: str) -> str:
        return f"{PREFIX}pool:{uid}:lease:{agent}"


# Lease the most recently returned idle agent (the warmest; the others age towards the idle
# timeout), in one step with its lease, so that no two holders ever get the same agent.
ACQUIRE = """
local popped = redis.call('ZPOPMAX', KEYS[1])
if #popped == 0 then return false end
redis.call('SET', ARGV[1] .. popped[1], ARGV[2], 'PX', ARGV[3])
return popped[1]
"""
# Return a leased agent: only its holder may; it goes back to idle unless it has been used
# maxUses times or is not to be kept. Returns its uses, 0 when it is to be recycled, -1 when
# the lease was no longer ours (it expired and the agent was reclaimed).
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1])
local uses = redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
if ARGV[5] == '1' and uses < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return uses
end
return 0
"""
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
# Hold a place for an agent about to be started, unless the pool is full: a placeholder in the
# agents hash, so that processes growing a pool at once never exceed maxSize together.
RESERVE = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
# Take idle agents that have idled since before ARGV[1], keeping ARGV[2] agents in the pool.
TAKE_IDLE = """
local spare = redis.call('HLEN', KEYS[1]) - tonumber(ARGV[2])
if spare <= 0 then return {} end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, spare)
for _, agent in ipairs(old) do redis.call('ZREM', KEYS[2], agent) end
return old
"""


@dataclass
class Record:
    """One atomic change: any of its parts that are set are written together."""

    workflow: dict[str, str] | None = None
    step: tuple[str, dict[str, Any]] | None = None
    agent: tuple[str, dict[str, Any]] | None = None
    output: tuple[str, int, str] | None = None
    logs: tuple[str, str] | None = None
    started_at: float | None = None


class Store(Protocol):
    async def record(self, uid: str, change: Record) -> None: ...
    async def finish(self, uid: str, ttl_seconds: int) -> None: ...
    async def workflow(self, uid: str) -> dict[str, str]: ...
    async def steps(self, uid: str) -> dict[str, dict[str, Any]]: ...
    async def agents(self, uid: str) -> dict[str, dict[str, Any]]: ...
    async def outputs(self, uid: str, step: str) -> dict[int, str]: ...
    async def logs(self, uid: str) -> dict[str, str]: ...
    async def delete(self, uid: str) -> None: ...
    async def close(self) -> None: ...
    # pools: agents, idle set, leases
    async def pool_reserve(self, uid: str, placeholder: str, max_size: int) -> bool: ...
    async def pool_add(self, uid: str, agent: str, record: dict[str, Any],
                       replaces: str = "") -> None: ...
    async def pool_acquire(self, uid: str, holder: str, ttl_ms: int) -> str | None: ...
    async def pool_renew(self, uid: str, agent: str, holder: str, ttl_ms: int) -> bool: ...
    async def pool_release(self, uid: str, agent: str, holder: str, keep: bool,
                           max_uses: int) -> int: ...
    async def pool_remove(self, uid: str, agent: str) -> None: ...
    async def pool_agents(self, uid: str) -> dict[str, dict[str, Any]]: ...
    async def pool_idle(self, uid: str) -> dict[str, float]: ...
    async def pool_leased(self, uid: str, agents: list[str]) -> set[str]: ...
    async def pool_counts(self, uid: str) -> tuple[int, int]: ...
    async def pool_take_idle(self, uid: str, idle_before: float, keep: int) -> list[str]: ...
    async def pool_delete(self, uid: str) -> None: ...


def redacted(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    """The store of record: what the controller and ``agentainer run`` use by default."""

    def __init__(self, client: redis.asyncio.Redis, url: str) -> None:
        self._client = client
        self._url = url
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._renew = client.register_script(RENEW)
        self._take_idle = client.register_script(TAKE_IDLE)
        self._reserve = client.register_script(RESERVE)

    @classmethod
    async def connect(cls, url: str) -> RedisStore:
        try:
            client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        except ValueError as error:
            raise StoreUnavailableError(f"AGENTAINER_REDIS_URL={url!r}: {error}") from None
        store = cls(client, url)
        async with store._errors("connecting"):
            await client.ping()
        return store

    @asynccontextmanager
    async def _errors(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except redis.exceptions.RedisError as error:
            raise StoreUnavailableError(
                f"Redis at {redacted(self._url)} failed while {action}: {error}; start it "
                "(`make redis`), set AGENTAINER_REDIS_URL, or run with --store memory"
            ) from error

    async def record(self, uid: str, change: Record) -> None:
        async with self._errors("recording state"), self._client.pipeline(
            transaction=True
        ) as pipe:
            if change.started_at is not None:
                pipe.zadd(Keys.workflows, {uid: change.started_at})
            if change.workflow:
                pipe.hset(Keys.workflow(uid), mapping=dict[Any, Any](change.workflow))
            if change.step:
                name, state = change.step
                pipe.hset(Keys.steps(uid), name, json.dumps(state))
            if change.agent:
                agent_id, state = change.agent
                pipe.hset(Keys.agents(uid), agent_id, json.dumps(state))
            if change.output:
                step, index, text = change.output
                pipe.hset(Keys.outputs(uid, step), str(index), text)
            if change.logs:
                agent_id, text = change.logs
                pipe.hset(Keys.logs(uid), agent_id, _tail(text))
            await pipe.execute()

    async def finish(self, uid: str, ttl_seconds: int) -> None:
        """Let a finished workflow's keys expire; drop long-expired uids from the index."""
        if ttl_seconds <= 0:
            return
        async with self._errors("expiring state"):
            steps = [_text(step) for step in await self._client.hkeys(Keys.steps(uid))]
            async with self._client.pipeline(transaction=True) as pipe:
                for key in _workflow_keys(uid, steps):
                    pipe.expire(key, ttl_seconds)
                pipe.zremrangebyscore(Keys.workflows, 0, time.time() - ttl_seconds)
                await pipe.execute()

    async def delete(self, uid: str) -> None:
        """Forget a workflow (its resource was deleted)."""
        async with self._errors("deleting state"):
            steps = [_text(step) for step in await self._client.hkeys(Keys.steps(uid))]
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(*_workflow_keys(uid, steps))
                pipe.zrem(Keys.workflows, uid)
                await pipe.execute()

    async def workflow(self, uid: str) -> dict[str, str]:
        async with self._errors("reading state"):
            return _texts(await self._client.hgetall(Keys.workflow(uid)))

    async def steps(self, uid: str) -> dict[str, dict[str, Any]]:
        async with self._errors("reading state"):
            raw = _texts(await self._client.hgetall(Keys.steps(uid)))
        return {name: json.loads(value) for name, value in raw.items()}

    async def agents(self, uid: str) -> dict[str, dict[str, Any]]:
        async with self._errors("reading state"):
            raw = _texts(await self._client.hgetall(Keys.agents(uid)))
        return {agent_id: json.loads(value) for agent_id, value in raw.items()}

    async def outputs(self, uid: str, step: str) -> dict[int, str]:
        async with self._errors("reading outputs"):
            raw = _texts(await self._client.hgetall(Keys.outputs(uid, step)))
        return {int(index): text for index, text in raw.items()}

    async def logs(self, uid: str) -> dict[str, str]:
        async with self._errors("reading logs"):
            return _texts(await self._client.hgetall(Keys.logs(uid)))

    async def close(self) -> None:
        await self._client.aclose()

    # --- pools ----------------------------------------------------------------------------------

    async def pool_reserve(self, uid: str, placeholder: str, max_size: int) -> bool:
        async with self._errors("growing a pool"):
            return bool(await self._reserve(
                keys=[Keys.pool_agents(uid)],
                args=[placeholder, max_size, json.dumps({"pending": time.time()})]))

    async def pool_add(self, uid: str, agent: str, record: dict[str, Any],
                       replaces: str = "") -> None:
        async with self._errors("adding a pool agent"), self._client.pipeline(
                transaction=True) as pipe:
            if replaces:
                pipe.hdel(Keys.pool_agents(uid), replaces)
            pipe.hset(Keys.pool_agents(uid), agent, json.dumps(record))
            pipe.zadd(Keys.pool_idle(uid), {agent: time.time()})
            await pipe.execute()

    async def pool_acquire(self, uid: str, holder: str, ttl_ms: int) -> str | None:
        async with self._errors("leasing a pool agent"):
            agent = await self._acquire(keys=[Keys.pool_idle(uid)],
                                        args=[Keys.pool_lease(uid, ""), holder, ttl_ms])
        return _text(agent) if agent else None

    async def pool_renew(self, uid: str, agent: str, holder: str, ttl_ms: int) -> bool:
        async with self._errors("renewing a lease"):
            return bool(await self._renew(keys=[Keys.pool_lease(uid, agent)],
                                          args=[holder, ttl_ms]))

    async def pool_release(self, uid: str, agent: str, holder: str, keep: bool,
                           max_uses: int) -> int:
        async with self._errors("returning a pool agent"):
            return int(await self._release(
                keys=[Keys.pool_lease(uid, agent), Keys.pool_idle(uid), Keys.pool_uses(uid)],
                args=[agent, holder, time.time(), max_uses, "1" if keep else "0"]))

    async def pool_remove(self, uid: str, agent: str) -> None:
        async with self._errors("removing a pool agent"), self._client.pipeline(
                transaction=True) as pipe:
            pipe.hdel(Keys.pool_agents(uid), agent)
            pipe.zrem(Keys.pool_idle(uid), agent)
            pipe.hdel(Keys.pool_uses(uid), agent)
            pipe.delete(Keys.pool_lease(uid, agent))
            await pipe.execute()

    async def pool_agents(self, uid: str) -> dict[str, dict[str, Any]]:
        async with self._errors("reading a pool"):
            raw = _texts(await self._client.hgetall(Keys.pool_agents(uid)))
        return {agent: json.loads(value) for agent, value in raw.items()}

    async def pool_idle(self, uid: str) -> dict[str, float]:
        async with self._errors("reading a pool"):
            pairs: list[Any] = await self._client.zrange(Keys.pool_idle(uid), 0, -1,
                                                         withscores=True)
        return {_text(agent): float(score) for agent, score in pairs}

    async def pool_counts(self, uid: str) -> tuple[int, int]:
        """(agents, idle agents) of one moment; agents being started are not counted."""
        async with self._errors("reading a pool"), self._client.pipeline(
                transaction=True) as pipe:
            pipe.hvals(Keys.pool_agents(uid))
            pipe.zcard(Keys.pool_idle(uid))
            records, idle = await pipe.execute()
        return sum(1 for r in records if "pending" not in json.loads(_text(r))), int(idle)

    async def pool_leased(self, uid: str, agents: list[str]) -> set[str]:
        if not agents:
            return set()
        async with self._errors("reading leases"):
            holders = await self._client.mget([Keys.pool_lease(uid, a) for a in agents])
        return {agent for agent, holder in zip(agents, holders, strict=True) if holder is not None}

    async def pool_take_idle(self, uid: str, idle_before: float, keep: int) -> list[str]:
        async with self._errors("shrinking a pool"):
            taken = await self._take_idle(keys=[Keys.pool_agents(uid), Keys.pool_idle(uid)],
                                          args=[idle_before, keep])
        return [_text(agent) for agent in taken]

    async def pool_delete(self, uid: str) -> None:
        async with self._errors("deleting a pool"):
            agents = await self._client.hkeys(Keys.pool_agents(uid))
            await self._client.delete(
                Keys.pool_agents(uid), Keys.pool_idle(uid), Keys.pool_uses(uid),
                *[Keys.pool_lease(uid, _text(agent)) for agent in agents])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(mapping: dict[bytes | str, bytes | str]) -> dict[str, str]:
    """The client decodes responses; this only narrows the types its stubs give."""
    return {_text(key): _text(value) for key, value in mapping.items()}


def _workflow_keys(uid: str, steps: list[str]) -> list[str]:
    keys = [Keys.workflow(uid), Keys.steps(uid), Keys.agents(uid), Keys.logs(uid)]
    return keys + [Keys.outputs(uid, step) for step in steps]


def _tail(text: str) -> str:
    data = text.encode("utf-8", errors="replace")
    if len(data) <= LOG_LIMIT_BYTES:
        return text
    return data[-LOG_LIMIT_BYTES:].decode("utf-8", errors="ignore")


@dataclass
class MemoryStore:
    """The same layout in this process's memory, for ``--store memory``; gone when it exits."""

    data: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    index: dict[str, float] = field(default_factory=dict)

    async def record(self, uid: str, change: Record) -> None:
        if change.started_at is not None:
            self.index[uid] = change.started_at
        if change.workflow:
            self.data[Keys.workflow(uid)].update(change.workflow)
        if change.step:
            self.data[Keys.steps(uid)][change.step[0]] = json.dumps(change.step[1])
        if change.agent:
            self.data[Keys.agents(uid)][change.agent[0]] = json.dumps(change.agent[1])
        if change.output:
            step, index, text = change.output
            self.data[Keys.outputs(uid, step)][str(index)] = text
        if change.logs:
            self.data[Keys.logs(uid)][change.logs[0]] = _tail(change.logs[1])

    async def finish(self, uid: str, ttl_seconds: int) -> None:
        """Nothing outlives the process anyway."""

    async def delete(self, uid: str) -> None:
        self.index.pop(uid, None)
        prefix = Keys.workflow(uid)
        for key in [k for k in self.data if k == prefix or k.startswith(prefix + ":")]:
            del self.data[key]

    async def workflow(self, uid: str) -> dict[str, str]:
        return dict(self.data.get(Keys.workflow(uid), {}))

    async def steps(self, uid: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.data.get(Keys.steps(uid), {}).items()}

    async def agents(self, uid: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.data.get(Keys.agents(uid), {}).items()}

    async def outputs(self, uid: str, step: str) -> dict[int, str]:
        return {int(k): v for k, v in self.data.get(Keys.outputs(uid, step), {}).items()}

    async def logs(self, uid: str) -> dict[str, str]:
        return dict(self.data.get(Keys.logs(uid), {}))

    async def close(self) -> None:
        """Nothing to release."""

    # --- pools: the same rules, one process -----------------------------------------------------

    pools: dict[str, MemoryPool] = field(default_factory=dict)

    def _pool(self, uid: str) -> MemoryPool:
        return self.pools.setdefault(uid, MemoryPool())

    async def pool_reserve(self, uid: str, placeholder: str, max_size: int) -> bool:
        pool = self._pool(uid)
        if len(pool.agents) >= max_size:
            return False
        pool.agents[placeholder] = {"pending": time.time()}
        return True

    async def pool_add(self, uid: str, agent: str, record: dict[str, Any],
                       replaces: str = "") -> None:
        pool = self._pool(uid)
        pool.agents.pop(replaces, None)
        pool.agents[agent] = dict(record)
        pool.idle[agent] = time.time()

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
        return 0

    async def pool_remove(self, uid: str, agent: str) -> None:
        pool = self._pool(uid)
        for table in (pool.agents, pool.idle, pool.uses, pool.leases):
            table.pop(agent, None)

    async def pool_agents(self, uid: str) -> dict[str, dict[str, Any]]:
        return {agent: dict(record) for agent, record in self._pool(uid).agents.items()}

    async def pool_idle(self, uid: str) -> dict[str, float]:
        return dict(self._pool(uid).idle)

    async def pool_counts(self, uid: str) -> tuple[int, int]:
        pool = self._pool(uid)
        return sum(1 for r in pool.agents.values() if "pending" not in r), len(pool.idle)

    async def pool_leased(self, uid: str, agents: list[str]) -> set[str]:
        pool = self._pool(uid)
        return {agent for agent in agents if pool.holder(agent) is not None}

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
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)
    uses: dict[str, int] = field(default_factory=dict)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)

    def holder(self, agent: str) -> str | None:
        lease = self.leases.get(agent)
        if lease is None or lease[1] < time.monotonic():
            return None
        return lease[0]


async def open_store(settings: Settings) -> Store:
    """The store the settings ask for, connected and checked."""
    if settings.store == "memory":
        return MemoryStore()
    return await RedisStore.connect(settings.redis_url)
