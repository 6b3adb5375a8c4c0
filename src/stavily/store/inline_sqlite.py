"""An aiosqlite connection whose statements run on the event loop's own thread.

aiosqlite hands every call (execute, fetch, commit) to a thread of its own and waits for
the answer: two thread switches and a loop wake-up per call, which cost more than the
statement itself when it touches a few rows of a local file. The write transactions of
the engine are many such small statements, one transaction at a time (SQLite has one
writer), so there every hop lengthens the one queue that all writes wait in.

This connection keeps aiosqlite's interface, which SQLAlchemy's aiosqlite dialect
drives, and runs each call at once instead. It is only for the write connection: the
process already serializes its writers, so no statement waits on a lock held inside this
process, and in WAL mode readers never block a writer. Reads keep the threaded
connections, so a long read never holds up the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

import aiosqlite


class _RunNow:
    """Stands in for the queue to aiosqlite's thread (SQLAlchemy puts calls on it too)."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:  # handed to the waiter, as aiosqlite's thread does
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        if future is not None and not future.done():
            future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _RunNow()  # type: ignore[assignment]

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._connect().__await__()  # no thread to start


def inline_creator(path: str, timeout: float) -> Callable[[], Any]:
    """An `async_creator` for SQLAlchemy's create_async_engine."""

    async def connect() -> InlineConnection:
        connector = partial(sqlite3.connect, path, timeout=timeout, check_same_thread=False)
        return await InlineConnection(connector)

    return connect
