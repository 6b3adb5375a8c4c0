"""`stavily serve --workers N`: several server processes on one PostgreSQL database."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.support import (
    CLI,
    SLOW_PLUGIN,
    Processes,
    Stack,
    base_env,
    descendants,
    marker_lines,
    wait_healthy,
    wait_until,
    workflow,
    write_plugin,
)
from tests.harness import PG_URL, fresh_database

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: workers need it")
def test_two_workers_share_the_work_of_one_database(processes: Processes, tmp_path: Path) -> None:
    with fresh_database("postgresql", tmp_path) as url:
        stack = Stack(processes, tmp_path, url)
        try:
            args = [*CLI, "serve", "--port", str(stack.port), "--workers", "2"]
            stack.server = processes.start("serve", args, stack.server_env())
            wait_healthy(stack.url, stack.server)
            wait_until(
                lambda: len(descendants(stack.server.popen.pid)) >= 2,  # type: ignore[union-attr]
                timeout=20,
                what="two worker processes",
            )
            plugins = tmp_path / "plugins"
            write_plugin(plugins, "slow", SLOW_PLUGIN)
            marker = tmp_path / "runs.txt"
            agent_name = f"workers-{uuid.uuid4().hex[:6]}"
            agent_id, key = stack.create_agent(agent_name)
            # The agent's long poll and each run's start land on whichever worker accepts
            # the connection; a run queued by one worker must wake a poll held by the other
            # at once (the agent polls with a 30 s wait). test_replicas pins that down.
            stack.start_agent(agent_id, key, plugins, poll_wait="30")
            step = {"plugin": "slow", "timeout": "30s", "config": {"marker": str(marker)}}
            name = f"workers-{uuid.uuid4().hex[:6]}"
            stack.apply(
                workflow(
                    name,
                    agent_name,
                    [{"name": "a", **step}, {"name": "b", "depends_on": ["a"], **step}],
                )
            )
            for _ in range(4):
                execution = stack.wait_finished(stack.run(name)["id"], timeout=15)
                assert execution["status"] == "succeeded", execution
            assert marker_lines(marker) == ["a", "b"] * 4
        finally:
            stack.close()


def test_workers_refuse_sqlite(tmp_path: Path) -> None:
    env = {**base_env(), "STAVILY_DATA_DIR": str(tmp_path / "data")}
    env.pop("STAVILY_DATABASE_URL", None)
    done = subprocess.run(
        [*CLI, "serve", "--port", "0", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--workers needs PostgreSQL" in done.stderr
