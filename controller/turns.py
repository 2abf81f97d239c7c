"""Turns at something of which only a few may be had at once (status writers, calls to the
Docker engine), taken by urgency."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Turns:
    """At most ``size`` holders at once; those waiting are let in by urgency (lowest first),
    then in the order they came: under load, what finishes work in flight (a run's final
    status, an ended agent's outcome) does not queue behind what begins new work."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @asynccontextmanager
    async def turn(self, urgency: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (urgency, next(self._order), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._pass_on()  # let in just as it was cancelled: the next one's turn
                raise
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        while self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():  # (one cancelled while waiting is passed over)
                granted.set_result(None)
                return
        self._free += 1
