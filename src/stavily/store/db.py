"""The database handle: one async engine, read connections and serialized write transactions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from stavily.store.inline_sqlite import inline_creator


class Database:
    """SQLite (WAL, one writer at a time in this process) or PostgreSQL, same code."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # Keep connections (each is a thread with its pragmas) instead of reopening them.
            kwargs.update(connect_args={"timeout": 30}, pool_size=10, max_overflow=20)
        else:
            kwargs.update(pool_size=20, max_overflow=20)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        # Writes: the same engine on PostgreSQL; on SQLite one connection that runs its
        # statements on the loop's thread (see inline_sqlite: writes are serialized here).
        self.write_engine = self.engine
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            if parsed.database and parsed.database != ":memory:":
                self.write_engine = create_async_engine(
                    url,
                    async_creator=inline_creator(parsed.database, timeout=30),
                    pool_size=1,
                    max_overflow=0,
                )
                event.listen(self.write_engine.sync_engine, "connect", _sqlite_pragmas)
        # SQLite has one writer; queueing writers here avoids "database is locked" churn.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is None:
            async with self.write_engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.write_engine.begin() as conn:
            yield conn

    def for_update(self, stmt: Any, *, skip_locked: bool = False) -> Any:
        """Row locks where the database has them; SQLite's single writer needs none."""
        if self.is_sqlite:
            return stmt
        return stmt.with_for_update(skip_locked=skip_locked)

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.write_engine is not self.engine:
            await self.write_engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
