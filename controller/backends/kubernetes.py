"""Agents as Kubernetes pods; the only module that creates pods.

Pods come from :func:`build_pod`, a pure function. An agent's output is its container log (on
Kubernetes the log holds stdout and stderr together); its exit code and reason (OOMKilled,
DeadlineExceeded, image pull errors) come from the pod's status. Pool agents are long-running
pods whose first process is the task runner, installed by an init container into a volume of
the pod (as Tekton installs its entrypoint); tasks reach it through the API server's attach,
with the same protocol as on Docker.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import kubernetes
import urllib3.exceptions
import websocket
from kubernetes.client import ApiClient, ApiException, CoreV1Api
from kubernetes.stream import stream

from controller import __version__
from controller.backends import output
from controller.backends.pods import CONTAINER, build_claim, build_pod
from controller.backends.podwatch import PodWatch
from controller.backends.base import (
    LABEL_MANAGED_BY,
    MANAGED_BY,
    AgentHandle,
    AgentResult,
    AgentSpec,
    TaskResult,
    Waiting,
    WorkspaceSpec,
    missing,
)
from controller.backends.runner import ChannelClosedError, RunnerChannel
from controller.config import Settings
from controller.models import EnvSource
from controller.turns import URGENT, Turns
from controller.errors import (
    AgentainerError,
    AgentSpecError,
    AgentUnschedulableError,
    BackendError,
    BackendUnavailableError,
    ConflictError,
    ForbiddenError,
    ImageNotFoundError,
    NotAuthorizedError,
    NotFoundError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
LOG_READ_BYTES = 64 * 1024
"""A pod's log is read this much at a time."""
READ_TIMEOUT_SECONDS = 30.0
"""How long reading a Secret or ConfigMap may take before it is tried again."""
START_TIMEOUT_SECONDS = 300.0
"""How long a pool pod may take to run (pull, schedule, start) before it is given up."""
# The answers a caller must tell apart (400 and 422 refuse the spec).
CLIENT_ERRORS: dict[int, type[AgentainerError]] = {
    400: AgentSpecError, 403: ForbiddenError, 404: NotFoundError, 409: ConflictError,
    422: AgentSpecError}
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    urllib3.exceptions.HTTPError, websocket.WebSocketException, OSError)
"""How the client says the API server could not be reached or the connection broke: urllib3's
errors (MaxRetryError, ProtocolError, NewConnectionError...), the websocket client's (attach,
exec), and the socket's own."""
CLIENT_RAISES: tuple[type[BaseException], ...] = (ApiException, *TRANSPORT_ERRORS)
RBAC_DENIAL = re.compile(r'cannot [a-z]+ resource "')
"""How the API server's authorizer words a refusal (an admission policy's, such as PodSecurity,
says something else, and stays final)."""
IMAGE_ERRORS = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
SPEC_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


def _unscheduled(pod: Any) -> tuple[float, str] | None:
    """How long a pod has waited for a node that would take it, and the scheduler's reason
    (None: it has one, or the scheduler has not yet tried)."""
    for condition in getattr(pod.status, "conditions", None) or []:
        if condition.type == "PodScheduled" and condition.status == "False" and \
                condition.reason == "Unschedulable":
            since = condition.last_transition_time
            waited = (datetime.now(UTC) - since).total_seconds() if since else 0.0
            return max(0.0, waited), condition.message or "Unschedulable"
    return None


USER_AGENT = f"agentainer/{__version__}"
"""The client's name to the API server: the field manager of what it writes (a status, a pod),
as ``kubectl get --show-managed-fields`` shows it, and the name in its audit log."""


def api_client(configuration: kubernetes.client.Configuration | None = None) -> ApiClient:
    """A client of the API server that says it is Agentainer."""
    client = ApiClient(configuration)
    client.user_agent = USER_AGENT
    return client


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
    with api_client() as client:
        return stream(getattr(CoreV1Api(client), method), *args, **kwargs)


class ClusterEnv:
    """``valueFrom`` variables read from the cluster's Secrets and ConfigMaps, in the
    namespace of the resource that names them (a ``get`` of each, once a call)."""

    def __init__(self, core: CoreV1Api) -> None:
        self._core = core

    async def values(self, namespace: str, refs: Mapping[str, EnvSource]) -> dict[str, str]:
        found: dict[tuple[str, str], dict[str, str] | None] = {}
        values = {}
        for name, source in refs.items():
            where = (source.kind, source.ref.name)
            if where not in found:
                found[where] = await self._read(name, source, namespace)
            data = found[where]
            if data is None or source.ref.key not in data:
                if source.ref.optional:
                    continue
                raise missing(name, source, namespace,
                              "does not exist" if data is None else "has no such key")
            values[name] = data[source.ref.key]
        return values

    async def _read(self, name: str, source: EnvSource,
                    namespace: str) -> dict[str, str] | None:
        read = (self._core.read_namespaced_secret if source.secret_key_ref is not None
                else self._core.read_namespaced_config_map)
        try:
            found: Any = await asyncio.to_thread(read, source.ref.name, namespace,
                                                 _request_timeout=READ_TIMEOUT_SECONDS)
        except ApiException as error:
            if error.status == 404:
                return None
            if error.status == 403:
                raise ForbiddenError(
                    f"env {name}: the controller may not read {source.kind} "
                    f"{namespace}/{source.ref.name}: grant it get on "
                    f"{source.kind.lower()}s in {namespace} (the chart's watchNamespaces "
                    "does)") from error
            raise BackendError(f"env {name}: reading {source.kind} {namespace}/"
                               f"{source.ref.name}: API server error {error.status}") from error
        except TRANSPORT_ERRORS as error:
            raise BackendUnavailableError(f"env {name}: reading {source.kind}: cannot reach "
                                          f"the API server: {error}") from error
        if source.secret_key_ref is None:
            return dict(found.data or {})
        try:
            return {key: base64.b64decode(value).decode()
                    for key, value in (found.data or {}).items()}
        except (ValueError, UnicodeDecodeError):
            raise AgentSpecError(f"env {name}: Secret {namespace}/{source.ref.name} holds "
                                 "a value that is not text") from None


def owned(pod: Any, owner: str) -> bool:
    """Whether the pod names this uid among its ownerReferences."""
    return any(ref.uid == owner for ref in pod.metadata.owner_references or [])


def _split(agent_id: str) -> tuple[str, str]:
    namespace, _, name = agent_id.partition("/")
    return namespace, name


class _NothingKept:
    """Where a websocket client would keep a copy of all it receives: nothing is kept."""

    def write(self, data: object) -> None:
        pass

    def getvalue(self) -> str:
        return ""


NOTHING_KEPT = _NothingKept()


class PodAttachChannel(RunnerChannel):
    """A pod's runner over the API server's attach websocket. The websocket client blocks, so
    each read runs in a thread, for a short slice at a time: a long task holds no thread."""

    RECEIVE_SLICE_SECONDS = 0.25

    def __init__(self, client: Any, agent_name: str,
                 threads: concurrent.futures.Executor | None = None) -> None:
        super().__init__(agent_name)
        self._client = client
        self._threads = threads

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, function, *args)

    async def _send(self, data: bytes) -> None:
        try:
            await self._in_thread(self._client.write_stdin, data.decode())
        except TRANSPORT_ERRORS as error:
            raise self._broken(error) from error

    def _send_now(self, data: bytes) -> None:
        try:
            self._client.write_stdin(data.decode())
        except Exception:  # a broken websocket: the channel is being given up anyway
            pass

    async def _receive(self, timeout: float) -> bytes:
        return await self._in_thread(self._read, min(timeout, self.RECEIVE_SLICE_SECONDS))

    def _read(self, timeout: float) -> bytes:
        client = self._client
        if not client.is_open():
            raise ChannelClosedError(f"agent {self.agent_name} is gone: its runner's channel "
                                     "closed")
        try:
            client.update(timeout=timeout)
            if client.peek_stderr():
                logger.warning("agent %s's runner: %s", self.agent_name,
                               client.read_stderr().strip())
            return str(client.read_stdout() if client.peek_stdout() else "").encode()
        except TRANSPORT_ERRORS as error:
            raise self._broken(error) from error

    def _broken(self, error: Exception) -> ChannelClosedError:
        return ChannelClosedError(f"agent {self.agent_name} is gone: its runner's channel "
                                  f"broke ({type(error).__name__}: {error})")

    def _close_transport(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a broken websocket may fail too; it is gone either way
            pass


FINISHING = frozenset({"_read_log", "delete_namespaced_pod"})
"""The calls that finish agents, which take their turn first."""


class KubernetesBackend:
    """Runs each agent as a pod through the API server."""

    enforces_deadlines = True

    def __init__(self, core: CoreV1Api, settings: Settings) -> None:
        self._core = core
        self._settings = settings
        self._channels: dict[str, PodAttachChannel] = {}
        self._channel_locks: dict[str, asyncio.Lock] = {}
        self._threads = concurrent.futures.ThreadPoolExecutor(
            settings.kubernetes_threads, thread_name_prefix="kubernetes")
        """The backend's own threads for the client's blocking calls, none of which lasts
        long (waits are the watch's): the status writes and the rest of the process, on the
        default threads, never wait behind agents."""
        self._turns = Turns(settings.kubernetes_threads,
                            reserved=settings.kubernetes_threads // 8)
        """Turns at those threads: calls that finish agents (reading an ended pod's log,
        deleting a pod) go before those that begin work (creating, listing), so that under a
        burst of starts a timed-out agent is stopped, and an ended one read, at once; an eighth
        of the threads are theirs alone."""
        self.pods = PodWatch(core, f"{LABEL_MANAGED_BY}={MANAGED_BY}", api_error)
        """Every agent's pod, as one watch per namespace sees it: waits read it, no polling."""

    @classmethod
    async def connect(cls, settings: Settings) -> KubernetesBackend:
        def make() -> CoreV1Api:
            load_credentials()
            return CoreV1Api(api_client())

        return cls(await asyncio.to_thread(make), settings)

    async def _call(self, action: str, function: Callable[..., T], *args: Any,
                    **kwargs: Any) -> T:
        urgency = URGENT if getattr(function, "__name__", "") in FINISHING else URGENT + 1
        try:
            async with self._turns.turn(urgency):
                return await asyncio.get_running_loop().run_in_executor(
                    self._threads, functools.partial(function, *args, **kwargs))
        except CLIENT_RAISES as error:
            raise api_error(action, error) or BackendError(f"{action}: {error!r}") from error

    async def start(self, spec: AgentSpec) -> AgentHandle:
        pod = build_pod(spec, self._settings.runner_image)
        await self._call(f"creating pod {spec.name}", self._core.create_namespaced_pod,
                         spec.namespace, pod)
        handle = AgentHandle(id=f"{spec.namespace}/{spec.name}", name=spec.name,
                             labels=pod["metadata"]["labels"])
        if spec.resident:
            try:  # a runner that cannot answer is found now, not at the first task
                await self._wait_running(handle)
                await self._channel(handle)
            except BaseException as error:
                log = await self._log_tail(handle)
                await asyncio.shield(self.remove(handle))
                if isinstance(error, (BackendError, TimeoutError)):
                    raise BackendError(f"agent {spec.name}: its task runner did not answer "
                                       f"({error}){': ' + log if log else ''}") from error
                raise
        return handle

    async def _wait_running(self, agent: AgentHandle) -> None:
        """Wait for a pool pod to run; its image (or the runner's) missing fails at once."""
        namespace, name = _split(agent.id)

        def running(pod: Any) -> bool:
            phase = pod.status.phase if pod.status else None
            if phase in ("Succeeded", "Failed"):
                raise BackendError(f"pod {name} ended before its first task "
                                   f"({pod.status.reason or phase})")
            self._check_waiting(pod, agent)
            return phase == "Running"

        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                await self.pods.until(namespace, name, running)
        except TimeoutError:
            pending = self.pods.cached(namespace, name)
            unscheduled = _unscheduled(pending) if pending is not None else None
            raise BackendError(f"pod {name} was not running after {START_TIMEOUT_SECONDS:.0f}s"
                               + (f": no node took it ({unscheduled[1]})" if unscheduled
                                  else "")) from None

    async def _log_tail(self, agent: AgentHandle) -> str:
        namespace, name = _split(agent.id)
        log = output.Head(self._settings.output_limit_bytes)
        try:
            await self._call(f"reading the log of {name}", self._read_log, name, namespace,
                             log, tail_lines=5)
        except AgentainerError:
            return ""  # only for a message: an error already being reported
        return log.text().strip()

    @staticmethod
    def _check_waiting(pod: Any, agent: AgentHandle) -> None:
        statuses = [*(pod.status.init_container_statuses or []),
                    *(pod.status.container_statuses or [])]
        for status in statuses:
            waiting = status.state.waiting if status.state else None
            if waiting is None:
                continue
            if waiting.reason in IMAGE_ERRORS:
                raise ImageNotFoundError(f"pod {agent.name}: {waiting.reason}: "
                                         f"{waiting.message or status.image}")
            if waiting.reason in SPEC_ERRORS:
                raise AgentSpecError(f"pod {agent.name}: {waiting.reason}: {waiting.message}")

    async def wait(self, agent: AgentHandle, waiting: Waiting | None = None) -> AgentResult:
        """The agent's outcome, once its pod ended; ``waiting`` is told the scheduler's reason
        while no node takes the pod. With ``pod_scheduling_seconds`` set, a pod no node takes
        within that long is removed (left pending, it could run after its step was given up),
        and its agent fails with that reason."""
        namespace, name = _split(agent.id)
        limit = self._settings.pod_scheduling_seconds
        left: list[float] = []
        """While no node takes the pod: the seconds it may still wait for one."""
        told: list[str | None] = [None]

        def ended(pod: Any) -> bool:
            if pod.status and pod.status.phase in ("Succeeded", "Failed"):
                return True
            self._check_waiting(pod, agent)
            left.clear()
            unscheduled = _unscheduled(pod)
            why = f"no node takes its pod yet: {unscheduled[1]}" if unscheduled else None
            if why != told[0] and waiting is not None:
                told[0] = why
                waiting(why)
            if limit and unscheduled is not None:
                waited, reason = unscheduled
                if waited >= limit:
                    raise AgentUnschedulableError(
                        f"pod {name}: no node took it in {limit:g}s "
                        f"(AGENTAINER_POD_SCHEDULING_SECONDS): {reason}")
                left.append(limit - waited)
            return False

        try:
            pod = await self.pods.until(namespace, name, ended,
                                        recheck=lambda: left[0] if left else None)
        except AgentUnschedulableError:
            await asyncio.shield(self._delete(agent, 0))
            raise
        return await self._result(pod, namespace, name)

    async def _result(self, pod: Any, namespace: str, name: str) -> AgentResult:
        terminated = None
        for status in pod.status.container_statuses or []:
            if status.name == CONTAINER and status.state and status.state.terminated:
                terminated = status.state.terminated
        deadline = pod.status.reason == "DeadlineExceeded"
        log = output.Head(self._settings.output_limit_bytes)
        try:
            await self._call(f"reading the log of {name}", self._read_log, name, namespace,
                             log)
        except (AgentSpecError, NotFoundError):
            pass  # the container never ran, or the pod is gone: no output
        reason = terminated.reason if terminated else pod.status.reason
        message = "" if reason in (None, "Completed", "Error") else (
            f"{reason}: {pod.status.message or (terminated.message if terminated else '')}")
        return AgentResult(
            exit_code=terminated.exit_code if terminated else 137 if deadline else -1,
            stdout=log.text(), stderr="",
            oom_killed=bool(terminated and terminated.reason == "OOMKilled"),
            deadline_exceeded=deadline,
            message=message.strip().rstrip(":"),
            output_truncated=log.truncated,
        )

    def _read_log(self, name: str, namespace: str, keep: output.Head,
                  **query: Any) -> None:
        """Read the head of a pod's log into ``keep``, a piece at a time and never whole. The
        API server stops at about ``limitBytes`` (one more than the limit, to tell a log of
        exactly the limit from a longer one); what it sends past that is not read."""
        response: Any = self._core.read_namespaced_pod_log(
            name, namespace, container=CONTAINER, limit_bytes=keep.limit + 1,
            _preload_content=False, **query)
        try:
            for piece in response.stream(LOG_READ_BYTES):
                if not keep.feed(piece):
                    response.close()  # unread bytes may remain: the connection is not reused
                    break
        finally:
            response.release_conn()

    async def stop(self, agent: AgentHandle, grace_seconds: float) -> None:
        await self._delete(agent, int(grace_seconds))

    async def remove(self, agent: AgentHandle) -> None:
        await self._delete(agent, 0)

    async def _delete(self, agent: AgentHandle, grace: int) -> None:
        self._channel_locks.pop(agent.id, None)
        channel = self._channels.pop(agent.id, None)
        if channel is not None:
            channel.close()
        namespace, name = _split(agent.id)
        try:
            await self._call(f"deleting pod {name}", self._core.delete_namespaced_pod, name,
                             namespace, grace_period_seconds=grace)
        except NotFoundError:
            pass  # already gone

    async def list_agents(self, namespace: str, labels: dict[str, str],
                          owner: str | None = None) -> list[AgentHandle]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        pods: Any = await self._call("listing pods", self._core.list_namespaced_pod,
                                     namespace, label_selector=selector)
        handles = []
        for pod in pods.items:
            if owner and not owned(pod, owner):
                logger.warning("pod %s/%s carries the labels of %s but is not owned by it: "
                               "left alone", pod.metadata.namespace, pod.metadata.name, owner)
                continue
            phase = pod.status.phase if pod.status else None
            handles.append(AgentHandle(
                id=f"{pod.metadata.namespace}/{pod.metadata.name}", name=pod.metadata.name,
                labels=dict(pod.metadata.labels or {}),
                state="exited" if phase in ("Succeeded", "Failed") else "running"))
        return handles

    async def _channel(self, agent: AgentHandle) -> PodAttachChannel:
        """The pod's runner, attached and greeted (once per agent and process)."""
        async with self._channel_locks.setdefault(agent.id, asyncio.Lock()):
            channel = self._channels.get(agent.id)
            if channel is None or channel.closed:
                namespace, name = _split(agent.id)
                client: Any = await self._call(
                    f"attaching to pod {name}", _stream, "connect_get_namespaced_pod_attach",
                    name, namespace, container=CONTAINER, stdin=True, stdout=True,
                    stderr=True, tty=False, _preload_content=False)
                # The websocket client keeps a copy of all it receives, for read_all(), which
                # is never used here; stream() cannot tell it not to (capture_all: see
                # kubernetes-client/python#2302), and one channel lives for many tasks: their
                # output would pile up without bound.
                client._all = NOTHING_KEPT
                channel = PodAttachChannel(client, agent.name, self._threads)
                await channel.hello()
                self._channels[agent.id] = channel
            return channel

    async def env_values(self, namespace: str,
                         refs: Mapping[str, EnvSource]) -> dict[str, str]:
        return await ClusterEnv(self._core).values(namespace, refs) if refs else {}

    async def prepare_workspace(self, workspace: WorkspaceSpec) -> None:
        if workspace.existing:
            await self._call(f"reading the workspace claim {workspace.name}",
                             self._core.read_namespaced_persistent_volume_claim,
                             workspace.name, workspace.namespace)
            return
        try:
            await self._call(f"creating the workspace claim {workspace.name}",
                             self._core.create_namespaced_persistent_volume_claim,
                             workspace.namespace, build_claim(workspace))
        except ConflictError:
            pass  # made by an earlier run of the workflow: the same claim

    async def remove_workspace(self, workspace: WorkspaceSpec) -> None:
        if workspace.existing:
            return  # the user's
        try:
            await self._call(f"removing the workspace claim {workspace.name}",
                             self._core.delete_namespaced_persistent_volume_claim,
                             workspace.name, workspace.namespace)
        except NotFoundError:
            pass

    async def run_task(self, agent: AgentHandle, argv: list[str], env: dict[str, str],
                       timeout: float | None) -> TaskResult:
        channel = await self._channel(agent)
        return await channel.run(argv, env, timeout, self._settings.output_limit_bytes)

    async def close(self) -> None:
        self.pods.close()
        self._threads.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def api_error(action: str, error: BaseException) -> AgentainerError | None:
    """The project's error for what the API client raised while doing ``action``: a refusal
    the caller must tell apart, a server error, or an API server out of reach (None: not the
    client's)."""
    if isinstance(error, ApiException):
        status = error.status or _handshake_status(error)
        message = _message(error)
        refused = NotAuthorizedError if status == 403 and RBAC_DENIAL.search(message) \
            else CLIENT_ERRORS.get(status)
        if refused is not None:
            return refused(f"{action}: the API server refused it: {error.reason} {message}")
        return BackendError(f"{action}: API server error {status}: {error.reason}")
    if isinstance(error, TRANSPORT_ERRORS):
        return BackendUnavailableError(f"{action}: cannot reach the API server: {error}")
    return None


def _handshake_status(error: ApiException) -> int:
    """The HTTP status of a websocket (attach, exec) the API server refused: the client reports
    it as status 0, with "Handshake status 403 Forbidden" in its reason."""
    found = re.search(r"Handshake status (\d{3})", str(error.reason or ""))
    return int(found.group(1)) if found else 0


def _message(error: ApiException) -> str:
    import json

    try:
        return str(json.loads(error.body or "{}").get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return ""
