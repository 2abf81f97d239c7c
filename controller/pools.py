"""AgentPools: warm agents of one image, kept between minSize and maxSize on a backend.

This module keeps the pool's agents alive and counted; it does not import kopf. Leasing agents
to pooled steps builds on it.
"""

from __future__ import annotations

import logging
import secrets

from controller.backends.base import (
    LABEL_MANAGED_BY,
    LABEL_POOL,
    LABEL_POOL_UID,
    MANAGED_BY,
    AgentHandle,
    AgentSpec,
    Backend,
)
from controller.models import AgentPool, AgentPoolStatus, dns_safe

logger = logging.getLogger(__name__)

# A warm agent idles in a shell that ends promptly on SIGTERM, so that the pool drains fast.
IDLE_COMMAND = ["sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]


def pool_labels(pool: AgentPool, uid: str) -> dict[str, str]:
    return {LABEL_POOL: dns_safe(pool.metadata.name), LABEL_POOL_UID: uid,
            LABEL_MANAGED_BY: MANAGED_BY}


def build_pool_agent_spec(pool: AgentPool, uid: str) -> AgentSpec:
    """A warm agent of the pool: the pool's image, env and limits, idling until leased."""
    resources = pool.spec.resources
    name = f"{dns_safe(pool.metadata.name, 48)}-{secrets.token_hex(3)}"
    return AgentSpec(
        name=f"pool-{name}",
        image=pool.spec.image,
        command=IDLE_COMMAND,
        args=None,
        env={e.name: e.value for e in pool.spec.env} | {"AGENTAINER_POOL": pool.metadata.name},
        labels=pool_labels(pool, uid),
        nano_cpus=resources.nano_cpus if resources else None,
        memory_bytes=resources.memory_bytes if resources else None,
    )


async def reconcile_pool(pool: AgentPool, uid: str, backend: Backend) -> AgentPoolStatus:
    """Converge the pool's agents on its spec, then report them. Idempotent: a pool that
    already matches its spec is left alone.

    Agents that stopped are removed (and so replaced); while ``warmUp`` is set the pool is
    topped up to ``minSize``; agents above ``maxSize`` are removed.
    """
    agents = await backend.list_agents({LABEL_POOL_UID: uid})
    alive: list[AgentHandle] = []
    for agent in agents:
        if agent.state == "running":
            alive.append(agent)
        else:
            logger.info("pool %s: removing stopped agent %s", pool.metadata.name, agent.name)
            await backend.remove(agent)
    wanted = pool.spec.min_size if pool.spec.warm_up else 0
    while len(alive) < wanted:
        alive.append(await backend.start(build_pool_agent_spec(pool, uid)))
    for extra in alive[pool.spec.max_size:]:
        await backend.remove(extra)
    alive = alive[: pool.spec.max_size]
    return AgentPoolStatus(ready=len(alive), busy=0, total=len(alive),
                           observed_generation=pool.metadata.generation)


async def drain_pool(uid: str, backend: Backend) -> int:
    """Remove every agent of a pool; returns how many there were."""
    agents = await backend.list_agents({LABEL_POOL_UID: uid})
    for agent in agents:
        await backend.remove(agent)
    return len(agents)
