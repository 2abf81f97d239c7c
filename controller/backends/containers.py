"""What the Docker engine is asked to create for an agent, and what the task runner's files
say of how it ended: pure functions of their inputs, tested directly."""

from __future__ import annotations

import signal
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from controller.backends import output, runner
from controller.backends.base import LABEL_RUNNER, AgentSpec
from controller.errors import AgentSpecError
from controller.models import AGENT_CAPABILITIES

# Docker refuses memory limits below this (it needs room for the runtime itself).
DOCKER_MIN_MEMORY_BYTES = 6 * 1024 * 1024


def container_config(spec: AgentSpec, network_mode: str, pids_limit: int = 0,
                     through: runner.Exec | None = None, log_bytes: int = 0) -> dict[str, Any]:
    """The ``containers.create`` arguments for an agent: a pure function, tested directly.

    A resident (pool) agent runs the task runner as its first process, reading its stdin, which
    stays open between attachments; the runner runs as root with just the capabilities it
    needs to run each task as the task user, and the image's own entrypoint is not used.

    Given ``through``, an agent of its own runs its whole command through the runner, which
    keeps its output in files of the container too: they outlive an engine that was down when
    the agent ended. The runner (mounted read-only from a volume) starts as root.

    Every agent has all capabilities dropped but ``AGENT_CAPABILITIES`` (a pool agent: but the
    runner's) and those its resource adds, no new privileges, a pids limit, and at most
    ``log_bytes`` of log kept by the engine.
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
        "cap_drop": ["ALL"],
        "cap_add": sorted({*AGENT_CAPABILITIES, *spec.capabilities}),
        # A tiny init as PID 1 forwards SIGTERM and reaps zombies, so a stop is prompt.
        "init": True,
    }
    if pids_limit:
        config["pids_limit"] = pids_limit
    if log_bytes:
        config["log_config"] = {"type": "json-file",
                                "config": {"max-size": str(log_bytes), "max-file": "1"}}
    if spec.resident:
        uid, gid = spec.task_user
        config["labels"][LABEL_RUNNER] = runner.VERSION_LABEL_VALUE
        config.update(
            entrypoint=runner.serve_command(uid, gid), command=[], stdin_open=True,
            user="0:0", working_dir="/",
            init=False,  # the runner is PID 1: it reaps, and ends every process of a task
            cap_add=sorted({*runner.RUNNER_CAPABILITIES, *spec.capabilities}),
            tmpfs={runner.TASKS_DIR: "mode=1777"},
        )
        return config | _limits(spec)
    if through is not None:
        config.update(entrypoint=through.command(), command=[], user="0:0")
        return config | _limits(spec)
    if spec.command is not None:
        config["entrypoint"] = list(spec.command)
    if spec.args is not None:
        config["command"] = list(spec.args)
    if spec.command is not None and spec.args is None:
        # As in a pod: a command without args replaces the image's CMD too.
        config["command"] = []
    return config | _limits(spec)


def agent_argv(spec: AgentSpec, entrypoint: list[str] | None, cmd: list[str] | None) -> list[str]:
    """An agent's whole command, as Docker (and a pod) would make it of the image's
    ``entrypoint`` and ``cmd`` and the spec's command and args."""
    if spec.command is not None:
        return [*spec.command, *(spec.args or [])]
    return [*(entrypoint or []), *(spec.args if spec.args is not None else cmd or [])]


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


@dataclass(frozen=True)
class Ending:
    """How the runner saw an agent's command end: its exit code, and the first signal the
    runner was sent from outside (0: none), as the runner's exit file says them."""

    code: int
    signal: int

    @classmethod
    def read(cls, text: bytes) -> Ending | None:
        """The exit file: ``CODE SIGNAL`` and a newline; None for anything else."""
        try:
            code, number = (int(word) for word in text.decode("ascii").split())
        except (UnicodeDecodeError, ValueError):
            return None
        return cls(code, number) if 0 <= code <= 255 and 0 <= number < 65 else None


ENGINE_STOP_SIGNALS = (signal.SIGTERM, signal.SIGKILL)
"""What the engine sends a container it stops (its stop signal, then a kill)."""


def read_kept(chunks: Iterator[bytes], stdout: output.Head,
              stderr: output.Tail) -> tuple[bool, Ending | None]:
    """The runner's files (a tar stream of its out directory, in ``chunks``), read a piece at a
    time into ``stdout`` and ``stderr``: whether stdout was there, and how the command ended
    (None if the runner did not see it end). Raises tarfile.TarError for anything else."""
    found, ending = set(), None
    stream: Any = output.ChunkReader(chunks)  # read once, front to back, as "r|" does
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            name = member.name.rsplit("/", 1)[-1]
            found.add(name)
            source = archive.extractfile(member) if member.isfile() else None
            if source is not None and name == "exit":
                ending = Ending.read(source.read(64))
            keep = stdout if name == "stdout" else stderr if name == "stderr" else None
            while source is not None and keep is not None:
                piece = source.read(65536)
                if not piece or not keep.feed(piece):
                    break
            if name == "stdout-truncated":
                stdout.truncated = True
    return "stdout" in found, ending
