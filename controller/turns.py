"""Turns at something of which only a few may be had at once (status writers, calls to the
Docker engine), taken by urgency."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

URGENT = 0
"""The urgency of what finishes work in flight: it may take the reserved turns."""


class Turns:
    """At most ``size`` holders at once; those waiting are let in by urgency (lowest first),
    then in the order they came: under load, what finishes work in flight (a run's final
    status, an ended agent's outcome) does not queue behind what begins new work. And
    ``reserved`` of the turns are only for the urgent (``URGENT``): however long the others
    hold theirs (creating containers on a busy engine), an urgent one is let in at once."""

    def __init__(self, size: int, reserved: int = 0) -> None:
        self._free = size
        self._reserved = min(reserved, size - 1)
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def _may(self, urgency: int) -> bool:
        """Whether one of this urgency may take a free turn now."""
        return self._free > (0 if urgency <= URGENT else self._reserved)

    @asynccontextmanager
    async def turn(self, urgency: int) -> AsyncIterator[None]:
        if self._may(urgency) and (not self._waiting or self._waiting[0][0] > urgency):
            self._free -= 1
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (urgency, next(self._order), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._give_back()  # let in just as it was cancelled: the next one's turn
                raise
        try:
            yield
        finally:
            self._give_back()

    def _give_back(self) -> None:
        """A turn is free again: let in whoever waits and may take it."""
        self._free += 1
        while self._waiting:
            urgency, _, granted = self._waiting[0]
            if granted.done():  # (one cancelled while waiting is passed over)
                heapq.heappop(self._waiting)
                continue
            if not self._may(urgency):
                return  # the most urgent waiting may not take the reserve: none may
            heapq.heappop(self._waiting)
            self._free -= 1
            granted.set_result(None)
