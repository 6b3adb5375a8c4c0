"""What the server learns of an official agent that says little (issue 16, items 3 and 4):
its version from the User-Agent every request carries, and /health for Stavily's scripts."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import httpx

from tests.harness import Orchestrator


def _beat(orch: Orchestrator, user_agent: str, **fields: object) -> dict:
    agent_id, key = orch.create_agent(f"ua-{uuid.uuid4().hex[:8]}")
    client = orch.agent_client(key)
    client.headers["User-Agent"] = user_agent
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    # official agents send no query string: the fast path takes it; a repeated query
    # parameter sends the same heartbeat through the framework's route instead
    for params in ({}, {"x": ["1", "2"]}):
        answer = client.post(
            f"/agents/v1/{agent_id}/heartbeat",
            json={"timestamp": now, "status": "online", **fields},
            params=params,
        )
        assert answer.status_code == 200, answer.text
    time.sleep(0.2)  # the beats are flushed
    return orch.api.get(f"/api/v1/agents/{agent_id}").json()


def test_the_version_comes_from_the_user_agent_when_the_heartbeat_has_none(
    fresh_orchestrator: Orchestrator,
) -> None:
    orch = fresh_orchestrator
    assert _beat(orch, "Stavily-Agent/1.0.0")["version"] == "1.0.0"
    assert _beat(orch, "Stavily-Agent/2.1.0 (stavily-python)")["version"] == "2.1.0"
    # the heartbeat's own version wins
    assert _beat(orch, "Stavily-Agent/1.0.0", version="3.0.0")["version"] == "3.0.0"
    # anything else is not a version
    assert _beat(orch, "curl/8.5.0").get("version") is None
    assert _beat(orch, "Stavily-Agent/").get("version") is None
    summary = orch.api.get("/api/v1/fleet").json()
    assert summary["by_version"] == {"1.0.0": 1, "2.1.0": 1, "3.0.0": 1, "unknown": 2}


def test_health_answers_what_stavily_scripts_probe_for(orchestrator: Orchestrator) -> None:
    answer = httpx.get(f"{orchestrator.url}/health")  # no credential
    assert answer.status_code == 200
    assert answer.json() == {"status": "healthy"}
    assert answer.headers["content-type"] == "application/json"
