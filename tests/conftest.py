"""Shared fixtures: a real Redis per test session, the real Docker engine, workflow builders."""

from __future__ import annotations

import os
import re
import shutil
import signal
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


def start_redis(directory: Path, *options: str, tls_port: int | None = None
                ) -> tuple[subprocess.Popen[bytes], int]:
    """A real redis-server of our own on a free loopback port, with ``options`` of
    redis-server's, once it answers (on ``tls_port`` if it has one): the process and port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `scripts/setup.sh packages` (make test does)")
    plain = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(plain), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    port = tls_port or plain
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, plain
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of our own, gone after the session."""
    process, port = start_redis(tmp_path_factory.mktemp("redis"))
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


def readme_commands(marker: str, after: int = 0) -> list[str]:
    """The commands of the README's shell block that follows the comment naming ``marker``
    (``after``: the how-manieth block after it), comments cut off."""
    text = (ROOT / "README.md").read_text()
    assert marker in text, f"README.md has no block marked for {marker}"
    blocks = re.findall(r"```sh\n(.*?)```", text[text.index(marker):], re.S)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in blocks[after].splitlines()]
    return [line for line in lines if line]


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def restart_dockerd(down_seconds: float = 0.0) -> None:
    """Stop the Docker engine and, ``down_seconds`` later, start it again as the set-up script
    does (with live-restore: containers run on meanwhile). Needs root, as the script does."""
    pids = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout
    for pid in pids.split():
        os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "dockerd did not stop within 60s"
        time.sleep(0.1)
    time.sleep(down_seconds)
    subprocess.run([str(ROOT / "scripts" / "setup.sh"), "docker"], check=True,
                   capture_output=True, timeout=120)


@pytest.fixture
def live_restore() -> None:
    """An engine restarted by a test keeps its containers only with live-restore; one that
    the set-up script did not start (no root to restart it) cannot be used for that."""
    import docker  # only tests that restart the engine need it here

    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("restarting the Docker engine needs root and a local dockerd")
    if not docker.from_env().info().get("LiveRestoreEnabled"):
        restart_dockerd()  # scripts/setup.sh starts it with live-restore
