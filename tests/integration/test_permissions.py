"""Every route of the private API, called with a token of every role: a role without the
route's permission gets 403, a role with it never does. Read from the OpenAPI document,
so a route added later is walked too."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from stavily.security.roles import BUILTIN_ROLES, PERMISSIONS
from tests.harness import Orchestrator, api_token, fresh_database, serve

# Routes no credential is needed for, and those any signed-in caller uses on themselves.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/health"),
    ("GET", "/api/v1/schemas/workflow"),
    ("POST", "/api/v1/login"),
    ("POST", "/agents/v1/register"),
    ("POST", "/hooks/{hook_id}"),
}
SELF = {("GET", "/api/v1/me"), ("POST", "/api/v1/logout"), ("PUT", "/api/v1/me/password")}
CUSTOM = {"runner": ["executions:run", "executions:read"], "empty": []}


@pytest.fixture(scope="module")
def orch(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp(f"permissions-{backend}")
    with fresh_database(backend, tmp) as url, serve(url, tmp) as running:
        yield running


def _operations(orch: Orchestrator) -> list[tuple[str, str, dict[str, Any]]]:
    document = orch.api.get("/api/v1/openapi.json").json()
    return [
        (method.upper(), path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
    ]


def _by_agent(op: dict[str, Any]) -> bool:
    return any("AgentCredential" in requirement for requirement in op.get("security", []))


def test_every_private_route_declares_a_permission(orch: Orchestrator) -> None:
    undeclared = [
        (method, path)
        for method, path, op in _operations(orch)
        if (method, path) not in PUBLIC | SELF and not _by_agent(op) and "x-permission" not in op
    ]
    assert undeclared == []
    declared = {op["x-permission"] for _, _, op in _operations(orch) if "x-permission" in op}
    assert declared <= set(PERMISSIONS)


def test_every_route_with_every_role(orch: Orchestrator) -> None:
    for name, permissions in CUSTOM.items():
        answer = orch.api.put(f"/api/v1/roles/{name}", json={"permissions": permissions})
        assert answer.status_code == 201, answer.text
    granted = {
        **BUILTIN_ROLES,
        **{k: frozenset(v) for k, v in CUSTOM.items()},
        "ghost": frozenset(),
    }
    # "ghost": a role the server does not know (written straight into the database)
    clients = {role: orch.client(api_token(orch, role)) for role in granted}
    walked = 0
    for method, path, op in _operations(orch):
        permission = op.get("x-permission")
        if permission is None:
            continue
        url = re.sub(r"\{[^}]+\}", "x0", path)
        for role, client in clients.items():
            body = {"json": {}} if "requestBody" in op else {}
            answer = client.request(method, url, **body)
            allowed = permission in granted[role]
            assert (answer.status_code == 403) is not allowed, (role, method, path, answer.text)
            if not allowed:
                assert answer.json()["error"]["code"] == "forbidden"
                assert permission in answer.json()["error"]["message"]
            walked += 1
    assert walked >= 60 * len(granted)
    for client in clients.values():  # every caller may see who it is
        assert client.get("/api/v1/me").status_code == 200
    ghost = clients["ghost"].get("/api/v1/me").json()
    assert ghost["role"] == "ghost" and ghost["permissions"] == []


def test_without_a_token_every_private_route_is_401(orch: Orchestrator) -> None:
    anonymous = orch.client()
    for method, path, _ in _operations(orch):
        if (method, path) in PUBLIC:
            continue
        answer = anonymous.request(method, re.sub(r"\{[^}]+\}", "x0", path))
        assert answer.status_code == 401, (method, path, answer.text)
