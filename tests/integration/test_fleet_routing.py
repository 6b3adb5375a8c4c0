"""The fleet at work: label selectors, routing strategies, health, dead agents and their
work going elsewhere, unroutable steps, heartbeat validation and rate limits."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Orchestrator, SimAgent, fresh_database, serve


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def until(condition: Callable[[], Any], within: float = 10) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fleet(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    """A server with short fleet timings."""
    tmp = tmp_path_factory.mktemp(f"fleet-{backend}")
    with (
        fresh_database(backend, tmp) as url,
        serve(
            url,
            tmp,
            lease_grace=30,
            unroutable_after=1,
            unreported_grace=1,
            heartbeat_rate_limit="3/second",
        ) as running,
    ):
        yield running


def one_step(
    orch: Orchestrator,
    tag: str,
    prefix: str,
    step: str = "{name: only, plugin: echo}",
    agents_extra: str = "",
) -> str:
    """Apply a one-step workflow for the agents named `<tag>-...`; returns its name."""
    name = unique(prefix)
    orch.apply(
        f"name: {name}\n"
        f'agents: {{pools: [{{agent_regex: "{tag}-.*"}}]{agents_extra}}}\n'
        f"actions:\n  steps:\n    - {step}\n"
    )
    return name


def agent_status(orch: Orchestrator, agent: SimAgent) -> dict[str, Any]:
    response = orch.api.get(f"/api/v1/agents/{agent.id}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def beat(agent: SimAgent, **fields: Any) -> Any:
    return agent.client.post(
        f"/agents/v1/{agent.id}/heartbeat", json={"timestamp": now(), "status": "online", **fields}
    )


def test_label_selectors_equality_membership_existence(fleet: Orchestrator) -> None:
    tag = uuid.uuid4().hex[:6]
    prod_a = SimAgent(fleet, f"{tag}-1", labels={"env": "prod", "zone": "a", "gpu": "yes"})
    prod_c = SimAgent(fleet, f"{tag}-2", labels={"env": "prod", "zone": "c"})
    dev = SimAgent(fleet, f"{tag}-3", labels={"env": "dev", "zone": "a"})
    name = unique("labels")
    fleet.apply(
        f"""
name: {name}
agents: {{pools: [{{agent_regex: "{tag}-.*"}}]}}
actions:
  steps:
    - name: any-prod
      plugin: echo
      agents: {{labels: {{env: prod, zone: [a, b]}}}}
    - name: gpu
      plugin: echo
      agents: {{labels: {{gpu: {{exists: true}}}}}}
    - name: not-prod
      plugin: echo
      agents: {{labels: {{env: {{not_in: [prod]}}, gpu: {{exists: false}}}}}}
"""
    )
    execution = fleet.run(name)
    assert sorted(prod_c.work()) == []
    assert sorted(dev.work()) == ["not-prod"]
    assert sorted(prod_a.work()) == ["any-prod", "gpu"]
    assert fleet.execution(execution["id"])["status"] == "succeeded"


def test_least_loaded_waiting_agent_gets_the_work(fleet: Orchestrator) -> None:
    tag = uuid.uuid4().hex[:6]
    busy = SimAgent(fleet, f"{tag}-busy", capacity=2)
    idle = SimAgent(fleet, f"{tag}-idle", capacity=2)
    name = one_step(fleet, tag, "balance")
    fleet.run(name)
    held = busy.poll()  # busy now runs one of its two slots
    assert held is not None
    for _ in range(3):
        got: dict[str, Any] = {}

        def wait(agent: SimAgent, got: dict[str, Any] = got) -> None:
            got[agent.id] = agent.poll(wait=1.5)  # shorter than the preference (2 s)

        threads = [threading.Thread(target=wait, args=(a,)) for a in (busy, idle)]
        for thread in threads:
            thread.start()
        time.sleep(0.4)  # both are waiting in their long polls
        fleet.run(name)
        for thread in threads:
            thread.join()
        assert got[busy.id] is None
        assert got[idle.id] is not None
        idle.report(got[idle.id], output={})
    busy.report(held, output={})


def test_round_robin_takes_waiting_agents_in_turn(fleet: Orchestrator) -> None:
    tag = uuid.uuid4().hex[:6]
    agents = [SimAgent(fleet, f"{tag}-{i}") for i in range(3)]
    name = one_step(fleet, tag, "rr", agents_extra=", strategy: round_robin")
    takers = []
    for _ in range(3):
        got: dict[str, Any] = {}

        def wait(agent: SimAgent, got: dict[str, Any] = got) -> None:
            got[agent.id] = agent.poll(wait=1.5)  # shorter than the preference (2 s)

        threads = [threading.Thread(target=wait, args=(a,)) for a in agents]
        for thread in threads:
            thread.start()
        time.sleep(0.4)  # all are waiting in their long polls
        fleet.run(name)
        # the chosen agent takes it at once; the others find nothing until their wait ends
        for thread in threads:
            thread.join()
        taker = next(a for a in agents if got.get(a.id))
        takers.append(taker.id)
        taker.report(got[taker.id], output={})
    assert sorted(takers) == sorted(a.id for a in agents)


def test_figures_over_the_limits_degrade_an_agent(fleet: Orchestrator) -> None:
    agent = SimAgent(fleet, unique("hot"))
    assert beat(agent, system={"cpu_percent": 12.5, "memory_percent": 40}).status_code == 200
    assert until(lambda: agent_status(fleet, agent)["status"] == "online")
    assert beat(agent, system={"cpu_percent": 99, "disk_percent": 10}).status_code == 200
    view = until(lambda: (v := agent_status(fleet, agent))["status"] == "degraded" and v)
    assert view["facts"]["degraded_because"] == "cpu_percent 99 >= 95"
    assert view["health"] == "degraded"


@pytest.mark.parametrize(
    "fields",
    [
        {"system": {"cpu_percent": 250}},
        {"system": {"memory_percent": -1}},
        {"system": {"load": [1, 2, 3, 4]}},
        {"system": {"temperature": 30}},
        {"capacity": 0},
        {"capacity": "8"},
        {"labels": {"a": 1}},
        {"heartbeat_interval": 0},
        {"running": "ins_1"},
        {"hostname": "bad\nname"},
        {"timestamp": "2001-01-01T00:00:00Z"},
        {"timestamp": "2999-01-01T00:00:00Z"},
    ],
)
def test_absurd_heartbeats_are_refused_and_change_nothing(
    fleet: Orchestrator, fields: dict[str, Any]
) -> None:
    agent = SimAgent(fleet, unique("absurd"))
    before = agent_status(fleet, agent)
    answer = beat(agent, **fields)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_input"
    time.sleep(0.15)
    assert agent_status(fleet, agent)["last_heartbeat_at"] == before["last_heartbeat_at"]


def test_a_flooding_agent_is_rate_limited_without_affecting_others(fleet: Orchestrator) -> None:
    flood = SimAgent(fleet, unique("flood"))
    calm = SimAgent(fleet, unique("calm"))
    answers = [beat(flood).status_code for _ in range(10)]
    assert 429 in answers
    limited = next(r for r in (beat(flood) for _ in range(3)) if r.status_code == 429)
    assert limited.headers["Retry-After"] == "1"
    assert limited.json()["error"]["code"] == "rate_limited"
    assert beat(calm).status_code == 200


def test_the_agent_limit_refuses_polls_but_never_a_result(tmp_path: Path) -> None:
    """Official agents never retry a result: a 429 on it would lose it."""
    limit = {"agent_rate_limit": "3/second"}
    with fresh_database("sqlite", tmp_path) as url, serve(url, tmp_path, **limit) as orch:
        tag = unique("limited")
        agent = SimAgent(orch, f"{tag}-0")
        execution = orch.run(one_step(orch, tag, "limited"))
        instruction = agent.poll(wait=5)
        assert instruction is not None
        polls = [agent.client.get(f"/agents/v1/{agent.id}/instructions?wait=0") for _ in range(5)]
        limited = next(p for p in polls if p.status_code == 429)
        assert limited.json()["error"]["code"] == "rate_limited"
        answer = agent.report(instruction, output={"ok": True})
        assert answer.status_code == 200, answer.text
        assert orch.wait_for(execution["id"])["status"] == "succeeded"


def test_a_dead_agent_that_heartbeats_while_busy_loses_its_work_to_another(
    fleet: Orchestrator,
) -> None:
    tag = uuid.uuid4().hex[:6]
    dying = SimAgent(fleet, f"{tag}-dying")
    heir = SimAgent(fleet, f"{tag}-heir")
    name = one_step(fleet, tag, "dead", step="{name: only, plugin: echo, timeout: 10m}")
    execution = fleet.run(name)
    instruction = dying.poll()
    assert instruction is not None
    dying.client.put(
        f"/agents/v1/{dying.id}/instructions/{instruction['id']}", json={"status": "executing"}
    )
    assert beat(dying, running=[instruction["id"]], heartbeat_interval=1).status_code == 200
    started = time.monotonic()
    # silence: after 1.5 intervals it is offline and its work goes to the heir
    again = heir.poll(wait=10)
    assert again is not None, "the work did not move to the other agent"
    assert time.monotonic() - started < 5
    assert again["attempt"] == 2 and again["id"] != instruction["id"]
    assert agent_status(fleet, dying)["status"] == "offline"
    late = dying.report(instruction, output={"late": True})
    assert late.status_code == 409
    assert heir.report(again, output={"ok": True}).status_code == 200
    done = fleet.execution(execution["id"])
    assert done["status"] == "succeeded"
    assert done["steps"][0]["result"] == {"ok": True}
    assert done["steps"][0]["attempts"] == 2


def test_an_official_agent_silent_while_executing_keeps_its_lease(fleet: Orchestrator) -> None:
    tag = uuid.uuid4().hex[:6]
    official = SimAgent(fleet, f"{tag}-go")
    other = SimAgent(fleet, f"{tag}-other")
    name = one_step(fleet, tag, "silent", step="{name: only, plugin: echo, timeout: 10m}")
    execution = fleet.run(name)
    assert beat(official, heartbeat_interval=1).status_code == 200  # no `running`: official
    instruction = official.poll()
    assert instruction is not None
    official.client.put(
        f"/agents/v1/{official.id}/instructions/{instruction['id']}", json={"status": "executing"}
    )
    assert other.poll(wait=3) is None  # 3 s of silence: nothing moved
    assert official.report(instruction, output={"ok": 1}).status_code == 200
    assert fleet.execution(execution["id"])["status"] == "succeeded"


def test_an_official_agent_polling_again_hands_back_what_it_never_got(
    fleet: Orchestrator,
) -> None:
    tag = uuid.uuid4().hex[:6]
    agent = SimAgent(fleet, f"{tag}-go")
    name = one_step(fleet, tag, "lost", step="{name: only, plugin: echo, timeout: 10m}")
    execution = fleet.run(name)
    lost = agent.poll()  # its answer "never arrived"
    assert lost is not None
    time.sleep(1.2)  # past the unreported grace
    again = agent.poll()  # an official agent polls only when it runs nothing
    assert again is not None and again["attempt"] == 2
    assert agent.report(lost, output={}).status_code == 409
    assert agent.report(again, output={}).status_code == 200
    assert fleet.execution(execution["id"])["status"] == "succeeded"


def test_a_step_no_agent_can_take_fails_after_the_configured_wait(fleet: Orchestrator) -> None:
    name = unique("nobody")
    fleet.apply(
        f"""
name: {name}
agents: {{single_agent: no-such-agent-{uuid.uuid4().hex[:6]}}}
actions:
  steps:
    - {{name: only, plugin: echo, error_handling: {{max_retries: 5}}}}
"""
    )
    execution = fleet.run(name)
    done = fleet.wait_for(execution["id"], timeout=10)
    assert done["status"] == "failed"
    assert done["steps"][0]["error"] == "no eligible agent for 1s"
    assert done["steps"][0]["attempts"] == 1  # not retried: no agent would come


def test_an_action_step_that_selects_only_a_sensor_says_so(fleet: Orchestrator) -> None:
    sensor_name = unique("sensor")
    sensor = SimAgent(fleet, sensor_name, type="sensor")
    assert beat(sensor).is_success
    name = unique("on-sensor")
    fleet.apply(
        f"name: {name}\nagents: {{single_agent: {sensor_name}}}\n"
        "actions: {steps: [{name: only, plugin: echo}]}\n"
    )
    done = fleet.wait_for(fleet.run(name)["id"], timeout=10)
    assert done["steps"][0]["error"] == (
        f"no eligible agent for 1s: the agents it selects ({sensor_name}) are not action "
        "agents, and its stage's steps run on action agents only"
    )


def test_a_poll_held_across_a_drain_hands_out_nothing(fleet: Orchestrator) -> None:
    tag = uuid.uuid4().hex[:6]
    agent = SimAgent(fleet, f"{tag}-held")
    name = one_step(fleet, tag, "held")
    got: dict[str, Any] = {}
    poll = threading.Thread(target=lambda: got.__setitem__("answer", agent.poll(wait=3)))
    poll.start()
    time.sleep(0.5)  # the poll is waiting
    assert fleet.api.post(f"/api/v1/agents/{agent.id}/drain").status_code == 200
    execution = fleet.run(name)
    poll.join()
    assert got["answer"] is None
    step = fleet.execution(execution["id"])["steps"][0]
    # never handed out (on this short-fused server it then fails as unroutable)
    assert step["agent_id"] is None and step["status"] in ("queued", "failed")


def test_when_most_of_the_fleet_falls_silent_at_once_no_work_is_taken_back(
    backend: str, tmp_path: Any
) -> None:
    with (
        fresh_database(backend, tmp_path) as url,
        serve(url, tmp_path, mass_death_min_agents=3, lease_grace=30) as orch,
    ):
        tag = uuid.uuid4().hex[:6]
        crowd = [SimAgent(orch, f"{tag}-{i}") for i in range(4)]
        name = one_step(orch, tag, "crowd", step="{name: only, plugin: echo, timeout: 10m}")
        execution = orch.run(name)
        holder = next(a for a in crowd if (held := a.poll()) is not None)
        for agent in crowd:
            running = [held["id"]] if agent is holder else []
            assert beat(agent, running=running, heartbeat_interval=1).status_code == 200
        time.sleep(3)  # everyone silent past 1.5 intervals: the server, not them, is suspect
        step = orch.execution(execution["id"])["steps"][0]
        assert (step["status"], step["attempts"], step["agent_id"]) == ("running", 1, holder.id)
        assert holder.report(held, output={}).status_code == 200


def test_the_mass_silence_guard_only_holds_back_for_a_while(backend: str, tmp_path: Any) -> None:
    with (
        fresh_database(backend, tmp_path) as url,
        serve(url, tmp_path, mass_death_min_agents=3, mass_death_hold=1, lease_grace=30) as orch,
    ):
        tag = uuid.uuid4().hex[:6]
        crowd = [SimAgent(orch, f"{tag}-{i}") for i in range(4)]
        name = one_step(orch, tag, "hold", step="{name: only, plugin: echo, timeout: 10m}")
        execution = orch.run(name)
        holder = next(a for a in crowd if (held := a.poll()) is not None)
        for agent in crowd:
            running = [held["id"]] if agent is holder else []
            assert beat(agent, running=running, heartbeat_interval=1).status_code == 200
        # silent 1.5 s: held back; silent past that plus the 1 s hold: dead after all
        step = until(
            lambda: (s := orch.execution(execution["id"])["steps"][0])["attempts"] == 2 and s,
            within=8,
        )
        assert step and step["status"] == "queued"
        assert holder.report(held, output={}).status_code == 409


def test_a_server_restart_does_not_make_its_agents_look_dead(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The server was down longer than the agent's deadline: the agent was silent only
    because nobody listened. It keeps its work and its result is taken when it reports."""
    tmp = tmp_path_factory.mktemp(f"restart-{backend}")
    tag = uuid.uuid4().hex[:6]
    with fresh_database(backend, tmp) as url:
        with serve(url, tmp / "one") as first:
            agent_id, key = first.create_agent(f"{tag}-busy")
            name = one_step(first, tag, "restart", step="{name: only, plugin: echo, timeout: 10m}")
            execution = first.run(name)
            agent = first.agent_client(key)
            base = f"/agents/v1/{agent_id}"
            instruction = agent.get(f"{base}/instructions").json()["instruction"]
            assert instruction is not None
            assert agent.put(
                f"{base}/instructions/{instruction['id']}", json={"status": "executing"}
            ).is_success
            beat = {"timestamp": now(), "running": [instruction["id"]], "heartbeat_interval": 1}
            assert agent.post(f"{base}/heartbeat", json=beat).is_success
            time.sleep(0.3)  # the beat is flushed: its deadlines are in the database
        time.sleep(3)  # down twice as long as the agent's window (1.5 x 1 s) and more
        with serve(url, tmp / "one") as second:  # the same server, restarted
            assert second.api.get("/healthz").status_code == 200  # the admin client comes first
            agent = second.agent_client(key)
            report = {"status": "completed", "result": {"ok": True}}
            answer = agent.post(f"{base}/instructions/{instruction['id']}/result", json=report)
            assert answer.status_code == 200, answer.text
            done = second.wait_for(execution["id"])
            assert done["status"] == "succeeded"
            assert done["steps"][0]["attempts"] == 1
