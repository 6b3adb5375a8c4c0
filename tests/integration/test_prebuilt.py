"""SQLite's fast path for prebuilt statements gives exactly what SQLAlchemy gives, writes in
the same transaction, and steps aside where it cannot serve (mixed batches)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from stavily import audit
from stavily.security import bootstrap
from stavily.store import migrate
from stavily.store.db import Database, InlineConnection
from stavily.store.models import (
    audit_records,
    executions,
    instructions,
    step_runs,
    workflow_versions,
    workflows,
)
from stavily.store.prebuilt import is_prebuilt
from stavily.timeutil import utcnow
from stavily.workflows import queries, states
from stavily.workflows.orchestration import IfUnset, IllegalTransition, set_status
from tests.harness import fresh_database


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with fresh_database("sqlite", tmp_path) as url:
        database = Database(url)
        asyncio.run(migrate.upgrade(database))
        yield database
        asyncio.run(database.dispose())


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def rows(db: Database, statement: Any) -> list[Any]:
    async def read() -> list[Any]:
        async with db.read() as conn:
            return list((await conn.execute(statement)).all())

    return run(read())


NOW = utcnow()


async def seed(db: Database) -> dict[str, Any]:
    """An execution with two steps and a queued instruction, written through the
    ordinary (non-prebuilt) SQLAlchemy path."""
    org, _ = await bootstrap(db, "stv_prebuilt_test_token_0123456789")
    execution = {
        "id": "exe1",
        "organization_id": org,
        "workflow_id": "wf1",
        "workflow_version_id": "wv1",
        "workflow_name": "wf",
        "workflow_version": 1,
        "status": "running",
        "inputs": {"n": 1, "nested": {"list": [1, "two", None]}},
        "trigger": {"type": "manual"},
        "created_by": "t",
        "created_at": NOW,
        "variables": {},
        "deadline_at": None,
        "concurrency_limit": None,
        "reruns": 0,
        "failed_step": None,
        "open_steps": 2,
    }
    step = {
        "organization_id": org,
        "execution_id": "exe1",
        "stage": "actions",
        "depends_on": [],
        "dependents": ["b"],
        "spec": {"config": {"k": "v"}},
        "status": "pending",
        "attempts": 0,
        "parent_id": None,
        "item_index": None,
    }
    instruction = {
        "id": "ins1",
        "organization_id": org,
        "execution_id": "exe1",
        "step_run_id": "stp-a",
        "attempt": 1,
        "status": "queued",
        "agent_type": "action",
        "target_agent_name": None,
        "selector": {"labels": {"env": "prod"}},
        "plugin_id": "noop",
        "instruction_type": "execute",
        "plugin_configuration": {"x": "ü ✓"},
        "input_data": {"x": 1.5},
        "context": {"step": "a"},
        "timeout_seconds": 30,
        "max_retries": 0,
        "correlation_id": "exe1/a",
        "created_at": NOW,
        "available_at": None,
    }
    async with db.engine.begin() as conn:  # SQLAlchemy itself, not the fast path
        dated = {"organization_id": org, "created_at": NOW}
        await conn.execute(
            workflows.insert(),
            {**dated, "id": "wf1", "name": "wf", "latest_version": 1, "updated_at": NOW},
        )
        await conn.execute(
            workflow_versions.insert(),
            {
                **dated,
                **{"id": "wv1", "workflow_id": "wf1", "version": 1, "definition": {}},
                **{"source": "", "created_by": "t"},
            },
        )
        await conn.execute(queries.INSERT_EXECUTION, execution)
        await conn.execute(
            queries.INSERT_STEPS,
            [
                {**step, "id": "stp-a", "name": "a", "position": 0, "waiting": 0},
                {**step, "id": "stp-b", "name": "b", "position": 1, "waiting": 1},
            ],
        )
        await conn.execute(queries.INSERT_INSTRUCTION, instruction)
    return {"org": org}


def test_selects_and_returning_give_what_sqlalchemy_gives(db: Database) -> None:
    seeded = run(seed(db))

    async def compare() -> None:
        async with db.write() as conn:
            assert isinstance(conn, InlineConnection)
            for statement, params in (
                (queries.OWNED, {"id": "ins1", "organization_id": seeded["org"]}),
                (queries.REPORTED, {"id": "ins1", "organization_id": seeded["org"]}),
                (queries.EXECUTION, {"id": "exe1"}),
                (queries.STEP, {"id": "stp-b"}),
            ):
                assert is_prebuilt(statement)
                fast = (await conn.execute(statement, params)).mappings().one()
                slow = dict(conn.sync_connection.execute(statement, params).mappings().one())
                assert fast == slow
                assert all(type(fast[k]) is type(slow[k]) for k in slow)
            owned = await conn.execute(queries.OWNED, {"id": "ins1", "organization_id": "x"})
            assert owned.first() is None
            params = {"id": "ins1", "organization_id": seeded["org"]}
            reported = (await conn.execute(queries.REPORTED, params)).one()
            execution = queries.part(reported, "execution__", executions)
            assert execution == dict(
                (await conn.execute(queries.EXECUTION, {"id": "exe1"})).mappings().one()
            )
            step = queries.part(reported, "step__", step_runs)
            assert step is not None and step["name"] == "a" and step["execution_id"] == "exe1"

    run(compare())


def test_updates_returning_and_expanding_lists(db: Database) -> None:
    run(seed(db))

    async def scenario() -> None:
        async with db.write() as conn:
            lease = NOW + timedelta(seconds=90)
            row = (
                await conn.execute(
                    queries.LEASE,
                    {
                        "row_id": "ins1",
                        "v_agent_id": "agt1",
                        "v_leased_at": NOW,
                        "v_lease_expires_at": lease,
                    },
                )
            ).one()
            assert (row.status, row.agent_id, row.lease_expires_at) == ("leased", "agt1", lease)
            assert row.plugin_configuration == {"x": "ü ✓"} and row.input_data == {"x": 1.5}
            assert row.lease_expires_at.tzinfo is not None
            released = await conn.execute(
                queries.RELEASE_DEPENDENTS["sqlite"],
                {"b_execution_id": "exe1", "names": ["b", "zz"]},
            )
            assert [(r.name, r.waiting) for r in released] == [("b", 0)]
            none = await conn.execute(
                queries.RELEASE_DEPENDENTS["sqlite"], {"b_execution_id": "exe1", "names": ["zz"]}
            )
            assert none.all() == [] and none.rowcount == 0

    run(scenario())
    status = rows(db, sa.select(instructions.c.status))[0].status
    waiting = rows(db, sa.select(step_runs.c.waiting).where(step_runs.c.id == "stp-b"))
    assert (status, waiting[0].waiting) == ("leased", 0)


def test_status_guard_and_rollback(db: Database) -> None:
    run(seed(db))

    async def illegal() -> None:
        async with db.write() as conn:
            await set_status(conn, step_runs, states.STEP, "stp-a", "queued", attempts=1)
            # pending -> queued happened; queued -> succeeded is not a legal move
            await set_status(conn, step_runs, states.STEP, "stp-a", "succeeded")

    with pytest.raises(IllegalTransition):
        run(illegal())

    async def after() -> tuple[str, int]:
        async with db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(step_runs.c.status, step_runs.c.attempts).where(
                        step_runs.c.id == "stp-a"
                    )
                )
            ).one()
            return row.status, row.attempts

    assert run(after()) == ("pending", 0)  # the whole transaction was rolled back

    async def keep_first() -> Any:
        async with db.write() as conn:
            await set_status(conn, step_runs, states.STEP, "stp-a", "queued", started_at=NOW)
            later = NOW + timedelta(seconds=5)
            await set_status(
                conn, step_runs, states.STEP, "stp-a", "running", started_at=IfUnset(later)
            )
            return (await conn.execute(queries.STEP, {"id": "stp-a"})).mappings().one()

    assert run(keep_first())["started_at"] == NOW


def test_batches_fast_when_uniform_and_through_sqlalchemy_when_not(db: Database) -> None:
    seeded = run(seed(db))
    org = seeded["org"]
    uniform = [audit.entry(org, "t", "x.one", "thing", f"s{i}", {"i": i}) for i in range(3)]
    mixed = [
        {**uniform[0], "subject_id": "m1"},
        {k: v for k, v in uniform[0].items() if k != "details"} | {"subject_id": "m2"},
    ]

    async def write(*batches: list[dict[str, Any]]) -> None:
        async with db.write() as conn:
            for batch in batches:
                await audit.append(conn, batch)

    run(write(uniform))
    # A batch whose rows name different columns is SQLAlchemy's to judge (it refuses
    # it), and the transaction it was in leaves nothing behind.
    with pytest.raises(sa.exc.StatementError, match="value is required"):
        run(write(uniform, mixed))
    written = rows(
        db,
        sa.select(audit_records.c.subject_id, audit_records.c.details)
        .where(audit_records.c.actor == "t")
        .order_by(audit_records.c.id),
    )
    assert [r.subject_id for r in written] == ["s0", "s1", "s2"]
    assert written[1].details == {"i": 1}


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_parameters_are_put_in_place_as_sqlalchemy_puts_them(dialect_name: str) -> None:
    """The positional values built without construct_params() are the ones it gives,
    literals and shared names included; a missing one fails as SQLAlchemy fails."""
    from sqlalchemy.dialects import postgresql, sqlite

    from stavily.store.prebuilt import _Plan

    dialect = sqlite.dialect() if dialect_name == "sqlite" else postgresql.asyncpg.dialect()
    given = {
        **{name: f"v-{name}" for name in ("agent_id", "organization_id", "agent_type")},
        **{name: f"v-{name}" for name in ("agent_name", "after_execution_id", "after_id")},
        **{name: f"v-{name}" for name in ("row_id", "v_agent_id", "id", "instruction_id")},
        **{"now": NOW, "v_leased_at": NOW, "v_lease_expires_at": NOW + timedelta(seconds=5)},
        **{"limit": 4, "v_open_steps": 2, "v_failed_step": None, "ids": ["a", "b"]},
        **{"v_status": "completed", "v_result": {"ok": [1, 2]}},
        **{"slots": 2, "grace": 30, "actor": "agent:a", "seen_agent_id": "a", "seen_status": "x"},
        "official": True,
    }
    statements = [
        queries.AGENT_NOW,
        queries.candidates(4),
        queries.candidates(4, after=True),
        queries.LEASE,
        queries.OWNED,
        queries.REPORTED_LOCKED,
        queries.SAVE_COUNTERS,
        queries.update_by_id(instructions, ("status", "result")),
        queries.guarded_update(dialect_name, ("status", "lease_expires_at"), True),
    ]
    if dialect_name == "postgresql":
        statements.append(queries.TAKE)
    for statement in statements:
        plan = _Plan(statement, dialect, None)
        assert plan.sources is not None, statement
        names = {key for key, _, _ in plan.sources}
        wanted = {k: v for k, v in given.items() if k in names}
        assert plan.positional(wanted) == plan._positional(wanted), statement
        required = next(key for key, _, bind in plan.sources if bind.required)
        missing = {k: v for k, v in wanted.items() if k != required}
        with pytest.raises(sa.exc.InvalidRequestError, match=required):
            plan.positional(missing)


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_every_column_type_reads_null_as_none(dialect_name: str) -> None:
    """Prebuilt results leave a NULL None without calling its type's result processor:
    true only while every type of the schema turns None into None, as these do."""
    from sqlalchemy.dialects import postgresql, sqlite

    from stavily.store.models import metadata

    dialect = sqlite.dialect() if dialect_name == "sqlite" else postgresql.asyncpg.dialect()
    converting = 0
    for table in metadata.tables.values():
        for column in table.columns:
            process = column.type._cached_result_processor(dialect, None)
            if process is not None:
                converting += 1
                assert process(None) is None, f"{table.name}.{column.name}"
    assert converting  # JSON and the datetimes at least
