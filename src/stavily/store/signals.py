"""In-process wake-ups: a commit that queues work wakes the long polls waiting for it."""

from __future__ import annotations

import asyncio
import contextlib


class WorkSignal:
    """Every waiter holding the current event is woken by one `notify`.

    A poller takes `current()` *before* it looks for work, so work queued between
    its look and its wait still wakes it.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    @staticmethod
    async def wait(event: asyncio.Event, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return event.is_set()
