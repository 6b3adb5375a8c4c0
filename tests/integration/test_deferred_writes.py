"""PostgreSQL's deferred writes (db.write_later): they wait for the transaction's next
statement and go with it in one round trip, and the transaction sees and keeps exactly
what it would have if each had run at once. SQLite runs them at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa

from stavily import audit
from stavily.store import migrate
from stavily.store.db import LATER_AT_MOST, Database
from stavily.store.models import audit_records, executions, instructions, step_runs
from stavily.workflows import queries, states
from stavily.workflows.orchestration import IllegalTransition, set_status
from tests.harness import PG_ONLY
from tests.integration.test_prebuilt import NOW, seed

pytestmark = PG_ONLY


def on_seeded(url: str, scenario: Callable[[Database, str], Awaitable[None]]) -> None:
    """Run `scenario(db, organization_id)` on a migrated and seeded database, in one event
    loop (asyncpg's connections belong to the loop that opened them)."""

    async def main() -> None:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            await scenario(db, (await seed(db))["org"])
        finally:
            await db.dispose()

    asyncio.run(main())


async def sent(conn: Any, log: list[str] | None = None) -> list[str]:
    """The statements asyncpg sends on `conn` from now on (BEGIN and COMMIT aside),
    appended to `log` if given."""
    raw = await conn.get_raw_connection()
    into: list[str] = [] if log is None else log
    raw.dbapi_connection._connection.add_query_logger(lambda q: into.append(q.query))
    return into


async def log_all(db: Database) -> list[str]:
    """The statements asyncpg sends on the connections of `db`, made with a pool of two
    (one kept for writes, one for the rest: LOGGED_POOL), from now on, as `sent` does."""
    log: list[str] = []
    async with db.write() as kept, db.read() as pooled:
        for conn in (kept, pooled):
            await sent(conn, log)
    return log


LOGGED_POOL = 2  # see log_all


async def statements(log: list[str]) -> list[str]:
    await asyncio.sleep(0)  # asyncpg calls its query loggers soon, not at once
    ours = [q for q in log if not q.startswith(("BEGIN", "COMMIT"))]
    # less asyncpg's own look-up of types (which turns JIT off meanwhile)
    return [q for q in ours if "pg_type" not in q and "set_config" not in q]


async def read(db: Database, statement: Any) -> list[Any]:
    async with db.read() as conn:
        return list((await conn.execute(statement)).all())


def entry(org: str, subject: str) -> dict[str, Any]:
    return audit.entry(org, "t", "test.deferred", "instruction", subject, {"n": 1}, at=NOW)


DEFERRED_RECORDS = sa.select(audit_records.c.subject_id).where(
    audit_records.c.action == "test.deferred"
)


def test_writes_wait_and_go_with_the_next_statement_of_other_tables(pg_url: str) -> None:
    async def scenario(db: Database, org: str) -> None:
        async with db.write() as conn:
            log = await sent(conn)
            await set_status(conn, instructions, states.INSTRUCTION, "ins1", "leased")
            await set_status(conn, step_runs, states.STEP, "stp-a", "queued", attempts=1)
            await audit.append(conn, [entry(org, "ins1"), entry(org, "ins2")])
            assert (await statements(log)) == []  # nothing sent yet
            # executions: none of the writes touches it, so it goes with them as one
            row = (await conn.execute(queries.EXECUTION, {"id": "exe1"})).mappings().one()
            assert row["id"] == "exe1" and row["inputs"]["nested"] == {"list": [1, "two", None]}
            assert len(await statements(log)) == 1 and (await statements(log))[0].startswith(
                "WITH w0 AS"
            )
            # what the transaction reads afterwards includes them
            assert await conn.scalar(sa.select(instructions.c.status)) == "leased"
        attempts = await read(db, sa.select(step_runs.c.attempts).order_by(step_runs.c.id))
        assert [r.attempts for r in attempts] == [1, 0]
        assert sorted(r.subject_id for r in await read(db, DEFERRED_RECORDS)) == ["ins1", "ins2"]

    on_seeded(pg_url, scenario)


def test_a_statement_on_a_table_they_write_is_sent_after_them(pg_url: str) -> None:
    async def scenario(db: Database, org: str) -> None:
        async with db.write() as conn:
            log = await sent(conn)
            await set_status(conn, step_runs, states.STEP, "stp-b", "skipped")
            released = await conn.execute(
                queries.RELEASE_DEPENDENTS["postgresql"],
                {"b_execution_id": "exe1", "names": ["b"]},
            )
            # it saw the skip: the write was sent first, on its own
            assert [(r.name, r.status, r.waiting) for r in released] == [("b", "skipped", 0)]
            first, second = await statements(log)
            assert first.startswith("WITH w0 AS (UPDATE step_runs SET status")
            assert second.startswith("UPDATE step_runs SET waiting")

    on_seeded(pg_url, scenario)


def test_writes_sent_beside_a_statement_that_finds_nothing(pg_url: str) -> None:
    async def scenario(db: Database, org: str) -> None:
        async with db.write() as conn:
            await set_status(conn, instructions, states.INSTRUCTION, "ins1", "leased")
            missing = await conn.execute(queries.EXECUTION, {"id": "no-such-execution"})
            assert missing.all() == []
        assert (await read(db, sa.select(instructions.c.status)))[0].status == "leased"

    on_seeded(pg_url, scenario)


def test_two_writes_to_one_row_are_sent_one_after_the_other(pg_url: str) -> None:
    async def scenario(db: Database, org: str) -> None:
        async with db.write() as conn:
            log = await sent(conn)
            await set_status(conn, instructions, states.INSTRUCTION, "ins1", "leased")
            # allowed only from leased: in one statement with the first it would see queued
            await set_status(conn, instructions, states.INSTRUCTION, "ins1", "executing")
            assert len(await statements(log)) == 1
        assert (await read(db, sa.select(instructions.c.status)))[0].status == "executing"

    on_seeded(pg_url, scenario)


def test_a_refused_transition_fails_the_whole_transaction_when_sent(pg_url: str) -> None:
    async def scenario(db: Database, org: str) -> None:
        with pytest.raises(IllegalTransition, match="instructions ins1 cannot become completed"):
            async with db.write() as conn:
                await conn.execute(
                    queries.update_by_id(executions, ("open_steps",)),
                    {"row_id": "exe1", "v_open_steps": 7},
                )
                await audit.append(conn, [entry(org, "ins1")])
                # queued -> completed is not a legal move: refused when the writes are sent
                await set_status(conn, instructions, states.INSTRUCTION, "ins1", "completed")
        assert (await read(db, sa.select(executions.c.open_steps)))[0].open_steps == 2
        assert (await read(db, sa.select(instructions.c.status)))[0].status == "queued"
        assert await read(db, DEFERRED_RECORDS) == []

    on_seeded(pg_url, scenario)


def test_writes_deferred_in_a_savepoint_that_fails_are_dropped(pg_url: str) -> None:
    async def scenario(db: Database, org: str) -> None:
        async with db.write() as conn:
            await set_status(conn, instructions, states.INSTRUCTION, "ins1", "leased")
            with pytest.raises(RuntimeError):
                async with conn.begin_nested():
                    await set_status(conn, step_runs, states.STEP, "stp-a", "queued")
                    raise RuntimeError("undo the savepoint")
            await audit.append(conn, [entry(org, "ins1")])
        assert (await read(db, sa.select(instructions.c.status)))[0].status == "leased"
        statuses = await read(db, sa.select(step_runs.c.status).order_by(step_runs.c.id))
        assert [r.status for r in statuses] == ["pending", "pending"]
        assert len(await read(db, DEFERRED_RECORDS)) == 1

    on_seeded(pg_url, scenario)


def test_many_writes_go_in_statements_of_a_bounded_size(pg_url: str) -> None:
    async def scenario(db: Database, org: str) -> None:
        many = [entry(org, f"ins{i}") for i in range(3 * LATER_AT_MOST + 1)]
        async with db.write() as conn:
            log = await sent(conn)
            await audit.append(conn, many)
        assert len(await statements(log)) == 4
        assert len(await read(db, DEFERRED_RECORDS)) == len(many)

    on_seeded(pg_url, scenario)
