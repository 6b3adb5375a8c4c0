"""The database handle: one async engine, read connections and serialized write transactions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from stavily.store import prebuilt

YIELD_EVERY = 16  # statements of one SQLite write block between turns of the event loop


class InlineConnection:
    """The calls our code makes on an AsyncConnection, run at once on a sync one.

    SQLite writes go through this. With aiosqlite every statement is handed to a thread
    and its answer awaited, and SQLAlchemy's async layer adds a greenlet per call: about
    three times the cost of running a small statement on a local file. Statements marked
    `prebuilt` skip SQLAlchemy's execution machinery too (see store.prebuilt). Writes are
    serialized in this process anyway (SQLite has one writer), so nothing is gained by
    waiting elsewhere meanwhile; in WAL mode readers never block the writer. Reads keep
    the threaded connections, so a long read never holds up the event loop. (Another
    process writing the same file, which only `stavily db upgrade` does, would make the
    loop wait for its lock: SQLite is for one server process; replicas need PostgreSQL.)
    """

    def __init__(self, connection: Connection) -> None:
        self.sync_connection = connection
        self.dialect = connection.dialect
        self._statements = 0

    async def _turn(self) -> None:
        """Every YIELD_EVERY statements of one block, let the event loop run: a block of
        thousands (a big execution started, or wound down) would otherwise hold it for
        their whole time. Other writers wait on the write lock meanwhile, readers read."""
        self._statements += 1
        if self._statements % YIELD_EVERY == 0:
            await asyncio.sleep(0)

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        await self._turn()
        if prebuilt.is_prebuilt(statement) and prebuilt.uniform(parameters):
            return prebuilt.run(self.sync_connection, statement, parameters)
        return self.sync_connection.execute(statement, parameters)

    async def scalar(self, statement: Any, parameters: Any = None) -> Any:
        await self._turn()
        if prebuilt.is_prebuilt(statement):
            return prebuilt.run(self.sync_connection, statement, parameters).scalar()
        return self.sync_connection.scalar(statement, parameters)

    async def run_sync(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.sync_connection, *args, **kwargs)

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        with self.sync_connection.begin_nested():
            yield


# Writes sent in one statement at most: a statement's parameters are limited (32,767 on
# asyncpg) and each shape is prepared once per connection, so a fan-out of thousands of
# items goes in several.
LATER_AT_MOST = 64


class DriverConnection:
    """An AsyncConnection (PostgreSQL) whose prebuilt statements run on asyncpg itself,
    in the transaction SQLAlchemy began (see store.prebuilt); everything else, and every
    statement if the adapter is not the one that module knows, goes through SQLAlchemy.

    Writes given to `write_later` wait, and go in one round trip with the next statement
    that needs the database: together with it, as one statement, if it is a prebuilt one
    that touches none of their tables (so it cannot tell the difference), else just
    before it; and at the latest before the transaction commits. A write to a row that
    one of them already changes sends them first (one statement cannot change a row
    twice), and so does the write past LATER_AT_MOST."""

    def __init__(self, connection: AsyncConnection, adapted: Any = None) -> None:
        self._connection = connection
        self._adapted: Any = adapted
        self._later: list[prebuilt.Deferred] = []
        self._later_rows: set[tuple[str, Any]] = set()

    def __getattr__(self, name: str) -> Any:  # dialect, get_raw_connection...
        return getattr(self._connection, name)

    async def _adapter(self) -> Any:
        if self._adapted is None:
            raw = await self._connection.get_raw_connection()
            self._adapted = prebuilt.asyncpg_adapter(raw) or False
        return self._adapted

    async def _fast(self, statement: Any, parameters: Any) -> Any:
        dialect = self._connection.dialect
        if not (
            prebuilt.is_prebuilt(statement)
            and prebuilt.uniform(parameters)
            and not prebuilt.has_expanding(statement, dialect, parameters)
        ):
            return None
        if not await self._adapter():
            return None
        if self._later:
            written = frozenset().union(*(w.plan.tables for w in self._later))
            beside = prebuilt.may_run_beside(statement, dialect, parameters, written)
            if beside is not None:
                writes = self._take_later()
                arguments = beside.positional(parameters)
                return await prebuilt.run_deferred(self._adapted, writes, beside, arguments)
            await self.flush()
        return await prebuilt.run_asyncpg(self._adapted, dialect, statement, parameters)

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        result = await self._fast(statement, parameters)
        if result is None:
            await self.flush()
            result = await self._connection.execute(statement, parameters)
        return result

    async def scalar(self, statement: Any, parameters: Any = None) -> Any:
        return (await self.execute(statement, parameters)).scalar()

    async def write_later(
        self,
        statement: Any,
        parameters: Any,
        expect: int | None = None,
        failure: Exception | None = None,
    ) -> None:
        """See `write_later` below. A prebuilt UPDATE by `row_id` or INSERT (each row, of a
        list) waits; anything else runs now."""
        batch = parameters if isinstance(parameters, list) else [parameters]
        table = statement.table.name if isinstance(statement, sa.Update | sa.Insert) else None
        key = "row_id" if isinstance(statement, sa.Update) else "id"
        plan = None
        if table is not None and await self._adapter():
            plan = prebuilt.deferrable(statement, self._connection.dialect, batch[0])
        if plan is None or (key == "row_id" and any(key not in p for p in batch)):
            result = await self.execute(statement, parameters)
            prebuilt.check_count(result.rowcount, expect, failure)
            return
        for params in batch:
            row = (table, params.get(key))
            if row in self._later_rows or len(self._later) >= LATER_AT_MOST:
                await self.flush()
            self._later.append(prebuilt.Deferred(plan, plan.positional(params), expect, failure))
            if row[1] is not None:
                self._later_rows.add(row)

    def _take_later(self) -> list[prebuilt.Deferred]:
        writes, self._later = self._later, []
        self._later_rows.clear()
        return writes

    async def flush(self) -> None:
        """Send the writes that wait."""
        if self._later:
            await prebuilt.run_deferred(self._adapted, self._take_later())

    async def run_sync(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        await self.flush()
        return await self._connection.run_sync(fn, *args, **kwargs)

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[Any]:
        await self.flush()
        try:
            async with self._connection.begin_nested() as savepoint:
                yield savepoint
                await self.flush()
        except BaseException:
            self._take_later()  # deferred inside the savepoint: rolled back with it
            raise


async def write_later(
    conn: AsyncConnection,
    statement: Any,
    parameters: Any,
    expect: int | None = None,
    failure: Exception | None = None,
) -> None:
    """A write whose result the caller does not read: on PostgreSQL it may wait and go
    with the transaction's next statement (see DriverConnection); elsewhere it runs now.
    If it does not change `expect` rows (per row of parameters given as a list: then on
    PostgreSQL only), `failure` is raised, now or when it is sent: either way before the
    transaction commits."""
    later = getattr(conn, "write_later", None)
    if later is not None:
        await later(statement, parameters, expect, failure)
    else:
        result = await conn.execute(statement, parameters)
        prebuilt.check_count(result.rowcount, expect, failure)


class _Kept(NamedTuple):
    connection: AsyncConnection
    adapted: Any  # SQLAlchemy's asyncpg adapter under it (see prebuilt.asyncpg_adapter)


class _Batch:
    def __init__(self, transaction: Any, cursor: Any) -> None:
        self.transaction = transaction
        self.cursor = cursor
        self.committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Database:
    """SQLite (WAL, one writer at a time in this process) or PostgreSQL, same code."""

    def __init__(self, url: str, pool_size: int = 20) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        kwargs: dict[str, Any] = {"json_serializer": dumps, "json_deserializer": loads}
        on_disk = self.is_sqlite and parsed.database not in (None, "", ":memory:")
        if on_disk:
            Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
        if self.is_sqlite:
            # Keep connections (each is a thread with its pragmas) instead of reopening them.
            kwargs.update(connect_args={"timeout": 30}, pool_size=10, max_overflow=20)
        else:
            kwargs.update(pool_size=pool_size, max_overflow=0)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        # the same pool, its connections without transactions while checked out here
        self._autocommit = (
            None if self.is_sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        # PostgreSQL: half the pool is kept out of it for write() and single_statements()
        # (see _driver); the rest serves reads. With none (a pool of 1), or an adapter
        # prebuilt does not know (_kept_usable False), each use checks one out of the pool.
        self._kept_limit = 0 if self.is_sqlite else pool_size // 2
        self._kept_slots = asyncio.Semaphore(max(1, self._kept_limit))
        self._kept_idle: list[_Kept] = []
        self._kept_usable: bool | None = None
        self._sync_writer: Engine | None = None
        self._writer: Connection | None = None  # kept open: no pool checkout and reset
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        if on_disk:
            self._sync_writer = create_engine(
                parsed.set(drivername="sqlite+pysqlite"),
                connect_args={"timeout": 30, "check_same_thread": False},
                pool_size=1,
                max_overflow=0,
                json_serializer=dumps,
                json_deserializer=loads,
            )
            event.listen(self._sync_writer, "connect", _sqlite_pragmas)
        # SQLite has one writer; queueing writers here avoids "database is locked" churn.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._batch: _Batch | None = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def read_latest(self) -> AsyncIterator[AsyncConnection]:
        """A read that sees what another request wrote a moment ago, for the row an
        IntegrityError says exists. On SQLite that write may sit in a group commit not
        yet committed, which only the writer's connection sees (and leaving it waits for
        that commit); elsewhere a plain read sees it."""
        if self._sync_writer is None:
            async with self.read() as conn:
                yield conn
            return
        async with self.write() as conn:
            yield conn

    @asynccontextmanager
    async def single_statements(self) -> AsyncIterator[AsyncConnection]:
        """For work done in statements that each stand alone. PostgreSQL: each statement
        commits on its own, with no BEGIN and COMMIT round trips; SQLite: write()."""
        if self._autocommit is None:
            async with self.write() as conn:
                yield conn
            return
        async with self._driver(autocommit=True) as conn:
            yield conn  # type: ignore[misc]

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is None:
            async with self._driver(autocommit=False) as conn:
                yield conn  # type: ignore[misc]
            return
        if self._sync_writer is None:
            async with self._write_lock, self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock:
            batch = self._batch or self._open_batch()
            cursor = batch.cursor
            cursor.execute("SAVEPOINT stavily_write")
            try:
                yield InlineConnection(self._writer)  # type: ignore[misc, arg-type]
            except BaseException as exc:
                try:
                    cursor.execute("ROLLBACK TO stavily_write")
                    cursor.execute("RELEASE stavily_write")
                except Exception:  # the transaction itself is gone: so is the batch
                    self._fail_batch(batch, exc)
                raise
            try:
                cursor.execute("RELEASE stavily_write")
            except Exception as exc:  # not kept, so nobody in the batch may be told it is
                self._fail_batch(batch, exc)
                raise
        await asyncio.shield(batch.committed)

    @asynccontextmanager
    async def _driver(self, autocommit: bool) -> AsyncIterator[DriverConnection]:
        """PostgreSQL: a connection in a transaction (committed at the end, rolled back on
        an error), or with autocommit. Half the pool is kept checked out between uses:
        checking a connection out and back in costs SQLAlchemy about as much CPU as the
        statement it runs (a new Connection, its events, the reset on return), 0.25 ms a
        request on these machines. On a kept connection the transaction is begun and
        ended on the driver (see _end); one that saw an error it may not have survived
        (cancelled mid-statement, broken) goes back to the pool, which decides."""
        if self._kept_limit and self._kept_usable is not False:
            async with self._kept_slots:
                kept = await self._take_kept()
                if kept is not None:
                    kept.adapted.autocommit = autocommit
                    driver = DriverConnection(kept.connection, kept.adapted)
                    try:
                        yield driver
                        await driver.flush()
                    except BaseException as exc:
                        kept.adapted.autocommit = False
                        with contextlib.suppress(Exception):  # then _reusable() is False
                            await _end(kept, commit=False)
                        await self._give_back(kept, isinstance(exc, Exception))
                        raise
                    kept.adapted.autocommit = False
                    try:
                        await _end(kept, commit=True)
                    finally:
                        await self._give_back(kept, True)
                    return
        pooled = self._autocommit if autocommit else self.engine
        async with pooled.connect() if autocommit else pooled.begin() as conn:
            driver = DriverConnection(conn)
            yield driver
            await driver.flush()

    async def _take_kept(self) -> _Kept | None:
        while self._kept_idle:
            kept = self._kept_idle.pop()
            if not kept.adapted._connection.is_closed():
                return kept
            await self._give_back(kept, False)  # the server ended it meanwhile
        return await self._keep_one()

    async def _keep_one(self) -> _Kept | None:
        connection = await self.engine.connect()
        try:
            adapted = prebuilt.asyncpg_adapter(await connection.get_raw_connection())
        except BaseException:
            await connection.close()
            raise
        if adapted is None:  # an adapter prebuilt does not know: the pool's way from now
            self._kept_usable = False
            await connection.close()
            return None
        self._kept_usable = True
        return _Kept(connection, adapted)

    async def _give_back(self, kept: _Kept, survived: bool) -> None:
        if survived and _reusable(kept):
            self._kept_idle.append(kept)
            return
        with contextlib.suppress(Exception):
            await kept.connection.invalidate()
        with contextlib.suppress(Exception):
            await kept.connection.close()

    def _open_batch(self) -> _Batch:
        """A transaction the writers of this moment share, committed once (group commit).

        Each writer's block runs in a savepoint of it (a failing block is rolled back
        alone) and returns only once the whole batch has committed: nothing is
        acknowledged before it is durable, and a failed commit fails every writer in it.
        The commit runs as soon as the writers already waiting for the lock are done,
        so a batch is the writes of one turn of the event loop: one COMMIT, and one
        write of each page they share, instead of one per request.
        """
        if self._writer is None or self._writer.invalidated:
            self._writer = self._sync_writer.connect()  # type: ignore[union-attr]
        transaction = self._writer.begin()
        driver = self._writer.connection.driver_connection
        cursor = driver.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except BaseException:
            cursor.close()
            transaction.rollback()
            raise
        batch = self._batch = _Batch(transaction, cursor)
        asyncio.get_running_loop().create_task(self._commit(batch))
        return batch

    async def _commit(self, batch: _Batch) -> None:
        async with self._write_lock:  # type: ignore[union-attr]
            if batch.committed.done():
                return  # failed and rolled back already
            self._batch = None
            batch.cursor.close()
            try:
                batch.transaction.commit()
            except BaseException as exc:
                self._fail_batch(batch, exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                batch.committed.set_result(None)

    def _fail_batch(self, batch: _Batch, exc: BaseException) -> None:
        if self._batch is batch:
            self._batch = None
        with contextlib.suppress(Exception):
            batch.cursor.close()
        with contextlib.suppress(Exception):
            batch.transaction.rollback()
        with contextlib.suppress(Exception):
            # SQLite keeps a transaction whose COMMIT failed (a deferred constraint, say)
            # open; SQLAlchemy's transaction is over by then and rolls back nothing.
            batch.cursor.connection.rollback()
        if not batch.committed.done():
            batch.committed.set_exception(exc)
            batch.committed.exception()  # retrieved: writers that raised themselves skip it

    def for_update(self, stmt: Any, *, skip_locked: bool = False) -> Any:
        """Row locks where the database has them; SQLite's single writer needs none."""
        if self.is_sqlite:
            return stmt
        return stmt.with_for_update(skip_locked=skip_locked)

    async def dispose(self) -> None:
        if self._batch is not None:
            await self._commit(self._batch)
        while self._kept_idle:
            await self._kept_idle.pop().connection.close()
        await self.engine.dispose()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sync_writer is not None:
            self._sync_writer.dispose()


async def _end(kept: _Kept, commit: bool) -> None:
    """End the transaction on a kept connection: SQLAlchemy's, if a statement it ran began
    one (it ends the driver's with it), else the one prebuilt statements began on the
    driver (prebuilt._in_transaction), if any."""
    connection, adapted = kept
    try:
        if connection.in_transaction():
            await (connection.commit() if commit else connection.rollback())
        transaction = adapted._transaction
        if transaction is not None:
            adapted._transaction = None
            await (transaction.commit() if commit else transaction.rollback())
    except BaseException:
        with contextlib.suppress(Exception):  # so that it is not kept (see _reusable)
            await connection.invalidate()
        raise


def _reusable(kept: _Kept) -> bool:
    connection, adapted = kept
    return not (
        connection.invalidated
        or connection.in_transaction()
        or adapted._transaction is not None
        or adapted._connection.is_closed()
    )


def dumps(value: Any) -> str:
    """JSON columns are written by orjson (several times faster than the standard
    library); what it cannot write (integers past 64 bits, lone surrogates, nesting past
    its limit) the standard library writes as valid JSON."""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value)


def loads(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
