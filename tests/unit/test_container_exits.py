"""Agents' ends from one stream of the engine's events (ContainerExits), against streams of
events made here: what the stream vouches for, what it asks the engine, and a lost stream."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from controller.backends import exits
from controller.backends.exits import ContainerExits
from controller.errors import BackendUnavailableError


class Stream:
    """One connection: the events put in it, until it is closed or cut."""

    CUT = object()

    def __init__(self) -> None:
        self.events: queue.Queue[Any] = queue.Queue()

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        while (event := self.events.get()) is not None:
            if event is Stream.CUT:
                raise ConnectionResetError(104, "Connection reset by peer")
            yield event

    def close(self) -> None:
        self.events.put(None)

    def die(self, container_id: str) -> None:
        self.events.put({"Type": "container", "Action": "die", "Actor": {"ID": container_id}})


class Engine:
    """Opens a stream per connection while it answers; counts the times it was found away."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.answering = threading.Event()
        self.answering.set()
        self.away = 0
        self.asked: list[str] = []
        self.sinces: list[int] = []

    def open(self, since: int) -> Stream:
        if not self.answering.is_set():
            raise BackendUnavailableError("connection refused")
        self.sinces.append(since)
        self.streams.append(Stream())
        return self.streams[-1]

    def lost(self) -> None:
        self.away += 1

    def exits(self) -> ContainerExits:
        return ContainerExits(self.open, self.lost)

    def running(self, container_id: str, answer: bool) -> Any:
        async def ask() -> bool:
            self.asked.append(container_id)
            return answer
        return ask


@pytest.fixture(autouse=True)
def quick_reconnection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exits, "QUICK_SECONDS", 0.05)
    monkeypatch.setattr(exits, "BACKOFF_SECONDS", (0.0, 0.05))


async def connected(follower: ContainerExits, engine: Engine, count: int = 1) -> None:
    follower.start()
    async with asyncio.timeout(5):
        while len(engine.streams) < count or not follower._connected:
            await asyncio.sleep(0.01)


def test_an_end_told_before_its_waiter_came_is_kept_and_the_engine_is_not_asked() -> None:
    engine = Engine()

    async def scenario() -> None:
        follower = engine.exits()
        await connected(follower, engine)
        follower.expect("a")  # just before its start
        engine.streams[0].die("a")
        engine.streams[0].die("not ours")
        await asyncio.sleep(0.05)
        await asyncio.wait_for(follower.ended("a", engine.running("a", True)), 1)
        assert follower._expected == {}  # kept no longer than its waiter needed it
        follower.close()

    asyncio.run(scenario())

    assert engine.asked == []
    assert engine.sinces[0] <= int(time.time()) - exits.REPLAY_SECONDS


def test_a_waiter_the_stream_cannot_vouch_for_asks_the_engine_once_then_listens() -> None:
    """A container started by another process: the engine says it runs, and its end then
    comes on the stream; one the engine says has ended is not waited for."""
    engine = Engine()

    async def scenario() -> None:
        follower = engine.exits()
        await connected(follower, engine)
        await asyncio.wait_for(follower.ended("done", engine.running("done", False)), 1)
        waiting = asyncio.ensure_future(follower.ended("busy", engine.running("busy", True)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        engine.streams[0].die("busy")
        await asyncio.wait_for(waiting, 1)
        follower.close()

    asyncio.run(scenario())

    assert engine.asked == ["done", "busy"]


def test_a_wait_cut_off_while_asking_the_engine_leaves_the_next_one_to_ask_again() -> None:
    """A container that ended before anyone listened, its first wait cut off (its deadline)
    while the engine was being asked: the next wait asks again, rather than listening for
    an end that was never going to be told."""
    engine = Engine()

    async def scenario() -> None:
        follower = engine.exits()
        await connected(follower, engine)
        asking = asyncio.Event()

        async def slow_answer() -> bool:
            asking.set()
            await asyncio.sleep(10)
            return False

        first = asyncio.ensure_future(follower.ended("gone", slow_answer))
        await asyncio.wait_for(asking.wait(), 1)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(follower.ended("gone", engine.running("gone", False)), 1)
        follower.close()

    asyncio.run(scenario())

    assert engine.asked == ["gone"]


def test_a_container_expected_while_the_stream_was_down_is_asked_about() -> None:
    engine = Engine()
    engine.answering.clear()

    async def scenario() -> None:
        follower = engine.exits()
        follower.start()
        follower.expect("a")  # started while the engine's events could not be followed
        engine.answering.set()
        await connected(follower, engine)
        await asyncio.wait_for(follower.ended("a", engine.running("a", False)), 1)
        follower.close()

    asyncio.run(scenario())

    assert engine.asked == ["a"]
    assert engine.away >= 1


def test_a_lost_stream_fails_its_waiters_at_once_and_the_next_wait_asks_the_engine() -> None:
    """The engine restarting cuts the stream: waiters fail as the engine away (and try again);
    the stream is made again, and what ended meanwhile is asked of the engine."""
    engine = Engine()

    async def scenario() -> None:
        follower = engine.exits()
        await connected(follower, engine)
        follower.expect("a")
        waiting = asyncio.ensure_future(follower.ended("a", engine.running("a", True)))
        await asyncio.sleep(0.05)
        engine.streams[0].events.put(Stream.CUT)
        with pytest.raises(BackendUnavailableError, match="following the Docker engine's events: ConnectionResetError"):
            await asyncio.wait_for(waiting, 1)
        await connected(follower, engine, count=2)
        await asyncio.wait_for(follower.ended("a", engine.running("a", False)), 1)
        follower.close()

    asyncio.run(scenario())

    assert engine.asked == ["a"]  # vouched for before the cut; asked after it
    assert engine.away == 1


def test_waiting_while_the_engine_does_not_answer_fails_within_its_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exits, "READY_SECONDS", 0.1)
    engine = Engine()
    engine.answering.clear()

    async def scenario() -> None:
        follower = engine.exits()
        with pytest.raises(BackendUnavailableError, match=r"connection refused \(for 0.1 s\)"):
            await asyncio.wait_for(follower.ended("a", engine.running("a", True)), 2)
        follower.close()

    asyncio.run(scenario())

    assert engine.asked == []


def test_close_ends_the_streams_thread() -> None:
    engine = Engine()

    async def scenario() -> threading.Thread:
        follower = engine.exits()
        await connected(follower, engine)
        assert follower._thread is not None
        follower.close()
        await asyncio.to_thread(follower._thread.join, 2)
        return follower._thread

    assert not asyncio.run(scenario()).is_alive()
