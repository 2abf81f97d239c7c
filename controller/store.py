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


async def open_store(settings: Settings) -> Store:
    """The store the settings ask for, connected and checked."""
    if settings.store == "memory":
        return MemoryStore()
    return await RedisStore.connect(settings.redis_url)
