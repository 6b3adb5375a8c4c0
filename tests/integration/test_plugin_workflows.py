"""Workflows on registry plugins, on each database, with agents that speak exactly the
official agents' protocol (no query strings): a step's plugin is pinned when it is
applied and its config checked against the manifest; its instruction is built from the
manifest (entry point, flags, time limit, input only); an official agent lacking the
version is handed `plugin_install` first, a failed install fails over or fails the
step with the install's error; rollouts install a version on a set of agents."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Orchestrator, SimAgent, fresh_database, serve
from tests.plugin_fixtures import ECHO, git_repo, make_plugin, published, unique

SETTINGS = {
    "string_setting": {"type": "string", "required": True},
    "count": {"type": "integer", "minimum": 1, "maximum": 10},
    "mode": {"type": "string", "enum": ["fast", "safe"]},
    "paths": {"type": "array", "items": {"type": "string"}},
    "verbose": {"type": "boolean"},
}


@pytest.fixture(scope="module")
def orch(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp(f"pinned-{backend}")
    with (
        fresh_database(backend, tmp) as url,
        serve(
            url,
            tmp / "data",
            unregistered_plugins="refuse",
            plugin_source_roots=[tmp],
            unroutable_after=0.3,
        ) as running,
    ):
        yield running


def _root(orch: Orchestrator) -> Path:
    return Path(orch.settings.plugin_source_roots[0])


def _git_plugin(
    orch: Orchestrator, plugin_id: str, version: str = "1.0.0", **manifest: Any
) -> dict[str, Any]:
    """A plugin published from its git repository (official agents install from git)."""
    repo = make_plugin(
        _root(orch) / f"{plugin_id}-{version}", plugin_id, version=version, **manifest
    )
    git_repo(repo, tag=f"v{version}")
    response = orch.api.post("/api/v1/plugins", json={"source": str(repo), "ref": f"v{version}"})
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def _apply(orch: Orchestrator, source: str) -> httpx.Response:
    return orch.api.post(
        "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
    )


def _workflow(name: str, plugin: str, extra: str = "", config: str = "{}") -> str:
    return f"""
name: {name}
actions:
  steps:
    - name: only
      plugin: {plugin}
      config: {config}
{extra}"""


def _problems(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {p["path"]: p["message"] for p in response.json()["error"]["details"]}


def _official(orch: Orchestrator, **fields: Any) -> SimAgent:
    return SimAgent(orch, unique("official"), **fields)


def _until(poll: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = poll()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


# -- apply: pinned and checked ----------------------------------------------------------------


def test_a_step_is_pinned_to_the_version_its_range_allows_when_applied(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("ranged")
    for version in ("1.0.0", "1.2.0", "1.3.0-beta.1", "2.0.0"):
        published(orch.api, make_plugin(tmp_path / version, plugin_id, version=version))
    name = unique("pin")
    cases = {'"^1.0"': "1.2.0", '"~1.0.0"': "1.0.0", "latest": "2.0.0", '">=1.0.0 <2.0.0"': "1.2.0"}
    for wanted, chosen in cases.items():
        applied = _apply(orch, _workflow(name, plugin_id, f"      version: {wanted}"))
        assert applied.status_code in (200, 201), applied.text
        assert applied.json()["plugins"]["only"]["version"] == chosen
    # The pin holds: 1.2.1 published later changes nothing until the workflow is applied again.
    source = _workflow(name, plugin_id, '      version: "^1.0"')
    assert _apply(orch, source).json()["plugins"]["only"]["version"] == "1.2.0"
    published(orch.api, make_plugin(tmp_path / "1.2.1", plugin_id, version="1.2.1"))
    agent = SimAgent(orch)
    run = orch.run(name)
    instruction = _until(lambda: agent.poll(slots=1))
    assert instruction["plugin_configuration"]["plugin_version"] == "1.2.0"
    agent.report(instruction, output={})
    again = _apply(orch, source)
    assert (again.status_code, again.json()["plugins"]["only"]["version"]) == (201, "1.2.1")
    assert orch.wait_for(run["id"])["status"] == "succeeded"


def test_unknown_plugins_unsatisfiable_ranges_and_yanked_versions_are_refused(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("known")
    published(orch.api, make_plugin(tmp_path / "a", plugin_id, version="1.0.0"))
    published(orch.api, make_plugin(tmp_path / "b", plugin_id, version="1.1.0"))
    orch.api.post(f"/api/v1/plugins/{plugin_id}/versions/1.1.0/yank")
    name = unique("refused")
    problems = _problems(_apply(orch, _workflow(name, plugin_id[:-1] + "x")))
    assert "the registry has no plugin" in problems["actions.steps[0].plugin"]
    assert f"did you mean `{plugin_id}`" in problems["actions.steps[0].plugin"]
    problems = _problems(_apply(orch, _workflow(name, plugin_id, '      version: "^2"')))
    assert "published 1.0.0, 1.1.0 (yanked)" in problems["actions.steps[0].version"]
    problems = _problems(_apply(orch, _workflow(name, f"{plugin_id}-v1.1.0")))
    assert "no usable version" in problems["actions.steps[0].plugin"]
    problems = _problems(_apply(orch, _workflow(name, plugin_id, '      version: "one"')))
    assert "not a version or range" in problems["actions.steps[0].version"]
    assert orch.api.get(f"/api/v1/workflows/{name}").status_code == 404  # nothing written


def test_a_steps_config_is_checked_against_the_plugins_schema_at_apply(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("schema")
    published(orch.api, make_plugin(tmp_path / "p", plugin_id, configuration=SETTINGS))
    config = '{count: 11, mode: slow, paths: [a, 3], verbose: "yes", strng_setting: x}'
    problems = _problems(_apply(orch, _workflow(unique("cfg"), plugin_id, config=config)))
    base = "actions.steps[0].config"
    assert problems == {
        f"{base}.string_setting": "required by the plugin",
        f"{base}.count": "must be at most 10",
        f"{base}.mode": "must be one of 'fast', 'safe'",
        f"{base}.paths[1]": "must be of type string",
        f"{base}.verbose": "must be of type boolean",
        f"{base}.strng_setting": "the plugin has no setting 'strng_setting': did you mean "
        "`string_setting`?",
    }
    # templates are checked when they are rendered, not at apply
    fine = '{string_setting: x, count: "{{ inputs.n }}", mode: fast}'
    applied = _apply(orch, _workflow(unique("cfg"), plugin_id, config=fine))
    assert applied.status_code == 201, applied.text
    dry = orch.api.post(
        "/api/v1/workflows/validate",
        content=_workflow(unique("cfg"), plugin_id, config=config),
        headers={"Content-Type": "application/yaml"},
    )
    assert dry.status_code == 422


# -- the instruction: built from the manifest --------------------------------------------------


def test_an_input_plugins_instruction_holds_only_what_the_user_wrote(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("input")
    version = published(
        orch.api,
        make_plugin(tmp_path / "p", plugin_id, entry="run.py", limits={"execution_time": "45s"}),
    )
    name = unique("input-wf")
    applied = _apply(orch, _workflow(name, plugin_id, config="{message: hi, count: 2}"))
    assert applied.status_code == 201, applied.text
    agent = SimAgent(orch)
    run = orch.run(name)
    # an agent of ours (it polls with a query string): it installs from the registry itself
    instruction = _until(lambda: agent.poll(slots=1))
    assert instruction["plugin_configuration"] == {
        "entrypoint": "run.py",
        "plugin_version": "1.0.0",
        "sha256": version["sha256"],
        "protocol": "input",
    }
    assert instruction["input_data"] == {"message": "hi", "count": 2}
    assert instruction["timeout_seconds"] == 45  # limits.execution_time
    assert "config" not in instruction["context"]
    agent.report(instruction, output={"ok": True})
    assert orch.wait_for(run["id"])["status"] == "succeeded"


def test_a_flags_plugin_gets_arguments_and_no_input(orch: Orchestrator, tmp_path: Path) -> None:
    plugin_id = unique("flags")
    settings = {
        "cpu_trigger_percentage": {"type": "number"},
        "paths": {"type": "array"},
        "dry_run": {"type": "boolean"},
        "quiet": {"type": "boolean"},
        "operation": {"type": "string", "flag": "--op"},
    }
    published(
        orch.api,
        make_plugin(tmp_path / "p", plugin_id, protocol="flags", configuration=settings),
    )
    name = unique("flags-wf")
    config = (
        "{cpu_trigger_percentage: 90.5, paths: [/a, /b], dry_run: true, quiet: false, "
        "operation: copy}"
    )
    _apply(orch, _workflow(name, plugin_id, "      timeout: 20s", config=config))
    agent = SimAgent(orch)
    orch.run(name)
    instruction = _until(lambda: agent.poll(slots=1))
    assert instruction["input_data"] == {}  # so the official agent passes no --input
    assert instruction["context"] == {}  # nor one that passes it for a context
    assert instruction["plugin_configuration"]["arguments"] == [
        "--cpu-trigger-percentage",
        "90.5",
        "--paths",
        "/a",
        "/b",
        "--dry-run",
        "--op",
        "copy",
    ]
    # the config itself, for our agent's socket (get_config); the plugin never reads it
    assert instruction["plugin_configuration"]["config"] == {
        "cpu_trigger_percentage": 90.5,
        "paths": ["/a", "/b"],
        "dry_run": True,
        "quiet": False,
        "operation": "copy",
    }
    assert instruction["timeout_seconds"] == 20  # the step's own timeout wins
    # a retry keeps the config: its arguments are the same
    agent.report(instruction, "failed", error="exit status 1")


# -- official agents: the install first --------------------------------------------------------


def _install_result(agent: SimAgent, instruction: dict[str, Any], ok: bool = True) -> None:
    base = f"/agents/v1/{agent.id}/instructions/{instruction['id']}"
    progress = agent.client.put(base, json={"status": "executing", "execution_log": ["clone"]})
    assert progress.status_code == 200, progress.text
    body: dict[str, Any] = (
        {
            "status": "completed",
            "result": {"install_result": {"installed_path": "/x", "logs": [], "duration": 0.1}},
        }
        if ok
        else {"status": "failed", "error_message": "git clone failed: no route to host"}
    )
    answer = agent.client.post(f"{base}/result", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"acknowledged": True, "next_instruction": None}


def test_an_official_agent_installs_the_pinned_version_from_git_then_runs_the_step(
    orch: Orchestrator,
) -> None:
    plugin_id = unique("gitted")
    version = _git_plugin(orch, plugin_id)
    name = unique("install-wf")
    agent = _official(orch, labels={"pool": name})
    _apply(
        orch,
        _workflow(
            name, plugin_id, f"      agents: {{labels: {{pool: {name}}}}}", config="{message: hi}"
        ),
    )
    run = orch.run(name)
    install = _until(agent.poll)
    assert install["instruction_type"] == "plugin_install"
    assert install["plugin_id"] == plugin_id
    # the tag it was published from, and its commit; `version`, which official agents
    # ignore, for ours (`plugin_version` would be cloned as a branch)
    assert install["plugin_configuration"] == {
        "repository_url": version["source"]["repository_url"],
        "tag": "v1.0.0",
        "commit_hash": version["source"]["commit"],
        "version": "1.0.0",
        "sha256": version["sha256"],
    }
    assert install["input_data"] == {} and isinstance(install["timeout_seconds"], int)
    assert agent.poll() is None  # it polls again before reporting: nothing more meanwhile
    _install_result(agent, install)
    step = _until(agent.poll)
    assert step["instruction_type"] == "execute"
    assert step["plugin_configuration"]["entrypoint"] == "main.py"
    agent.report(step, output={"echo": {}})
    assert orch.wait_for(run["id"])["status"] == "succeeded"
    # installed now: the next run goes straight to the step
    run = orch.run(name)
    assert _until(agent.poll)["instruction_type"] == "execute"
    actions = [
        r["action"]
        for r in orch.api.get("/api/v1/audit", params={"subject_id": agent.id}).json()["records"]
    ]
    assert {"plugin.install_started", "plugin.installed"} <= set(actions)


def test_a_failed_install_fails_over_then_fails_the_step_with_its_error(
    orch: Orchestrator,
) -> None:
    plugin_id = unique("failing")
    _git_plugin(orch, plugin_id)
    name = unique("failover")
    first, second = _official(orch, labels={"pool": name}), _official(orch, labels={"pool": name})
    _apply(orch, _workflow(name, plugin_id, f"      agents: {{labels: {{pool: {name}}}}}"))
    run = orch.run(name)
    _install_result(first, _until(first.poll), ok=False)
    assert first.poll() is None  # not asked again
    install = _until(second.poll)  # the other eligible agent is
    assert install["instruction_type"] == "plugin_install"
    _install_result(second, install, ok=False)
    execution = orch.wait_for(run["id"], timeout=15)
    assert execution["status"] == "failed"
    error = execution["steps"][0]["error"]
    assert f"plugin {plugin_id} 1.0.0 could not be installed on any eligible agent" in error
    assert "git clone failed: no route to host" in error


def test_an_archive_published_version_is_never_sent_to_official_agents(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("archived")
    published(orch.api, make_plugin(tmp_path / "p", plugin_id))
    name = unique("archived-wf")
    agent = _official(orch, labels={"pool": name})
    _apply(orch, _workflow(name, plugin_id, f"      agents: {{labels: {{pool: {name}}}}}"))
    run = orch.run(name)
    assert agent.poll() is None
    execution = orch.wait_for(run["id"], timeout=15)
    assert execution["status"] == "failed"
    assert "official agents install only from git" in execution["steps"][0]["error"]


SOCKET_PLUGIN = """import argparse, json, os, socket
parser = argparse.ArgumentParser()
parser.add_argument("--name")
path = os.environ["STAVILY_AGENT_SOCKET"]
"""


@pytest.mark.parametrize(
    ("protocol", "code", "speaks"),
    [("stdin", ECHO, "stdin"), ("flags", SOCKET_PLUGIN, "flags and the agent's socket")],
)
def test_a_plugin_official_agents_cannot_run_is_never_sent_to_them(
    orch: Orchestrator, protocol: str, code: str, speaks: str
) -> None:
    """They hold no stdin conversation and serve no socket: neither the install nor the
    step goes to them, and with no reference agent eligible the step fails saying why.
    (A flags plugin without the socket runs on them: tests/e2e/test_official_agent_plugins.)"""
    plugin_id = unique(protocol)
    version = _git_plugin(orch, plugin_id, protocol=protocol, code=code)
    assert version["socket"] is (code is SOCKET_PLUGIN)
    name = unique(f"{protocol}-wf")
    official = _official(orch, labels={"pool": name})
    _apply(orch, _workflow(name, plugin_id, f"      agents: {{labels: {{pool: {name}}}}}"))
    run = orch.run(name)
    assert official.poll() is None
    execution = orch.wait_for(run["id"], timeout=15)
    assert execution["status"] == "failed"
    assert (
        f"plugin {plugin_id} speaks {speaks}, which the official agents cannot"
        in execution["steps"][0]["error"]
    )
    assert official.poll() is None
    # one of ours takes it
    ours = SimAgent(orch, unique("ours"), labels={"pool": name})
    orch.run(name)
    step = _until(lambda: ours.poll(slots=1))
    assert step["plugin_configuration"]["protocol"] == protocol
    ours.report(step, output={"ok": True})


def test_a_rollout_installs_a_version_on_the_selected_agents(orch: Orchestrator) -> None:
    plugin_id = unique("rolled")
    _git_plugin(orch, plugin_id)
    pool = unique("pool")
    chosen = [_official(orch, labels={"pool": pool}) for _ in range(2)]
    SimAgent(orch, labels={"pool": "other"})
    started = orch.api.post(
        f"/api/v1/plugins/{plugin_id}/rollouts",
        json={"version": "1.0.0", "selector": {"labels": {"pool": pool}}},
    )
    assert started.status_code == 201, started.text
    rollout = started.json()
    assert (rollout["total"], rollout["pending"], rollout["done"]) == (2, 2, False)
    assert {a["agent_id"] for a in rollout["agents"]} == {a.id for a in chosen}
    _install_result(chosen[0], _until(chosen[0].poll))
    _install_result(chosen[1], _until(chosen[1].poll), ok=False)
    view = orch.api.get(f"/api/v1/plugins/{plugin_id}/rollouts/{rollout['id']}").json()
    assert (view["installed"], view["failed"], view["pending"], view["done"]) == (1, 1, 0, True)
    failed = next(a for a in view["agents"] if a["status"] == "failed")
    assert failed["agent_id"] == chosen[1].id and "no route to host" in failed["error"]
    for body, status in (
        ({"version": "9.9.9"}, 404),
        ({"version": "1"}, 422),
        ({"version": "1.0.0", "selector": {"labels": "x"}}, 422),
    ):
        assert (
            orch.api.post(f"/api/v1/plugins/{plugin_id}/rollouts", json=body).status_code == status
        )
    assert orch.api.get(f"/api/v1/plugins/{plugin_id}/rollouts/rol_nope").status_code == 404


def test_what_each_agent_has_is_known_from_installs_and_our_heartbeats(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("known")
    version = published(orch.api, make_plugin(tmp_path / "p", plugin_id))
    ours = SimAgent(orch)
    said = {"id": plugin_id, "version": "1.0.0", "sha256": version["sha256"]}
    for _ in range(2):  # the same list again changes nothing
        beat = ours.client.post(
            f"/agents/v1/{ours.id}/heartbeat", json={"status": "online", "plugins": [said]}
        )
        assert beat.status_code == 200, beat.text
    has = orch.api.get(f"/api/v1/agents/{ours.id}/plugins").json()["plugins"]
    assert [(p["plugin_id"], p["version"], p["status"]) for p in has] == [
        (plugin_id, "1.0.0", "installed")
    ]
    ours.client.post(f"/agents/v1/{ours.id}/heartbeat", json={"status": "online", "plugins": []})
    assert orch.api.get(f"/api/v1/agents/{ours.id}/plugins").json()["plugins"] == []
    bad = ours.client.post(
        f"/agents/v1/{ours.id}/heartbeat",
        json={"status": "online", "plugins": [{**said, "sha256": "nope"}]},
    )
    assert bad.status_code == 422, bad.text
    assert orch.api.get("/api/v1/agents/agt_nope/plugins").status_code == 404


def test_a_waiting_agent_that_has_the_version_is_preferred(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("preferred")
    version = published(orch.api, make_plugin(tmp_path / "p", plugin_id))
    pool = unique("pool")
    # by name, the least loaded strategy would choose `a-...` first: `b-...` has the plugin
    lacking = SimAgent(orch, f"a-{pool}", labels={"pool": pool})
    having = SimAgent(orch, f"b-{pool}", labels={"pool": pool})
    said = {"id": plugin_id, "version": "1.0.0", "sha256": version["sha256"]}
    beat = having.client.post(
        f"/agents/v1/{having.id}/heartbeat", json={"status": "online", "plugins": [said]}
    )
    assert beat.status_code == 200, beat.text
    name = unique("preferred-wf")
    _apply(orch, _workflow(name, plugin_id, f"      agents: {{labels: {{pool: {pool}}}}}"))
    for _ in range(2):
        got: dict[str, Any] = {}

        def wait(agent: SimAgent, got: dict[str, Any] = got) -> None:
            got[agent.id] = agent.poll(wait=1.5)  # shorter than the preference (2 s)

        threads = [threading.Thread(target=wait, args=(a,)) for a in (lacking, having)]
        for thread in threads:
            thread.start()
        time.sleep(0.4)  # both are waiting in their long polls
        orch.run(name)
        for thread in threads:
            thread.join()
        assert got[lacking.id] is None
        assert got[having.id] is not None
        having.report(got[having.id], output={})
