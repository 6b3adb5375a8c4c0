"""`stavily agent run --enroll ...` as a real process: it enrolls once, keeps its
credentials in a private file, runs work, and starts again from that file alone."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.support import (
    CLI,
    HEARTBEAT_INTERVAL,
    POLL_WAIT,
    Processes,
    Stack,
    base_env,
    wait_until,
    workflow,
    write_plugin,
)

pytestmark = pytest.mark.e2e

GREET = """
json.dump({"hello": config.get("who"), "step": context["step"]}, sys.stdout)
"""


def _agent(plugins: Path, *options: str) -> list[str]:
    return [
        *CLI,
        "agent",
        "run",
        *options,
        "--plugins-dir",
        str(plugins),
        "--heartbeat-interval",
        HEARTBEAT_INTERVAL,
        "--poll-wait",
        POLL_WAIT,
    ]


def test_enroll_run_stop_and_restart_from_the_credentials_file(
    stack: Stack, processes: Processes, tmp_path: Path
) -> None:
    name = f"enrolled-{uuid.uuid4().hex[:8]}"
    created = stack.api.post(
        "/api/v1/enrollment-tokens",
        json={"name": "e2e", "labels": {"site": "e2e"}, "capacity": 2},
    )
    assert created.status_code == 201, created.text
    token = created.json()

    home = tmp_path / "agent-home"
    plugins = home / "plugins"
    write_plugin(plugins, "greet", GREET)
    credentials = home / "agent-credentials.json"  # the default: beside the plugins folder

    first = processes.start(
        "agent",
        _agent(plugins, "--url", stack.url, "--enroll", token["token"], "--name", name),
        base_env(),
    )
    wait_until(credentials.exists, 15, "the credentials file")
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    saved = json.loads(credentials.read_text())
    assert set(saved) == {"agent_id", "api_key", "url"}
    assert saved["url"] == stack.url and saved["api_key"].startswith("stva_")
    agent_id = saved["agent_id"]

    agent = stack.agent(agent_id)
    assert agent["name"] == name and agent["labels"] == {"site": "e2e"}
    assert agent["capacity"] == 2 and agent["enrollment_token_id"] == token["id"]
    assert agent["hostname"] and agent["version"]

    stack.apply(
        workflow(
            "enrolled-greeting",
            name,
            [{"name": "greet", "plugin": "greet", "config": {"who": "{{ inputs.who }}"}}],
            inputs={"who": {"type": "string"}},
        )
    )
    done = stack.wait_finished(stack.run("enrolled-greeting", {"who": "first"})["id"], 20)
    assert done["status"] == "succeeded", done
    assert done["steps"][0]["agent_id"] == agent_id
    assert done["steps"][0]["result"] == {"hello": "first", "step": "greet"}

    assert processes.stop(first) == 0
    # The key is never logged.
    assert saved["api_key"] not in first.stdout() + first.stderr()

    # The single-use token is spent: the restart needs nothing but the file.
    second = processes.start("agent", _agent(plugins), base_env())
    done = stack.wait_finished(stack.run("enrolled-greeting", {"who": "again"})["id"], 20)
    assert done["status"] == "succeeded", done
    assert done["steps"][0]["agent_id"] == agent_id
    assert done["steps"][0]["result"] == {"hello": "again", "step": "greet"}
    assert second.running
    assert json.loads(credentials.read_text()) == saved
    names = [a["name"] for a in stack.api.get("/api/v1/agents").json()["agents"]]
    assert names.count(name) == 1
    tokens = stack.api.get("/api/v1/enrollment-tokens").json()["enrollment_tokens"]
    assert [t["uses"] for t in tokens if t["id"] == token["id"]] == [1]
    assert saved["api_key"] not in second.stdout() + second.stderr()


def test_enrolling_with_a_spent_token_fails_clearly(
    stack: Stack, processes: Processes, tmp_path: Path
) -> None:
    secret = stack.api.post("/api/v1/enrollment-tokens", json={"name": "once"}).json()["token"]
    used = httpx.post(
        f"{stack.url}/agents/v1/register", json={"enrollment_token": secret, "name": "first"}
    )
    assert used.status_code == 201, used.text
    plugins = tmp_path / "home" / "plugins"
    plugins.mkdir(parents=True)
    args = _agent(plugins, "--url", stack.url, "--enroll", secret, "--name", "second")
    refused = processes.start("agent", args, base_env())
    assert refused.wait(30) == 5
    assert "enrollment refused (HTTP 401): this enrollment token has no uses left" in (
        refused.stderr()
    )
    assert not (tmp_path / "home" / "agent-credentials.json").exists()
    assert list((tmp_path / "home").iterdir()) == [plugins]  # no leftover scratch file

    nothing = processes.start("agent", _agent(plugins), base_env())
    assert nothing.wait(30) == 2
    assert "no credentials: give --agent-id and --token, or --enroll TOKEN" in nothing.stderr()
