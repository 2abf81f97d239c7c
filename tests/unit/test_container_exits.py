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
from controller.errors import BackendUnavailableError, ForbiddenError


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
        self.refusing = False
        """Answers, but refuses its events (a proxy in front of it that lets only some
        calls through)."""
        self.asked: list[str] = []
        self.waited: list[str] = []
        self.sinces: list[int] = []

    def open(self, since: int) -> Stream:
        if not self.answering.is_set():
            raise BackendUnavailableError("connection refused")
        if self.refusing:
            raise ForbiddenError("following the Docker engine's events: Docker refused it: "
                                 "forbidden")
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

    def wait(self, container_id: str) -> Any:
        async def wait() -> None:
            self.waited.append(container_id)
        return wait


def until_ended(follower: ContainerExits, engine: Engine, container_id: str,
                running: bool) -> Any:
    """Wait for a container's end; the engine says, when asked, that it is ``running``."""
    return follower.ended(container_id, engine.running(container_id, running),
                          engine.wait(container_id))


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
        await asyncio.wait_for(until_ended(follower, engine, "a", True), 1)
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
        await asyncio.wait_for(until_ended(follower, engine, "done", False), 1)
        waiting = asyncio.ensure_future(until_ended(follower, engine, "busy", True))
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

        first = asyncio.ensure_future(follower.ended("gone", slow_answer, engine.wait("gone")))
        await asyncio.wait_for(asking.wait(), 1)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(until_ended(follower, engine, "gone", False), 1)
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
        await asyncio.wait_for(until_ended(follower, engine, "a", False), 1)
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
        waiting = asyncio.ensure_future(until_ended(follower, engine, "a", True))
        await asyncio.sleep(0.05)
        engine.streams[0].events.put(Stream.CUT)
        with pytest.raises(BackendUnavailableError, match="following the Docker engine's events: ConnectionResetError"):
            await asyncio.wait_for(waiting, 1)
        await connected(follower, engine, count=2)
        await asyncio.wait_for(until_ended(follower, engine, "a", False), 1)
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
            await asyncio.wait_for(until_ended(follower, engine, "a", True), 2)
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


def test_an_end_the_stream_never_told_is_found_by_asking_the_engine_now_and_then(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine drops the events of a listener that lags (and a remote engine whose clock
    is behind replays too little): a waiter asks the engine itself every RECHECK_SECONDS."""
    monkeypatch.setattr(exits, "RECHECK_SECONDS", 0.05)
    engine = Engine()
    answers = iter([True, True, False])

    async def running() -> bool:
        engine.asked.append("a")
        return next(answers)

    async def scenario() -> None:
        follower = engine.exits()
        await connected(follower, engine)
        follower.expect("a")  # vouched for: its end would be told, but never is
        await asyncio.wait_for(follower.ended("a", running, engine.wait("a")), 1)
        assert follower._expected == {}
        follower.close()

    asyncio.run(scenario())

    assert engine.asked == ["a", "a", "a"]
    assert engine.waited == []


def test_an_engine_that_refuses_its_events_is_waited_on_call_by_call_until_it_lets_them_by(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy in front of the engine's socket that lets only some calls through: each agent
    is waited for on a call of its own, as without the stream, and the stream is asked for
    again later. A refusal is not the engine away."""
    monkeypatch.setattr(exits, "REFUSED_SECONDS", 0.1)
    engine = Engine()
    engine.refusing = True

    async def scenario() -> None:
        follower = engine.exits()
        follower.expect("a")
        await asyncio.wait_for(until_ended(follower, engine, "a", True), 1)
        assert engine.waited == ["a"] and engine.streams == []
        assert follower._expected == {}
        engine.refusing = False
        await connected(follower, engine)
        follower.expect("b")
        waiting = asyncio.ensure_future(until_ended(follower, engine, "b", True))
        await asyncio.sleep(0.05)
        engine.streams[0].die("b")
        await asyncio.wait_for(waiting, 1)
        follower.close()

    asyncio.run(scenario())

    assert engine.waited == ["a"]
    assert engine.asked == []
    assert engine.away == 0
