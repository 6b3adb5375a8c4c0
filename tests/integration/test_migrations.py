"""The migrations build exactly the tables the code declares, on each database."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from stavily.store import append_only, migrate
from stavily.store.db import Database
from stavily.store.models import metadata
from tests.harness import fresh_database

# The first migration of the audit log's guard on both databases: it and every later one
# must leave audit_records append-only.
GUARDED_FROM = "0009"


def test_migrated_schema_matches_the_models(backend: str, tmp_path: Path) -> None:
    async def diff(url: str) -> list[object]:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            await migrate.upgrade(db)  # a second run is a no-op
            async with db.engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
                )
        finally:
            await db.dispose()

    with fresh_database(backend, tmp_path) as url:
        assert asyncio.run(diff(url)) == []


def test_the_latest_migration_undoes_and_redoes(backend: str, tmp_path: Path) -> None:
    def step_back_and_forth(sync: Connection) -> list[object]:
        config = migrate.alembic_config(sync)
        command.downgrade(config, "-1")
        command.upgrade(config, "head")
        return compare_metadata(MigrationContext.configure(sync), metadata)

    async def diff(url: str) -> list[object]:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            async with db.engine.begin() as conn:
                return await conn.run_sync(step_back_and_forth)
        finally:
            await db.dispose()

    with fresh_database(backend, tmp_path) as url:
        assert asyncio.run(diff(url)) == []


# -- the audit log stays append-only -----------------------------------------------------------

# Written with the columns audit_records has had since 0001, so that it works at every
# revision from GUARDED_FROM on.
_RECORD = (
    "INSERT INTO audit_records (organization_id, created_at, actor, action, subject_type, "
    "subject_id, details) VALUES ('org_x', CURRENT_TIMESTAMP, 'system', :action, 'test', "
    ":subject, '{}')"
)


def _refused(backend: str) -> list[str]:
    statements = [
        "UPDATE audit_records SET actor = 'forger'",
        "UPDATE audit_records SET details = '{\"forged\": true}' WHERE id = (SELECT max(id) FROM audit_records)",
        "DELETE FROM audit_records WHERE id = (SELECT min(id) FROM audit_records)",
        "DELETE FROM audit_records",  # on SQLite, its truncate optimization when no trigger
    ]
    if backend == "postgresql":
        statements.append("TRUNCATE audit_records")
    return statements


async def _add_record(engine: AsyncEngine, action: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(_RECORD), {"action": action, "subject": action[:40]})


async def _records(engine: AsyncEngine) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT * FROM audit_records ORDER BY id"))
        return [tuple(row) for row in rows]


async def _assert_append_only(engine: AsyncEngine, backend: str, where: str) -> None:
    """Every statement that would change or remove records is refused; none changed."""
    before = await _records(engine)
    assert before, "no records to protect"
    for statement in _refused(backend):
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement))
        except DBAPIError as error:
            assert append_only.MESSAGE in str(error), (where, statement, error)
        else:
            raise AssertionError(f"{where}: {statement!r} changed {result.rowcount} record(s)")
    assert await _records(engine) == before, where
    async with engine.connect() as conn:
        assert await conn.run_sync(append_only.missing) == [], where


def test_the_audit_log_is_append_only(backend: str, tmp_path: Path) -> None:
    async def check(url: str) -> None:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            for n in range(3):
                await _add_record(db.engine, f"test.record.{n}")
            await _assert_append_only(db.engine, backend, "head")
            async with db.engine.begin() as conn:  # the guard's triggers are all there
                assert await conn.run_sync(append_only.protect) == []
        finally:
            await db.dispose()

    with fresh_database(backend, tmp_path) as url:
        asyncio.run(check(url))


def _revisions_from(first: str) -> list[str]:
    """`first`, then every later revision up to the head, oldest first."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    down = [r.revision for r in script.walk_revisions(base=first, head="heads")]
    assert down and down[-1] == first, down
    return list(reversed(down))


def test_every_migration_from_0009_on_keeps_the_audit_log_append_only(
    backend: str, tmp_path: Path
) -> None:
    """One revision at a time, with records written before and between the steps: a later
    migration that rebuilds audit_records (SQLite's batch mode copies the table and drops
    its triggers) must apply stavily.store.append_only.protect again."""
    revisions = _revisions_from(GUARDED_FROM)
    script = ScriptDirectory.from_config(migrate.alembic_config())
    start = script.get_revision(GUARDED_FROM).down_revision

    def to(revision: str) -> object:
        return lambda sync: command.upgrade(migrate.alembic_config(sync), revision)

    async def walk(url: str) -> None:
        db = Database(url)
        try:
            async with db.engine.begin() as conn:
                await conn.run_sync(to(str(start)))
            await _add_record(db.engine, f"before.{GUARDED_FROM}")
            for revision in revisions:
                async with db.engine.begin() as conn:
                    await conn.run_sync(to(revision))
                await _assert_append_only(db.engine, backend, f"at {revision}")
                await _add_record(db.engine, f"after.{revision}")
        finally:
            await db.dispose()

    with fresh_database(backend, tmp_path) as url:
        asyncio.run(walk(url))


def test_the_guard_migration_undoes_only_what_it_added(backend: str, tmp_path: Path) -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    before = str(script.get_revision(GUARDED_FROM).down_revision)

    def down_and_up(sync: Connection) -> tuple[set[str], set[str]]:
        config = migrate.alembic_config(sync)
        command.downgrade(config, before)
        below = append_only.present(sync)
        command.upgrade(config, "head")
        return below, append_only.present(sync)

    async def run(url: str) -> tuple[set[str], set[str]]:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            await _add_record(db.engine, "test.record")
            async with db.engine.begin() as conn:
                found = await conn.run_sync(down_and_up)
            await _assert_append_only(db.engine, backend, "down and up again")
            return found
        finally:
            await db.dispose()

    with fresh_database(backend, tmp_path) as url:
        below, after = asyncio.run(run(url))
    # 0001's row trigger stays on PostgreSQL; SQLite had none left after 0007's rebuild.
    assert below == ({append_only.ROW_TRIGGER} if backend == "postgresql" else set())
    assert after == set(append_only.expected(backend))
