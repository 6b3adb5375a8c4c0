"""The CLI a newcomer reaches for (issue 21): `agent create`, agents by name, a pasted
`.../api/v1` URL, `execution logs --follow`, `execution watch`, and why a step waits;
in-process against a real orchestrator on loopback, agents simulated from a thread."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from typer.testing import Result

from stavily.cli import agents as agents_cli
from stavily.cli.client import base_url
from tests.harness import Invoke, Orchestrator


def _tag() -> str:
    return uuid.uuid4().hex[:6]


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _heartbeat(orch: Orchestrator, agent_id: str, key: str) -> int:
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    client = orch.agent_client(key)
    answer = client.post(
        f"/agents/v1/{agent_id}/heartbeat", json={"timestamp": stamp, "status": "online"}
    )
    return answer.status_code


def _workflow(name: str, regex: str) -> str:
    return f"""
name: {name}
agents:
  pools: [{{pool_name: p, agent_regex: "{regex}"}}]
actions:
  steps:
    - name: first
      plugin: echo
    - name: second
      plugin: echo
      depends_on: [first]
"""


class Worker:
    """An agent in a thread: each step logs two lines a beat apart, then succeeds."""

    def __init__(self, orch: Orchestrator, name: str, pause: float = 0.15) -> None:
        self.id, key = orch.create_agent(name)
        self.client = orch.agent_client(key)
        self.pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Worker:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            poll = self.client.get(f"/agents/v1/{self.id}/instructions")
            instruction = poll.json()["instruction"] if poll.status_code == 200 else None
            if instruction is None:
                self._stop.wait(0.02)
                continue
            step = instruction["correlation_id"].split("/", 1)[1]
            base = f"/agents/v1/{self.id}/instructions/{instruction['id']}"
            log = [f"{step}: one"]
            self.client.put(base, json={"status": "executing", "execution_log": log})
            self._stop.wait(self.pause)
            log.append(f"{step}: two")
            self.client.put(base, json={"status": "executing", "execution_log": log})
            self._stop.wait(self.pause)
            body = {"status": "completed", "result": {"execution_result": {"output_data": 1}}}
            self.client.post(f"{base}/result", json={**body, "execution_log": log})


# --- agent create, agents by name ---------------------------------------------------------


def test_agent_create_shows_a_key_that_works(cli: Invoke, orchestrator: Orchestrator) -> None:
    name = f"new-{_tag()}"
    created = cli("agent", "create", name, "--label", "zone=a", "--capacity", "3")
    assert created.exit_code == 0, created.output
    lines = created.stdout.splitlines()
    assert lines[0].startswith(f"created agent {name} (agt_") and lines[0].endswith("API key:")
    agent_id = lines[0].split("(")[1].split(")")[0]
    key = lines[1].strip()
    assert key.startswith("stva_")
    assert lines[2].startswith("store it now: it is shown only this once")
    assert f"stavily agent rotate {name}" in lines[2]
    assert f"--agent-id {agent_id} --token <key>" in lines[3]
    assert _heartbeat(orchestrator, agent_id, key) == 200
    assert _heartbeat(orchestrator, agent_id, "stva_wrong") == 401

    shown = _json(cli("agent", "show", name, "-o", "json"))
    assert (shown["id"], shown["labels"], shown["capacity"]) == (agent_id, {"zone": "a"}, 3)
    assert "api_key" not in shown

    scripted = _json(cli("agent", "create", f"{name}-s", "--type", "sensor", "-o", "json"))
    assert scripted["agent_id"].startswith("agt_") and scripted["type"] == "sensor"
    assert _heartbeat(orchestrator, scripted["agent_id"], scripted["api_key"]) == 200

    taken = cli("agent", "create", name)
    assert taken.exit_code == 4, taken.output
    bad = cli("agent", "create", f"{name}-b", "--type", "robot")
    assert bad.exit_code == 2 and "the request is invalid" in bad.stderr
    assert cli("agent", "create", f"{name}-c", "--label", "nokey").exit_code == 2


def test_agents_by_name(
    cli: Invoke, orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"byname-{_tag()}"
    agent_id, key = orchestrator.create_agent(name)

    shown = cli("agent", "show", name)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0].startswith(f"{name}  ")
    assert agent_id in shown.stdout
    drained = cli("agent", "drain", name)
    assert drained.stdout.strip() == f"agent {name} ({agent_id}): draining"
    assert _json(cli("agent", "disable", name, "-o", "json"))["admin_state"] == "disabled"
    assert _json(cli("agent", "enable", name, "-o", "json"))["admin_state"] == "active"

    # rotate asks on a terminal: "no" changes nothing; --yes does not ask
    monkeypatch.setattr(agents_cli, "_asks", lambda: True)
    declined = cli("agent", "rotate", name, input="n\n")
    assert declined.exit_code == 1 and "not rotated" in declined.stderr
    assert f"agent {name} ({agent_id})?" in declined.stderr
    assert _heartbeat(orchestrator, agent_id, key) == 200
    rotated = cli("agent", "rotate", name, "--yes")
    assert rotated.exit_code == 0, rotated.output
    new_key = rotated.stdout.splitlines()[1].strip()
    assert _heartbeat(orchestrator, agent_id, key) == 401
    assert _heartbeat(orchestrator, agent_id, new_key) == 200

    declined = cli("agent", "revoke", name, input="n\n")
    assert declined.exit_code == 1 and f"Revoke agent {name} ({agent_id}) for good?" in (
        declined.stderr
    )
    revoked = cli("agent", "revoke", name, "--yes")
    assert revoked.stdout.strip() == f"agent {name} ({agent_id}): revoked"
    assert _heartbeat(orchestrator, agent_id, new_key) == 403

    for action in ("show", "drain", "disable", "enable", "revoke", "rotate"):
        extra = ["--yes"] if action in ("revoke", "rotate") else []
        missing = cli("agent", action, f"{name}-nope", *extra)
        assert missing.exit_code == 3, (action, missing.output)
        assert missing.stderr.startswith(f"error: no agent named '{name}-nope'\n")
        assert "stavily agent list" in missing.stderr
    scripted = cli("agent", "show", f"{name}-nope", "-o", "json")
    assert scripted.exit_code == 3
    assert json.loads(scripted.stderr)["error"]["code"] == "not_found"


# --- the URL ------------------------------------------------------------------------------


def test_url_pasted_with_api_v1_works(cli: Invoke, orchestrator: Orchestrator) -> None:
    url = orchestrator.url
    for pasted in (f"{url}/", f"{url}/api/v1", f"{url}/api/v1/", f" {url}/API/V1// "):
        assert base_url(pasted) == url
        listed = cli("agent", "list", "-o", "json", env={"STAVILY_URL": pasted})
        assert listed.exit_code == 0, (pasted, listed.output)
        assert cli("fleet", "status", "--url", pasted).exit_code == 0
    assert base_url("") == "http://127.0.0.1:8700"
    assert base_url("https://example.com/stavily/api/v1") == "https://example.com/stavily"


# --- following an execution ---------------------------------------------------------------


def test_logs_follow_prints_lines_in_order_until_final(
    cli: Invoke, orchestrator: Orchestrator
) -> None:
    tag = _tag()
    name = f"follow-{tag}"
    orchestrator.apply(_workflow(name, f"{tag}-.*"))
    execution_id = orchestrator.run(name)["id"]
    with Worker(orchestrator, f"{tag}-agent"):
        followed = cli("execution", "logs", execution_id, "--follow", "--interval", "0.05")
    assert followed.exit_code == 0, followed.output
    assert followed.stdout.splitlines() == [
        f"first#1  agent {tag}-agent",
        "first#1  first: one",
        "first#1  first: two",
        "first#1  completed",
        f"second#1  agent {tag}-agent",
        "second#1  second: one",
        "second#1  second: two",
        "second#1  completed",
        f"execution {execution_id} succeeded",
    ]
    # on a final execution it prints everything once and ends at once
    again = cli("execution", "logs", execution_id, "-f")
    assert again.exit_code == 0 and again.stdout == followed.stdout
    scripted = cli("execution", "logs", execution_id, "-f", "-o", "json")
    assert [a["step"] for a in _json(scripted)["logs"]] == ["first", "second"]
    missing = cli("execution", "logs", "exe_missing", "--follow")
    assert missing.exit_code == 3 and "no execution 'exe_missing'" in missing.stderr


def test_watch_prints_transitions_as_lines(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    name = f"watch-{tag}"
    orchestrator.apply(_workflow(name, f"{tag}-.*"))
    execution_id = orchestrator.run(name)["id"]
    with Worker(orchestrator, f"{tag}-agent", pause=0.1):
        watched = cli("execution", "watch", execution_id, "--interval", "0.05")
    assert watched.exit_code == 0, watched.output
    lines = watched.stdout.splitlines()
    assert lines[0] == f"{execution_id}  {name} v1  running"
    assert lines[-1] == f"execution {execution_id} succeeded"
    steps = [line.split() for line in lines[1:-1]]
    assert [f"{s[0]} {s[1]}" for s in steps if s[1] == "succeeded"] == [
        "first succeeded",
        "second succeeded",
    ]
    running = [s for s in steps if s[1] == "running"]
    assert [s[0] for s in running] == ["first", "second"]
    assert running[0][2:] == ["agent", f"{tag}-agent"]
    order = [f"{s[0]} {s[1]}" for s in steps]
    assert order.index("first succeeded") < order.index("second running")

    # workflow run --watch off a terminal: the same lines as they happen, on stderr; the
    # final table on stdout as before
    with Worker(orchestrator, f"{tag}-agent-2", pause=0.1):
        run = cli("workflow", "run", name, "--watch", "--interval", "0.05")
    assert run.exit_code == 0, run.output
    progress = run.stderr.splitlines()
    assert progress[0].startswith("exe_") and progress[0].endswith(f"{name} v1  running")
    assert [line.split()[:2] for line in progress if "succeeded" in line] == [
        ["first", "succeeded"],
        ["second", "succeeded"],
    ]
    out = run.stdout.splitlines()
    assert out[0].endswith(f"{name} v1  succeeded")
    assert out[-1].startswith("execution exe_") and out[-1].endswith(" succeeded")


def test_a_step_no_agent_can_take_says_so(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    name = f"stuck-{tag}"
    orchestrator.apply(_workflow(name, f"{tag}-nobody-.*"))
    orchestrator.create_agent(f"{tag}-other")  # an agent, but not one the step may go to
    execution_id = orchestrator.run(name)["id"]
    why = 'waiting: no eligible agent for selector {"pools": [{"agent_regex": '
    why += f'"{tag}-nobody-.*", "pool_name": "p"}}]}}'

    shown = cli("execution", "show", execution_id)
    assert shown.exit_code == 0, shown.output
    first = next(line for line in shown.stdout.splitlines() if line.startswith("first "))
    assert first.split()[:4] == ["first", "actions", "echo", "queued"]
    assert first.rstrip().endswith(why)
    second = next(line for line in shown.stdout.splitlines() if line.startswith("second "))
    assert "waiting" not in second  # pending: not queued yet

    timer = threading.Timer(
        0.4, lambda: orchestrator.api.post(f"/api/v1/executions/{execution_id}/cancel")
    )
    timer.start()
    try:
        watched = cli("execution", "watch", execution_id, "--interval", "0.05")
    finally:
        timer.cancel()
    assert watched.exit_code == 1, watched.output
    lines = watched.stdout.splitlines()
    assert lines[1] == f"first  queued  {why}"
    assert lines[-1] == f"execution {execution_id} cancelled"
