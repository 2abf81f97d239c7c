"""What the handlers share: the status patch turns every error of the Kubernetes client into
ours (KubernetesError, retried), so that no handler sees a foreign one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import urllib3.exceptions
from kubernetes.client import ApiException

from controller.config import Settings
from controller.handlers.context import KubernetesError, Services, Urgency
from controller.turns import URGENT, Turns
from controller.metrics import Metrics


class FailingCustomObjects:
    """The custom objects API, failing every status patch with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def merge_patch_status(self, *args: Any) -> None:
        raise self.error


def services(error: Exception) -> Services:
    """Services whose status patch fails with ``error``; nothing else of them is used."""
    return Services(settings=Settings(), store=None, metrics=Metrics(),  # type: ignore[arg-type]
                    custom_objects=FailingCustomObjects(error),
                    pools=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [
    pytest.param(urllib3.exceptions.MaxRetryError(None, "/apis"), id="MaxRetryError"),
    pytest.param(urllib3.exceptions.ProtocolError("Connection aborted."), id="ProtocolError"),
    pytest.param(urllib3.exceptions.NewConnectionError(None, "Connection refused"),
                 id="NewConnectionError"),
    pytest.param(ConnectionRefusedError(111, "Connection refused"), id="OSError"),
    pytest.param(ApiException(status=500, reason="Internal Server Error"), id="ApiException"),
])
def test_a_status_patch_that_fails_raises_our_retryable_error(error: Exception) -> None:
    with pytest.raises(KubernetesError, match="patching workflows/wf status") as raised:
        asyncio.run(services(error).patch_status("workflows", "team", "wf", {"phase": "Running"}))

    assert raised.value.retryable
    assert raised.value.__cause__ is error


def test_a_status_patch_of_a_deleted_resource_is_no_error() -> None:
    asyncio.run(services(ApiException(status=404, reason="Not Found")).patch_status(
        "workflows", "team", "wf", {"phase": "Running"}))


def test_status_writes_are_spaced_out_when_many_workflows_run() -> None:
    """Each running workflow is written at most every interval; with more running than the
    API server's share allows, each less often, so that all together stay within it."""
    shared = Services(settings=Settings(status_interval_seconds=1, status_writes_per_second=50),
                      store=None, metrics=Metrics(),  # type: ignore[arg-type]
                      custom_objects=None, pools=None)  # type: ignore[arg-type]
    shared.running = 10
    assert shared.status_interval() == 1
    shared.running = 1000
    assert shared.status_interval() == 20


def test_a_status_writer_counts_among_the_running_until_it_stops_or_lets_go() -> None:
    from controller.handlers.reporting import StatusWriter

    shared = services(ApiException(status=404, reason="Not Found"))

    async def scenario() -> list[int]:
        counts = []
        stopped, abandoned = (StatusWriter(shared, "team", name, name) for name in "ab")
        stopped.start()
        abandoned.start()
        counts.append(shared.running)
        await stopped.stop()
        await stopped.stop()  # a second stop counts nothing twice
        counts.append(shared.running)
        abandoned.abandon()
        counts.append(shared.running)
        return counts

    assert asyncio.run(scenario()) == [2, 1, 0]


def test_the_reserved_turns_let_the_urgent_in_at_once_while_the_others_hold_the_rest() -> None:
    """Four turns, one reserved: three slow holders take the rest, a fourth waits though a
    turn is free, and an urgent one comes in at once; once a holder leaves, the fourth comes
    in."""
    entered: list[str] = []

    async def run() -> None:
        turns = Turns(4, reserved=1)
        release = asyncio.Event()

        async def hold(name: str, urgency: int, until: asyncio.Event) -> None:
            async with turns.turn(urgency):
                entered.append(name)
                await until.wait()

        holders = [asyncio.create_task(hold(f"slow{i}", URGENT + 1, release))
                   for i in range(3)]
        fourth = asyncio.create_task(hold("fourth", URGENT + 1, asyncio.Event()))
        await asyncio.sleep(0.01)
        assert entered == ["slow0", "slow1", "slow2"]
        async with asyncio.timeout(1):
            async with turns.turn(URGENT):
                entered.append("urgent")
        release.set()
        await asyncio.gather(*holders)
        await asyncio.sleep(0.01)
        assert entered[-1] == "fourth"
        fourth.cancel()

    asyncio.run(run())
    assert entered == ["slow0", "slow1", "slow2", "urgent", "fourth"]


def test_writes_waiting_for_a_writer_go_by_urgency_then_in_the_order_they_came() -> None:
    """Two writers, both busy; six writes wait: the last words go first, then the first
    statuses, then progress, each kind in the order it came; one cancelled while it waits
    is passed over, and its turn is not lost."""
    order: list[str] = []

    async def run() -> None:
        turns = Turns(2)
        release = asyncio.Event()

        async def write(name: str, urgency: Urgency, hold: bool = False) -> None:
            async with turns.turn(urgency):
                order.append(name)
                if hold:
                    await release.wait()

        busy = [asyncio.create_task(write(f"busy{i}", Urgency.PROGRESS, hold=True))
                for i in range(2)]
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(write(name, urgency)) for name, urgency in [
            ("progress1", Urgency.PROGRESS), ("first1", Urgency.FIRST),
            ("last1", Urgency.LAST_WORD), ("progress2", Urgency.PROGRESS),
            ("cancelled", Urgency.LAST_WORD), ("last2", Urgency.LAST_WORD)]]
        await asyncio.sleep(0)
        waiting[4].cancel()
        release.set()
        await asyncio.gather(*busy, *waiting, return_exceptions=True)
        async with asyncio.timeout(1):  # both writers are free again
            async with turns.turn(Urgency.PROGRESS), turns.turn(Urgency.PROGRESS):
                pass

    asyncio.run(run())

    assert order == ["busy0", "busy1", "last1", "last2", "first1", "progress1", "progress2"]


class RecordingCustomObjects:
    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []

    def merge_patch_status(self, *args: Any) -> None:
        self.statuses.append(args[-1])


def test_a_status_write_still_waiting_for_its_turn_is_called_off_by_the_final_one() -> None:
    """Every writer busy: a run's first status waits its turn as the run ends; stopping the
    writer calls it off (it would only say what the final status says, later) and the final
    status is the one write made."""
    from controller.engine import Event, EventKind
    from controller.handlers.reporting import StatusWriter
    from controller.models import WorkflowPhase, WorkflowStatus

    custom_objects = RecordingCustomObjects()
    services = Services(settings=Settings(), store=None, metrics=Metrics(),  # type: ignore[arg-type]
                        custom_objects=custom_objects, pools=None)  # type: ignore[arg-type]
    services._turns = Turns(1)

    async def run() -> None:
        occupied, release = asyncio.Event(), asyncio.Event()

        async def busy() -> None:
            async with services._turns.turn(Urgency.PROGRESS):
                occupied.set()
                await release.wait()

        blocker = asyncio.create_task(busy())
        await occupied.wait()
        writer = StatusWriter(services, "team", "wf", "uid-1")
        writer.start()
        writer(Event(EventKind.WORKFLOW_STARTED, "started"),
               WorkflowStatus(phase=WorkflowPhase.RUNNING))
        await asyncio.sleep(0.05)  # its first write waits for the one writer
        writer(Event(EventKind.WORKFLOW_FINISHED, "done"),
               WorkflowStatus(phase=WorkflowPhase.SUCCEEDED))
        stopping = asyncio.create_task(writer.stop())
        await asyncio.sleep(0.05)
        release.set()
        async with asyncio.timeout(5):
            await asyncio.gather(blocker, stopping)

    asyncio.run(run())
    services._writers.shutdown()

    assert [status["phase"] for status in custom_objects.statuses] == ["Succeeded"]


def test_a_status_write_the_api_server_never_answers_fails_at_its_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An API server that takes the connection and says nothing: the write fails as the API
    server out of reach (retried later) after WRITE_TIMEOUT_SECONDS, and frees its writer."""
    import socket
    import time

    import kubernetes

    from controller.handlers import context

    monkeypatch.setattr(context, "WRITE_TIMEOUT_SECONDS", 0.2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    configuration.retries = 0
    client = context.CustomObjects(kubernetes.client.ApiClient(configuration))
    writing = Services(settings=Settings(), store=None, metrics=Metrics(),  # type: ignore[arg-type]
                       custom_objects=client, pools=None)  # type: ignore[arg-type]
    began = time.monotonic()
    try:
        with pytest.raises(KubernetesError, match="cannot reach the API server"):
            asyncio.run(writing.patch_status("workflows", "team", "wf", {"phase": "Running"}))
    finally:
        silent.close()
        writing._writers.shutdown(wait=False)

    assert time.monotonic() - began < 5


def test_a_status_write_is_a_merge_patch_of_the_status_and_its_refusal_is_told() -> None:
    """The lean status write against an HTTP server: the request the client's generated method
    makes (a merge patch of the status subresource, with the token), and an answer other than
    2xx an ApiException with its status, as the generated method raises it."""
    import http.server
    import json
    import threading

    import kubernetes

    from controller.handlers import context

    seen: list[tuple[str, str, str, str, Any]] = []

    class Server(http.server.BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:  # noqa: N802 (the handler's protocol)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers["Content-Type"],
                         self.headers["Authorization"], self.headers["Accept"], body))
            code = 404 if "gone" in self.path else 200
            answer = b'{"kind": "Workflow"}'
            self.send_response(code)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    configuration.api_key = {"authorization": "token-1"}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    client = context.CustomObjects(kubernetes.client.ApiClient(configuration))
    try:
        client.merge_patch_status("workflows", "team", "wf", {"phase": "Running"})
        with pytest.raises(ApiException) as refused:
            client.merge_patch_status("workflows", "team", "gone", {"phase": "Running"})
    finally:
        server.shutdown()
        server.server_close()

    assert seen[0] == ("/apis/agentainer.dev/v1alpha1/namespaces/team/workflows/wf/status",
                       "application/merge-patch+json", "Bearer token-1", "application/json",
                       {"status": {"phase": "Running"}})
    assert refused.value.status == 404
