"""Every way Stavily plugins speak, through the whole path: published to the registry,
pinned by a workflow, installed and run by a real reference agent process, its result
and its log read back (`stavily execution logs --follow` while it runs). The plugins
are the repository's own (tests/fixtures/plugins)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import ADMIN_TOKEN, CLI, Processes, Stack, base_env, wait_until, workflow
from tests.harness import fresh_database
from tests.plugin_fixtures import build_wheel, published

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "plugins"


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is under test is the agent; the server's side of pinned
    protocols runs on both databases in tests/integration/test_plugin_workflows.py."""
    with fresh_database("sqlite", tmp_path) as url:
        yield url


def publish_fixture(stack: Stack, tmp_path: Path, name: str) -> dict[str, Any]:
    folder = tmp_path / "sources" / name
    shutil.copytree(FIXTURES / name, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return published(stack.api, folder)


def start_agent(stack: Stack, tmp_path: Path, capacity: int = 4) -> tuple[str, str, Path]:
    """A reference agent whose pip finds packages only in a local folder of wheels."""
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    build_wheel(wheels, "tinydep", "1.0")
    name = f"protocols-{uuid.uuid4().hex[:6]}"
    created = stack.api.post("/api/v1/agents", json={"name": name, "capacity": capacity})
    assert created.status_code == 201, created.text
    plugins = tmp_path / "agent-plugins"
    plugins.mkdir()
    env = {
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_CACHE_DIR": str(tmp_path / "pip-cache"),
    }
    stack.start_agent(
        created.json()["agent_id"],
        created.json()["api_key"],
        plugins,
        extra=("--capacity", str(capacity)),
        env=env,
    )
    return name, created.json()["agent_id"], plugins


def step(name: str, plugin_id: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "plugin": {"id": plugin_id, "version": "1.0.0"}, "config": config}


def logs_of(stack: Stack, execution_id: str) -> dict[str, list[str]]:
    response = stack.api.get(f"/api/v1/executions/{execution_id}/logs")
    assert response.status_code == 200, response.text
    return {a["step"]: a["log"] for a in response.json()["logs"]}


def test_each_protocol_runs_end_to_end_with_its_result_and_log(
    stack: Stack, processes: Processes, tmp_path: Path
) -> None:
    for name in ("stdin-action", "flags-action", "input-action", "deps-action"):
        publish_fixture(stack, tmp_path, name)
    agent_name, agent_id, plugins = start_agent(stack, tmp_path)
    marker = tmp_path / "go-on"
    flags_config = {"message": "hi", "targets": ["a", "b"], "wait_for": str(marker)}
    stack.apply(
        workflow(
            "protocols",
            agent_name,
            [
                step("stdin", "stdin-action", {"target": "nginx"}),
                step("flags", "flags-action", flags_config),
                step("input", "input-action", {"greeting": "yo"}),
                step("deps", "deps-action", {}),
            ],
        )
    )
    execution_id = str(stack.run("protocols")["id"])
    follow = processes.start(
        "follow",
        [*CLI, "execution", "logs", execution_id, "--follow", "--interval", "0.2"],
        {**base_env(), "STAVILY_URL": stack.url, "STAVILY_TOKEN": ADMIN_TOKEN},
    )

    # What the flags plugin uploads on the socket shows while it still runs.
    wait_until(lambda: "INFO saying hi" in follow.stdout(), 30, "the uploaded log, followed")
    assert stack.step(execution_id, "flags")["status"] == "running"
    marker.touch()

    execution = stack.wait_finished(execution_id, timeout=60)
    steps = {s["name"]: s for s in execution["steps"]}
    assert execution["status"] == "succeeded", steps
    wait_until(lambda: follow.popen.poll() is not None, 15, "follow to end")
    assert follow.popen.returncode == 0  # it exits 0: the execution succeeded

    stdin = steps["stdin"]["result"]
    assert stdin["status"] == "completed"
    assert stdin["data"]["target"] == "nginx"
    assert stdin["data"]["demo_mode"] == "false"
    flags = steps["flags"]["result"]
    assert flags["status"] == "success"
    assert flags["data"]["argv"] == [
        "--message",
        "hi",
        "--targets",
        "a",
        "b",
        "--wait-for",
        str(marker),
    ]
    assert flags["data"]["config"] == flags_config
    assert flags["data"]["agent"]["agent_id"] == agent_id
    assert flags["data"]["socket_mode"] == "0o600"
    seen = steps["input"]["result"]
    assert seen["greeting"] == "yo"
    assert seen["agent_packages"] == []  # its own environment, not the agent's
    assert Path(seen["executable"]).is_relative_to(plugins / ".venvs")
    assert steps["deps"]["result"]["tinydep"] == "1.0"

    logs = logs_of(stack, execution_id)
    assert any("speaks JSON lines on stdin (protocol: stdin)" in line for line in logs["stdin"])
    assert "INFO acting on nginx" in logs["stdin"]  # its stderr: its log, not its result
    assert any("protocol: flags) (as the registry recorded it)" in line for line in logs["flags"])
    assert any('trigger reported: said {"id": "said-1"}' in line for line in logs["flags"])
    assert any("built environment" in line and "tinydep==1.0" in line for line in logs["deps"])
    assert "a line on stderr, the plugin's log" in logs["input"]

    # what the flags plugin reported on the socket is an event on the orchestrator, once
    def said() -> list[dict[str, Any]]:
        return stack.api.get("/api/v1/events", params={"type": "said"}).json()["events"]

    [event] = wait_until(said, 10, "the reported trigger, as an event")
    assert event["payload"] == {"id": "said-1"} and event["agent_id"] == agent_id
    assert event["outcome"] == "unmatched" and event["started"] == []


def test_a_plugin_that_fails_its_protocol_fails_its_step(stack: Stack, tmp_path: Path) -> None:
    for name in ("stdin-action", "flags-action"):
        publish_fixture(stack, tmp_path, name)
    agent_name, _, _ = start_agent(stack, tmp_path, capacity=3)
    cases = {
        "refused": step("only", "stdin-action", {"refuse_init": True}),
        "silent": step("only", "stdin-action", {"exit_on": "execute_action"}),
        "error": step("only", "flags-action", {"fail": True}),
    }
    runs = {}
    for case, only in cases.items():  # a workflow each: a failed step cancels the others
        stack.apply(workflow(f"failing-{case}", agent_name, [only]))
        runs[case] = str(stack.run(f"failing-{case}")["id"])
    errors = {}
    for case, execution_id in runs.items():
        execution = stack.wait_finished(execution_id, timeout=60)
        assert execution["status"] == "failed", execution
        errors[case] = execution["steps"][0]["error"]
    assert "answered 'initialize' with a failure: bad configuration" in errors["refused"]
    assert "the plugin exited (status 3) before it answered" in errors["silent"]
    assert "the plugin reported an error: asked to fail" in errors["error"]
