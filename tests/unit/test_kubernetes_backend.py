"""The Kubernetes backend against a fake API client: how much of a pod's log it reads. No API
server is needed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client import ApiClient, CoreV1Api

from controller.backends.base import AgentHandle
from controller.backends.kubernetes import KubernetesBackend
from controller.config import Settings

MiB = 1 << 20
AGENT = AgentHandle(id="team/wf-step-abcde", name="wf-step-abcde")

def backend(**settings: Any) -> KubernetesBackend:
    return KubernetesBackend(CoreV1Api(ApiClient()), Settings(**settings))


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


def finished_pod() -> Any:
    terminated = SimpleNamespace(exit_code=0, reason="Completed", message=None)
    container = SimpleNamespace(name="agent", state=SimpleNamespace(terminated=terminated,
                                                                    waiting=None))
    return SimpleNamespace(status=SimpleNamespace(
        phase="Succeeded", reason=None, message=None, container_statuses=[container],
        init_container_statuses=None))


def serve_log(monkeypatch: pytest.MonkeyPatch, response: LogResponse) -> dict[str, Any]:
    asked: dict[str, Any] = {}

    def read_log(self: Any, name: str, namespace: str, **query: Any) -> LogResponse:
        asked.update(query)
        return response

    monkeypatch.setattr(CoreV1Api, "read_namespaced_pod", lambda *a, **k: finished_pod())
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
