"""Start-up and shut-down of the operator: settings and clients. The process around it
(endpoints, leader election) is :mod:`controller.operator`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf
from controller.config import Settings
from controller.errors import AgentainerError
from controller.handlers.context import Services, kubernetes_client
from controller.handlers.reporting import to_kopf
from controller.metrics import Metrics, PoolMetrics
from controller.models import API_GROUP
from controller.pools import PoolManager
from controller.store import open_store

FINALIZER = "agentainer.dev/finalizer"


class PoolsOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's copy of the spec last handled, in an annotation, for AgentPools only. Workflows
    have no handler that kopf tells of a change (theirs compare each event with their run,
    their status and the store), so none is kept for them: a new Workflow costs no write of
    that copy, and none of its events a copy of its body."""

    @staticmethod
    def _ours(body: kopf.Body) -> bool:
        return body.get("kind") == "Workflow" and \
            str(body.get("apiVersion", "")).startswith(f"{API_GROUP}/")

    def build(self, *, body: kopf.Body,
              extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        if self._ours(body):
            return kopf.BodyEssence()
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None if self._ours(body) else super().fetch(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        if not self._ours(body):
            super().store(body=body, patch=patch, essence=essence)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo,
                  logger: kopf.Logger, retry: int, **_: Any) -> None:
    # Our status schema is structural, so kopf keeps its own bookkeeping in annotations.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="agentainer.dev")
    settings.persistence.diffbase_storage = PoolsOnlyDiffBase(
        prefix="agentainer.dev", key="last-handled-configuration")
    settings.posting.level = logging.INFO
    config = Settings.from_env()
    try:
        store = await open_store(config)
    except AgentainerError as error:
        raise to_kopf(error, retry) from error
    try:
        custom_objects = kubernetes_client()
    except AgentainerError as error:
        await store.close()
        raise to_kopf(error, retry) from error
    # The process's metrics, served since before it led (kopf run -m alone: its own).
    metrics = memo.get("metrics") or Metrics()
    pools = PoolManager(store, config, PoolMetrics(metrics))
    memo.services = Services(settings=config, store=store, metrics=metrics, pools=pools,
                             custom_objects=custom_objects)
    logger.info("agentainer controller started: store %s, default backend %s, metrics on :%s",
                config.store, config.default_backend, config.metrics_port or "off")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "services", None) is not None:
        await memo.services.close()
