"""`GET /api/v1/audit` filters (subject, action, since) and `stavily audit list`, and
`stavily workflow apply` of an unchanged definition: over real HTTP, on each database."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Invoke, Orchestrator


def _source(name: str, message: str = "hi") -> str:
    return (
        f"name: {name}\nactions:\n  steps:\n"
        f"    - {{name: only, plugin: echo, config: {{message: {message}}}}}\n"
    )


def _apply(orch: Orchestrator, source: str) -> dict[str, Any]:
    response = orch.api.post(
        "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def _audit(orch: Orchestrator, **params: Any) -> httpx.Response:
    return orch.api.get("/api/v1/audit", params=params)


def _records(orch: Orchestrator, **params: Any) -> list[dict[str, Any]]:
    response = _audit(orch, **params)
    assert response.status_code == 200, response.text
    return response.json()["records"]  # type: ignore[no-any-return]


@pytest.fixture
def workflow(orchestrator: Orchestrator) -> dict[str, Any]:
    """A workflow applied twice (versions 1 and 2): two `workflow.applied` records."""
    name = f"audited-{uuid.uuid4().hex[:8]}"
    _apply(orchestrator, _source(name))
    return _apply(orchestrator, _source(name, "two"))


# --- the API ------------------------------------------------------------------------------


def test_audit_filters_by_action(orchestrator: Orchestrator, workflow: dict[str, Any]) -> None:
    agent_id, _ = orchestrator.create_agent()
    subject = workflow["id"]
    applied = _records(orchestrator, subject_id=subject, action="workflow.applied")
    assert [r["details"]["version"] for r in applied] == [2, 1]  # newest first
    assert {r["action"] for r in applied} == {"workflow.applied"}
    # `.*`: every action under the prefix; otherwise the action exactly
    assert len(_records(orchestrator, subject_id=subject, action="workflow.*")) == 2
    assert _records(orchestrator, subject_id=subject, action="workflow.appl") == []
    assert _records(orchestrator, subject_id=subject, action="agent.*") == []
    agents = _records(orchestrator, action="agent.*", limit=1000)
    assert agents and all(r["action"].startswith("agent.") for r in agents)
    assert agent_id in {r["subject_id"] for r in agents}
    # a prefix is text, not a pattern
    assert _records(orchestrator, action="work%.*") == []
    assert _records(orchestrator, action="workflow_applied") == []
    assert len(_records(orchestrator, subject_id=subject, limit=1)) == 1


def test_audit_filters_by_time(orchestrator: Orchestrator, workflow: dict[str, Any]) -> None:
    subject = workflow["id"]
    both = _records(orchestrator, subject_id=subject)
    assert len(both) == 2
    assert len(_records(orchestrator, subject_id=subject, since="1h")) == 2
    assert len(_records(orchestrator, subject_id=subject, since="1.5D")) == 2
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert _records(orchestrator, subject_id=subject, since=future) == []
    # from the newer record's time on: it alone (with an offset, `Z`, or none: UTC)
    newer = both[0]["created_at"]
    assert newer.endswith("Z")
    for since in (newer, newer.removesuffix("Z"), newer.replace("Z", "+00:00")):
        found = _records(orchestrator, subject_id=subject, since=since)
        assert [r["details"]["version"] for r in found] == [2], since
    # the same instant in another zone
    at = datetime.fromisoformat(newer).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert at.endswith("+02:00")
    assert len(_records(orchestrator, subject_id=subject, since=at)) == 1


@pytest.mark.parametrize(
    "since", ["yesterday", "10x", "-1h", "1 hour", "2026-13-01", "99999999999999999999w", ""]
)
def test_a_bad_since_is_422(orchestrator: Orchestrator, since: str) -> None:
    response = _audit(orchestrator, since=since)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["message"] == "the request is invalid"
    assert [p["path"] for p in error["details"]] == ["query:since"]
    assert "30m, 1h or 7d" in error["details"][0]["message"]


def test_audit_filters_are_validated(orchestrator: Orchestrator) -> None:
    for params in ({"limit": 0}, {"action": "a" * 101}, {"since": "1" * 65}):
        response = _audit(orchestrator, **params)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_input"


# --- the CLI ------------------------------------------------------------------------------


def test_workflow_apply_says_unchanged(cli: Invoke, tmp_path: Path) -> None:
    name = f"cli-same-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "flow.yaml"
    path.write_text(_source(name))
    first = cli("workflow", "apply", str(path))
    assert first.exit_code == 0, first.output
    assert f"applied workflow {name} version 1" in first.stdout
    path.write_text("# a comment, and more space\n\n" + _source(name).replace(": ", ":   "))
    again = cli("workflow", "apply", str(path))
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == f"workflow {name} unchanged (version 1)"
    as_json = cli("workflow", "apply", str(path), "-o", "json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["unchanged"] is True
    assert json.loads(as_json.stdout)["version"] == 1
    path.write_text(_source(name, "changed"))
    changed = cli("workflow", "apply", str(path), "-o", "json")
    assert json.loads(changed.stdout)["unchanged"] is False
    assert json.loads(changed.stdout)["version"] == 2


def test_audit_list_table_and_json(cli: Invoke, workflow: dict[str, Any]) -> None:
    subject = workflow["id"]
    listed = cli("audit", "list", "--subject", subject)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["time", "actor", "action", "subject", "details"]
    rows = [line for line in lines[1:] if line.strip()]
    assert len(rows) == 2
    for row, version in zip(rows, (2, 1), strict=True):
        assert "workflow.applied" in row and f"workflow {subject}" in row
        assert f"name={workflow['name']}, version={version}" in row
        assert row[:4].isdigit()  # the time first: 2026-...

    filtered = cli(
        "audit",
        "list",
        "--subject",
        subject,
        "--action",
        "workflow.applied",
        "--since",
        "1h",
        "--limit",
        "1",
        "--output",
        "json",
    )
    assert filtered.exit_code == 0, filtered.output
    records = json.loads(filtered.stdout)["records"]
    assert len(records) == 1 and records[0]["details"]["version"] == 2
    assert records[0]["subject_id"] == subject

    none = cli("audit", "list", "--subject", subject, "--since", "2999-01-01T00:00:00Z")
    assert none.exit_code == 0
    assert none.stdout.strip() == "no audit records"
    empty_json = cli("audit", "list", "--subject", f"nope-{subject}", "-o", "json")
    assert json.loads(empty_json.stdout) == {"records": []}


def test_audit_list_errors(cli: Invoke, orchestrator: Orchestrator) -> None:
    bad = cli("audit", "list", "--since", "yesterday")
    assert bad.exit_code == 2
    assert "error: the request is invalid" in bad.stderr
    assert "  query:since: 'yesterday' is neither a time ago" in bad.stderr
    as_json = cli("audit", "list", "--since", "yesterday", "-o", "json")
    assert as_json.exit_code == 2
    assert json.loads(as_json.stderr)["error"]["details"][0]["path"] == "query:since"
    assert cli("audit", "list", "--limit", "0").exit_code == 2  # refused before asking
    unauthorized = cli("audit", "list", env={"STAVILY_TOKEN": "stv_wrong_token_0123456789abcdef"})
    assert unauthorized.exit_code == 5
    assert "error:" in unauthorized.stderr
