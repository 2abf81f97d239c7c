"""What every backend offers the engine: start an agent, wait for it, stop it, remove it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.models import DEFAULT_TASK_USER, PodOptions

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
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "agentainer"


@dataclass(frozen=True)
class AgentSpec:
    """Everything needed to start one agent, whatever the backend. Built by the engine."""

    name: str
    image: str
    command: list[str] | None
    args: list[str] | None
    env: dict[str, str]
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


class Backend(Protocol):
    """A place where agents run. Every method raises only the project's own errors."""

    enforces_deadlines: bool
    """True when the backend stops an agent past ``AgentSpec.timeout_seconds`` by itself."""

    async def start(self, spec: AgentSpec) -> AgentHandle:
        """Create and start an agent (pulling its image when allowed)."""

    async def wait(self, agent: AgentHandle) -> AgentResult:
        """Wait until the agent stops; return its exit status and output."""

    async def stop(self, agent: AgentHandle, grace_seconds: float) -> None:
        """Ask the agent to stop, killing it after ``grace_seconds``; no error if it has."""

    async def remove(self, agent: AgentHandle) -> None:
        """Remove the stopped agent; no error if it is already gone."""

    async def list_agents(self, namespace: str, labels: dict[str, str]) -> list[AgentHandle]:
        """Agents, running or stopped, that carry all of these labels, in ``namespace`` (a pod's;
        Docker has none). Where the backend records owners (Kubernetes), only agents owned by
        the resource whose uid the labels name: labels alone anyone who may create a pod
        could copy."""

    async def run_task(self, agent: AgentHandle, argv: list[str], env: dict[str, str],
                       timeout: float | None) -> TaskResult:
        """Run one task on a resident agent's runner, never two at once on the same agent. A
        task past ``timeout`` is ended by the runner (``TaskResult.timed_out``). A runner that
        does not answer long after that raises TimeoutError, one that is gone BackendError;
        either way the agent is unusable (the caller replaces it)."""

    async def close(self) -> None:
        """Release connections and threads."""
