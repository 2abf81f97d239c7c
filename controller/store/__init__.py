"""Workflow state, agent records, full outputs and pool leases: in Redis, or in memory for
one-off runs. The engine and the pools see the protocols of :mod:`controller.store.base`; the
format of what is kept lives in :mod:`controller.store.records`."""

from __future__ import annotations

from controller.config import Settings
from controller.store.base import PoolStore, Store, WorkflowStore
from controller.store.keys import Keys
from controller.store.memory import MemoryStore
from controller.store.records import AgentRecord, Change, Output, PoolAgent, WorkflowRecord
from controller.store.redis import RedisStore, redacted

__all__ = ["AgentRecord", "Change", "Keys", "MemoryStore", "Output", "PoolAgent", "PoolStore",
           "RedisStore", "Store", "WorkflowRecord", "WorkflowStore", "open_store", "redacted"]


async def open_store(settings: Settings) -> Store:
    """The store the settings ask for, connected and checked."""
    if settings.store == "memory":
        return MemoryStore()
    return await RedisStore.connect(settings.redis_url, password=settings.redis_password or None)
