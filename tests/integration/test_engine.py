"""The workflow engine through the API: DAGs, data between steps, conditions, fan-out,
retries, timeouts, cancellation, reruns, concurrency, versions and inputs."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from tests.harness import Orchestrator, SimAgent, fresh_database, serve


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def pinned(orch: Orchestrator, body: str) -> tuple[str, SimAgent]:
    """Apply a workflow whose steps only the returned agent may take."""
    name = unique("wf")
    agent = SimAgent(orch, unique("agent"))
    orch.apply(f"name: {name}\nagents: {{single_agent: {agent_name(orch, agent)}}}\n{body}")
    return name, agent


def agent_name(orch: Orchestrator, agent: SimAgent) -> str:
    return str(orch.api.get(f"/api/v1/agents/{agent.id}").json()["name"])


def steps_of(execution: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in execution["steps"]}


@pytest.fixture(scope="module")
def quick(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    """A server with a 1-second lease grace, for timeout tests."""
    tmp = tmp_path_factory.mktemp(f"quick-{backend}")
    with fresh_database(backend, tmp) as url, serve(url, tmp, lease_grace=1) as running:
        yield running


def test_independent_steps_run_in_parallel_and_fan_in_waits(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: a, plugin: echo}
    - {name: b, plugin: echo, depends_on: [a]}
    - {name: c, plugin: echo, depends_on: [a]}
    - {name: d, plugin: echo, depends_on: [b, c]}
""",
    )
    execution = orchestrator.run(name)
    assert agent.work(limit=1) == ["a"]
    state = steps_of(orchestrator.execution(execution["id"]))
    assert (state["b"]["status"], state["c"]["status"]) == ("queued", "queued")
    assert state["d"]["status"] == "pending"
    b_or_c = agent.poll()
    assert b_or_c is not None
    agent.report(b_or_c, output={})
    assert steps_of(orchestrator.execution(execution["id"]))["d"]["status"] == "pending"
    assert len(agent.work()) == 2  # the other of b/c, then d
    assert orchestrator.execution(execution["id"])["status"] == "succeeded"


def test_step_config_is_templated_from_inputs_and_earlier_results(
    orchestrator: Orchestrator,
) -> None:
    name, agent = pinned(
        orchestrator,
        """
inputs:
  service: {type: string, required: true}
  count: {type: integer, default: 2}
variables: {region: eu-west-1}
actions:
  steps:
    - {name: scan, plugin: echo}
    - name: act
      plugin: echo
      depends_on: [scan]
      config:
        hosts: "{{ steps.scan.result.hosts }}"
        summary: "{{ inputs.service }} x{{ inputs.count }} in {{ variables.region }}"
        first: "{{ steps.scan.result.hosts[0] | upper }}"
        run: "{{ execution.id }}"
""",
    )
    execution = orchestrator.run(name, {"service": "nginx"})
    seen: dict[str, Any] = {}

    def handler(step: str, instruction: dict[str, Any]) -> tuple[str, Any]:
        seen[step] = instruction["input_data"]
        return "completed", {"hosts": ["web-1", "web-2"]} if step == "scan" else {}

    agent.work(handler)
    assert seen["act"] == {
        "hosts": ["web-1", "web-2"],  # a lone expression keeps its type
        "summary": "nginx x2 in eu-west-1",
        "first": "WEB-1",
        "run": execution["id"],
    }
    assert orchestrator.execution(execution["id"])["inputs"] == {"service": "nginx", "count": 2}


def test_template_error_fails_the_step_with_a_clear_message(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: scan, plugin: echo}
    - {name: act, plugin: echo, depends_on: [scan], config: {x: "{{ steps.scan.result.nope }}"}}
""",
    )
    execution = orchestrator.run(name)
    assert agent.work(lambda s, i: ("completed", {"hosts": []})) == ["scan"]
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "failed"
    assert "has no attribute 'nope'" in steps_of(done)["act"]["error"]


def test_templates_are_checked_when_the_workflow_is_applied(orchestrator: Orchestrator) -> None:
    source = """
name: checked
inputs: {service: {type: string}}
actions:
  steps:
    - {name: a, plugin: echo, config: {x: "{{ steps.b.result }}", y: "{{ inputs.servce }}"}}
    - {name: b, plugin: echo, depends_on: [a], config: {z: "{{ nonsense.x }}", w: "{{ item }}"}}
    - {name: c, plugin: echo, config: {v: "{{ steps.ghost.result }}", u: "{{ broken( }}"}}
"""
    response = orchestrator.api.post("/api/v1/workflows", content=source)
    assert response.status_code == 422
    problems = {(p["path"], p["message"]) for p in response.json()["error"]["details"]}
    assert problems == {
        ("actions.steps[0].config.x", "'steps.b' is not upstream of this step"),
        ("actions.steps[0].config.y", "unknown input 'servce'"),
        ("actions.steps[1].config.z", "unknown name 'nonsense'"),
        ("actions.steps[1].config.w", "unknown name 'item'"),
        ("actions.steps[2].config.v", "unknown step 'ghost'"),
        ("actions.steps[2].config.u", "invalid template: unexpected '}', expected ')'"),
    }
    assert orchestrator.api.get("/api/v1/workflows/checked").status_code == 404


def test_when_skips_and_dependents_decide(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
inputs: {deploy: {type: boolean, default: false}}
actions:
  steps:
    - {name: build, plugin: echo}
    - {name: deploy, plugin: echo, depends_on: [build], when: "inputs.deploy"}
    - name: announce
      plugin: echo
      depends_on: [deploy]
      when: "{{ steps.deploy.status == 'skipped' }}"
    - {name: verify, plugin: echo, depends_on: [deploy], when: "steps.deploy.status == 'succeeded'"}
""",
    )
    execution = orchestrator.run(name)
    assert agent.work() == ["build", "announce"]
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "succeeded"
    assert {k: v["status"] for k, v in steps_of(done).items()} == {
        "build": "succeeded",
        "deploy": "skipped",
        "announce": "succeeded",
        "verify": "skipped",
    }
    again = orchestrator.run(name, {"deploy": True})
    assert agent.work() == ["build", "deploy", "verify"]
    assert orchestrator.execution(again["id"])["status"] == "succeeded"


def test_for_each_fans_out_with_a_bound_and_fans_in(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
inputs: {hosts: {type: array}}
actions:
  steps:
    - name: restart
      plugin: echo
      for_each: "{{ inputs.hosts }}"
      parallel: 2
      config: {host: "{{ item }}"}
    - {name: report, plugin: echo, depends_on: [restart], config: {all: "{{ steps.restart.result }}"}}
""",
    )
    hosts = [f"h{i}" for i in range(5)]
    execution = orchestrator.run(name, {"hosts": hosts})
    first = agent.client.get(f"/agents/v1/{agent.id}/instructions", params={"slots": 5})
    assert first.status_code == 200
    # capacity 1 for this agent, so ask the server what is queued instead
    state = orchestrator.execution(execution["id"])
    items = [s for s in state["steps"] if s["parent"] == "restart"]
    assert [s["item_index"] for s in items] == list(range(5))
    assert sum(s["status"] in ("queued", "running") for s in items) == 2
    agent.report(first.json()["instruction"], output={"host": "h0"})

    def handler(step: str, instruction: dict[str, Any]) -> tuple[str, Any]:
        return "completed", {"host": instruction["input_data"].get("host")}

    seen = agent.work(handler)
    assert seen[-1] == "report"
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "succeeded"
    restart = steps_of(done)["restart"]
    assert restart["result"] == [{"host": h} for h in hosts]


def test_empty_for_each_succeeds_with_no_items(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: each, plugin: echo, for_each: [], config: {x: "{{ item }}"}}
    - {name: after, plugin: echo, depends_on: [each]}
""",
    )
    execution = orchestrator.run(name)
    assert agent.work() == ["after"]
    done = orchestrator.execution(execution["id"])
    assert steps_of(done)["each"]["result"] == []
    assert done["status"] == "succeeded"


def test_failed_item_fails_the_fan_out(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: each, plugin: echo, for_each: [1, 2, 3], config: {n: "{{ item }}"}}
""",
    )
    execution = orchestrator.run(name)
    agent.work(lambda s, i: ("failed", "bad") if i["input_data"]["n"] == 2 else ("completed", {}))
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "failed"
    assert "1 of 3 items failed; each[1]: bad" in steps_of(done)["each"]["error"]


def test_retries_wait_their_delay_then_succeed(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - name: flaky
      plugin: echo
      error_handling: {max_retries: 2, retry_delay: 1s, backoff: exponential, max_delay: 5s}
""",
    )
    execution = orchestrator.run(name)
    first = agent.poll()
    assert first is not None and first["attempt"] == 1
    agent.report(first, "failed", error="boom")
    step = orchestrator.execution(execution["id"])["steps"][0]
    assert (step["status"], step["attempts"], step["error"]) == ("queued", 2, "boom")
    assert step["next_attempt_at"] is not None
    assert agent.poll() is None  # not before its delay
    started = time.monotonic()
    second = agent.poll(wait=5)  # woken when the delay ends
    assert second is not None and second["attempt"] == 2
    assert 0.5 < time.monotonic() - started < 3
    agent.report(second, "failed", error="boom again")
    third = agent.poll(wait=5)  # exponential: 2 s
    assert third is not None and third["attempt"] == 3
    agent.report(third, output={"ok": True})
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "succeeded"
    assert done["steps"][0]["attempts"] == 3
    logs = orchestrator.api.get(f"/api/v1/executions/{execution['id']}/logs").json()["logs"]
    assert [(entry["attempt"], entry["status"]) for entry in logs] == [
        (1, "failed"),
        (2, "failed"),
        (3, "completed"),
    ]


def test_retry_on_decides_which_failures_retry(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: strict, plugin: echo, error_handling: {max_retries: 3, retry_on: [timeout]}}
""",
    )
    execution = orchestrator.run(name)
    agent.work(lambda s, i: ("failed", "exit status 2"))
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "failed"
    assert done["steps"][0]["attempts"] == 1


def test_on_failure_continue_lets_the_run_go_on(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: optional, plugin: echo, error_handling: {on_failure: continue}}
    - {name: next, plugin: echo, depends_on: [optional]}
""",
    )
    execution = orchestrator.run(name)
    seen = agent.work(lambda s, i: ("failed", "meh") if s == "optional" else ("completed", {}))
    assert seen == ["optional", "next"]
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "succeeded"
    assert steps_of(done)["optional"]["status"] == "failed"


def test_outputs_run_on_success_failure_or_always(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: work, plugin: echo}
outputs:
  steps:
    - {name: celebrate, plugin: echo}
    - {name: page-oncall, plugin: echo, run_on: failure}
    - {name: record, plugin: echo, run_on: always}
""",
    )
    ok = orchestrator.run(name)
    assert sorted(agent.work()) == ["celebrate", "record", "work"]
    assert orchestrator.execution(ok["id"])["status"] == "succeeded"
    bad = orchestrator.run(name)
    seen = agent.work(lambda s, i: ("failed", "down") if s == "work" else ("completed", {}))
    assert sorted(seen) == ["page-oncall", "record", "work"]
    done = orchestrator.execution(bad["id"])
    assert done["status"] == "failed"
    assert steps_of(done)["celebrate"]["status"] == "skipped"


def test_a_silent_agent_loses_the_step_and_its_late_result_is_refused(
    quick: Orchestrator,
) -> None:
    """An agent that says nothing for the step's timeout and the grace after it went
    silent (agents report their plugin's timeout themselves): the step runs again under
    the agent-lost budget (3 attempts, although max_retries is 1), and a late result of an
    earlier attempt gets 409."""
    name, agent = pinned(
        quick,
        """
actions:
  steps:
    - {name: slow, plugin: echo, timeout: 1s, error_handling: {max_retries: 1}}
""",
    )
    execution = quick.run(name)
    first = agent.poll()
    assert first is not None
    seen = [first]
    while len(seen) < 3:
        agent.client.put(
            f"/agents/v1/{agent.id}/instructions/{seen[-1]['id']}", json={"status": "executing"}
        )
        again = agent.poll(wait=10)  # lease = 1 s timeout + 1 s grace, then retried
        assert again is not None and again["attempt"] == len(seen) + 1, again
        seen.append(again)
    late = agent.client.post(
        f"/agents/v1/{agent.id}/instructions/{first['id']}/result",
        json={"status": "completed", "result": {}},
    )
    assert late.status_code == 409
    agent.client.put(
        f"/agents/v1/{agent.id}/instructions/{seen[-1]['id']}", json={"status": "executing"}
    )
    deadline = time.monotonic() + 10
    while quick.execution(execution["id"])["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    done = quick.execution(execution["id"])
    assert done["status"] == "failed"
    assert done["steps"][0]["error"] == (
        "agent lost: it went silent while running the step (no result within its 1s "
        "timeout and 1s of grace)"
    )
    assert done["steps"][0]["attempts"] == 3


def test_a_dead_official_agents_step_runs_again_on_another_agent(quick: Orchestrator) -> None:
    """Killed mid-step, an official agent just goes silent: with default error handling
    the step succeeds on another eligible agent, within the timeout, the grace and one
    reaper turn of its death."""
    name = unique("wf")
    pool = unique("pool")
    dead, alive = SimAgent(quick, f"{pool}-a"), SimAgent(quick, f"{pool}-b")
    quick.apply(
        f"name: {name}\nagents: {{pools: [{{agent_regex: '{pool}-.*'}}]}}\n"
        "actions: {steps: [{name: only, plugin: echo, timeout: 1s}]}\n"
    )
    execution = quick.run(name)
    taker, other = dead, alive
    first = taker.poll()
    if first is None:  # routed to the other one
        taker, other = alive, dead
        first = taker.poll()
    assert first is not None
    base = f"/agents/v1/{taker.id}/instructions/{first['id']}"
    assert taker.client.put(base, json={"status": "executing"}).status_code == 200
    died = time.monotonic()  # from here the taker sends nothing
    again = other.poll(wait=10)
    waited = time.monotonic() - died
    assert again is not None and again["attempt"] == 2
    assert waited < 1 + 1 + 1.5, waited  # timeout + grace + reaper (0.2 s) and slack
    assert other.report(again, "completed", output={"ok": True}).status_code == 200
    done = quick.execution(execution["id"])
    assert done["status"] == "succeeded"
    assert done["steps"][0]["attempts"] == 2


def test_a_timeout_the_agent_reports_is_a_timeout(quick: Orchestrator) -> None:
    """`retry_on` tells the agent's timeout from its errors."""
    name, agent = pinned(
        quick,
        """
actions:
  steps:
    - {name: t, plugin: echo, error_handling: {max_retries: 2, retry_on: [error]}}
""",
    )
    execution = quick.run(name)
    instruction = agent.poll()
    assert instruction is not None
    answer = agent.report(instruction, "failed", error="timed out after 300s")
    assert answer.status_code == 200
    done = quick.execution(execution["id"])
    assert done["status"] == "failed"  # not retried: only errors are
    assert done["steps"][0]["attempts"] == 1


def test_whole_execution_timeout(quick: Orchestrator) -> None:
    name, agent = pinned(
        quick,
        """
timeout: 1s
actions:
  steps:
    - {name: forever, plugin: echo}
""",
    )
    execution = quick.run(name)
    instruction = agent.poll()
    assert instruction is not None
    done = quick.wait_for(execution["id"], timeout=10)
    assert done["status"] == "failed"
    assert "timed out" in done["error"]
    assert done["steps"][0]["status"] == "cancelled"
    assert agent.report(instruction, output={}).status_code == 409


def test_cancel_stops_everything_and_late_reports_get_409(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: a, plugin: echo}
    - {name: b, plugin: echo, depends_on: [a]}
""",
    )
    execution = orchestrator.run(name)
    instruction = agent.poll()
    assert instruction is not None
    cancelled = orchestrator.api.post(f"/api/v1/executions/{execution['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert [s["status"] for s in cancelled.json()["steps"]] == ["cancelled", "cancelled"]
    assert agent.report(instruction, output={}).status_code == 409
    assert agent.poll() is None
    again = orchestrator.api.post(f"/api/v1/executions/{execution['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"


def test_rerun_resumes_from_the_failed_step_keeping_earlier_results(
    orchestrator: Orchestrator,
) -> None:
    name, agent = pinned(
        orchestrator,
        """
actions:
  steps:
    - {name: fetch, plugin: echo}
    - {name: apply, plugin: echo, depends_on: [fetch], config: {data: "{{ steps.fetch.result }}"}}
    - {name: verify, plugin: echo, depends_on: [apply]}
""",
    )
    execution = orchestrator.run(name)
    agent.work(lambda s, i: ("failed", "disk full") if s == "apply" else ("completed", {"v": 1}))
    assert orchestrator.execution(execution["id"])["status"] == "failed"
    assert orchestrator.api.post(f"/api/v1/executions/{execution['id']}/rerun").status_code == 200
    seen: dict[str, Any] = {}

    def handler(step: str, instruction: dict[str, Any]) -> tuple[str, Any]:
        seen[step] = instruction
        return "completed", {}

    assert agent.work(handler) == ["apply", "verify"]
    assert seen["apply"]["input_data"] == {"data": {"v": 1}}
    assert seen["apply"]["attempt"] == 2
    done = orchestrator.execution(execution["id"])
    assert done["status"] == "succeeded"
    assert done["reruns"] == 1
    assert {s["name"]: s["attempts"] for s in done["steps"]} == {
        "fetch": 1,
        "apply": 2,
        "verify": 1,
    }
    assert orchestrator.api.post(f"/api/v1/executions/{execution['id']}/rerun").status_code == 409


def test_concurrency_limit_queues_or_rejects(orchestrator: Orchestrator) -> None:
    name, agent = pinned(
        orchestrator,
        """
concurrency: {limit: 1}
actions:
  steps:
    - {name: only, plugin: echo}
""",
    )
    first = orchestrator.run(name)
    second = orchestrator.run(name)
    assert (first["status"], second["status"]) == ("running", "queued")
    assert agent.work() == ["only", "only"]
    assert orchestrator.execution(first["id"])["status"] == "succeeded"
    assert orchestrator.execution(second["id"])["status"] == "succeeded"

    strict, strict_agent = pinned(
        orchestrator,
        """
concurrency: {limit: 1, policy: reject}
actions:
  steps:
    - {name: only, plugin: echo}
""",
    )
    orchestrator.run(strict)
    refused = orchestrator.api.post(f"/api/v1/workflows/{strict}/runs", json={})
    assert refused.status_code == 409
    assert "concurrency limit" in refused.json()["error"]["message"]
    strict_agent.work()


def test_executions_pin_their_version(orchestrator: Orchestrator) -> None:
    agent = SimAgent(orchestrator, unique("agent"))
    who = agent_name(orchestrator, agent)
    name = unique("versioned")

    def source(message: str) -> str:
        return (
            f"name: {name}\nagents: {{single_agent: {who}}}\nactions:\n  steps:\n"
            f"    - {{name: a, plugin: echo, config: {{m: {message}}}}}\n"
            f"    - {{name: b, plugin: echo, depends_on: [a], config: {{m: {message}}}}}\n"
        )

    assert orchestrator.apply(source("one"))["version"] == 1
    execution = orchestrator.run(name)
    first = agent.poll()
    assert first is not None
    agent.report(first, output={})
    assert orchestrator.apply(source("two"))["version"] == 2
    second = agent.poll()
    assert second is not None and second["input_data"] == {"m": "one"}
    agent.report(second, output={})
    assert orchestrator.execution(execution["id"])["workflow_version"] == 1
    versions = orchestrator.api.get(f"/api/v1/workflows/{name}/versions").json()["versions"]
    assert [v["version"] for v in versions] == [2, 1]
    old = orchestrator.api.get(f"/api/v1/workflows/{name}/versions/1").json()
    assert "m: one" in old["source"]
    assert orchestrator.api.get(f"/api/v1/workflows/{name}/versions/9").status_code == 404


def test_inputs_are_checked_against_their_declaration(orchestrator: Orchestrator) -> None:
    name = unique("typed")
    orchestrator.apply(
        f"""
name: {name}
inputs:
  service: {{type: string, required: true, enum: [nginx, redis]}}
  replicas: {{type: integer, default: 1}}
actions:
  steps:
    - {{name: a, plugin: echo}}
"""
    )
    response = orchestrator.api.post(
        f"/api/v1/workflows/{name}/runs",
        json={"inputs": {"service": "apache", "replicas": "3", "extra": 1}},
    )
    assert response.status_code == 422
    problems = {(p["path"], p["message"]) for p in response.json()["error"]["details"]}
    assert problems == {
        ("inputs.extra", "not an input of this workflow"),
        ("inputs.service", "expected one of ['nginx', 'redis']"),
        ("inputs.replicas", "expected integer, got str"),
    }
    missing = orchestrator.api.post(f"/api/v1/workflows/{name}/runs", json={})
    assert missing.json()["error"]["details"] == [{"path": "inputs.service", "message": "required"}]
    listed = orchestrator.api.get("/api/v1/executions", params={"workflow": name}).json()
    assert listed["executions"] == []  # nothing half-created


def test_secrets_reach_the_agent_but_are_masked_in_what_is_stored(
    orchestrator: Orchestrator,
) -> None:
    os.environ["STAVILY_SECRET_TEST_TOKEN"] = "s3cr3t-value"
    name, agent = pinned(
        orchestrator,
        """
secrets:
  api_token: {env: STAVILY_SECRET_TEST_TOKEN}
  missing: {env: STAVILY_SECRET_TEST_NOT_SET}
actions:
  steps:
    - {name: call, plugin: echo, config: {header: "Bearer {{ secrets.api_token }}"}}
    - {name: broken, plugin: echo, depends_on: [call], config: {x: "{{ secrets.missing }}"}}
""",
    )
    execution = orchestrator.run(name)
    got: dict[str, Any] = {}

    def handler(step: str, instruction: dict[str, Any]) -> tuple[str, Any]:
        got[step] = instruction["input_data"]
        return "completed", {"echo": instruction["input_data"]["header"]}

    assert agent.work(handler) == ["call"]
    assert got["call"] == {"header": "Bearer s3cr3t-value"}
    done = orchestrator.execution(execution["id"])
    assert steps_of(done)["call"]["result"] == {"echo": "Bearer ***"}
    assert "STAVILY_SECRET_TEST_NOT_SET is not set" in steps_of(done)["broken"]["error"]
    assert "s3cr3t" not in orchestrator.api.get(f"/api/v1/executions/{execution['id']}").text


def test_schema_and_dry_run(orchestrator: Orchestrator, tmp_path: Path) -> None:
    schema = orchestrator.api.get("/api/v1/schemas/workflow").json()
    assert schema["title"] == "Stavily workflow"
    assert {"name", "actions", "triggers", "outputs", "inputs"} <= set(schema["properties"])
    ok = orchestrator.api.post(
        "/api/v1/workflows/validate",
        content="name: dry\nactions: {steps: [{name: a, plugin: echo}, {name: b, plugin: echo, depends_on: [a]}]}",
    )
    assert ok.status_code == 200
    assert ok.json()["steps"] == [
        {"name": "a", "stage": "actions", "depends_on": []},
        {"name": "b", "stage": "actions", "depends_on": ["a"]},
    ]
    assert orchestrator.api.get("/api/v1/workflows/dry").status_code == 404
    bad = orchestrator.api.post(
        "/api/v1/workflows/validate",
        content="name: dry\nactions: {steps: [{name: a, plugin: echo, depends_on: [deploy]}]}",
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["details"] == [
        {"path": "actions.steps[0].depends_on[0]", "message": "unknown step 'deploy'"}
    ]


def test_the_server_logs_what_happens(quick: Orchestrator) -> None:
    """Steps retried and failed, executions failed, attempts taken back and why, refused
    credentials at most once per source every 10 s (a flood cannot fill the disk)."""
    with structlog.testing.capture_logs() as logs:
        name, agent = pinned(
            quick,
            """
actions:
  steps:
    - {name: a, plugin: echo, error_handling: {max_retries: 1}}
""",
        )
        execution = quick.run(name)
        agent.work(lambda step, instruction: ("failed", "boom"))
        assert quick.execution(execution["id"])["status"] == "failed"

        silent, silent_agent = pinned(
            quick, "actions: {steps: [{name: s, plugin: echo, timeout: 1s}]}"
        )
        quick.run(silent)
        first = silent_agent.poll()
        assert first is not None
        silent_agent.client.put(
            f"/agents/v1/{silent_agent.id}/instructions/{first['id']}", json={"status": "executing"}
        )
        assert silent_agent.poll(wait=10) is not None  # taken back, then handed out again

        wrong = quick.agent_client("stva_not_a_credential")
        for _ in range(20):
            answer = wrong.post(f"/agents/v1/{agent.id}/heartbeat", json={"status": "online"})
            assert answer.status_code == 401
    by_event: dict[str, list[dict[str, Any]]] = {}
    for entry in logs:
        by_event.setdefault(entry["event"], []).append(entry)
    retried, failed = by_event["step retried"], by_event["step failed"]
    assert retried[0]["execution_id"] == execution["id"] and retried[0]["cause"] == "error"
    assert failed[0]["error"] == "boom" and failed[0]["attempts"] == 2
    assert by_event["execution failed"][0]["execution_id"] == execution["id"]
    (taken,) = by_event["instruction taken back"]
    assert taken["instruction_id"] == first["id"] and "went silent" in taken["reason"]
    (refused,) = by_event["agent credential refused"]
    assert refused["source"] == agent.id and refused["log_level"] == "warning"
