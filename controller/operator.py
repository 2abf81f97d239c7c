"""The controller process: its HTTP endpoints (metrics, liveness, readiness), leader election
among replicas, and kopf's operator, which runs only while this replica leads."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.config import Settings
from controller.errors import ConfigError
from controller.leader import LeaderElection
from controller.metrics import Metrics

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
THREADS_DEADLINE_SECONDS = 10.0
"""Liveness fails when a worker thread (every call to Docker, Kubernetes and Redis runs on
one) cannot be had within this long: the controller would be stuck."""
LOST_LEASE_EXIT_SECONDS = 25.0
"""A replica that lost its lease stops its operator at once (workflows detach from their
agents, for the new leader to adopt); it exits after at most this long, whatever is left."""
EXIT_LOST_LEASE = 3


@dataclass
class Options:
    namespaces: list[str] = field(default_factory=list)
    """Namespaces to watch; empty: all."""
    lease: str | None = None
    """Name of the Lease replicas elect a leader on; None: run alone, unelected."""
    lease_namespace: str | None = None
    """Namespace of the Lease; None: the controller's own."""


def own_namespace() -> str:
    """The namespace this controller runs in: POD_NAMESPACE (the downward API), else its
    service account's, else ``default``."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


class Health:
    """What ``/healthz`` (liveness) and ``/readyz`` (readiness) answer."""

    def __init__(self, election: LeaderElection | None) -> None:
        self.election = election
        self.operating = asyncio.Event()
        """Set by kopf once its start-up handlers are done."""

    async def problem(self) -> str | None:
        """Why this controller is stuck, or None. A blocked event loop does not answer at all,
        which the probe's timeout catches."""
        try:
            async with asyncio.timeout(THREADS_DEADLINE_SECONDS):
                await asyncio.to_thread(lambda: None)
        except TimeoutError:
            return f"no worker thread free for {THREADS_DEADLINE_SECONDS:.0f} s"
        election = self.election
        if election is not None and election.renewed_at is not None:
            since = time.monotonic() - election.renewed_at
            if since > election.timing.renew_deadline:
                return f"lease not renewed for {since:.0f} s"
        return None

    def ready(self) -> str | None:
        """Why this controller is not ready yet, or None. A standby is ready: it waits."""
        if self.election is not None and not self.election.leading:
            return None
        return None if self.operating.is_set() else "starting"


async def serve(metrics: Metrics, health: Health, config: Settings) -> web.AppRunner:
    """``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for the kubelet's probes."""

    async def scrape(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(_: web.Request) -> web.Response:
        problem = await health.problem()
        return web.Response(status=503 if problem else 200, text=f"{problem or 'ok'}\n")

    async def ready(_: web.Request) -> web.Response:
        problem = health.ready()
        return web.Response(status=503 if problem else 200, text=f"{problem or 'ok'}\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", live)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.metrics_host, config.metrics_port).start()
    except OSError as error:  # the port taken (another controller?), or no such address
        await runner.cleanup()
        raise ConfigError(
            f"cannot serve metrics and health checks on {config.metrics_host}:"
            f"{config.metrics_port} (AGENTAINER_METRICS_HOST, AGENTAINER_METRICS_PORT; 0 "
            f"serves none): {error.strerror or error}") from None
    return runner


async def run(options: Options, config: Settings) -> int:
    """Serve the endpoints, wait to lead (when elected), and run the operator while leading.
    The exit code: 0 when stopped by a signal, EXIT_LOST_LEASE when the lease was lost."""
    election = None
    if options.lease is not None:
        identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        election = await asyncio.to_thread(
            LeaderElection.connect, options.lease_namespace or own_namespace(),
            options.lease, identity)
    metrics = Metrics()
    health = Health(election)
    http = await serve(metrics, health, config) if config.metrics_port else None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        if election is None:
            await _operate(options, metrics, health, stopping)
            return 0
        if not await election.acquire(stopping):
            return 0
        return await _lead(election, options, metrics, health, stopping)
    finally:
        if http is not None:
            await http.cleanup()


async def _lead(election: LeaderElection, options: Options, metrics: Metrics, health: Health,
                stopping: asyncio.Event) -> int:
    holding = asyncio.create_task(election.hold(), name="leader election")
    operating = asyncio.create_task(_operate(options, metrics, health, stopping),
                                    name="operator")
    try:
        await asyncio.wait({holding, operating}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not holding.done():
            holding.cancel()
    if operating.done():
        await election.release()
        operating.result()
        return 0
    logger.error("lost the lease: stopping at once; the new leader adopts the agents")
    stopping.set()
    try:
        async with asyncio.timeout(LOST_LEASE_EXIT_SECONDS):
            await operating
    except TimeoutError:
        logger.error("the operator did not stop in %.0f s: exiting", LOST_LEASE_EXIT_SECONDS)
    return EXIT_LOST_LEASE


async def _operate(options: Options, metrics: Metrics, health: Health,
                   stopping: asyncio.Event) -> None:
    """Run kopf until asked to stop; ``agentainer_leading`` is 1 meanwhile, so that a
    standby's metrics say it stands by."""
    import controller.handlers  # noqa: F401  (registers the handlers)

    metrics.leading.set(1)
    try:
        await kopf.operator(
            clusterwide=not options.namespaces, namespaces=options.namespaces,
            standalone=True,  # no kopf peering: the Lease elects the one replica that works
            memo=kopf.Memo(metrics=metrics), stop_flag=stopping, ready_flag=health.operating)
    finally:
        metrics.leading.set(0)
