"""The triggers stage runs: a workflow's trigger steps are handed to the sensor agents they
select as watches (the heartbeat answer's `watch`), and each event a watch reports
(`POST /agents/v1/{id}/events`) is stored once per idempotency key and starts the
workflow, the event readable as `trigger.*`. Real HTTP, both databases."""

from __future__ import annotations

import concurrent.futures
import uuid
from typing import Any

import yaml

from tests.harness import Orchestrator, SimAgent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def apply(orch: Orchestrator, name: str, pool: str, threshold: int = 90) -> None:
    definition = {
        "name": name,
        "triggers": {
            "agents": {"labels": {"pool": pool}},
            "steps": [
                {
                    "name": "cpu",
                    "plugin": "cpu-trigger",
                    "config": {"threshold": threshold, "interval": 5},
                }
            ],
        },
        "actions": {
            "steps": [
                {
                    "name": "react",
                    "plugin": "echo",
                    "config": {
                        "value": "{{ trigger.payload.data.value }}",
                        "type": "{{ trigger.type }}",
                    },
                }
            ]
        },
    }
    response = orch.api.post(
        "/api/v1/workflows",
        content=yaml.safe_dump(definition),
        headers={"Content-Type": "application/yaml"},
    )
    assert response.status_code in (200, 201), response.text


def beat(agent: SimAgent) -> dict[str, Any]:
    response = agent.client.post(
        f"/agents/v1/{agent.id}/heartbeat", json={"status": "online", "timestamp": None}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def watches_of(agent: SimAgent, workflow: str) -> list[dict[str, Any]]:
    return [w for w in beat(agent).get("watch", []) if w["context"]["workflow"] == workflow]


def send(agent: SimAgent, **body: Any) -> Any:
    return agent.client.post(f"/agents/v1/{agent.id}/events", json=body)


def event(watch: dict[str, Any], event_id: str, value: int = 97) -> dict[str, Any]:
    return {
        "type": "cpu.high",
        "watch_id": watch["id"],
        "payload": {"id": event_id, "data": {"value": value}, "severity": "high"},
    }


def test_a_sensor_agent_is_handed_the_watches_that_select_it(orchestrator: Orchestrator) -> None:
    name, pool = unique("watched"), unique("pool")
    apply(orchestrator, name, pool)
    sensor = SimAgent(orchestrator, unique("sensor"), type="sensor", labels={"pool": pool})
    other = SimAgent(orchestrator, unique("sensor"), type="sensor", labels={"pool": "elsewhere"})
    action = SimAgent(orchestrator, unique("action"), labels={"pool": pool})
    [watch] = watches_of(sensor, name)
    assert watch["id"].startswith("wat_")
    assert watch["plugin_id"] == "cpu-trigger"
    assert watch["instruction_type"] == "watch"
    assert watch["input_data"] == {"threshold": 90, "interval": 5}
    assert watch["interval"] == 5
    assert watch["context"] == {"workflow": name, "step": "cpu"}
    assert watches_of(other, name) == []
    assert "watch" not in beat(action)  # only sensor agents keep watches

    # Applying the same trigger again changes nothing; a changed one is a new watch.
    apply(orchestrator, name, pool)
    assert watches_of(sensor, name)[0]["id"] == watch["id"]
    apply(orchestrator, name, pool, threshold=80)
    assert watches_of(sensor, name)[0]["id"] != watch["id"]


def test_an_event_starts_the_workflow_once_with_the_trigger_in_its_templates(
    orchestrator: Orchestrator,
) -> None:
    name, pool = unique("started"), unique("pool")
    apply(orchestrator, name, pool)
    sensor = SimAgent(orchestrator, unique("sensor"), type="sensor", labels={"pool": pool})
    [watch] = watches_of(sensor, name)
    key = unique("cpu-high")

    first = send(sensor, **event(watch, key))
    assert first.status_code == 201, first.text
    answer = first.json()
    assert answer["duplicate"] is False and answer["outcome"] == "started"
    [execution_id] = answer["started"]
    execution = orchestrator.api.get(f"/api/v1/executions/{execution_id}").json()
    assert execution["workflow"] == name
    assert execution["trigger"]["type"] == "cpu.high"
    assert execution["trigger"]["payload"]["data"] == {"value": 97}
    assert execution["trigger"]["agent_id"] == sensor.id

    # the step reads the event in its templates
    action = SimAgent(orchestrator, unique("action"))
    instruction = action.poll()
    assert instruction is not None
    assert instruction["input_data"] == {"value": 97, "type": "cpu.high"}

    again = send(sensor, **event(watch, key, value=1))
    assert again.status_code == 200, again.text
    assert again.json() == {**answer, "duplicate": True}

    shown = orchestrator.api.get(f"/api/v1/events/{answer['event_id']}").json()
    assert shown["outcome"] == "started" and shown["started"] == [execution_id]
    assert shown["workflow"] == name and shown["step"] == "cpu"
    assert shown["source"] == "agent" and shown["sent_by"] == f"agent:{sensor.id}"
    listed = orchestrator.api.get("/api/v1/events", params={"type": "cpu.high"}).json()
    assert answer["event_id"] in [e["id"] for e in listed["events"]]


def test_concurrent_duplicates_start_one_run(orchestrator: Orchestrator) -> None:
    name, pool = unique("raced"), unique("pool")
    apply(orchestrator, name, pool)
    sensor = SimAgent(orchestrator, unique("sensor"), type="sensor", labels={"pool": pool})
    [watch] = watches_of(sensor, name)
    body = event(watch, unique("burst"))
    clients = [orchestrator.agent_client(sensor.key) for _ in range(8)]

    def post(client: Any) -> Any:
        return client.post(f"/agents/v1/{sensor.id}/events", json=body)

    with concurrent.futures.ThreadPoolExecutor(8) as pool_:
        answers = list(pool_.map(post, clients))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [201]
    assert len({a.json()["event_id"] for a in answers}) == 1
    assert len({tuple(a.json()["started"]) for a in answers}) == 1
    runs = orchestrator.api.get("/api/v1/executions", params={"workflow": name}).json()
    assert len(runs["executions"]) == 1


def test_the_same_key_from_two_agents_is_two_events(orchestrator: Orchestrator) -> None:
    name, pool = unique("hosts"), unique("pool")
    apply(orchestrator, name, pool)
    sensors = [
        SimAgent(orchestrator, unique("sensor"), type="sensor", labels={"pool": pool})
        for _ in range(2)
    ]
    started = []
    for sensor in sensors:
        [watch] = watches_of(sensor, name)
        answer = send(sensor, **event(watch, "cpu-high-1721030400"))
        assert answer.status_code == 201, answer.text
        started += answer.json()["started"]
    assert len(set(started)) == 2


def test_an_event_no_watch_matches_is_recorded_and_starts_nothing(
    orchestrator: Orchestrator,
) -> None:
    name, pool = unique("stale"), unique("pool")
    apply(orchestrator, name, pool)
    sensor = SimAgent(orchestrator, unique("sensor"), type="sensor", labels={"pool": pool})
    outsider = SimAgent(orchestrator, unique("sensor"), type="sensor", labels={"pool": "x"})
    [watch] = watches_of(sensor, name)
    apply(orchestrator, name, pool, threshold=50)  # the watch it had is gone
    stale = send(sensor, **event(watch, unique("old")))
    assert stale.status_code == 201, stale.text
    assert stale.json()["outcome"] == "unmatched" and stale.json()["started"] == []
    shown = orchestrator.api.get(f"/api/v1/events/{stale.json()['event_id']}").json()
    assert "no current watch" in shown["reason"]
    # a watch that does not select the agent starts nothing either
    [current] = watches_of(sensor, name)
    refused = send(outsider, **event(current, unique("outsider")))
    assert refused.json()["outcome"] == "unmatched"
    # no watch named at all: recorded
    bare = send(sensor, type="disk.full", payload={"id": unique("bare")})
    assert bare.status_code == 201 and bare.json()["outcome"] == "unmatched"


def test_bad_events_are_refused(orchestrator: Orchestrator) -> None:
    sensor = SimAgent(orchestrator, unique("sensor"), type="sensor")
    cases = [
        {"payload": {}},  # no type
        {"type": "", "payload": {}},
        {"type": "x\n", "payload": {}},
        {"type": "x", "payload": []},
        {"type": "x", "payload": {"id": {"nested": 1}}},
        {"type": "x", "payload": {"id": "k" * 301}},
        {"type": "x", "watch_id": "nope"},
        {"type": "x", "idempotency_key": ""},
    ]
    for body in cases:
        answer = send(sensor, **body)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error"]["code"] == "invalid_input", answer.text
    assert send(sensor, type="x", payload={"id": 7}).status_code == 201  # integers are keys
    other = SimAgent(orchestrator, unique("sensor"), type="sensor")
    # another agent's path: refused
    answer = other.client.post(f"/agents/v1/{sensor.id}/events", json={"type": "x"})
    assert answer.status_code in (401, 403), answer.text
    assert orchestrator.api.get("/api/v1/events/evt_nope").status_code == 404


def documented(agent: SimAgent, source: str, event_id: str) -> dict[str, Any]:
    """The body an earlier official sensor agent sent (AGENT_API.md)."""
    return {
        "event_type": "trigger_event",
        "agent_id": agent.id,
        "tenant_id": "acme",
        "timestamp": "2026-12-03T10:00:00Z",
        "trigger_type": "cpu.high",
        "payload": {
            "id": event_id,
            "source": source,
            "data": {"value": 91},
            "metadata": {},
            "tags": ["cpu"],
            "severity": "high",
        },
    }


def test_the_documented_trigger_route_takes_an_official_sensors_event(
    orchestrator: Orchestrator,
) -> None:
    """POST /api/v1/triggers with the agent's own credential: its payload's source names
    the trigger step's plugin, which selects the agent; the workflow starts once."""
    name, pool = unique("official"), unique("pool")
    apply(orchestrator, name, pool)
    sensor = SimAgent(orchestrator, unique("sensor"), type="sensor", labels={"pool": pool})
    body = documented(sensor, "cpu-trigger", unique("cpu-high"))
    first = sensor.client.post("/api/v1/triggers", json=body)
    assert first.status_code == 201, first.text
    answer = first.json()
    assert answer["success"] is True and answer["outcome"] == "started"
    [execution_id] = answer["started"]
    execution = orchestrator.api.get(f"/api/v1/executions/{execution_id}").json()
    assert execution["workflow"] == name and execution["trigger"]["payload"]["data"]["value"] == 91
    again = sensor.client.post("/api/v1/triggers", json=body)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["event_id"] == answer["event_id"]

    # another plugin's event starts nothing, and is recorded
    other = sensor.client.post(
        "/api/v1/triggers", json=documented(sensor, "disk-monitor", unique("disk"))
    )
    assert other.status_code == 201 and other.json()["outcome"] == "unmatched"


def test_the_documented_trigger_route_needs_the_agents_own_credential(
    orchestrator: Orchestrator,
) -> None:
    sensor = SimAgent(orchestrator, unique("sensor"), type="sensor")
    other = SimAgent(orchestrator, unique("sensor"), type="sensor")
    body = documented(sensor, "cpu-trigger", unique("k"))
    assert orchestrator.api.post("/api/v1/triggers", json=body).status_code == 401  # admin's
    assert other.client.post("/api/v1/triggers", json=body).status_code == 403
    anonymous = orchestrator.client()
    assert anonymous.post("/api/v1/triggers", json=body).status_code == 401
    # a revoked sensor's event: refused, stored nowhere, and recorded for the operator
    gone = SimAgent(orchestrator, unique("sensor"), type="sensor")
    assert orchestrator.api.post(f"/api/v1/agents/{gone.id}/revoke").status_code == 200
    refused = gone.client.post("/api/v1/triggers", json=documented(gone, "cpu-trigger", "r"))
    assert refused.status_code == 403 and "revoked" in refused.json()["error"]["message"]
    denied = orchestrator.api.get(
        "/api/v1/audit", params={"action": "auth.denied", "limit": 500}
    ).json()["records"]
    assert [r["details"]["reason"] for r in denied if r["subject_id"] == gone.id] == [
        "this agent's credential is revoked"
    ]
    listed = orchestrator.api.get("/api/v1/events", params={"source": "agent"}).json()
    assert not [e for e in listed["events"] if e["sent_by"] == f"agent:{gone.id}"]
    for bad in (
        {k: v for k, v in body.items() if k != "trigger_type"},
        {**body, "payload": "text"},
        {**body, "agent_id": ""},
        {**body, "payload": {"id": ["x"]}},
    ):
        answer = sensor.client.post("/api/v1/triggers", json=bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["error"]["code"] == "invalid_input"


RULED = """
name: {name}
inputs:
  env: {{type: string, required: true}}
  replicas: {{type: integer, required: true}}
on:
  - source: api
    type: "deploy.*"
    where:
      - {{field: env, in: [prod, staging]}}
      - any: [{{field: replicas, gt: 0}}, {{field: force, eq: true}}]
      - not: {{field: tags, contains: skip}}
    inputs:
      env: "{{{{ trigger.payload.env }}}}"
      replicas: "{{{{ trigger.payload.replicas }}}}"
actions:
  steps: [{{name: only, plugin: echo, config: {{env: "{{{{ inputs.env }}}}"}}}}]
"""


def test_an_on_rule_starts_the_workflow_from_a_matching_api_event(
    orchestrator: Orchestrator,
) -> None:
    name = unique("ruled")
    applied = orchestrator.api.post(
        "/api/v1/workflows",
        content=RULED.format(name=name),
        headers={"Content-Type": "application/yaml"},
    )
    assert applied.status_code == 201, applied.text
    key = unique("deploy")
    body = {"type": "deploy.done", "payload": {"id": key, "env": "prod", "replicas": 3}}
    first = orchestrator.api.post("/api/v1/events", json=body)
    assert first.status_code == 201, first.text
    event = first.json()
    assert event["source"] == "api" and event["outcome"] == "started"
    assert event["workflow"] == name and event["idempotency_key"] == key
    [execution_id] = event["started"]
    execution = orchestrator.api.get(f"/api/v1/executions/{execution_id}").json()
    assert execution["inputs"] == {"env": "prod", "replicas": 3}
    assert execution["trigger"]["type"] == "deploy.done"
    again = orchestrator.api.post("/api/v1/events", json=body)
    assert again.status_code == 200 and again.json()["id"] == event["id"]

    for payload in (
        {"env": "dev", "replicas": 3},  # not in the list
        {"env": "prod", "replicas": 0},  # neither of the any
        {"env": "prod", "replicas": 2, "tags": ["skip"]},  # the not
    ):
        missed = orchestrator.api.post(
            "/api/v1/events", json={"type": "deploy.done", "payload": payload}
        )
        assert missed.status_code == 201 and missed.json()["outcome"] == "unmatched", payload
    forced = orchestrator.api.post(
        "/api/v1/events",
        json={"type": "deploy.again", "payload": {"env": "staging", "replicas": 0, "force": True}},
    )
    assert forced.json()["outcome"] == "started"
    # another source's event of that type does not match a rule for api events
    other = orchestrator.api.post(
        "/api/v1/events", json={"type": "other.kind", "payload": {"env": "prod", "replicas": 1}}
    )
    assert other.json()["outcome"] == "unmatched"
    # the mapping makes inputs the workflow refuses: recorded as refused
    refused = orchestrator.api.post(
        "/api/v1/events", json={"type": "deploy.done", "payload": {"env": "prod", "replicas": 2.5}}
    )
    assert refused.status_code == 201 and refused.json()["outcome"] == "refused"
    assert "replicas" in refused.json()["reason"]


def test_a_rule_that_can_never_match_is_refused_at_apply(orchestrator: Orchestrator) -> None:
    for where, said in [
        ("[{field: cpu, gt: 90}, {field: cpu, lt: 50}]", "no number is both > 90 and < 50"),
        ("[{field: env, eq: prod}, {field: env, ne: prod}]", "env cannot both equal 'prod'"),
        ("{field: env, in: []}", "`in: []` never matches"),
        ("{field: env, matches: '('}", "invalid regular expression"),
        # RE2: linear time on any payload, so no backtracking constructs
        ("{field: env, matches: '(?<=a)b'}", "invalid regular expression"),
        ("{field: env, gt: 1, lt: 3}", "exactly one operator"),
    ]:
        source = f"""
name: {unique("never")}
on: [{{source: api, where: {where}}}]
actions: {{steps: [{{name: only, plugin: echo}}]}}
"""
        answer = orchestrator.api.post(
            "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
        )
        assert answer.status_code == 422, (where, answer.text)
        assert said in answer.text, (where, answer.text)


def test_a_manual_run_is_an_event_with_who_ran_it(orchestrator: Orchestrator) -> None:
    name, pool = unique("manual"), unique("pool")
    apply(orchestrator, name, pool)
    run = orchestrator.run(name)
    [event] = [
        e
        for e in orchestrator.api.get("/api/v1/events", params={"source": "manual"}).json()[
            "events"
        ]
        if e["started"] == [run["id"]]
    ]
    assert event["type"] == "manual" and event["workflow"] == name
    assert event["sent_by"] == run["trigger"]["actor"]
    assert run["trigger"]["event_id"] == event["id"]
    # what templates read as trigger.*, the same names as any other event's
    assert run["trigger"]["source"] == "manual" and run["trigger"]["payload"] == event["payload"]
