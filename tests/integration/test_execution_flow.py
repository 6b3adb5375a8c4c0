"""A workflow run driven by a simulated agent over the public API, on each database."""

from __future__ import annotations

import uuid

from tests.harness import Orchestrator


def _workflow(name: str, agent_regex: str = ".*") -> str:
    return f"""
name: {name}
version: "1.0.0"
agents:
  pools: [{{pool_name: p, agent_regex: "{agent_regex}"}}]
actions:
  steps:
    - name: first
      plugin: echo-v1.0.0
      config: {{message: one}}
    - name: second
      plugin: echo
      depends_on: [first]
outputs:
  steps:
    - name: notify
      plugin: echo
"""


def _drive(orch: Orchestrator, agent_id: str, key: str, *, fail: str | None = None) -> list[str]:
    """Poll and answer until nothing is left; returns the step names seen, in order."""
    client = orch.agent_client(key)
    seen = []
    for _ in range(20):
        poll = client.get(f"/agents/v1/{agent_id}/instructions")
        assert poll.status_code == 200
        instruction = poll.json()["instruction"]
        if instruction is None:
            break
        step = instruction["correlation_id"].split("/", 1)[1]
        seen.append(step)
        base = f"/agents/v1/{agent_id}/instructions/{instruction['id']}"
        assert (
            client.put(base, json={"status": "executing", "execution_log": ["x"]}).status_code
            == 200
        )
        if step == fail:
            body = {"status": "failed", "error_message": "exit status 1"}
        else:
            body = {
                "status": "completed",
                "result": {"execution_result": {"output_data": {"step": step}}},
            }
        answer = client.post(f"{base}/result", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"acknowledged": True, "next_instruction": None}
    return seen


def test_run_goes_through_steps_in_dependency_order(orchestrator: Orchestrator) -> None:
    name = f"flow-{uuid.uuid4().hex[:6]}"
    orchestrator.apply(_workflow(name))
    agent_id, key = orchestrator.create_agent()
    execution = orchestrator.run(name, {"who": "test"})
    assert execution["status"] == "running"
    assert [s["status"] for s in execution["steps"]] == ["queued", "pending", "pending"]

    assert _drive(orchestrator, agent_id, key) == ["first", "second", "notify"]

    done = orchestrator.execution(execution["id"])
    assert done["status"] == "succeeded"
    assert [s["status"] for s in done["steps"]] == ["succeeded"] * 3
    assert done["steps"][0]["result"] == {"step": "first"}
    assert all(s["agent_id"] == agent_id and s["attempts"] == 1 for s in done["steps"])
    listed = orchestrator.api.get("/api/v1/executions", params={"workflow": name}).json()
    assert [e["id"] for e in listed["executions"]] == [execution["id"]]


def test_failed_step_fails_execution_and_skips_the_rest(orchestrator: Orchestrator) -> None:
    name = f"fail-{uuid.uuid4().hex[:6]}"
    orchestrator.apply(_workflow(name))
    agent_id, key = orchestrator.create_agent()
    execution = orchestrator.run(name)
    assert _drive(orchestrator, agent_id, key, fail="first") == ["first"]
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "failed"
    assert "first" in done["error"] and "exit status 1" in done["error"]
    assert [s["status"] for s in done["steps"]] == ["failed", "skipped", "skipped"]


def test_pool_regex_routes_to_matching_agent_only(orchestrator: Orchestrator) -> None:
    tag = uuid.uuid4().hex[:6]
    name = f"route-{tag}"
    orchestrator.apply(_workflow(name, agent_regex=f"prod-{tag}-.*"))
    other_id, other_key = orchestrator.create_agent(f"dev-{tag}-1")
    prod_id, prod_key = orchestrator.create_agent(f"prod-{tag}-1")
    execution = orchestrator.run(name)
    assert _drive(orchestrator, other_id, other_key) == []
    assert _drive(orchestrator, prod_id, prod_key) == ["first", "second", "notify"]
    assert orchestrator.execution(execution["id"])["status"] == "succeeded"


def test_every_transition_is_audited(orchestrator: Orchestrator) -> None:
    name = f"audit-{uuid.uuid4().hex[:6]}"
    orchestrator.apply(_workflow(name))
    agent_id, key = orchestrator.create_agent()
    execution = orchestrator.run(name)
    _drive(orchestrator, agent_id, key)
    records = orchestrator.api.get("/api/v1/audit", params={"subject_id": execution["id"]}).json()[
        "records"
    ]
    assert [r["action"] for r in records] == ["execution.succeeded", "execution.started"]
    assert records[1]["actor"].startswith("token:")
    assert records[0]["organization_id"] == records[1]["organization_id"]
