"""Fleet administration over real HTTP on each database: enrollment tokens and their
exchange, agent JWTs, drain/disable/enable/revoke/rotate, the fleet summary and roles."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest

from stavily.security import agent_tokens
from tests.harness import Orchestrator, api_token


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]  # type: ignore[no-any-return]


def create_token(orch: Orchestrator, **fields: Any) -> tuple[dict[str, Any], str]:
    body = {"name": f"tok-{_tag()}", **fields}
    response = orch.api.post("/api/v1/enrollment-tokens", json=body)
    assert response.status_code == 201, response.text
    view = response.json()
    return view, view["token"]


def register(orch: Orchestrator, token: str, name: str, **extra: Any) -> httpx.Response:
    # No bearer: the enrollment token is the credential.
    return httpx.post(
        f"{orch.url}/agents/v1/register",
        json={"enrollment_token": token, "name": name, **extra},
        timeout=30,
    )


def agent_names(orch: Orchestrator) -> set[str]:
    return {a["name"] for a in orch.api.get("/api/v1/agents").json()["agents"]}


def tokens(orch: Orchestrator) -> dict[str, dict[str, Any]]:
    response = orch.api.get("/api/v1/enrollment-tokens")
    assert response.status_code == 200, response.text
    return {t["id"]: t for t in response.json()["enrollment_tokens"]}


def audit_actions(orch: Orchestrator, subject_id: str) -> list[str]:
    records = orch.api.get("/api/v1/audit", params={"subject_id": subject_id}).json()["records"]
    return [r["action"] for r in reversed(records)]


def signing_key(orch: Orchestrator) -> str:
    """The server's key, where it keeps it: not in the database, only its fingerprint."""
    return agent_tokens.load_key(orch.settings.agent_jwt_key, orch.settings.data_dir)


class Agent:
    """An agent of the public API: its id and a client with its bearer credential."""

    def __init__(self, orch: Orchestrator, agent_id: str, key: str) -> None:
        self.orch = orch
        self.id = agent_id
        self.key = key
        self.client = orch.agent_client(key)

    @classmethod
    def create(cls, orch: Orchestrator, name: str, **fields: Any) -> Agent:
        return cls(orch, *orch.create_agent(name, **fields))

    def send(self, method: str, path: str, bearer: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        return self.client.request(method, f"/agents/v1/{self.id}{path}", headers=headers, **kw)

    def poll(self, bearer: str | None = None, **params: Any) -> httpx.Response:
        return self.send("GET", "/instructions", bearer, params=params)

    def take(self) -> dict[str, Any] | None:
        response = self.poll()
        assert response.status_code == 200, response.text
        return response.json()["instruction"]  # type: ignore[no-any-return]

    def heartbeat(self, bearer: str | None = None, **fields: Any) -> httpx.Response:
        return self.send("POST", "/heartbeat", bearer, json={"status": "online", **fields})

    def progress(self, instruction_id: str, bearer: str | None = None) -> httpx.Response:
        body = {"status": "executing", "execution_log": ["started"]}
        return self.send("PUT", f"/instructions/{instruction_id}", bearer, json=body)

    def result(
        self, instruction_id: str, bearer: str | None = None, **params: Any
    ) -> httpx.Response:
        body = {"status": "completed", "result": {"ok": True}, "execution_log": ["done"]}
        return self.send(
            "POST", f"/instructions/{instruction_id}/result", bearer, json=body, params=params
        )

    def jwt(self) -> str:
        response = self.send("POST", "/token")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["expires_in"] == 3600
        return body["token"]  # type: ignore[no-any-return]

    def every_request(self, instruction_id: str, bearer: str | None = None) -> list[int]:
        return [
            self.poll(bearer).status_code,
            self.heartbeat(bearer).status_code,
            self.progress(instruction_id, bearer).status_code,
            self.result(instruction_id, bearer).status_code,
        ]


def admin(orch: Orchestrator, agent_id: str, action: str, status: int = 200) -> dict[str, Any]:
    response = orch.api.post(f"/api/v1/agents/{agent_id}/{action}")
    assert response.status_code == status, response.text
    return response.json()  # type: ignore[no-any-return]


def workflow_for(orch: Orchestrator, agent_regex: str) -> str:
    name = f"fleet-{_tag()}"
    orch.apply(
        f"""
name: {name}
agents:
  pools: [{{pool_name: p, agent_regex: "{agent_regex}"}}]
actions:
  steps:
    - name: only
      plugin: echo
"""
    )
    return name


# -- enrollment ------------------------------------------------------------------------------


def test_single_use_token_enrolls_one_agent_with_the_tokens_settings(
    orchestrator: Orchestrator,
) -> None:
    view, secret = create_token(
        orchestrator,
        agent_type="sensor",
        labels={"env": "prod", "zone": "a"},
        capacity=3,
    )
    assert secret.startswith("stve_")
    assert view["max_uses"] == 1 and view["uses"] == 0 and view["state"] == "active"
    assert view["agent_type"] == "sensor" and view["capacity"] == 3
    left = datetime.fromisoformat(view["expires_at"]).timestamp() - time.time()
    assert 24 * 3600 - 60 < left <= 24 * 3600  # 24 h by default

    name = f"enrolled-{_tag()}"
    answer = register(
        orchestrator,
        secret,
        name,
        labels={"env": "dev", "rack": "r7"},  # the token's labels win over the agent's
        hostname="host-1",
        version="2.0.0",
    )
    assert answer.status_code == 201, answer.text
    agent = answer.json()
    assert agent["agent_id"].startswith("agt_") and agent["api_key"].startswith("stva_")
    assert agent["id"] == agent["agent_id"]
    assert agent["name"] == name and agent["type"] == "sensor" and agent["capacity"] == 3
    assert agent["labels"] == {"env": "prod", "zone": "a", "rack": "r7"}
    assert agent["enrollment_token_id"] == view["id"]
    assert agent["hostname"] == "host-1" and agent["version"] == "2.0.0"
    assert "credential_hash" not in agent

    shown = orchestrator.api.get(f"/api/v1/agents/{agent['agent_id']}").json()
    assert shown["enrollment_token_id"] == view["id"] and shown["labels"] == agent["labels"]

    # The credential works on the agent API at once.
    enrolled = Agent(orchestrator, agent["agent_id"], agent["api_key"])
    assert enrolled.poll().status_code == 200

    # Used up: the next exchange gets 401 and creates nothing.
    again = register(orchestrator, secret, f"enrolled-{_tag()}")
    error = _error(again, 401)
    assert error["message"] == "this enrollment token has no uses left"
    assert tokens(orchestrator)[view["id"]] == {
        **{k: v for k, v in view.items() if k != "token"},
        "uses": 1,
        "remaining_uses": 0,
        "state": "used_up",
    }
    assert audit_actions(orchestrator, view["id"]) == [
        "enrollment_token.created",
        "enrollment_token.used",
    ]
    created = orchestrator.api.get(
        "/api/v1/audit", params={"subject_id": agent["agent_id"]}
    ).json()["records"]
    assert [(r["action"], r["actor"]) for r in created] == [
        ("agent.created", f"enrollment_token:{view['id']}")
    ]


def test_token_list_never_shows_a_secret(orchestrator: Orchestrator) -> None:
    view, secret = create_token(orchestrator)
    listed = orchestrator.api.get("/api/v1/enrollment-tokens")
    assert listed.status_code == 200
    assert secret not in listed.text
    mine = tokens(orchestrator)[view["id"]]
    assert "token" not in mine and "token_hash" not in mine
    assert mine == {k: v for k, v in view.items() if k != "token"}


def test_limited_and_unlimited_tokens(orchestrator: Orchestrator) -> None:
    limited, secret = create_token(orchestrator, max_uses=2)
    tag = _tag()
    for n in range(2):
        assert register(orchestrator, secret, f"lim-{tag}-{n}").status_code == 201
    assert _error(register(orchestrator, secret, f"lim-{tag}-x"), 401)["message"] == (
        "this enrollment token has no uses left"
    )
    assert f"lim-{tag}-x" not in agent_names(orchestrator)
    assert tokens(orchestrator)[limited["id"]]["uses"] == 2

    unlimited, secret = create_token(orchestrator, max_uses=None)
    assert unlimited["max_uses"] is None and unlimited["remaining_uses"] is None
    for n in range(4):
        assert register(orchestrator, secret, f"unl-{tag}-{n}").status_code == 201
    assert tokens(orchestrator)[unlimited["id"]]["uses"] == 4
    assert tokens(orchestrator)[unlimited["id"]]["state"] == "active"


def test_racing_exchanges_never_exceed_the_uses(orchestrator: Orchestrator) -> None:
    view, secret = create_token(orchestrator, max_uses=3)
    tag = _tag()
    statuses: list[int] = []
    gate = threading.Barrier(8)

    def exchange(n: int) -> None:
        gate.wait()
        statuses.append(register(orchestrator, secret, f"race-{tag}-{n}").status_code)

    threads = [threading.Thread(target=exchange, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [201] * 3 + [401] * 5
    assert len({n for n in agent_names(orchestrator) if n.startswith(f"race-{tag}-")}) == 3
    assert tokens(orchestrator)[view["id"]]["uses"] == 3


def test_expired_revoked_and_unknown_tokens_get_401_and_create_nothing(
    orchestrator: Orchestrator,
) -> None:
    expiring, expiring_secret = create_token(orchestrator, expires_in=1, max_uses=None)
    revoked, revoked_secret = create_token(orchestrator)
    answer = orchestrator.api.post(f"/api/v1/enrollment-tokens/{revoked['id']}/revoke")
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "revoked" and answer.json()["revoked_at"]
    # revoking again changes nothing
    again = orchestrator.api.post(f"/api/v1/enrollment-tokens/{revoked['id']}/revoke")
    assert again.status_code == 200 and again.json() == answer.json()
    assert audit_actions(orchestrator, revoked["id"]) == [
        "enrollment_token.created",
        "enrollment_token.revoked",
    ]
    time.sleep(1.1)

    tag = _tag()
    cases = {
        expiring_secret: "this enrollment token has expired",
        revoked_secret: "this enrollment token is revoked",
        "stve_" + "x" * 43: "unknown enrollment token",
    }
    for secret, message in cases.items():
        error = _error(register(orchestrator, secret, f"refused-{tag}"), 401)
        assert error["code"] == "unauthorized" and error["message"] == message
    assert f"refused-{tag}" not in agent_names(orchestrator)
    listed = tokens(orchestrator)
    assert listed[expiring["id"]]["state"] == "expired" and listed[expiring["id"]]["uses"] == 0
    assert listed[revoked["id"]]["uses"] == 0
    assert orchestrator.api.post("/api/v1/enrollment-tokens/enr_nope/revoke").status_code == 404


def test_a_taken_name_is_409_and_consumes_no_use(orchestrator: Orchestrator) -> None:
    existing, _ = orchestrator.create_agent(f"taken-{_tag()}")
    name = orchestrator.api.get(f"/api/v1/agents/{existing}").json()["name"]
    view, secret = create_token(orchestrator)
    _error(register(orchestrator, secret, name), 409)
    assert tokens(orchestrator)[view["id"]]["uses"] == 0
    assert register(orchestrator, secret, f"{name}-2").status_code == 201
    # A bad token is refused before the name is looked at: nothing about names leaks.
    assert register(orchestrator, "stve_nope", name).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"expires_in": 0},
        {"expires_in": 30 * 24 * 3600 + 1},
        {"agent_type": "robot"},
        {"capacity": 0},
        {"max_uses": 0},
        {"labels": {"env": 3}},
        {"name": ""},
        {"surprise": True},
    ],
)
def test_bad_token_requests_are_422(orchestrator: Orchestrator, body: dict[str, Any]) -> None:
    before = len(tokens(orchestrator))
    answer = orchestrator.api.post("/api/v1/enrollment-tokens", json={"name": "t", **body})
    assert _error(answer, 422)["code"] == "invalid_input"
    assert len(tokens(orchestrator)) == before


def test_bad_registrations_are_422_and_consume_nothing(orchestrator: Orchestrator) -> None:
    view, secret = create_token(orchestrator)
    for body in (
        {"enrollment_token": secret},
        {"enrollment_token": secret, "name": "-starts-with-dash"},
        {"enrollment_token": secret, "name": "ok", "labels": ["a"]},
        {"enrollment_token": secret, "name": "ok", "hostname": "a\nb"},
        {"enrollment_token": secret, "name": "ok", "extra": 1},
        {"name": "ok"},
    ):
        answer = httpx.post(f"{orchestrator.url}/agents/v1/register", json=body)
        _error(answer, 422)
    assert tokens(orchestrator)[view["id"]]["uses"] == 0


# -- operator states -------------------------------------------------------------------------


def test_drain_keeps_reports_flowing_and_hands_out_nothing_new(
    orchestrator: Orchestrator,
) -> None:
    tag = _tag()
    agent = Agent.create(orchestrator, f"{tag}-drain")
    workflow = workflow_for(orchestrator, f"{tag}-.*")
    first = orchestrator.run(workflow)
    second = orchestrator.run(workflow)

    running = agent.take()
    assert running is not None
    drained = admin(orchestrator, agent.id, "drain")
    assert drained["admin_state"] == "draining" and drained["state"] == "draining"

    # It still reports the work it has...
    assert agent.heartbeat().status_code == 200
    assert agent.progress(running["id"]).status_code == 200
    finished = agent.result(running["id"], next=1)
    assert finished.status_code == 200, finished.text
    assert finished.json() == {"acknowledged": True, "next_instruction": None}
    # ...but is given nothing new, although work for it is waiting.
    assert agent.take() is None
    answer = agent.poll(wait=0.3, slots=2)
    assert answer.status_code == 200 and answer.json()["instructions"] == []
    done = orchestrator.wait_for(first["id"], timeout=10)
    assert done["status"] == "succeeded"
    assert orchestrator.execution(second["id"])["steps"][0]["status"] == "queued"

    # Draining twice changes nothing; enabling hands out work again.
    admin(orchestrator, agent.id, "drain")
    enabled = admin(orchestrator, agent.id, "enable")
    assert enabled["admin_state"] == "active"
    following = agent.take()
    assert following is not None and following["correlation_id"].startswith(second["id"])
    assert agent.result(following["id"]).status_code == 200
    assert orchestrator.wait_for(second["id"], timeout=10)["status"] == "succeeded"
    assert [a for a in audit_actions(orchestrator, agent.id) if a.startswith("agent.")] == [
        "agent.created",
        "agent.drained",
        "agent.enabled",
    ]


def test_disable_is_403_at_once_and_enable_restores(orchestrator: Orchestrator) -> None:
    tag = _tag()
    agent = Agent.create(orchestrator, f"{tag}-dis")
    execution = orchestrator.run(workflow_for(orchestrator, f"{tag}-.*"))
    running = agent.take()
    assert running is not None
    assert agent.progress(running["id"]).status_code == 200

    disabled = admin(orchestrator, agent.id, "disable")
    assert disabled["admin_state"] == "disabled" and disabled["state"] == "disabled"
    assert agent.every_request(running["id"]) == [403] * 4
    assert _error(agent.poll(), 403)["message"] == "this agent is disabled"
    # A disabled agent cannot report, so its work went back to the queue at once.
    step = orchestrator.execution(execution["id"])["steps"][0]
    assert (step["status"], step["attempts"]) == ("queued", 2)
    # A disabled agent may be drained: it may speak again, and is given nothing new; its
    # report of the attempt it lost is refused.
    assert admin(orchestrator, agent.id, "drain")["state"] == "draining"
    assert agent.heartbeat().status_code == 200
    assert agent.result(running["id"]).status_code == 409
    assert agent.take() is None
    enabled = admin(orchestrator, agent.id, "enable")
    assert enabled["admin_state"] == "active" and enabled["state"] == "online"
    following = agent.take()
    assert following is not None and following["correlation_id"].startswith(execution["id"])
    assert following["attempt"] == 2
    assert agent.result(following["id"]).status_code == 200
    assert orchestrator.wait_for(execution["id"], timeout=10)["status"] == "succeeded"
    assert [a for a in audit_actions(orchestrator, agent.id) if a.startswith("agent.")] == [
        "agent.created",
        "agent.disabled",
        "agent.drained",
        "agent.enabled",
    ]


def test_revoke_is_403_at_once_and_for_good(orchestrator: Orchestrator) -> None:
    tag = _tag()
    agent = Agent.create(orchestrator, f"{tag}-rev")
    orchestrator.run(workflow_for(orchestrator, f"{tag}-.*"))
    running = agent.take()
    assert running is not None
    token = agent.jwt()

    revoked = admin(orchestrator, agent.id, "revoke")
    assert revoked["revoked_at"] and revoked["state"] == "revoked"
    assert agent.every_request(running["id"]) == [403] * 4
    assert agent.every_request(running["id"], bearer=token) == [403] * 4
    assert _error(agent.poll(), 403)["message"] == "this agent's credential is revoked"
    assert agent.send("POST", "/token").status_code == 403

    for action in ("enable", "drain", "disable"):
        assert (
            "revoked"
            in _error(orchestrator.api.post(f"/api/v1/agents/{agent.id}/{action}"), 409)["message"]
        )
    _error(orchestrator.api.post(f"/api/v1/agents/{agent.id}/credentials"), 409)
    assert admin(orchestrator, agent.id, "revoke")["revoked_at"] == revoked["revoked_at"]
    assert agent.poll().status_code == 403
    assert [a for a in audit_actions(orchestrator, agent.id) if a.startswith("agent.")] == [
        "agent.created",
        "agent.revoked",
    ]


def test_unknown_agent_is_404(orchestrator: Orchestrator) -> None:
    for action in ("drain", "disable", "enable", "revoke", "credentials"):
        assert _error(orchestrator.api.post(f"/api/v1/agents/agt_nope/{action}"), 404)


# -- credentials -----------------------------------------------------------------------------


def test_rotation_refuses_the_old_key_and_older_jwts_at_once(orchestrator: Orchestrator) -> None:
    agent = Agent.create(orchestrator, f"rot-{_tag()}")
    old_jwt = agent.jwt()
    assert agent.poll(old_jwt).status_code == 200

    answer = orchestrator.api.post(f"/api/v1/agents/{agent.id}/credentials")
    assert answer.status_code == 201, answer.text
    rotated = answer.json()
    new_key = rotated["api_key"]
    assert new_key.startswith("stva_") and new_key != agent.key
    assert rotated["agent_id"] == agent.id and rotated["credential_issued_at"]

    assert _error(agent.poll(), 401)["message"] == "unknown agent credential"
    assert _error(agent.poll(old_jwt), 401)["message"].startswith("this token was issued before")
    assert agent.poll(new_key).status_code == 200
    # A JWT asked for right after the rotation works at once.
    fresh = agent.send("POST", "/token", bearer=new_key).json()["token"]
    assert agent.poll(fresh).status_code == 200
    assert agent.heartbeat(fresh).status_code == 200
    assert "agent.credential_rotated" in audit_actions(orchestrator, agent.id)


def test_jwts_work_on_agent_routes_until_expired_or_tampered(orchestrator: Orchestrator) -> None:
    tag = _tag()
    agent = Agent.create(orchestrator, f"{tag}-jwt")
    other = Agent.create(orchestrator, f"other-{tag}")
    token = agent.jwt()
    assert agent_tokens.looks_like_jwt(token)

    execution = orchestrator.run(workflow_for(orchestrator, f"{tag}-.*"))
    answer = agent.poll(token)
    assert answer.status_code == 200, answer.text
    instruction = answer.json()["instruction"]
    assert instruction is not None
    assert agent.heartbeat(token).status_code == 200
    assert agent.progress(instruction["id"], token).status_code == 200
    assert agent.result(instruction["id"], token).status_code == 200
    assert orchestrator.wait_for(execution["id"], timeout=10)["status"] == "succeeded"

    # A JWT cannot renew itself, and belongs to its agent only.
    assert _error(agent.send("POST", "/token", bearer=token), 403)
    assert _error(other.poll(token), 403)

    key = signing_key(orchestrator)
    expired = agent_tokens.issue(key, agent.id, "org", ttl_seconds=-10)
    header, payload, signature = token.split(".")
    tampered = (
        f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    )
    forged = agent_tokens.issue("not-the-key-" + "x" * 32, agent.id, "org", ttl_seconds=600)
    for bad in (expired, tampered, forged):
        error = _error(agent.poll(bad), 401)
        assert error["message"].startswith("invalid agent token")
    assert "expired" in _error(agent.poll(expired), 401)["message"].lower()


# -- the summary and roles -------------------------------------------------------------------


def test_fleet_summary_counts(fresh_orchestrator: Orchestrator) -> None:
    orch = fresh_orchestrator
    tag = _tag()
    web = Agent.create(orch, f"{tag}-web", labels={"env": "prod", "role": "web"}, capacity=2)
    drained = Agent.create(orch, f"{tag}-drained", labels={"env": "prod"})
    disabled = Agent.create(orch, f"{tag}-disabled", type="sensor", labels={"env": "dev"})
    revoked = Agent.create(orch, f"{tag}-revoked")
    Agent.create(orch, f"{tag}-silent", capacity=3)
    assert web.heartbeat(version="9.9.9").status_code == 200
    admin(orch, drained.id, "drain")
    admin(orch, disabled.id, "disable")
    admin(orch, revoked.id, "revoke")

    workflow = workflow_for(orch, f"{tag}-web")
    orch.run(workflow)
    orch.run(workflow)
    assert web.take() is not None  # one of two: in use 1, waiting 1

    answer = orch.client(orch.token).get("/api/v1/fleet")
    assert answer.status_code == 200, answer.text
    summary = answer.json()
    assert summary["agents"] == 5
    assert summary["by_state"] == {  # web holds work: busy
        "online": 0,
        "busy": 1,
        "degraded": 0,
        "offline": 1,
        "draining": 1,
        "disabled": 1,
        "revoked": 1,
    }
    assert summary["by_type"] == {"action": 4, "sensor": 1}
    assert summary["by_label"] == {"env=dev": 1, "env=prod": 2, "role=web": 1}
    assert summary["by_version"] == {"9.9.9": 1, "unknown": 4}
    # total: what agents that are not disabled or revoked offer; available: what online,
    # active agents have free
    assert summary["capacity"] == {"total": 2 + 1 + 3, "in_use": 1, "available": 1}
    assert summary["waiting"]["total"] == 1
    [(key, count)] = summary["waiting"]["by_selector"].items()
    assert count == 1
    assert json.loads(key)["pools"][0]["agent_regex"] == f"{tag}-web"
    assert key == json.dumps(json.loads(key), sort_keys=True, separators=(",", ":"))


def test_roles_other_than_admin_read_but_cannot_change_the_fleet(
    orchestrator: Orchestrator,
) -> None:
    agent = Agent.create(orchestrator, f"rbac-{_tag()}")
    view, _ = create_token(orchestrator)
    for role in ("viewer", "operator"):
        client = orchestrator.client(api_token(orchestrator, role))
        for path in ("/api/v1/fleet", "/api/v1/enrollment-tokens"):
            assert client.get(path).status_code == 200
        for path in (
            *(f"/api/v1/agents/{agent.id}/{a}" for a in ("drain", "disable", "enable", "revoke")),
            f"/api/v1/agents/{agent.id}/credentials",
            f"/api/v1/enrollment-tokens/{view['id']}/revoke",
        ):
            error = _error(client.post(path), 403)
            assert error["message"] == f"role '{role}' may not do 'agents:write'"
        _error(client.post("/api/v1/enrollment-tokens", json={"name": "x"}), 403)
    assert agent.poll().status_code == 200  # nothing changed
    assert tokens(orchestrator)[view["id"]]["state"] == "active"
    anonymous = orchestrator.client()
    assert _error(anonymous.get("/api/v1/fleet"), 401)
    assert _error(anonymous.post(f"/api/v1/agents/{agent.id}/drain"), 401)
