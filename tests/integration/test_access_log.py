"""The access log (issue 21): operators' requests each in one structured line, never a
credential or a query string; agents' routine requests counted, their refusals logged."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import structlog

from tests.harness import Orchestrator, SimAgent


def _access(logs: list[dict]) -> list[dict]:
    names = ("request", "request refused", "agent requests")
    return [entry for entry in logs if entry["event"] in names]


def test_requests_are_logged_without_credentials_and_agents_only_when_refused(
    orchestrator: Orchestrator,
) -> None:
    agent = SimAgent(orchestrator)
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    with structlog.testing.capture_logs() as logs:
        assert orchestrator.api.get("/api/v1/agents", params={"secret": "s3cr3t"}).is_success
        assert orchestrator.client("stv_wrong_" + "x" * 40).get("/api/v1/agents").status_code == 401
        beat = {"timestamp": stamp, "status": "online"}
        assert agent.client.post(f"/agents/v1/{agent.id}/heartbeat", json=beat).is_success
        refused = orchestrator.agent_client("stva_unknown")
        assert refused.post(f"/agents/v1/{agent.id}/heartbeat", json=beat).status_code == 401
        assert orchestrator.api.get("/healthz").is_success
        # a flood of refused requests from the same source: counted, not a line each (the
        # same credential, which blocks no one: a new one each time would block the source)
        wrong = orchestrator.client("stv_wrong_" + "x" * 40)
        assert all(wrong.get("/api/v1/agents").status_code == 401 for _ in range(20))
        time.sleep(0.05)
    lines = _access(logs)
    listed = [e for e in lines if e.get("path") == "/api/v1/agents"]
    assert [(e["method"], e["status"]) for e in listed] == [("GET", 200), ("GET", 401)]
    assert all(e["log_level"] == "info" and e["ms"] >= 0 and e["client"] for e in listed)
    agents = [e for e in lines if str(e.get("path", "")).startswith("/agents/v1/")]
    assert [e["status"] for e in agents] == [401]  # the accepted heartbeat is only counted
    assert not [e for e in lines if e.get("path") == "/healthz"]
    text = repr(lines)
    assert "s3cr3t" not in text and "stv_wrong" not in text and "stva_unknown" not in text
    assert orchestrator.token not in text and agent.key not in text
