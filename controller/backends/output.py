"""An agent's output read within a limit, whatever its size: the head of its stdout (the data a
later step reads) and the tail of its stderr (its last lines say why it failed).

Both are fed the stream a piece at a time and never hold more than the limit (and one piece),
so that an agent printing gigabytes costs the reader no more than one that prints the limit.
"""

from __future__ import annotations

import codecs
import collections
import io
from collections.abc import Iterator
from typing import Any

UTF8_CONTINUATION_MASK, UTF8_CONTINUATION = 0b1100_0000, 0b1000_0000

STDOUT, STDERR = 1, 2
"""The streams of Docker's multiplexed log stream, as each frame's first byte says them."""
FRAME_HEADER = 8
"""A frame's header: its stream, three zero bytes, its payload's size (4 bytes, big-endian)."""


class Head:
    """The first ``limit`` bytes of a stream; the reader stops reading once ``feed`` says so."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.truncated = False
        """The stream went on past the limit; the rest was not read."""
        self._data = bytearray()

    def feed(self, piece: bytes) -> bool:
        """Keep what fits; False once the stream is known to go past the limit."""
        room = self.limit - len(self._data)
        if len(piece) > room:
            self._data += piece[:room]
            self.truncated = True
            return False
        self._data += piece
        return True

    def text(self) -> str:
        """The head as text; a character cut in two by the limit is left out."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return str(decoder.decode(bytes(self._data), final=not self.truncated))


class Tail:
    """The last ``limit`` bytes (at least one) of a stream, in a rolling buffer: what came
    earlier is dropped as the stream flows past."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pieces: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._dropped = False

    @property
    def truncated(self) -> bool:
        """The stream was longer than the limit; its beginning was dropped."""
        return self._dropped or self._size > self.limit

    def feed(self, piece: bytes) -> bool:
        """Keep the piece, dropping the oldest ones no longer among the last ``limit`` bytes.
        Always True: the tail is only known at the end of the stream."""
        self._pieces.append(piece)
        self._size += len(piece)
        while self._size - len(self._pieces[0]) >= self.limit:
            self._size -= len(self._pieces.popleft())
            self._dropped = True
        return True

    def ends_with(self, suffix: bytes) -> bool:
        """Whether the stream's last bytes are ``suffix`` (the last pieces joined, not all)."""
        last, size = [], 0
        for piece in reversed(self._pieces):
            last.append(piece)
            size += len(piece)
            if size >= len(suffix):
                break
        return b"".join(reversed(last)).endswith(suffix)

    def text(self) -> str:
        """The tail as text; a character cut in two by the limit is left out."""
        data = b"".join(self._pieces)[-self.limit:]
        if self.truncated:
            start = 0
            while start < min(len(data), 3) and \
                    data[start] & UTF8_CONTINUATION_MASK == UTF8_CONTINUATION:
                start += 1
            data = data[start:]
        return data.decode("utf-8", errors="replace")


def frames(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """The frames of a Docker multiplexed stream (a container's log without a terminal), from
    its bytes however they were cut: (stream, payload), a frame at a time. A stream cut short
    ends with the last whole frame."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        start = 0
        while len(pending) - start >= FRAME_HEADER:
            size = int.from_bytes(pending[start + 4:start + FRAME_HEADER], "big")
            end = start + FRAME_HEADER + size
            if end > len(pending):
                break
            yield pending[start], bytes(pending[start + FRAME_HEADER:end])
            start = end
        del pending[:start]


class ChunkReader(io.RawIOBase):
    """A file over an iterator of byte chunks (an HTTP response read piece by piece), for
    readers that want a file, such as ``tarfile`` in stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = iter(chunks)
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._rest:
            try:
                self._rest = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._rest))
        target[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n
