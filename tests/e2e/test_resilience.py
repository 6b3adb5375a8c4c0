"""Processes dying or stopping in the middle of work: nothing is lost, nothing runs twice."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.support import (
    SLOW_PLUGIN,
    Stack,
    marker_lines,
    recent,
    wait_until,
    workflow,
    write_plugin,
)

pytestmark = pytest.mark.e2e


def _slow_workflow(name: str, agent_name: str, marker: Path, seconds: float) -> dict[str, object]:
    return workflow(
        name,
        agent_name,
        [
            {
                "name": "slow",
                "plugin": "slow-v1.0.0",
                "timeout": "30s",
                "config": {"seconds": seconds, "marker": str(marker)},
            },
            {
                "name": "after",
                "plugin": "slow",
                "depends_on": ["slow"],
                "timeout": "30s",
                "config": {"seconds": 0, "marker": str(marker)},
            },
        ],
    )


def test_server_killed_mid_step_recovers_and_runs_each_step_once(
    stack: Stack, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_PLUGIN)
    marker = tmp_path / "runs.txt"
    name = f"crash-{uuid.uuid4().hex[:6]}"
    agent_name = f"crash-agent-{uuid.uuid4().hex[:6]}"
    agent_id, key = stack.create_agent(agent_name)
    agent = stack.start_agent(agent_id, key, plugins)
    stack.apply(_slow_workflow(name, agent_name, marker, seconds=2))
    execution_id = stack.run(name)["id"]

    wait_until(
        lambda: stack.step(execution_id, "slow")["status"] == "running",
        timeout=10,
        what="the first step to be running",
    )
    # The plugin itself has started: the agent holds the instruction.
    wait_until(
        lambda: marker_lines(marker) == ["slow"], timeout=10, what="the slow plugin to start"
    )
    first_server = stack.server
    assert first_server is not None
    assert stack.processes.kill(first_server) == -signal.SIGKILL

    # The plugin finishes while the server is down: the agent's result POST fails...
    wait_until(
        lambda: "result not delivered yet" in agent.stderr(),
        timeout=10,
        what="the agent to fail delivering its result",
    )
    # ...and is retried until the server is back, on the same database and port.
    stack.start_server()
    done = stack.wait_finished(execution_id, timeout=30)

    assert agent.running
    assert done["status"] == "succeeded", done
    for step in done["steps"]:
        assert step["status"] == "succeeded", step
        assert step["attempts"] == 1, step
        assert step["agent_id"] == agent_id, step
    results = {s["name"]: s["result"] for s in done["steps"]}
    assert results == {"slow": {"step": "slow", "slept": 2}, "after": {"step": "after", "slept": 0}}
    # Each plugin ran exactly once.
    assert marker_lines(marker) == ["slow", "after"]

    actions = [r["action"] for r in stack.audit(execution_id)]
    assert actions.count("execution.started") == 1, actions
    assert actions.count("execution.succeeded") == 1, actions
    assert set(actions) == {"execution.started", "execution.succeeded"}, actions


def test_sigterm_lets_the_agent_finish_report_and_go_offline(stack: Stack, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_PLUGIN)
    marker = tmp_path / "runs.txt"
    name = f"graceful-{uuid.uuid4().hex[:6]}"
    agent_name = f"graceful-agent-{uuid.uuid4().hex[:6]}"
    agent_id, key = stack.create_agent(agent_name)
    agent = stack.start_agent(agent_id, key, plugins)
    wait_until(
        lambda: stack.agent(agent_id)["status"] == "online", timeout=10, what="the agent online"
    )
    stack.apply(_slow_workflow(name, agent_name, marker, seconds=2))
    execution_id = stack.run(name)["id"]

    wait_until(
        lambda: marker_lines(marker) == ["slow"], timeout=10, what="the slow plugin to start"
    )
    assert stack.step(execution_id, "slow")["status"] == "running"
    agent.popen.send_signal(signal.SIGTERM)

    # It finishes the running plugin and exits cleanly.
    assert agent.wait(timeout=15) == 0
    slow = stack.step(execution_id, "slow")
    assert slow["status"] == "succeeded", slow
    assert slow["result"] == {"step": "slow", "slept": 2}
    assert slow["attempts"] == 1
    # Its last heartbeat said offline.
    wait_until(
        lambda: stack.agent(agent_id)["status"] == "offline", timeout=5, what="the agent offline"
    )
    seen = stack.agent(agent_id)
    assert recent(seen["last_heartbeat_at"], seconds=10), seen

    # It took no new work after SIGTERM: the next step waits for another agent.
    after = stack.step(execution_id, "after")
    assert after["status"] == "queued", after
    assert after["agent_id"] is None, after
    assert marker_lines(marker) == ["slow"]
    assert stack.execution(execution_id)["status"] == "running"


def test_agent_stopped_while_idle_gets_no_work_and_restarts_cleanly(
    stack: Stack, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_PLUGIN)
    marker = tmp_path / "runs.txt"
    agent_name = f"idle-agent-{uuid.uuid4().hex[:6]}"
    agent_id, key = stack.create_agent(agent_name)
    # A long poll wait, so that the stop surely lands while a poll is held open.
    agent = stack.start_agent(agent_id, key, plugins, poll_wait="20")
    wait_until(
        lambda: stack.agent(agent_id)["status"] == "online", timeout=10, what="the agent online"
    )
    time.sleep(0.5)  # its first long poll is now held by the server
    agent.popen.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=10) == 0
    wait_until(
        lambda: stack.agent(agent_id)["status"] == "offline", timeout=5, what="the agent offline"
    )

    # Work arrives while the agent is offline, then the agent comes back.
    name = f"idle-{uuid.uuid4().hex[:6]}"
    stack.apply(
        workflow(
            name,
            agent_name,
            [{"name": "one", "plugin": "slow", "config": {"seconds": 0, "marker": str(marker)}}],
        )
    )
    execution_id = stack.run(name)["id"]
    stack.start_agent(agent_id, key, plugins)

    def finished() -> bool:
        return stack.execution(execution_id)["status"] != "running"

    try:
        wait_until(finished, timeout=8, what="the restarted agent to run the step")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; step: {stack.step(execution_id, 'one')}") from None
    done = stack.execution(execution_id)
    assert done["status"] == "succeeded", done
    assert marker_lines(marker) == ["one"]
