"""Agents as Kubernetes pods; the only module that creates pods.

Pods come from :func:`build_pod`, a pure function. An agent's output is its container log (on
Kubernetes the log holds stdout and stderr together); its exit code and reason (OOMKilled,
DeadlineExceeded, image pull errors) come from the pod's status. Pool agents are long-running
pods idling in ``sh`` on their stdin; tasks reach them through the API server's attach, with
the same protocol as on Docker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import kubernetes
from kubernetes.client import ApiClient, ApiException, CoreV1Api
from kubernetes.stream import stream

from controller.backends.base import (
    CHANNEL_EXEC,
    CHANNEL_SHELL,
    LABEL_CHANNEL,
    AgentHandle,
    AgentResult,
    AgentSpec,
    TaskResult,
)
from controller.backends.channel import STDERR, STDOUT, TaskOutput, new_token, task_script
from controller.config import Settings
from controller.errors import (
    AgentSpecError,
    BackendError,
    BackendUnavailableError,
    ImageNotFoundError,
)
from controller.models import PodOptions

logger = logging.getLogger(__name__)

T = TypeVar("T")
CONTAINER = "agent"
POLL_SECONDS = 0.25
IMAGE_ERRORS = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
SPEC_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


def _millicores(nano_cpus: int) -> str:
    return f"{-(-nano_cpus // 1_000_000)}m"


def build_pod(spec: AgentSpec, channel: str = CHANNEL_SHELL) -> dict[str, Any]:
    """The pod of one agent: restrictive by default, limits as requests and limits, the
    workflow as owner (so that the garbage collector removes it with the workflow)."""
    options = spec.pod or PodOptions()
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if options.run_as_non_root:
        security["runAsNonRoot"] = True
    if options.run_as_user is not None:
        security["runAsUser"] = options.run_as_user
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        # Agent images are often built locally and tagged latest: never pull what is there.
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": name, "value": value} for name, value in spec.env.items()],
        "securityContext": security,
    }
    if spec.resident:
        if channel == CHANNEL_SHELL:
            container.update(command=["sh"], stdin=True, stdinOnce=False, tty=False)
    else:
        if spec.command is not None:
            container["command"] = list(spec.command)
        if spec.args is not None:
            container["args"] = list(spec.args)
    limits: dict[str, str] = {}
    if spec.nano_cpus is not None:
        limits["cpu"] = _millicores(spec.nano_cpus)
    if spec.memory_bytes is not None:
        limits["memory"] = str(spec.memory_bytes)
    if limits:
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    labels = dict(spec.labels)
    if spec.resident:
        labels[LABEL_CHANNEL] = channel
    metadata: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace, "labels": labels}
    if spec.owner is not None:
        metadata["ownerReferences"] = [dict(spec.owner)]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "enableServiceLinks": False,
        "automountServiceAccountToken": options.service_account_name is not None,
        "terminationGracePeriodSeconds": 5,
    }
    if spec.timeout_seconds and not spec.resident:
        pod_spec["activeDeadlineSeconds"] = spec.timeout_seconds
    if options.service_account_name:
        pod_spec["serviceAccountName"] = options.service_account_name
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True)
                                   for t in options.tolerations]
    if options.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def load_credentials() -> None:
    """Credentials for the API server: in-cluster ones, else the kubeconfig (KUBECONFIG)."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
        except (kubernetes.config.ConfigException, OSError) as error:
            raise BackendUnavailableError(
                f"no Kubernetes credentials: {error}; set KUBECONFIG") from error


def _stream(method: str, *args: Any, **kwargs: Any) -> Any:
    """A websocket call (attach, exec) on an API client of its own: kubernetes.stream swaps its
    client's transport for the duration of the call, so that any call made meanwhile on a
    shared client, from another thread, would go over a websocket too and fail."""
    with ApiClient() as api_client:
        return stream(getattr(CoreV1Api(api_client), method), *args, **kwargs)


def _split(agent_id: str) -> tuple[str, str]:
    namespace, _, name = agent_id.partition("/")
    return namespace, name


class PodShellChannel:
    """A pod's attached shell over the API server's websocket; one task at a time."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = asyncio.Lock()
        self.closed = False

    async def run(self, argv: list[str], env: dict[str, str]) -> TaskResult:
        async with self._lock:
            if self.closed or not self._client.is_open():
                raise BackendError("the agent's shell is gone")
            cancelled = threading.Event()
            try:
                return await asyncio.to_thread(self._run, argv, env, cancelled)
            except BaseException:
                cancelled.set()
                self.close()
                raise

    def _run(self, argv: list[str], env: dict[str, str], cancelled: threading.Event) -> TaskResult:
        token = new_token()
        output = TaskOutput(token)
        self._client.write_stdin(task_script(argv, env, token).decode())
        while not output.done:
            if cancelled.is_set() or not self._client.is_open():
                raise BackendError("the agent's shell is gone")
            self._client.update(timeout=0.2)
            if self._client.peek_stdout():
                output.feed(STDOUT, self._client.read_stdout().encode())
            if self._client.peek_stderr():
                output.feed(STDERR, self._client.read_stderr().encode())
        return output.result()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._client.close()
            except Exception:  # closing a broken websocket may fail too; it is gone either way
                pass


class KubernetesBackend:
    """Runs each agent as a pod through the API server."""

    enforces_deadlines = True

    def __init__(self, core: CoreV1Api, settings: Settings) -> None:
        self._core = core
        self._settings = settings
        self._channels: dict[str, PodShellChannel] = {}

    @classmethod
    async def connect(cls, settings: Settings) -> KubernetesBackend:
        def make() -> CoreV1Api:
            load_credentials()
            return CoreV1Api()

        return cls(await asyncio.to_thread(make), settings)

    async def _call(self, action: str, function: Callable[..., T], *args: Any,
                    **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(functools.partial(function, *args, **kwargs))
        except ApiException as error:
            if error.status in (400, 403, 404, 409, 422):
                raise AgentSpecError(f"{action}: the API server refused it: {error.reason} "
                                     f"{_message(error)}") from error
            raise BackendError(f"{action}: API server error {error.status}: {error.reason}"
                               ) from error
        except OSError as error:  # connection refused, reset, DNS
            raise BackendUnavailableError(f"{action}: cannot reach the API server: {error}"
                                          ) from error

    async def start(self, spec: AgentSpec) -> AgentHandle:
        handle = await self._create(spec, CHANNEL_SHELL)
        if spec.resident:
            state = await self._wait_started(handle)
            if state == "failed":  # no /bin/sh in the image: run its own command, exec tasks
                await self.remove(handle)
                handle = await self._create(spec, CHANNEL_EXEC)
                await self._wait_started(handle)
        return handle

    async def _create(self, spec: AgentSpec, channel: str) -> AgentHandle:
        pod = build_pod(spec, channel)
        await self._call(f"creating pod {spec.name}", self._core.create_namespaced_pod,
                         spec.namespace, pod)
        return AgentHandle(id=f"{spec.namespace}/{spec.name}", name=spec.name,
                           labels=pod["metadata"]["labels"])

    async def _wait_started(self, agent: AgentHandle) -> str:
        """Wait for a resident pod to run (or fail at once); returns running or failed."""
        namespace, name = _split(agent.id)
        while True:
            pod: Any = await self._call(f"reading pod {name}",
                                        self._core.read_namespaced_pod, name, namespace)
            phase = pod.status.phase
            if phase == "Running":
                return "running"
            if phase in ("Succeeded", "Failed"):
                return "failed"
            self._check_waiting(pod, agent)
            await asyncio.sleep(POLL_SECONDS)

    @staticmethod
    def _check_waiting(pod: Any, agent: AgentHandle) -> None:
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting if status.state else None
            if waiting is None:
                continue
            if waiting.reason in IMAGE_ERRORS:
                raise ImageNotFoundError(f"pod {agent.name}: {waiting.reason}: "
                                         f"{waiting.message or status.image}")
            if waiting.reason in SPEC_ERRORS:
                raise AgentSpecError(f"pod {agent.name}: {waiting.reason}: {waiting.message}")

    async def wait(self, agent: AgentHandle) -> AgentResult:
        namespace, name = _split(agent.id)
        while True:
            pod: Any = await self._call(f"reading pod {name}",
                                        self._core.read_namespaced_pod, name, namespace)
            if pod.status.phase in ("Succeeded", "Failed"):
                return await self._result(pod, namespace, name)
            self._check_waiting(pod, agent)
            await asyncio.sleep(POLL_SECONDS)

    async def _result(self, pod: Any, namespace: str, name: str) -> AgentResult:
        terminated = None
        for status in pod.status.container_statuses or []:
            if status.name == CONTAINER and status.state and status.state.terminated:
                terminated = status.state.terminated
        deadline = pod.status.reason == "DeadlineExceeded"
        try:
            log: Any = await self._call(f"reading the log of {name}",
                                   self._core.read_namespaced_pod_log, name, namespace,
                                   container=CONTAINER)
        except AgentSpecError:
            log = ""  # the container never ran
        reason = terminated.reason if terminated else pod.status.reason
        message = "" if reason in (None, "Completed", "Error") else (
            f"{reason}: {pod.status.message or (terminated.message if terminated else '')}")
        return AgentResult(
            exit_code=terminated.exit_code if terminated else 137 if deadline else -1,
            stdout=log or "", stderr="",
            oom_killed=bool(terminated and terminated.reason == "OOMKilled"),
            deadline_exceeded=deadline,
            message=message.strip().rstrip(":"),
        )

    async def stop(self, agent: AgentHandle, grace_seconds: float) -> None:
        await self._delete(agent, int(grace_seconds))

    async def remove(self, agent: AgentHandle) -> None:
        await self._delete(agent, 0)

    async def _delete(self, agent: AgentHandle, grace: int) -> None:
        channel = self._channels.pop(agent.id, None)
        if channel is not None:
            channel.close()
        namespace, name = _split(agent.id)
        try:
            await self._call(f"deleting pod {name}", self._core.delete_namespaced_pod, name,
                             namespace, grace_period_seconds=grace)
        except AgentSpecError:
            pass  # already gone

    async def list_agents(self, labels: dict[str, str]) -> list[AgentHandle]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        pods: Any = await self._call("listing pods", self._core.list_pod_for_all_namespaces,
                                     label_selector=selector)
        handles = []
        for pod in pods.items:
            phase = pod.status.phase if pod.status else None
            handles.append(AgentHandle(
                id=f"{pod.metadata.namespace}/{pod.metadata.name}", name=pod.metadata.name,
                labels=dict(pod.metadata.labels or {}),
                state="exited" if phase in ("Succeeded", "Failed") else "running"))
        return handles

    async def run_task(self, agent: AgentHandle, argv: list[str], env: dict[str, str],
                       timeout: float | None) -> TaskResult:
        namespace, name = _split(agent.id)
        if agent.labels.get(LABEL_CHANNEL) == CHANNEL_EXEC:
            return await asyncio.wait_for(self._exec(namespace, name, argv, env), timeout)
        channel = self._channels.get(agent.id)
        if channel is None or channel.closed:
            client: Any = await self._call(
                f"attaching to pod {name}", _stream, "connect_get_namespaced_pod_attach",
                name, namespace, container=CONTAINER, stdin=True, stdout=True, stderr=True,
                tty=False, _preload_content=False)
            channel = self._channels[agent.id] = PodShellChannel(client)
        return await asyncio.wait_for(channel.run(argv, env), timeout)

    async def _exec(self, namespace: str, name: str, argv: list[str],
                    env: dict[str, str]) -> TaskResult:
        command = ["env", *(f"{k}={v}" for k, v in env.items()), *argv] if env else argv

        def run() -> TaskResult:
            client = _stream("connect_get_namespaced_pod_exec", name, namespace,
                             container=CONTAINER, command=command, stdin=False, stdout=True,
                             stderr=True, tty=False, _preload_content=False)
            stdout, stderr = [], []
            while client.is_open():
                client.update(timeout=1)
                if client.peek_stdout():
                    stdout.append(client.read_stdout())
                if client.peek_stderr():
                    stderr.append(client.read_stderr())
            code = client.returncode
            return TaskResult(int(code if code is not None else -1), "".join(stdout),
                              "".join(stderr))

        return await self._call(f"running a task in pod {name}", run)

    async def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def _message(error: ApiException) -> str:
    import json

    try:
        return str(json.loads(error.body or "{}").get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return ""
