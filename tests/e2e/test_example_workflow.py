"""The quickstart's example workflow, run by a real agent process against a real server:
its plugins published as the quickstart publishes them, and installed by the agent from
the registry (its plugins folder starts empty)."""

from __future__ import annotations

import os
import platform
import socket
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from stavily.cli.quickstart import EXAMPLES, publish_example
from tests.e2e.support import Stack, recent, wait_until

pytestmark = pytest.mark.e2e


def test_hello_stavily_runs_end_to_end(stack: Stack, tmp_path: Path) -> None:
    for manifest in sorted((EXAMPLES / "plugins").glob("*/plugin.yaml")):
        publish_example(stack.api, manifest.parent)
    # The example workflow's pool takes agents named `local-.*`.
    agent_id, key = stack.create_agent(f"local-e2e-{uuid.uuid4().hex[:8]}")
    agent = stack.start_agent(agent_id, key, tmp_path / "plugins")
    applied = stack.apply((EXAMPLES / "workflows" / "hello-stavily.yaml").read_text())
    assert {pin["version"] for pin in applied["plugins"].values()} == {"1.0.0"}

    started = stack.run("hello-stavily", {"who": "e2e"})
    assert started["status"] == "running"
    done = stack.wait_finished(started["id"], timeout=20)

    assert done["status"] == "succeeded", done
    assert done["error"] is None
    steps = {s["name"]: s for s in done["steps"]}
    assert [s["name"] for s in done["steps"]] == ["collect-facts", "greet", "report"]
    for step in done["steps"]:
        assert step["status"] == "succeeded", step
        assert step["attempts"] == 1, step
        assert step["agent_id"] == agent_id, step
        assert step["error"] is None, step
        assert recent(step["started_at"]) and recent(step["finished_at"]), step

    facts = steps["collect-facts"]["result"]
    assert facts["hostname"] == socket.gethostname()
    assert (
        facts["python"] == platform.python_version()
    )  # the agent runs python plugins with its own
    assert facts["cpu_count"] == os.cpu_count()
    assert isinstance(facts["platform"], str) and facts["platform"]

    installed = tmp_path / "plugins" / ".registry"
    assert sorted(p.name for p in installed.iterdir()) == ["echo", "system-info"]

    greet = steps["greet"]["result"]
    assert greet == {
        "echo": {"message": "Hello from Stavily"},
        "step": "greet",
        "inputs": {"who": "e2e"},
    }
    report = steps["report"]["result"]
    assert report["echo"] == {"message": "hello-stavily finished"}
    assert report["step"] == "report"

    # The agent is alive and beating (every second here).
    seen = stack.agent(agent_id)
    assert seen["status"] == "online", seen
    assert recent(seen["last_heartbeat_at"], seconds=10), seen
    assert agent.running
    # And stays online: later heartbeats land too.
    first_beat = datetime.fromisoformat(seen["last_heartbeat_at"])
    wait_until(
        lambda: datetime.fromisoformat(stack.agent(agent_id)["last_heartbeat_at"]) > first_beat,
        timeout=5,
        what="a later heartbeat",
    )
