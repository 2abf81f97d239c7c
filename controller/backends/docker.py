"""Agents as Docker containers on one engine (docker-py); the only module that imports docker."""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar, cast

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions
from docker.transport.unixconn import UnixHTTPAdapter

from controller.backends import output, runner
from controller.backends.containers import (
    ENGINE_STOP_SIGNALS,
    Ending,
    agent_argv,
    container_config,
    read_kept,
)
from controller.backends.base import (
    LABEL_HELPER,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    AgentHandle,
    AgentResult,
    AgentSpec,
    EnvSources,
    WorkspaceSpec,
    NoEnvSources,
    TaskResult,
    Waiting,
)
from controller.backends.channel import DockerAttachChannel
from controller.backends.exits import ENDS, FOLLOWING, ContainerExits, EventStream
from controller.config import Settings
from controller.turns import URGENT, Turns
from controller.models import WORKSPACE_PATH, EnvSource
from controller.errors import (
    AgentainerError,
    AgentInterruptedError,
    AgentSpecError,
    BackendError,
    BackendUnavailableError,
    ConflictError,
    ForbiddenError,
    ImageNotFoundError,
    NotFoundError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The answers a caller must tell apart; other client errors refuse the spec (AgentSpecError).
CLIENT_ERRORS: dict[int, type[AgentainerError]] = {
    403: ForbiddenError, 404: NotFoundError, 409: ConflictError}

CREATE_KEYS = frozenset({"image", "name", "labels", "environment", "detach", "entrypoint",
                         "command", "stdin_open", "user", "working_dir"})
"""The keys of ``container_config`` that are the container's own; the others (but volumes,
split between both) are its host's."""

HELPER_SECONDS = 120
"""How long a helper container (the runner's image filling a volume) may take."""


@contextmanager
def docker_errors(action: str, image: str = "") -> Iterator[None]:
    """Turn docker-py and connection errors into the project's errors, naming the action."""
    try:
        yield
    except docker.errors.ImageNotFound as error:
        raise ImageNotFoundError(
            f"{action}: image '{image}' is not on the Docker engine ({error.explanation})"
        ) from error
    except docker.errors.APIError as error:
        explanation = error.explanation or str(error)
        refused = CLIENT_ERRORS.get(error.status_code or 0)
        if refused is not None:
            raise refused(f"{action}: Docker refused it: {explanation}") from error
        # Older engines answer 500 when the runtime cannot exec the command; it is still the
        # spec's fault (a typo in command), so retrying cannot help.
        if error.is_client_error() or "OCI runtime create failed" in explanation:
            raise AgentSpecError(f"{action}: Docker refused it: {explanation}") from error
        raise BackendError(f"{action}: Docker engine error: {explanation}") from error
    # Any failure of the connection itself, also mid-answer (a log stream cut short when the
    # engine restarts is a ChunkedEncodingError): the engine is away, for now.
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
            docker.errors.DockerException) as error:
        raise BackendUnavailableError(
            f"{action}: cannot reach the Docker engine ({error}); is dockerd running and "
            "DOCKER_HOST right? (`make docker` starts one)"
        ) from error


class OneSocketAdapter(UnixHTTPAdapter):
    """docker-py's adapter for the engine's Unix socket keeps a pool of connections per
    request URL (per container, per query string), and 25 such pools at most: nearly every
    call opened a connection of its own, and closed one of another pool. One socket, one
    pool of connections, kept. Nor does a call to a local socket look for proxies and a
    .netrc in the environment, as each call did."""

    ENGINE = "http+docker://localhost"

    def get_connection(self, url: str | bytes, proxies: Any = None) -> Any:
        return super().get_connection(self.ENGINE, proxies)

    @classmethod
    def install(cls, client: docker.DockerClient) -> None:
        """Mount one on the client instead of its own, when it talks to a Unix socket."""
        current = client.api.get_adapter(cls.ENGINE)
        if isinstance(current, UnixHTTPAdapter) and not isinstance(current, cls):
            client.api.mount("http+docker://", cls(
                f"http+unix://{current.socket_path}", current.timeout,
                max_pool_size=current.max_pool_size))
            current.close()
            client.api.trust_env = False


class DaemonThreads:
    """Threads for blocking calls, kept from one call to the next (starting a thread per call
    cost the controller a twentieth of its CPU under load), as many as calls in flight. Not a
    ThreadPoolExecutor: the interpreter joins those threads at exit, so a process shutting
    down would wait for every call still blocked (a stop in its grace period, a log still
    streaming) to return; these are daemons, never joined."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def run(self, work: Callable[[], None]) -> None:
        """Have ``work`` (which raises nothing) run on a thread of its own."""
        with self._lock:
            spare = self._idle > 0
            if spare:
                self._idle -= 1
        if not spare:
            threading.Thread(target=self._serve, name=self._name, daemon=True).start()
        self._work.put(work)

    def _serve(self) -> None:
        while True:
            work = self._work.get()
            try:
                work()
            finally:
                with self._lock:
                    self._idle += 1


class DockerBackend:
    """Runs each agent as a container; blocking docker-py calls run in threads."""

    enforces_deadlines = False

    def __init__(self, client: docker.DockerClient, settings: Settings,
                 env: EnvSources | None = None) -> None:
        self._client = client
        self._settings = settings
        self._env = env or NoEnvSources()
        self._slots = Turns(settings.docker_threads, reserved=settings.docker_threads // 8)
        """Calls in flight at once; an eighth of them only for those that finish agents, so
        that an ended or timed-out agent is read or stopped at once however long the engine
        takes to create the others."""
        self._channels: dict[str, DockerAttachChannel] = {}
        self._channel_locks: dict[str, asyncio.Lock] = {}
        self._threads = DaemonThreads("docker")
        self._runner_lock = threading.Lock()
        self._runner_volume_name: str | None = None
        self._outages = 0
        """Times a call found the engine away (its connection refused or cut)."""
        self._started: dict[str, int] = {}
        """Agents started by this process, with the count of outages then."""
        self._stopping: set[str] = set()
        """Agents this process stopped: a signal they got was not the engine's own doing."""
        self._exits = ContainerExits(self._events, self._engine_away)
        """Agents' ends, from one stream of the engine's events: waiting takes no slot."""
        self._finishing = (self._result, self._running, self._stop, self._remove)

    @classmethod
    async def connect(cls, settings: Settings, env: EnvSources | None = None) -> DockerBackend:
        """Connect to the engine named by DOCKER_HOST (or the default socket) and check it.
        ``env``: where ``valueFrom`` variables are read (none: refused)."""

        def make_client() -> docker.DockerClient:
            with docker_errors("connecting to Docker"):
                client = docker.from_env(max_pool_size=settings.docker_threads)
                OneSocketAdapter.install(client)
                client.ping()
                return client

        backend = cls(await asyncio.to_thread(make_client), settings, env)
        try:
            await asyncio.to_thread(backend._sweep_helpers)
        except AgentainerError as error:  # they wait for the next process
            logger.warning("leaving the helper containers an earlier process left: %s", error)
        backend._exits.start()  # connected before the first agent starts: its end is told
        return backend

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking docker-py call in a daemon thread, in its turn: calls that finish
        agents (reading an ended one, stopping, removing) go before those that start new ones,
        so that under load an agent's end is read at once and the engine holds no more
        containers than it runs."""
        async with self._slots.turn(URGENT if function in self._finishing else URGENT + 1):
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()

            def settle(outcome: Callable[[], None]) -> None:
                if not future.done():
                    outcome()

            def work() -> None:
                try:
                    result = function(*args, **kwargs)
                except BaseException as error:  # handed over to the awaiting task
                    deliver = functools.partial(settle, functools.partial(
                        future.set_exception, error))
                else:
                    deliver = functools.partial(settle, functools.partial(
                        future.set_result, result))
                try:
                    loop.call_soon_threadsafe(deliver)
                except RuntimeError:
                    pass  # the loop has closed: nobody is waiting any more

            self._threads.run(work)
            return await future

    # --- blocking parts, run in the pool -------------------------------------------------------

    def _create(self, config: dict[str, Any], action: str) -> str:
        """Create a container (its id), pulling its image first when it is missing and the
        policy allows."""
        image = config["image"]
        try:
            with docker_errors(action, image):
                return self._create_container(config)
        except ImageNotFoundError:
            if self._settings.image_pull_policy == "Never":
                raise ImageNotFoundError(
                    f"image '{image}' is not on the Docker engine and the pull policy is "
                    "Never; build it (`make image` builds agentainer/busybox and the runner) "
                    "or `docker load` it"
                ) from None
        self._pull(image)
        with docker_errors(action, image):
            return self._create_container(config)

    def _create_container(self, config: dict[str, Any]) -> str:
        """The engine's create call alone: docker-py's ``containers.create`` inspects the new
        container too, a second call per agent for nothing kept."""
        api = self._client.api
        create = {key: config[key] for key in CREATE_KEYS if key in config}
        host = {key: value for key, value in config.items()
                if key not in CREATE_KEYS and key != "volumes"}
        if volumes := config.get("volumes"):
            host["binds"] = volumes
            create["volumes"] = [bind["bind"] for bind in volumes.values()]
        created = api.create_container(
            host_config=api.create_host_config(**host), **create)
        return str(created["Id"])

    def _pull(self, image: str) -> None:
        logger.info("pulling image %s", image)
        try:
            self._client.images.pull(image)
        except docker.errors.APIError as error:
            raise ImageNotFoundError(
                f"image '{image}' is not on the Docker engine and pulling it failed "
                f"({error.explanation}); build it (`make image` builds agentainer/busybox and "
                "the runner) or `docker load` it"
            ) from error

    def _container_config(self, spec: AgentSpec) -> dict[str, Any]:
        through = None if spec.resident else self._through_runner(spec)
        return container_config(spec, self._settings.docker_network,
                                self._settings.agent_pids_limit, through,
                                self._settings.agent_log_bytes)

    def _through_runner(self, spec: AgentSpec) -> runner.Exec:
        """How the runner runs an agent of its own: its whole command (the spec's, completed
        by its image's), as its image's user."""
        image = dict(self._inspect_image(spec.image, f"creating agent {spec.name}")
                     .get("Config") or {})
        argv = agent_argv(spec, image.get("Entrypoint"), image.get("Cmd"))
        if not argv:
            raise AgentSpecError(f"agent {spec.name}: image '{spec.image}' has no command; "
                                 "give the step a command")
        has_home = "HOME" in spec.env or any(str(e).startswith("HOME=")
                                             for e in image.get("Env") or [])
        return runner.Exec(argv, self._settings.output_limit_bytes, str(image.get("User") or ""),
                           set_home=not has_home, log_limit=self._settings.agent_log_bytes)

    def _inspect_image(self, image: str, action: str) -> dict[str, Any]:
        """The image's inspection, pulled first when it is missing and the policy allows."""
        try:
            with docker_errors(action, image):
                return dict(self._client.api.inspect_image(image))  # type: ignore[no-untyped-call]
        except ImageNotFoundError:
            if self._settings.image_pull_policy == "Never":
                raise
        self._pull(image)
        with docker_errors(action, image):
            return dict(self._client.api.inspect_image(image))  # type: ignore[no-untyped-call]

    def _start(self, spec: AgentSpec) -> AgentHandle:
        config = self._container_config(spec)
        config["volumes"] = {self._runner_volume(): {"bind": runner.RUNNER_BIN_DIR, "mode": "ro"}}
        if spec.workspace:
            config["volumes"][spec.workspace] = {"bind": WORKSPACE_PATH, "mode": "rw"}
        agent_id = self._create(config, f"creating agent {spec.name}")
        self._exits.expect(agent_id)
        try:
            with docker_errors(f"starting agent {spec.name}", spec.image):
                self._client.api.start(agent_id)
        except BaseException:
            self._remove(agent_id)
            raise
        self._started[agent_id] = self._outages
        return AgentHandle(id=agent_id, name=spec.name, labels=dict(spec.labels))

    def _runner_volume(self) -> str:
        """A volume holding the task runner, mounted read-only into every agent (no copy per
        agent): named after the runner image, filled from it once per process."""
        with self._runner_lock:
            if self._runner_volume_name is None:
                image = self._settings.runner_image
                found = self._inspect_image(image, "reading the task runner")
                name = f"agentainer-runner-{str(found['Id']).split(':')[-1][:12]}"
                with docker_errors("making the task runner's volume"):
                    self._client.volumes.create(name, labels={LABEL_MANAGED_BY: MANAGED_BY})
                code = self._run_runner(["install", runner.RUNNER_PATH], name,
                                        runner.RUNNER_BIN_DIR, "filling the task runner's volume")
                if code != 0:
                    raise ImageNotFoundError(f"image '{image}' could not install the task "
                                             f"runner (exit {code})")
                self._runner_volume_name = name
            return self._runner_volume_name

    def _run_runner(self, command: list[str], volume: str, path: str, action: str) -> int:
        """Run the runner's image once, with ``volume`` at ``path``: its exit code, within
        ``HELPER_SECONDS``. Its container is labelled a helper: one that a process ending
        mid-way left behind is removed when the next one connects (:meth:`_sweep_helpers`);
        if that sweep took this one as it ended, it runs again (what it does is idempotent)."""
        try:
            return self._run_helper(command, volume, path, action)
        except NotFoundError:
            return self._run_helper(command, volume, path, action)

    def _run_helper(self, command: list[str], volume: str, path: str, action: str) -> int:
        image = self._settings.runner_image
        container = self._create(
            {"image": image, "command": command,
             "volumes": {volume: {"bind": path, "mode": "rw"}},
             "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_HELPER: command[0]},
             "network_mode": "none"}, action)
        try:
            with docker_errors(action, image):
                self._client.api.start(container)
                try:
                    answer = self._client.api.wait(container, timeout=HELPER_SECONDS)
                except requests.exceptions.ConnectionError as error:
                    if not isinstance(error.args[0] if error.args else None,
                                      urllib3.exceptions.ReadTimeoutError):
                        raise
                    raise BackendError(f"{action}: the image '{image}' did not finish "
                                       f"'{command[0]}' within {HELPER_SECONDS} s") from None
                return int(answer.get("StatusCode", -1))
        finally:
            self._remove(container)

    def _sweep_helpers(self) -> None:
        """Remove the helper containers (:meth:`_run_runner`) that a process ended before it
        could: those that have exited, and any made over ``HELPER_SECONDS`` ago (a process on
        the same engine may be about to start a newer one)."""
        filters = {"label": [f"{LABEL_MANAGED_BY}={MANAGED_BY}", LABEL_HELPER]}
        with docker_errors("listing the task runner's helper containers"):
            found = self._client.api.containers(all=True, filters=filters)
        for container in found:
            if container.get("State") in ("exited", "dead") or \
                    time.time() - int(container.get("Created") or 0) > HELPER_SECONDS:
                self._remove(str(container["Id"]))

    def _prepare_workspace(self, workspace: WorkspaceSpec) -> None:
        with docker_errors(f"making the workspace {workspace.name}"):
            # Creating a volume that exists gives it back: preparing is idempotent.
            self._client.volumes.create(workspace.name, labels=dict(workspace.labels))
        # Writable by every agent's user, whoever that is (mode 1777, as /tmp).
        code = self._run_runner(["workspace", WORKSPACE_PATH], workspace.name, WORKSPACE_PATH,
                                f"preparing the workspace {workspace.name}")
        if code != 0:
            raise BackendError(f"preparing the workspace {workspace.name}: exit {code}")

    def _remove_workspace(self, workspace: WorkspaceSpec) -> None:
        try:
            with docker_errors(f"removing the workspace {workspace.name}"):
                self._client.api.remove_volume(workspace.name, force=True)
        except NotFoundError:
            pass

    def _events(self, since: int) -> EventStream:
        """The engine's events of containers ending, from ``since`` (a unix time) on."""
        with docker_errors(FOLLOWING):
            stream = self._client.api.events(
                since=since, filters={"type": "container", "event": list(ENDS)}, decode=True)
            # Its iteration would end quietly on a refusal (a proxy's 403): said here.
            self._client.api._raise_for_status(stream._response)  # type: ignore[attr-defined]
            return cast(EventStream, stream)

    def _engine_away(self) -> None:
        self._outages += 1

    def _running(self, agent: AgentHandle) -> bool:
        with docker_errors(f"waiting for agent {agent.name}"), self._noting_outages():
            return bool(self._client.api.inspect_container(agent.id)["State"].get("Running"))

    def _waited(self, agent: AgentHandle) -> None:
        """Wait for an agent's end on a call of its own (holding its slot meanwhile): for
        an engine that refuses its events."""
        with docker_errors(f"waiting for agent {agent.name}"), self._noting_outages():
            self._client.api.wait(agent.id)

    def _result(self, agent: AgentHandle) -> AgentResult | None:
        """The outcome of an agent whose end was told (None: it runs after all, started
        again by someone else)."""
        limit = self._settings.output_limit_bytes
        stdout, stderr = output.Head(limit), output.Tail(limit)
        with docker_errors(f"waiting for agent {agent.name}"), self._noting_outages():
            state = self._client.api.inspect_container(agent.id)["State"]
            if state.get("Running"):
                return None
            exit_code = int(state.get("ExitCode", -1))
            # Its log and exit code are whole unless the engine was away since it started (or it
            # is an agent of an earlier process, which may have seen that): then the runner's
            # files say them, and whether the engine stopped it as it shut down (with
            # live-restore it stops the containers when it finds none running, such as those
            # still starting).
            kept, interrupted = False, False
            if self._started.pop(agent.id, -1) != self._outages:
                kept, ending = self._read_kept(agent.id, stdout, stderr)
                if ending is not None:
                    exit_code = ending.code
                    interrupted = ending.signal in ENGINE_STOP_SIGNALS and \
                        agent.id not in self._stopping
                elif kept and not state.get("OOMKilled"):
                    # The runner itself was ended without a word: killed from outside, or lost
                    # with its container as the engine restarted ("shim disconnected", exit
                    # 255). Either way the agent did not end by itself.
                    interrupted = agent.id not in self._stopping
            self._stopping.discard(agent.id)
            if not kept:
                stdout, stderr = self._read_logs(agent.id, limit)
                if stderr.ends_with(runner.LOG_FULL.encode() + b"\n"):
                    stdout, stderr = self._kept_instead(agent.id, stdout, stderr)
        return AgentResult(
            exit_code=exit_code,
            stdout=stdout.text(),
            stderr=stderr.text(),
            oom_killed=bool(state.get("OOMKilled")),
            output_truncated=stdout.truncated,
            interrupted=interrupted,
        )

    @contextmanager
    def _noting_outages(self) -> Iterator[None]:
        """Count the times the engine was found away: an agent started before one may have
        ended while it was, and lost its log's end and its exit code."""
        try:
            yield
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError):
            self._outages += 1
            raise

    def _kept_instead(self, agent_id: str, stdout: output.Head,
                      stderr: output.Tail) -> tuple[output.Head, output.Tail]:
        """The runner's files in place of a log the runner stopped writing, full: the head of
        stdout and the tail of stderr, whole. The log's if they are gone."""
        limit = self._settings.output_limit_bytes
        kept_out, kept_err = output.Head(limit), output.Tail(limit)
        if self._read_kept(agent_id, kept_out, kept_err)[0]:
            return kept_out, kept_err
        return stdout, stderr

    def _read_kept(self, agent_id: str, stdout: output.Head,
                   stderr: output.Tail) -> tuple[bool, Ending | None]:
        """The output and ending the runner kept in the container's files, read a piece at a
        time: whether there was output (not for an agent started without the runner, or one
        that never ran), and how it ended (None if the runner did not see it end)."""
        try:
            chunks, _ = self._client.api.get_archive(agent_id, runner.OUT_DIR)
        except docker.errors.NotFound:
            return False, None
        try:
            return read_kept(chunks, stdout, stderr)
        except tarfile.TarError as error:  # not an archive of the runner's files: the log says
            logger.warning("agent %s: its kept output cannot be read (%s); its log is read",
                           agent_id[:12], error)
            return False, None

    def _read_logs(self, agent_id: str, limit: int) -> tuple[output.Head, output.Tail]:
        """The head of an agent's stdout and the tail of its stderr, from one stream of both a
        frame at a time, never whole. Should stdout pass its limit, that stream is closed (the
        rest is not wanted) and stderr read from a stream of its own."""
        stdout, stderr = output.Head(limit), output.Tail(limit)
        for stream, data in self._log_frames(agent_id, stdout=True, stderr=True):
            if stream == output.STDERR:
                stderr.feed(data)
            elif not stdout.feed(data):
                break
        else:
            return stdout, stderr
        stderr = output.Tail(limit)
        for _, data in self._log_frames(agent_id, stdout=False, stderr=True):
            stderr.feed(data)
        return stdout, stderr

    def _log_frames(self, agent_id: str, stdout: bool,
                    stderr: bool) -> Iterator[tuple[int, bytes]]:
        """An agent's log as the engine streams it, a frame at a time (closed when the reader
        stops). Not docker-py's ``logs``, which inspects the container first, each time, to
        learn whether it has a terminal: an agent never has one."""
        api = self._client.api
        answer = api.get(f"{api.base_url}/v{api.api_version}/containers/{agent_id}/logs",
                         params={"stdout": int(stdout), "stderr": int(stderr), "follow": 0},
                         stream=True, timeout=api.timeout)
        try:
            try:
                answer.raise_for_status()
            except requests.exceptions.HTTPError as error:
                docker.errors.create_api_error_from_http_exception(error)  # raises it
            yield from output.frames(answer.iter_content(65536))
        finally:
            answer.close()

    def _stop(self, agent_id: str, grace_seconds: float) -> None:
        self._stopping.add(agent_id)
        try:
            with docker_errors("stopping agent"):
                self._client.api.stop(agent_id, timeout=max(0, round(grace_seconds)))
        except (NotFoundError, ConflictError):
            pass  # already gone, or being removed

    def _remove(self, agent_id: str) -> None:
        self._started.pop(agent_id, None)
        self._exits.forget(agent_id)
        self._stopping.discard(agent_id)
        try:
            with docker_errors("removing agent"):
                self._client.api.remove_container(agent_id, v=True, force=True)
        except (NotFoundError, ConflictError):
            pass  # already gone, or its removal already in progress

    def _list(self, labels: dict[str, str]) -> list[AgentHandle]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        with docker_errors("listing agents"):
            containers = self._client.api.containers(all=True, filters=filters)
        return [
            AgentHandle(
                id=c["Id"],
                name=c["Names"][0].lstrip("/"),
                labels=dict(c.get("Labels") or {}),
                state="created" if c.get("State") == "created" else
                      "running" if c.get("State") in ("running", "restarting", "paused")
                      else "exited",
            )
            for c in containers
        ]

    def _attach(self, agent_id: str) -> socket.socket:
        with docker_errors("attaching to agent"):
            raw = self._client.api.attach_socket(
                agent_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        sock = getattr(raw, "_sock", raw)
        if not isinstance(sock, socket.socket):
            raise BackendError("attaching to agent: the engine's connection is not a socket")
        return sock

    async def _channel(self, agent: AgentHandle) -> DockerAttachChannel:
        """The agent's runner, attached and greeted (once per agent and process)."""
        async with self._channel_locks.setdefault(agent.id, asyncio.Lock()):
            channel = self._channels.get(agent.id)
            if channel is None or not channel.alive():
                if channel is not None:
                    channel.close()
                channel = DockerAttachChannel(await self._call(self._attach, agent.id),
                                              agent.name)
                await channel.hello()
                self._channels[agent.id] = channel
            return channel

    def _forget_channel(self, agent_id: str) -> None:
        self._channel_locks.pop(agent_id, None)
        channel = self._channels.pop(agent_id, None)
        if channel is not None:
            channel.close()

    def _log_tail(self, agent_id: str) -> str:
        try:
            with docker_errors("reading an agent's log"):
                text = self._client.api.logs(agent_id, stdout=False, stderr=True, tail=5)
        except AgentainerError:
            return ""  # only for a message: an error already being reported
        return bytes(text).decode(errors="replace").strip()

    # --- the Backend protocol ------------------------------------------------------------------

    async def run_task(self, agent: AgentHandle, argv: list[str], env: dict[str, str],
                       timeout: float | None) -> TaskResult:
        channel = await self._channel(agent)
        try:
            return await channel.run(argv, env, timeout, self._settings.output_limit_bytes)
        except runner.ChannelClosedError as error:
            if await self._running_on(agent):
                raise AgentInterruptedError(
                    f"{error}; the agent runs on, so the Docker engine broke the connection "
                    "(restarting?): the task runs again") from error
            raise

    async def _running_on(self, agent: AgentHandle) -> bool:
        """Whether the agent still runs (True too while the engine cannot say: it is away)."""
        try:
            state = await self._call(self._client.api.inspect_container, agent.id)
        except docker.errors.NotFound:
            return False
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError):
            return True
        return bool(state["State"].get("Running"))

    async def env_values(self, namespace: str,
                         refs: Mapping[str, EnvSource]) -> dict[str, str]:
        return await self._env.values(namespace, refs) if refs else {}

    async def prepare_workspace(self, workspace: WorkspaceSpec) -> None:
        await self._call(self._prepare_workspace, workspace)

    async def remove_workspace(self, workspace: WorkspaceSpec) -> None:
        await self._call(self._remove_workspace, workspace)

    async def start(self, spec: AgentSpec) -> AgentHandle:
        if spec.env_refs:  # read now, given to the container, kept nowhere else
            spec = replace(spec, env=spec.env | await self.env_values(spec.namespace,
                                                                      spec.env_refs),
                           env_refs={})
        handle = await self._call(self._start, spec)
        if spec.resident:
            try:  # a runner that cannot answer is found now, not at the first task
                await self._channel(handle)
            except BaseException as error:
                log = await self._call(self._log_tail, handle.id)
                await asyncio.shield(self.remove(handle))
                if isinstance(error, (AgentainerError, TimeoutError)):
                    raise BackendError(f"agent {spec.name}: its task runner did not answer "
                                       f"({error}){': ' + log if log else ''}") from error
                raise
        return handle

    async def wait(self, agent: AgentHandle, waiting: Waiting | None = None) -> AgentResult:
        # A container runs once started: it never waits for room, so ``waiting`` is not told.
        while True:
            await self._exits.ended(agent.id, lambda: self._call(self._running, agent),
                                    lambda: self._call(self._waited, agent))
            if (result := await self._call(self._result, agent)) is not None:
                return result
            self._exits.forget(agent.id)  # its next end is asked for anew

    async def stop(self, agent: AgentHandle, grace_seconds: float) -> None:
        self._forget_channel(agent.id)
        await self._call(self._stop, agent.id, grace_seconds)

    async def remove(self, agent: AgentHandle) -> None:
        self._forget_channel(agent.id)
        await self._call(self._remove, agent.id)

    async def list_agents(self, namespace: str, labels: dict[str, str],
                          owner: str | None = None) -> list[AgentHandle]:
        # Only the controller reaches this engine: whatever carries our labels is ours.
        return await self._call(self._list, labels)

    def log_lines(self, agent: AgentHandle, follow: bool = False) -> Iterator[str]:
        """What an agent's container printed, stdout and stderr as they came, line by line;
        with ``follow``, until it ends. Blocking, for the CLI (``agentainer logs``): the
        engine reads an agent's output through ``wait``."""
        with docker_errors(f"reading the log of agent {agent.name}"):
            chunks = self._client.api.logs(agent.id, stdout=True, stderr=True, stream=True,
                                           follow=follow)
            pending = b""
            for chunk in chunks:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")

    async def close(self) -> None:
        self._exits.close()
        for agent_id in list(self._channels):
            self._forget_channel(agent_id)
        self._client.close()
