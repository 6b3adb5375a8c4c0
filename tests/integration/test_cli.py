"""The operator CLI (`stavily workflow ...`, `stavily execution ...`) in-process against a
real orchestrator on loopback, on each database; agents are simulated from a thread."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import Result

from tests.harness import Invoke, Orchestrator, free_port


def _tag() -> str:
    return uuid.uuid4().hex[:6]


def _workflow(name: str, tag: str, *, inputs: bool = False) -> str:
    """Three steps for agents named `<tag>-...` only, so tests never take each other's work."""
    declared = (
        """
inputs:
  who: {type: string, required: true}
  count: {type: integer, default: 1}
  tags: {type: array}
"""
        if inputs
        else ""
    )
    return f"""
name: {name}
description: CLI test workflow
{declared}
agents:
  pools: [{{pool_name: p, agent_regex: "{tag}-.*"}}]
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


def _write(tmp_path: Path, filename: str, text: str) -> str:
    path = tmp_path / filename
    path.write_text(text)
    return str(path)


def _json(result: Result) -> Any:
    return json.loads(result.stdout)


def _problems(result: Result) -> list[str]:
    """The detail lines (`path: message`) printed under an error."""
    return [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]


class Agent:
    """A simulated agent answering from a background thread until stopped.

    `fail` maps a step name to how many of its attempts fail before it succeeds."""

    def __init__(self, orch: Orchestrator, name: str, fail: dict[str, int] | None = None) -> None:
        self.name = name
        self.id, key = orch.create_agent(name)
        self.client = orch.agent_client(key)
        self.fail = dict(fail or {})
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Agent:
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
                self._stop.wait(0.03)
                continue
            step = instruction["correlation_id"].split("/", 1)[1]
            self.seen.append(step)
            base = f"/agents/v1/{self.id}/instructions/{instruction['id']}"
            log = [f"{step}: starting", f"{step}: working [x]"]
            self.client.put(base, json={"status": "executing", "execution_log": log})
            if self.fail.get(step, 0) > 0:
                self.fail[step] -= 1
                body: dict[str, Any] = {"status": "failed", "error_message": "exit status 3"}
            else:
                output = {"step": step, "note": "x" * 200}
                body = {
                    "status": "completed",
                    "result": {"execution_result": {"output_data": output}},
                }
            # The log goes with the result too, as the reference agent sends it: a result
            # without `execution_log` currently wipes the log sent with progress.
            self.client.post(f"{base}/result", json={**body, "execution_log": log})


# --- workflows ------------------------------------------------------------------------------


def test_apply_list_show(cli: Invoke, tmp_path: Path) -> None:
    tag = _tag()
    name = f"cli-apply-{tag}"
    yaml_file = _write(tmp_path, "flow.yaml", _workflow(name, tag))

    applied = cli("workflow", "apply", yaml_file)
    assert applied.exit_code == 0, applied.output
    assert f"applied workflow {name} version 1" in applied.stdout

    # The same definition as JSON (by extension): unchanged, no new version.
    data = yaml.safe_load(_workflow(name, tag))
    same = cli("workflow", "apply", _write(tmp_path, "same.json", json.dumps(data)), "-o", "json")
    assert same.exit_code == 0, same.output
    assert (_json(same)["version"], _json(same)["unchanged"]) == (1, True)
    assert f"workflow {name} unchanged (version 1)" in cli("workflow", "apply", yaml_file).stdout
    # JSON by extension, and by content when the extension says nothing.
    data["description"] = "changed once"
    as_json = cli(
        "workflow", "apply", _write(tmp_path, "flow.json", json.dumps(data)), "-o", "json"
    )
    assert as_json.exit_code == 0, as_json.output
    assert (_json(as_json)["version"], _json(as_json)["unchanged"]) == (2, False)
    data["description"] = "changed twice"
    sniffed = cli("workflow", "apply", _write(tmp_path, "flow.txt", json.dumps(data)))
    assert sniffed.exit_code == 0, sniffed.output
    assert "version 3" in sniffed.stdout

    listed = cli("workflow", "list")
    assert listed.exit_code == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert row.split()[:3] == [name, "3", "3"]
    workflows = _json(cli("workflow", "list", "--output", "json"))["workflows"]
    assert [w["version"] for w in workflows if w["name"] == name] == [3]

    shown = cli("workflow", "show", name)
    assert shown.exit_code == 0
    assert f"{name}  version 3" in shown.stdout
    steps = [
        line.split()
        for line in shown.stdout.splitlines()
        if line.startswith(("first", "second", "notify"))
    ]
    assert steps == [
        ["first", "actions", "echo-v1.0.0", "-"],
        ["second", "actions", "echo", "first"],
        ["notify", "outputs", "echo", "-"],
    ]
    first = _json(cli("workflow", "show", name, "--version", "1", "-o", "json"))
    assert first["version"] == 1 and f"name: {name}" in first["source"]

    missing = cli("workflow", "show", f"nope-{tag}")
    assert missing.exit_code == 3
    assert f"error: no workflow named 'nope-{tag}'" in missing.stderr
    assert cli("workflow", "show", name, "--version", "9").exit_code == 3
    no_file = cli("workflow", "apply", str(tmp_path / "absent.yaml"))
    assert no_file.exit_code == 2 and "no such file" in no_file.stderr


GRAPH_PROBLEMS = """
name: {name}
actions:
  steps:
    - name: a
      plugin: echo
      depends_on: [a]
    - name: b
      plugin: echo
      depends_on: [zzz]
    - name: b
      plugin: echo
"""

SCHEMA_PROBLEMS = """
name: {name}
actions:
  steps:
    - name: a
      plugin: NOPE
      timeout: forever
"""


def test_validate_valid_and_invalid_online_and_offline(
    cli: Invoke, tmp_path: Path, orchestrator: Orchestrator
) -> None:
    tag = _tag()
    good = _write(tmp_path, "good.yaml", _workflow(f"cli-valid-{tag}", tag))
    unreachable = {"STAVILY_URL": f"http://127.0.0.1:{free_port()}"}
    for extra, env in (([], None), (["--offline"], unreachable)):
        valid = cli("workflow", "validate", good, *extra, env=env)
        assert valid.exit_code == 0, valid.output
        lines = valid.stdout.splitlines()
        assert lines[0] == f"valid: cli-valid-{tag}"
        assert [line.split()[:2] for line in lines[2:]] == [
            ["first", "actions"],
            ["second", "actions"],
            ["notify", "outputs"],
        ]
        as_json = _json(cli("workflow", "validate", good, *extra, "-o", "json", env=env))
        assert as_json["valid"] is True
        assert as_json["steps"][2] == {
            "name": "notify",
            "stage": "outputs",
            "depends_on": ["first", "second"],
        }

    graph = _write(tmp_path, "graph.yaml", GRAPH_PROBLEMS.format(name=f"cli-bad-{tag}"))
    expected_graph = {
        "actions.steps[2].name: duplicate step 'b' (first at actions.steps[1].name)",
        "actions.steps[0].depends_on[0]: a step cannot depend on itself",
        "actions.steps[1].depends_on[0]: unknown step 'zzz'",
    }
    schema = _write(tmp_path, "schema.yaml", SCHEMA_PROBLEMS.format(name=f"cli-bad-{tag}"))
    expected_schema = {
        "actions.steps[0].plugin: 'NOPE' is not a plugin reference such as 'service-restart-v1.2.0'",
        "actions.steps[0].timeout: 'forever' is not a duration such as '30s', '2m' or '1h'",
    }
    for file, expected in ((graph, expected_graph), (schema, expected_schema)):
        for extra, env in (([], None), (["--offline"], unreachable)):
            invalid = cli("workflow", "validate", file, *extra, env=env)
            assert invalid.exit_code == 2, invalid.output
            assert invalid.stdout == ""
            assert invalid.stderr.startswith("error: invalid workflow definition\n")
            assert set(_problems(invalid)) == expected
            assert len(_problems(invalid)) == len(expected)
            scripted = cli("workflow", "validate", file, *extra, "-o", "json", env=env)
            assert scripted.exit_code == 2
            error = json.loads(scripted.stderr)["error"]
            assert error["code"] == "invalid_input"
            assert {f"{d['path']}: {d['message']}" for d in error["details"]} == expected
        # apply refuses the same file the same way, and saves nothing
        refused = cli("workflow", "apply", file)
        assert refused.exit_code == 2 and set(_problems(refused)) == expected
    assert orchestrator.api.get(f"/api/v1/workflows/cli-bad-{tag}").status_code == 404

    broken = _write(tmp_path, "broken.json", '{"name": "x", ')
    not_json = cli("workflow", "validate", broken, "--offline")
    assert not_json.exit_code == 2
    assert "the workflow is not valid YAML or JSON" in not_json.stderr
    assert _problems(not_json)[0].startswith("(root): ")


# --- runs ---------------------------------------------------------------------------------


def test_run_with_inputs(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    name = f"cli-inputs-{tag}"
    orchestrator.apply(_workflow(name, tag, inputs=True))

    started = cli(
        "workflow",
        "run",
        name,
        "--input",
        "who=bob",
        "-i",
        "count=3",
        "-i",
        'tags=["a", "b"]',
        "-o",
        "json",
    )
    assert started.exit_code == 0, started.output
    execution = _json(started)
    assert execution["inputs"] == {"who": "bob", "count": 3, "tags": ["a", "b"]}
    assert execution["status"] == "running"

    # --inputs-json first, then each --input over it; a value that is not JSON is text
    merged = cli(
        "workflow",
        "run",
        name,
        "--inputs-json",
        '{"who": "ann", "count": 5}',
        "-i",
        "who=null-ish",
        "-o",
        "json",
    )
    assert _json(merged)["inputs"] == {"who": "null-ish", "count": 5, "tags": None}

    human = cli("workflow", "run", name, "-i", "who=carl")
    assert human.exit_code == 0
    assert human.stdout.startswith("started execution exe_")
    assert f"({name} v1): running" in human.stdout

    wrong_type = cli("workflow", "run", name, "-i", "who=bob", "-i", "count=many")
    assert wrong_type.exit_code == 2
    assert "error: invalid inputs for this workflow" in wrong_type.stderr
    assert _problems(wrong_type) == ["inputs.count: expected integer, got str"]
    missing = cli("workflow", "run", name)
    assert missing.exit_code == 2 and _problems(missing) == ["inputs.who: required"]
    assert cli("workflow", "run", name, "-i", "novalue").exit_code == 2
    assert cli("workflow", "run", name, "--inputs-json", "[1]").exit_code == 2
    assert cli("workflow", "run", name, "--inputs-json", "{oops").exit_code == 2
    assert cli("workflow", "run", f"nope-{tag}").exit_code == 3

    # nothing will take these (no agent matches): cancel them so the queue stays clean
    for item in _json(cli("execution", "list", "--workflow", name, "-o", "json"))["executions"]:
        assert cli("execution", "cancel", item["id"]).exit_code == 0


def test_run_watch_follows_to_success(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    name = f"cli-watch-{tag}"
    orchestrator.apply(_workflow(name, tag))
    with Agent(orchestrator, f"{tag}-agent") as agent:
        watched = cli("workflow", "run", name, "--watch", "--interval", "0.05")
    assert watched.exit_code == 0, watched.output
    assert agent.seen == ["first", "second", "notify"]
    lines = watched.stdout.splitlines()
    assert lines[0].startswith("exe_") and lines[0].endswith(f"{name} v1  succeeded")
    assert lines[2].split() == ["step", "stage", "status", "attempts", "agent", "error"]
    assert [line.split() for line in lines[3:6]] == [
        ["first", "actions", "succeeded", "1", f"{tag}-agent", "-"],
        ["second", "actions", "succeeded", "1", f"{tag}-agent", "-"],
        ["notify", "outputs", "succeeded", "1", f"{tag}-agent", "-"],
    ]
    assert lines[-1] == f"execution {lines[0].split()[0]} succeeded"

    with Agent(orchestrator, f"{tag}-agent-2"):
        scripted = cli("workflow", "run", name, "--watch", "--interval", "0.05", "-o", "json")
    assert scripted.exit_code == 0
    final = _json(scripted)
    assert final["status"] == "succeeded"
    assert [s["status"] for s in final["steps"]] == ["succeeded"] * 3


def test_watch_failure_logs_rerun_and_show(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    name = f"cli-rerun-{tag}"
    orchestrator.apply(_workflow(name, tag))
    with Agent(orchestrator, f"{tag}-agent", fail={"second": 1}):
        failed = cli("workflow", "run", name, "--watch", "--interval", "0.05")
        assert failed.exit_code == 1, failed.output
        execution_id = failed.stdout.split()[0]
        assert failed.stdout.splitlines()[-1] == f"execution {execution_id} failed"
        rows = {line.split()[0]: line.split() for line in failed.stdout.splitlines()[3:6]}
        assert rows["first"][2] == "succeeded"
        assert rows["second"][2:5] == ["failed", "1", f"{tag}-agent"]
        assert "exit status 3" in " ".join(rows["second"])
        assert rows["notify"][2] == "skipped"

        logs = cli("execution", "logs", execution_id)
        assert logs.exit_code == 0, logs.output
        blocks = logs.stdout.split("\n\n")
        assert [b.splitlines()[0].split()[:6] for b in blocks] == [
            ["first", "attempt", "1", "completed", "agent", f"{tag}-agent"],
            ["second", "attempt", "1", "failed", "agent", f"{tag}-agent"],
        ]
        assert blocks[1].splitlines()[1:] == [
            "  second: starting",
            "  second: working [x]",
            "  error: exit status 3",
        ]

        rerun = cli("execution", "rerun", execution_id, "--watch", "--interval", "0.05")
        assert rerun.exit_code == 0, rerun.output
        assert "(rerun 1)" in rerun.stdout.splitlines()[0]
        assert rerun.stdout.splitlines()[-1] == f"execution {execution_id} succeeded"

    attempts = _json(cli("execution", "logs", execution_id, "-o", "json"))["logs"]
    assert [(a["step"], a["attempt"], a["status"]) for a in attempts] == [
        ("first", 1, "completed"),
        ("second", 1, "failed"),
        ("second", 2, "completed"),
        ("notify", 1, "completed"),
    ]

    shown = cli("execution", "show", execution_id)
    assert shown.exit_code == 0
    lines = shown.stdout.splitlines()
    assert lines[0] == f"{execution_id}  {name} v1  succeeded  (rerun 1)"
    header = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert lines[header].split() == [
        "step",
        "stage",
        "plugin",
        "status",
        "attempts",
        "agent",
        "result",
        "error",
    ]
    second = lines[header + 2]
    assert second.split()[:6] == ["second", "actions", "echo", "succeeded", "2", f"{tag}-agent"]
    assert '{"step": "second", "note": "xxx' in second and "…" in second  # abbreviated
    assert len(second) < 200
    full = _json(cli("execution", "show", execution_id, "-o", "json"))
    assert full["steps"][1]["result"] == {"step": "second", "note": "x" * 200}
    assert full["reruns"] == 1

    again = cli("execution", "rerun", execution_id)
    assert again.exit_code == 4
    assert "only failed or cancelled executions can be rerun" in again.stderr


def test_list_cancel_rerun(cli: Invoke, orchestrator: Orchestrator) -> None:
    tag = _tag()
    name = f"cli-cancel-{tag}"
    orchestrator.apply(_workflow(name, tag))  # no agent is named <tag>-...: it waits
    first = orchestrator.run(name)["id"]
    second = orchestrator.run(name)["id"]

    listed = cli("execution", "list", "--workflow", name)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["id", "workflow", "v", "status", "created", "took", "error"]
    assert [line.split()[:4] for line in lines[1:]] == [
        [second, name, "1", "running"],
        [first, name, "1", "running"],
    ]
    limited = _json(cli("execution", "list", "--workflow", name, "--limit", "1", "-o", "json"))
    assert [e["id"] for e in limited["executions"]] == [second]

    cancelled = cli("execution", "cancel", first)
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout.strip() == f"execution {first} cancelled"
    assert _json(cli("execution", "cancel", second, "-o", "json"))["status"] == "cancelled"
    twice = cli("execution", "cancel", first)
    assert twice.exit_code == 4
    assert f"error: execution '{first}' is cancelled" in twice.stderr

    only = _json(
        cli("execution", "list", "--workflow", name, "--status", "cancelled", "-o", "json")
    )
    assert {e["id"] for e in only["executions"]} == {first, second}
    assert _json(
        cli("execution", "list", "--workflow", name, "--status", "running", "-o", "json")
    ) == {"executions": []}
    bad_status = cli("execution", "list", "--status", "bogus")
    assert bad_status.exit_code == 2
    assert _problems(bad_status)[0].startswith("query:status: Input should be 'queued'")

    rerun = cli("execution", "rerun", first, "-o", "json")
    assert rerun.exit_code == 0 and _json(rerun)["status"] == "running"
    assert cli("execution", "cancel", first).exit_code == 0

    empty = cli("execution", "list", "--workflow", f"none-{tag}")
    assert empty.exit_code == 0 and empty.stdout.strip() == "no executions"


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["show", "logs", "cancel", "rerun"])
def test_unknown_execution_exits_3(cli: Invoke, command: str) -> None:
    result = cli("execution", command, "exe_00000000000000000000000000")
    assert result.exit_code == 3
    assert result.stderr == "error: no execution 'exe_00000000000000000000000000'\n"
    scripted = cli("execution", command, "exe_missing", "-o", "json")
    assert scripted.exit_code == 3
    assert json.loads(scripted.stderr)["error"]["code"] == "not_found"


def test_bad_or_missing_token_exits_5(cli: Invoke) -> None:
    bad = cli("workflow", "list", "--token", "stv_wrong")
    assert bad.exit_code == 5
    assert bad.stderr.startswith("error: unknown or revoked token\n")
    assert bad.stdout == ""
    missing = cli("execution", "list", env={"STAVILY_TOKEN": None})
    assert missing.exit_code == 5
    assert "error: missing bearer token" in missing.stderr
    assert "not logged in: run stavily login, or set STAVILY_TOKEN" in missing.stderr
    scripted = cli("workflow", "list", "-o", "json", env={"STAVILY_TOKEN": "stv_wrong"})
    assert scripted.exit_code == 5
    assert json.loads(scripted.stderr)["error"]["code"] == "unauthorized"


def test_unreachable_url_exits_1(cli: Invoke) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["workflow", "list"], ["execution", "show", "exe_x"], ["workflow", "run", "w"]):
        result = cli(*args, "--url", url)
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: cannot reach the orchestrator at {url}\n")
        assert "Traceback" not in result.output
    via_env = cli("execution", "list", env={"STAVILY_URL": url + "/"})
    assert via_env.exit_code == 1
    assert f"cannot reach the orchestrator at {url}\n" in via_env.stderr
