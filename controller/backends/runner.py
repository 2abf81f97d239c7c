"""The task runner of pool agents (``images/runner``): how it is started and how tasks reach it.

Every pool agent runs the runner as its first process. It reads requests, one line each, on the
agent's attached stdin, which no task can reach, and answers on its stdout, which only it
writes: a task's output travels base64-encoded inside frames that carry the task's id, so
nothing a task prints can end a frame or forge one. The runner runs each task as the task user
in a session of its own with exactly its own environment, and when the task ends kills every
process the task left, removes every file it left, and says whether the agent is as clean as it
was at start (``TaskResult.clean``); an agent that is not is replaced, never reused.

The two backends differ only in how bytes reach the runner: Docker's attach socket (with its
multiplexing) or the API server's attach websocket. Both subclass :class:`RunnerChannel`.
"""

from __future__ import annotations

import abc
import asyncio
import binascii
import collections
import secrets
from dataclasses import dataclass

from controller.backends.base import TaskResult
from controller.errors import AgentLostError, AgentSpecError


PROTOCOL = "agentainer-runner/1"
VERSION_LABEL_VALUE = "1"
"""Value of the runner label on agents that speak this protocol; others are replaced."""
RUNNER_BIN_DIR = "/agentainer/bin"
RUNNER_PATH = f"{RUNNER_BIN_DIR}/runner"
TASKS_DIR = "/agentainer/tasks"
OUT_DIR = "/agentainer/out"
"""Where an agent of its own run through the runner (``runner exec``) keeps its output."""
RUNNER_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID"]
"""What the runner needs to switch to the task user, end its processes and remove its files;
all allowed by the Pod Security Standard ``baseline``. A task runs with none of them."""

HELLO_TIMEOUT_SECONDS = 60.0
"""How long an agent's runner may take to answer its first hello: it looks at every file of
the image first (a large image takes a second or two)."""
ANSWER_GRACE_SECONDS = 30.0
"""How long past a task's own deadline the runner may take to end it and clean up, before the
agent is given up as unresponsive."""
MAX_LINE = 1 << 20
"""No frame of the runner is longer; a longer line means the stream is not the runner's."""


def serve_command(uid: int, gid: int) -> list[str]:
    """The agent's entrypoint: the runner, with the user its tasks run as."""
    return [RUNNER_PATH, "serve", "--uid", str(uid), "--gid", str(gid)]


@dataclass(frozen=True)
class Exec:
    """An agent of its own run through the runner, which keeps its output in ``OUT_DIR`` too
    (where it outlives a container engine that was down when the agent ended). The runner starts
    as root and runs the command as ``user`` (the image's), as the runtime would have."""

    argv: list[str]
    limit: int
    user: str = ""
    set_home: bool = False
    """HOME is the user's, from the image's /etc/passwd (nobody else set it)."""
    log_limit: int = 0
    """The size of the container's log, past which the engine would drop its start (0: none):
    the runner logs no more than it holds, and says so last on stderr (LOG_FULL)."""

    def command(self) -> list[str]:
        options = ["--out", OUT_DIR, "--limit", str(self.limit)]
        options += ["--log-limit", str(self.log_limit)] if self.log_limit else []
        options += ["--user", self.user] if self.user else []
        options += ["--set-home"] if self.set_home else []
        return [RUNNER_PATH, "exec", *options, "--", *self.argv]


LOG_FULL = "agentainer-runner: the log is full: the rest of the output is not logged"
"""The runner's last line on stderr when it stopped logging the output, which would have
taken more than the container's log holds (a json-file log past its max-size keeps only what
came after, losing the head of stdout): the head and tail are then read from its files."""


def hello_line(nonce: str) -> bytes:
    return f"HELLO {nonce}\n".encode()


def task_line(task_id: str, argv: list[str], env: dict[str, str], timeout: float | None,
              limit: int) -> bytes:
    """One TASK request: argv and env as NUL-terminated records, base64-encoded."""
    records = [f"arg={word}" for word in argv]
    records += [f"env={name}={value}" for name, value in env.items()]
    records += [f"timeout_ms={round(timeout * 1000) if timeout else 0}", f"limit={limit}"]
    payload = bytearray()
    for record in records:
        encoded = record.encode("utf-8", errors="surrogateescape")
        if b"\0" in encoded:
            what = "a word of the command" if record.startswith("arg=") else \
                f"environment variable {record[4:].split('=', 1)[0]}"
            raise AgentSpecError(f"{what} contains a NUL character, which no program can "
                                 "receive")
        payload += encoded + b"\0"
    return b"TASK %s %s\n" % (task_id.encode(), binascii.b2a_base64(payload, newline=False))


def cancel_line(task_id: str) -> bytes:
    return f"CANCEL {task_id}\n".encode()


def _decode(field: bytes) -> bytes:
    return b"" if field == b"-" else binascii.a2b_base64(field)


@dataclass(frozen=True)
class RunnerInfo:
    """What a runner said of itself in answer to a hello."""

    protocol: str
    mode: str
    """``user`` (tasks as another user than the runner's), ``shared`` (one non-root user for
    the runner and its tasks) or ``root`` (tasks as root, by the pool's choice)."""
    uid: int
    gid: int


class LineSplitter:
    """Splits a byte stream into lines in one pass, whatever the size of the pieces it comes
    in; a line longer than ``MAX_LINE`` is an error, never kept."""

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            self._partial += data
            if len(self._partial) > MAX_LINE:
                raise AgentLostError("the agent's runner sent a line longer than "
                                   f"{MAX_LINE} bytes: the channel is out of step")
            return []
        self._partial += data
        *lines, rest = self._partial.split(b"\n")
        self._partial = rest
        return [bytes(line) for line in lines]


class TaskCollector:
    """Gathers one task's frames into its result, keeping at most ``limit`` bytes of each
    stream (the runner drops the rest already; this holds even if it did not)."""

    def __init__(self, task_id: str, limit: int) -> None:
        self.task_id = task_id.encode()
        self.limit = limit
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.result: TaskResult | None = None

    def feed(self, line: bytes) -> None:
        kind, _, rest = line.partition(b" ")
        task_id, _, rest = rest.partition(b" ")
        if task_id != self.task_id:
            if kind == b"FAIL" and task_id == b"-":
                raise AgentLostError(f"the agent's runner refused a request: "
                                   f"{_decode(rest).decode(errors='replace')}")
            return  # another task's, or a hello's answer: not ours
        try:
            if kind in (b"OUT", b"ERR"):
                target = self.stdout if kind == b"OUT" else self.stderr
                chunk = _decode(rest)
                target += chunk[:max(0, self.limit - len(target))]
            elif kind == b"EXIT":
                self.result = self._exit(rest.split(b" "))
            elif kind == b"FAIL":
                raise AgentLostError(f"the agent's runner could not run the task: "
                                   f"{_decode(rest).decode(errors='replace')}")
        except (binascii.Error, ValueError, IndexError) as error:
            raise AgentLostError(f"the agent's runner sent a malformed frame: {error}") from error

    def _exit(self, fields: list[bytes]) -> TaskResult:
        code, flags, run_us, clean_us, note = fields[:5]
        flag_set = set(flags.decode().split(",")) - {"-"}
        return TaskResult(
            exit_code=int(code),
            stdout=self.stdout.decode("utf-8", errors="replace"),
            stderr=self.stderr.decode("utf-8", errors="replace"),
            timed_out="timeout" in flag_set,
            clean="unclean" not in flag_set,
            stdout_truncated="stdout-truncated" in flag_set,
            stderr_truncated="stderr-truncated" in flag_set,
            note=_decode(note).decode("utf-8", errors="replace"),
            run_seconds=int(run_us) / 1e6,
            cleanup_seconds=int(clean_us) / 1e6,
        )


class ChannelClosedError(AgentLostError):
    """The agent's runner went away (the agent stopped, or the connection broke)."""


class RunnerChannel(abc.ABC):
    """A connection to one agent's runner; one task at a time. Any failure mid-task leaves the
    stream out of step, so the channel closes itself and the agent is not used again."""

    def __init__(self, agent_name: str) -> None:
        self.agent_name = agent_name
        self.closed = False
        self.info: RunnerInfo | None = None
        self._lines = LineSplitter()
        self._pending: collections.deque[bytes] = collections.deque()
        self._lock = asyncio.Lock()

    # --- transport, per backend ---------------------------------------------------------------

    @abc.abstractmethod
    async def _send(self, data: bytes) -> None:
        """Write to the runner's stdin."""

    @abc.abstractmethod
    async def _receive(self, timeout: float) -> bytes:
        """Some bytes of the runner's stdout, waiting at most ``timeout`` seconds (then b"");
        raises ChannelClosedError when the stream has ended."""

    @abc.abstractmethod
    def _send_now(self, data: bytes) -> None:
        """Write without waiting, best effort (a cancellation on its way out)."""

    @abc.abstractmethod
    def _close_transport(self) -> None:
        """Release the connection."""

    # --- the protocol ---------------------------------------------------------------------------

    async def _next_line(self, deadline: float, waiting_for: str) -> bytes:
        loop = asyncio.get_running_loop()
        while not self._pending:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"agent {self.agent_name}: no answer from its runner "
                                   f"while waiting for {waiting_for}")
            data = await self._receive(min(remaining, 5.0))
            self._pending.extend(self._lines.feed(data))
        return self._pending.popleft()

    async def hello(self, timeout: float = HELLO_TIMEOUT_SECONDS) -> RunnerInfo:
        """Greet the runner and skip whatever an earlier connection left in the stream."""
        async with self._lock:
            nonce = secrets.token_hex(8)
            deadline = asyncio.get_running_loop().time() + timeout
            try:
                await self._send(hello_line(nonce))
                while True:
                    words = (await self._next_line(deadline, "its hello")).split(b" ")
                    if words[:2] == [b"READY", nonce.encode()] and len(words) >= 6:
                        self.info = RunnerInfo(words[2].decode(), words[3].decode(),
                                               int(words[4]), int(words[5]))
                        break
            except BaseException:
                self.close()
                raise
            if self.info.protocol != PROTOCOL:
                self.close()
                raise AgentSpecError(f"agent {self.agent_name} runs {self.info.protocol}, not "
                                   f"{PROTOCOL}: its runner image does not match this "
                                   "controller")
            return self.info

    async def run(self, argv: list[str], env: dict[str, str], timeout: float | None,
                  limit: int) -> TaskResult:
        """Run one task. The runner ends it at ``timeout`` itself (``timed_out``); a runner
        silent long past that raises TimeoutError."""
        task_id = secrets.token_hex(8)
        request = task_line(task_id, argv, env, timeout, limit)  # bad input: refused here
        async with self._lock:
            if self.closed:
                raise ChannelClosedError(f"agent {self.agent_name}: its runner is gone")
            collector = TaskCollector(task_id, limit)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (timeout or 365 * 24 * 3600.0) + ANSWER_GRACE_SECONDS
            try:
                await self._send(request)
                while collector.result is None:
                    collector.feed(await self._next_line(deadline, "the end of a task"))
                return collector.result
            except BaseException:
                self._send_now(cancel_line(task_id))
                self.close()
                raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close_transport()
