"""The store of record, in Redis: what the controller and ``agentainer run`` use by default.

Each :meth:`RedisStore.record` writes all of its parts in one transaction, so a reader never
sees an agent finished without its output, or a step done without its agents; pool leases are
taken and returned by Lua scripts, so that no two holders ever get the same agent. Every
transaction and script touches the keys of one workflow or one pool only, which share a hash
tag, so the same code runs on one Redis, on a primary Sentinels watch, and on Redis Cluster.
With :mod:`controller.store.migrate`, the only module that imports redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from controller.errors import StoreUnavailableError
from controller.models import StepStatus
from controller.store.keys import Keys
from controller.store.migrate import migrate
from controller.store.records import (
    AgentRecord,
    Change,
    PoolAgent,
    WorkflowRecord,
    decode_agent,
    decode_pool_agent,
    decode_step,
    encode_agent,
    encode_pool_agent,
    encode_step,
    tail,
)

CONNECTIONS = 50
"""Connections to Redis one process opens at most: a few hundred workflows and pooled tasks
waiting at once share them, each command taking a millisecond."""
SOCKET_TIMEOUT_SECONDS = 30
"""How long one command may wait for Redis's answer (a server gone silent, a network that drops
packets) before it fails as Redis unavailable (for one server, a URL's own ``socket_timeout``
wins)."""
CONNECTION_WAIT_SECONDS = 20
"""How long a command waits for a free connection before it fails as Redis unavailable."""
RETIRING_MS = 30_000
"""How long an agent its holder is removing stays held (the removal takes seconds); should the
removal fail, the agent is reclaimed after this, and removed again."""

# A pool's leases are one hash, agent -> "EXPIRY_MS:HOLDER", the expiry in Redis's own clock
# (TIME), so that the holders' clocks never matter; every script declares every key it touches,
# all of one pool (one slot on Redis Cluster).
LEASES = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function holder_of(leases, agent, now)
  local lease = redis.call('HGET', leases, agent)
  if not lease then return nil end
  local sep = string.find(lease, ':', 1, true)
  local expiry = sep and tonumber(string.sub(lease, 1, sep - 1))
  if not expiry or expiry <= now then return nil end  -- lapsed, or not one of ours: no lease
  return string.sub(lease, sep + 1)
end
local function hold(leases, agent, holder, ttl_ms, now)
  redis.call('HSET', leases, agent, string.format('%.0f', now + tonumber(ttl_ms)) .. ':' .. holder)
end
"""
# Lease the most recently returned idle agent (the warmest; the others age towards the idle
# timeout), in one step with its lease, so that no two holders ever get the same agent.
ACQUIRE = LEASES + """
local popped = redis.call('ZPOPMAX', KEYS[1])
if #popped == 0 then return false end
hold(KEYS[2], popped[1], ARGV[1], ARGV[2], now_ms())
return popped[1]
"""
# Return a leased agent: only its holder may; it goes back to idle unless it has been used
# maxUses times or is not to be kept. Returns its uses, 0 when it is to be recycled, -1 when
# the lease was no longer ours (it expired and the agent was reclaimed). An agent not kept
# stays held ("retiring") while its holder removes it, so that no reconcile takes it for one
# whose holder died.
RELEASE = LEASES + """
local now = now_ms()
if holder_of(KEYS[1], ARGV[1], now) ~= ARGV[2] then return -1 end
local uses = redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
if ARGV[5] == '1' and uses < tonumber(ARGV[4]) then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return uses
end
hold(KEYS[1], ARGV[1], 'retiring', ARGV[6], now)
return 0
"""
# The agents (and placeholders) that are neither idle nor held: their holder died. They leave
# the pool in the same step, so that nobody can lease them while they are replaced. Lapsed
# leases of agents no longer in the pool go too.
RECLAIM = LEASES + """
local now = now_ms()
local lapsed = {}
for _, agent in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not redis.call('ZSCORE', KEYS[2], agent) and not holder_of(KEYS[4], agent, now) then
    redis.call('HDEL', KEYS[1], agent)
    redis.call('HDEL', KEYS[3], agent)
    redis.call('HDEL', KEYS[4], agent)
    table.insert(lapsed, agent)
  end
end
for _, agent in ipairs(redis.call('HKEYS', KEYS[4])) do
  if redis.call('HEXISTS', KEYS[1], agent) == 0 and not holder_of(KEYS[4], agent, now) then
    redis.call('HDEL', KEYS[4], agent)
  end
end
return lapsed
"""
RENEW = LEASES + """
local now = now_ms()
if holder_of(KEYS[1], ARGV[1], now) ~= ARGV[2] then return 0 end
hold(KEYS[1], ARGV[1], ARGV[2], ARGV[3], now)
return 1
"""
# Hold a place for an agent about to be started, unless the pool is full: a placeholder in the
# agents hash, so that processes growing a pool at once never exceed maxSize together, held by
# its starter like a lease (so that it lapses if the starter dies).
RESERVE = LEASES + """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
hold(KEYS[2], ARGV[1], ARGV[4], ARGV[5], now_ms())
return 1
"""
# An agent that is up joins the idle set, or is leased to ARGV[5] at once, in place of its
# placeholder: only if the placeholder is still there (if it lapsed, a reconcile took the agent
# over, and it must not join twice).
ADD = LEASES + """
if ARGV[4] ~= '' then
  if redis.call('HEXISTS', KEYS[1], ARGV[4]) == 0 then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[4])
  redis.call('HDEL', KEYS[3], ARGV[4])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[5] ~= '' then
  hold(KEYS[3], ARGV[1], ARGV[5], ARGV[6], now_ms())
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
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


def client_for(url: str, connections: int, password: str | None) -> Any:
    """The client for ``url``:

    - ``redis://HOST[:PORT][/DB]``, ``rediss://`` (TLS), ``unix://PATH``: one server;
    - ``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`` (or ``rediss+sentinel``): the
      primary the Sentinels name for SERVICE, followed through failovers;
    - ``redis+cluster://HOST:PORT[,HOST:PORT...]`` (or ``rediss+cluster``): a Redis Cluster,
      found from any of its nodes.

    A password in the URL or ``password`` is used for every server (Sentinels too); each
    server gets at most ``connections`` connections. Raises ValueError for a URL none of these
    can use."""
    scheme = urlsplit(url).scheme
    extra: dict[str, Any] = {"password": password} if password is not None else {}
    extra["socket_timeout"] = SOCKET_TIMEOUT_SECONDS
    # A connection whose server went away (Redis restarted) fails its next command: that is
    # sent again, once, on a new one, rather than failing a run. Only then: a timeout stands.
    extra["retry"] = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    if scheme not in ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"):
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=connections,
            timeout=CONNECTION_WAIT_SECONDS, **extra)
        return redis.asyncio.Redis.from_pool(pool)
    hosts, path, url_password = _servers(url)
    if url_password is not None:
        extra.setdefault("password", url_password)
    if scheme.startswith("rediss"):
        extra["ssl"] = True
    if scheme.endswith("+cluster"):
        if path.strip("/"):
            raise ValueError("a Redis Cluster has only database 0: leave the path out")
        return redis.asyncio.RedisCluster(
            startup_nodes=[redis.asyncio.cluster.ClusterNode(host, port) for host, port in hosts],
            decode_responses=True, max_connections=connections, **extra)
    service, _, database = path.strip("/").partition("/")
    if not service:
        raise ValueError("name the Sentinels' service after the hosts: "
                         "redis+sentinel://HOST:PORT/SERVICE")
    if database and not database.isdigit():
        raise ValueError(f"database {database!r} is not a number")
    sentinel = redis.asyncio.Sentinel(  # type: ignore[no-untyped-call]
        hosts, sentinel_kwargs={**extra, "socket_timeout": 5}, decode_responses=True, **extra)
    return sentinel.master_for(service, db=int(database or 0), max_connections=connections)


def _servers(url: str) -> tuple[list[tuple[str, int]], str, str | None]:
    """The hosts, the path and the password of a URL naming several servers."""
    netloc, slash, path = url.split("://", 1)[1].partition("/")
    userinfo, _, hostlist = netloc.rpartition("@")
    password = userinfo.partition(":")[2] or None
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{item!r} is not HOST:PORT")
        hosts.append((host.strip("[]"), int(port)))
    return hosts, (slash + path).partition("?")[0], password


def redacted(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


INDEX_TRIM_SECONDS = 60.0
"""Workflows whose keys have expired are dropped from the index at most this often (as
workflows finish), not at each finish."""


class RedisStore:
    """The store of record: what the controller and ``agentainer run`` use by default."""

    def __init__(self, client: Any, url: str, connections: int = CONNECTIONS) -> None:
        self._client = client
        self._url = url
        # Commands in flight: at most one per connection; more wait their turn.
        self._turns = asyncio.Semaphore(connections)
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._renew = client.register_script(RENEW)
        self._take_idle = client.register_script(TAKE_IDLE)
        self._reclaim = client.register_script(RECLAIM)
        self._add = client.register_script(ADD)
        self._reserve = client.register_script(RESERVE)
        self._index_trimmed = -INDEX_TRIM_SECONDS
        """When long-expired workflows were last dropped from the index (monotonic)."""
        self._one_server = not isinstance(client, redis.asyncio.RedisCluster)
        """Every key on one server: the index can change in a workflow's transactions."""

    @classmethod
    async def connect(cls, url: str, connections: int = CONNECTIONS,
                      password: str | None = None) -> RedisStore:
        """A store on Redis at ``url`` (one server, a Sentinel-watched primary, or a Cluster:
        :func:`client_for`), checked, its keys in the current layout. At most ``connections``
        commands are in flight at once; more wait their turn (a few seconds at the most)
        instead of failing."""
        try:
            client = client_for(url, connections, password)
        except ValueError as error:
            raise StoreUnavailableError(
                f"AGENTAINER_REDIS_URL={redacted(url)!r}: {error}") from None
        store = cls(client, url, connections)
        async with store._errors("connecting"):
            await client.ping()
        async with store._errors("moving keys of an older layout"):
            await migrate(client)
        return store

    @asynccontextmanager
    async def _errors(self, action: str) -> AsyncIterator[None]:
        """Waits for a turn (``CONNECTION_WAIT_SECONDS`` at the most), then says any failure
        of Redis as the store being unavailable, with what was being done. A cancellation
        asked for during the call is raised, also one the client dropped: it bounds its socket
        writes with ``asyncio.wait_for``, which in Python 3.11 drops one that comes as the
        write completes (the call, and whatever was being cancelled, would go on)."""
        task = asyncio.current_task()
        asked = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(CONNECTION_WAIT_SECONDS):
                await self._turns.acquire()
        except TimeoutError:
            raise StoreUnavailableError(
                f"Redis at {redacted(self._url)}: no free connection in "
                f"{CONNECTION_WAIT_SECONDS} s while {action}") from None
        try:
            yield
        except redis.exceptions.AuthenticationError as error:
            raise StoreUnavailableError(
                f"Redis at {redacted(self._url)} refused us while {action}: {error}; set its "
                "password in AGENTAINER_REDIS_PASSWORD") from error
        except redis.exceptions.OutOfMemoryError as error:
            raise StoreUnavailableError(
                f"Redis at {redacted(self._url)} is full (its maxmemory) while {action}: give "
                "it more memory (the chart's redis.maxmemory), or keep finished workflows' "
                "state less long (AGENTAINER_STATE_TTL_SECONDS)") from error
        except redis.exceptions.RedisError as error:
            raise StoreUnavailableError(
                f"Redis at {redacted(self._url)} failed while {action}: {error}; start it "
                "(`make redis`), set AGENTAINER_REDIS_URL, or run with --store memory"
            ) from error
        finally:
            self._turns.release()
        if task is not None and task.cancelling() > asked:
            raise asyncio.CancelledError(f"cancelled while {action}")

    async def record(self, uid: str, change: Change) -> None:
        # On Redis Cluster the index lives in another slot than the workflow: it is written
        # first, on its own (an index entry whose workflow failed to be written only lists
        # nothing); on one server, in the same transaction.
        if change.started_at is not None and not self._one_server:
            async with self._errors("recording state"):
                await self._client.zadd(Keys.workflows, {uid: change.started_at})
        expiring: list[str] = []
        if change.expire_seconds:
            if change.steps is not None:
                steps = set(change.steps)
            else:
                async with self._errors("expiring state"):
                    steps = {_text(step) for step in await self._client.hkeys(Keys.steps(uid))}
            expiring = Keys.workflow_keys(uid, sorted(
                steps | ({change.step.name} if change.step else set())))
        async with self._errors("recording state"), self._client.pipeline(
            transaction=True
        ) as pipe:
            if change.started_at is not None and self._one_server:
                pipe.zadd(Keys.workflows, {uid: change.started_at})
            if change.workflow:
                pipe.hset(Keys.workflow(uid), mapping=dict[Any, Any](change.workflow.fields()))
            if change.step:
                pipe.hset(Keys.steps(uid), change.step.name, encode_step(change.step))
            if change.forget_outputs is not None:
                pipe.delete(Keys.outputs(uid, change.forget_outputs))
            if change.agent:
                pipe.hset(Keys.agents(uid), change.agent.status.id, encode_agent(change.agent))
            if change.output:
                output = change.output
                pipe.hset(Keys.outputs(uid, output.step), str(output.index), output.text)
            if change.log:
                agent_id, text = change.log
                pipe.hset(Keys.logs(uid), agent_id, tail(text))
            for key in expiring:
                pipe.expire(key, change.expire_seconds)
            await pipe.execute()
        if change.expire_seconds and \
                time.monotonic() - self._index_trimmed >= INDEX_TRIM_SECONDS:
            self._index_trimmed = time.monotonic()
            async with self._errors("expiring state"):  # long-expired workflows: unlisted
                await self._client.zremrangebyscore(Keys.workflows, 0,
                                                    time.time() - change.expire_seconds)

    async def reopen(self, uid: str) -> None:
        """A finished workflow runs again (a retry): its keys no longer expire."""
        async with self._errors("keeping state"):
            steps = [_text(step) for step in await self._client.hkeys(Keys.steps(uid))]
            async with self._client.pipeline(transaction=True) as pipe:
                for key in Keys.workflow_keys(uid, steps):
                    pipe.persist(key)
                await pipe.execute()

    async def delete(self, uid: str) -> None:
        """Forget a workflow (its resource was deleted)."""
        async with self._errors("deleting state"):
            steps = [_text(step) for step in await self._client.hkeys(Keys.steps(uid))]
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(*Keys.workflow_keys(uid, steps))
                await pipe.execute()
            await self._client.zrem(Keys.workflows, uid)

    async def workflow(self, uid: str) -> WorkflowRecord | None:
        async with self._errors("reading state"):
            return WorkflowRecord.from_fields(_texts(await self._client.hgetall(Keys.workflow(uid))))

    async def steps(self, uid: str) -> dict[str, StepStatus]:
        async with self._errors("reading state"):
            raw = _texts(await self._client.hgetall(Keys.steps(uid)))
        return {name: decode_step(value) for name, value in raw.items()}

    async def logs(self, uid: str) -> dict[str, str]:
        async with self._errors("reading logs"):
            return _texts(await self._client.hgetall(Keys.logs(uid)))

    async def uids(self) -> list[str]:
        async with self._errors("reading the workflows"):
            found: list[Any] = await self._client.zrevrange(Keys.workflows, 0, -1)
        return [_text(uid) for uid in found]

    async def agents(self, uid: str) -> dict[str, AgentRecord]:
        async with self._errors("reading state"):
            raw = _texts(await self._client.hgetall(Keys.agents(uid)))
        return {agent_id: decode_agent(value) for agent_id, value in raw.items()}

    async def outputs(self, uid: str, step: str) -> dict[int, str]:
        async with self._errors("reading outputs"):
            raw = _texts(await self._client.hgetall(Keys.outputs(uid, step)))
        return {int(index): text for index, text in raw.items() if index.isdigit()}

    async def close(self) -> None:
        await self._client.aclose()

    # --- pools ----------------------------------------------------------------------------------

    async def pool_reserve(self, uid: str, placeholder: str, max_size: int, holder: str,
                           ttl_ms: int) -> bool:
        async with self._errors("growing a pool"):
            return bool(await self._reserve(
                keys=[Keys.pool_agents(uid), Keys.pool_leases(uid)],
                args=[placeholder, max_size,
                      encode_pool_agent(PoolAgent(placeholder, pending_since=time.time())),
                      holder, ttl_ms]))

    async def pool_add(self, uid: str, agent: PoolAgent, replaces: str = "",
                       holder: str = "", ttl_ms: int = 0) -> bool:
        async with self._errors("adding a pool agent"):
            return bool(await self._add(
                keys=[Keys.pool_agents(uid), Keys.pool_idle(uid), Keys.pool_leases(uid)],
                args=[agent.name, encode_pool_agent(agent), time.time(), replaces, holder,
                      ttl_ms]))

    async def pool_acquire(self, uid: str, holder: str, ttl_ms: int) -> str | None:
        async with self._errors("leasing a pool agent"):
            agent = await self._acquire(keys=[Keys.pool_idle(uid), Keys.pool_leases(uid)],
                                        args=[holder, ttl_ms])
        return _text(agent) if agent else None

    async def pool_renew(self, uid: str, agent: str, holder: str, ttl_ms: int) -> bool:
        async with self._errors("renewing a lease"):
            return bool(await self._renew(keys=[Keys.pool_leases(uid)],
                                          args=[agent, holder, ttl_ms]))

    async def pool_release(self, uid: str, agent: str, holder: str, keep: bool,
                           max_uses: int) -> int:
        async with self._errors("returning a pool agent"):
            return int(await self._release(
                keys=[Keys.pool_leases(uid), Keys.pool_idle(uid), Keys.pool_uses(uid)],
                args=[agent, holder, time.time(), max_uses, "1" if keep else "0",
                      RETIRING_MS]))

    async def pool_remove(self, uid: str, agent: str) -> None:
        async with self._errors("removing a pool agent"), self._client.pipeline(
                transaction=True) as pipe:
            pipe.hdel(Keys.pool_agents(uid), agent)
            pipe.zrem(Keys.pool_idle(uid), agent)
            pipe.hdel(Keys.pool_uses(uid), agent)
            pipe.hdel(Keys.pool_leases(uid), agent)
            await pipe.execute()

    async def pool_agents(self, uid: str) -> dict[str, PoolAgent]:
        async with self._errors("reading a pool"):
            raw = _texts(await self._client.hgetall(Keys.pool_agents(uid)))
        return {agent: decode_pool_agent(agent, value) for agent, value in raw.items()}

    async def pool_counts(self, uid: str) -> tuple[int, int]:
        """(agents, idle agents) of one moment; agents being started are not counted."""
        async with self._errors("reading a pool"), self._client.pipeline(
                transaction=True) as pipe:
            pipe.hvals(Keys.pool_agents(uid))
            pipe.zcard(Keys.pool_idle(uid))
            records, idle = await pipe.execute()
        agents = [decode_pool_agent("", _text(record)) for record in records]
        return sum(1 for agent in agents if agent.pending_since is None), int(idle)

    async def pool_reclaim(self, uid: str) -> list[str]:
        async with self._errors("reclaiming pool agents"):
            lapsed = await self._reclaim(
                keys=[Keys.pool_agents(uid), Keys.pool_idle(uid), Keys.pool_uses(uid),
                      Keys.pool_leases(uid)])
        return [_text(agent) for agent in lapsed]

    async def pool_take_idle(self, uid: str, idle_before: float, keep: int) -> list[str]:
        async with self._errors("shrinking a pool"):
            taken = await self._take_idle(keys=[Keys.pool_agents(uid), Keys.pool_idle(uid)],
                                          args=[idle_before, keep])
        return [_text(agent) for agent in taken]

    async def pool_delete(self, uid: str) -> None:
        async with self._errors("deleting a pool"):
            await self._client.delete(*Keys.pool_keys(uid))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(mapping: dict[bytes | str, bytes | str]) -> dict[str, str]:
    """The client decodes responses; this only narrows the types its stubs give."""
    return {_text(key): _text(value) for key, value in mapping.items()}


