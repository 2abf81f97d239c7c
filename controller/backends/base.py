"""What every backend offers the engine: start an agent, wait for it, stop it, remove it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.errors import AgentSpecError
from controller.models import DEFAULT_TASK_USER, EnvSource, PodOptions

LABEL_PREFIX = "agentainer.dev/"
LABEL_WORKFLOW = LABEL_PREFIX + "workflow"
LABEL_WORKFLOW_UID = LABEL_PREFIX + "workflow-uid"
LABEL_STEP = LABEL_PREFIX + "step"
LABEL_AGENT_ID = LABEL_PREFIX + "agent-id"
LABEL_INDEX = LABEL_PREFIX + "index"
LABEL_ATTEMPT = LABEL_PREFIX + "attempt"
LABEL_POOL = LABEL_PREFIX + "pool"
LABEL_POOL_UID = LABEL_PREFIX + "pool-uid"
LABEL_RUNNER = LABEL_PREFIX + "runner"
"""On pool agents: the version of the task runner's protocol they speak."""
LABEL_HELPER = LABEL_PREFIX + "helper"
"""On the Docker backend's short-lived containers of the runner's image (filling a volume): what
they do."""
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "agentainer"


@dataclass(frozen=True)
class AgentSpec:
    """Everything needed to start one agent, whatever the backend. Built by the engine."""

    name: str
    image: str
    command: list[str] | None
    args: list[str] | None
    env: dict[str, str] = field(repr=False)
    labels: dict[str, str]
    nano_cpus: int | None = None
    memory_bytes: int | None = None
    resident: bool = False
    """A pool agent: its task runner idles, kept alive, and runs the tasks sent to it
    (``Backend.run_task``)."""
    task_user: tuple[int, int] = (DEFAULT_TASK_USER, DEFAULT_TASK_USER)
    """A pool agent's task user and group: who its tasks run as (0 is root)."""
    namespace: str = "default"
    """Where a pod goes (backend kubernetes)."""
    owner: dict[str, Any] | None = None
    """The resource the agent belongs to, as an ownerReference (backend kubernetes)."""
    timeout_seconds: int | None = None
    """Deadline of the agent, for backends that enforce it themselves."""
    pod: PodOptions | None = None
    workspace: str | None = None
    """The workflow's shared workspace (a volume, or a claim), mounted at /workspace."""
    capabilities: tuple[str, ...] = ()
    """Linux capabilities beyond the defaults (``models.AGENT_CAPABILITIES`` on Docker; none
    in a pod)."""
    env_refs: dict[str, EnvSource] = field(default_factory=dict)
    """Variables whose values are keys of Secrets and ConfigMaps, read only where they are
    used (a pod reads them itself) and never kept."""


@dataclass(frozen=True)
class WorkspaceSpec:
    """A workflow's shared workspace: a Docker volume, or a PersistentVolumeClaim."""

    name: str
    namespace: str
    size: str
    labels: dict[str, str]
    owner: dict[str, Any] | None = None
    storage_class: str | None = None
    access_mode: str = "ReadWriteOnce"
    existing: bool = False
    """A claim of the user's: used as it is, never created or removed."""


class EnvSources(Protocol):
    """Where ``valueFrom`` variables get their values: the cluster's Secrets and ConfigMaps,
    or what ``agentainer run`` was given."""

    async def values(self, namespace: str, refs: Mapping[str, EnvSource]) -> dict[str, str]:
        """The values of these variables; an optional one whose key is missing is left out.
        Raises AgentSpecError naming the variable and what is missing (never a value)."""


class NoEnvSources:
    """Where no Secrets or ConfigMaps can be read."""

    async def values(self, namespace: str, refs: Mapping[str, EnvSource]) -> dict[str, str]:
        for name, source in refs.items():
            raise AgentSpecError(f"env {name}: valueFrom ({source.kind} {source.ref.name}) "
                                 "cannot be read here")
        return {}


def missing(name: str, source: EnvSource, namespace: str, what: str,
            remedy: str = "create it, or mark the reference optional") -> AgentSpecError:
    """The error of a variable whose Secret or ConfigMap (or key) is not there."""
    ref = source.ref
    return AgentSpecError(f"env {name}: {source.kind} {namespace}/{ref.name} {what} "
                          f"(key {ref.key}); {remedy}")


@dataclass(frozen=True)
class TaskResult:
    """How one task on a resident agent ended: its exact stdout, stderr and exit status."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    """The task ran past its timeout and was ended by the agent's runner."""
    clean: bool = True
    """The runner proved the agent as clean as before the task; if not, it is replaced."""
    stdout_truncated: bool = False
    """The task printed more than the output limit to stdout; the rest was dropped."""
    stderr_truncated: bool = False
    note: str = ""
    """Why the agent is not clean, when it is not."""
    run_seconds: float = 0.0
    """From the task's start to its end, as the runner measured it."""
    cleanup_seconds: float = 0.0
    """Ending the task's processes and removing its files, as the runner measured it."""


@dataclass(frozen=True)
class AgentHandle:
    """A started agent, as the backend knows it."""

    id: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "running"
    """``created`` (never started), ``running``, or ``exited``."""


@dataclass(frozen=True)
class AgentResult:
    """How an agent ended."""

    exit_code: int
    stdout: str
    stderr: str
    oom_killed: bool = False
    deadline_exceeded: bool = False
    message: str = ""
    """What the backend said about how it ended, when it said more than the exit code."""
    output_truncated: bool = False
    """It printed more than the output limit; the rest was dropped."""
    interrupted: bool = False
    """The container engine stopped it as the engine shut down: it did not end by itself."""


Waiting = Callable[[str | None], None]
"""Told why an agent that has not begun to run waits, as that changes (None: it no longer
does)."""


class Backend(Protocol):
    """A place where agents run. Every method raises only the project's own errors."""

    enforces_deadlines: bool
    """True when the backend stops an agent past ``AgentSpec.timeout_seconds`` by itself."""

    async def start(self, spec: AgentSpec) -> AgentHandle:
        """Create and start an agent (pulling its image when allowed)."""

    async def wait(self, agent: AgentHandle, waiting: Waiting | None = None) -> AgentResult:
        """Wait until the agent stops; return its exit status and output. ``waiting`` is told
        why the agent has not begun to run, where it waits for something outside it (a pod
        no node has room for), and None once it no longer does."""

    async def stop(self, agent: AgentHandle, grace_seconds: float) -> None:
        """Ask the agent to stop, killing it after ``grace_seconds``; no error if it has."""

    async def remove(self, agent: AgentHandle) -> None:
        """Remove the stopped agent; no error if it is already gone."""

    async def list_agents(self, namespace: str, labels: dict[str, str],
                          owner: str | None = None) -> list[AgentHandle]:
        """Agents, running or stopped, that carry all of these labels, in ``namespace`` (a pod's;
        Docker has none). Given the ``owner``'s uid, where the backend records owners
        (Kubernetes), only agents it owns: labels alone anyone who may create a pod could
        copy."""

    async def env_values(self, namespace: str,
                         refs: Mapping[str, EnvSource]) -> dict[str, str]:
        """The values of ``valueFrom`` variables (a pooled task's env), as
        ``EnvSources.values``."""

    async def prepare_workspace(self, workspace: WorkspaceSpec) -> None:
        """Make the workspace ready for agents to mount (create it unless it exists or is the
        user's); again and again alike."""

    async def remove_workspace(self, workspace: WorkspaceSpec) -> None:
        """Remove the workspace and what it holds (not a user's claim); no error if gone."""

    async def run_task(self, agent: AgentHandle, argv: list[str], env: dict[str, str],
                       timeout: float | None) -> TaskResult:
        """Run one task on a resident agent's runner, never two at once on the same agent. A
        task past ``timeout`` is ended by the runner (``TaskResult.timed_out``). A runner that
        does not answer long after that raises TimeoutError, one that is gone BackendError;
        either way the agent is unusable (the caller replaces it)."""

    async def close(self) -> None:
        """Release connections and threads."""
