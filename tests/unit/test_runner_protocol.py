"""The task runner's protocol as the controller speaks it: requests, frames parsed in one pass,
output bounded, and a channel that gives up cleanly. The runner itself is tested for real in
tests/integration/test_pool_isolation.py."""

from __future__ import annotations

import asyncio
import binascii
import socket
import struct
from typing import Any

import pytest

from controller.backends.channel import DockerAttachChannel, demultiplex
from controller.backends.runner import (
    MAX_LINE,
    ChannelClosedError,
    LineSplitter,
    RunnerChannel,
    TaskCollector,
    task_line,
)
from controller.errors import AgentLostError, AgentSpecError


def b64(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False)


def records(line: bytes) -> list[str]:
    kind, task_id, payload = line.rstrip(b"\n").split(b" ")
    assert kind == b"TASK"
    return [r.decode() for r in binascii.a2b_base64(payload).split(b"\0")[:-1]]


def test_task_request_carries_every_word_and_value_as_data() -> None:
    hostile = ["sh", "-c", "echo $X; `rm -rf /`", "line\nbreak", "sp ace", "é"]
    line = task_line("abc", hostile, {"X": "a=b\nc", "EMPTY": ""}, 2.5, 1000)

    assert line.startswith(b"TASK abc ") and line.count(b"\n") == 1  # one line, whatever is in it
    assert records(line) == [*(f"arg={w}" for w in hostile), "env=X=a=b\nc", "env=EMPTY=",
                             "timeout_ms=2500", "limit=1000"]


def test_no_timeout_is_sent_as_zero() -> None:
    assert "timeout_ms=0" in records(task_line("a", ["true"], {}, None, 1))


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["printf", "a\0b"], {}, "a word of the command"),
    (["true"], {"KEY": "x\0y"}, "environment variable KEY"),
])
def test_nul_characters_are_refused_naming_where(argv: list[str], env: dict[str, str],
                                                 named: str) -> None:
    with pytest.raises(AgentSpecError, match=named):
        task_line("a", argv, env, None, 1)


def test_lines_split_in_one_pass_whatever_the_pieces() -> None:
    splitter = LineSplitter()
    stream = b"".join(b"OUT t " + b64(bytes([i % 256]) * 3000) + b"\n" for i in range(200))
    lines: list[bytes] = []
    for at in range(0, len(stream), 7):  # pieces far smaller than a line
        lines += splitter.feed(stream[at:at + 7])

    assert lines == stream.split(b"\n")[:-1]


def test_a_line_longer_than_any_frame_is_an_error_not_kept() -> None:
    splitter = LineSplitter()
    with pytest.raises(AgentLostError, match="out of step"):
        for _ in range(MAX_LINE // 65536 + 2):
            splitter.feed(b"x" * 65536)


def test_docker_frames_are_taken_apart_even_when_split_anywhere() -> None:
    frames = b"".join(struct.pack(">BxxxI", stream, len(p)) + p
                      for stream, p in [(1, b"hello "), (2, b"diag"), (1, b"world"), (1, b"")])
    raw = bytearray()
    out, err = bytearray(), bytearray()
    for byte in frames:
        raw.append(byte)
        o, e = demultiplex(raw)
        out += o
        err += e

    assert (bytes(out), bytes(err), raw) == (b"hello world", b"diag", bytearray())


def test_four_mebibytes_in_small_docker_frames_come_out_whole() -> None:
    payload = bytes(range(256)) * 16384
    frames = b"".join(struct.pack(">BxxxI", 1, 64) + payload[at:at + 64]
                      for at in range(0, len(payload), 64))
    out, err = demultiplex(bytearray(frames))

    assert out == payload and err == b""


def exit_line(task_id: str, code: int = 0, flags: str = "-", note: bytes = b"") -> bytes:
    return f"EXIT {task_id} {code} {flags} 1500 250 ".encode() + (b64(note) if note else b"-")


def test_collector_gathers_its_own_frames_and_ignores_others() -> None:
    collector = TaskCollector("t1", limit=100)
    for line in [b"OUT t0 " + b64(b"not mine"), b"READY nonce agentainer-runner/1 user 1 1",
                 b"OUT t1 " + b64(b"a\x00b\n"), b"ERR t1 " + b64(b"oops"),
                 b"OUT t1 " + b64("é".encode()), exit_line("t1", 3)]:
        collector.feed(line)

    result = collector.result
    assert result is not None
    assert (result.exit_code, result.stdout, result.stderr) == (3, "a\x00b\né", "oops")
    assert result.clean and not result.timed_out
    assert (result.run_seconds, result.cleanup_seconds) == (0.0015, 0.00025)


def test_collector_keeps_at_most_the_limit_and_reports_the_flags() -> None:
    collector = TaskCollector("t", limit=5)
    collector.feed(b"OUT t " + b64(b"0123"))
    collector.feed(b"OUT t " + b64(b"456789"))  # a runner that kept too much: cut here too
    collector.feed(exit_line("t", 137, "timeout,stdout-truncated,unclean",
                             b"/etc/x was changed"))

    result = collector.result
    assert result is not None
    assert result.stdout == "01234" and result.stdout_truncated and not result.stderr_truncated
    assert result.timed_out and not result.clean and result.note == "/etc/x was changed"


def test_a_refused_task_is_an_error_with_the_runners_reason() -> None:
    collector = TaskCollector("t", limit=5)
    with pytest.raises(AgentLostError, match="a task needs a command"):
        collector.feed(b"FAIL t " + b64(b"a task needs a command"))


class ScriptedChannel(RunnerChannel):
    """A runner that answers from a script: lines to give per request written."""

    def __init__(self, answer: Any) -> None:
        super().__init__("agent-1")
        self.sent: list[bytes] = []
        self.answer = answer
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport_closed = False

    async def _send(self, data: bytes) -> None:
        self.sent.append(data)
        for chunk in self.answer(data):
            self.queue.put_nowait(chunk)

    def _send_now(self, data: bytes) -> None:
        self.sent.append(data)

    async def _receive(self, timeout: float) -> bytes:
        try:
            chunk = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return b""
        if chunk == b"EOF":
            raise ChannelClosedError("gone")
        return chunk

    def _close_transport(self) -> None:
        self.transport_closed = True


def runner(request: bytes) -> list[bytes]:
    words = request.split(b" ")
    if words[0] == b"HELLO":
        nonce = words[1].strip()
        # What an earlier connection left in the stream comes first.
        return [b"OUT old " + b64(b"stale") + b"\nEXIT old 0 - 1 1 -\nREADY other x\n",
                b"READY " + nonce + b" agentainer-runner/1 shared 1000 1000\n"]
    if words[0] == b"TASK":
        task_id = words[1].decode()
        return [b"OUT " + words[1] + b" " + b64(b"hi\n") + b"\n", exit_line(task_id) + b"\n"]
    return []


def test_hello_skips_what_an_earlier_connection_left_then_a_task_runs() -> None:
    async def scenario() -> Any:
        channel = ScriptedChannel(runner)
        info = await channel.hello()
        result = await channel.run(["echo", "hi"], {}, 10, 100)
        return info, result, channel

    info, result, channel = asyncio.run(scenario())

    assert (info.mode, info.uid, info.gid) == ("shared", 1000, 1000)
    assert result.stdout == "hi\n" and result.exit_code == 0
    assert not channel.closed


def test_runner_of_another_protocol_is_refused() -> None:
    def old(request: bytes) -> list[bytes]:
        return [b"READY " + request.split(b" ")[1].strip() + b" agentainer-runner/0 user 1 1\n"]

    async def scenario() -> None:
        await ScriptedChannel(old).hello()

    with pytest.raises(AgentSpecError, match="agentainer-runner/0, not agentainer-runner/1"):
        asyncio.run(scenario())


def test_silent_runner_times_out_saying_what_was_awaited_and_the_channel_closes() -> None:
    async def scenario() -> ScriptedChannel:
        channel = ScriptedChannel(lambda request: [])
        with pytest.raises(TimeoutError, match="no answer from its runner while waiting for "
                                               "its hello"):
            await channel.hello(timeout=0.2)
        return channel

    channel = asyncio.run(scenario())
    assert channel.closed and channel.transport_closed


def test_cancelled_task_is_cancelled_in_the_runner_and_the_channel_given_up() -> None:
    async def scenario() -> ScriptedChannel:
        channel = ScriptedChannel(lambda request: [])
        running = asyncio.ensure_future(channel.run(["sleep", "60"], {}, None, 100))
        await asyncio.sleep(0.05)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        return channel

    channel = asyncio.run(scenario())
    task_id = channel.sent[0].split(b" ")[1]
    assert channel.sent[-1] == b"CANCEL " + task_id + b"\n"
    assert channel.closed


def test_runner_gone_mid_task_closes_the_channel_for_good() -> None:
    async def scenario() -> ScriptedChannel:
        channel = ScriptedChannel(lambda request: [b"EOF"])
        with pytest.raises(ChannelClosedError):
            await channel.run(["true"], {}, None, 100)
        with pytest.raises(ChannelClosedError, match="its runner is gone"):
            await channel.run(["true"], {}, None, 100)
        return channel

    assert asyncio.run(scenario()).closed


def test_a_docker_channel_whose_connection_broke_says_the_agent_is_gone() -> None:
    """The engine restarting cuts the attach socket: a task sent on it is the agent lost (its
    task runs again elsewhere), never an internal error of the step."""

    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        theirs.close()
        channel = DockerAttachChannel(ours, "agent-1")
        with pytest.raises(ChannelClosedError, match="agent-1 is gone"):
            await channel.run(["true"], {}, None, 100)
        assert channel.closed

    asyncio.run(scenario())
