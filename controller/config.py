"""Settings of the engine, the CLI and the controller, read from the environment in one place."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from controller import __version__
from controller.errors import ConfigError

ENV_PREFIX = "AGENTAINER_"


@dataclass(frozen=True)
class Settings:
    """Every knob, each read from ``AGENTAINER_<FIELD NAME IN CAPITALS>``."""

    redis_url: str = "redis://localhost:6379/0"
    """Where workflow state, agent records and full outputs are kept: ``redis://`` (``rediss://``
    for TLS), ``redis+sentinel://S1:26379,S2:26379/SERVICE`` or ``redis+cluster://N1:6379,...``;
    better without its password, which goes in ``redis_password``."""

    redis_password: str = field(default="", repr=False)
    """Redis's password (``AUTH``), apart from the URL so that it needs no escaping and never
    shows where the URL does; it overrides one written in the URL."""

    store: str = "redis"
    """``redis`` or ``memory``; memory keeps state only for the life of one process (CLI runs)."""

    state_ttl_seconds: int = 7 * 24 * 3600
    """How long a finished workflow's state stays in Redis, in seconds; 0 keeps it forever.
    A week lets people read results after a weekend without Redis growing without bound."""

    default_backend: str = "docker"
    """Backend of a Workflow whose ``spec.backend`` is not set: ``docker`` or ``kubernetes``."""

    docker_network: str = "bridge"
    """Docker network mode of agents: ``bridge``, ``none``, ``host`` or a network's name."""

    image_pull_policy: str = "IfNotPresent"
    """``IfNotPresent`` pulls a missing image once; ``Never`` only uses images already present."""

    docker_threads: int = 64
    """Docker API calls in flight at once (each in a thread). A running agent holds none: one
    stream of the engine's events tells every agent's end."""

    kubernetes_threads: int = 32
    """Kubernetes API calls of the pod backend in flight at once (creating, deleting, reading
    logs, pool tasks' attach), on threads of its own; waiting for pods takes none (a watch)."""

    stop_grace_seconds: int = 2
    """On cancellation, seconds an agent gets after SIGTERM before it is killed."""

    status_output_limit: int = 1024
    """Characters of a step's output copied into the resource's status; the rest stays in the
    store. Kept small because a custom resource must stay far below etcd's 1.5 MB limit; for
    the same reason a step's message is cut there too, and all the outputs and messages of a
    status keep at most 32 times this together (``handlers.reporting.TEXT_SHARES``: the short
    ones whole, the long ones sharing the rest)."""

    status_agent_limit: int = 100
    """Agents listed in a Workflow's status, over all its steps; the rest are only counted
    (each step's ``agentCounts``), and every one is in the store. About 500 bytes each: kept
    small because a custom resource must stay far below etcd's 1.5 MB limit whatever the
    workflow's size (10,000 replicas, 200 steps, retries). When there are more, those running
    and those failed are listed first."""

    metrics_host: str = "0.0.0.0"
    """Address the controller serves ``/metrics`` and ``/healthz`` on."""

    metrics_port: int = 8080
    """Port of ``/metrics`` and ``/healthz``; 0 turns the endpoint off."""

    status_interval_seconds: float = 1.0
    """The controller writes a running workflow's status at most this often, in seconds, so
    that a fan-out of many agents does not flood the API server with patches: a change is
    written this long after it came, with every change that came meanwhile."""

    status_writes_per_second: int = 50
    """Status writes of running workflows the controller makes per second at most, over all of
    them: with more running than this many times ``status_interval_seconds``, each is written
    less often (a workflow's final status is written at once whatever the load)."""

    lease_ttl_seconds: int = 30
    """A pool agent's lease lapses this many seconds after its holder last renewed it (every
    third of it); then the agent is reclaimed, so one held by a crashed process is not lost."""

    pool_wait_seconds: int = 30
    """How long a pooled step waits for its AgentPool to appear before failing, in seconds
    (a Workflow and its pool applied together reach the controller in either order)."""

    pod_scheduling_seconds: float = 0.0
    """How long an agent's pod may wait for a node (the scheduler finding none with room for
    it, or none it may run on) before its agent fails with the scheduler's reason, in seconds;
    the pod is then removed, as left pending it would run after its step was given up. 0 waits
    as Kubernetes does, for as long as it takes: a fan-out wider than the cluster queues its
    pods until earlier ones end, for as long as those run. A step's ``timeoutSeconds`` bounds
    the wait either way. A pod waiting for its image, or being created, is not counted."""

    backend_retry_seconds: float = 120.0
    """How long, in seconds, the engine retries (with growing pauses) a backend that fails for
    now (a Docker engine restarting, an API server away) while starting or watching an agent.
    Long enough for either to come back; past it the run lets go, and the controller resumes it
    later from the store and the agents' labels. Never counted as the agent's failure."""

    max_agents_per_workflow: int = 100
    """Agents of one workflow that run at once, over all its steps, whatever their maxWorkers:
    a fan-out of 10,000 replicas without maxWorkers must not start 10,000 containers at once.
    The other items wait their turn, costing nothing until they run."""

    runner_image: str = f"agentainer/runner:{__version__}"
    """Image of the task runner that every pool agent runs (``images/runner``, built by ``make
    image``): copied into each pool container on Docker, installed by an init container on
    Kubernetes. Its tag follows the controller's version, so that both speak one protocol."""

    output_limit_bytes: int = 1 << 20
    """Bytes of an agent's stdout, and of its stderr, that are kept (a pooled task's too); the
    rest is dropped as it comes (never held whole) and the output marked truncated. An agent of
    its own keeps the head of its stdout (the data a later step reads) and the tail of its
    stderr (its last lines say why it failed). 1 MiB bounds what one agent can make the
    controller (and Redis) hold; an output a later step reads through a template must stay
    under 128 KiB anyway (Linux's limit on one argument or environment variable of a
    program)."""

    workflow_output_limit_bytes: int = 32 << 20
    """Bytes of outputs one workflow keeps, over all its agents (in the store, and in the
    controller for the steps that read them): past it, each further output is kept only as far
    as the status shows one (its first ``status_output_limit`` bytes, marked truncated), and an
    ``OutputsCut`` Event says so once. So that one chatty fan-out (10,000 agents printing a MiB
    each) cannot fill Redis and stop every other workflow's writes: size Redis for a few
    workflows at this limit (the chart's 192 MB holds five)."""

    agent_pids_limit: int = 1024
    """Processes a Docker agent may have at once (its pids limit), so that a fork bomb stays
    inside its agent; 0 sets none. On Kubernetes the kubelet's ``podPidsLimit`` does this."""

    workflow_ttl_seconds: int = 0
    """How long a finished Workflow (and what it left: kept agents, its workspace, its state
    in Redis) is kept when its spec has no ``ttlSecondsAfterFinished``, in seconds; 0 keeps it
    until it is deleted."""

    finally_grace_seconds: int = 300
    """How long a workflow's finally steps may run once the other steps have ended, in
    seconds (after a cancellation or the workflow's timeout too); then they are stopped."""

    max_items_from: int = 10000
    """How many items a step's ``parallel.itemsFrom`` may give it (the elements of the JSON
    array an upstream step printed); more fail the step, as ``replicas`` stops at 10,000."""

    agent_log_bytes: int = 16 * 1024 * 1024
    """Bytes of a Docker agent's log the engine keeps on disk (json-file, one file): an agent
    that prints without end does not fill the disk. Past this size the engine would drop the
    log's start, the head of stdout with it: the runner logs no more than it holds, says so
    last on stderr, and the output's head (and stderr's tail) then come from its own files.
    On Kubernetes the kubelet's ``containerLogMaxSize`` does this."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``AGENTAINER_*`` variables, then apply explicit overrides."""
        environ = dict(os.environ) if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parsed(ENV_PREFIX + f.name.upper(), str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that cannot work, naming the variable."""
        choices = {
            "store": ("redis", "memory"),
            "default_backend": ("docker", "kubernetes"),
            "image_pull_policy": ("IfNotPresent", "Never"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"{ENV_PREFIX}{name.upper()}={value!r}: must be one of {', '.join(allowed)}"
                )
        minimums = {"docker_threads": 1, "kubernetes_threads": 1, "state_ttl_seconds": 0, "stop_grace_seconds": 0,
                    "status_output_limit": 0, "status_agent_limit": 0, "metrics_port": 0,
                    "status_interval_seconds": 0, "status_writes_per_second": 1,
                    "lease_ttl_seconds": 1, "pool_wait_seconds": 0, "pod_scheduling_seconds": 0,
                    "output_limit_bytes": 1, "workflow_output_limit_bytes": 0,
                    "agent_pids_limit": 0, "backend_retry_seconds": 0,
                    "agent_log_bytes": 1024 * 1024, "max_items_from": 1,
                    "finally_grace_seconds": 1,
                    "max_agents_per_workflow": 1}
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be at least {minimum}")


def _parsed(variable: str, kind: str, raw: str) -> Any:
    """A variable's text as its setting's type (``int``, ``float`` or ``str``), or a clear
    error naming it."""
    if kind == "str":
        return raw
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{variable}={raw!r} is not a whole number") from None
    if kind == "float":
        try:
            number = float(raw)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"{variable}={raw!r} is not a number")
        return number
    raise TypeError(f"{variable}: settings of type {kind} cannot be read from the environment")
