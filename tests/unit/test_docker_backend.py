"""The Docker backend's own reads of the engine have the client's deadline, as docker-py's."""

from __future__ import annotations

import concurrent.futures
import socket
from pathlib import Path

import docker
import pytest
import requests

from controller.backends.docker import DockerBackend, OneSocketAdapter
from controller.config import Settings


def test_an_agents_log_read_from_an_engine_that_never_answers_fails_at_the_deadline(
        tmp_path: Path) -> None:
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "docker.sock"))
    silent.listen(8)  # takes the connection, says nothing
    client = docker.DockerClient(base_url=f"unix://{tmp_path / 'docker.sock'}", version="1.41",
                                 timeout=1)
    OneSocketAdapter.install(client)
    backend = DockerBackend(client, Settings())
    reading = concurrent.futures.ThreadPoolExecutor(1)
    try:
        read = reading.submit(backend._read_logs, "0123456789ab", 1024)
        with pytest.raises(requests.exceptions.Timeout):
            read.result(timeout=5)  # the client's timeout is 1 s
    finally:
        reading.shutdown(wait=False)
        client.close()
        silent.close()
