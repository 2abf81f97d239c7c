"""The fast task path into a resident agent: a long-lived ``sh`` reading its attached stdin.

A task is written to the shell as one line: a subshell (so that its ``export``s and ``cd`` die
with it) whose stdin is ``/dev/null`` (so that it cannot read the commands after it), then an
end marker with the exit status on stdout and an end marker on stderr. The markers carry a
random token per task, so no output can fake them. Docker multiplexes the attached stdout and
stderr into frames of an 8-byte header and a payload. No container start, no exec: a task comes
back in about a millisecond.
"""

from __future__ import annotations

import asyncio
import secrets
import shlex
import socket
import struct

from controller.backends.base import TaskResult

HEADER = struct.Struct(">BxxxI")
STDOUT, STDERR = 1, 2


class ChannelClosedError(ConnectionError):
    """The agent's shell went away (the container stopped, or the connection broke)."""


def task_script(argv: list[str], env: dict[str, str], token: str) -> bytes:
    """One line for the resident shell; every word and value is quoted, so nothing in them
    is ever shell code."""
    exports = "".join(f"export {name}={shlex.quote(value)}; " for name, value in env.items())
    command = " ".join(shlex.quote(word) for word in argv)
    return (f"( {exports}exec {command} ) </dev/null; __agentainer_status=$?; "
            f"printf '\\n%s %d\\n' {token} \"$__agentainer_status\"; "
            f"printf '\\n%s\\n' {token} >&2\n").encode()


class TaskOutput:
    """Collects one task's stdout and stderr, chunk by chunk, up to its end markers."""

    def __init__(self, token: str) -> None:
        self._out_marker = f"\n{token} ".encode()
        self._err_marker = f"\n{token}\n".encode()
        self._stdout, self._stderr = bytearray(), bytearray()
        self._exit_code: int | None = None
        self._stderr_done = False

    @property
    def done(self) -> bool:
        return self._exit_code is not None and self._stderr_done

    def feed(self, stream: int, payload: bytes) -> None:
        if stream == STDOUT and self._exit_code is None:
            self._stdout += payload
            at = self._stdout.find(self._out_marker)
            if at >= 0:
                line_end = self._stdout.find(b"\n", at + len(self._out_marker))
                if line_end >= 0:
                    self._exit_code = int(self._stdout[at + len(self._out_marker):line_end])
                    del self._stdout[at:]
        elif stream == STDERR and not self._stderr_done:
            self._stderr += payload
            at = self._stderr.find(self._err_marker)
            if at >= 0:
                self._stderr_done = True
                del self._stderr[at:]

    def result(self) -> TaskResult:
        assert self._exit_code is not None
        return TaskResult(self._exit_code, self._stdout.decode("utf-8", errors="replace"),
                          self._stderr.decode("utf-8", errors="replace"))


def new_token() -> str:
    return "__agentainer_end_" + secrets.token_hex(12)


class ShellChannel:
    """An attached socket to one agent's shell; one task at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._buffer = b""
        self._lock = asyncio.Lock()
        self.closed = False

    async def run(self, argv: list[str], env: dict[str, str]) -> TaskResult:
        async with self._lock:  # never two tasks in one agent at once
            if self.closed:
                raise ChannelClosedError("the agent's shell is gone")
            token = new_token()
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_sendall(self._sock, task_script(argv, env, token))
                return await self._read_until_done(token)
            except (OSError, asyncio.CancelledError):
                # A half-read task leaves the stream out of step: this channel is done.
                self.close()
                raise

    async def _read_until_done(self, token: str) -> TaskResult:
        collector = TaskOutput(token)
        while not collector.done:
            collector.feed(*await self._frame())
        return collector.result()

    async def _frame(self) -> tuple[int, bytes]:
        await self._fill(HEADER.size)
        stream, size = HEADER.unpack_from(self._buffer)
        await self._fill(HEADER.size + size)
        payload = self._buffer[HEADER.size:HEADER.size + size]
        self._buffer = self._buffer[HEADER.size + size:]
        return stream, payload

    async def _fill(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        while len(self._buffer) < size:
            chunk = await loop.sock_recv(self._sock, 65536)
            if not chunk:
                self.close()
                raise ChannelClosedError("the agent's shell closed its output")
            self._buffer += chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
