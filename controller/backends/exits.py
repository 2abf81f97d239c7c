"""The ends of agents' containers as one stream of the Docker engine's events tells them,
shared by every waiter of the process (as :mod:`controller.backends.podwatch` does for pods):
a running agent holds no thread and no call to the engine, however long it runs and however
many run, so that starting, stopping and reading other agents never waits behind it.

A container is expected just before it starts: its end, told by the stream's connection of
that moment, is kept until its waiter comes. A waiter the stream cannot vouch for (a container
started by another process, or while the stream was down, or before a connection since lost)
asks the engine once whether it still runs, after it has begun to listen. Each connection asks
for the events of the second before it too (the engine replays them), as the engine answers
before it subscribes. A lost connection fails its waiters at once as the engine away (they try
again, as after any call that failed, and ask the engine), and is made again after a pause
that grows while the engine does not answer.

An end the stream never tells (the engine drops the events of a listener that lags behind; a
remote engine whose clock is behind ours replays too little) is found still: a waiter asks the
engine itself every RECHECK_SECONDS. An engine that refuses its events outright (a proxy in
front of its socket that lets only some calls through) is waited on one blocking call per
container instead, as without the stream, and the stream is asked for again now and then."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.backends.following import LoopFollower
from controller.errors import AgentainerError, BackendUnavailableError

logger = logging.getLogger(__name__)

READY_SECONDS = 5.0
"""How long a waiter waits for the stream to be connected before it fails as the engine away
(the engine's retries of a failed call then pause and ask again)."""
REPLAY_SECONDS = 1
"""How far back each connection asks the engine to begin: the events it sent while it
subscribed the connection."""
BACKOFF_SECONDS = (0.0, 0.5, 1.0, 2.0, 5.0)
"""Pauses between attempts to connect again while the engine does not answer."""
QUICK_SECONDS = 1.0
"""A connection that ended sooner than this is made again only this long after it began."""
RECHECK_SECONDS = 60.0
"""How long a waiter listens before it asks the engine itself whether its container still
runs (and again each time as long): the resync of an informer, for ends the stream missed."""
REFUSED_SECONDS = 60.0
"""How long the stream, once refused, is not asked for again."""
ENDS = ("die", "destroy")
"""The events that end a container (or the container itself)."""
FOLLOWING = "following the Docker engine's events"


class EventStream(Protocol):
    """The engine's events, one decoded event at a time; ``close`` (from any thread) ends the
    iteration."""

    def __iter__(self) -> Iterator[Mapping[str, Any]]: ...

    def close(self) -> None: ...


OpenStream = Callable[[int], EventStream]
"""Connect to the engine's container events from a unix time on: the stream, once the engine
has answered (raises the project's error when it does not: a retryable one while it is away,
another when it refuses)."""


@dataclass(slots=True)
class _Expected:
    connection: int
    """The connection that tells the container's end (0: none yet: the stream was down, or
    the engine has not said yet that the container still ran)."""
    ended: bool = False
    waiters: set[asyncio.Future[None]] = field(default_factory=set)


class ContainerExits(LoopFollower):
    """Waits for containers to end, on one connection to the engine's events at a time."""

    def __init__(self, open_stream: OpenStream, lost: Callable[[], None]) -> None:
        """``lost``: called (in the stream's thread) each time the stream is found broken or
        cannot be made: the engine was away meanwhile."""
        self._open = open_stream
        self._on_lost = lost
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}
        self._connection = 0
        """Connections made so far: the current one while connected."""
        self._connected = False
        self._why = f"{FOLLOWING}: not connected yet"
        self._refused = False
        """The engine refuses its events: waiters wait on a call of their own."""
        self._stream: EventStream | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._news: asyncio.Event | None = None
        """Set on the loop each time the stream connects or is lost."""
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Connect, in a thread of its own (once), for the waiters of the running loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # the thread posts to the loop of the latest waiters
            self._loop, self._news = loop, asyncio.Event()
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()

    def expect(self, container_id: str) -> None:
        """Note a container about to start (before its start call, from any thread): the
        current connection tells its end, kept until its waiter comes."""
        with self._lock:
            self._expected[container_id] = _Expected(self._connection if self._connected
                                                     else 0)

    def forget(self, container_id: str) -> None:
        """The container is being removed: nothing of it is kept any more."""
        with self._lock:
            self._expected.pop(container_id, None)

    async def ended(self, container_id: str, running: Callable[[], Awaitable[bool]],
                    waited: Callable[[], Awaitable[None]]) -> None:
        """Return once the container has ended (or is gone). ``running`` asks the engine
        whether it still runs: when the stream cannot vouch for having seen the container's
        end, and every RECHECK_SECONDS of waiting. ``waited`` waits for its end on a call of
        its own, for when the engine refuses its events. Fails as the engine away when the
        stream is lost meanwhile, or not connected within READY_SECONDS."""
        await self._ready()
        with self._lock:
            if refused := self._refused:
                self._expected.pop(container_id, None)
        if refused:
            return await waited()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            if not self._connected:
                raise BackendUnavailableError(self._why)
            connection = self._connection
            expected = self._expected.get(container_id)
            vouched = expected is not None and expected.connection == connection
            if expected is None or not vouched:
                # Its end is caught from now on, but vouched for only once the engine has
                # said it still ran: a wait cut off before that leaves the next one to ask.
                expected = self._expected[container_id] = _Expected(0)
            elif expected.ended:
                self._expected.pop(container_id)
                return
            expected.waiters.add(future)
        told = False
        try:
            if not vouched:
                if not await running():
                    told = True
                    return
                with self._lock:
                    expected.connection = connection
            while True:
                try:
                    async with asyncio.timeout(RECHECK_SECONDS):
                        await asyncio.shield(future)
                    break
                except TimeoutError:
                    if not await running():
                        logger.info("%s: container %s ended untold", FOLLOWING, container_id)
                        break
            told = True
        finally:
            if future.done() and not future.cancelled():
                future.exception()  # a loss told while the engine was asked: it said ended
            with self._lock:
                expected.waiters.discard(future)
                if told and not expected.waiters and \
                        self._expected.get(container_id) is expected:
                    del self._expected[container_id]  # kept no longer than its waiter needs

    async def _ready(self) -> None:
        self.start()
        assert self._loop is not None and self._news is not None
        deadline = self._loop.time() + READY_SECONDS
        while True:
            self._news.clear()
            with self._lock:
                if self._connected or self._refused:
                    return
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise BackendUnavailableError(f"{self._why} (for {READY_SECONDS:g} s)")
            try:
                async with asyncio.timeout(remaining):
                    await self._news.wait()
            except TimeoutError:
                pass

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()

    # --- the stream's thread ------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set() and self._listening():
            began = time.monotonic()
            try:
                stream = self._open(int(time.time()) - REPLAY_SECONDS)
            except Exception as error:  # noqa: BLE001 - the engine away: again after a pause
                if isinstance(error, AgentainerError) and not error.retryable:
                    self._refuse(error)  # refused, not away: waiters wait call by call
                    self._stopping.wait(REFUSED_SECONDS)
                    continue
                self._lost(error)
                self._stopping.wait(BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)])
                failures += 1
                continue
            failures = 0
            with self._lock:
                self._stream = stream
                self._connection += 1
                self._connected = True
                self._refused = False
            self._post(self._tell_news)
            if self._stopping.is_set():  # closed as it connected: close() missed the stream
                stream.close()
            why: BaseException | str = f"{FOLLOWING}: the engine ended them"
            try:
                for event in stream:
                    if event.get("Action", event.get("status")) in ENDS:
                        self._end(str((event.get("Actor") or {}).get("ID") or event.get("id")))
            except Exception as error:  # noqa: BLE001 - whatever broke it: connect again
                why = error
            if not self._stopping.is_set():
                self._lost(why)
                self._stopping.wait(max(0.0, began + QUICK_SECONDS - time.monotonic()))

    def _end(self, container_id: str) -> None:
        with self._lock:
            expected = self._expected.get(container_id)
            if expected is None:
                return
            expected.ended = True
            waiters = list(expected.waiters)
        for future in waiters:
            self._post(_settle, future, None)

    def _lost(self, why: BaseException | str) -> None:
        with self._lock:
            self._connected = False
            self._stream = None
            self._why = str(why) if isinstance(why, (str, AgentainerError)) else \
                f"{FOLLOWING}: {why!r}"
            waiters = [f for expected in self._expected.values() for f in expected.waiters]
        self._on_lost()
        logger.warning("%s; connecting again", self._why)
        for future in waiters:
            self._post(_settle, future, BackendUnavailableError(self._why))
        self._post(self._tell_news)

    def _refuse(self, error: AgentainerError) -> None:
        with self._lock:
            first = not self._refused
            self._refused = True
            self._why = str(error)
        if first:
            logger.warning("%s; waiting for each agent on a call of its own (holding one of "
                           "the engine's call slots while it runs) until it lets them through",
                           self._why)
        self._post(self._tell_news)

    def _tell_news(self) -> None:
        if self._news is not None:
            self._news.set()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
