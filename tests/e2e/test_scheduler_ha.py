"""Two `stavily serve` processes on one PostgreSQL database: the scheduler fires on the
one holding the `scheduler` lease only, and when that one is killed (-9: no release)
the other takes over once the lease expires, each fire time run once.

Each fire time's idempotency key would hide two leaders firing the same times (the
second's insert is a duplicate), so the test also checks who fired: while the leader
lives, the lease row names it alone and only it logs "lease taken"; every schedule event
is logged (`event`, with its id) by the process that stored it, the leader's before the
kill and the other's after; and the takeover comes when the lease has expired, not
before, and within a tick or two after."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.e2e.support import CLI, Process, Processes, Stack, wait_healthy, wait_until
from tests.harness import PG_URL, fresh_database, on_database

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: HA needs it"),
]

TTL = 4.0
TICK = 0.5


def holder(url: str) -> str | None:
    async def read(conn: Any) -> str | None:
        row = (
            await conn.execute(sa.text("SELECT holder FROM leases WHERE name = 'scheduler'"))
        ).first()
        return row.holder if row else None

    return on_database(url, read)  # type: ignore[no-any-return]


def pid_of(lease_holder: str) -> int:
    return int(lease_holder.split(":")[-2])  # host:pid:random (services.leader.holder_id)


def fire_times(stack: Stack, workflow: str) -> list[str]:
    """Each run's fire time (one entry per execution, so a time run twice shows twice)."""
    runs = stack.api.get("/api/v1/executions", params={"workflow": workflow, "limit": 500})
    assert runs.status_code == 200, runs.text
    return [r["trigger"]["payload"]["scheduled_for"] for r in runs.json()["executions"]]


def schedule_events(stack: Stack, workflow: str) -> dict[str, dict[str, Any]]:
    found = stack.api.get("/api/v1/events", params={"source": "schedule", "limit": 1000})
    assert found.status_code == 200, found.text
    return {e["id"]: e for e in found.json()["events"] if e["workflow"] == workflow}


def leases_taken(server: Process) -> list[dict[str, Any]]:
    return [e for e in server.logged("lease taken") if e["lease"] == "scheduler"]


def events_stored(server: Process) -> set[str]:
    """The ids of the schedule events this process stored (it logs each new one)."""
    return {e["event_id"] for e in server.logged("event") if e.get("source") == "schedule"}


def at(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def test_one_leader_fires_and_another_takes_over(processes: Processes, tmp_path: Path) -> None:
    t0 = time.monotonic()
    mark = lambda what: print(f"{time.monotonic() - t0:6.1f}s {what}", flush=True)  # noqa: E731
    with fresh_database("postgresql", tmp_path) as url:
        stacks = [Stack(processes, tmp_path, url) for _ in range(2)]
        try:
            for stack in stacks:
                env = {
                    **stack.server_env(),
                    "STAVILY_SCHEDULER_TICK": str(TICK),
                    "STAVILY_SCHEDULER_LEASE_TTL": str(TTL),
                }
                args = [*CLI, "serve", "--port", str(stack.port)]
                stack.server = processes.start("serve", args, env)
                wait_healthy(stack.url, stack.server)  # the first migrates the database
            mark("healthy")
            name = f"ha-{uuid.uuid4().hex[:6]}"
            stacks[0].apply(
                {
                    "name": name,
                    "agents": {"single_agent": "nobody"},  # the runs wait: only starts count
                    "schedules": [{"every": "1s", "misfire": "all"}],
                    "actions": {"steps": [{"name": "a", "plugin": "echo"}]},
                }
            )

            # While the leader lives, the lease row names one process, all along.
            holders: set[str | None] = set()

            def three_fires() -> bool:
                holders.add(holder(url))
                return len(fire_times(stacks[1], name)) >= 3

            wait_until(three_fires, 15, "three fires", interval=0.2)
            mark("three fires")
            holders.discard(None)  # before the first tick
            assert len(holders) == 1, holders
            [lease] = holders
            pids = {stack.server.pid: stack for stack in stacks}  # type: ignore[union-attr]
            assert pid_of(lease) in pids, (lease, list(pids))
            leader = pids[pid_of(lease)]
            follower = next(s for s in stacks if s is not leader)
            assert leader.server is not None and follower.server is not None
            assert holder(url) == lease

            # Only the leader ever took the lease; only it stored schedule events.
            assert {e["holder"] for e in leases_taken(leader.server)} == {lease}
            assert leases_taken(follower.server) == []
            assert events_stored(follower.server) == set()

            before = fire_times(follower, name)
            processes.kill(leader.server)
            killed = time.time()
            killed_monotonic = time.monotonic()
            latest = max(before)

            def fired_since() -> list[str]:
                return [t for t in fire_times(follower, name) if t > latest]

            wait_until(lambda: len(fired_since()) >= 1, 12, "the follower to fire")
            took = time.monotonic() - killed_monotonic
            mark(f"the follower fired {took:.1f}s after the kill")
            takes = leases_taken(follower.server)
            new_lease = holder(url)
            assert new_lease is not None and {e["holder"] for e in takes} == {new_lease}
            taken = takes[0]
            assert pid_of(new_lease) == follower.server.pid
            # Not before the lease expired: the leader renewed it at most a tick before it
            # died, for TTL seconds; and at the follower's first tick after that.
            after = at(taken["timestamp"]) - killed
            mark(f"the follower took the lease {after:.1f}s after the kill")
            assert TTL - TICK - 0.5 <= after <= TTL + 2 * TICK + 0.5, after
            assert took < TTL + 2 * TICK + 2, took
            wait_until(lambda: len(fired_since()) >= 3, 10, "fires to go on")
            mark("fires went on")

            times = fire_times(follower, name)
            assert len(times) == len(set(times)), sorted(times)  # no time run twice
            # misfire: all - the times missed during the takeover were fired too: no gap
            instants = sorted(datetime.fromisoformat(t) for t in times)
            gaps = {b - a for a, b in zip(instants, instants[1:], strict=False)}
            assert gaps == {timedelta(seconds=1)}, sorted(gaps)

            # Every schedule event was stored by the process leading at the time: the
            # leader's before the kill, the follower's after (it logs each it stores).
            by_leader, by_follower = events_stored(leader.server), events_stored(follower.server)
            assert not by_leader & by_follower
            found = schedule_events(follower, name)
            fired = [e["payload"]["scheduled_for"] for e in found.values()]
            assert len(fired) == len(set(fired)) >= len(times), sorted(fired)
            for event_id, event in found.items():
                created = at(event["created_at"])
                if event_id in by_follower:
                    assert created >= at(taken["timestamp"]) - 0.5, event
                elif event_id in by_leader:
                    assert created <= killed + 0.5, event
                else:
                    # killed between its commit and its log line: only the last instant
                    assert abs(created - killed) < 1, event
            unlogged = set(found) - by_leader - by_follower
            assert len(unlogged) <= 1, unlogged
        finally:
            for stack in stacks:
                stack.close()
            mark("closed")
