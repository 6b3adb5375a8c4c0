"""PostgreSQL: an agent's "started" report (with its log) is one statement (queries.START),
with what the read-then-write path would have written; anything else (a log to mask)
takes that path."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import sqlalchemy as sa

from stavily.config import Settings
from stavily.errors import Conflict, Forbidden, NotFound
from stavily.fleet.agents import AgentIdentity
from stavily.store import migrate
from stavily.store.db import Database
from stavily.store.models import audit_records, instructions
from stavily.timeutil import utcnow
from stavily.workflows.engine import Engine
from tests.harness import PG_ONLY
from tests.integration.test_deferred_writes import LOGGED_POOL, log_all, statements
from tests.integration.test_prebuilt import seed

pytestmark = PG_ONLY


def agent(org: str, agent_id: str = "agt1") -> AgentIdentity:
    return AgentIdentity(agent_id, org, agent_id, "action", {}, 4, "online")


def test_started_is_one_statement_and_writes_what_the_long_way_would(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        db = Database(pg_url, pool_size=LOGGED_POOL)  # every statement logged
        try:
            await migrate.upgrade(db)
            org = (await seed(db))["org"]
            leased_until = utcnow() + timedelta(seconds=5)
            async with db.engine.begin() as conn:
                await conn.execute(
                    instructions.update().values(
                        status="leased", agent_id="agt1", lease_expires_at=leased_until
                    )
                )
            log = await log_all(db)
            engine = Engine(db, Settings())
            me = agent(org)

            before = utcnow()
            assert await engine.progress(me, "ins1", {"status": "executing"}) == ["status"]
            sent = await statements(log)
            assert len(sent) == 1 and "UPDATE instructions" in sent[0]
            async with db.read() as conn:
                row = (await conn.execute(sa.select(instructions))).mappings().one()
                records = (
                    (
                        await conn.execute(
                            sa.select(audit_records).where(
                                audit_records.c.action == "instruction.executing"
                            )
                        )
                    )
                    .mappings()
                    .all()
                )
            assert row["status"] == "executing" and row["started_at"] >= before
            # the lease: from now, the step's timeout (30 s) and the grace (60 s)
            assert row["lease_expires_at"] >= before + timedelta(seconds=90)
            assert [(r["subject_id"], r["actor"], r["details"]) for r in records] == [
                ("ins1", "agent:agt1", {"execution_id": "exe1", "attempt": 1})
            ]

            # said again: already executing, the long way (read, then extend the lease)
            log.clear()
            assert await engine.progress(me, "ins1", {"status": "executing"}) == ["status"]
            assert len(await statements(log)) == 3  # the one-statement try, read, write
            async with db.read() as conn:
                count = await conn.scalar(
                    sa.select(sa.func.count()).where(
                        audit_records.c.action == "instruction.executing"
                    )
                )
            assert count == 1  # started once (each start below is another)

            # with a log, leased again: one statement, the log kept as sent
            async with db.engine.begin() as conn:
                await conn.execute(instructions.update().values(status="leased"))
            log.clear()
            lines = ["[t] Instruction received", "[t] Started plugin execution"]
            report = {"status": "executing", "execution_log": lines}
            assert await engine.progress(me, "ins1", report) == ["status", "execution_log"]
            assert len(await statements(log)) == 1
            async with db.read() as conn:
                row = (await conn.execute(sa.select(instructions))).mappings().one()
            assert row["status"] == "executing" and row["execution_log"] == lines

            # a log to mask (the instruction has secrets): the long way, which masks it
            monkeypatch.setenv("STAVILY_SECRET_TEST", "hunter2")
            async with db.engine.begin() as conn:
                await conn.execute(
                    instructions.update().values(
                        status="leased",
                        context={"step": "a", "secrets": {"pw": {"env": "STAVILY_SECRET_TEST"}}},
                    )
                )
            log.clear()
            report = {"status": "executing", "execution_log": ["logged in with hunter2"]}
            await engine.progress(me, "ins1", report)
            assert len(await statements(log)) == 3
            async with db.read() as conn:
                row = (await conn.execute(sa.select(instructions))).mappings().one()
            assert row["status"] == "executing"
            assert row["execution_log"] == ["logged in with ***"]

            with pytest.raises(Forbidden):
                await engine.progress(agent(org, "agt2"), "ins1", {"status": "executing"})
            with pytest.raises(NotFound):
                await engine.progress(me, "nope", {"status": "executing"})
            async with db.engine.begin() as conn:
                await conn.execute(instructions.update().values(status="completed"))
            with pytest.raises(Conflict):
                await engine.progress(me, "ins1", {"status": "executing"})
        finally:
            await db.dispose()

    asyncio.run(main())
