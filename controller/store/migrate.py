"""Moves keys written in an older layout to the current one (:data:`keys.LAYOUT`), once, when a
process first connects to a Redis that has them: nothing a running workflow or pool kept is
lost by an upgrade.

Layout 1 had no hash tags (``agentainer:workflow:U:steps``) and a string key per pool lease
(``agentainer:pool:P:lease:AGENT``, its holder, with a TTL). Layout 2 tags each workflow's and
pool's keys with its uid and keeps a pool's leases in one hash, agent -> ``EXPIRY_MS:HOLDER``.

The controller connects after it is elected, when no other controller writes any more; two
processes migrating at once (a controller and a CLI) each move what the other has not yet.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions

from controller.store.keys import LAYOUT, PREFIX, Keys

logger = logging.getLogger(__name__)


async def migrate(client: Any) -> int:
    """Brings the keys to the current layout; returns how many keys were moved."""
    if int(await client.get(Keys.layout) or 1) >= LAYOUT:
        return 0
    moved = 0
    async for key in client.scan_iter(match=f"{PREFIX}*", count=1000):
        moved += await _move(client, key)
    await client.set(Keys.layout, LAYOUT)
    if moved:
        logger.info("moved %d Redis keys to layout %d (hash tags)", moved, LAYOUT)
    return moved


async def _move(client: Any, key: str) -> int:
    """Moves one key of layout 1; 0 for keys of the current layout and any others."""
    rest = key.removeprefix(PREFIX)
    kind, _, tail = rest.partition(":")
    if kind not in ("workflow", "pool") or not tail or tail.startswith("{"):
        return 0
    uid, _, part = tail.partition(":")
    if kind == "pool" and part.startswith("lease:"):
        return await _move_lease(client, key, uid, part.removeprefix("lease:"))
    new = (Keys.workflow(uid) if kind == "workflow" else Keys.pool(uid)) + (
        f":{part}" if part else "")
    try:
        if await client.renamenx(key, new):
            return 1
    except redis.exceptions.ResponseError:  # another process moved it first
        return 0
    # Both exist: something of the new layout was written first; keep what each has.
    kind_of = await client.type(key)
    if kind_of == "hash":
        for field, value in (await client.hgetall(key)).items():
            await client.hsetnx(new, field, value)
    elif kind_of == "zset":
        await client.zadd(new, dict(await client.zrange(key, 0, -1, withscores=True)), nx=True)
    await client.delete(key)
    return 1


async def _move_lease(client: Any, key: str, pool: str, agent: str) -> int:
    async with client.pipeline(transaction=True) as pipe:
        pipe.get(key)
        pipe.pttl(key)
        pipe.time()
        holder, ttl_ms, (seconds, micros) = await pipe.execute()
    if holder is None or ttl_ms == -2:
        return 0
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    expiry = now_ms + (ttl_ms if ttl_ms > 0 else 0)
    await client.hsetnx(Keys.pool_leases(pool), agent, f"{expiry}:{holder}")
    await client.delete(key)
    return 1
