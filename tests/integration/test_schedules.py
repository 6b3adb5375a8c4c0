"""Schedules: declared in a workflow (`schedules:`) or made by the API, fired by the
server's scheduler (its tick cut short here) as events of source `schedule`, each fire
time once; pause, resume, misfire policies after downtime. Real HTTP, both databases."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
import yaml

from stavily.store.models import schedules
from stavily.timeutil import utcnow
from tests.harness import (
    Orchestrator,
    SimAgent,
    api_token,
    cli_for,
    fresh_database,
    on_database,
    serve,
)

T = TypeVar("T")


@pytest.fixture(scope="module")
def orch(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp(f"schedules-{backend}")
    with (
        fresh_database(backend, tmp) as url,
        serve(url, tmp, scheduler_tick=0.1, scheduler_lease_ttl=2.0) as running,
    ):
        yield running


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.05)


def workflow(name: str, **extra: Any) -> str:
    return yaml.safe_dump(
        {
            "name": name,
            "agents": {"single_agent": f"nobody-{name}"},  # no agent runs it: runs stay
            "actions": {
                "steps": [
                    {
                        "name": "report",
                        "plugin": "echo",
                        "config": {
                            "at": "{{ trigger.payload.scheduled_for }}",
                            "type": "{{ trigger.type }}",
                        },
                    }
                ]
            },
            **extra,
        }
    )


def apply(orch: Orchestrator, source: str, status: int = 201) -> dict[str, Any]:
    answer = orch.api.post(
        "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
    )
    assert answer.status_code == status, answer.text
    return answer.json()  # type: ignore[no-any-return]


def listed(orch: Orchestrator, workflow: str) -> list[dict[str, Any]]:
    answer = orch.api.get("/api/v1/schedules", params={"workflow": workflow})
    assert answer.status_code == 200, answer.text
    return answer.json()["schedules"]  # type: ignore[no-any-return]


def fires(orch: Orchestrator, schedule_id: str) -> list[dict[str, Any]]:
    answer = orch.api.get("/api/v1/events", params={"source": "schedule", "limit": 1000})
    assert answer.status_code == 200, answer.text
    return [e for e in answer.json()["events"] if e["payload"]["schedule_id"] == schedule_id]


def create(orch: Orchestrator, **body: Any) -> dict[str, Any]:
    answer = orch.api.post("/api/v1/schedules", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def move_next_fire(orch: Orchestrator, schedule_id: str, ago: timedelta) -> None:
    async def move(conn: Any) -> None:
        await conn.execute(
            schedules.update()
            .where(schedules.c.id == schedule_id)
            .values(next_fire_at=utcnow() - ago)
        )

    on_database(orch.database_url, move)


def test_the_api_makes_lists_pauses_resumes_and_deletes(orch: Orchestrator) -> None:
    name = unique("api-made")
    apply(orch, workflow(name, inputs={"env": {"type": "string", "default": "dev"}}))
    made = create(
        orch, workflow=name, cron="0 9 * * 1-5", timezone="Europe/Paris", inputs={"env": "prod"}
    )
    assert made["id"].startswith("sch_") and made["origin"] == "api"
    assert made["cron"] == "0 9 * * 1-5" and made["timezone"] == "Europe/Paris"
    assert made["misfire"] == "once" and made["paused"] is False
    assert made["next_fire_at"] > utcnow().isoformat()[:19]
    every = create(orch, workflow=name, every="15m", misfire="all", name="poll")
    assert every["every_seconds"] == 900 and every["timezone"] == "UTC"
    assert [s["id"] for s in listed(orch, name)] == [made["id"], every["id"]]
    assert orch.api.get(f"/api/v1/schedules/{made['id']}").json() == made

    paused = orch.api.post(f"/api/v1/schedules/{made['id']}/pause")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    resumed = orch.api.post(f"/api/v1/schedules/{made['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    deleted = orch.api.delete(f"/api/v1/schedules/{every['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert orch.api.get(f"/api/v1/schedules/{every['id']}").status_code == 404
    actions = [
        r["action"]
        for r in orch.api.get("/api/v1/audit", params={"subject_id": made["id"]}).json()["records"]
    ]
    assert sorted(actions) == ["schedule.created", "schedule.paused", "schedule.resumed"]
    gone = orch.api.get("/api/v1/audit", params={"subject_id": every["id"]}).json()["records"]
    assert "schedule.deleted" in [r["action"] for r in gone]

    # reads need a token only; changes need workflows:write
    viewer = orch.client(api_token(orch, "viewer"))
    assert viewer.get("/api/v1/schedules").status_code == 200
    assert viewer.post(f"/api/v1/schedules/{made['id']}/pause").status_code == 403
    assert (
        viewer.post("/api/v1/schedules", json={"workflow": name, "every": "1m"}).status_code == 403
    )
    assert orch.client().get("/api/v1/schedules").status_code == 401


def test_bad_schedules_are_refused(orch: Orchestrator) -> None:
    name = unique("refused")
    apply(orch, workflow(name, inputs={"count": {"type": "integer"}}))
    for body, path in [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "0 9 * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"cron": "0 9 * * *", "every": "1m"}, "(body)"),
        ({}, "(body)"),
        ({"every": "0s"}, "every"),
        ({"every": "1m", "misfire": "never"}, "misfire"),
        ({"every": "1m", "inputs": {"count": "three"}}, "inputs.count"),
        ({"every": "1m", "surprise": 1}, "surprise"),
    ]:
        answer = orch.api.post("/api/v1/schedules", json={"workflow": name, **body})
        assert answer.status_code == 422, (body, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_input"
        assert path in [d["path"] for d in error["details"]], (body, error)
    missing = orch.api.post("/api/v1/schedules", json={"workflow": unique("none"), "every": "1m"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for method, path in [
        ("GET", "/api/v1/schedules/sch_nope"),
        ("POST", "/api/v1/schedules/sch_nope/pause"),
        ("POST", "/api/v1/schedules/sch_nope/resume"),
        ("DELETE", "/api/v1/schedules/sch_nope"),
    ]:
        answer = orch.api.request(method, path)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    # in a workflow: refused at validate and at apply, with the path
    bad = workflow(unique("bad"), schedules=[{"cron": "0 9 * * *", "timezone": "Nowhere/City"}])
    for route in ("/api/v1/workflows/validate", "/api/v1/workflows"):
        answer = orch.api.post(route, content=bad, headers={"Content-Type": "application/yaml"})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["details"][0]["path"] == "schedules[0].timezone"


def test_declared_schedules_follow_their_workflow(orch: Orchestrator) -> None:
    name = unique("declared")
    daily = {"cron": "0 9 * * *", "timezone": "Europe/Paris"}
    hourly = {"every": "1h", "misfire": "skip"}
    apply(orch, workflow(name, schedules=[daily, hourly]))
    first = listed(orch, name)
    assert [(s["origin"], s["cron"], s["every_seconds"]) for s in first] == [
        ("workflow", "0 9 * * *", None),
        ("workflow", None, 3600),
    ]
    daily_id = first[0]["id"]
    assert orch.api.post(f"/api/v1/schedules/{daily_id}/pause").status_code == 200
    conflict = orch.api.delete(f"/api/v1/schedules/{daily_id}")
    assert conflict.status_code == 409 and "apply the workflow again" in conflict.text

    apply(orch, workflow(name, schedules=[daily, hourly]), status=200)  # unchanged
    # a new version with the same daily entry: kept (id, paused, next fire); hourly gone
    apply(orch, workflow(name, description="v2", schedules=[daily, {"every": "2h"}]))
    second = listed(orch, name)
    kept = next(s for s in second if s["id"] == daily_id)
    assert kept["paused"] is True and kept["next_fire_at"] == first[0]["next_fire_at"]
    assert [s["every_seconds"] for s in second if s["id"] != daily_id] == [7200]
    assert first[1]["id"] not in [s["id"] for s in second]

    # API-made schedules stay when the declared ones go
    extra = create(orch, workflow=name, every="1d")
    apply(orch, workflow(name, description="v3"))
    assert [s["id"] for s in listed(orch, name)] == [extra["id"]]


def test_an_interval_schedule_starts_runs_that_read_the_trigger(orch: Orchestrator) -> None:
    name = unique("every-second")
    agent_name = unique("sched-agent")
    source = workflow(name, schedules=[{"every": "1s"}]).replace(f"nobody-{name}", agent_name)
    apply(orch, source)
    [schedule] = listed(orch, name)
    agent = SimAgent(orch, agent_name)

    def started() -> list[dict[str, Any]]:
        runs = orch.api.get("/api/v1/executions", params={"workflow": name}).json()
        return runs["executions"] if len(runs["executions"]) >= 2 else []

    runs = wait_for(started, 15, "two scheduled runs")
    execution = orch.execution(runs[0]["id"])
    assert execution["trigger"]["type"] == "schedule"
    assert execution["trigger"]["source"] == "schedule"
    payload = execution["trigger"]["payload"]
    assert payload["schedule_id"] == schedule["id"] and payload["every"] == 1
    instruction = wait_for(agent.poll, 10, "the run's instruction")
    assert instruction["input_data"]["type"] == "schedule"
    assert instruction["input_data"]["at"].endswith("Z")

    events = fires(orch, schedule["id"])
    times = [e["payload"]["scheduled_for"] for e in events]
    assert len(times) == len(set(times)) and all(e["outcome"] == "started" for e in events)
    assert (
        events[0]["idempotency_key"] == f"{schedule['id']}:{events[0]['payload']['scheduled_for']}"
    )
    assert events[0]["sent_by"] == f"schedule:{schedule['id']}"

    # paused: it stops
    assert orch.api.post(f"/api/v1/schedules/{schedule['id']}/pause").status_code == 200
    time.sleep(0.3)  # a fire already under way ends
    before = len(fires(orch, schedule["id"]))
    time.sleep(2)
    assert len(fires(orch, schedule["id"])) == before
    shown = orch.api.get(f"/api/v1/schedules/{schedule['id']}").json()
    assert shown["last_fired_at"] is not None


@pytest.mark.parametrize(("policy", "expected"), [("skip", 0), ("once", 1), ("all", 6)])
def test_misfire_after_downtime(orch: Orchestrator, policy: str, expected: int) -> None:
    """Hourly, due 5 h 30 min ago (the server was down): six missed times, the latest
    30 min late (beyond the grace of a minute)."""
    name = unique(f"misfire-{policy}")
    apply(orch, workflow(name))
    made = create(orch, workflow=name, every="1h", misfire=policy)
    move_next_fire(orch, made["id"], timedelta(hours=5, minutes=30))

    def caught_up() -> dict[str, Any] | None:
        shown = orch.api.get(f"/api/v1/schedules/{made['id']}").json()
        return shown if shown["next_fire_at"] > utcnow().isoformat()[:19] else None

    shown = wait_for(caught_up, 10, "the schedule to catch up")
    events = fires(orch, made["id"])
    assert len(events) == expected, events
    times = sorted(e["payload"]["scheduled_for"] for e in events)
    assert len(set(times)) == len(times)
    if expected:
        assert shown["last_fired_at"] == times[-1]
        assert all(e["payload"].get("skipped", 0) == 6 - expected for e in events)
    # the next fire keeps the interval's phase: half an hour from now
    wait = (datetime.fromisoformat(shown["next_fire_at"]) - utcnow()).total_seconds()
    assert 1700 < wait < 1800


def test_a_refused_start_is_recorded_and_the_schedule_goes_on(orch: Orchestrator) -> None:
    name = unique("refusing")
    apply(orch, workflow(name))
    made = create(orch, workflow=name, every="1h", inputs={"x": 1})
    # the workflow now wants other inputs: the scheduled start is refused, recorded
    apply(orch, workflow(name, inputs={"y": {"type": "string", "required": True}}))
    move_next_fire(orch, made["id"], timedelta(seconds=1))
    [event] = wait_for(lambda: fires(orch, made["id"]), 10, "the refused fire")
    assert event["outcome"] == "refused" and "inputs.x" in event["reason"]
    shown = wait_for(
        lambda: (
            (s := orch.api.get(f"/api/v1/schedules/{made['id']}").json())["next_fire_at"]
            > utcnow().isoformat()[:19]
            and s
        ),
        10,
        "the next fire time",
    )
    assert shown["paused"] is False


def test_the_cli(orch: Orchestrator, tmp_path: Path) -> None:
    stavily = cli_for(orch)
    name = unique("cli")
    apply(orch, workflow(name, inputs={"n": {"type": "integer", "default": 1}}))
    made = stavily(
        "schedule", "create", name, "--cron", "30 6 * * *", "--tz", "Asia/Tokyo", "-i", "n=3"
    )
    assert made.exit_code == 0, made.output
    assert "30 6 * * * (Asia/Tokyo)" in made.output
    [schedule] = listed(orch, name)
    assert schedule["inputs"] == {"n": 3}
    table = stavily("schedule", "list", "--workflow", name)
    assert table.exit_code == 0 and schedule["id"] in table.output and "active" in table.output
    shown = stavily("schedule", "show", schedule["id"])
    assert shown.exit_code == 0 and "made by the API" in shown.output
    assert "paused" in stavily("schedule", "pause", schedule["id"]).output
    assert "paused" in stavily("schedule", "list", "-w", name).output
    assert "resumed" in stavily("schedule", "resume", schedule["id"]).output
    as_json = stavily("schedule", "show", schedule["id"], "-o", "json")
    assert as_json.exit_code == 0 and '"paused": false' in as_json.output
    interval = stavily("schedule", "create", name, "--every", "15m", "--misfire", "skip")
    assert interval.exit_code == 0 and "every 15m" in interval.output, interval.output

    bad = stavily("schedule", "create", name, "--cron", "0 25 * * *")
    assert bad.exit_code == 2 and "cron" in bad.output
    both = stavily("schedule", "create", name, "--cron", "0 1 * * *", "--every", "1m")
    assert both.exit_code == 2 and "exactly one of --cron and --every" in both.output
    assert stavily("schedule", "show", "sch_nope").exit_code == 3
    assert stavily("schedule", "delete", schedule["id"]).exit_code == 0
    assert stavily("schedule", "delete", schedule["id"]).exit_code == 3

    declared = unique("cli-declared")
    apply(orch, workflow(declared, schedules=[{"every": "1d"}]))
    [own] = listed(orch, declared)
    refused = stavily("schedule", "delete", own["id"])
    assert refused.exit_code == 4 and "apply the workflow again" in refused.output
    assert stavily("schedule", "list", "-w", unique("none")).output.strip() == "no schedules"


def test_an_unpaused_due_schedule_is_the_only_one_read(orch: Orchestrator) -> None:
    """A paused schedule long overdue fires nothing and is not moved."""
    name = unique("paused-due")
    apply(orch, workflow(name))
    made = create(orch, workflow=name, every="1h")
    orch.api.post(f"/api/v1/schedules/{made['id']}/pause")
    move_next_fire(orch, made["id"], timedelta(hours=2))
    time.sleep(0.5)
    assert fires(orch, made["id"]) == []

    async def next_fire(conn: Any) -> Any:
        return await conn.scalar(
            sa.select(schedules.c.next_fire_at).where(schedules.c.id == made["id"])
        )

    assert on_database(orch.database_url, next_fire) is not None
    resumed = orch.api.post(f"/api/v1/schedules/{made['id']}/resume").json()
    assert resumed["next_fire_at"] > utcnow().isoformat()[:19]  # paused-through not fired
    time.sleep(0.5)
    assert fires(orch, made["id"]) == []
