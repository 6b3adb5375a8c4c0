"""The public agent API replayed exactly as an official Go agent speaks it (AGENT_API.md).

Every request carries the Go agent's headers and goes to a URL built the Go way, by
joining strings onto a base URL that ends in `/` (so paths start with `//agents/v1/`).
Bodies are encoded compactly, as Go's `json.Marshal` does. Where the contract fixes a
status or a body, it is checked exactly; where it fixes only a shape, the shape is.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import structlog

from tests.harness import Orchestrator

GO_AGENT_VERSION = "1.4.2"
INSTRUCTION_FIELDS = {
    "id": str,
    "plugin_id": str,
    "instruction_type": str,
    "plugin_configuration": dict,
    "input_data": dict,
    "timeout_seconds": int,
    "max_retries": int,
    "correlation_id": str,
}


# -- helpers ------------------------------------------------------------------------------


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg}: {record.exc_info[1]!r}"
            record.exc_info, record.exc_text = None, None
        return True


def _exception_as_text(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.pop("exc_info", None):
        event["exception"] = repr(sys.exc_info()[1])
    return event


@pytest.fixture(scope="module", autouse=True)
def server_errors_without_tracebacks() -> Iterator[None]:
    """Should a test here meet a 500, log it as one line. uvicorn formats a 500's
    traceback in the server thread after answering, while pytest formats the failure in
    the main thread; CPython 3.11 parses source for traceback carets with one shared AST
    state, and the race crashes pytest ("AST constructor recursion depth mismatch")."""
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
    logging.getLogger("uvicorn.error").addFilter(no_traceback)
    yield
    logging.getLogger("uvicorn.error").removeFilter(no_traceback)
    structlog.configure(**before)


def strict_json(response: httpx.Response) -> Any:
    """The body, refusing any float: every number the contract fixes is a JSON integer."""

    def refuse(literal: str) -> Any:
        raise AssertionError(f"{literal!r} is not a JSON integer in {response.text}")

    assert response.headers["content-type"].startswith("application/json"), response.headers
    return json.loads(response.text, parse_float=refuse, parse_constant=refuse)


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The one error shape: {"error": {"code": str, "message": str, "details": ...}}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    return error  # type: ignore[no-any-return]


def rfc3339(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def go_marshal(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class GoAgent:
    """An official agent: its id, its credential and the requests it sends."""

    id: str
    key: str
    name: str
    base_url: str  # as configured by the operator, trailing slash included
    http: httpx.Client

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {key if key is not None else self.key}".rstrip(),
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"Stavily-Agent/{GO_AGENT_VERSION}",
        }

    def url(self, path: str, agent_id: str | None = None) -> str:
        # Go: fmt.Sprintf("%s/agents/v1/%s%s", baseURL, agentID, path)
        return f"{self.base_url}/agents/v1/{agent_id or self.id}{path}"

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        key: str | None = None,
        agent_id: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        content = raw if raw is not None else (None if body is None else go_marshal(body))
        return self.http.request(
            method,
            self.url(path, agent_id),
            content=content,
            headers=self.headers(key),
            params=params,
        )

    def poll(self, **params: Any) -> httpx.Response:
        return self.send("GET", "/instructions", params=params or None)

    def progress(self, instruction_id: str, body: Any, **kw: Any) -> httpx.Response:
        return self.send("PUT", f"/instructions/{instruction_id}", body, **kw)

    def result(self, instruction_id: str, body: Any, **kw: Any) -> httpx.Response:
        return self.send("POST", f"/instructions/{instruction_id}/result", body, **kw)

    def heartbeat(self, body: Any, **kw: Any) -> httpx.Response:
        return self.send("POST", "/heartbeat", body, **kw)

    def take(self) -> dict[str, Any]:
        """Poll once and return the instruction, which must be there."""
        response = self.poll()
        assert response.status_code == 200, response.text
        body = strict_json(response)
        assert body["status"] == "instruction_available", body
        return body["instruction"]  # type: ignore[no-any-return]


def executing(instruction: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": "executing",
        "execution_log": [
            "Instruction received",
            f"[{rfc3339()}] Started plugin execution",
        ],
    }


def completed(instruction: dict[str, Any], output: Any) -> dict[str, Any]:
    """A successful `execute`, exactly as the official action agent wraps it."""
    end = datetime.now(UTC)
    start = end - timedelta(milliseconds=110)
    return {
        "status": "completed",
        "result": {
            "instruction_id": instruction["id"],
            "duration": 0.11,
            "start_time": rfc3339(start),
            "end_time": rfc3339(end),
            "logs": ["Starting plugin execution", "Plugin execution completed successfully"],
            "execution_result": {
                "plugin_id": instruction["plugin_id"],
                "success": True,
                "exit_code": 0,
                "duration": 0.11,
                "logs": ["<plugin stdout>"],
                "output_data": output,
            },
        },
        "execution_log": [
            "Instruction received",
            f"[{rfc3339(start)}] Started plugin execution",
            f"[{rfc3339(end)}] Plugin execution completed",
        ],
    }


def failed(message: str = "exit status 1") -> dict[str, Any]:
    return {
        "status": "failed",
        "error_message": message,
        "error_details": {"error_type": "*exec.ExitError", "timestamp": rfc3339()},
        "execution_log": ["Instruction received", f"[{rfc3339()}] Plugin failed: {message}"],
    }


def workflow(name: str, agent_regex: str, steps: str) -> str:
    return f"""
name: {name}
version: "1.0.0"
agents:
  pools: [{{pool_name: contract, agent_regex: "{agent_regex}"}}]
actions:
  steps:
{steps}
"""


ONE_STEP = """    - name: restart
      plugin: service-restart-v1.2.0
      config: {service: nginx}
      timeout: "1.5m"
      error_handling: {max_retries: 3}
"""

TWO_PARALLEL = """    - {name: left, plugin: echo, config: {side: left}}
    - {name: right, plugin: echo, config: {side: right}}
"""

THREE_PARALLEL = """    - {name: one, plugin: echo}
    - {name: two, plugin: echo}
    - {name: three, plugin: echo}
"""


def start(
    orch: Orchestrator, agent_regex: str, steps: str, inputs: dict[str, Any] | None = None
) -> dict[str, Any]:
    name = f"contract-{uuid.uuid4().hex[:10]}"
    orch.apply(workflow(name, agent_regex, steps))
    return orch.run(name, inputs)


def audit_actions(orch: Orchestrator, subject_id: str) -> list[str]:
    response = orch.api.get("/api/v1/audit", params={"subject_id": subject_id})
    assert response.status_code == 200, response.text
    return [record["action"] for record in response.json()["records"]]


def step(orch: Orchestrator, execution_id: str, name: str) -> dict[str, Any]:
    steps = orch.execution(execution_id)["steps"]
    return next(s for s in steps if s["name"] == name)


@pytest.fixture
def go_agents(orchestrator: Orchestrator) -> Iterator[Callable[..., GoAgent]]:
    """Makes official agents, each with a unique name, talking through a `/`-ended base URL."""
    http = httpx.Client(timeout=30)

    def make(capacity: int = 1, name: str | None = None) -> GoAgent:
        name = name or f"go-{uuid.uuid4().hex[:12]}"
        extra = {"capacity": capacity} if capacity != 1 else {}
        agent_id, key = orchestrator.create_agent(name, **extra)
        return GoAgent(agent_id, key, name, orchestrator.url + "/", http)

    yield make
    http.close()


# -- polling ------------------------------------------------------------------------------


def test_empty_poll_is_200_with_exactly_the_documented_body(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    response = agent.poll()
    assert agent.url("/instructions").startswith(orchestrator.url + "//agents/v1/")
    assert response.status_code == 200, response.text
    body = strict_json(response)
    assert body == {
        "instruction": None,
        "status": "no_pending_instructions",
        "next_poll_interval": orchestrator.settings.poll_interval,
    }
    assert type(body["next_poll_interval"]) is int
    assert ".0" not in response.text

    # The same from a base URL without the trailing slash.
    clean = agent.http.get(
        f"{orchestrator.url}/agents/v1/{agent.id}/instructions", headers=agent.headers()
    )
    assert clean.status_code == 200
    assert strict_json(clean) == body


def test_poll_with_work_hands_out_the_documented_instruction(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, ONE_STEP, {"reason": "health check failed"})

    response = agent.poll()
    assert response.status_code == 200, response.text
    body = strict_json(response)
    assert {"status", "next_poll_interval", "instruction"} <= set(body)
    assert body["status"] == "instruction_available"
    assert type(body["next_poll_interval"]) is int
    instruction = body["instruction"]
    for field, kind in INSTRUCTION_FIELDS.items():
        assert type(instruction.get(field)) is kind, (field, instruction)
    assert instruction["id"]
    assert instruction["plugin_id"] == "service-restart"
    assert instruction["instruction_type"] == "execute"
    assert instruction["plugin_configuration"]["service"] == "nginx"
    assert instruction["timeout_seconds"] == 90
    assert instruction["max_retries"] == 3
    assert instruction["correlation_id"].startswith(execution["id"])
    assert '"timeout_seconds":90,' in response.text or '"timeout_seconds":90}' in response.text

    restart = step(orchestrator, execution["id"], "restart")
    assert restart["status"] == "running"
    assert restart["agent_id"] == agent.id
    assert restart["instruction_id"] == instruction["id"]

    # Never handed out twice while the agent may still be running it.
    again = agent.poll()
    assert again.status_code == 200
    assert strict_json(again)["instruction"] is None


# -- the official cycle -------------------------------------------------------------------


def test_official_cycle_progress_heartbeat_result(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, ONE_STEP)
    instruction = agent.take()

    progress = agent.progress(instruction["id"], executing(instruction))
    assert progress.status_code == 200, progress.text
    assert strict_json(progress) == {
        "success": True,
        "instruction_id": instruction["id"],
        "updated_fields": ["status", "execution_log"],
    }

    beat = agent.heartbeat({"timestamp": rfc3339(), "status": "online"})
    assert beat.status_code in (200, 204), beat.text

    output = {"restarted": True, "service": "nginx", "pid": 4242}
    answer = agent.result(instruction["id"], completed(instruction, output))
    assert answer.status_code == 200, answer.text
    assert strict_json(answer) == {"acknowledged": True, "next_instruction": None}

    done = orchestrator.execution(execution["id"])
    assert done["status"] == "succeeded", done
    restart = done["steps"][0]
    assert restart["status"] == "succeeded"
    assert restart["result"] == output  # result.execution_result.output_data is what is stored
    actions = audit_actions(orchestrator, instruction["id"])
    assert sorted(actions) == [
        "instruction.completed",
        "instruction.executing",
        "instruction.leased",
    ]


def test_progress_may_carry_max_retries(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    start(orchestrator, agent.name, ONE_STEP)
    instruction = agent.take()
    response = agent.progress(instruction["id"], {"max_retries": 5})
    assert response.status_code == 200, response.text
    assert strict_json(response) == {
        "success": True,
        "instruction_id": instruction["id"],
        "updated_fields": ["max_retries"],
    }


def test_failure_report_fails_the_step_and_the_execution(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, ONE_STEP)
    seen = []
    for attempt in range(1, 5):  # max_retries: 3, so four attempts, each a new instruction
        instruction = agent.take()
        assert instruction["attempt"] == attempt
        seen.append(instruction["id"])
        assert agent.progress(instruction["id"], executing(instruction)).status_code == 200
        answer = agent.result(instruction["id"], failed("exit status 1"))
        assert answer.status_code == 200, answer.text
        assert strict_json(answer) == {"acknowledged": True, "next_instruction": None}
    assert len(set(seen)) == 4

    done = orchestrator.execution(execution["id"])
    assert done["status"] == "failed"
    assert done["steps"][0]["attempts"] == 4
    assert "exit status 1" in done["error"]
    restart = done["steps"][0]
    assert restart["status"] == "failed"
    assert "exit status 1" in restart["error"]
    assert "instruction.failed" in audit_actions(orchestrator, instruction["id"])


# -- heartbeats ---------------------------------------------------------------------------


def _agent_status(orch: Orchestrator, agent_id: str) -> str:
    response = orch.api.get(f"/api/v1/agents/{agent_id}")
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


def _settles_on(orch: Orchestrator, agent_id: str, status: str, within: float = 3) -> bool:
    """Whether the agent reads as `status` within a few heartbeat flushes."""
    deadline = time.monotonic() + within
    while _agent_status(orch, agent_id) != status:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_heartbeats_online_and_offline_are_accepted(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    online = agent.heartbeat({"timestamp": rfc3339(), "status": "online"})
    assert online.status_code in (200, 204), online.text
    assert _settles_on(orchestrator, agent.id, "online")

    # Go's own time.Time encoding: nanoseconds and the host's UTC offset.
    local = datetime.now(UTC).astimezone(timezone(timedelta(hours=2)))
    go_time = local.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123+02:00"
    nano = agent.heartbeat({"timestamp": go_time, "status": "online"})
    assert nano.status_code in (200, 204), nano.text

    offline = agent.heartbeat({"timestamp": rfc3339(), "status": "offline"})
    assert offline.status_code in (200, 204), offline.text
    assert _settles_on(orchestrator, agent.id, "offline")


def test_agent_status_reads_back_right_after_each_heartbeat(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    # Heartbeats are buffered and flushed in batches; the private API merges what is not
    # flushed yet, so a heartbeat that was answered must be visible to the next read.
    agent = go_agents()
    stale: list[str] = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not stale:
        for status in ("online", "offline"):
            beat = agent.heartbeat({"timestamp": rfc3339(), "status": status})
            assert beat.status_code in (200, 204), beat.text
            seen = _agent_status(orchestrator, agent.id)
            if seen != status:
                stale.append(f"read {seen!r} right after an acknowledged {status!r} heartbeat")
    assert not stale, stale


def test_heartbeat_with_a_timestamp_far_from_the_server_clock_is_refused(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    # A heartbeat claiming to come from an hour ahead or two days ago is not evidence of
    # life now: it is refused with 422 and changes nothing.
    agent = go_agents()
    assert agent.heartbeat({"timestamp": rfc3339(), "status": "online"}).status_code in (200, 204)
    assert _settles_on(orchestrator, agent.id, "online")
    for when in (datetime.now(UTC) + timedelta(hours=1), datetime.now(UTC) - timedelta(days=2)):
        refused = agent.heartbeat({"timestamp": rfc3339(when), "status": "offline"})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "invalid_input"
    assert _settles_on(orchestrator, agent.id, "online")


# -- idempotency and conflicts ------------------------------------------------------------


def test_identical_result_twice_is_acknowledged_and_changes_state_once(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, ONE_STEP)
    instruction = agent.take()
    assert agent.progress(instruction["id"], executing(instruction)).status_code == 200
    raw = go_marshal(completed(instruction, {"restarted": True}))

    first = agent.result(instruction["id"], None, raw=raw)
    second = agent.result(instruction["id"], None, raw=raw)
    for answer in (first, second):
        assert answer.status_code == 200, answer.text
        assert strict_json(answer) == {"acknowledged": True, "next_instruction": None}

    assert audit_actions(orchestrator, instruction["id"]).count("instruction.completed") == 1
    assert audit_actions(orchestrator, execution["id"]).count("execution.succeeded") == 1
    assert step(orchestrator, execution["id"], "restart")["result"] == {"restarted": True}


def test_results_racing_each_other_change_state_once(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, ONE_STEP)
    instruction = agent.take()
    same = go_marshal(completed(instruction, {"race": "same"}))
    bodies = [same, same, same, go_marshal(completed(instruction, {"race": "other"}))]
    barrier = threading.Barrier(len(bodies))
    answers: list[httpx.Response] = []

    def post(raw: bytes) -> None:
        with httpx.Client(timeout=30) as own:
            racer = GoAgent(agent.id, agent.key, agent.name, agent.base_url, own)
            barrier.wait()
            answers.append(racer.result(instruction["id"], None, raw=raw))

    threads = [threading.Thread(target=post, args=(raw,)) for raw in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(answers) == len(bodies)
    statuses = sorted(a.status_code for a in answers)
    assert statuses in ([200, 200, 200, 409], [200, 409, 409, 409]), statuses
    for answer in answers:
        if answer.status_code == 200:
            assert strict_json(answer) == {"acknowledged": True, "next_instruction": None}
        else:
            assert_error(answer, 409)
    winner = {"race": "same"} if statuses.count(200) == 3 else {"race": "other"}
    assert step(orchestrator, execution["id"], "restart")["result"] == winner
    assert audit_actions(orchestrator, instruction["id"]).count("instruction.completed") == 1
    assert audit_actions(orchestrator, execution["id"]).count("execution.succeeded") == 1


def test_different_result_after_completion_is_409_and_changes_nothing(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, ONE_STEP)
    instruction = agent.take()
    assert agent.result(instruction["id"], completed(instruction, {"n": 1})).status_code == 200

    other = agent.result(instruction["id"], completed(instruction, {"n": 2}))
    assert_error(other, 409)
    flipped = agent.result(instruction["id"], failed())
    assert_error(flipped, 409)
    late_progress = agent.progress(instruction["id"], executing(instruction))
    assert_error(late_progress, 409)

    done = orchestrator.execution(execution["id"])
    assert done["status"] == "succeeded"
    assert done["steps"][0]["result"] == {"n": 1}
    assert audit_actions(orchestrator, instruction["id"]).count("instruction.completed") == 1
    assert "instruction.failed" not in audit_actions(orchestrator, instruction["id"])


def test_late_result_after_another_step_failed_the_execution_is_409(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    tag = uuid.uuid4().hex[:10]
    left_agent = go_agents(name=f"late-{tag}-a")
    right_agent = go_agents(name=f"late-{tag}-b")
    execution = start(orchestrator, f"late-{tag}-.*", TWO_PARALLEL)
    first = left_agent.take()
    second = right_agent.take()
    assert {first["correlation_id"], second["correlation_id"]} == {
        f"{execution['id']}/left",
        f"{execution['id']}/right",
    }
    assert right_agent.progress(second["id"], executing(second)).status_code == 200

    assert left_agent.result(first["id"], failed("exit status 2")).status_code == 200
    assert orchestrator.execution(execution["id"])["status"] == "failed"

    late = right_agent.result(second["id"], completed(second, {"too": "late"}))
    assert_error(late, 409)
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "failed"
    late_step = next(s for s in done["steps"] if s["instruction_id"] == second["id"])
    assert late_step["status"] == "cancelled"
    assert late_step["result"] is None
    assert "instruction.completed" not in audit_actions(orchestrator, second["id"])


# -- authentication and ownership ---------------------------------------------------------


def _every_endpoint(agent: GoAgent, **kw: Any) -> list[httpx.Response]:
    unknown = f"ins_{uuid.uuid4().hex}"
    return [
        agent.send("GET", "/instructions", **kw),
        agent.send("PUT", f"/instructions/{unknown}", {"status": "executing"}, **kw),
        agent.send("POST", f"/instructions/{unknown}/result", {"status": "completed"}, **kw),
        agent.send("POST", "/heartbeat", {"timestamp": rfc3339(), "status": "online"}, **kw),
    ]


def test_missing_or_unknown_credential_is_401(go_agents: Callable[..., GoAgent]) -> None:
    agent = go_agents()
    for response in _every_endpoint(agent, key=f"stva_{uuid.uuid4().hex}"):
        assert_error(response, 401)
    for response in _every_endpoint(agent, key=""):
        assert_error(response, 401)
    bare = agent.http.get(agent.url("/instructions"), headers={"Accept": "application/json"})
    assert_error(bare, 401)


def test_path_of_another_agent_is_403_and_reveals_nothing(
    go_agents: Callable[..., GoAgent],
) -> None:
    agent, other = go_agents(), go_agents()
    real = _every_endpoint(agent, agent_id=other.id)
    made_up = _every_endpoint(agent, agent_id=f"agt_{uuid.uuid4().hex[:26].upper()}")
    for one, two in zip(real, made_up, strict=True):
        assert_error(one, 403)
        assert_error(two, 403)
        assert one.json() == two.json()


def test_result_for_another_agents_instruction_is_403_and_changes_nothing(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    owner, intruder = go_agents(), go_agents()
    execution = start(orchestrator, owner.name, ONE_STEP)
    instruction = owner.take()

    assert_error(intruder.result(instruction["id"], completed(instruction, {"x": 1})), 403)
    assert_error(intruder.result(instruction["id"], failed()), 403)
    assert_error(intruder.progress(instruction["id"], executing(instruction)), 403)

    restart = step(orchestrator, execution["id"], "restart")
    assert (restart["status"], restart["result"], restart["agent_id"]) == (
        "running",
        None,
        owner.id,
    )
    assert sorted(audit_actions(orchestrator, instruction["id"])) == ["instruction.leased"]

    assert owner.result(instruction["id"], completed(instruction, {"x": 2})).status_code == 200
    assert orchestrator.execution(execution["id"])["steps"][0]["result"] == {"x": 2}


def test_unknown_instruction_is_404(go_agents: Callable[..., GoAgent]) -> None:
    agent = go_agents()
    unknown = f"ins_{uuid.uuid4().hex[:26].upper()}"
    assert_error(agent.progress(unknown, {"status": "executing", "execution_log": []}), 404)
    assert_error(agent.result(unknown, failed()), 404)


# -- malformed and oversized bodies -------------------------------------------------------

MALFORMED: list[tuple[str, str, bytes]] = [
    ("PUT", "", b"{"),
    ("PUT", "", b'{"status": "executing",'),
    ("PUT", "", b"not json at all"),
    ("PUT", "", b'{"status": "executing", "max_retries": "3"}'),
    ("PUT", "", b'{"status": "executing", "max_retries": 2.5}'),
    ("PUT", "", b'{"status": "executing", "execution_log": 5}'),
    ("PUT", "", b'{"status": "executing", "execution_log": ["ok", 5]}'),
    ("PUT", "", b'{"status": 5}'),
    ("PUT", "", b'{"status": "completed"}'),
    ("PUT", "", b"[]"),
    ("POST", "/result", b"{"),
    ("POST", "/result", b"[]"),
    ("POST", "/result", b'"completed"'),
    ("POST", "/result", b"null"),
    ("POST", "/result", b"{}"),
    ("POST", "/result", b'{"status": 5}'),
    ("POST", "/result", b'{"status": "done"}'),
    ("POST", "/result", b'{"status": "failed", "error_details": "boom"}'),
    ("POST", "/result", b'{"status": "failed", "error_message": ["boom"]}'),
    ("POST", "/result", b'{"status": "completed", "execution_log": 5}'),
    ("HEARTBEAT", "", b"{"),
    ("HEARTBEAT", "", b"[]"),
    ("HEARTBEAT", "", b'{"status": 5}'),
    ("HEARTBEAT", "", b'{"status": "dancing"}'),
    ("HEARTBEAT", "", b'{"timestamp": "yesterday", "status": "online"}'),
]


def test_malformed_bodies_are_422_and_change_nothing(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, ONE_STEP)
    instruction = agent.take()
    for method, suffix, raw in MALFORMED:
        if method == "HEARTBEAT":
            response = agent.send("POST", "/heartbeat", raw=raw)
        else:
            response = agent.send(method, f"/instructions/{instruction['id']}{suffix}", raw=raw)
        error = assert_error(response, 422)
        assert error["code"] == "invalid_input", (method, suffix, raw, error)

    restart = step(orchestrator, execution["id"], "restart")
    assert (restart["status"], restart["result"]) == ("running", None)
    assert sorted(audit_actions(orchestrator, instruction["id"])) == ["instruction.leased"]
    assert agent.result(instruction["id"], completed(instruction, {"ok": 1})).status_code == 200


def test_body_nested_too_deep_to_parse_is_422(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    start(orchestrator, agent.name, ONE_STEP)
    instruction = agent.take()
    raw = b"[" * 100_000 + b"]" * 100_000  # well under the body limit
    for method, path in (
        ("PUT", f"/instructions/{instruction['id']}"),
        ("POST", f"/instructions/{instruction['id']}/result"),
        ("POST", "/heartbeat"),
    ):
        assert_error(agent.send(method, path, raw=raw), 422)


def test_oversized_bodies_are_413_and_change_nothing(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, ONE_STEP)
    instruction = agent.take()
    limit = orchestrator.settings.max_body_bytes
    assert limit == 1024 * 1024
    big_output = completed(instruction, {"blob": "x" * (limit + 10)})
    huge_log = {"status": "executing", "execution_log": ["y" * 1000] * (limit // 1000 + 10)}

    assert_error(agent.result(instruction["id"], big_output), 413)
    assert_error(agent.progress(instruction["id"], huge_log), 413)
    beat = {"timestamp": rfc3339(), "status": "online", "hostname": "h" * (limit + 1)}
    assert_error(agent.heartbeat(beat), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        body = go_marshal(big_output)
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    chunked = agent.http.post(
        agent.url(f"/instructions/{instruction['id']}/result"),
        content=chunks(),
        headers=agent.headers(),
    )
    assert_error(chunked, 413)

    restart = step(orchestrator, execution["id"], "restart")
    assert (restart["status"], restart["result"]) == ("running", None)
    assert sorted(audit_actions(orchestrator, instruction["id"])) == ["instruction.leased"]


# -- extensions ---------------------------------------------------------------------------


def test_next_instruction_only_when_asked_for(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    execution = start(orchestrator, agent.name, THREE_PARALLEL)
    first = agent.take()

    # Two more steps are queued, but an official agent did not ask: null.
    plain = agent.result(first["id"], completed(first, {"n": 1}))
    assert plain.status_code == 200
    assert strict_json(plain) == {"acknowledged": True, "next_instruction": None}

    second = agent.take()
    piggy = agent.result(second["id"], completed(second, {"n": 2}), params={"next": 1})
    assert piggy.status_code == 200, piggy.text
    body = strict_json(piggy)
    assert set(body) == {"acknowledged", "next_instruction"}
    assert body["acknowledged"] is True
    third = body["next_instruction"]
    assert third is not None
    for field, kind in INSTRUCTION_FIELDS.items():
        assert type(third.get(field)) is kind, (field, third)
    assert {first["id"], second["id"], third["id"]} == {
        s["instruction_id"] for s in orchestrator.execution(execution["id"])["steps"]
    }

    # Handed out by the piggyback, so a poll does not hand it out again.
    assert strict_json(agent.poll())["instruction"] is None
    last = agent.result(third["id"], completed(third, {"n": 3}), params={"next": 1})
    assert strict_json(last) == {"acknowledged": True, "next_instruction": None}
    assert orchestrator.execution(execution["id"])["status"] == "succeeded"


def test_long_poll_answers_as_soon_as_work_is_queued(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents()
    name = f"contract-{uuid.uuid4().hex[:10]}"
    orchestrator.apply(workflow(name, agent.name, ONE_STEP))
    started: dict[str, Any] = {}

    def run_later() -> None:
        time.sleep(0.5)
        with httpx.Client(base_url=orchestrator.url, timeout=30) as admin:
            admin.headers["Authorization"] = f"Bearer {orchestrator.token}"
            started["at"] = time.monotonic()
            started["response"] = admin.post(f"/api/v1/workflows/{name}/runs", json={})

    runner = threading.Thread(target=run_later)
    began = time.monotonic()
    runner.start()
    try:
        response = agent.poll(wait=10)
    finally:
        runner.join(timeout=30)
    answered = time.monotonic()

    assert started["response"].status_code == 201, started["response"].text
    assert response.status_code == 200, response.text
    body = strict_json(response)
    assert body["status"] == "instruction_available"
    assert body["instruction"]["correlation_id"].startswith(started["response"].json()["id"])
    assert answered - began >= 0.4  # it really waited for the work
    assert answered - started["at"] < 3  # and answered as soon as the work was queued


def test_long_poll_without_work_answers_empty_after_the_wait(
    go_agents: Callable[..., GoAgent],
) -> None:
    agent = go_agents()
    began = time.monotonic()
    response = agent.poll(wait=1)
    elapsed = time.monotonic() - began
    assert response.status_code == 200
    assert strict_json(response)["instruction"] is None
    assert strict_json(response)["status"] == "no_pending_instructions"
    assert 0.8 <= elapsed < 5


def test_slots_hand_out_several_and_keep_the_single_instruction_field(
    orchestrator: Orchestrator, go_agents: Callable[..., GoAgent]
) -> None:
    agent = go_agents(capacity=3)
    empty = agent.poll(slots=3)
    assert empty.status_code == 200
    assert strict_json(empty) == {
        "instruction": None,
        "status": "no_pending_instructions",
        "next_poll_interval": orchestrator.settings.poll_interval,
        "instructions": [],
    }

    execution = start(orchestrator, agent.name, THREE_PARALLEL)
    response = agent.poll(slots=3)
    assert response.status_code == 200, response.text
    body = strict_json(response)
    assert body["status"] == "instruction_available"
    assert isinstance(body["instructions"], list) and len(body["instructions"]) == 3
    assert body["instruction"] == body["instructions"][0]
    for instruction in body["instructions"]:
        for field, kind in INSTRUCTION_FIELDS.items():
            assert type(instruction.get(field)) is kind, (field, instruction)
    assert {i["correlation_id"] for i in body["instructions"]} == {
        f"{execution['id']}/{s}" for s in ("one", "two", "three")
    }
    for instruction in body["instructions"]:
        answer = agent.result(instruction["id"], completed(instruction, {"id": instruction["id"]}))
        assert answer.status_code == 200
    assert orchestrator.execution(execution["id"])["status"] == "succeeded"
