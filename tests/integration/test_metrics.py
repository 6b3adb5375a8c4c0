"""GET /metrics over real HTTP on each database: its credential and permission, the
Prometheus text format, agents counted in the state the fleet view shows (busy included),
executions, instructions and events; and only the caller's organization's."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from stavily import __version__
from tests.harness import Orchestrator, api_token

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("online", "busy", "degraded", "offline", "draining", "disabled", "revoked")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]  # type: ignore[no-any-return]


def scrape(client: httpx.Client) -> tuple[Samples, set[str]]:
    """Every sample of a scrape, by name and labels; and the families that carry HELP."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    samples: Samples = {}
    described = set()
    for family in text_string_to_metric_families(response.text):
        if family.documentation:
            described.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, described


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def agents_by_state(samples: Samples) -> dict[str, float]:
    return {state: value(samples, "stavily_agents", state=state) for state in STATES}


class Organization:
    """An organization of its own (so its counts start at zero) and its admin's client."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        made = _ok(orch.api.post("/api/v1/organizations", json={"name": f"m-{_tag()}"}), 201)
        self.id = made["id"]
        self.api = orch.client(made["admin_token"])

    def agent(self, name: str, **fields: Any) -> Agent:
        made = _ok(self.api.post("/api/v1/agents", json={"name": name, **fields}), 201)
        return Agent(self.orch, made["agent_id"], made["api_key"])

    def workflow_for(self, agent_name: str) -> str:
        """A workflow of one step that only `agent_name` may run."""
        name = f"metrics-{_tag()}"
        source = f"""
name: {name}
agents:
  pools: [{{pool_name: p, agent_regex: "^{agent_name}$"}}]
actions:
  steps:
    - name: only
      plugin: echo
"""
        headers = {"Content-Type": "application/yaml"}
        _ok(self.api.post("/api/v1/workflows", content=source, headers=headers), 201)
        return name

    def run(self, workflow: str) -> str:
        answer = self.api.post(f"/api/v1/workflows/{workflow}/runs", json={"inputs": {}})
        return _ok(answer, 201)["id"]  # type: ignore[no-any-return]

    def admin(self, agent: Agent, action: str) -> None:
        _ok(self.api.post(f"/api/v1/agents/{agent.id}/{action}"))


class Agent:
    def __init__(self, orch: Orchestrator, agent_id: str, key: str) -> None:
        self.id = agent_id
        self.client = orch.agent_client(key)

    def heartbeat(self, status: str = "online") -> None:
        answer = self.client.post(f"/agents/v1/{self.id}/heartbeat", json={"status": status})
        assert answer.status_code == 200, answer.text

    def take(self) -> dict[str, Any]:
        answer = self.client.get(f"/agents/v1/{self.id}/instructions")
        instruction = _ok(answer)["instruction"]
        assert instruction is not None
        return instruction  # type: ignore[no-any-return]

    def start(self, instruction: dict[str, Any]) -> None:
        body = {"status": "executing", "execution_log": ["started"]}
        _ok(self.client.put(f"/agents/v1/{self.id}/instructions/{instruction['id']}", json=body))


def test_without_a_credential_or_the_permission_it_is_refused(orchestrator: Orchestrator) -> None:
    assert orchestrator.api  # made first: the first client the orchestrator makes is `api`
    error = _error(orchestrator.client().get("/metrics"), 401)
    assert error["code"] == "unauthorized"
    assert _error(orchestrator.client("stv_not_a_real_token").get("/metrics"), 401)
    # metrics:read is a permission of its own: a role that sees the fleet may still lack it
    role = f"fleet-only-{_tag()}"
    _ok(orchestrator.api.put(f"/api/v1/roles/{role}", json={"permissions": ["agents:read"]}), 201)
    fleet_only = orchestrator.client(api_token(orchestrator, role))
    assert fleet_only.get("/api/v1/fleet").status_code == 200
    error = _error(fleet_only.get("/metrics"), 403)
    assert error["code"] == "forbidden" and "metrics:read" in error["message"]
    # every built-in role reads it, as each reads the fleet
    for builtin in ("viewer", "operator", "auditor"):
        scrape(orchestrator.client(api_token(orchestrator, builtin)))


def test_the_text_format_with_help_for_every_family(orchestrator: Orchestrator) -> None:
    org = Organization(orchestrator)
    samples, described = scrape(org.api)
    assert {
        "stavily_build_info",
        "stavily_agents",
        "stavily_agents_by_type",
        "stavily_agent_capacity",
        "stavily_agent_capacity_in_use",
        "stavily_agent_capacity_available",
        "stavily_executions",
        "stavily_instructions",
        "stavily_events",
    } <= described
    # an empty organization: every state and status there is, at zero
    assert agents_by_state(samples) == dict.fromkeys(STATES, 0)
    assert value(samples, "stavily_agents_by_type", type="action") == 0
    assert value(samples, "stavily_agents_by_type", type="sensor") == 0
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert value(samples, "stavily_executions", status=status) == 0
    for status in ("queued", "leased", "executing"):
        assert value(samples, "stavily_instructions", status=status) == 0
    assert not [name for name, _ in samples if name == "stavily_events"]
    assert value(samples, "stavily_build_info", version=__version__) == 1
    # the server process's own figures are for the organization that runs the server only
    assert not [name for name, _ in samples if name.startswith(("process_", "python_"))]
    operators, _ = scrape(orchestrator.api)
    assert value(operators, "process_resident_memory_bytes") > 0
    assert any(name == "python_info" for name, _ in operators)


def test_agents_by_the_state_the_fleet_shows(orchestrator: Orchestrator) -> None:
    org = Organization(orchestrator)
    tag = _tag()
    worker = org.agent(f"{tag}-worker", capacity=2)
    quitting = org.agent(f"{tag}-quitting")
    drained = org.agent(f"{tag}-drained", type="sensor")
    disabled = org.agent(f"{tag}-disabled")
    revoked = org.agent(f"{tag}-revoked")
    org.agent(f"{tag}-silent")  # never heard from: offline
    worker.heartbeat()
    quitting.heartbeat()
    org.admin(drained, "drain")
    org.admin(disabled, "disable")
    org.admin(revoked, "revoke")

    samples, _ = scrape(org.api)
    assert agents_by_state(samples) == {
        **dict.fromkeys(STATES, 0),
        "online": 2,
        "offline": 1,
        "draining": 1,
        "disabled": 1,
        "revoked": 1,
    }
    assert value(samples, "stavily_agents_by_type", type="action") == 5
    assert value(samples, "stavily_agents_by_type", type="sensor") == 1

    # the worker takes work: busy at once; the other says it goes offline (heartbeats
    # read before the buffer writes them: the figures are those of GET /api/v1/fleet)
    execution = org.run(org.workflow_for(f"{tag}-worker"))
    samples, _ = scrape(org.api)
    assert value(samples, "stavily_instructions", status="queued") == 1
    assert value(samples, "stavily_executions", status="running") == 1
    instruction = worker.take()
    quitting.heartbeat("offline")
    samples, _ = scrape(org.api)
    fleet = _ok(org.api.get("/api/v1/fleet"))
    assert agents_by_state(samples) == fleet["by_state"]
    assert fleet["by_state"]["busy"] == 1 and fleet["by_state"]["online"] == 0
    assert fleet["by_state"]["offline"] == 2
    assert value(samples, "stavily_instructions", status="queued") == 0
    assert value(samples, "stavily_instructions", status="leased") == 1
    assert value(samples, "stavily_agent_capacity_in_use") == fleet["capacity"]["in_use"] == 1
    assert value(samples, "stavily_agent_capacity") == fleet["capacity"]["total"]
    # the worker's other slot
    assert value(samples, "stavily_agent_capacity_available") == fleet["capacity"]["available"] == 1

    worker.start(instruction)
    samples, _ = scrape(org.api)
    assert value(samples, "stavily_instructions", status="leased") == 0
    assert value(samples, "stavily_instructions", status="executing") == 1
    assert value(samples, "stavily_executions", status="running") == 1
    assert _ok(org.api.get(f"/api/v1/executions/{execution}"))["status"] == "running"


def test_only_the_callers_organization_is_counted(orchestrator: Orchestrator) -> None:
    ours, theirs = Organization(orchestrator), Organization(orchestrator)
    tag = _tag()
    busy = theirs.agent(f"{tag}-busy")
    busy.heartbeat()
    theirs.agent(f"{tag}-silent", type="sensor")
    theirs.run(theirs.workflow_for(f"{tag}-busy"))
    busy.take()
    theirs.run(theirs.workflow_for(f"{tag}-nobody"))  # waits: no such agent
    _ok(theirs.api.post("/api/v1/events", json={"type": "metrics.test", "payload": {}}), 201)
    mine = ours.agent(f"{tag}-mine")
    mine.heartbeat()

    samples, _ = scrape(theirs.api)
    assert agents_by_state(samples) == {**dict.fromkeys(STATES, 0), "busy": 1, "offline": 1}
    assert value(samples, "stavily_instructions", status="queued") == 1
    assert value(samples, "stavily_instructions", status="leased") == 1
    assert value(samples, "stavily_executions", status="running") == 2
    assert value(samples, "stavily_events", source="api", outcome="unmatched") == 1

    samples, _ = scrape(ours.api)
    assert agents_by_state(samples) == {**dict.fromkeys(STATES, 0), "online": 1}
    assert value(samples, "stavily_agents_by_type", type="sensor") == 0
    assert value(samples, "stavily_agent_capacity_in_use") == 0
    for status in ("queued", "leased", "executing"):
        assert value(samples, "stavily_instructions", status=status) == 0
    assert value(samples, "stavily_executions", status="running") == 0
    assert not [name for name, _ in samples if name == "stavily_events"]
