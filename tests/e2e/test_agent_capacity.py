"""The reference agent with several slots: concurrent steps, piggybacked results, system
figures in its heartbeats, drain, and a graceful stop with several steps running."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import (
    CLI,
    HEARTBEAT_INTERVAL,
    POLL_WAIT,
    SLOW_PLUGIN,
    Process,
    Stack,
    base_env,
    marker_lines,
    wait_until,
    workflow,
    write_plugin,
)
from tests.harness import fresh_database

pytestmark = pytest.mark.e2e


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is under test is the agent's slots and its drain; the server's side of it runs on
    both databases in the integration tests."""
    with fresh_database("sqlite", tmp_path) as url:
        yield url


# Sleeps `seconds` and writes when it started and ended to `<folder>/<step>.json`.
TIMED_PLUGIN = """
started = time.time()
time.sleep(float(config["seconds"]))
with open(os.path.join(config["folder"], context["step"] + ".json"), "w") as handle:
    json.dump({"started": started, "ended": time.time()}, handle)
json.dump({"step": context["step"]}, sys.stdout)
"""


def _agent(stack: Stack, plugins: Path, prefix: str, capacity: int) -> tuple[str, str, Process]:
    """An agent of `capacity` on the server and on its command line, started and online."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    response = stack.api.post("/api/v1/agents", json={"name": name, "capacity": capacity})
    assert response.status_code == 201, response.text
    agent_id, key = response.json()["agent_id"], response.json()["api_key"]
    args = [
        *CLI,
        "agent",
        "run",
        "--url",
        stack.url,
        "--agent-id",
        agent_id,
        "--token",
        key,
        "--plugins-dir",
        str(plugins),
        "--heartbeat-interval",
        HEARTBEAT_INTERVAL,
        "--poll-wait",
        POLL_WAIT,
        "--capacity",
        str(capacity),
    ]
    process = stack.processes.start("agent", args, base_env())
    wait_until(
        lambda: stack.agent(agent_id)["status"] == "online", timeout=10, what="the agent online"
    )
    return name, agent_id, process


def _at(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def test_capacity_runs_steps_at_once_and_heartbeats_carry_system_figures(
    stack: Stack, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "timed", TIMED_PLUGIN)
    times = tmp_path / "times"
    times.mkdir()
    agent_name, agent_id, _ = _agent(stack, plugins, "wide-agent", capacity=3)
    name = f"wide-{uuid.uuid4().hex[:6]}"
    steps = [
        {
            "name": step,
            "plugin": "timed",
            "timeout": "30s",
            "config": {"seconds": 1.5, "folder": str(times)},
        }
        for step in ("one", "two", "three")
    ]
    stack.apply(workflow(name, agent_name, steps))
    execution_id = stack.run(name)["id"]
    done = stack.wait_finished(execution_id, timeout=20)

    assert done["status"] == "succeeded", done
    for step in done["steps"]:
        assert step["status"] == "succeeded", step
        assert step["attempts"] == 1, step
        assert step["agent_id"] == agent_id, step
    # All three plugins were running at the same moment...
    runs = [json.loads((times / f"{s}.json").read_text()) for s in ("one", "two", "three")]
    assert max(r["started"] for r in runs) < min(r["ended"] for r in runs), runs
    # ...so the three steps took well under 3 x 1.5 s, start to finish.
    span = max(_at(s["finished_at"]) for s in done["steps"]) - min(
        _at(s["started_at"]) for s in done["steps"]
    )
    assert span < 3.0, (span, done["steps"])

    # Its heartbeats say what it runs and what its machine looks like (cpu_percent from the
    # second heartbeat on: the first one only starts the measurement).
    def idle_facts() -> dict[str, Any] | None:
        facts = stack.agent(agent_id)["facts"] or {}
        return facts if facts.get("running") == [] and "cpu_percent" in facts else None

    facts = wait_until(idle_facts, timeout=5, what="a heartbeat after the steps")
    assert facts["capacity"] == 3, facts
    assert facts["heartbeat_interval"] == float(HEARTBEAT_INTERVAL), facts
    assert isinstance(facts["cpu_count"], int) and facts["cpu_count"] >= 1, facts
    assert facts["memory_total_bytes"] > 0, facts
    for key in ("cpu_percent", "memory_percent", "disk_percent"):
        assert 0 <= facts[key] <= 100, (key, facts)
    assert len(facts["load"]) == 3 and all(v >= 0 for v in facts["load"]), facts


def test_results_bring_the_next_step_of_a_chain(stack: Stack, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_PLUGIN)
    marker = tmp_path / "runs.txt"
    agent_name, agent_id, agent = _agent(stack, plugins, "chain-agent", capacity=1)
    names = ["a", "b", "c", "d"]
    steps: list[dict[str, Any]] = [
        {"name": step, "plugin": "slow", "config": {"seconds": 0, "marker": str(marker)}}
        for step in names
    ]
    for previous, step in zip(steps, steps[1:], strict=False):
        step["depends_on"] = [previous["name"]]
    name = f"chain-{uuid.uuid4().hex[:6]}"
    stack.apply(workflow(name, agent_name, steps))
    execution_id = stack.run(name)["id"]
    done = stack.wait_finished(execution_id, timeout=20)

    assert done["status"] == "succeeded", done
    assert marker_lines(marker) == names
    instructions = {s["name"]: s["instruction_id"] for s in done["steps"]}
    # The first step came with a poll; each next one with the result of the one before.
    piggybacked = [e["instruction_id"] for e in agent.logged("piggybacked")]
    assert piggybacked == [instructions[n] for n in names[1:]], (piggybacked, instructions)
    assert len(agent.logged("instruction finished")) == len(names)


def test_drain_finishes_the_running_step_takes_nothing_new_and_keeps_heartbeating(
    stack: Stack, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_PLUGIN)
    marker = tmp_path / "runs.txt"
    # Two slots: a poll is held open for the free one while the first step runs.
    agent_name, agent_id, agent = _agent(stack, plugins, "drain-agent", capacity=2)
    first, second = f"drained-{uuid.uuid4().hex[:6]}", f"later-{uuid.uuid4().hex[:6]}"
    stack.apply(
        workflow(
            first,
            agent_name,
            [{"name": "long", "plugin": "slow", "config": {"seconds": 3, "marker": str(marker)}}],
        )
    )
    stack.apply(
        workflow(
            second,
            agent_name,
            [{"name": "new", "plugin": "slow", "config": {"seconds": 0, "marker": str(marker)}}],
        )
    )
    first_id = stack.run(first)["id"]
    wait_until(lambda: marker_lines(marker) == ["long"], timeout=10, what="the first step")

    response = stack.api.post(f"/api/v1/agents/{agent_id}/drain")
    assert response.status_code == 200, response.text
    # The next heartbeat's answer tells the agent; it stops polling.
    wait_until(
        lambda: agent.logged("draining: finishing the running instructions and taking no new work"),
        timeout=5,
        what="the agent to log the drain",
    )
    second_id = stack.run(second)["id"]

    # The running step finishes and is reported.
    done = stack.wait_finished(first_id, timeout=15)
    assert done["status"] == "succeeded", done
    assert done["steps"][0]["attempts"] == 1, done
    # Heartbeats go on: last_heartbeat_at advances while the agent takes nothing.
    seen = stack.agent(agent_id)["last_heartbeat_at"]
    wait_until(
        lambda: stack.agent(agent_id)["last_heartbeat_at"] > seen,
        timeout=5,
        what="another heartbeat",
    )
    wait_until(
        lambda: stack.agent(agent_id)["last_heartbeat_at"] > seen,
        timeout=5,
        what="another heartbeat",
    )
    # Longer than a poll's wait after the drain: the new step is still waiting for an agent.
    new = stack.step(second_id, "new")
    assert new["status"] == "queued", new
    assert new["agent_id"] is None, new
    assert marker_lines(marker) == ["long"]
    assert agent.running
    view = stack.agent(agent_id)
    assert view["status"] == "draining", view
    assert (view["facts"] or {}).get("running") == [], view
    assert (
        len(agent.logged("draining: finishing the running instructions and taking no new work"))
        == 1
    )

    # Enabled again, it takes work again without a restart.
    response = stack.api.post(f"/api/v1/agents/{agent_id}/enable")
    assert response.status_code == 200, response.text
    later = stack.wait_finished(second_id, timeout=10)
    assert later["status"] == "succeeded", later
    assert later["steps"][0]["agent_id"] == agent_id
    assert len(agent.logged("drain lifted: taking work again")) == 1


def test_sigterm_finishes_every_running_step_then_goes_offline(
    stack: Stack, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_PLUGIN)
    marker = tmp_path / "runs.txt"
    agent_name, agent_id, agent = _agent(stack, plugins, "stop-agent", capacity=3)
    name = f"stopped-{uuid.uuid4().hex[:6]}"
    steps = [
        {
            "name": step,
            "plugin": "slow",
            "timeout": "30s",
            "config": {"seconds": 1.5, "marker": str(marker)},
        }
        for step in ("one", "two")
    ]
    steps.append(
        {
            "name": "after",
            "plugin": "slow",
            "depends_on": ["one", "two"],
            "config": {"seconds": 0, "marker": str(marker)},
        }
    )
    stack.apply(workflow(name, agent_name, steps))
    execution_id = stack.run(name)["id"]
    wait_until(
        lambda: sorted(marker_lines(marker)) == ["one", "two"],
        timeout=10,
        what="both plugins to start",
    )
    agent.popen.send_signal(signal.SIGTERM)

    assert agent.wait(timeout=15) == 0
    execution = stack.execution(execution_id)
    for step in execution["steps"][:2]:
        assert step["status"] == "succeeded", step
        assert step["attempts"] == 1, step
    # Stopping, it asked for nothing more: the last step waits for another agent.
    after = stack.step(execution_id, "after")
    assert after["status"] == "queued", after
    assert after["agent_id"] is None, after
    assert sorted(marker_lines(marker)) == ["one", "two"]
    assert agent.logged("piggybacked") == []
    wait_until(
        lambda: stack.agent(agent_id)["status"] == "offline", timeout=5, what="the agent offline"
    )
