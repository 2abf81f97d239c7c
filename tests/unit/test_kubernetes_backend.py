"""The Kubernetes backend against a fake API client: what it makes of the client's errors, how
much of a pod's log it reads, and what a pool pod's channel keeps. No API server is needed."""

from __future__ import annotations

import asyncio
import binascii
import collections
import socket
import threading
import tracemalloc
from datetime import UTC, datetime, timedelta
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import kubernetes
import pytest
import urllib3.exceptions
import websocket
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.stream import ws_client
from websocket import ABNF

from controller.backends import podwatch
from controller.backends.base import AgentHandle, AgentSpec
from controller.backends.kubernetes import KubernetesBackend
from controller.backends.runner import ChannelClosedError
from controller.config import Settings
from controller.errors import AgentUnschedulableError, BackendUnavailableError

MiB = 1 << 20
AGENT = AgentHandle(id="team/wf-step-abcde", name="wf-step-abcde")
SPEC = AgentSpec(name="wf-step-abcde", image="agent:1", command=None, args=None, env={},
                 labels={}, namespace="team")

TRANSPORT_ERRORS = [
    pytest.param(urllib3.exceptions.MaxRetryError(None, "/api/v1/pods"), id="MaxRetryError"),
    pytest.param(urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError(104, "reset")), id="ProtocolError"),
    pytest.param(urllib3.exceptions.NewConnectionError(None, "Connection refused"),
                 id="NewConnectionError"),
    pytest.param(urllib3.exceptions.ReadTimeoutError(None, "/api", "read timed out"),
                 id="ReadTimeoutError"),
    pytest.param(ConnectionRefusedError(111, "Connection refused"), id="OSError"),
]
OPERATIONS = {
    "start": ("create_namespaced_pod", lambda b: b.start(SPEC)),
    "wait": ("list_namespaced_pod", lambda b: b.wait(AGENT)),  # the pod watch's list
    "stop": ("delete_namespaced_pod", lambda b: b.stop(AGENT, 2)),
    "list_agents": ("list_namespaced_pod", lambda b: b.list_agents("default", {"a": "b"})),
}


def backend(**settings: Any) -> KubernetesBackend:
    return KubernetesBackend(CoreV1Api(ApiClient()), Settings(**settings))


def raising(error: BaseException) -> Any:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise error
    return call


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("error", TRANSPORT_ERRORS)
def test_an_unreachable_api_server_is_a_backend_unavailable_error_in_every_call(
        monkeypatch: pytest.MonkeyPatch, operation: str, error: Exception) -> None:
    method, call = OPERATIONS[operation]
    monkeypatch.setattr(CoreV1Api, method, raising(error))
    # A wait hears of a watch that keeps failing after a while: here at once.
    monkeypatch.setattr(podwatch, "FAILING_SECONDS", 0.0)

    with pytest.raises(BackendUnavailableError, match="cannot reach the API server") as raised:
        asyncio.run(call(backend()))

    assert raised.value.retryable
    assert raised.value.__cause__ is error


def test_a_websocket_the_api_server_refused_is_told_apart_by_its_handshake_status(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reports a refused attach as status 0; the handshake's own status says what
    it was (403: the controller may not attach; retrying cannot help)."""
    from kubernetes.client import ApiException

    from controller.errors import ForbiddenError

    refused = ApiException(status=0, reason="Handshake status 403 Forbidden")
    monkeypatch.setattr(CoreV1Api, "delete_namespaced_pod", raising(refused))

    with pytest.raises(ForbiddenError, match="Handshake status 403") as raised:
        asyncio.run(backend().stop(AGENT, 0))

    assert not raised.value.retryable


@pytest.mark.parametrize(("message", "retried"), [
    # RBAC, as an API server just restarted says it to everyone until its authorizer caught up
    ('pods is forbidden: User "system:serviceaccount:agentainer-system:agentainer" cannot '
     'list resource "pods" in API group "" in the namespace "default"', True),
    # an admission policy: final
    ('pods "a" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true',
     False),
])
def test_a_refusal_by_rbac_is_retried_and_one_by_an_admission_policy_is_final(
        monkeypatch: pytest.MonkeyPatch, message: str, retried: bool) -> None:
    import json

    from kubernetes.client import ApiException

    from controller.errors import ForbiddenError

    refused = ApiException(status=403, reason="Forbidden")
    refused.body = json.dumps({"kind": "Status", "message": message})
    monkeypatch.setattr(CoreV1Api, "delete_namespaced_pod", raising(refused))

    with pytest.raises(ForbiddenError, match="the API server refused it") as raised:
        asyncio.run(backend().stop(AGENT, 0))

    assert raised.value.retryable is retried
    assert message in str(raised.value)


# --- the attach websocket of pool agents ------------------------------------------------------


class BrokenWebsocket:
    """An attach client whose ``fails`` method raises ``error``, as the websocket client does
    when the connection breaks."""

    def __init__(self, fails: str, error: Exception) -> None:
        self.fails = fails
        self.error = error

    def _maybe_fail(self, name: str) -> None:
        if name == self.fails:
            raise self.error

    def is_open(self) -> bool:
        return True

    def write_stdin(self, data: str) -> None:
        self._maybe_fail("write_stdin")

    def update(self, timeout: float = 0) -> None:
        self._maybe_fail("update")

    def peek_stderr(self) -> str:
        return ""

    def peek_stdout(self) -> str:
        return ""

    def close(self) -> None:
        pass


@pytest.mark.parametrize("fails", ["write_stdin", "update"])
@pytest.mark.parametrize("error", [
    pytest.param(websocket.WebSocketConnectionClosedException("closed"), id="closed"),
    pytest.param(websocket.WebSocketTimeoutException("timed out"), id="timeout"),
    pytest.param(BrokenPipeError(32, "Broken pipe"), id="OSError"),
])
def test_a_broken_attach_websocket_is_a_closed_channel_not_a_foreign_error(
        monkeypatch: pytest.MonkeyPatch, fails: str, error: Exception) -> None:
    monkeypatch.setattr(CoreV1Api, "connect_get_namespaced_pod_attach",
                        lambda self, *args, **kwargs: BrokenWebsocket(fails, error))

    with pytest.raises(ChannelClosedError, match="channel broke") as raised:
        asyncio.run(backend().run_task(AGENT, ["true"], {}, None))

    assert raised.value.__cause__ is error


def test_an_attach_the_api_server_cannot_be_reached_for_is_backend_unavailable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    error = websocket.WebSocketAddressException("name or service not known")
    monkeypatch.setattr(CoreV1Api, "connect_get_namespaced_pod_attach", raising(error))

    with pytest.raises(BackendUnavailableError, match="attaching to pod"):
        asyncio.run(backend().run_task(AGENT, ["true"], {}, None))


# --- a pod's log, read within the limit -------------------------------------------------------


class LogResponse:
    """A raw (unread) log response: the log in pieces, counting those read."""

    def __init__(self, size: int, piece: int = 64 * 1024, fill: bytes = b"x") -> None:
        self.size, self.piece, self.fill = size, piece, fill
        self.pieces_read = 0
        self.closed = self.released = False

    def stream(self, amount: int) -> Iterator[bytes]:
        for start in range(0, self.size, self.piece):
            self.pieces_read += 1
            yield self.fill * min(self.piece, self.size - start)

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        self.released = True


def finished_pod(name: str = AGENT.name) -> Any:
    terminated = SimpleNamespace(exit_code=0, reason="Completed", message=None)
    container = SimpleNamespace(name="agent", state=SimpleNamespace(terminated=terminated,
                                                                    waiting=None))
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, namespace="team", resource_version="7"),
        status=SimpleNamespace(phase="Succeeded", reason=None, message=None,
                               container_statuses=[container], init_container_statuses=None))


def serve_pods(monkeypatch: pytest.MonkeyPatch, *pods: Any) -> None:
    """The pod watch's list finds ``pods``; its watches see nothing more."""
    listing = SimpleNamespace(metadata=SimpleNamespace(resource_version="7"), items=list(pods))
    monkeypatch.setattr(CoreV1Api, "list_namespaced_pod", lambda *a, **k: listing)
    monkeypatch.setattr(kubernetes.watch.Watch, "stream", lambda *a, **k: iter(()))


def serve_log(monkeypatch: pytest.MonkeyPatch, response: LogResponse) -> dict[str, Any]:
    asked: dict[str, Any] = {}

    def read_log(self: Any, name: str, namespace: str, **query: Any) -> LogResponse:
        asked.update(query)
        return response

    serve_pods(monkeypatch, finished_pod())
    monkeypatch.setattr(CoreV1Api, "read_namespaced_pod_log", read_log)
    return asked


def test_a_pods_log_is_read_up_to_the_limit_and_the_output_marked_truncated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    response = LogResponse(size=200 * MiB)
    asked = serve_log(monkeypatch, response)

    result = asyncio.run(backend(output_limit_bytes=MiB).wait(AGENT))

    assert len(result.stdout) == MiB
    assert result.output_truncated is True
    assert asked["limit_bytes"] == MiB + 1  # the API server stops there itself
    assert asked["_preload_content"] is False  # read a piece at a time, never whole
    assert response.pieces_read == MiB // response.piece + 1
    assert response.closed and response.released


def test_a_pods_log_within_the_limit_is_read_whole_and_not_marked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    response = LogResponse(size=MiB)
    serve_log(monkeypatch, response)

    result = asyncio.run(backend(output_limit_bytes=MiB).wait(AGENT))

    assert len(result.stdout) == MiB
    assert result.output_truncated is False
    assert response.released


def test_a_pods_log_that_is_not_utf8_is_read_with_replacement_characters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    serve_log(monkeypatch, LogResponse(size=3, fill=b"\xff"))

    result = asyncio.run(backend().wait(AGENT))

    assert result.stdout == "\ufffd" * 3


def unschedulable_pod(waited: float) -> Any:
    """A pending pod the scheduler found no node for, ``waited`` seconds ago."""
    condition = SimpleNamespace(
        type="PodScheduled", status="False", reason="Unschedulable",
        message="0/1 nodes are available: 1 Insufficient cpu.",
        last_transition_time=datetime.now(UTC) - timedelta(seconds=waited))
    return SimpleNamespace(
        metadata=SimpleNamespace(name=AGENT.name, namespace="team", resource_version="7"),
        status=SimpleNamespace(phase="Pending", reason=None, conditions=[condition],
                               container_statuses=None, init_container_statuses=None))


def serve_deletions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    deleted: list[tuple[str, int]] = []
    monkeypatch.setattr(CoreV1Api, "delete_namespaced_pod",
                        lambda self, name, namespace, **k: deleted.append(
                            (name, k["grace_period_seconds"])))
    return deleted


def test_a_pod_no_node_took_in_time_is_removed_and_its_agent_fails_saying_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    serve_pods(monkeypatch, unschedulable_pod(waited=120))
    deleted = serve_deletions(monkeypatch)
    told: list[str | None] = []

    with pytest.raises(AgentUnschedulableError) as raised:
        asyncio.run(asyncio.wait_for(
            backend(pod_scheduling_seconds=60).wait(AGENT, told.append), 10))

    assert told == ["no node takes its pod yet: 0/1 nodes are available: 1 Insufficient cpu."]
    assert "no node took it in 60s" in str(raised.value)
    assert "Insufficient cpu" in str(raised.value)
    assert deleted == [(AGENT.name, 0)]  # left pending, it would run later


def test_a_pod_waiting_for_a_node_is_given_up_when_its_time_is_out_without_news(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch says nothing more of the pod: the wait ends by the clock, not by an event."""
    serve_pods(monkeypatch, unschedulable_pod(waited=0))
    serve_deletions(monkeypatch)

    async def waited() -> float:
        began = asyncio.get_running_loop().time()
        with pytest.raises(AgentUnschedulableError):
            await asyncio.wait_for(backend(pod_scheduling_seconds=0.1).wait(AGENT), 10)
        return asyncio.get_running_loop().time() - began

    assert 0.1 <= asyncio.run(waited()) < 5


def test_a_pod_waiting_for_a_node_waits_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """As Kubernetes does: a fan-out wider than the cluster queues for room."""
    serve_pods(monkeypatch, unschedulable_pod(waited=3600))
    deleted = serve_deletions(monkeypatch)

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(backend().wait(AGENT), 0.1))
    assert deleted == []


# --- a pool pod's runner, over a real websocket client ----------------------------------------


class RunnerBehindWebsocket:
    """The websocket under the Kubernetes client's own WSClient, with a runner at its far end
    that answers a hello, and each task with ``task_bytes`` of output. Every frame it sends
    rings a real socket, which is what the client polls."""

    subprotocol = "v4.channel.k8s.io"
    connected = True
    OUT_PIECE = 64 * 1024  # bytes of output per OUT frame

    def __init__(self, task_bytes: int) -> None:
        self.sock, self._bell = socket.socketpair()
        self.frames: collections.deque[bytes] = collections.deque()
        self.task_bytes = task_bytes

    def send(self, payload: str | bytes, opcode: int = 0) -> None:
        text = payload[1:] if isinstance(payload, str) else payload[1:].decode()
        words = text.split()
        if words[0] == "HELLO":
            self._say(f"READY {words[1]} agentainer-runner/1 user 65532 65532\n")
        elif words[0] == "TASK":
            piece = binascii.b2a_base64(b"x" * self.OUT_PIECE, newline=False).decode()
            for _ in range(self.task_bytes // self.OUT_PIECE):
                self._say(f"OUT {words[1]} {piece}\n")
            self._say(f"EXIT {words[1]} 0 - 1000 1000 -\n")

    def _say(self, line: str) -> None:
        self.frames.append(bytes([ws_client.STDOUT_CHANNEL]) + line.encode())
        self._bell.send(b"\0")

    def recv_data_frame(self, control_frame: bool) -> tuple[int, Any]:
        self.sock.recv(1)
        return ABNF.OPCODE_BINARY, SimpleNamespace(data=self.frames.popleft())

    def close(self, **kwargs: Any) -> None:
        self.sock.close()
        self._bell.close()


def test_a_pool_pods_channel_keeps_none_of_the_output_of_the_tasks_it_ran(
        monkeypatch: pytest.MonkeyPatch) -> None:
    runner = RunnerBehindWebsocket(task_bytes=MiB)
    monkeypatch.setattr(ws_client, "create_websocket", lambda *args, **kwargs: runner)
    pool_backend = backend(output_limit_bytes=MiB)

    async def output_sizes(tasks: int) -> list[int]:
        return [len((await pool_backend.run_task(AGENT, ["true"], {}, None)).stdout)
                for _ in range(tasks)]

    tracemalloc.start()
    try:
        sizes = asyncio.run(output_sizes(30))
        held, _ = tracemalloc.get_traced_memory()  # the channel is still open
    finally:
        tracemalloc.stop()
        asyncio.run(pool_backend.close())

    print(f"held after 30 tasks of 1 MiB output on one channel: {held / MiB:.1f} MiB")
    assert sizes == [MiB] * 30
    assert held < 8 * MiB  # the tasks' output (40 MiB in base64) is not kept


def test_only_pods_the_resource_owns_are_its_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels anyone who may create a pod can copy; the ownerReference to the pool (or
    workflow) whose uid they name is what makes a pod one of its agents."""
    asked: list[tuple[Any, ...]] = []

    def pod(name: str, *owners: str) -> Any:
        return SimpleNamespace(
            metadata=SimpleNamespace(name=name, namespace="team", labels={"k": "v"},
                                     owner_references=[SimpleNamespace(uid=u) for u in owners]),
            status=SimpleNamespace(phase="Running"))

    def listing(self: Any, namespace: str, **kwargs: Any) -> Any:
        asked.append((namespace, kwargs["label_selector"]))
        return SimpleNamespace(items=[pod("ours", "pool-uid"), pod("copied"),
                                      pod("someone-elses", "other-uid")])

    monkeypatch.setattr(CoreV1Api, "list_namespaced_pod", listing)
    found = asyncio.run(backend().list_agents("team", {"agentainer.dev/pool-uid": "pool-uid"},
                                              "pool-uid"))
    assert [agent.name for agent in found] == ["ours"]
    assert asked == [("team", "agentainer.dev/pool-uid=pool-uid")]


def test_calls_that_finish_agents_go_before_those_waiting_to_begin_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With every thread taken, a pod's deletion (a timed-out agent stopped) asked for after
    a list goes first."""
    calls: list[str] = []
    gate = threading.Event()

    def list_namespaced_pod(self: Any, namespace: str, **kwargs: Any) -> Any:
        calls.append("list")
        gate.wait(5)
        return SimpleNamespace(items=[])

    def delete_namespaced_pod(self: Any, name: str, namespace: str, **kwargs: Any) -> None:
        calls.append(f"delete {name}")

    monkeypatch.setattr(CoreV1Api, "list_namespaced_pod", list_namespaced_pod)
    monkeypatch.setattr(CoreV1Api, "delete_namespaced_pod", delete_namespaced_pod)
    pods = backend(kubernetes_threads=1)

    async def scenario() -> None:
        first = asyncio.ensure_future(pods.list_agents("team", {}))
        await asyncio.sleep(0.05)  # it holds the one thread
        second = asyncio.ensure_future(pods.list_agents("team", {}))
        await asyncio.sleep(0.01)
        stop = asyncio.ensure_future(pods.stop(AGENT, 2))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, second, stop), 5)

    asyncio.run(scenario())

    assert calls == ["list", f"delete {AGENT.name}", "list"]
