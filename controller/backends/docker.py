"""Agents as Docker containers on one engine (docker-py); the only module that imports docker."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from controller.backends.base import (
    CHANNEL_EXEC,
    CHANNEL_SHELL,
    LABEL_CHANNEL,
    AgentHandle,
    AgentResult,
    AgentSpec,
    TaskResult,
)
from controller.backends.channel import ChannelClosedError, ShellChannel
from controller.config import Settings
from controller.errors import (
    AgentSpecError,
    BackendError,
    BackendUnavailableError,
    ImageNotFoundError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Docker refuses memory limits below this (it needs room for the runtime itself).
DOCKER_MIN_MEMORY_BYTES = 6 * 1024 * 1024




def container_config(spec: AgentSpec, network_mode: str,
                     channel: str = CHANNEL_SHELL) -> dict[str, Any]:
    """The ``containers.create`` arguments for an agent: a pure function, tested directly.

    A resident agent with the ``shell`` channel idles in ``sh`` reading its stdin, which stays
    open between attachments; with ``exec`` (images without /bin/sh) it runs the image's own
    command and tasks are ``docker exec``-ed into it.
    """
    config: dict[str, Any] = {
        "image": spec.image,
        "name": spec.name,
        "labels": dict(spec.labels),
        "environment": dict(spec.env),
        "detach": True,
        "network_mode": network_mode,
        "privileged": False,
        "security_opt": ["no-new-privileges:true"],
        # A tiny init as PID 1 forwards SIGTERM and reaps zombies, so a stop is prompt.
        "init": True,
    }
    if spec.resident:
        config["labels"][LABEL_CHANNEL] = channel
        if channel == CHANNEL_SHELL:
            config.update(stdin_open=True, entrypoint=["sh"], command=[])
        return config | _limits(spec)
    if spec.command is not None:
        config["entrypoint"] = list(spec.command)
    if spec.args is not None:
        config["command"] = list(spec.args)
    if spec.command is not None and spec.args is None:
        # As in a pod: a command without args replaces the image's CMD too.
        config["command"] = []
    return config | _limits(spec)


def _limits(spec: AgentSpec) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if spec.nano_cpus is not None:
        config["nano_cpus"] = spec.nano_cpus
    if spec.memory_bytes is not None:
        if spec.memory_bytes < DOCKER_MIN_MEMORY_BYTES:
            raise AgentSpecError(
                f"memory limit {spec.memory_bytes} bytes is below Docker's minimum of 6Mi"
            )
        config["mem_limit"] = spec.memory_bytes
        # Equal to the memory limit: no swap, so the limit means what it says, as in a pod.
        config["memswap_limit"] = spec.memory_bytes
    return config


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
        # Older engines answer 500 when the runtime cannot exec the command; it is still the
        # spec's fault (a typo in command), so retrying cannot help.
        if error.is_client_error() or "OCI runtime create failed" in explanation:
            raise AgentSpecError(f"{action}: Docker refused it: {explanation}") from error
        raise BackendError(f"{action}: Docker engine error: {explanation}") from error
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as error:
        raise BackendUnavailableError(
            f"{action}: cannot reach the Docker engine ({error}); is dockerd running and "
            "DOCKER_HOST right? (`make docker` starts one)"
        ) from error


class DockerBackend:
    """Runs each agent as a container; blocking docker-py calls run in threads."""

    enforces_deadlines = False

    def __init__(self, client: docker.DockerClient, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.docker_threads)
        self._channels: dict[str, ShellChannel] = {}
        self._channel_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, settings: Settings) -> DockerBackend:
        """Connect to the engine named by DOCKER_HOST (or the default socket) and check it."""

        def make_client() -> docker.DockerClient:
            with docker_errors("connecting to Docker"):
                client = docker.from_env(max_pool_size=settings.docker_threads)
                client.ping()
                return client

        return cls(await asyncio.to_thread(make_client), settings)

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking docker-py call in a daemon thread of its own.

        Not a ThreadPoolExecutor: the interpreter joins those threads at exit, so a process
        that leaves its agents running (a controller shutting down) would wait for every
        blocked ``wait`` call to return, that is for the agents to end.
        """
        async with self._slots:
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

            threading.Thread(target=work, name="docker", daemon=True).start()
            return await future

    # --- blocking parts, run in the pool -------------------------------------------------------

    def _create(self, spec: AgentSpec, channel: str = CHANNEL_SHELL) -> Container:
        config = container_config(spec, self._settings.docker_network, channel)
        try:
            with docker_errors(f"creating agent {spec.name}", spec.image):
                return self._client.containers.create(**config)
        except ImageNotFoundError:
            if self._settings.image_pull_policy == "Never":
                raise ImageNotFoundError(
                    f"image '{spec.image}' is not on the Docker engine and the pull policy is "
                    "Never; build it (`make image` builds agentainer/busybox) or `docker load` it"
                ) from None
        self._pull(spec.image)
        with docker_errors(f"creating agent {spec.name}", spec.image):
            return self._client.containers.create(**config)

    def _pull(self, image: str) -> None:
        logger.info("pulling image %s", image)
        try:
            self._client.images.pull(image)
        except docker.errors.APIError as error:
            raise ImageNotFoundError(
                f"image '{image}' is not on the Docker engine and pulling it failed "
                f"({error.explanation}); build it (`make image` builds agentainer/busybox) "
                "or `docker load` it"
            ) from error

    def _start(self, spec: AgentSpec) -> AgentHandle:
        container = self._create(spec)
        if spec.resident and not self._has_shell(str(container.id)):
            self._remove(str(container.id))
            container = self._create(spec, CHANNEL_EXEC)
        try:
            with docker_errors(f"starting agent {spec.name}", spec.image):
                container.start()
        except Exception:
            self._remove(str(container.id))
            raise
        return AgentHandle(id=str(container.id), name=spec.name,
                           labels=dict(container.labels or spec.labels))

    def _has_shell(self, container_id: str) -> bool:
        try:
            self._client.api.get_archive(container_id, "/bin/sh")
        except docker.errors.NotFound:
            return False
        return True

    def _wait(self, agent: AgentHandle) -> AgentResult:
        with docker_errors(f"waiting for agent {agent.name}"):
            status = self._client.api.wait(agent.id)
            exit_code = int(status.get("StatusCode", -1))
            stdout = self._client.api.logs(agent.id, stdout=True, stderr=False)
            stderr = self._client.api.logs(agent.id, stdout=False, stderr=True)
            state = self._client.api.inspect_container(agent.id)["State"]
        return AgentResult(
            exit_code=exit_code,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            oom_killed=bool(state.get("OOMKilled")),
            started_at=_docker_time(state.get("StartedAt")),
            finished_at=_docker_time(state.get("FinishedAt")),
        )

    def _stop(self, agent_id: str, grace_seconds: float) -> None:
        try:
            with docker_errors("stopping agent"):
                self._client.api.stop(agent_id, timeout=max(0, round(grace_seconds)))
        except AgentSpecError:
            pass  # 404/409: already gone or already stopped

    def _remove(self, agent_id: str) -> None:
        try:
            with docker_errors("removing agent"):
                self._client.api.remove_container(agent_id, v=True, force=True)
        except AgentSpecError:
            pass  # 404: already gone; 409: removal already in progress

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

    def _exec(self, agent_id: str, argv: list[str], env: dict[str, str]) -> TaskResult:
        with docker_errors("running a task in agent"):
            created = self._client.api.exec_create(agent_id, argv, environment=env,
                                                   stdout=True, stderr=True)
            stdout, stderr = self._client.api.exec_start(created["Id"], demux=True)
            exit_code = self._client.api.exec_inspect(created["Id"])["ExitCode"]
        return TaskResult(int(exit_code if exit_code is not None else -1),
                          (stdout or b"").decode("utf-8", errors="replace"),
                          (stderr or b"").decode("utf-8", errors="replace"))

    async def _channel(self, agent: AgentHandle) -> ShellChannel:
        async with self._channel_lock:
            channel = self._channels.get(agent.id)
            if channel is None or channel.closed:
                channel = ShellChannel(await self._call(self._attach, agent.id))
                self._channels[agent.id] = channel
            return channel

    def _forget_channel(self, agent_id: str) -> None:
        channel = self._channels.pop(agent_id, None)
        if channel is not None:
            channel.close()

    # --- the Backend protocol ------------------------------------------------------------------

    async def run_task(self, agent: AgentHandle, argv: list[str], env: dict[str, str],
                       timeout: float | None) -> TaskResult:
        if agent.labels.get(LABEL_CHANNEL) == CHANNEL_EXEC:
            return await asyncio.wait_for(self._call(self._exec, agent.id, argv, env), timeout)
        channel = await self._channel(agent)
        try:
            return await asyncio.wait_for(channel.run(argv, env), timeout)
        except ChannelClosedError as error:
            raise BackendError(f"agent {agent.name} is gone: {error}") from error

    async def start(self, spec: AgentSpec) -> AgentHandle:
        return await self._call(self._start, spec)

    async def wait(self, agent: AgentHandle) -> AgentResult:
        return await self._call(self._wait, agent)

    async def stop(self, agent: AgentHandle, grace_seconds: float) -> None:
        self._forget_channel(agent.id)
        await self._call(self._stop, agent.id, grace_seconds)

    async def remove(self, agent: AgentHandle) -> None:
        self._forget_channel(agent.id)
        await self._call(self._remove, agent.id)

    async def list_agents(self, labels: dict[str, str]) -> list[AgentHandle]:
        return await self._call(self._list, labels)

    async def close(self) -> None:
        for agent_id in list(self._channels):
            self._forget_channel(agent_id)
        self._client.close()


def _docker_time(value: str | None) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds, which fromisoformat does not take."""
    if not value or value.startswith("0001-"):
        return None
    head, _, fraction = value.rstrip("Z").partition(".")
    micros = (fraction + "000000")[:6] if fraction else "000000"
    try:
        return datetime.fromisoformat(f"{head}.{micros}+00:00")
    except ValueError:
        return None
