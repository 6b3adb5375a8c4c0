"""Garbage to every endpoint: never a 500, always the one error shape on a 4xx, and a
refused request changes nothing. Routes come from the server's own OpenAPI document."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import Orchestrator, api_token

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
AUTHS = ("none", "bad", "basic", "binary", "admin", "agent")
LIMIT = 1024 * 1024


# -- helpers ------------------------------------------------------------------------------


def _exception_as_text(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.pop("exc_info", None):
        event["exception"] = repr(sys.exc_info()[1])
    return event


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg}: {record.exc_info[1]!r}"
            record.exc_info, record.exc_text = None, None
        return True


@pytest.fixture(scope="module", autouse=True)
def server_errors_without_tracebacks() -> Iterator[None]:
    """The known bugs below make the server answer 500s; log them as one line each.

    Two reasons, both about the test process rather than the server: structlog's default
    console renderer prints every local of every frame (seconds per error), and uvicorn
    formats a 500's traceback in the server thread *after* the answer is sent, while
    pytest formats the failure in the main thread; CPython 3.11 parses source for the
    traceback carets with one shared AST state, so the two race into pytest's
    INTERNALERROR "AST constructor recursion depth mismatch". Restored afterwards."""
    before = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _exception_as_text,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    no_traceback = _NoTraceback()
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addFilter(no_traceback)
    yield
    uvicorn_errors.removeFilter(no_traceback)
    structlog.configure(**before)


def error_shape_problem(response: httpx.Response) -> str | None:
    """None when the body is {"error": {"code": str, "message": str, "details": ...}}."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if not isinstance(body, dict) or set(body) != {"error"}:
        return f"not the error shape: {body!r:.300}"
    error = body["error"]
    if not isinstance(error, dict) or set(error) != {"code", "message", "details"}:
        return f"not the error shape: {body!r:.300}"
    if not isinstance(error["code"], str) or not isinstance(error["message"], str):
        return f"code and message must be strings: {body!r:.300}"
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"error with content-type {response.headers.get('content-type')!r}"
    return None


def verdict(response: httpx.Response) -> str | None:
    """What is wrong with an answer to garbage, or None."""
    where = f"{response.request.method} {response.request.url.raw_path.decode()[:120]}"
    if response.status_code >= 500:
        return f"{where} -> {response.status_code} {response.text[:200]}"
    if 400 <= response.status_code < 500:
        problem = error_shape_problem(response)
        if problem:
            return f"{where} -> {response.status_code}: {problem}"
    return None


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    problem = error_shape_problem(response)
    assert problem is None, problem
    return response.json()["error"]  # type: ignore[no-any-return]


def paths_of(error: dict[str, Any]) -> list[str]:
    details = error["details"]
    assert isinstance(details, list) and details, error
    for problem in details:
        assert isinstance(problem, dict), error
        assert isinstance(problem.get("path"), str) and problem["path"], error
        assert isinstance(problem.get("message"), str) and problem["message"], error
    return [problem["path"] for problem in details]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    path_params: tuple[str, ...]
    query_params: tuple[str, ...]
    has_body: bool


@dataclass
class World:
    """Real objects to aim garbage at, and the routes the server publishes."""

    orch: Orchestrator
    agent_id: str
    agent_key: str
    other_agent_id: str
    workflow: str
    execution_id: str
    instruction_id: str
    operations: list[Operation]

    def real(self, param: str) -> str:
        return {
            "agent_id": self.agent_id,
            "instruction_id": self.instruction_id,
            "name": self.workflow,
            "execution_id": self.execution_id,
            "version": "1",
            "token_id": unknown("token_id"),
            "plugin_id": "no-such-plugin",
            "rollout_id": unknown("rollout_id"),
            "event_id": unknown("event_id"),
            # pause, resume and delete change a real one: garbage goes to an unknown one
            "schedule_id": unknown("schedule_id"),
            "hook_id": unknown("hook_id"),
            "user_id": unknown("user_id"),
            "organization_id": unknown("organization_id"),
        }[param]

    def ids(self, op: Operation, which: str) -> dict[str, str]:
        """Path values: this world's real ids, unknown ones, or another agent's id."""
        if which == "unknown":
            return {p: unknown(p) for p in op.path_params}
        values = {p: self.real(p) for p in op.path_params}
        if which == "other agent" and "agent_id" in values:
            values["agent_id"] = self.other_agent_id
        return values

    def headers(self, auth: str) -> dict[str, Any]:
        return {
            "none": {},
            "bad": {"Authorization": f"Bearer stv_{uuid.uuid4().hex}"},
            "basic": {"Authorization": "Basic YWRtaW46YWRtaW4="},
            "binary": {"Authorization": b"Bearer \xff\xfe\x80abc"},
            "admin": {"Authorization": f"Bearer {self.orch.token}"},
            "agent": {"Authorization": f"Bearer {self.agent_key}"},
        }[auth]

    def url(self, op: Operation, values: dict[str, str]) -> str:
        path = op.path
        for param in op.path_params:
            path = path.replace("{" + param + "}", quote(values[param], safe=""))
        return self.orch.url + path


def operations(document: dict[str, Any]) -> list[Operation]:
    found = []
    for path, item in document["paths"].items():
        for method, op in item.items():
            params = op.get("parameters", [])
            found.append(
                Operation(
                    method.upper(),
                    path,
                    tuple(p["name"] for p in params if p["in"] == "path"),
                    tuple(p["name"] for p in params if p["in"] == "query"),
                    "requestBody" in op,
                )
            )
    return found


def step_status(orch: Orchestrator, execution_id: str) -> tuple[str, Any]:
    step = orch.execution(execution_id)["steps"][0]
    return step["status"], step["result"]


def audit_actions(orch: Orchestrator, subject_id: str) -> list[str]:
    response = orch.api.get("/api/v1/audit", params={"subject_id": subject_id})
    assert response.status_code == 200, response.text
    return [record["action"] for record in response.json()["records"]]


def one_step_workflow(name: str, agent_regex: str) -> str:
    return f"""
name: {name}
agents: {{pools: [{{agent_regex: "{agent_regex}"}}]}}
actions:
  steps:
    - {{name: only, plugin: echo, config: {{message: hi}}}}
"""


@pytest.fixture(scope="module")
def world(orchestrator: Orchestrator) -> World:
    tag = uuid.uuid4().hex[:10]
    agent_id, key = orchestrator.create_agent(f"garbage-{tag}")
    other_id, _ = orchestrator.create_agent(f"garbage-other-{tag}")
    workflow = f"garbage-{tag}"
    orchestrator.apply(one_step_workflow(workflow, f"garbage-{tag}"))
    execution = orchestrator.run(workflow)
    agent = orchestrator.agent_client(key)
    poll = agent.get(f"/agents/v1/{agent_id}/instructions")
    assert poll.status_code == 200, poll.text
    instruction = poll.json()["instruction"]
    assert instruction is not None
    started = agent.put(
        f"/agents/v1/{agent_id}/instructions/{instruction['id']}",
        json={"status": "executing", "execution_log": ["started"]},
    )
    assert started.status_code == 200, started.text
    document = orchestrator.api.get("/api/v1/openapi.json")
    assert document.status_code == 200, document.text
    return World(
        orchestrator,
        agent_id,
        key,
        other_id,
        workflow,
        execution["id"],
        instruction["id"],
        operations(document.json()),
    )


def unknown(param: str) -> str:
    prefix = {"agent_id": "agt", "instruction_id": "ins", "execution_id": "exe"}.get(param, "wf")
    return f"{prefix}_{uuid.uuid4().hex[:26].upper()}"


# Bodies: (label, content, content type).
# Routes with no body to garble: with real ids and a valid token they do what they say
# (cancel a run, revoke the agent...), so the sweeps send them only unknown ids.
ACTIONS = ("/cancel", "/rerun", "/drain", "/disable", "/enable", "/revoke", "/credentials")

BODIES: list[tuple[str, bytes, str | None]] = [
    ("no body", b"", None),
    ("empty json", b"", "application/json"),
    ("invalid json", b'{"name": "x",', "application/json"),
    ("not json", b"\x00\x01\x02\xff\xfe garbage", "application/json"),
    ("json list", b"[1, 2, 3]", "application/json"),
    ("json number", b"12345", "application/json"),
    ("json string", b'"just a string"', "application/json"),
    ("json null", b"null", "application/json"),
    ("json true", b"true", "application/json"),
    ("empty object", b"{}", "application/json"),
    (
        "wrong types",
        json.dumps(
            {
                "name": 5,
                "type": ["action"],
                "labels": [1, 2],
                "capacity": "many",
                "inputs": "x",
                "status": [],
                "execution_log": {"a": 1},
                "max_retries": "3",
                "error_details": "boom",
                "timestamp": False,
                "actions": "none",
            }
        ).encode(),
        "application/json",
    ),
    (
        "huge strings",
        json.dumps(
            {"name": "n" * 400_000, "status": "s" * 300_000, "hostname": "h" * 200_000}
        ).encode(),
        "application/json",
    ),
    (
        "unicode junk",
        json.dumps(
            {
                "name": "名前🙂\u202e\ufeff\u0301",
                "status": "\u200b\u2028",
                "labels": {"ключ": "值\U0001f4a9"},
                "execution_log": ["\u00ff\u0100\uffff\U0010ffff"],
                "actions": {"steps": [{"name": "ステップ", "plugin": "эхо"}]},
            },
            ensure_ascii=False,
        ).encode(),
        "application/json",
    ),
    ("yaml junk", b"name: [unclosed\n  - : :\n\t\x0b", "application/yaml"),
    ("form", b"name=x&status=completed", "application/x-www-form-urlencoded"),
    ("octets", bytes(range(256)), "application/octet-stream"),
    ("too large", b"x" * (LIMIT + 1), "application/json"),
]


def send(
    http: httpx.Client, method: str, url: str, headers: dict[str, Any], body: tuple[Any, ...]
) -> httpx.Response:
    _, content, content_type = body
    headers = dict(headers)
    if content_type:
        headers["Content-Type"] = content_type
    return http.request(method, url, content=content or None, headers=headers)


class Sweeper:
    """Sends requests and collects every wrong answer, reconnecting after a dropped one."""

    def __init__(self) -> None:
        self.http = httpx.Client(timeout=30)
        self.problems: list[str] = []
        self.sent = 0

    def __call__(
        self, label: str, method: str, url: str, headers: dict[str, Any], body: Any
    ) -> None:
        self.sent += 1
        try:
            response = send(self.http, method, url, headers, body)
        except httpx.TransportError:
            # After a 500 uvicorn closes the kept-alive connection; ask again on a new one.
            self.http.close()
            self.http = httpx.Client(timeout=30)
            try:
                response = send(self.http, method, url, headers, body)
            except httpx.TransportError as exc:
                self.problems.append(f"{label}: {method} {url} -> {exc!r}")
                self.http.close()
                self.http = httpx.Client(timeout=30)
                return
        problem = verdict(response)
        if problem:
            self.problems.append(f"{label}: {problem}")

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def sweeper() -> Iterator[Sweeper]:
    sweeping = Sweeper()
    yield sweeping
    sweeping.close()


# -- every route, deterministic garbage ---------------------------------------------------


def test_openapi_document_lists_the_routes(world: World) -> None:
    published = {(op.method, op.path) for op in world.operations}
    assert {
        ("GET", "/agents/v1/{agent_id}/instructions"),
        ("PUT", "/agents/v1/{agent_id}/instructions/{instruction_id}"),
        ("POST", "/agents/v1/{agent_id}/instructions/{instruction_id}/result"),
        ("POST", "/agents/v1/{agent_id}/heartbeat"),
        ("POST", "/api/v1/agents"),
        ("POST", "/api/v1/workflows"),
        ("POST", "/api/v1/workflows/{name}/runs"),
        ("GET", "/api/v1/executions/{execution_id}"),
        ("GET", "/api/v1/audit"),
    } <= published


def test_garbage_to_every_route_never_500(world: World, sweeper: Sweeper) -> None:
    for op in world.operations:
        for auth in AUTHS:
            # without a credential the ids are never looked up and the body is refused
            # whatever it holds: one kind of ids, and the kinds of body that are not JSON
            # objects (the framework may read a body before the credential), will do
            credential = auth in ("admin", "agent")
            kinds = ("real", "unknown", "other agent") if credential else ("unknown",)
            for which in kinds:
                if which != "unknown" and op.path.endswith(ACTIONS):
                    continue  # no body to garble: with a real id they do what they say
                url = world.url(op, world.ids(op, which))
                bodies = BODIES if op.has_body and credential else BODIES[:4] + BODIES[-1:]
                for body in bodies:
                    label = f"[{auth}, {which} ids, {body[0]}]"
                    sweeper(label, op.method, url, world.headers(auth), body)
    assert sweeper.sent > 500
    assert not sweeper.problems, "\n".join(sweeper.problems[:40])

    # All of that changed nothing for the instruction the agent is running.
    assert step_status(world.orch, world.execution_id) == ("running", None)
    actions = audit_actions(world.orch, world.instruction_id)
    assert sorted(actions) == ["instruction.executing", "instruction.leased"]


def test_garbage_query_strings_never_500(world: World, sweeper: Sweeper) -> None:
    junk = ["", "-1", "0", "1e999", "nan", "inf", "9" * 400, "名前", "%", "a" * 5000, "true"]
    for op in world.operations:
        if op.path.endswith(ACTIONS):
            continue  # no body or query to garble: with a real id they do what they say
        values = {p: world.real(p) for p in op.path_params}
        auth = "agent" if op.path.startswith("/agents/") else "admin"
        names = list(op.query_params) + ["unknown_param"]
        for name in names:
            for value in junk:
                url = httpx.URL(world.url(op, values), params={name: value})
                body = (
                    ("no body", b"", None)
                    if not op.has_body
                    else ("invalid", b"{", "application/json")
                )
                sweeper(f"[{name}={value[:20]}]", op.method, str(url), world.headers(auth), body)
    assert not sweeper.problems, "\n".join(sweeper.problems[:40])
    assert step_status(world.orch, world.execution_id) == ("running", None)


def test_wrong_methods_are_405_with_the_error_shape(world: World) -> None:
    declared: dict[str, set[str]] = {}
    for op in world.operations:
        declared.setdefault(op.path, set()).add(op.method)
    checked = 0
    with httpx.Client(timeout=30) as http:
        for path, methods in declared.items():
            if path in ("/api/v1/workflows/validate", "/api/v1/secrets/rotate"):
                continue  # any other method reads the workflow (secret) of that name
            op = next(o for o in world.operations if o.path == path)
            url = world.url(op, {p: world.real(p) for p in op.path_params})
            for method in METHODS:
                if method in methods:
                    continue
                for auth in ("none", "admin", "agent"):
                    response = http.request(method, url, headers=world.headers(auth))
                    assert_error(response, 405)
                    checked += 1
    assert checked > 30


def test_unknown_routes_are_404_with_the_error_shape(world: World) -> None:
    with httpx.Client(base_url=world.orch.url, timeout=30) as http:
        for path in ("/nope", "/api/v2/agents", "/agents/v1", "/agents/v1/x/y/z/w", "/api/v1/"):
            for method in ("GET", "POST"):
                response = http.request(method, path, headers=world.headers("admin"))
                assert response.status_code in (404, 405, 307), response.text
                if response.status_code != 307:
                    assert error_shape_problem(response) is None, response.text


# -- every route, hypothesis ----------------------------------------------------------------

# Known bugs have deterministic tests below (NUL characters on PostgreSQL, integers beyond
# 64 bits, NaN, lone surrogates, deep nesting); the fuzzer steers clear of those inputs so
# that what it finds is new.
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)
KEYS = st.sampled_from(
    [
        "name",
        "type",
        "labels",
        "capacity",
        "inputs",
        "status",
        "result",
        "execution_log",
        "max_retries",
        "error_message",
        "error_details",
        "timestamp",
        "version",
        "hostname",
        "actions",
        "steps",
        "plugin",
    ]
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(KEYS | TEXT, children, max_size=5)
    ),
    max_leaves=12,
)
BODY = st.one_of(
    JSON_VALUES.map(lambda v: (json.dumps(v).encode(), "application/json")),
    st.tuples(
        st.binary(max_size=300),
        st.sampled_from(["application/json", "application/yaml", "text/plain", None]),
    ),
    st.tuples(TEXT.map(str.encode), st.just("application/yaml")),
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzzed_requests_never_500(world: World, data: st.DataObject) -> None:
    op = data.draw(
        st.sampled_from([o for o in world.operations if not o.path.endswith(ACTIONS)]),
        label="operation",
    )
    auth = data.draw(st.sampled_from(AUTHS), label="auth")
    values = {
        p: data.draw(st.just(world.real(p)) | st.just(unknown(p)) | TEXT, label=p)
        for p in op.path_params
    }
    params = data.draw(
        st.dictionaries(
            st.sampled_from(list(op.query_params) + ["junk"]),
            TEXT | st.integers().map(str),
            max_size=3,
        ),
        label="query",
    )
    content, content_type = data.draw(BODY, label="body")
    method = data.draw(st.just(op.method) | st.sampled_from(METHODS), label="method")
    url = httpx.URL(world.url(op, values), params=params)
    with httpx.Client(timeout=30) as http:
        response = send(http, method, str(url), world.headers(auth), ("", content, content_type))
    problem = verdict(response)
    assert problem is None, problem


def test_fuzzing_changed_nothing_for_the_running_instruction(world: World) -> None:
    assert step_status(world.orch, world.execution_id) == ("running", None)
    actions = audit_actions(world.orch, world.instruction_id)
    assert "instruction.completed" not in actions and "instruction.failed" not in actions


# -- malformed workflows --------------------------------------------------------------------


def post_workflow(
    orch: Orchestrator, source: str | bytes, content_type: str = "application/yaml"
) -> httpx.Response:
    return orch.api.post(
        "/api/v1/workflows", content=source, headers={"Content-Type": content_type}
    )


def assert_absent(orch: Orchestrator, name: str) -> None:
    assert_error(orch.api.get(f"/api/v1/workflows/{name}"), 404)
    listed = orch.api.get("/api/v1/workflows")
    assert listed.status_code == 200, listed.text
    assert name not in {w["name"] for w in listed.json()["workflows"]}


def test_schema_problems_are_all_listed_with_their_paths(orchestrator: Orchestrator) -> None:
    name = f"bad-schema-{uuid.uuid4().hex[:8]}"
    source = f"""
name: {name}
colour: blue
agents:
  pools: [{{agent_regex: "(unclosed"}}]
actions:
  steps:
    - name: first
      plugin: echo
      colour: red
    - name: second
    - name: third
      plugin: "Not A Plugin!"
    - name: fourth
      plugin: echo
      depends_on: first
      config: [1, 2]
      timeout: soon
      error_handling: {{retry_delay: forever, max_retries: "many", on_failure: explode}}
    - name: fifth
      plugin: {{id: echo, version: "one"}}
    - name: "bad name!"
      plugin: echo
"""
    error = assert_error(post_workflow(orchestrator, source), 422)
    assert error["code"] == "invalid_input"
    assert set(paths_of(error)) >= {
        "colour",  # unknown key
        "agents.pools[0].agent_regex",  # a regular expression that does not compile
        "actions.steps[0].colour",  # unknown key in a step
        "actions.steps[1].plugin",  # missing plugin
        "actions.steps[2].plugin",  # bad plugin reference
        "actions.steps[3].depends_on",  # a string, not a list
        "actions.steps[3].config",  # a list, not a mapping
        "actions.steps[3].timeout",  # bad duration
        "actions.steps[3].error_handling.retry_delay",  # bad duration
        "actions.steps[3].error_handling.max_retries",  # not an integer
        "actions.steps[3].error_handling.on_failure",  # not a choice
        "actions.steps[4].plugin.version",  # not a version
        "actions.steps[5].name",  # not a step name
    }
    assert_absent(orchestrator, name)


def test_graph_problems_are_all_listed_with_their_paths(orchestrator: Orchestrator) -> None:
    name = f"bad-graph-{uuid.uuid4().hex[:8]}"
    source = f"""
name: {name}
actions:
  steps:
    - {{name: first, plugin: echo}}
    - {{name: second, plugin: echo, depends_on: [ghost]}}
    - {{name: first, plugin: echo}}
    - {{name: loop-a, plugin: echo, depends_on: [loop-b]}}
    - {{name: loop-b, plugin: echo, depends_on: [loop-a]}}
    - {{name: selfish, plugin: echo, depends_on: [selfish]}}
outputs:
  steps:
    - {{name: notify, plugin: echo, depends_on: [nowhere]}}
"""
    error = assert_error(post_workflow(orchestrator, source), 422)
    problems = {p["path"]: p["message"] for p in error["details"]}
    assert set(paths_of(error)) == {
        "actions.steps[2].name",
        "actions.steps[1].depends_on[0]",
        "actions.steps[5].depends_on[0]",
        "actions.steps",
        "outputs.steps[0].depends_on[0]",
    }
    assert "duplicate" in problems["actions.steps[2].name"]
    assert "ghost" in problems["actions.steps[1].depends_on[0]"]
    assert "cycle" in problems["actions.steps"]
    assert "loop-a" in problems["actions.steps"] and "loop-b" in problems["actions.steps"]
    assert_absent(orchestrator, name)


def test_schema_and_graph_problems_are_listed_together(orchestrator: Orchestrator) -> None:
    name = f"bad-both-{uuid.uuid4().hex[:8]}"
    source = f"""
name: {name}
colour: blue
actions:
  steps:
    - {{name: first, plugin: echo}}
    - {{name: first, plugin: echo, depends_on: [ghost]}}
"""
    error = assert_error(post_workflow(orchestrator, source), 422)
    assert set(paths_of(error)) >= {
        "colour",
        "actions.steps[1].name",
        "actions.steps[1].depends_on[0]",
    }
    assert_absent(orchestrator, name)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout", '"soon"'),
        ("timeout", '"-5s"'),
        ("timeout", '"0s"'),
        ("timeout", '"8d"'),
        ("timeout", '"5 parsecs"'),
        ("timeout", '"1e999"'),
        ("timeout", "-3"),
        ("error_handling", '{retry_delay: "1x"}'),
        ("error_handling", "{retry_delay: -1}"),
        pytest.param(
            "timeout",
            "true",
        ),
    ],
)
def test_bad_durations_are_refused_with_their_path(
    orchestrator: Orchestrator, field: str, value: str
) -> None:
    name = f"bad-duration-{uuid.uuid4().hex[:8]}"
    source = f"""
name: {name}
actions:
  steps:
    - {{name: fine, plugin: echo}}
    - {{name: wrong, plugin: echo, {field}: {value}}}
"""
    error = assert_error(post_workflow(orchestrator, source), 422)
    expected = (
        "actions.steps[1].timeout"
        if field == "timeout"
        else "actions.steps[1].error_handling.retry_delay"
    )
    assert paths_of(error) == [expected]
    assert_absent(orchestrator, name)


def test_wrongly_typed_duration_is_reported_at_its_own_path(orchestrator: Orchestrator) -> None:
    name = f"bad-duration-type-{uuid.uuid4().hex[:8]}"
    source = f"""
name: {name}
actions:
  steps:
    - {{name: wrong, plugin: echo, timeout: [30], error_handling: {{retry_delay: {{a: 1}}}}}}
"""
    error = assert_error(post_workflow(orchestrator, source), 422)
    assert sorted(set(paths_of(error))) == [
        "actions.steps[0].error_handling.retry_delay",
        "actions.steps[0].timeout",
    ]
    assert_absent(orchestrator, name)


UNUSABLE_TEXT = [
    ("invalid yaml", "name: [unclosed\nactions: {steps: [", "application/yaml"),
    ("tabs and colons", "name: x\n\t- : :\n", "application/yaml"),
    ("a yaml list", "- name: x\n- actions: {}\n", "application/yaml"),
    ("a yaml scalar", "just words", "application/yaml"),
    ("empty", "", "application/yaml"),
    ("invalid json", '{"name": "x", "actions": ', "application/json"),
    ("a json list", '[{"name": "x"}]', "application/json"),
    ("json null", "null", "application/json"),
    ("python tag", "!!python/object/apply:os.system ['true']", "application/yaml"),
    ("no actions", "name: lonely\n", "application/yaml"),
    ("no steps", "name: lonely\nactions: {steps: []}\n", "application/yaml"),
]


@pytest.mark.parametrize(
    ("label", "source", "content_type"), UNUSABLE_TEXT, ids=[t[0] for t in UNUSABLE_TEXT]
)
def test_unusable_workflow_text_is_422_at_the_root(
    orchestrator: Orchestrator, label: str, source: str, content_type: str
) -> None:
    error = assert_error(post_workflow(orchestrator, source, content_type), 422)
    assert paths_of(error), label
    if label not in ("no actions", "no steps"):
        assert paths_of(error) == ["(root)"], error
    assert_absent(orchestrator, "lonely")


def test_non_utf8_workflow_is_422(orchestrator: Orchestrator) -> None:
    name = f"latin1-{uuid.uuid4().hex[:8]}"
    source = (
        f"name: {name}\ndescription: caf\xe9\nactions: {{steps: [{{name: a, plugin: echo}}]}}\n"
    )
    error = assert_error(post_workflow(orchestrator, source.encode("latin-1")), 422)
    assert error["code"] == "invalid_input"
    assert_error(post_workflow(orchestrator, b"\xff\xfe\x00n\x00a\x00m\x00e"), 422)
    assert_absent(orchestrator, name)


def test_non_utf8_workflow_lists_its_problem_with_a_path(orchestrator: Orchestrator) -> None:
    source = "name: x\ndescription: caf\xe9\nactions: {steps: [{name: a, plugin: echo}]}\n"
    error = assert_error(post_workflow(orchestrator, source.encode("latin-1")), 422)
    assert paths_of(error) == ["(root)"]


PATHOLOGICAL_TEXT = {
    "json nested 100000 deep": lambda: ("[" * 100_000, "application/json"),
    "yaml nested 2000 deep": lambda: ("[" * 2000 + "]" * 2000, "application/yaml"),
    "yaml integer of 5000 digits": lambda: (
        "name: x\nversion: " + "9" * 5000 + "\nactions: {steps: [{name: a, plugin: echo}]}\n",
        "application/yaml",
    ),
}


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            "json nested 100000 deep",
        ),
        pytest.param(
            "yaml nested 2000 deep",
        ),
        pytest.param(
            "yaml integer of 5000 digits",
        ),
    ],
)
def test_pathological_workflow_text_is_422_not_500(orchestrator: Orchestrator, kind: str) -> None:
    source, content_type = PATHOLOGICAL_TEXT[kind]()
    with httpx.Client(base_url=orchestrator.url, timeout=30) as http:
        response = http.post(
            "/api/v1/workflows",
            content=source,
            headers={"Content-Type": content_type, "Authorization": f"Bearer {orchestrator.token}"},
        )
    del source  # keep a 100 kB parameter out of any failure report
    assert response.status_code == 422, f"{kind}: {response.status_code} {response.text[:300]}"
    assert error_shape_problem(response) is None
    assert paths_of(response.json()["error"]) == ["(root)"], kind


def test_yaml_alias_bomb_is_refused(fresh_orchestrator: Orchestrator) -> None:
    name = f"bomb-{uuid.uuid4().hex[:8]}"
    anchors = ["  a0: &a0 [" + ",".join(["x"] * 10) + "]"]
    for level in range(1, 6):
        anchors.append(f"  a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * 10) + "]")
    source = (
        f"name: {name}\nvariables:\n"
        + "\n".join(anchors)
        + "\nactions: {steps: [{name: a, plugin: echo}]}\n"
    )
    assert len(source) < 1024
    response = fresh_orchestrator.api.post(
        "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
    )
    # Expanded, this document is a million strings: far past the 1 MiB the body limit allows.
    assert_error(response, 422)
    assert_absent(fresh_orchestrator, name)


# -- the private API ------------------------------------------------------------------------


def test_private_api_needs_a_valid_token(world: World) -> None:
    checked = 0
    with httpx.Client(timeout=30) as http:
        for op in world.operations:
            if not op.path.startswith("/api/v1/") or op.path.startswith("/api/v1/schemas/"):
                continue  # the workflow JSON Schema is public, for editors
            if op.path == "/api/v1/login":
                continue  # its credential is its body (test_identities.py)
            url = world.url(op, {p: world.real(p) for p in op.path_params})
            for auth in ("none", "bad", "basic", "binary"):
                response = http.request(
                    op.method,
                    url,
                    headers=world.headers(auth),
                    content=b"{}" if op.has_body else None,
                )
                assert_error(response, 401)
                checked += 1
            empty = http.request(op.method, url, headers={"Authorization": "Bearer"})
            assert_error(empty, 401)
            if op.path == "/api/v1/triggers":
                continue  # the one route an agent credential may call (test_events.py)
            as_agent = http.request(op.method, url, headers=world.headers("agent"))
            assert as_agent.status_code in (401, 403), as_agent.text
            assert error_shape_problem(as_agent) is None
    assert checked >= 40


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": None},
        {"name": 5},
        {"name": ["a"]},
        {"name": "has space"},
        {"name": "-leading-dash"},
        {"name": "slash/inside"},
        {"name": "x" * 201},
        {"name": "名前"},
        {"name": "ok-{u}", "type": "robot"},
        {"name": "ok-{u}", "type": 5},
        {"name": "ok-{u}", "labels": ["a"]},
        {"name": "ok-{u}", "labels": "env=prod"},
        {"name": "ok-{u}", "labels": {"env": 1}},
        {"name": "ok-{u}", "labels": {"env": None}},
        {"name": "ok-{u}", "labels": {"env": {"nested": "x"}}},
        {"name": "ok-{u}", "labels": {f"k{i}": "v" for i in range(65)}},
        {"name": "ok-{u}", "capacity": 0},
        {"name": "ok-{u}", "capacity": -1},
        {"name": "ok-{u}", "capacity": 1001},
        {"name": "ok-{u}", "capacity": "2x"},
        {"name": "ok-{u}", "capacity": 1.5},
        {"name": "ok-{u}", "api_key": "stva_chosen_by_me"},
    ],
)
def test_agent_creation_refuses_bad_fields(
    orchestrator: Orchestrator, body: dict[str, Any]
) -> None:
    suffix = uuid.uuid4().hex[:8]
    if isinstance(body.get("name"), str):
        body = {**body, "name": body["name"].replace("{u}", suffix)}
    error = assert_error(orchestrator.api.post("/api/v1/agents", json=body), 422)
    assert error["code"] == "invalid_input"
    assert paths_of(error)
    names = {a["name"] for a in orchestrator.api.get("/api/v1/agents").json()["agents"]}
    assert f"ok-{suffix}" not in names


def test_agent_creation_refuses_malformed_json(orchestrator: Orchestrator) -> None:
    for raw in (b"{", b"[]", b'"name"', b"", b"null"):
        response = orchestrator.api.post(
            "/api/v1/agents", content=raw, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 422)


def test_duplicate_agent_name_is_409(orchestrator: Orchestrator) -> None:
    name = f"twin-{uuid.uuid4().hex[:8]}"
    agent_id, _ = orchestrator.create_agent(name)
    again = orchestrator.api.post("/api/v1/agents", json={"name": name, "type": "sensor"})
    error = assert_error(again, 409)
    assert error["code"] == "conflict"
    twins = [
        a for a in orchestrator.api.get("/api/v1/agents").json()["agents"] if a["name"] == name
    ]
    assert [a["id"] for a in twins] == [agent_id]


def test_run_of_an_unknown_workflow_is_404(orchestrator: Orchestrator) -> None:
    name = f"ghost-{uuid.uuid4().hex[:8]}"
    response = orchestrator.api.post(f"/api/v1/workflows/{name}/runs", json={"inputs": {}})
    assert_error(response, 404)
    assert_error(orchestrator.api.post(f"/api/v1/workflows/{name}/runs"), 404)
    listed = orchestrator.api.get("/api/v1/executions", params={"workflow": name}).json()
    assert listed["executions"] == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"inputs": []}',
        b'{"inputs": "x"}',
        b'{"inputs": 5}',
        b'{"inputs": null}',
        b'{"inputs": {}, "extra": 1}',
        b"[]",
        b'"inputs"',
        b"{",
    ],
)
def test_run_with_bad_inputs_is_422_and_starts_nothing(
    orchestrator: Orchestrator, raw: bytes
) -> None:
    name = f"inputs-{uuid.uuid4().hex[:8]}"
    orchestrator.apply(one_step_workflow(name, f"nobody-{uuid.uuid4().hex}"))
    response = orchestrator.api.post(
        f"/api/v1/workflows/{name}/runs", content=raw, headers={"Content-Type": "application/json"}
    )
    error = assert_error(response, 422)
    assert paths_of(error)
    listed = orchestrator.api.get("/api/v1/executions", params={"workflow": name}).json()
    assert listed["executions"] == []


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/executions", {"limit": "0"}),
        ("/api/v1/executions", {"limit": "501"}),
        ("/api/v1/executions", {"limit": "ten"}),
        ("/api/v1/executions", {"status": "bogus"}),
        ("/api/v1/audit", {"limit": "0"}),
        ("/api/v1/audit", {"limit": "1001"}),
        ("/api/v1/audit", {"limit": "1.5"}),
    ],
)
def test_bad_query_parameters_are_422(
    orchestrator: Orchestrator, path: str, params: dict[str, str]
) -> None:
    error = assert_error(orchestrator.api.get(path, params=params), 422)
    assert all(p.startswith("query:") for p in paths_of(error)), error


# -- known bugs: inputs the server stores but cannot handle ---------------------------------


def test_nul_characters_never_500(
    world: World, backend: str, request: pytest.FixtureRequest, sweeper: Sweeper
) -> None:
    admin, agent = world.headers("admin"), world.headers("agent")
    base, me = world.orch.url, world.agent_id
    none: tuple[Any, ...] = ("", b"", None)
    executing = ("", b'{"status": "executing"}', "application/json")
    for label, method, url, headers, body in [
        ("workflow", "GET", f"{base}/api/v1/workflows/%00", admin, none),
        ("run", "POST", f"{base}/api/v1/workflows/a%00b/runs", admin, none),
        ("execution", "GET", f"{base}/api/v1/executions/exe_%00", admin, none),
        ("agent", "GET", f"{base}/api/v1/agents/agt_%00", admin, none),
        ("executions", "GET", f"{base}/api/v1/executions?workflow=%00", admin, none),
        ("audit", "GET", f"{base}/api/v1/audit?subject_id=%00", admin, none),
        ("progress", "PUT", f"{base}/agents/v1/{me}/instructions/ins_%00", agent, executing),
        ("result", "POST", f"{base}/agents/v1/{me}/instructions/%00/result", agent, executing),
    ]:
        sweeper(label, method, url, headers, body)

    # A failed result whose message holds a NUL (plugins print anything).
    name = f"nul-{uuid.uuid4().hex[:8]}"
    tag = f"nul-agent-{uuid.uuid4().hex[:8]}"
    world.orch.apply(one_step_workflow(name, tag))
    agent_id, key = world.orch.create_agent(tag)
    execution = world.orch.run(name)
    client = world.orch.agent_client(key)
    instruction = client.get(f"/agents/v1/{agent_id}/instructions").json()["instruction"]
    failed = json.dumps({"status": "failed", "error_message": "exit status 1\u0000garbage"})
    sweeper(
        "error_message",
        "POST",
        f"{base}/agents/v1/{agent_id}/instructions/{instruction['id']}/result",
        {"Authorization": f"Bearer {key}"},
        ("", failed.encode(), "application/json"),
    )
    if not sweeper.problems:
        assert world.orch.execution(execution["id"])["status"] == "failed"
    assert not sweeper.problems, "\n".join(sweeper.problems)


UNRENDERABLE = [
    pytest.param("18446744073709551616", id="integer-beyond-64-bits"),
    pytest.param('"\\ud800 lone surrogate"', id="lone-surrogate"),
    pytest.param("[" * 300 + "]" * 300, id="nested-300-deep"),
]


@pytest.mark.parametrize("literal", UNRENDERABLE)
def test_values_the_server_cannot_render_are_refused_or_survive(
    fresh_orchestrator: Orchestrator, literal: str
) -> None:
    """Each way in either refuses the value (4xx) or keeps every read of it working."""
    orch = fresh_orchestrator
    sweeping = Sweeper()
    admin = {"Authorization": f"Bearer {orch.token}"}
    tag = uuid.uuid4().hex[:8]
    agent_id, key = orch.create_agent(f"render-{tag}")
    agent = {"Authorization": f"Bearer {key}"}
    workflow = f"render-{tag}"
    orch.apply(one_step_workflow(workflow, f"render-{tag}"))
    run = orch.run(workflow)
    instruction = (
        orch.agent_client(key).get(f"/agents/v1/{agent_id}/instructions").json()["instruction"]
    )
    base = orch.url
    ins = f"{base}/agents/v1/{agent_id}/instructions/{instruction['id']}"

    ways_in = [
        ("progress log", "PUT", ins, agent, '{"status": "executing", "execution_log": [VALUE]}'),
        (
            "result output",
            "POST",
            f"{ins}/result",
            agent,
            '{"status": "completed", "result": {"execution_result": {"output_data": {"v": VALUE}}}}',
        ),
        (
            "run inputs",
            "POST",
            f"{base}/api/v1/workflows/{workflow}/runs",
            admin,
            '{"inputs": {"v": VALUE}}',
        ),
        (
            "agent labels",
            "POST",
            f"{base}/api/v1/agents",
            admin,
            '{"name": "labels-TAG", "labels": {"v": VALUE}}',
        ),
        (
            "workflow config",
            "POST",
            f"{base}/api/v1/workflows",
            admin,
            '{"name": "config-TAG", "actions": {"steps": [{"name": "a", "plugin": "echo", "config": {"v": VALUE}}]}}',
        ),
        (
            "heartbeat",
            "POST",
            f"{base}/agents/v1/{agent_id}/heartbeat",
            agent,
            '{"status": "online", "version": VALUE}',
        ),
    ]
    try:
        for label, method, url, headers, template in ways_in:
            body = template.replace("TAG", tag).replace("VALUE", literal).encode()
            sweeping(label, method, url, headers, ("", body, "application/json"))
        none = ("", b"", None)
        for read in (
            "/api/v1/agents",
            f"/api/v1/agents/{agent_id}",
            "/api/v1/workflows",
            f"/api/v1/workflows/config-{tag}",
            "/api/v1/executions",
            f"/api/v1/executions/{run['id']}",
            "/api/v1/audit",
        ):
            sweeping(f"read {read}", "GET", base + read, admin, none)
        sweeping("poll", "GET", f"{base}/agents/v1/{agent_id}/instructions", agent, none)
    finally:
        sweeping.close()
    assert not sweeping.problems, "\n".join(sweeping.problems)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_literals_are_422(fresh_orchestrator: Orchestrator, literal: str) -> None:
    orch = fresh_orchestrator
    workflow = f"nan-{uuid.uuid4().hex[:8]}"
    orch.apply(one_step_workflow(workflow, f"nobody-{uuid.uuid4().hex}"))
    response = orch.client(orch.token).post(
        f"/api/v1/workflows/{workflow}/runs",
        content=b'{"inputs": {"v": %s}}' % literal.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 422)
    listed = orch.client(orch.token).get("/api/v1/executions", params={"workflow": workflow})
    assert listed.json()["executions"] == []


# -- types are what they say: no silent coercion ---------------------------------------------


def agent_names(orch: Orchestrator) -> set[str]:
    return {a["name"] for a in orch.api.get("/api/v1/agents").json()["agents"]}


@pytest.mark.parametrize(
    ("field", "value"),
    [("capacity", True), ("capacity", "1"), ("capacity", 2.0), ("labels", {"env": True})],
    ids=["capacity-true", "capacity-string", "capacity-float", "label-bool"],
)
def test_agent_creation_coerces_no_type(orchestrator: Orchestrator, field: str, value: Any) -> None:
    name = f"strict-{uuid.uuid4().hex[:8]}"
    response = orchestrator.api.post("/api/v1/agents", json={"name": name, field: value})
    error = assert_error(response, 422)
    assert paths_of(error) == [field if field != "labels" else "labels.env"], error
    assert name not in agent_names(orchestrator)


def enrollment_token_names(orch: Orchestrator) -> set[str]:
    listed = orch.api.get("/api/v1/enrollment-tokens").json()["enrollment_tokens"]
    return {t["name"] for t in listed}


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_uses", True), ("expires_in", "60"), ("capacity", True), ("max_uses", "3")],
    ids=["max_uses-true", "expires_in-string", "capacity-true", "max_uses-string"],
)
def test_enrollment_token_creation_coerces_no_type(
    orchestrator: Orchestrator, field: str, value: Any
) -> None:
    name = f"strict-{uuid.uuid4().hex[:8]}"
    response = orchestrator.api.post("/api/v1/enrollment-tokens", json={"name": name, field: value})
    error = assert_error(response, 422)
    assert paths_of(error) == [field], error
    assert name not in enrollment_token_names(orchestrator)


# The agent API's routes are served by its fast path (agents_v1.serve_fast) when a request
# is plainly well-formed, else by the framework. A repeated query parameter sends a request
# to the framework: both ways must agree.
WAYS = {"fast path": "", "framework": "?via=framework&via=framework"}


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize(
    ("field", "value"),
    [("capacity", "2"), ("heartbeat_interval", True), ("capacity", True), ("running", "ins_1")],
    ids=["capacity-string", "interval-true", "capacity-true", "running-string"],
)
def test_heartbeat_coerces_no_type(
    orchestrator: Orchestrator, way: str, field: str, value: Any
) -> None:
    agent_id, key = orchestrator.create_agent(f"strict-{uuid.uuid4().hex[:8]}")
    agent = orchestrator.agent_client(key)
    response = agent.post(
        f"/agents/v1/{agent_id}/heartbeat{WAYS[way]}", json={"status": "online", field: value}
    )
    error = assert_error(response, 422)
    assert paths_of(error) == [field], error
    seen = orchestrator.api.get(f"/api/v1/agents/{agent_id}").json()
    assert seen["last_heartbeat_at"] is None and not seen.get("facts"), seen


@pytest.mark.parametrize("way", list(WAYS))
def test_heartbeat_timestamp_stays_an_iso_string(orchestrator: Orchestrator, way: str) -> None:
    agent_id, key = orchestrator.create_agent(f"strict-{uuid.uuid4().hex[:8]}")
    agent = orchestrator.agent_client(key)
    now = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    for body in (
        {"timestamp": now, "status": "online"},
        {"timestamp": now, "status": "online", "capacity": 2, "heartbeat_interval": 30},
    ):
        response = agent.post(f"/agents/v1/{agent_id}/heartbeat{WAYS[way]}", json=body)
        assert response.status_code == 200, response.text
    seen = orchestrator.api.get(f"/api/v1/agents/{agent_id}").json()
    assert seen["facts"]["capacity"] == 2, seen


@pytest.mark.parametrize("way", list(WAYS))
def test_progress_coerces_no_type(world: World, way: str) -> None:
    base = f"/agents/v1/{world.agent_id}/instructions/{world.instruction_id}{WAYS[way]}"
    agent = world.orch.agent_client(world.agent_key)
    for body, path in (
        ({"status": "executing", "max_retries": True}, "max_retries"),
        ({"status": "executing", "max_retries": "3"}, "max_retries"),
        ({"status": 1}, "status"),
    ):
        assert paths_of(assert_error(agent.put(base, json=body), 422)) == [path]
    assert step_status(world.orch, world.execution_id) == ("running", None)


# -- integer parameters are bounded before they reach the database --------------------------


@pytest.mark.parametrize(
    "version", ["9223372036854775808", "18446744073709551616", "2147483648", "0", "-1"]
)
def test_workflow_version_out_of_range_is_422(world: World, version: str) -> None:
    response = world.orch.api.get(f"/api/v1/workflows/{world.workflow}/versions/{version}")
    error = assert_error(response, 422)
    assert paths_of(error) == ["path:version"], error


def test_workflow_version_at_the_bound_is_404(world: World) -> None:
    response = world.orch.api.get(f"/api/v1/workflows/{world.workflow}/versions/2147483647")
    assert_error(response, 404)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/executions", {"limit": "9223372036854775808"}),
        ("/api/v1/audit", {"limit": "18446744073709551616"}),
    ],
)
def test_huge_limits_are_422(orchestrator: Orchestrator, path: str, params: dict[str, str]) -> None:
    error = assert_error(orchestrator.api.get(path, params=params), 422)
    assert paths_of(error) == ["query:limit"], error


# -- permissions ------------------------------------------------------------------------------


def test_validating_a_workflow_needs_workflows_write(orchestrator: Orchestrator) -> None:
    source = one_step_workflow(f"check-{uuid.uuid4().hex[:8]}", "nobody")
    yaml = {"Content-Type": "application/yaml"}
    viewer = orchestrator.client(api_token(orchestrator, "viewer"))
    error = assert_error(
        viewer.post("/api/v1/workflows/validate", content=source, headers=yaml), 403
    )
    assert error["code"] == "forbidden"
    operator = orchestrator.client(api_token(orchestrator, "operator"))
    allowed = operator.post("/api/v1/workflows/validate", content=source, headers=yaml)
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["valid"] is True
