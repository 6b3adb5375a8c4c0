"""The fleet commands (`stavily agent ...`, `stavily enrollment ...`, `stavily fleet status`)
in-process against a real orchestrator on loopback, on each database."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from typer.testing import Result

from tests.harness import Invoke, Orchestrator
from tests.integration.test_fleet_admin import api_token, workflow_for


def _tag() -> str:
    return uuid.uuid4().hex[:6]


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _row(result: Result, first: str) -> list[str]:
    return next(line.split() for line in result.stdout.splitlines() if line.startswith(first))


def _enroll(orch: Orchestrator, secret: str, name: str) -> dict[str, Any]:
    answer = httpx.post(
        f"{orch.url}/agents/v1/register", json={"enrollment_token": secret, "name": name}
    )
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def _poll(orch: Orchestrator, agent_id: str, key: str) -> int:
    client = orch.agent_client(key)
    return client.get(f"/agents/v1/{agent_id}/instructions").status_code


def test_enrollment_create_list_revoke(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    created = _json(
        cli(
            "enrollment",
            "create",
            f"web-{tag}",
            "--label",
            "env=prod",
            "-l",
            "role=web",
            "--capacity",
            "2",
            "--max-uses",
            "3",
            "--expires-in",
            "2h",
            "-o",
            "json",
        )
    )
    assert created["token"].startswith("stve_")
    assert created["labels"] == {"env": "prod", "role": "web"}
    assert (created["capacity"], created["max_uses"], created["agent_type"]) == (2, 3, "action")

    human = cli("enrollment", "create", f"sensors-{tag}", "--type", "sensor", "--unlimited")
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    assert lines[0].startswith(f"enrollment token sensors-{tag} (enr_")
    assert lines[1].startswith("stve_")
    assert "shown only this once; 0/unlimited uses" in lines[2]
    assert "stavily agent run --url" in lines[3] and "--enroll <token>" in lines[3]

    agent = _enroll(orchestrator, created["token"], f"cli-enrolled-{tag}")
    assert agent["labels"] == {"env": "prod", "role": "web"}

    listed = cli("enrollment", "list")
    assert listed.exit_code == 0, listed.output
    assert created["token"] not in listed.stdout and lines[1] not in listed.stdout
    row = _row(listed, created["id"])
    assert row[:6] == [created["id"], f"web-{tag}", "action", "active", "1/3", "2"]
    assert _row(listed, "id")[:4] == ["id", "name", "type", "state"]
    as_json = _json(cli("enrollment", "list", "-o", "json"))["enrollment_tokens"]
    mine = next(t for t in as_json if t["id"] == created["id"])
    assert mine["uses"] == 1 and "token" not in mine

    revoked = cli("enrollment", "revoke", created["id"])
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout.strip() == f"enrollment token web-{tag} ({created['id']}): revoked"
    assert _row(cli("enrollment", "list"), created["id"])[3] == "revoked"
    refused = httpx.post(
        f"{orchestrator.url}/agents/v1/register",
        json={"enrollment_token": created["token"], "name": f"late-{tag}"},
    )
    assert refused.status_code == 401

    missing = cli("enrollment", "revoke", "enr_nope")
    assert missing.exit_code == 3 and "no enrollment token 'enr_nope'" in missing.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--expires-in", "forever"], "--expires-in 'forever' is not a duration"),
        (["--label", "novalue"], "--label 'novalue' is not key=value"),
        (["--expires-in", "31d"], "the request is invalid"),
        (["--type", "robot"], "the request is invalid"),
        (["--max-uses", "0"], "the request is invalid"),
    ],
)
def test_enrollment_create_refuses_bad_input(cli: Invoke, args: list[str], message: str) -> None:
    result = cli("enrollment", "create", "bad", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    scripted = cli("enrollment", "create", "bad", *args, "-o", "json")
    assert json.loads(scripted.stderr)["error"]["code"] == "invalid_input"


def test_agent_list_show_and_operator_states(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    agent_id, key = orchestrator.create_agent(f"cli-{tag}", labels={"zone": "b"}, capacity=4)
    assert _poll(orchestrator, agent_id, key) == 200  # it is alive

    listed = cli("agent", "list")
    assert listed.exit_code == 0, listed.output
    row = _row(listed, agent_id)
    assert row[:5] == [agent_id, f"cli-{tag}", "action", "online", "4"]
    assert row[-1] == "zone=b"
    assert _row(listed, "id")[:4] == ["id", "name", "type", "state"]

    drained = cli("agent", "drain", agent_id)
    assert drained.exit_code == 0, drained.output
    assert drained.stdout.strip() == f"agent cli-{tag} ({agent_id}): draining"
    only = cli("agent", "list", "--state", "draining", "-o", "json")
    assert agent_id in {a["id"] for a in _json(only)["agents"]}
    assert agent_id not in cli("agent", "list", "--state", "online").stdout

    shown = cli("agent", "show", agent_id)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0] == f"cli-{tag}  draining"
    facts = dict(line.split(None, 1) for line in shown.stdout.splitlines()[1:] if line.strip())
    assert facts["id"].strip() == agent_id and facts["capacity"].strip() == "4"
    assert _json(cli("agent", "show", agent_id, "-o", "json"))["admin_state"] == "draining"

    disabled = cli("agent", "disable", agent_id, "-o", "json")
    assert _json(disabled)["admin_state"] == "disabled"
    assert _poll(orchestrator, agent_id, key) == 403
    enabled = cli("agent", "enable", agent_id)
    assert enabled.exit_code == 0 and enabled.stdout.strip().endswith("online")
    assert _poll(orchestrator, agent_id, key) == 200

    # revoke asks first; "no" changes nothing
    declined = cli("agent", "revoke", agent_id, input="n\n")
    assert declined.exit_code == 1 and "not revoked" in declined.stderr
    assert _poll(orchestrator, agent_id, key) == 200
    confirmed = cli("agent", "revoke", agent_id, input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert confirmed.stdout.strip().endswith(f"({agent_id}): revoked")
    assert _poll(orchestrator, agent_id, key) == 403
    again = cli("agent", "enable", agent_id)
    assert again.exit_code == 4 and "revoked" in again.stderr
    assert cli("agent", "revoke", agent_id, "--yes").exit_code == 0

    for action in ("show", "drain", "disable", "enable", "rotate"):
        missing = cli("agent", action, "agt_nope")
        assert missing.exit_code == 3, (action, missing.output)
        assert "no agent 'agt_nope'" in missing.stderr


def test_agent_rotate_shows_the_new_key_once(cli: Invoke, orchestrator: Orchestrator) -> None:
    agent_id, key = orchestrator.create_agent(f"rot-{_tag()}")
    rotated = cli("agent", "rotate", agent_id)
    assert rotated.exit_code == 0, rotated.output
    lines = rotated.stdout.splitlines()
    assert lines[0].endswith(f"({agent_id}):")
    new_key = lines[1].strip()
    assert new_key.startswith("stva_") and new_key != key
    assert "shown only this once" in lines[2]
    assert _poll(orchestrator, agent_id, key) == 401
    assert _poll(orchestrator, agent_id, new_key) == 200
    scripted = _json(cli("agent", "rotate", agent_id, "-o", "json"))
    assert scripted["api_key"] not in (key, new_key)
    assert _poll(orchestrator, agent_id, scripted["api_key"]) == 200


def test_fleet_status(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    agent_id, key = orchestrator.create_agent(f"{tag}-st", labels={"tier": tag})
    orchestrator.run(workflow_for(orchestrator, f"{tag}-nobody"))  # waits: nobody matches
    before = _json(cli("fleet", "status", "-o", "json"))
    assert before["by_label"][f"tier={tag}"] == 1
    assert before["waiting"]["total"] >= 1
    assert any(f"{tag}-nobody" in key for key in before["waiting"]["by_selector"])
    assert set(before["by_state"]) >= {"online", "offline", "draining", "disabled", "revoked"}

    human = cli("fleet", "status")
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    assert lines[0].startswith(f"{before['agents']} agents; capacity ")
    assert "instructions waiting" in lines[0]
    assert ["state", "agents"] == _row(human, "state")
    assert _row(human, f"tier={tag}") == [f"tier={tag}", "1"]
    assert any(f"{tag}-nobody" in line for line in lines)


def test_roles_and_missing_tokens_exit_5(cli: Invoke, orchestrator: Orchestrator) -> None:
    agent_id, _ = orchestrator.create_agent(f"rbac-{_tag()}")
    viewer = {"STAVILY_TOKEN": api_token(orchestrator, "viewer")}
    assert cli("fleet", "status", env=viewer).exit_code == 0
    assert cli("agent", "list", env=viewer).exit_code == 0
    refused = cli("agent", "drain", agent_id, env=viewer)
    assert refused.exit_code == 5
    assert "role 'viewer' may not do 'agents:write'" in refused.stderr
    assert cli("enrollment", "create", "x", env=viewer).exit_code == 5
    anonymous = cli("fleet", "status", env={"STAVILY_TOKEN": None})
    assert anonymous.exit_code == 5 and "not logged in" in anonymous.stderr
