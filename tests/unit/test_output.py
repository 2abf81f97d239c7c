"""An agent's output read within a limit: the head of its stdout, the tail of its stderr, in
bounded memory whatever the size of the stream."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

from controller.backends.output import STDERR, STDOUT, Head, Tail, frames

MiB = 1 << 20
PIECE = 16 * 1024  # what Docker sends at a time: one log message of at most 16 KiB


def pieces(total: int, size: int = PIECE) -> Iterator[bytes]:
    """``total`` bytes of a stream in pieces, each a new object (as read from a socket), its
    letter telling where in the stream a piece was."""
    for start in range(0, total, size):
        yield bytes([ord("a") + start // size % 26]) * min(size, total - start)


def feed_all(keep: Head | Tail, stream: Iterator[bytes]) -> int:
    """Feed a stream as the backends do, stopping when asked; returns the pieces read."""
    read = 0
    for piece in stream:
        read += 1
        if not keep.feed(piece):
            break
    return read


def test_head_keeps_exactly_the_limit_and_stops_reading_at_the_first_byte_past_it() -> None:
    head = Head(MiB)

    read = feed_all(head, pieces(200 * MiB))

    assert len(head.text()) == MiB
    assert head.truncated is True
    assert read == MiB // PIECE + 1  # the next piece proves there was more; no further one


def test_head_of_a_stream_of_exactly_the_limit_is_whole_and_not_truncated() -> None:
    head = Head(MiB)

    feed_all(head, pieces(MiB))

    assert len(head.text()) == MiB
    assert head.truncated is False


def test_head_leaves_out_a_character_the_limit_cuts_in_two() -> None:
    head = Head(4)

    feed_all(head, iter(["abcé".encode(), b"more"]))  # é is two bytes: the 4th and 5th

    assert head.text() == "abc"
    assert head.truncated is True


def test_head_replaces_bytes_that_are_not_utf8_as_before() -> None:
    head = Head(10)

    feed_all(head, iter([b"ok\xff"]))

    assert head.text() == "ok\ufffd"


def test_tail_keeps_the_last_bytes_of_a_long_stream() -> None:
    tail = Tail(64 * 1024)

    feed_all(tail, iter([*pieces(10 * MiB), b"the reason it failed\n"]))

    text = tail.text()
    assert len(text.encode()) == 64 * 1024
    assert text.endswith("the reason it failed\n")
    assert tail.truncated is True


def test_tail_of_a_short_stream_is_all_of_it() -> None:
    tail = Tail(MiB)

    feed_all(tail, iter([b"one\n", b"two\n"]))

    assert tail.text() == "one\ntwo\n"
    assert tail.truncated is False


def test_tail_leaves_out_a_character_the_limit_cuts_in_two() -> None:
    tail = Tail(4)

    feed_all(tail, iter(["xé".encode(), b"end"]))  # the last 4 bytes: é's second byte, end

    assert tail.text() == "end"


def test_tail_holds_no_more_than_the_limit_and_a_piece_while_64_mib_stream_past() -> None:
    tail = Tail(MiB)
    tracemalloc.start()
    try:
        feed_all(tail, pieces(64 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    print(f"peak memory while 64 MiB streamed past a 1 MiB tail: {peak / MiB:.2f} MiB")
    assert peak < 2 * MiB
    assert len(tail.text()) == MiB


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def test_frames_of_a_multiplexed_log_are_read_however_its_bytes_were_cut() -> None:
    sent = [(STDOUT, b"out 1\n"), (STDERR, b"err\n"), (STDOUT, b""), (STDOUT, b"x" * 70000)]
    stream = b"".join(frame(s, p) for s, p in sent)

    for size in (1, 3, 8, 9, 4096, len(stream)):
        cut = (stream[i:i + size] for i in range(0, len(stream), size))
        assert list(frames(cut)) == sent, f"cut every {size} bytes"


def test_a_multiplexed_log_cut_short_ends_with_its_last_whole_frame() -> None:
    stream = frame(STDOUT, b"whole\n") + frame(STDERR, b"cut short")[:-3]

    assert list(frames(iter([stream]))) == [(STDOUT, b"whole\n")]
