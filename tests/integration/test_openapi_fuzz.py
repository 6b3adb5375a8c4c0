"""Schemathesis against the server's own OpenAPI document: every operation, with data the
document says is valid and data it says is not, never answers a 5xx, and answers only
the statuses it declares, each in its declared shape (the success models of
stavily.api.schemas, the one error shape for the rest).

A real server on loopback HTTP, on SQLite. Requests with generated ids carry the admin
token (so the agent API answers them 401, which it declares); requests aimed at real
objects carry the credential their route takes. Nothing is excluded. The example budget
is fixed and the generation derandomized, so a run is reproducible (about 20 s here).

test_the_document_declares_auth_and_answers checks what the fuzzing cannot: that every
route declares its credential, its errors and a JSON model for its answer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from stavily.api.agents_v1 import HEARTBEAT_STATUSES
from stavily.app import create_app
from stavily.config import Settings
from tests.harness import ADMIN_TOKEN, Orchestrator, fresh_database, serve
from tests.plugin_fixtures import make_plugin, published

# 30 valid and invalid requests per operation: about 20 s here. STAVILY_FUZZ_EXAMPLES=500
# searches longer (still derandomized: the same run each time for the same budget).
EXAMPLES_PER_OPERATION = int(os.environ.get("STAVILY_FUZZ_EXAMPLES", "30"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _operations() -> list[tuple[str, str]]:
    """Every operation the app declares, read from the app itself (no server, no database)
    to name the tests; test_served_document_lists_every_operation checks the served one."""
    document = create_app(Settings(database_url="sqlite+aiosqlite://")).openapi()
    return [(m.upper(), p) for p, item in document["paths"].items() for m in item]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # long polls cut short: a generated ?wait=300 must not hold the run for minutes
    # and a generated git URL fetched for 2 s at most
    with (
        fresh_database("sqlite", tmp) as url,
        serve(url, tmp, max_poll_wait=1, plugin_git_timeout=2) as orch,
    ):
        yield orch


@dataclass
class World:
    """Real objects, so that some requests reach past the 404s to real answers."""

    ids: dict[str, list[str]]  # path parameter -> real values
    agent_key: str
    enrollment_token: str


ARTIFACT = "GET /agents/v1/{agent_id}/plugins/{plugin_id}/{version}/artifact"
WORKFLOW_BODIES = ("/api/v1/workflows", "/api/v1/workflows/validate")
WORKFLOW = """
name: fuzz-flow
agents: {pools: [{agent_regex: fuzz-agent}]}
actions: {steps: [{name: only, plugin: echo, config: {message: hi}}]}
"""


@pytest.fixture(scope="module")
def world(fuzzed: Orchestrator, tmp_path_factory: pytest.TempPathFactory) -> World:
    agent_id, key = fuzzed.create_agent("fuzz-agent", capacity=10)
    fuzzed.apply(WORKFLOW)
    executions = [fuzzed.run("fuzz-flow")["id"] for _ in range(6)]
    agent = fuzzed.agent_client(key)
    taken = agent.get(f"/agents/v1/{agent_id}/instructions", params={"slots": 5})
    instructions = [i["id"] for i in taken.json()["instructions"]]
    assert len(instructions) == 5, taken.text
    for instruction in instructions[:3]:  # some leased, some executing
        started = agent.put(
            f"/agents/v1/{agent_id}/instructions/{instruction}", json={"status": "executing"}
        )
        assert started.status_code == 200, started.text
    beat = agent.post(f"/agents/v1/{agent_id}/heartbeat", json={"status": "online"})
    assert beat.status_code == 200, beat.text
    token = fuzzed.api.post("/api/v1/enrollment-tokens", json={"name": "fuzz", "max_uses": None})
    assert token.status_code == 201, token.text
    plugin = published(fuzzed.api, make_plugin(tmp_path_factory.mktemp("plugin"), "fuzz-echo"))
    rollout = fuzzed.api.post(
        "/api/v1/plugins/fuzz-echo/rollouts", json={"version": plugin["version"]}
    )
    assert rollout.status_code == 201, rollout.text
    sent = agent.post(f"/agents/v1/{agent_id}/events", json={"type": "fuzz", "payload": {}})
    assert sent.status_code == 201, sent.text
    schedule = fuzzed.api.post("/api/v1/schedules", json={"workflow": "fuzz-flow", "every": "1d"})
    assert schedule.status_code == 201, schedule.text
    hook = fuzzed.api.post("/api/v1/webhooks", json={"workflow": "fuzz-flow"})
    assert hook.status_code == 201, hook.text
    user = fuzzed.api.post(
        "/api/v1/users",
        json={"username": "fuzz-user", "password": "a long enough password", "role": "viewer"},
    )
    assert user.status_code == 201, user.text
    organization = fuzzed.api.get("/api/v1/me").json()["organization"]["id"]
    ids = {
        "event_id": [sent.json()["event_id"]],
        "agent_id": [agent_id],
        "instruction_id": instructions,
        "name": ["fuzz-flow"],
        "version": ["1", plugin["version"]],  # a workflow's, a plugin's
        "plugin_id": ["fuzz-echo"],
        "rollout_id": [rollout.json()["id"]],
        "execution_id": executions,
        "token_id": [token.json()["id"]],
        "schedule_id": [schedule.json()["id"]],
        "hook_id": [hook.json()["id"]],
        "user_id": [user.json()["id"]],
        "organization_id": [organization],
    }
    return World(ids, key, token.json()["token"])


def _overlays(world: World) -> dict[tuple[str, str], dict[str, st.SearchStrategy[Any]]]:
    """Body fields that make a generated body one the server takes, where random values
    almost never are: other fields stay as generated."""
    agent_api = "/agents/v1/{agent_id}"
    return {
        ("POST", f"{agent_api}/instructions/{{instruction_id}}/result"): {
            "status": st.sampled_from(["completed", "failed", "success", "error"]),
        },
        ("PUT", f"{agent_api}/instructions/{{instruction_id}}"): {
            "status": st.sampled_from(["executing", "running", "started"]),
        },
        ("POST", f"{agent_api}/heartbeat"): {
            "status": st.sampled_from(sorted(HEARTBEAT_STATUSES - {"offline"})),
            "timestamp": st.none(),
        },
        ("POST", "/agents/v1/register"): {"enrollment_token": st.just(world.enrollment_token)},
    }


def _aimed(operation: Any, world: World, mode: GenerationMode) -> st.SearchStrategy[Case]:
    """Requests with real ids; valid ones with, for some routes, bodies the server takes."""
    key = (operation.method.upper(), operation.path)
    names = [p.name for p in operation.path_parameters]
    ids = st.fixed_dictionaries({n: st.sampled_from(world.ids[n]) for n in names})
    overlay = st.fixed_dictionaries(_overlays(world).get(key, {}))
    if mode is GenerationMode.NEGATIVE:
        overlay = st.just({})
    elif operation.path in WORKFLOW_BODIES:
        # the body's schema is any object: a valid definition under a generated name
        overlay = st.fixed_dictionaries(
            {
                "name": st.from_regex(r"\Afuzz-[a-z0-9]{1,12}\Z"),
                "actions": st.just({"steps": [{"name": "a", "plugin": "echo"}]}),
            }
        )

    def aim(drawn: tuple[Case, dict[str, str], dict[str, Any]]) -> Case:
        case, values, fields = drawn
        case.path_parameters.update(values)
        if fields:
            if not isinstance(case.body, dict) or case.media_type != "application/json":
                case.body, case.media_type = {}, "application/json"
            case.body.update(fields)
        return case

    return st.tuples(operation.as_strategy(mode), ids, overlay).map(aim)


@pytest.fixture(scope="module")
def api_schema(fuzzed: Orchestrator) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed.url}/api/v1/openapi.json")


def test_served_document_lists_every_operation(api_schema: BaseSchema) -> None:
    served = {(o.ok().method.upper(), o.ok().path) for o in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


# Not schemathesis's pytest plugin (`@schema.parametrize()` on a `from_fixture` schema):
# with pytest 9 its lazy loader fails on a node attribute pytest no longer has
# (`_nodeid`), so each operation is a test of ours, driven by its strategies.
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_keeps_its_contract(
    api_schema: BaseSchema, world: World, method: str, path: str
) -> None:
    """Valid and invalid requests with the admin token; and valid ones aimed at the real
    objects above, with the credential their route takes (the agent's key on the agent
    API, where the admin token only ever gets its 401)."""
    operation = api_schema[path][method]
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    if "{" in path or (method, path) in _overlays(world) or path in WORKFLOW_BODIES:
        strategies += [_aimed(operation, world, mode) for mode in GenerationMode]

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def check(case: Case) -> None:
        own = (case.path_parameters or {}).get("agent_id") in world.ids["agent_id"]
        token = world.agent_key if own and path.startswith("/agents/v1/") else ADMIN_TOKEN
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)

    check()


# -- the document itself ------------------------------------------------------------------

# No bearer: health and the workflow JSON Schema are open to all; registration's credential
# is the enrollment token in its body (refused: 401, documented); login's is its body.
# A webhook's credential is its request's signature.
PUBLIC = {
    "/healthz",
    "/health",
    "/api/v1/schemas/workflow",
    "/api/v1/login",
    "/agents/v1/register",
    "/hooks/{hook_id}",
}
# What any signed-in caller may do about themselves: no permission (the password change's
# 403 is for a wrong current password).
SELF = {("GET", "/api/v1/me"), ("POST", "/api/v1/logout"), ("PUT", "/api/v1/me/password")}
ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


def test_the_document_declares_auth_and_answers(fuzzed: Orchestrator) -> None:
    document = fuzzed.api.get("/api/v1/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes, "no security scheme declared"
    assert all(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())
    assert set(schemes) == {"APIToken", "AgentCredential"}
    checked = 0
    for path, item in document["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            responses = op["responses"]
            statuses = set(responses)
            # the success answer: JSON with a model, never "a string"
            ok = [s for s in statuses if s.startswith("2")]
            # an apply answers 201 for a new version, 200 for an unchanged one (a publish
            # too, and an event: 200 for a repeated one, a webhook's 202 too); an artifact
            # is bytes, whole or a range, or not modified; a delete answers nothing
            two = where in (
                "POST /api/v1/workflows",
                "POST /api/v1/plugins",
                "POST /agents/v1/{agent_id}/events",
                "POST /api/v1/triggers",
                "POST /api/v1/events",
                "POST /hooks/{hook_id}",
                "PUT /api/v1/roles/{name}",
                "PUT /api/v1/secrets/{name}",
            )
            if where == ARTIFACT:
                assert set(ok) == {"200", "206"} and "304" in statuses, where
                assert "application/gzip" in responses["200"]["content"], where
                statuses.discard("304")
            elif ok == ["204"]:
                no_content = method == "delete" or where in (
                    "POST /api/v1/logout",
                    "PUT /api/v1/me/password",
                )
                assert no_content and "content" not in responses["204"], where
            elif where == "GET /metrics":  # the Prometheus text format, not JSON
                assert ok == ["200"] and "text/plain" in responses["200"]["content"], where
            else:
                assert len(ok) == 1 or (two and set(ok) in ({"200", "201"}, {"200", "202"})), where
                schema = responses[ok[0]]["content"]["application/json"]["schema"]
                assert "$ref" in schema or schema.get("type") == "object", (where, schema)
            # every error in the one error shape (FastAPI's own 422 shape is not ours)
            for status in statuses - set(ok):
                assert status.startswith("4"), (where, status)
                assert responses[status]["content"]["application/json"]["schema"] == ERROR, (
                    where,
                    status,
                )
            if path in PUBLIC:
                assert "security" not in op, where
                continue
            required = {name for requirement in op["security"] for name in requirement}
            # the documented sensor route takes the agent's own credential (AGENT_API.md)
            by_agent = path.startswith("/agents/v1/") or path == "/api/v1/triggers"
            expected = "AgentCredential" if by_agent else "APIToken"
            assert required == {expected}, where
            assert "401" in statuses, where
            if (method.upper(), path) not in SELF:
                assert "403" in statuses, where
                # every route of the private API declares the permission it needs
                assert by_agent or "x-permission" in op, where
            if "requestBody" in op:
                assert {"413", "422"} <= statuses, where
            checked += 1
    assert checked >= 29
