"""Handing out work: runs under way before new runs, one wake-up per queued step, leases
and progress written only over the state they were read from."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from stavily.config import Settings
from stavily.fleet.agents import AgentIdentity
from stavily.security import bootstrap
from stavily.store import migrate
from stavily.store.db import Database
from stavily.store.models import audit_records, instructions, step_runs
from stavily.timeutil import utcnow
from stavily.workflows import queries, service
from stavily.workflows.definition import validate
from stavily.workflows.engine import Engine
from tests.harness import fresh_database, make_agents

TWO_STEPS = {
    "name": "two",
    "version": "1.0.0",
    "actions": {
        "steps": [
            {"name": "a", "plugin": "noop"},
            {"name": "b", "plugin": "noop", "depends_on": ["a"]},
        ]
    },
}


class World:
    def __init__(self, url: str) -> None:
        self.db = Database(url)
        self.engine = Engine(self.db, Settings(database_url=url, routing_prefer_seconds=0))

    async def setup(self, agents: int) -> None:
        await migrate.upgrade(self.db)
        self.org, _ = await bootstrap(self.db, "stv_dispatch_test_token_0123456789")
        async with self.db.write() as conn:
            self.agents = await make_agents(conn, self.org, agents, "d")
            await service.apply(conn, self.org, validate(TWO_STEPS), "", "test")

    async def start(self) -> str:
        return await self.engine.start(self.org, "two", {}, "test", {"type": "manual"})

    async def report(self, agent: AgentIdentity, instruction: dict[str, Any]) -> None:
        report = {"status": "completed", "result": {"ok": True}}
        await self.engine.result(agent, instruction["id"], report, uuid.uuid4().hex)


@pytest.fixture
def world(backend: str, tmp_path: Path) -> Iterator[World]:
    with fresh_database(backend, tmp_path) as url:
        made = World(url)
        yield made
        asyncio.run(made.db.dispose())


def test_steps_of_older_runs_go_before_new_runs(world: World) -> None:
    async def scenario() -> list[tuple[str, str]]:
        await world.setup(agents=1)
        agent = world.agents[0]
        first = await world.start()
        second = await world.start()
        (a1,) = await world.engine.claim(agent, 1)
        assert a1["context"]["execution_id"] == first
        await world.report(agent, a1)  # queues first's b, after second's a
        taken = []
        for _ in range(3):
            (instruction,) = await world.engine.claim(agent, 1)
            context = instruction["context"]
            taken.append((context["execution_id"], context["step"]))
            await world.report(agent, instruction)
        assert taken[0] == (first, "b")  # not (second, "a"), although queued earlier
        assert taken[1:] == [(second, "a"), (second, "b")]
        return taken

    taken = asyncio.run(scenario())
    assert [step for _, step in taken] == ["b", "a", "b"]


def test_a_queued_step_wakes_one_waiting_agent_not_all(world: World) -> None:
    async def scenario() -> None:
        await world.setup(agents=3)
        claims: list[str] = []
        claim = world.engine.claim

        async def counted(
            agent: AgentIdentity, slots: int, official: bool = False
        ) -> list[dict[str, Any]]:
            claims.append(agent.id)
            return await claim(agent, slots, official)

        world.engine.claim = counted  # type: ignore[method-assign]
        polls = [asyncio.create_task(world.engine.poll(a, 1, wait=3)) for a in world.agents]
        for _ in range(500):
            if len(world.engine.waiters.idle_agents()) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(claims) == 3  # each poll looked once, found nothing and waits
        await world.start()
        done, pending = await asyncio.wait(polls, timeout=1.5, return_when="FIRST_COMPLETED")
        assert len(done) == 1 and len(done.pop().result()) == 1
        await asyncio.sleep(0.2)
        assert len(claims) == 4  # one more look: only the woken agent's
        assert all(not p.done() for p in pending)  # the others still wait, undisturbed
        for task in pending:
            task.cancel()

    asyncio.run(scenario())


def test_work_queued_earlier_for_other_agents_does_not_hide_an_agents_own(world: World) -> None:
    """Label selectors are matched after the query: a claim reads on past a page of work
    that only other agents may take (here 40 steps for GPU agents, queued first)."""

    def one_step(name: str, agents: dict[str, Any] | None = None) -> dict[str, Any]:
        step = {"name": "only", "plugin": "noop", **({"agents": agents} if agents else {})}
        return {"name": name, "version": "1.0.0", "actions": {"steps": [step]}}

    async def scenario() -> dict[str, Any]:
        await world.setup(agents=1)
        async with world.db.write() as conn:
            gpu = one_step("gpu", {"labels": {"gpu": {"exists": True}}})
            await service.apply(conn, world.org, validate(gpu), "", "test")
            await service.apply(conn, world.org, validate(one_step("any")), "", "test")
        for _ in range(40):
            await world.engine.start(world.org, "gpu", {}, "test", {"type": "manual"})
        mine = await world.engine.start(world.org, "any", {}, "test", {"type": "manual"})
        (instruction,) = await world.engine.claim(world.agents[0], 1)
        assert instruction["context"]["execution_id"] == mine
        assert await world.engine.claim(world.agents[0], 1) == []  # the GPU work stays queued
        return instruction

    asyncio.run(scenario())


def test_a_claim_leases_nothing_whose_step_may_not_run(world: World) -> None:
    """The lease and its step's move to running are written together, and only from
    states that allow it: a queued instruction whose step has ended stays queued."""

    async def scenario() -> None:
        await world.setup(agents=1)
        execution_id = await world.start()
        async with world.db.write() as conn:
            await conn.execute(
                step_runs.update()
                .where(step_runs.c.execution_id == execution_id, step_runs.c.name == "a")
                .values(status="succeeded")
            )
        assert await world.engine.claim(world.agents[0], 1) == []
        async with world.db.read() as conn:
            statuses = (await conn.execute(sa.select(instructions.c.status))).scalars().all()
            leased = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(audit_records)
                .where(audit_records.c.action == "instruction.leased")
            )
        assert statuses == ["queued"] and leased == 0

    asyncio.run(scenario())


def test_progress_writes_only_over_what_it_read(world: World) -> None:
    """Progress reads the instruction, then writes only if it still has the agent and
    status it was read with (PostgreSQL holds no lock between the two): the first
    report of `executing` is audited once, with the write; a stale write changes nothing."""

    async def scenario() -> None:
        await world.setup(agents=1)
        await world.start()
        agent = world.agents[0]
        (instruction,) = await world.engine.claim(agent, 1)
        body = {"status": "executing", "execution_log": ["started"]}
        await world.engine.progress(agent, instruction["id"], body)
        await world.engine.progress(agent, instruction["id"], body)  # already executing
        stale = queries.guarded_update(world.db.dialect, ("execution_log",), True)
        params = {
            "row_id": instruction["id"],
            "seen_agent_id": agent.id,
            "seen_status": "leased",  # it is executing by now
            "now": utcnow(),
            "actor": agent.actor,
            "v_execution_log": ["overwritten"],
        }
        async with world.db.single_statements() as conn:
            assert (await conn.execute(stale, params)).first() is None
        async with world.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(instructions.c.status, instructions.c.execution_log).where(
                        instructions.c.id == instruction["id"]
                    )
                )
            ).one()
            executing = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(audit_records)
                .where(audit_records.c.action == "instruction.executing")
            )
        assert tuple(row) == ("executing", ["started"])
        assert executing == 1

    asyncio.run(scenario())
