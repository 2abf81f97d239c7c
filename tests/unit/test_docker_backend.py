"""The Docker backend's own reads of the engine have the client's deadline, as docker-py's;
its calls to the engine take turns."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import pytest
import requests

from controller.backends.docker import DaemonThreads, DockerBackend, OneSocketAdapter
from controller.config import Settings


def test_an_agents_log_read_from_an_engine_that_never_answers_fails_at_the_deadline(
        tmp_path: Path) -> None:
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "docker.sock"))
    silent.listen(8)  # takes the connection, says nothing
    client = docker.DockerClient(base_url=f"unix://{tmp_path / 'docker.sock'}", version="1.41",
                                 timeout=0.25)
    OneSocketAdapter.install(client)
    backend = DockerBackend(client, Settings())
    reading = concurrent.futures.ThreadPoolExecutor(1)
    try:
        read = reading.submit(backend._read_logs, "0123456789ab", 1024)
        with pytest.raises(requests.exceptions.Timeout):
            read.result(timeout=5)  # the client's timeout is 0.25 s
    finally:
        reading.shutdown(wait=False)
        client.close()
        silent.close()


class Engine:
    """docker-py's API client, as far as listing and removing go: each call noted; a list
    waits for ``gate``."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = threading.Event()

    def containers(self, all: bool, filters: dict[str, Any]) -> list[Any]:
        self.calls.append("list")
        self.gate.wait(5)
        return []

    def remove_container(self, container: str, v: bool, force: bool) -> None:
        self.calls.append(f"remove {container}")


def test_calls_that_finish_agents_go_before_those_waiting_to_begin_work() -> None:
    """With every call slot taken, a removal asked for after a list goes first."""
    engine = Engine()
    backend = DockerBackend(SimpleNamespace(api=engine),  # type: ignore[arg-type]
                            Settings(docker_threads=1))

    async def scenario() -> None:
        first = asyncio.ensure_future(backend.list_agents("ns", {}))
        await asyncio.sleep(0.05)  # it holds the one slot
        second = asyncio.ensure_future(backend.list_agents("ns", {}))
        await asyncio.sleep(0.01)
        removal = asyncio.ensure_future(backend._call(backend._remove, "ended"))
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(first, second, removal), 5)

    asyncio.run(scenario())

    assert engine.calls == ["list", "remove ended", "list"]


def test_calls_reuse_the_threads_of_calls_that_returned_which_are_daemons() -> None:
    """As many threads as calls in flight, kept for the next calls; none joined at exit."""
    threads = DaemonThreads("test")
    release = threading.Event()
    first: list[threading.Thread] = []
    then: list[threading.Thread] = []

    def until(condition: Any) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.001)

    def held() -> None:
        first.append(threading.current_thread())
        release.wait(5)

    for _ in range(3):
        threads.run(held)
    until(lambda: len(first) == 3)
    release.set()
    until(lambda: threads._idle == 3)
    for _ in range(3):
        threads.run(lambda: then.append(threading.current_thread()))
    until(lambda: len(then) == 3)

    assert len(set(first)) == 3  # three at once: three threads
    assert set(then) <= set(first)  # then none new
    assert all(thread.daemon for thread in first)
