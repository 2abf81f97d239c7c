"""AgentPool handlers: keep each pool's warm agents and report them; drain on deletion."""

from __future__ import annotations

from typing import Any

import kopf

from controller.errors import AgentainerError, InvalidSpecError
from controller.handlers import reporting
from controller.handlers.context import Services
from controller.models import API_GROUP, API_VERSION, ConditionType, parse_agent_pool

PLURAL = "agentpools"


async def _reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, retry: int) -> None:
    services: Services = memo.services
    if body.metadata.get("deletionTimestamp"):
        return  # being drained by pool_deleted: never warm it up again
    previous = (body.get("status") or {}).get("conditions", [])
    try:
        pool = parse_agent_pool(dict(body), f"agentpool {body.metadata.name}")
    except InvalidSpecError as error:
        message = "; ".join(str(p) for p in error.problems)
        patch.status["conditions"] = reporting.dumped([
            reporting.condition(ConditionType.READY, False, "Invalid", message, previous),
            reporting.condition(ConditionType.INVALID, True, "Invalid", message, previous)])
        return
    try:
        backend = await services.backend(services.backend_kind(pool.spec.backend))
        state = services.pools.register(pool, body.metadata.uid or "", backend)
        status = await services.pools.reconcile(state)
    except AgentainerError as error:
        # The pool stays wanted: say why it is not ready, and try again later and later.
        patch.status["conditions"] = reporting.dumped([reporting.condition(
            ConditionType.READY, False, reporting.error_reason(error), str(error), previous)])
        raise reporting.reconcile_failed(services, "AgentPool", error, retry,
                                         converge=True) from error
    wanted = pool.spec.min_size if pool.spec.warm_up else 0
    ready = status.ready >= wanted
    status.conditions = [reporting.condition(
        ConditionType.READY, ready, "MinSizeReached" if ready else "WarmingUp",
        f"{status.ready} of minSize {pool.spec.min_size} warm", previous)]
    for label, count in (("ready", status.ready), ("busy", status.busy)):
        services.metrics.pool_agents.labels(pool.metadata.name, label).set(count)
    patch.status.update(status.to_dict())


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
async def pool_changed(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, retry: int,
                       **_: Any) -> None:
    await _reconcile(body, memo, patch, retry)


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=10.0, initial_delay=10.0)
async def pool_observed(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, retry: int = 0,
                        **_: Any) -> None:
    """Re-observe the agents: one that died is replaced."""
    await _reconcile(body, memo, patch, retry)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
async def pool_deleted(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, retry: int,
                       **_: Any) -> None:
    """Drain: no new leases, running tasks finish, then every agent is removed."""
    services: Services = memo.services
    try:
        pool = parse_agent_pool(dict(body))
        backend = await services.backend(services.backend_kind(pool.spec.backend))
        removed = await services.pools.drain(
            services.pools.register(pool, body.metadata.uid or "", backend))
    except InvalidSpecError:
        removed = 0  # never had agents
    except AgentainerError as error:
        raise reporting.reconcile_failed(services, "AgentPool", error, retry,
                                         converge=True) from error
    for state in ("ready", "busy"):
        try:
            services.metrics.pool_agents.remove(body.metadata.name, state)
        except KeyError:
            pass  # never reported
    logger.info("drained the pool: removed %d agents", removed)
