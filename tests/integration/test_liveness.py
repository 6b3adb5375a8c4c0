"""Liveness with agents that speak exactly the official protocol (issue 16, item 2 and 7):
silent while a plugin runs, no query strings, `User-Agent: Stavily-Agent/1.0.0`.

The server runs with a 1 s heartbeat interval, so an agent is degraded after 1.2 s and
offline after 1.5 s of silence: a silence of 4 s is over two and a half offline windows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from stavily.config import Settings
from stavily.fleet.agents import AgentLookups, authenticate_agent, create_agent
from stavily.fleet.liveness import HeartbeatBuffer
from stavily.security import bootstrap
from stavily.security.credentials import CredentialCache
from stavily.store import migrate
from stavily.store.db import Database
from tests.harness import ADMIN_TOKEN, Orchestrator, SimAgent, fresh_database, serve

OFFICIAL_UA = "Stavily-Agent/1.0.0"


@pytest.fixture(scope="module")
def live(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp(f"live-{backend}")
    with (
        fresh_database(backend, tmp) as url,
        serve(url, tmp, heartbeat_interval=1, lease_grace=30, mass_death_min_agents=1000) as orch,
    ):
        yield orch


class Official(SimAgent):
    """An official agent: its User-Agent, no query strings, no `running` in heartbeats."""

    def __init__(self, orch: Orchestrator, name: str) -> None:
        super().__init__(orch, name)
        self.client.headers["User-Agent"] = OFFICIAL_UA

    def beat(self) -> Any:
        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return self.client.post(
            f"/agents/v1/{self.id}/heartbeat", json={"timestamp": stamp, "status": "online"}
        )

    def start(self, instruction: dict[str, Any]) -> None:
        answer = self.client.put(
            f"/agents/v1/{self.id}/instructions/{instruction['id']}", json={"status": "executing"}
        )
        assert answer.status_code == 200, answer.text

    def result(self, instruction: dict[str, Any]) -> Any:
        return self.client.post(
            f"/agents/v1/{self.id}/instructions/{instruction['id']}/result",
            json={"status": "completed", "result": {"execution_result": {"output_data": {}}}},
        )


def health(orch: Orchestrator, agent: SimAgent) -> str:
    answer = orch.api.get(f"/api/v1/agents/{agent.id}")
    assert answer.status_code == 200, answer.text
    return str(answer.json()["status"])


def actions(orch: Orchestrator, agent: SimAgent) -> list[str]:
    records = orch.api.get("/api/v1/audit", params={"subject_id": agent.id}).json()["records"]
    return [r["action"] for r in reversed(records)]


async def agents_with_keys(db: Database, count: int) -> list[tuple[str, str]]:
    await migrate.upgrade(db)
    organization_id, _ = await bootstrap(db, ADMIN_TOKEN)
    made = []
    async with db.write() as conn:
        for i in range(count):
            row, key = await create_agent(
                conn,
                organization_id,
                name=f"k-{uuid.uuid4().hex[:8]}-{i}",
                type="action",
                labels={},
                capacity=1,
                actor="test",
            )
            made.append((row["id"], key))
    return made


def one_step(orch: Orchestrator, tag: str) -> str:
    name = f"live-{tag}"
    orch.apply(
        f"name: {name}\nagents: {{pools: [{{agent_regex: '{tag}-.*'}}]}}\n"
        "actions: {steps: [{name: only, plugin: echo, timeout: 1m}]}\n"
    )
    return name


def taken(a: Official, b: Official) -> tuple[Official, Official, dict[str, Any]]:
    """Whichever of the two the step went to, the other, and the instruction."""
    for taker, other in ((a, b), (b, a)):
        instruction = taker.poll()
        if instruction is not None:
            return taker, other, instruction
    raise AssertionError("neither agent was given the step")


def seen_for(orch: Orchestrator, agent: SimAgent, seconds: float, poll: bool = False) -> set[str]:
    """The states the agent was shown in, sampled every 0.1 s; `poll`: it polls (idle)."""
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if poll:
            assert agent.poll() is None
        seen.add(health(orch, agent))
        time.sleep(0.1)
    return seen


def test_a_silent_official_agent_running_a_step_is_busy_never_degraded_or_offline(
    live: Orchestrator,
) -> None:
    tag = uuid.uuid4().hex[:6]
    agent, other = Official(live, f"{tag}-runs"), Official(live, f"{tag}-idle")
    assert agent.beat().status_code == 200
    execution = live.run(one_step(live, tag))
    runner, idle, instruction = taken(agent, other)
    with structlog.testing.capture_logs() as logs:
        runner.start(instruction)
        time.sleep(0.2)  # known as holding work at the next flush (every 50 ms here)
        # Silent for over two offline windows while its plugin runs.
        assert seen_for(live, runner, 4) == {"busy"}
    # said once, at info; never degraded or offline (its first "online" may fall in here)
    said = [e for e in logs if runner.id in e.get("agents", []) and e["event"] != "agents online"]
    assert [(e["log_level"], e["event"].split(":")[0]) for e in said] == [
        ("info", "agents busy")
    ], said
    summary = live.api.get("/api/v1/fleet").json()
    assert summary["by_state"]["busy"] >= 1
    assert idle.poll() is None  # nothing was taken from it
    assert runner.result(instruction).status_code == 200
    # Acknowledged: online again, with no false offline in the moments after (the old
    # sweep read the deadline from before the silence and declared it offline).
    assert seen_for(live, runner, 0.3, poll=True) <= {"busy", "online"}  # until a flush
    assert seen_for(live, runner, 1.5, poll=True) == {"online"}
    assert live.wait_for(execution["id"])["status"] == "succeeded"
    assert "agent.offline" not in actions(live, runner)
    assert "agent.offline" not in actions(live, idle) or health(live, idle) == "offline"


def test_a_silent_agent_holding_nothing_goes_degraded_then_offline_and_back(
    live: Orchestrator,
) -> None:
    agent = Official(live, f"{uuid.uuid4().hex[:6]}-quiet")
    assert agent.beat().status_code == 200
    time.sleep(0.2)
    assert health(live, agent) == "online"
    with structlog.testing.capture_logs() as logs:
        seen = seen_for(live, agent, 3)
        assert {"degraded", "offline"} <= seen, seen
        assert agent.beat().status_code == 200  # back
        time.sleep(0.3)
        assert health(live, agent) == "online"
    assert actions(live, agent)[-2:] == ["agent.offline", "agent.online"]
    # the server says so, at the level each deserves, naming the agent
    said = [(e["log_level"], e["event"]) for e in logs if agent.id in e.get("agents", [])]
    assert said == [
        ("warning", "agents offline: missed heartbeats"),
        ("info", "agents online"),
    ], said


def test_any_request_from_an_agent_is_a_sign_of_life(live: Orchestrator) -> None:
    """Fetching its plugins' keys (a route of the registry, not of the agent API) keeps
    an agent that sends no heartbeat online."""
    agent = Official(live, f"{uuid.uuid4().hex[:6]}-fetches")
    assert agent.beat().status_code == 200
    seen = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert agent.client.get(f"/agents/v1/{agent.id}/plugins/keys").status_code == 200
        seen.add(health(live, agent))
        time.sleep(0.2)
    assert seen == {"online"}, seen


def test_a_revoked_agent_reporting_its_busy_work_changes_nothing(live: Orchestrator) -> None:
    tag = uuid.uuid4().hex[:6]
    revoked, heir = Official(live, f"{tag}-gone"), Official(live, f"{tag}-heir")
    execution = live.run(one_step(live, tag))
    revoked, heir, instruction = taken(revoked, heir)  # the one holding it is revoked
    revoked.start(instruction)
    assert live.api.post(f"/api/v1/agents/{revoked.id}/revoke").status_code == 200
    assert revoked.result(instruction).status_code == 403
    assert revoked.beat().status_code == 403
    again = heir.poll()
    assert again is not None and again["attempt"] == 2
    assert heir.result(again).status_code == 200
    assert live.wait_for(execution["id"])["status"] == "succeeded"
    assert health(live, revoked) == "revoked"


def test_the_heartbeat_interval_stretches_with_the_fleet_and_deadlines_follow(
    backend: str, tmp_path: Path
) -> None:
    """Past `heartbeat_rate_budget`, agents are told to beat less often and given the
    longer window (an overloaded server slows the beats instead of losing agents)."""
    with (
        fresh_database(backend, tmp_path) as url,
        serve(
            url, tmp_path, heartbeat_interval=2, heartbeat_rate_budget=1, reaper_interval=0.05
        ) as orch,
    ):
        # Heard alone, before there is anything to stretch: its deadline is 1.5 x 2 s.
        early = Official(orch, "s-early")
        assert early.beat().json()["next_heartbeat_interval"] == 2
        agents = [Official(orch, f"s-{i}") for i in range(5)]
        for agent in agents:
            assert agent.beat().status_code == 200
        deadline = time.monotonic() + 5
        told = 2
        while told != 6 and time.monotonic() < deadline:  # counted every 3 sweeps
            time.sleep(0.05)
            told = agents[0].beat().json()["next_heartbeat_interval"]
        assert told == 6  # six live agents at one beat a second
        time.sleep(0.1)
        assert health(orch, agents[0]) == "online"
        # silent for longer than its configured 1.5 x 2 s and the settle time (1 s):
        # still online, told 6 s
        assert seen_for(orch, agents[0], 4.2) == {"online"}
        # and so is the one last heard before the stretch, given the longer window too,
        # though by now silent past its own deadline and the settle time
        assert seen_for(orch, early, 0.5) == {"online"}
        assert "agent.offline" not in actions(orch, early)


def test_stretch_is_bounded_and_off_without_a_budget() -> None:
    buffer = HeartbeatBuffer(Settings(heartbeat_interval=5, heartbeat_rate_budget=100))
    assert buffer.stretch(10) == 5  # within the budget
    assert buffer.stretch(2000) == 20
    assert buffer.stretch(10**9) == 50  # at most ten times
    off = HeartbeatBuffer(Settings(heartbeat_interval=5, heartbeat_rate_budget=0))
    assert off.stretch(10**9) == 5
    # a fleet calling for the first time is not live yet: the agents heard count too
    first = HeartbeatBuffer(Settings(heartbeat_interval=5, heartbeat_rate_budget=10))
    for i in range(300):
        first.record(f"agt_{i}", "online")
    assert first.stretch(0) == 30
    assert first.interval_for("agt_0") == 30  # and its deadlines follow


def test_credential_lookups_of_many_agents_at_once_are_a_few_queries(
    backend: str, tmp_path: Path
) -> None:
    """A server that just started, nothing cached, and every agent calling at once."""
    with fresh_database(backend, tmp_path) as url:
        asyncio.run(_many_at_once(url))


async def _many_at_once(url: str) -> None:
    db = Database(url)
    try:
        keys = await agents_with_keys(db, 300)
        statements: list[str] = []
        sa.event.listen(
            db.engine.sync_engine,
            "before_cursor_execute",
            lambda *args: statements.append(args[2]),
        )
        cache: CredentialCache[Any] = CredentialCache(ttl=60)
        lookups = AgentLookups(db)
        found = await asyncio.gather(
            *(authenticate_agent(lookups, key, agent_id, cache) for agent_id, key in keys),
            authenticate_agent(lookups, keys[0][1], keys[0][0], cache),  # twice at once
        )
        assert [a.id for a in found] == [a for a, _ in keys] + [keys[0][0]]
        selects = [s for s in statements if "FROM agents" in s]
        assert len(selects) == 2, selects  # AgentLookups.AT_ONCE = 250 a query
        # an unknown credential among known ones is refused alone
        refused = await asyncio.gather(
            authenticate_agent(lookups, "stva_unknown", keys[0][0], CredentialCache(60)),
            authenticate_agent(lookups, keys[1][1], keys[1][0], CredentialCache(60)),
            return_exceptions=True,
        )
        assert type(refused[0]).__name__ == "Unauthorized"
        assert refused[1].id == keys[1][0]  # type: ignore[union-attr]
    finally:
        await db.dispose()


def test_a_cached_credential_is_refreshed_in_the_background(backend: str, tmp_path: Path) -> None:
    """Past half its time an entry is looked up again without making the request wait,
    and a change (here: revoked) is seen after the refresh."""
    with fresh_database(backend, tmp_path) as url:
        asyncio.run(_refreshed(url))


async def _refreshed(url: str) -> None:
    db = Database(url)
    try:
        [(agent_id, key)] = await agents_with_keys(db, 1)
        cache: CredentialCache[Any] = CredentialCache(ttl=0.2)
        lookups = AgentLookups(db)
        lookups.REFRESH_EVERY = 0.05
        await authenticate_agent(lookups, key, agent_id, cache)
        async with db.write() as conn:
            await conn.execute(
                sa.text("UPDATE agents SET revoked_at = created_at WHERE id = :id"),
                {"id": agent_id},
            )
        await asyncio.sleep(0.12)  # past half the time: served, refreshed behind
        assert (await authenticate_agent(lookups, key, agent_id, cache)).id == agent_id
        await asyncio.sleep(0.1)
        with pytest.raises(Exception, match="revoked"):
            await authenticate_agent(lookups, key, agent_id, cache)
    finally:
        await db.dispose()
