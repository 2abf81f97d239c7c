"""A fake container engine, for unit tests of the workflow engine without Docker.

:class:`FakeBackend` implements the ``Backend`` protocol of ``controller/backends/base.py`` the
way the engine relies on a real engine behaving: agents are "containers" with the names and
labels of their ``AgentSpec`` (a second container of the same name is refused, as Docker
refuses it); ``list_agents`` finds them by labels and reports them ``created``, ``running`` or
``exited``; ``wait`` blocks until the agent has done what it was scripted to do; ``stop`` kills
it (exit 137) and wakes whoever waits for it; ``remove`` makes it disappear.

What an agent does is decided by a *script*: a function of its ``AgentSpec`` (its env, such as
``AGENTAINER_ATTEMPT`` or ``AGENTAINER_ITEM_INDEX``, its command, its labels) that returns a
:class:`Behaviour`: how long it runs (asyncio sleeps of milliseconds), its exit code, its
stdout and stderr.

The fake records what a test needs to check: every start (``started``, in order, with when
each agent ran), every removal (``removed``), the agents it still holds (``agents``), and how
many agents ran at once at most (``most_at_once``). ``hold`` puts in an agent that was there
before the engine (as if started by an earlier controller process), for tests of adoption
after a restart. Pool agents (``run_task``) are not faked.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from controller.backends.base import (
    LABEL_AGENT_ID,
    LABEL_STEP,
    AgentHandle,
    AgentResult,
    AgentSpec,
    TaskResult,
    Waiting,
    WorkspaceSpec,
    missing,
)
from controller.errors import AgentainerError, AgentSpecError, ConflictError, NotFoundError
from controller.models import EnvSource

KILLED = 137
"""Exit code of an agent that was stopped (SIGKILL), as Docker reports it."""


@dataclass(frozen=True)
class Behaviour:
    """What one agent does: runs ``seconds``, then exits with ``exit_code`` having printed
    ``stdout`` and ``stderr``."""

    seconds: float = 0.0
    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""
    start_seconds: float = 0.0
    """How long starting it takes (a slow image pull); it is ``created`` meanwhile."""
    start_error: AgentainerError | None = None
    """Starting it fails with this error (a missing image, an engine that is away)."""
    interrupted: bool = False
    """The engine stops it as the engine shuts down (exit 143), as Docker may."""
    waits_for: str | None = None
    """Told as why it has not begun to run, for the first half of its ``seconds`` (as a pod
    waits for a node)."""


Script = Callable[[AgentSpec], Behaviour]
"""Decides, from its spec, what each agent does."""


def succeed(spec: AgentSpec) -> Behaviour:
    """The default script: every agent exits 0 at once, printing nothing."""
    return Behaviour()


@dataclass(eq=False)
class FakeAgent:
    """One container of the fake engine."""

    id: str
    spec: AgentSpec
    behaviour: Behaviour
    state: str = "created"
    """``created``, ``running`` or ``exited``, as ``list_agents`` reports it."""
    started_at: float | None = None
    """``time.monotonic()`` when it began to run; None if it never did."""
    finished_at: float | None = None
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    killed: bool = False
    """It was stopped (or removed) while running, rather than ending by itself."""
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    process: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def step(self) -> str:
        return self.spec.labels.get(LABEL_STEP, "")

    @property
    def agent_id(self) -> str:
        """The engine's id of the agent, ``step.index.attempt``."""
        return self.spec.labels.get(LABEL_AGENT_ID, "")

    @property
    def attempt(self) -> int:
        return int(self.spec.env.get("AGENTAINER_ATTEMPT", "1"))

    def handle(self) -> AgentHandle:
        return AgentHandle(id=self.id, name=self.name, labels=dict(self.spec.labels),
                           state=self.state)


def most_at_once(agents: Iterable[FakeAgent]) -> int:
    """The most of these agents that were running at the same moment."""
    edges: list[tuple[float, int]] = []
    for agent in agents:
        if agent.started_at is None:
            continue
        edges.append((agent.started_at, 1))
        edges.append((agent.finished_at if agent.finished_at is not None else float("inf"), -1))
    running = peak = 0
    for _, change in sorted(edges):  # at equal times an end (-1) sorts before a start
        running += change
        peak = max(peak, running)
    return peak


class FakeBackend:
    """An in-memory container engine whose agents do what a script says. See the module."""

    enforces_deadlines = False

    def __init__(self, script: Script = succeed) -> None:
        self.script = script
        self.agents: dict[str, FakeAgent] = {}
        """The containers it holds now (not removed), by container id."""
        self._names: dict[str, str] = {}
        """The ids of those containers, by name."""
        self.started: list[FakeAgent] = []
        """Every agent created by ``start``, in order: not those put in by ``hold``, nor those
        whose start failed at once (``Behaviour.start_error``)."""
        self.removed: list[FakeAgent] = []
        self.closed = False
        self.secrets: dict[str, dict[str, str]] = {}
        """Secrets (and ConfigMaps) by name, for ``valueFrom`` variables."""
        self.task_envs: list[dict[str, str]] = []
        self.workspaces: set[str] = set()
        """The workspaces that exist, by name."""
        """The env of every task run, in order."""
        self.hiccups: dict[str, list[AgentainerError]] = {}
        """Errors the next calls of a method (``start``, ``wait``, ...) raise, one per call, as
        an engine restarting or an API server away would. ``start`` raises its error after
        starting the agent: the answer was lost, not the work."""
        self._ids = itertools.count(1)

    # --- for tests ------------------------------------------------------------------------------

    async def hold(self, spec: AgentSpec, behaviour: Behaviour | None = None,
                   state: str = "running") -> FakeAgent:
        """Put in an agent that was there before (started by an earlier controller process):
        ``running`` (it goes on to do ``behaviour``), ``exited`` (it already did) or
        ``created`` (never started). It is not counted in ``started``."""
        if state not in ("created", "running", "exited"):
            raise ValueError(f"no such state: {state}")
        agent = self._create(spec, behaviour or self.script(spec))
        if state == "running":
            self._run(agent)
        elif state == "exited":
            agent.started_at = time.monotonic()
            self._end(agent)
        return agent

    def starts(self, step: str | None = None) -> list[FakeAgent]:
        """The agents started, of one step or of all."""
        return [a for a in self.started if step is None or a.step == step]

    def starts_per_agent(self) -> Counter[str]:
        """How many times each agent id (``step.index.attempt``) was started."""
        return Counter(a.agent_id for a in self.started)

    def held(self, step: str | None = None) -> list[FakeAgent]:
        """The containers still there, of one step or of all."""
        return [a for a in self.agents.values() if step is None or a.step == step]

    def running(self) -> list[FakeAgent]:
        return [a for a in self.agents.values() if a.state == "running"]

    def most_at_once(self, step: str | None = None) -> int:
        """The most agents (of one step, or of all) that ran at the same moment."""
        return most_at_once(self.starts(step))

    # --- the Backend protocol -------------------------------------------------------------------

    def lose(self, agent: FakeAgent) -> None:
        """The agent goes away from under the engine (deleted, evicted, preempted)."""
        self._forget(agent.id)
        self._kill(agent)

    def _hiccup(self, method: str) -> None:
        if self.hiccups.get(method):
            raise self.hiccups[method].pop(0)

    async def prepare_workspace(self, workspace: WorkspaceSpec) -> None:
        self._hiccup("prepare_workspace")
        self.workspaces.add(workspace.name)

    async def remove_workspace(self, workspace: WorkspaceSpec) -> None:
        self.workspaces.discard(workspace.name)

    async def env_values(self, namespace: str,
                         refs: Mapping[str, EnvSource]) -> dict[str, str]:
        values = {}
        for name, source in refs.items():
            found = self.secrets.get(source.ref.name, {})
            if source.ref.key in found:
                values[name] = found[source.ref.key]
            elif not source.ref.optional:
                raise missing(name, source, namespace, "does not exist")
        return values

    async def start(self, spec: AgentSpec) -> AgentHandle:
        if spec.env_refs:  # as the Docker backend: read at the start, given to the agent
            spec = replace(spec, env=spec.env | await self.env_values(spec.namespace,
                                                                      spec.env_refs),
                           env_refs={})
        if spec.name in self._names:
            raise ConflictError(f"creating agent {spec.name}: Conflict: the container name "
                                f'"/{spec.name}" is already in use')
        behaviour = self.script(spec)
        if behaviour.start_error is not None:
            raise behaviour.start_error
        agent = self._create(spec, behaviour)
        self.started.append(agent)
        await asyncio.sleep(behaviour.start_seconds)
        if agent.id not in self.agents:
            raise NotFoundError(f"starting agent {spec.name}: No such container")
        self._run(agent)
        self._hiccup("start")
        return agent.handle()

    async def wait(self, agent: AgentHandle, waiting: Waiting | None = None) -> AgentResult:
        self._hiccup("wait")
        fake = self._find(agent, "waiting for")
        if fake.behaviour.waits_for and waiting is not None:
            waiting(fake.behaviour.waits_for)
            await asyncio.sleep(fake.behaviour.seconds / 2)
            waiting(None)
        await fake.exited.wait()
        self._find(agent, "reading the log of")
        assert fake.exit_code is not None
        return AgentResult(exit_code=fake.exit_code, stdout=fake.stdout, stderr=fake.stderr,
                           interrupted=fake.behaviour.interrupted)

    async def stop(self, agent: AgentHandle, grace_seconds: float) -> None:
        fake = self.agents.get(agent.id)
        if fake is not None:
            self._kill(fake)

    async def remove(self, agent: AgentHandle) -> None:
        fake = self._forget(agent.id)
        if fake is not None:
            self._kill(fake)  # removal is forced, as the Docker backend's is
            self.removed.append(fake)

    async def list_agents(self, namespace: str, labels: dict[str, str],
                          owner: str | None = None) -> list[AgentHandle]:
        self._hiccup("list_agents")
        return [a.handle() for a in self.agents.values()
                if a.spec.namespace == namespace and all(a.spec.labels.get(key) == value for key, value in labels.items())]

    async def run_task(self, agent: AgentHandle, argv: list[str], env: dict[str, str],
                       timeout: float | None) -> TaskResult:
        """A pool agent's task: it echoes its command, at once."""
        self._hiccup("run_task")
        fake = self._find(agent, "running a task in")
        if not fake.spec.resident:
            raise AgentSpecError(f"agent {fake.name} is not a pool agent")
        self.task_envs.append(dict(env))
        return TaskResult(0, " ".join(argv) + "\n", "")

    async def close(self) -> None:
        self.closed = True  # agents run on, as containers outlive the controller's connection

    # --- the fake containers --------------------------------------------------------------------

    def _create(self, spec: AgentSpec, behaviour: Behaviour) -> FakeAgent:
        agent = FakeAgent(id=f"fake-{next(self._ids):04d}", spec=spec, behaviour=behaviour)
        self.agents[agent.id] = agent
        self._names[agent.name] = agent.id
        return agent

    def _forget(self, agent_id: str) -> FakeAgent | None:
        agent = self.agents.pop(agent_id, None)
        if agent is not None:
            self._names.pop(agent.name, None)
        return agent

    def _run(self, agent: FakeAgent) -> None:
        agent.state = "running"
        agent.started_at = time.monotonic()
        if not agent.spec.resident:  # a pool agent idles until it is removed
            agent.process = asyncio.create_task(self._process(agent), name=f"fake-{agent.name}")

    async def _process(self, agent: FakeAgent) -> None:
        await asyncio.sleep(agent.behaviour.seconds)
        self._end(agent)

    def _end(self, agent: FakeAgent) -> None:
        """The agent ends by itself, as its behaviour says."""
        done = agent.behaviour
        self._exit(agent, done.exit_code, done.stdout, done.stderr)

    def _kill(self, agent: FakeAgent) -> None:
        if agent.state == "exited":
            return
        if agent.process is not None:
            agent.process.cancel()
        agent.killed = agent.state == "running"
        self._exit(agent, KILLED, "", "")

    def _exit(self, agent: FakeAgent, code: int, stdout: str, stderr: str) -> None:
        agent.state = "exited"
        agent.finished_at = time.monotonic()
        agent.exit_code, agent.stdout, agent.stderr = code, stdout, stderr
        agent.exited.set()

    def _find(self, agent: AgentHandle, action: str) -> FakeAgent:
        fake = self.agents.get(agent.id)
        if fake is None:
            raise NotFoundError(f"{action} agent {agent.name}: No such container")
        return fake
