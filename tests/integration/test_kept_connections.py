"""PostgreSQL: write() and single_statements() run on connections kept out of the pool
between uses (db.Database._driver). They must behave exactly as a connection checked
out of the pool would: one transaction per write(), committed at the end, rolled back
on an error, each statement of single_statements() committed on its own, and a
connection that may not have survived an error never used again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa

from stavily.store.db import Database
from stavily.store.prebuilt import prebuilt
from tests.harness import PG_ONLY

pytestmark = PG_ONLY

metadata = sa.MetaData()
parent = sa.Table("parent", metadata, sa.Column("id", sa.Integer, primary_key=True))
item = sa.Table(
    "item",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("parent_id", sa.Integer),
)
# run on asyncpg itself, in the transaction the connection's driver began (store.prebuilt)
ADD_ITEM = prebuilt(item.insert())
BACKEND = sa.text("SELECT pg_backend_pid()")
SCHEMA = (
    "CREATE TABLE parent (id integer PRIMARY KEY)",
    "CREATE TABLE item (id integer PRIMARY KEY, parent_id integer"
    " REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
    "INSERT INTO parent VALUES (1)",
)


def on_database(
    url: str, scenario: Callable[[Database], Awaitable[None]], pool_size: int = 4
) -> None:
    async def main() -> None:
        db = Database(url, pool_size=pool_size)
        try:
            async with db.engine.begin() as conn:
                for statement in SCHEMA:
                    await conn.execute(sa.text(statement))
            await asyncio.wait_for(scenario(db), 30)  # a connection stuck: a failure
        finally:
            await db.dispose()

    asyncio.run(main())


async def items(db: Database) -> list[int]:
    """What another connection sees: only what was committed."""
    async with db.read() as conn:
        return list((await conn.scalars(sa.select(item.c.id).order_by(item.c.id))).all())


async def state_of(db: Database, pid: int) -> str:
    async with db.read() as conn:
        query = sa.text("SELECT state FROM pg_stat_activity WHERE pid = :pid")
        return str(await conn.scalar(query, {"pid": pid}))


async def backends(db: Database) -> int:
    async with db.read() as conn:
        query = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend'"
        )
        return int(await conn.scalar(query))


def test_writes_reuse_kept_connections_and_leave_the_rest_of_the_pool_to_reads(
    pg_url: str,
) -> None:
    async def scenario(db: Database) -> None:
        pids = set()
        for i in range(20):
            async with db.write() as conn:
                pids.add(await conn.scalar(BACKEND))
                await conn.execute(ADD_ITEM, {"id": i, "parent_id": 1})
        assert len(pids) == 1  # one writer at a time: always the same connection
        assert await items(db) == list(range(20))

        # a pool of 4 keeps 2 for writes: a third writer waits, reads do not
        inside = asyncio.Event()
        leave = asyncio.Event()
        held: list[int] = []

        async def hold() -> None:
            async with db.write() as conn:
                held.append(await conn.scalar(BACKEND))
                if len(held) == 2:
                    inside.set()
                await leave.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.wait_for(inside.wait(), 5)
        third = asyncio.create_task(hold())
        await asyncio.sleep(0.2)
        assert len(held) == 2 and not third.done()
        assert await asyncio.wait_for(items(db), 5) == list(range(20))
        leave.set()
        await asyncio.wait_for(asyncio.gather(*holders, third), 5)
        assert len(set(held)) == 2 and held[2] in held[:2]
        assert await backends(db) <= 4

    on_database(pg_url, scenario)


def test_a_write_that_fails_is_rolled_back_and_its_connection_kept_clean(pg_url: str) -> None:
    async def scenario(db: Database) -> None:
        with pytest.raises(ValueError, match="refused"):
            async with db.write() as conn:
                pid = await conn.scalar(BACKEND)
                await conn.execute(ADD_ITEM, {"id": 1, "parent_id": 1})  # on the driver
                await conn.execute(sa.text("INSERT INTO item VALUES (2, 1)"))  # SQLAlchemy
                raise ValueError("refused")
        assert await items(db) == []
        assert await state_of(db, pid) == "idle"  # no transaction left open

        async with db.write() as conn:
            assert await conn.scalar(BACKEND) == pid  # kept
            await conn.execute(ADD_ITEM, {"id": 3, "parent_id": 1})
            await conn.execute(sa.text("INSERT INTO item VALUES (4, 1)"))
        assert await items(db) == [3, 4]
        assert await state_of(db, pid) == "idle"

        # a statement that fails: the transaction is rolled back, the connection kept
        with pytest.raises(Exception, match="duplicate key"):
            async with db.write() as conn:
                await conn.execute(ADD_ITEM, {"id": 5, "parent_id": 1})
                await conn.execute(ADD_ITEM, {"id": 3, "parent_id": 1})
        async with db.write() as conn:
            assert await conn.scalar(BACKEND) == pid
            await conn.execute(ADD_ITEM, {"id": 6, "parent_id": 1})
        assert await items(db) == [3, 4, 6]

    on_database(pg_url, scenario)


@pytest.mark.parametrize("through", ["driver", "sqlalchemy"])
def test_a_commit_that_fails_is_raised_and_nothing_is_kept(pg_url: str, through: str) -> None:
    """The deferred foreign key is checked at COMMIT: the caller learns the commit
    failed, nothing is left open, and the next write works (a connection whose COMMIT
    failed is not kept: the pool decides about it)."""

    async def scenario(db: Database) -> None:
        async def orphan(conn: Any) -> None:
            if through == "driver":
                await conn.execute(ADD_ITEM, {"id": 1, "parent_id": 99})
            else:
                await conn.execute(sa.text("INSERT INTO item VALUES (1, 99)"))

        with pytest.raises(Exception, match="foreign key"):
            async with db.write() as conn:
                pid = await conn.scalar(BACKEND)
                await orphan(conn)
        assert await items(db) == []
        assert await state_of(db, pid) in ("idle", "None")  # "None": closed
        async with db.write() as conn:
            await conn.execute(ADD_ITEM, {"id": 2, "parent_id": 1})
        assert await items(db) == [2]
        assert await backends(db) <= 4

    on_database(pg_url, scenario)


def test_single_statements_commit_each_statement_and_write_still_has_transactions(
    pg_url: str,
) -> None:
    async def scenario(db: Database) -> None:
        with pytest.raises(ValueError):
            async with db.single_statements() as conn:
                pid = await conn.scalar(BACKEND)
                await conn.execute(ADD_ITEM, {"id": 1, "parent_id": 1})
                await conn.execute(sa.text("INSERT INTO item VALUES (2, 1)"))
                assert await items(db) == [1, 2]  # each committed at once
                raise ValueError("after both")
        assert await items(db) == [1, 2]  # and kept
        assert await state_of(db, pid) == "idle"

        # the same connection, in write(): a transaction again
        with pytest.raises(ValueError):
            async with db.write() as conn:
                assert await conn.scalar(BACKEND) == pid
                await conn.execute(ADD_ITEM, {"id": 3, "parent_id": 1})
                await conn.execute(sa.text("INSERT INTO item VALUES (4, 1)"))
                assert await items(db) == [1, 2]
                raise ValueError("undone")
        assert await items(db) == [1, 2]

    on_database(pg_url, scenario)


def test_a_write_cancelled_mid_statement_gives_up_its_connection(pg_url: str) -> None:
    async def scenario(db: Database) -> None:
        started = asyncio.Event()
        pids: list[int] = []

        async def slow() -> None:
            async with db.write() as conn:
                pids.append(await conn.scalar(BACKEND))
                await conn.execute(ADD_ITEM, {"id": 1, "parent_id": 1})
                started.set()
                await conn.execute(sa.text("SELECT pg_sleep(30)"))

        task = asyncio.create_task(slow())
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def after() -> int:
            async with db.write() as conn:  # not the cancelled one: it is not reused
                await conn.execute(ADD_ITEM, {"id": 2, "parent_id": 1})
                return int(await conn.scalar(BACKEND))

        assert await asyncio.wait_for(after(), 10) != pids[0]
        assert await items(db) == [2]

        async def gone() -> bool:
            async with db.read() as conn:
                query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p")
                return await conn.scalar(query, {"p": pids[0]}) == 0

        for _ in range(50):  # the server ends the cancelled backend soon
            if await gone():
                break
            await asyncio.sleep(0.1)
        assert await gone()

    on_database(pg_url, scenario)


def test_a_kept_connection_the_server_ended_is_replaced_unseen(pg_url: str) -> None:
    async def scenario(db: Database) -> None:
        async with db.write() as conn:
            pid = await conn.scalar(BACKEND)
        async with db.read() as conn:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        await asyncio.sleep(0.3)  # the driver sees the connection close
        async with db.write() as conn:
            assert await conn.scalar(BACKEND) != pid
            await conn.execute(ADD_ITEM, {"id": 1, "parent_id": 1})
        assert await items(db) == [1]

    on_database(pg_url, scenario)
