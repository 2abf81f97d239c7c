"""Docker's way to a pool agent's task runner: the container's attach socket.

Without a TTY, Docker multiplexes the attached stdout and stderr into frames of an 8-byte header
(stream, size) and a payload: stdout carries the runner's answers, stderr its diagnostics. The
frames are taken apart in one pass over what has arrived, whatever their sizes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from controller.backends.runner import ChannelClosedError, RunnerChannel

logger = logging.getLogger(__name__)

HEADER = struct.Struct(">BxxxI")
STDOUT, STDERR = 1, 2
RECEIVE_BYTES = 1 << 18


def demultiplex(raw: bytearray) -> tuple[bytes, bytes]:
    """Take every whole frame off the front of ``raw``; returns their stdout and stderr."""
    out, err = bytearray(), bytearray()
    at, end = 0, len(raw)
    while end - at >= HEADER.size:
        stream, size = HEADER.unpack_from(raw, at)
        if end - at - HEADER.size < size:
            break
        (err if stream == STDERR else out).extend(raw[at + HEADER.size:at + HEADER.size + size])
        at += HEADER.size + size
    del raw[:at]
    return bytes(out), bytes(err)


class DockerAttachChannel(RunnerChannel):
    """An attached socket to one container's runner."""

    def __init__(self, sock: socket.socket, agent_name: str) -> None:
        super().__init__(agent_name)
        sock.setblocking(False)
        self._sock = sock
        self._raw = bytearray()

    async def _send(self, data: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)
        except OSError as error:  # the engine restarted or the container ended: it broke
            raise ChannelClosedError(f"agent {self.agent_name} is gone: its runner's channel "
                                     f"broke ({error})") from error

    def _send_now(self, data: bytes) -> None:
        try:
            self._sock.send(data)
        except OSError:
            pass  # the channel is being given up anyway

    async def _receive(self, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            out, err = demultiplex(self._raw)
            if err:
                logger.warning("agent %s's runner: %s", self.agent_name,
                               err.decode(errors="replace").strip())
            if out:
                return out
            try:
                async with asyncio.timeout(timeout):
                    chunk = await loop.sock_recv(self._sock, RECEIVE_BYTES)
            except TimeoutError:
                return b""
            except OSError as error:
                raise ChannelClosedError(f"agent {self.agent_name} is gone: {error}") from error
            if not chunk:
                raise ChannelClosedError(f"agent {self.agent_name} is gone: its runner's "
                                         "channel closed")
            self._raw += chunk

    def alive(self) -> bool:
        """Whether the connection still stands, without waiting: a cached channel that the
        engine closed (restarting) is found so before a task is sent on it."""
        if self.closed:
            return False
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return True  # open, nothing to read
        except OSError:
            return False

    def _close_transport(self) -> None:
        self._sock.close()
