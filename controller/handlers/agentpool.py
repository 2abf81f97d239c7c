"""AgentPool handlers: keep each pool's warm agents and report them; drain on deletion."""

from __future__ import annotations

from typing import Any

import kopf

from controller.errors import AgentainerError, InvalidSpecError
from controller.handlers.context import Context
from controller.engine import now
from controller.models import (
    API_GROUP,
    API_VERSION,
    Backend,
    Condition,
    ConditionStatus,
    parse_agent_pool,
)

PLURAL = "agentpools"


async def _reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch) -> None:
    context: Context = memo.context
    uid = body.metadata.uid or ""
    if body.metadata.get("deletionTimestamp"):
        return  # being drained by pool_deleted: never warm it up again
    try:
        pool = parse_agent_pool(dict(body), f"agentpool {body.metadata.name}")
    except InvalidSpecError as error:
        message = "; ".join(str(p) for p in error.problems)
        patch.status["conditions"] = [Condition(
            type="Ready", status=ConditionStatus.FALSE, reason="Invalid", message=message,
            last_transition_time=now()).model_dump(mode="json", by_alias=True)]
        return
    backend_name = pool.spec.backend or Backend(context.settings.default_backend)
    try:
        backend = await context.backend(backend_name.value)
        state = context.pools.register(pool, uid, backend)
        status = await context.pools.reconcile(state)
    except AgentainerError as error:
        context.metrics.reconcile_errors.labels("AgentPool", type(error).__name__).inc()
        raise kopf.TemporaryError(str(error), delay=error.delay) from error
    ready = status.ready >= (pool.spec.min_size if pool.spec.warm_up else 0)
    previous = {c.get("type"): c for c in (body.get("status") or {}).get("conditions", [])}
    reason = "MinSizeReached" if ready else "WarmingUp"
    old = previous.get("Ready", {})
    changed = old.get("status") != ("True" if ready else "False")
    status.conditions = [Condition(
        type="Ready", status=ConditionStatus.TRUE if ready else ConditionStatus.FALSE,
        reason=reason, message=f"{status.ready} of minSize {pool.spec.min_size} warm",
        last_transition_time=now() if changed else old.get("lastTransitionTime", now()))]
    for label, count in (("ready", status.ready), ("busy", status.busy)):
        context.metrics.pool_agents.labels(pool.metadata.name, label).set(count)
    patch.status.update(status.to_dict())


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
async def pool_changed(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    await _reconcile(body, memo, patch)


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=10.0, initial_delay=10.0)
async def pool_observed(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    """Re-observe the agents: one that died is replaced."""
    await _reconcile(body, memo, patch)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
async def pool_deleted(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                       **_: Any) -> None:
    """Drain: no new leases, running tasks finish, then every agent is removed."""
    context: Context = memo.context
    backend_name = (body.get("spec") or {}).get("backend") or context.settings.default_backend
    try:
        pool = parse_agent_pool(dict(body))
        backend = await context.backend(backend_name)
        removed = await context.pools.drain(
            context.pools.register(pool, body.metadata.uid or "", backend))
    except InvalidSpecError:
        removed = 0  # never had agents
    except AgentainerError as error:
        raise kopf.TemporaryError(str(error), delay=error.delay) from error
    for state in ("ready", "busy"):
        try:
            context.metrics.pool_agents.remove(body.metadata.name, state)
        except KeyError:
            pass  # never reported
    logger.info("drained the pool: removed %d agents", removed)
