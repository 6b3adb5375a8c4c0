"""Two `stavily serve` processes on one PostgreSQL database: the scheduler fires on the
one holding the `scheduler` lease only, and when that one is killed (-9: no release)
the other takes over once the lease expires, each fire time run once."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.e2e.support import CLI, Processes, Stack, wait_healthy, wait_until
from tests.harness import PG_URL, fresh_database, on_database

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: HA needs it"),
]

TTL = 4.0


def holder(url: str) -> str | None:
    async def read(conn: Any) -> str | None:
        row = (
            await conn.execute(sa.text("SELECT holder FROM leases WHERE name = 'scheduler'"))
        ).first()
        return row.holder if row else None

    return on_database(url, read)  # type: ignore[no-any-return]


def fire_times(stack: Stack, workflow: str) -> list[str]:
    """Each run's fire time (one entry per execution, so a time run twice shows twice)."""
    runs = stack.api.get("/api/v1/executions", params={"workflow": workflow, "limit": 500})
    assert runs.status_code == 200, runs.text
    return [r["trigger"]["payload"]["scheduled_for"] for r in runs.json()["executions"]]


def test_one_leader_fires_and_another_takes_over(processes: Processes, tmp_path: Path) -> None:
    t0 = time.monotonic()
    mark = lambda what: print(f"{time.monotonic() - t0:6.1f}s {what}", flush=True)  # noqa: E731
    with fresh_database("postgresql", tmp_path) as url:
        stacks = [Stack(processes, tmp_path, url) for _ in range(2)]
        try:
            for stack in stacks:
                env = {
                    **stack.server_env(),
                    "STAVILY_SCHEDULER_TICK": "0.5",
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
            wait_until(lambda: len(fire_times(stacks[1], name)) >= 3, 15, "three fires")
            mark("three fires")
            lease = holder(url)
            assert lease is not None
            pids = {stack.server.pid: stack for stack in stacks}  # type: ignore[union-attr]
            leader_pid = int(lease.split(":")[-2])
            assert leader_pid in pids, (lease, list(pids))
            leader = pids[leader_pid]
            follower = next(s for s in stacks if s is not leader)

            before = fire_times(follower, name)
            processes.kill(leader.server)  # type: ignore[arg-type]
            killed = time.monotonic()
            latest = max(before)

            def fired_since() -> list[str]:
                return [t for t in fire_times(follower, name) if t > latest]

            wait_until(lambda: len(fired_since()) >= 1, 12, "the follower to fire")
            took = time.monotonic() - killed
            mark(f"took over in {took:.1f}s")
            assert took < 10, took
            new_lease = holder(url)
            assert new_lease is not None and int(new_lease.split(":")[-2]) == follower.server.pid  # type: ignore[union-attr]
            wait_until(lambda: len(fired_since()) >= 3, 10, "fires to go on")

            mark("fires went on")
            times = fire_times(follower, name)
            assert len(times) == len(set(times)), sorted(times)  # no time run twice
            # misfire: all - the times missed during the takeover were fired too: no gap
            instants = sorted(datetime.fromisoformat(t) for t in times)
            gaps = {b - a for a, b in zip(instants, instants[1:], strict=False)}
            assert gaps == {timedelta(seconds=1)}, sorted(gaps)
        finally:
            for stack in stacks:
                stack.close()
            mark("closed")
