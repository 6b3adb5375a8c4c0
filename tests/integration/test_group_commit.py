"""SQLite group commit: the writes of one moment share a transaction and one COMMIT,
each rolled back alone when it fails, none acknowledged before the commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from stavily.store.db import Database

SCHEMA = (
    "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
    "CREATE TABLE item (id INTEGER PRIMARY KEY, parent_id INTEGER"
    " REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
    "INSERT INTO parent (id) VALUES (1)",
)


async def prepared(path: Path) -> tuple[Database, list[int]]:
    db = Database(f"sqlite+aiosqlite:///{path}")
    async with db.write() as conn:
        for statement in SCHEMA:
            await conn.execute(sa.text(statement))
    commits: list[int] = []
    event.listen(db._sync_writer, "commit", lambda _conn: commits.append(1))
    return db, commits


def rows(path: Path) -> list[int]:
    """What another connection sees: only what was committed."""
    with sqlite3.connect(path) as other:
        return [r[0] for r in other.execute("SELECT id FROM item ORDER BY id")]


async def insert(db: Database, item: int, parent: int = 1, fail: bool = False) -> None:
    async with db.write() as conn:
        await conn.execute(sa.text("INSERT INTO item VALUES (:i, :p)"), {"i": item, "p": parent})
        if fail:
            raise ValueError(f"writer {item} fails after writing")


def test_concurrent_writers_share_one_commit_and_a_failing_one_is_undone_alone(
    tmp_path: Path,
) -> None:
    async def scenario() -> list[BaseException | None]:
        db, commits = await prepared(tmp_path / "g.db")
        try:
            outcomes = await asyncio.gather(
                *(insert(db, i, fail=i == 3) for i in range(10)), return_exceptions=True
            )
            assert len(commits) < 10  # batched: one COMMIT for many writers
            return outcomes
        finally:
            await db.dispose()

    outcomes = asyncio.run(scenario())
    assert [type(o).__name__ for o in outcomes].count("ValueError") == 1
    assert isinstance(outcomes[3], ValueError)
    assert rows(tmp_path / "g.db") == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_a_writer_returns_only_once_its_write_is_committed(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, _ = await prepared(tmp_path / "d.db")
        try:
            for item in range(3):
                await insert(db, item)
                assert rows(tmp_path / "d.db")[-1] == item  # durable when acknowledged
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_a_failed_commit_fails_every_writer_of_its_batch_and_keeps_none(
    tmp_path: Path,
) -> None:
    """A deferred foreign key is checked at COMMIT: the batch holding the bad row
    cannot commit, so no writer of it is told its write is done."""

    async def scenario() -> list[BaseException | None]:
        db, _ = await prepared(tmp_path / "f.db")
        try:
            outcomes = await asyncio.gather(
                insert(db, 1), insert(db, 2, parent=99), insert(db, 3), return_exceptions=True
            )
            await insert(db, 4)  # the next batch works
            return outcomes
        finally:
            await db.dispose()

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, sa.exc.IntegrityError) for o in outcomes), outcomes
    assert rows(tmp_path / "f.db") == [4]


@pytest.mark.parametrize("cancel_at", ["inside", "waiting"])
def test_a_cancelled_writer_leaves_the_batch_whole(tmp_path: Path, cancel_at: str) -> None:
    async def scenario() -> None:
        db, _ = await prepared(tmp_path / "c.db")
        entered = asyncio.Event()

        async def slow() -> None:
            async with db.write() as conn:
                await conn.execute(sa.text("INSERT INTO item VALUES (10, 1)"))
                entered.set()
                if cancel_at == "inside":
                    await asyncio.sleep(10)

        try:
            task = asyncio.create_task(slow())
            await entered.wait()
            if cancel_at == "inside":
                task.cancel()
                other = asyncio.create_task(insert(db, 11))
                await asyncio.gather(task, other, return_exceptions=True)
            else:
                task.cancel()  # while it waits for its batch's commit
                await asyncio.gather(task, return_exceptions=True)
                await insert(db, 11)
        finally:
            await db.dispose()

    asyncio.run(scenario())
    expected = [11] if cancel_at == "inside" else [10, 11]
    assert rows(tmp_path / "c.db") == expected
