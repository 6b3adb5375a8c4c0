"""Property: for random workflows and random failure sequences, the engine never crashes,
never deadlocks, never runs a step twice at once, and every execution ends final.

The engine runs in process against a real SQLite file (and PostgreSQL when configured);
the agents are simulated by calling the same engine methods the HTTP handlers call.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stavily.config import Settings
from stavily.errors import Conflict
from stavily.security import bootstrap
from stavily.store import migrate
from stavily.store.db import Database
from stavily.store.models import instructions
from stavily.timeutil import utcnow
from stavily.workflows import service
from stavily.workflows.definition import validate
from stavily.workflows.engine import Engine
from stavily.workflows.states import FINAL_EXECUTION, FINAL_STEP
from tests.harness import fresh_database, make_agents


class World:
    """One database, one engine and three agents on a private event loop."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.db = Database(url)
        self.engine = Engine(self.db, Settings(database_url=url, lease_grace=0))
        self.org, _ = self.run(self._setup())

    async def _setup(self) -> tuple[str, None]:
        await migrate.upgrade(self.db)
        org, _ = await bootstrap(self.db, "stv_property_test_token_0123456789")
        async with self.db.write() as conn:
            self.agents = await make_agents(conn, org, 3, "prop")
        return org, None

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.run(self.db.dispose())
        self.loop.close()


@pytest.fixture(scope="module")
def world(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp(f"prop-{backend}")
    with fresh_database(backend, tmp) as url:
        built = World(url)
        try:
            yield built
        finally:
            built.close()


step_names = [f"s{i}" for i in range(6)]


@st.composite
def workflows(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 6))
    steps = []
    for i in range(count):
        deps = draw(st.lists(st.sampled_from(step_names[:i]), unique=True, max_size=2)) if i else []
        step: dict[str, Any] = {"name": step_names[i], "plugin": "echo", "depends_on": deps}
        if draw(st.booleans()):
            step["error_handling"] = {
                "max_retries": draw(st.integers(0, 2)),
                "on_failure": draw(st.sampled_from(["fail", "continue"])),
            }
        if draw(st.integers(0, 4)) == 0:
            step["when"] = draw(st.sampled_from(["true", "false", "inputs.go"]))
        if draw(st.integers(0, 4)) == 0:
            step["for_each"] = list(range(draw(st.integers(0, 3))))
            step["parallel"] = draw(st.integers(1, 2))
        steps.append(step)
    outputs = []
    if draw(st.booleans()):
        outputs.append(
            {
                "name": "out",
                "plugin": "echo",
                "run_on": draw(st.sampled_from(["success", "failure", "always"])),
            }
        )
    return {
        "name": f"prop-{uuid.uuid4().hex[:8]}",
        "actions": {"steps": steps},
        "outputs": {"steps": outputs},
    }


# What happens to each instruction an agent takes.
fates = st.lists(
    st.sampled_from(["complete", "complete", "complete", "fail", "expire", "cancel", "rerun"]),
    min_size=1,
    max_size=60,
)


async def _expire_all(world: World) -> None:
    """Make every live lease overdue, as if the agents died, then let the reaper run."""
    async with world.db.write() as conn:
        await conn.execute(
            instructions.update()
            .where(instructions.c.status.in_(("leased", "executing")))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    await world.engine.expire_leases()


async def _drive(world: World, data: dict[str, Any], script: list[str]) -> dict[str, Any]:
    definition = validate(data)
    async with world.db.write() as conn:
        await service.apply(conn, world.org, definition, "generated", "test")
    execution_id = await world.engine.start(
        world.org, definition.name, {"go": True}, "test", {"type": "manual"}
    )
    fate = iter(script)
    for _ in range(400):  # a bound: an execution that never ends is a deadlock
        async with world.db.read() as conn:
            execution = await world.engine.get_execution(conn, world.org, execution_id)
        if execution["status"] in FINAL_EXECUTION:
            action = next(fate, None)
            if action != "rerun" or execution["status"] == "succeeded":
                return execution
            await world.engine.rerun(world.org, execution_id, "test")
            continue
        active = [s for s in execution["steps"] if s["status"] in ("queued", "running")]
        # never two live attempts of one step
        async with world.db.read() as conn:
            live = (
                await conn.execute(
                    sa.select(instructions.c.step_run_id, sa.func.count())
                    .where(
                        instructions.c.execution_id == execution_id,
                        instructions.c.status.in_(("queued", "leased", "executing")),
                    )
                    .group_by(instructions.c.step_run_id)
                )
            ).all()
        assert all(count == 1 for _, count in live), live
        claimed = []
        for agent in world.agents:
            claimed += [(agent, i) for i in await world.engine.claim(agent, 4)]
        if not claimed:
            if active and all(s["next_attempt_at"] for s in active if s["status"] == "queued"):
                async with world.db.write() as conn:  # skip retry delays
                    await conn.execute(
                        instructions.update()
                        .where(instructions.c.status == "queued")
                        .values(available_at=None)
                    )
                continue
            assert not active or any(s["status"] == "running" for s in active), execution
            await _expire_all(world)
            continue
        for agent, instruction in claimed:
            action = next(fate, "complete")
            try:
                if action == "fail":
                    await world.engine.result(
                        agent,
                        instruction["id"],
                        {"status": "failed", "error_message": "x"},
                        uuid.uuid4().hex,
                    )
                elif action == "expire":
                    await _expire_all(world)
                elif action == "cancel":
                    await world.engine.cancel(world.org, execution_id, "test")
                else:
                    await world.engine.result(
                        agent,
                        instruction["id"],
                        {"status": "completed", "result": {"ok": 1}},
                        uuid.uuid4().hex,
                    )
            except Conflict:
                pass  # a report for an attempt that was retired meanwhile: refused, fine
    raise AssertionError("the execution did not end: deadlock")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=workflows(), script=fates)
def test_every_execution_ends_in_a_final_state(
    world: World, data: dict[str, Any], script: list[str]
) -> None:
    execution = world.run(_drive(world, data, script))
    assert execution["status"] in FINAL_EXECUTION
    for step in execution["steps"]:
        assert step["status"] in FINAL_STEP, step
    if execution["status"] == "succeeded":
        blocking = [
            s
            for s in execution["steps"]
            if s["status"] == "failed" and s["parent"] is None and s["stage"] == "actions"
        ]
        assert all(
            next(d for d in data["actions"]["steps"] if d["name"] == s["name"])
            .get("error_handling", {})
            .get("on_failure")
            == "continue"
            for s in blocking
        )
