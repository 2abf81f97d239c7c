"""Shared fixtures: a real Redis per test session, the real Docker engine, workflow builders."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "agentainer/busybox:latest"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of our own on a free loopback port, gone after the session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `scripts/setup.sh packages` (make test does)")
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


def workflow_doc(*steps: dict[str, Any], name: str | None = None, **spec: Any) -> dict[str, Any]:
    """A Workflow manifest as a user would write it; steps default to the busybox image."""
    return {
        "apiVersion": "agentainer.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name or f"t-{uuid.uuid4().hex[:8]}"},
        "spec": {"steps": [{"image": IMAGE, **step} if "pool" not in step else step
                           for step in steps], **spec},
    }


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]
