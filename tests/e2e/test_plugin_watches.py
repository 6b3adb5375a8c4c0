"""Trigger and monitor plugins kept running as watches on a sensor agent, end to end: a
workflow's triggers stage published and applied, a real reference agent process of type
sensor running them (a stdin trigger, a flags monitor on the socket that dies and is
started again), their events deduplicated, delivered and starting the workflow, whose
step on a real action agent reads the event as `trigger.*`."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import Process, Stack, wait_until, workflow
from tests.harness import fresh_database
from tests.plugin_fixtures import published

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "plugins"


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: the server's side of watches and events runs on both databases in
    tests/integration/test_events.py."""
    with fresh_database("sqlite", tmp_path) as url:
        yield url


def publish_fixture(stack: Stack, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "sources" / name
    shutil.copytree(FIXTURES / name, folder, ignore=shutil.ignore_patterns("__pycache__"))
    published(stack.api, folder)


def agent(stack: Stack, tmp_path: Path, kind: str) -> tuple[str, Process]:
    name = f"{kind}-{uuid.uuid4().hex[:6]}"
    created = stack.api.post("/api/v1/agents", json={"name": name, "type": kind})
    assert created.status_code == 201, created.text
    plugins = tmp_path / f"{name}-plugins"
    plugins.mkdir()
    process = stack.start_agent(created.json()["agent_id"], created.json()["api_key"], plugins)
    return name, process


def events(stack: Stack, **params: Any) -> list[dict[str, Any]]:
    response = stack.api.get("/api/v1/events", params=params)
    assert response.status_code == 200, response.text
    return response.json()["events"]  # type: ignore[no-any-return]


def test_watches_run_on_the_sensor_agent_and_their_events_start_the_workflow(
    stack: Stack, tmp_path: Path
) -> None:
    for name in ("stdin-trigger", "flags-monitor", "input-action"):
        publish_fixture(stack, tmp_path, name)
    sensor_name, sensor = agent(stack, tmp_path, "sensor")
    action_name, _ = agent(stack, tmp_path, "action")
    counter = tmp_path / "monitor-runs"
    definition = workflow(
        "watched",
        action_name,
        [
            {
                "name": "react",
                "plugin": {"id": "input-action", "version": "1.0.0"},
                "config": {"greeting": "{{ trigger.type }}:{{ trigger.payload.id }}"},
            }
        ],
        triggers={
            "agents": {"single_agent": sensor_name},
            "steps": [
                {
                    "name": "value",
                    "plugin": {"id": "stdin-trigger", "version": "1.0.0"},
                    "config": {"threshold": 5, "value": 9, "interval": 1},
                },
                {
                    "name": "ticks",
                    "plugin": {"id": "flags-monitor", "version": "1.0.0"},
                    "config": {"counter": str(counter), "interval": 1},
                },
            ],
        },
    )
    stack.apply(definition)

    # The monitor dies after each report and is started again, with back-off.
    def ticks() -> list[dict[str, Any]] | None:
        found = [e for e in events(stack, type="tick") if e["outcome"] == "started"]
        return found if len(found) >= 2 else None

    reported = wait_until(ticks, 30, "two ticks from the restarted monitor")
    assert {e["payload"]["id"] for e in reported} >= {"tick-1", "tick-2"}
    assert all(e["step"] == "ticks" and e["workflow"] == "watched" for e in reported)

    # The stdin trigger answers the same event every second: delivered once.
    [value] = wait_until(lambda: events(stack, type="value.high"), 15, "the value event")
    assert value["payload"]["data"] == {"value": 9}
    assert value["outcome"] == "started" and value["step"] == "value"

    [execution_id] = value["started"]
    execution = stack.wait_finished(execution_id, timeout=30)
    assert execution["status"] == "succeeded", execution
    assert execution["steps"][0]["result"]["greeting"] == "value.high:value-high-1"
    assert len(events(stack, type="value.high")) == 1, "a repeated trigger was delivered again"
    assert "watch ended; restarting" in sensor.stderr()


def test_events_reported_while_the_server_is_down_are_delivered_once_it_is_back(
    stack: Stack, tmp_path: Path
) -> None:
    publish_fixture(stack, tmp_path, "flags-monitor")
    sensor_name, sensor = agent(stack, tmp_path, "sensor")
    counter = tmp_path / "monitor-runs"
    stack.apply(
        workflow(
            "ticking",
            sensor_name,
            [{"name": "noop", "plugin": "echo", "config": {}}],
            triggers={
                "agents": {"single_agent": sensor_name},
                "steps": [
                    {
                        "name": "ticks",
                        "plugin": {"id": "flags-monitor", "version": "1.0.0"},
                        "config": {"counter": str(counter), "interval": 1},
                    }
                ],
            },
        )
    )
    wait_until(lambda: events(stack, type="tick"), 20, "the first tick")
    server = stack.server
    assert server is not None
    stack.processes.kill(server)
    runs = int(counter.read_text())
    # The monitor goes on being restarted and reporting; the agent cannot deliver.
    wait_until(lambda: int(counter.read_text()) >= runs + 2, 20, "two more ticks, server down")
    wait_until(lambda: "event not delivered yet" in sensor.stderr(), 10, "a failed delivery")
    stack.start_server()
    reported = int(counter.read_text())

    def delivered() -> list[dict[str, Any]] | None:
        found = events(stack, type="tick", limit=1000)
        ids = {e["payload"]["id"] for e in found}
        return found if {f"tick-{n}" for n in range(1, reported + 1)} <= ids else None

    found = wait_until(delivered, 30, "every tick, delivered")
    ids = [e["payload"]["id"] for e in found]
    assert len(ids) == len(set(ids)), "a tick was stored twice"
