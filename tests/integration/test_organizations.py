"""Organizations: made, listed, renamed; and each one's resources its own. A second
organization's admin is walked over every route of the OpenAPI document with the first
one's ids: every answer is 404 (the resource's existence is not revealed, never 403), no
list shows them, and nothing of the first changes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Orchestrator, fresh_database, serve
from tests.plugin_fixtures import make_plugin, published

PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def orch(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp(f"organizations-{backend}")
    with fresh_database(backend, tmp) as url, serve(url, tmp) as running:
        yield running


def _made(answer: Any, *statuses: int) -> dict[str, Any]:
    assert answer.status_code in (statuses or (201,)), answer.text
    return answer.json()  # type: ignore[no-any-return]


def _first_organizations_things(orch: Orchestrator, tmp_path: Path) -> dict[str, str]:
    """One of every kind of resource, in the default organization; their ids by name."""
    api = orch.api
    agent_id, _ = orch.create_agent(labels={"scope": "a"})
    plugin = published(api, make_plugin(tmp_path / "plugin", f"scoped-{uuid.uuid4().hex[:6]}"))
    workflow = f"scoped-{uuid.uuid4().hex[:6]}"
    orch.apply(
        f"name: {workflow}\nactions:\n  steps:\n    - {{name: a, plugin: {plugin['plugin_id']}}}\n"
    )
    execution = orch.run(workflow)
    event = _made(
        api.post("/api/v1/events", json={"type": "scoped.thing", "payload": {"id": "e1"}})
    )
    hook = _made(api.post("/api/v1/webhooks", json={"workflow": workflow}))
    schedule = _made(api.post("/api/v1/schedules", json={"workflow": workflow, "every": "1h"}))
    enrollment = _made(api.post("/api/v1/enrollment-tokens", json={"name": "scoped"}))
    user = _made(
        api.post(
            "/api/v1/users",
            json={"username": f"a-{uuid.uuid4().hex[:6]}", "password": PASSWORD, "role": "viewer"},
        )
    )
    token = _made(api.post("/api/v1/tokens", json={"name": "scoped", "role": "viewer"}))
    role = f"scoped-{uuid.uuid4().hex[:6]}"
    _made(api.put(f"/api/v1/roles/{role}", json={"permissions": ["agents:read"]}))
    secret = f"SCOPED_{uuid.uuid4().hex[:6].upper()}"
    _made(api.put(f"/api/v1/secrets/{secret}", json={"value": "s3cret-of-a"}), 200, 201)
    organization = api.get("/api/v1/me").json()["organization"]["id"]
    return {
        "agent_id": agent_id,
        "plugin_id": plugin["plugin_id"],
        "plugin_version": plugin["version"],
        "workflow": workflow,
        "execution_id": execution["id"],
        "event_id": event["event_id"] if "event_id" in event else event["id"],
        "hook_id": hook["id"],
        "schedule_id": schedule["id"],
        "enrollment_token_id": enrollment["id"],
        "user_id": user["id"],
        "token_id": token["id"],
        "role": role,
        "secret": secret,
        "organization_id": organization,
    }


def _path_with(path: str, ids: dict[str, str]) -> str:
    """The route's path naming the first organization's resources."""
    by_param = {
        "agent_id": ids["agent_id"],
        "plugin_id": ids["plugin_id"],
        "execution_id": ids["execution_id"],
        "event_id": ids["event_id"],
        "hook_id": ids["hook_id"],
        "schedule_id": ids["schedule_id"],
        "user_id": ids["user_id"],
        "organization_id": ids["organization_id"],
        "rollout_id": "rol_nope",
        "instruction_id": "ins_nope",
    }
    if path.startswith("/api/v1/enrollment-tokens/"):
        by_param["token_id"] = ids["enrollment_token_id"]
    else:
        by_param["token_id"] = ids["token_id"]
    if path.startswith("/api/v1/plugins/"):
        by_param["version"] = ids["plugin_version"]
    else:
        by_param["version"] = "1"
    if path.startswith("/api/v1/roles/"):
        by_param["name"] = ids["role"]
    elif path.startswith("/api/v1/secrets/"):
        by_param["name"] = ids["secret"]
    else:
        by_param["name"] = ids["workflow"]
    return re.sub(r"\{([^}]+)\}", lambda m: by_param[m.group(1)], path)


def test_an_organization_is_made_listed_and_renamed(orch: Orchestrator) -> None:
    name = f"acme-{uuid.uuid4().hex[:6]}"
    made = _made(orch.api.post("/api/v1/organizations", json={"name": name}))
    assert made["name"] == name and made["role"] == "admin"
    admin = orch.client(made["admin_token"])  # the bootstrap token is no user's: a token
    me = admin.get("/api/v1/me").json()
    assert me["organization"] == {"id": made["id"], "name": name} and me["role"] == "admin"
    assert [o["name"] for o in admin.get("/api/v1/organizations").json()["organizations"]] == [name]
    assert orch.api.post("/api/v1/organizations", json={"name": name}).status_code == 409
    assert orch.api.post("/api/v1/organizations", json={"name": "Bad Name"}).status_code == 422
    renamed = admin.patch(f"/api/v1/organizations/{made['id']}", json={"name": f"{name}-2"})
    assert renamed.status_code == 200 and renamed.json()["name"] == f"{name}-2"
    default = orch.api.get("/api/v1/me").json()["organization"]["id"]
    assert admin.patch(f"/api/v1/organizations/{default}", json={"name": "x"}).status_code == 404
    kept = orch.api.patch(f"/api/v1/organizations/{default}", json={"name": "other"})
    assert kept.status_code == 409

    # a user made an admin there logs in to either organization
    username = f"both-{uuid.uuid4().hex[:6]}"
    body = {"username": username, "password": PASSWORD, "role": "viewer"}
    _made(orch.api.post("/api/v1/users", json=body))
    joining = {"username": username, "role": "operator"}
    unasked = admin.post("/api/v1/users", json=joining)  # no one takes in another's user
    assert unasked.status_code == 422 and "their own password" in unasked.text
    wrong = admin.post("/api/v1/users", json={**joining, "password": "not theirs at all"})
    assert wrong.status_code == 403
    _made(admin.post("/api/v1/users", json={**joining, "password": PASSWORD}))  # they agree
    login = orch.client().post(
        "/api/v1/login",
        json={"username": username, "password": PASSWORD, "organization": f"{name}-2"},
    )
    assert login.status_code == 200 and login.json()["role"] == "operator"
    session = orch.client(login.json()["token"])
    listed = session.get("/api/v1/organizations").json()["organizations"]
    assert {(o["name"], o["role"]) for o in listed} == {
        ("default", "viewer"),
        (f"{name}-2", "operator"),
    }
    # the user belongs to another organization too: its admin cannot reset their password
    reset = admin.patch(f"/api/v1/users/{login.json()['user']['id']}", json={"password": "x" * 20})
    assert reset.status_code == 409


def test_another_organization_sees_nothing_of_the_first(orch: Orchestrator, tmp_path: Path) -> None:
    ids = _first_organizations_things(orch, tmp_path)
    made = _made(orch.api.post("/api/v1/organizations", json={"name": f"b-{uuid.uuid4().hex[:6]}"}))
    other = orch.client(made["admin_token"])
    document = orch.api.get("/api/v1/openapi.json").json()
    secrets_of_a = [v for k, v in ids.items() if k not in ("plugin_version",)]
    walked = 0
    for path, item in document["paths"].items():
        if not path.startswith("/api/v1/") or path in ("/api/v1/login", "/api/v1/logout"):
            continue
        for method, op in item.items():
            if any("AgentCredential" in r for r in op.get("security", [])):
                continue
            where = f"{method.upper()} {path}"
            if "{" not in path:
                if method == "get":  # a list: none of the first organization's things
                    answer = other.get(path)
                    assert answer.status_code == 200, (where, answer.text)
                    leaked = [v for v in secrets_of_a if v in answer.text]
                    assert leaked == [] or path == "/api/v1/openapi.json", (where, leaked)
                    walked += 1
                continue
            body = {"json": {}} if "requestBody" in op else {}
            answer = other.request(method.upper(), _path_with(path, ids), **body)
            allowed = {404, 422} if body else {404}
            assert answer.status_code in allowed, (where, answer.status_code, answer.text)
            walked += 1
    assert walked >= 40
    # and the first organization still has all it had
    api = orch.api
    assert api.get(f"/api/v1/agents/{ids['agent_id']}").json()["admin_state"] == "active"
    assert api.get(f"/api/v1/executions/{ids['execution_id']}").status_code == 200
    assert api.get(f"/api/v1/webhooks/{ids['hook_id']}").status_code == 200
    assert api.get(f"/api/v1/schedules/{ids['schedule_id']}").status_code == 200
    assert api.get(f"/api/v1/users/{ids['user_id']}").status_code == 200
    assert api.get(f"/api/v1/tokens/{ids['token_id']}").json()["revoked_at"] is None
    assert api.get(f"/api/v1/secrets/{ids['secret']}").status_code == 200
    assert ids["role"] in api.get("/api/v1/roles").text
