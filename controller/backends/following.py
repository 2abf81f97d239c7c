"""What the threads that follow an engine or the API server for waiters on an event loop
share: their way to that loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class LoopFollower:
    """Hands what a thread of its own reads to the event loop of those who wait for it."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _listening(self) -> bool:
        """Whether the event loop of the waiters is still there (when it is gone, so are
        they, and the thread ends)."""
        return self._loop is not None and not self._loop.is_closed()

    def _post(self, function: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(function, *args)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody waits any more
