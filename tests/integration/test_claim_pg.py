"""PostgreSQL: a claim is one statement (queries.claim) while no candidate's selector
needs Python to tell who may take it, and hands out exactly what the two-statement way
(candidates, matched here, then leased) would: oldest first, restricted work included
when this agent meets it."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa

from stavily.config import Settings
from stavily.fleet.agents import AgentIdentity
from stavily.store import migrate
from stavily.store.db import Database
from stavily.store.models import agents, audit_records, instructions, step_runs
from stavily.timeutil import utcnow
from stavily.workflows import queries
from stavily.workflows.engine import Engine
from tests.harness import PG_ONLY
from tests.integration.test_deferred_writes import LOGGED_POOL, log_all, statements
from tests.integration.test_prebuilt import NOW, seed

pytestmark = PG_ONLY

PROD = {"labels": {"env": "prod"}}


async def queue(db: Database, org: str, selectors: dict[str, dict[str, Any]]) -> None:
    """Queued instructions of execution exe1, named in the order they were queued."""
    row = {
        "organization_id": org,
        "execution_id": "exe1",
        "step_run_id": None,
        "attempt": 1,
        "status": "queued",
        "agent_type": "action",
        "plugin_id": "noop",
        "instruction_type": "execute",
        "plugin_configuration": {},
        "input_data": {},
        "context": {},
        "timeout_seconds": 30,
        "max_retries": 0,
        "correlation_id": "c",
        "created_at": NOW,
    }
    async with db.engine.begin() as conn:
        await conn.execute(instructions.delete())
        await conn.execute(
            instructions.insert(),
            [{**row, "id": i, "selector": s} for i, s in selectors.items()],
        )


async def add_agent(db: Database, org: str, agent_id: str, labels: dict[str, str]) -> AgentIdentity:
    async with db.engine.begin() as conn:
        await conn.execute(
            agents.insert(),
            {
                **{"id": agent_id, "organization_id": org, "name": agent_id, "type": "action"},
                **{"labels": labels, "capacity": 8, "status": "online"},
                **{"credential_hash": agent_id, "created_at": NOW},
            },
        )
    return AgentIdentity(agent_id, org, agent_id, "action", labels, 8, "online")


async def holders(db: Database) -> dict[str, str | None]:
    async with db.read() as conn:
        rows = await conn.execute(sa.select(instructions.c.id, instructions.c.agent_id))
        return {r.id: r.agent_id for r in rows}


def test_claims_in_one_statement_and_as_the_two_statement_way_would(pg_url: str) -> None:
    async def main() -> None:
        db = Database(pg_url, pool_size=LOGGED_POOL)  # every statement logged
        try:
            await migrate.upgrade(db)
            org = (await seed(db))["org"]
            async with db.engine.begin() as conn:
                await conn.execute(instructions.delete())
                await conn.execute(step_runs.update().values(status="queued"))
            log = await log_all(db)
            engine = Engine(db, Settings())
            prod = await add_agent(db, org, "agt-prod", {"env": "prod"})
            dev = await add_agent(db, org, "agt-dev", {"env": "dev"})
            routed = {"strategy": "round_robin", "labels": {}, "pools": []}

            # open to any agent (a routing strategy restricts no one): one statement
            await queue(db, org, {"i1": {}, "i2": routed, "i3": {}})
            log.clear()
            taken = await engine.claim(dev, 2)
            assert [p["id"] for p in taken] == ["i1", "i2"]
            sent = await statements(log)
            assert len(sent) == 1 and sent[0].startswith("WITH page AS")
            assert (await holders(db)) == {"i1": "agt-dev", "i2": "agt-dev", "i3": None}
            async with db.read() as conn:
                audited = await conn.scalar(
                    sa.select(sa.func.count()).where(audit_records.c.action == "instruction.leased")
                )
            assert audited == 2

            # a restricted one first stops it: the page it read is matched here and what
            # fits leased, one statement more (as many as the two-statement way)
            await queue(db, org, {"i1": {}, "i2": PROD, "i3": {}, "i4": PROD})
            log.clear()
            assert [p["id"] for p in await engine.claim(prod, 3)] == ["i1", "i2", "i3"]
            assert len(await statements(log)) == 2
            log.clear()
            assert [p["id"] for p in await engine.claim(dev, 3)] == []  # only i4 left
            assert len(await statements(log)) == 1  # nothing fits: nothing more to send

            await queue(db, org, {"i1": PROD, "i2": {}, "i3": PROD, "i4": {}})
            assert [p["id"] for p in await engine.claim(dev, 3)] == ["i2", "i4"]
            assert (await holders(db))["i1"] is None

            # a full page with nothing for this agent: the next pages are read
            await queue(db, org, {**{f"p{n:02d}": PROD for n in range(32)}, "q": {}})
            log.clear()
            assert [p["id"] for p in await engine.claim(dev, 1)] == ["q"]
            assert len(await statements(log)) == 4  # claim; candidates, the next page; take

            # what a claim saw and left is offered to the agents waiting
            await queue(db, org, {"i1": {}, "i2": {}, "i3": PROD})
            async with db.single_statements() as conn:
                payloads, offers = await engine._claim(conn, dev, 1, utcnow())
            left = list(offers)  # built as they are read
            assert [p["id"] for p in payloads] == ["i1"]
            assert [item["id"] for item in left] == ["i2"]  # i3 is not dev's to take
            assert set(left[0]) == {c.name for c in queries.OFFER_COLUMNS}
        finally:
            await db.dispose()

    asyncio.run(main())


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


def test_a_claim_looks_up_and_locks_only_what_it_leases(pg_url: str) -> None:
    """Of a full page, a claim for one slot looks up and locks one row, oldest first,
    without sorting the page (the claim is the busiest statement of all)."""

    async def main() -> None:
        db = Database(pg_url)
        try:
            await migrate.upgrade(db)
            org = (await seed(db))["org"]
            agent = await add_agent(db, org, "agt-one", {})
            await queue(db, org, {f"i{n}": {} for n in range(8)})
            params = Engine(db, Settings())._lease_params(agent, 1, utcnow(), False)
            compiled = queries.claim(8).compile(dialect=db.engine.dialect)
            async with db.engine.connect() as conn:
                raw = (await conn.get_raw_connection()).dbapi_connection._connection
                transaction = raw.transaction()
                await transaction.start()
                try:
                    (plan,) = await raw.fetchval(
                        "EXPLAIN (ANALYZE, FORMAT JSON) " + str(compiled),
                        *[{**compiled.params, **params}[k] for k in compiled.positiontup],
                    )
                    leased = await raw.fetch(
                        "SELECT id FROM instructions WHERE agent_id = $1", agent.id
                    )
                    assert [r["id"] for r in leased] == ["i0"]  # the oldest
                finally:
                    await transaction.rollback()
            locked = next(n for n in _nodes(plan["Plan"]) if n.get("Subplan Name") == "CTE locked")
            assert not [n for n in _nodes(locked) if n["Node Type"] == "Sort"]
            lock = next(n for n in _nodes(locked) if n["Node Type"] == "LockRows")
            read = [
                n["Actual Loops"] * n["Actual Rows"]
                for n in _nodes(lock)
                if n.get("Relation Name") == "instructions"
            ]
            assert sum(read) == 1
        finally:
            await db.dispose()

    asyncio.run(main())
