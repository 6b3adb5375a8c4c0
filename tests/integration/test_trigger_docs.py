"""docs/triggers.md's examples run as written against a real server: the webhook
signature computed in shell (openssl, curl) and in Python is accepted, `webhook create`
prints what the docs show, the triggers-stage example (plugins published, workflow
applied, a sensor enrolled with `stavily agent run --enroll`) starts its workflow from the
sensor's watch, and the sensor events sent with curl to `POST /api/v1/triggers` and
`POST /agents/v1/{id}/events` are answered as the docs show."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Orchestrator

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "triggers.md"
DOC_URL = "http://127.0.0.1:8700"
# what the docs write in place of ids and secrets
IDS = re.compile(r"\b(evt|exe|enr|agt|hook)_[0-9A-HJKMNP-TV-Z]{26}\b")
SECRETS = re.compile(r"\b(stve|stva|whsec)_[A-Za-z0-9_-]+")


def block(after: str, language: str, nth: int = 0) -> str:
    """The `nth` (from 0) ```language block after the text `after`."""
    text = DOC.read_text()
    start = text.index(after)
    blocks = list(re.compile(rf"```{language}\n(.*?)```", re.S).finditer(text, start))
    assert len(blocks) > nth, f"no {language} block {nth} after {after!r}"
    return blocks[nth].group(1)


def as_documented(text: str, orchestrator: Orchestrator) -> str:
    """Real output written as the docs write it: ids `evt_01J…`, secrets `whsec_…`, the
    docs' URL; whitespace runs made one space (the docs wrap long lines)."""
    text = text.replace(orchestrator.url, DOC_URL)
    text = IDS.sub(lambda m: f"{m.group(1)}_01J…", text)
    text = SECRETS.sub(lambda m: f"{m.group(1)}_…", text)
    return " ".join(text.split())


def documented_output(code: str, command: str | None = None) -> str:
    """The `# ...` lines right after the line starting with `command` (else those that
    end the block): what it prints."""
    lines = code.splitlines()
    if command is None:
        start = max(i for i, line in enumerate(lines) if not line.startswith("# "))
    else:
        start = next(i for i, line in enumerate(lines) if line.startswith(command))
    said = []
    for line in lines[start + 1 :]:
        if not line.startswith("# "):
            break
        said.append(line[2:])
    assert said, f"no output shown after {command!r}"
    return " ".join(" ".join(said).split())


def shell_env(orchestrator: Orchestrator, home: Path) -> dict[str, str]:
    """The CLI on PATH (the venv's `stavily`), pointed at the test server as admin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAVILY_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(home),
        STAVILY_URL=orchestrator.url,
        STAVILY_TOKEN=orchestrator.token,
        NO_COLOR="1",
        COLUMNS="200",
        PYTHONUNBUFFERED="1",
    )
    return env


def sh(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )
    assert done.returncode == 0, (code, done.stdout, done.stderr)
    return done.stdout


# -- webhooks -----------------------------------------------------------------------------


@pytest.fixture
def hook(orchestrator: Orchestrator) -> dict[str, str]:
    name = f"docs-{time.monotonic_ns()}"
    orchestrator.apply(f"name: {name}\nactions:\n  steps:\n  - {{name: a, plugin: echo}}\n")
    response = orchestrator.api.post("/api/v1/webhooks", json={"workflow": name})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def filled(code: str, hook: dict[str, str]) -> str:
    code = code.replace("whsec_…", hook["secret"])
    return re.sub(r"http://127\.0\.0\.1:8700/hooks/hook_01J…", hook["url"], code)


def accepted(orchestrator: Orchestrator, output: str) -> None:
    event_id = re.search(r"evt_[0-9A-Z]{26}", output)
    assert event_id and "accepted" in output, output
    event = orchestrator.api.get(f"/api/v1/events/{event_id.group(0)}").json()
    assert (event["type"], event["payload"]["pusher"]["name"]) == ("push", "ada")


def test_the_shell_example_is_accepted(orchestrator: Orchestrator, hook: dict[str, str]) -> None:
    code = filled(block("In shell", "sh"), hook)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    accepted(orchestrator, done.stdout)


def test_the_python_example_is_accepted(orchestrator: Orchestrator, hook: dict[str, str]) -> None:
    code = filled(block("In Python", "python"), hook)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    accepted(orchestrator, done.stdout)


def test_webhook_create_prints_what_the_docs_show(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    code = block("## Webhooks", "sh")
    orchestrator.apply(
        "name: deploy\ninputs: {ref: {type: string, required: true}}\n"
        "actions:\n  steps:\n  - {name: a, plugin: echo}\n"
    )
    [line] = [line for line in code.splitlines() if line.startswith("stavily webhook create")]
    output = sh(line.split("  #")[0], shell_env(orchestrator, tmp_path), tmp_path)
    assert as_documented(output, orchestrator) == documented_output(code, line), output
    hook_id = re.search(r"hook_[0-9A-Z]{26}", output)
    assert hook_id, output
    shown = orchestrator.api.get(f"/api/v1/webhooks/{hook_id.group(0)}").json()
    assert shown["inputs"] == {"ref": "{{ trigger.payload.ref }}"}, shown
    assert shown["description"] == "CI pushes", shown


# -- sensors ------------------------------------------------------------------------------


def events(orchestrator: Orchestrator, **params: Any) -> list[dict[str, Any]]:
    response = orchestrator.api.get("/api/v1/events", params=params)
    assert response.status_code == 200, response.text
    return response.json()["events"]  # type: ignore[no-any-return]


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def local(line: str) -> str:
    """A documented command with the repository's paths made absolute (the docs run
    from a checkout) and the docs' URL left for the caller to fill."""
    return re.sub(r"(?<=\s)(tests|src)/", lambda m: f"{ROOT}/{m.group(1)}/", line)


def run_the_stage_example(
    orchestrator: Orchestrator, tmp_path: Path
) -> tuple[dict[str, str], subprocess.Popen[bytes]]:
    """The triggers-stage commands, one by one, as a user types them: the agent's
    enrollment token taken from `enrollment create`'s output for the `export`; the
    agent (the last command) left running. Its credentials, and its process."""
    (tmp_path / "value-watch.yaml").write_text(block("## The triggers stage", "yaml"))
    code = block("## The triggers stage", "sh")
    env = shell_env(orchestrator, tmp_path)
    token = None
    commands = [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
    *first, last = commands
    for line in first:
        if line.startswith("export SENSOR_ENROLLMENT_TOKEN="):
            assert token, "no enrollment token printed before the export"
            env["SENSOR_ENROLLMENT_TOKEN"] = token
            continue
        output = sh(local(line).replace(DOC_URL, orchestrator.url), env, tmp_path)
        if line.startswith("stavily enrollment create"):
            shown = documented_output(code, line)
            assert as_documented(output, orchestrator).startswith(shown), output
            found = re.search(r"stve_[A-Za-z0-9_-]+", output)
            assert found, output
            token = found.group(0)
    assert shlex.split(last)[:3] == ["stavily", "agent", "run"], last
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        ["bash", "-c", "exec " + last.replace(DOC_URL, orchestrator.url)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    credentials = tmp_path / ".stavily" / "agent.json"  # HOME is tmp_path
    wait_for(credentials.exists, 30, "the agent to enroll")
    return json.loads(credentials.read_text()), agent


def stop(agent: subprocess.Popen[bytes]) -> None:
    agent.terminate()  # the agent stops its watches and kills their plugins
    try:
        agent.wait(20)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait(10)


def test_the_triggers_stage_example_and_sensor_events_run_as_written(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    credentials, agent = run_the_stage_example(orchestrator, tmp_path)
    try:
        agent_id = credentials["agent_id"]
        shown = orchestrator.api.get(f"/api/v1/agents/{agent_id}").json()
        assert shown["type"] == "sensor", shown
        assert shown["labels"] == {"role": "sensor", "env": "prod"}, shown

        # the agent installs stdin-trigger, runs it; its first look starts the workflow
        def watched() -> list[dict[str, Any]]:
            found = events(orchestrator, source="agent", type="value.high", limit=1000)
            return [e for e in found if e["agent_id"] == agent_id and e["outcome"] == "started"]

        try:
            [event] = wait_for(watched, 45, "the sensor's watch to start value-watch")
        except AssertionError:
            print((tmp_path / "agent.log").read_text(errors="replace"))
            raise
        assert (event["workflow"], event["step"]) == ("value-watch", "value"), event
        assert event["payload"] == {
            "id": "value-high-1",
            "type": "value.high",
            "data": {"value": 92},
        }, event
        [execution_id] = event["started"]
        trigger = orchestrator.execution(execution_id)["trigger"]
        assert (trigger["type"], trigger["agent_id"]) == ("value.high", agent_id), trigger

        # the same sensor, sending events itself with its credential
        for anchor, value in (("**The documented Stavily route", 97), ("**Ours, `POST", 99)):
            code = block(anchor, "sh")
            code = code.replace("agent=agt_01J…", f"agent={agent_id}")
            code = code.replace("key=stva_…", f"key={credentials['api_key']}")
            code = code.replace(DOC_URL, orchestrator.url)
            answer = sh(code)
            shown = documented_output(block(anchor, "sh"))
            assert as_documented(answer, orchestrator) == shown, answer
            first = json.loads(answer)
            [started] = first["started"]
            run = orchestrator.execution(started)
            assert run["workflow"] == "value-watch", run
            assert run["trigger"]["agent_id"] == agent_id, run["trigger"]
            assert run["trigger"]["payload"]["data"] == {"value": value}, run["trigger"]
            assert run["trigger"]["payload"]["source"] == "stdin-trigger", run["trigger"]
            again = json.loads(sh(code))  # the same payload id: the same event
            assert again == {**first, "duplicate": True}, (first, again)
    finally:
        stop(agent)
