"""Registry plugins run by an official agent (AGENT_API.md), end to end: a real server
refusing unregistered plugins, plugins published from real git repositories, and
tests/official_agent.py, a process speaking exactly the official agents' protocol. The
server hands it `plugin_install` before the step, the agent clones, then runs the step;
an `--input` plugin and a flags plugin both work; an installed plugin is not installed
again; an install that cannot clone fails the step with the install's error."""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import Process, Processes, Stack, base_env, wait_until, workflow
from tests.harness import fresh_database
from tests.plugin_fixtures import git, git_repo, make_plugin

pytestmark = pytest.mark.e2e


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is under test is the agent; the server's side of installs runs
    on both databases in tests/integration/test_plugin_workflows.py."""
    with fresh_database("sqlite", tmp_path) as url:
        yield url


OFFICIAL_AGENT = Path(__file__).resolve().parents[1] / "official_agent.py"

# The official agent's convention: `--input <file>` holding input_data, context, variables.
INPUT_PLUGIN = """import argparse, json, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("--input", required=True)
args = parser.parse_args()
with open(args.input) as handle:
    data = json.load(handle)
json.dump(
    {
        "echo": data["input_data"],
        "keys": sorted(data),
        "step": data["context"].get("step"),
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
    },
    sys.stdout,
)
"""

# The newest plugins' convention: flags of their own and no --input (argparse exits 2).
FLAGS_PLUGIN = """import argparse, json, sys
parser = argparse.ArgumentParser()
parser.add_argument("--name", required=True)
parser.add_argument("--paths", nargs="+", default=[])
parser.add_argument("--dry-run", action="store_true")
args = parser.parse_args()
json.dump(
    {
        "status": "success",
        "data": {"name": args.name, "paths": args.paths, "dry_run": args.dry_run},
        "argv": sys.argv[1:],
    },
    sys.stdout,
)
"""


class RegistryStack(Stack):
    """An orchestrator that runs registry plugins only, publishable from `repos`."""

    def __init__(self, *args: Any, **extra_env: str) -> None:
        super().__init__(*args)
        self.repos = self.tmp / "repos"
        self.repos.mkdir()
        self.extra_env = extra_env

    def server_env(self) -> dict[str, str]:
        return {
            **super().server_env(),
            "STAVILY_UNREGISTERED_PLUGINS": "refuse",
            "STAVILY_PLUGIN_SOURCE_ROOTS": json.dumps([str(self.repos)]),
            **self.extra_env,
        }

    def publish_git(self, plugin_id: str, code: str, **manifest: Any) -> tuple[Path, str]:
        """A plugin in its own git repository, tagged v1.0.0 and published at that tag."""
        repo = make_plugin(self.repos / plugin_id, plugin_id, code=code, **manifest)
        commit = git_repo(repo, tag="v1.0.0")
        response = self.api.post("/api/v1/plugins", json={"source": str(repo), "ref": "v1.0.0"})
        assert response.status_code in (200, 201), response.text
        assert response.json()["source"]["commit"] == commit, response.json()
        return repo, commit

    def start_official_agent(self, name: str, plugins: Path) -> tuple[str, Process]:
        agent_id, key = self.create_agent(name)
        args = [
            sys.executable,
            str(OFFICIAL_AGENT),
            "--url",
            self.url,
            "--agent-id",
            agent_id,
            "--token",
            key,
            "--plugins-dir",
            str(plugins),
            "--poll-interval",
            "0.2",
            "--heartbeat-interval",
            "10",
        ]
        return agent_id, self.processes.start("official-agent", args, base_env())

    def actions(self, agent_id: str) -> list[str]:
        return [r["action"] for r in self.audit(agent_id)]


@pytest.fixture
def stack(database_url: str, processes: Processes, tmp_path: Path) -> Iterator[RegistryStack]:
    """conftest's stack, refusing unregistered plugins; a step with no eligible agent left
    fails after 1 s (so a failed install fails its step fast)."""
    running = RegistryStack(processes, tmp_path, database_url, STAVILY_UNROUTABLE_AFTER="1")
    try:
        running.start_server()
        yield running
    finally:
        running.close()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _handed(agent: Process) -> list[str]:
    """The instruction types the agent was handed, in order (from its own log)."""
    return [
        line.split(": ", 2)[2].split()[0]
        for line in agent.stdout().splitlines()
        if ": instruction " in line
    ]


def test_an_input_plugin_is_installed_from_git_then_run(
    stack: RegistryStack, tmp_path: Path
) -> None:
    plugin_id = _name("echo-input")
    settings = {"message": {"type": "string"}, "count": {"type": "integer"}}
    _, commit = stack.publish_git(plugin_id, INPUT_PLUGIN, configuration=settings)
    plugins = tmp_path / "plugins"
    agent_name = _name("official")
    agent_id, agent = stack.start_official_agent(agent_name, plugins)
    name = _name("input-wf")
    config = {"message": "hi", "count": 2}
    stack.apply(
        workflow(name, agent_name, [{"name": "echo", "plugin": plugin_id, "config": config}])
    )

    done = stack.wait_finished(stack.run(name)["id"], timeout=8)

    step = done["steps"][0]
    assert (done["status"], step["status"]) == ("succeeded", "succeeded"), done
    assert step["agent_id"] == agent_id, step
    folder = plugins / plugin_id
    assert step["result"] == {
        "echo": config,
        "keys": ["context", "input_data", "variables"],
        "step": "echo",
        "argv": ["--input", str(folder / "input.json")],
        "cwd": str(folder),
    }, step
    # The install came first, and cloned the published commit into the plugin's folder.
    assert _handed(agent) == ["plugin_install", "execute"], agent.stdout()
    assert git(folder, "rev-parse", "HEAD") == commit
    actions = stack.actions(agent_id)
    assert actions.count("plugin.install_started") == 1, actions
    assert "plugin.installed" in actions, actions


def test_a_flags_plugin_gets_its_flags_and_no_input(stack: RegistryStack, tmp_path: Path) -> None:
    plugin_id = _name("flags")
    settings = {
        "name": {"type": "string", "required": True},
        "paths": {"type": "array", "items": {"type": "string"}},
        "dry_run": {"type": "boolean"},
    }
    stack.publish_git(plugin_id, FLAGS_PLUGIN, protocol="flags", configuration=settings)
    agent_name = _name("official")
    _, agent = stack.start_official_agent(agent_name, tmp_path / "plugins")
    name = _name("flags-wf")
    config = {"name": "web", "paths": ["/a", "/b c"], "dry_run": True}
    stack.apply(
        workflow(name, agent_name, [{"name": "flags", "plugin": plugin_id, "config": config}])
    )

    done = stack.wait_finished(stack.run(name)["id"], timeout=8)

    step = done["steps"][0]
    assert step["status"] == "succeeded", step
    assert step["result"]["data"] == {"name": "web", "paths": ["/a", "/b c"], "dry_run": True}
    assert step["result"]["status"] == "success"
    assert "--input" not in step["result"]["argv"], step
    assert _handed(agent) == ["plugin_install", "execute"], agent.stdout()


def test_a_second_run_does_not_install_again(stack: RegistryStack, tmp_path: Path) -> None:
    plugin_id = _name("echo-twice")
    stack.publish_git(plugin_id, INPUT_PLUGIN)
    agent_name = _name("official")
    agent_id, agent = stack.start_official_agent(agent_name, tmp_path / "plugins")
    name = _name("twice-wf")
    stack.apply(
        workflow(name, agent_name, [{"name": "echo", "plugin": plugin_id, "config": {"n": 1}}])
    )

    for n in (1, 2):
        done = stack.wait_finished(stack.run(name)["id"], timeout=8)
        assert done["status"] == "succeeded", (n, done)
        assert done["steps"][0]["result"]["echo"] == {"n": 1}, (n, done)

    assert _handed(agent) == ["plugin_install", "execute", "execute"], agent.stdout()
    actions = stack.actions(agent_id)
    assert actions.count("plugin.install_started") == 1, actions
    assert actions.count("plugin.installed") == 1, actions
    # A graceful stop while idle: one last heartbeat says offline.
    assert stack.processes.stop(agent) == 0
    wait_until(lambda: stack.agent(agent_id)["status"] == "offline", 3, "the agent offline")


def test_an_install_that_cannot_clone_fails_the_step_with_its_error(
    stack: RegistryStack, tmp_path: Path
) -> None:
    plugin_id = _name("vanished")
    repo, _ = stack.publish_git(plugin_id, INPUT_PLUGIN)
    shutil.rmtree(repo)  # gone before the agent ever polls
    agent_name = _name("official")
    agent_id, agent = stack.start_official_agent(agent_name, tmp_path / "plugins")
    name = _name("vanished-wf")
    stack.apply(
        workflow(name, agent_name, [{"name": "echo", "plugin": plugin_id, "config": {"n": 1}}])
    )

    done = stack.wait_finished(stack.run(name)["id"], timeout=8)

    step = done["steps"][0]
    assert (done["status"], step["status"]) == ("failed", "failed"), done
    assert f"plugin {plugin_id} 1.0.0 could not be installed" in step["error"], step
    assert "git clone failed" in step["error"], step
    assert str(repo) in step["error"], step  # git's own words name the missing repository
    assert _handed(agent) == ["plugin_install"], agent.stdout()
    assert not (tmp_path / "plugins" / plugin_id).exists()
    actions = stack.actions(agent_id)
    assert actions.count("plugin.install_started") == 1, actions
    assert "plugin.install_failed" in actions, actions


def _versioned(version: str) -> str:
    return (
        "import json, sys\n"
        f"json.dump({{'version': {version!r}, 'argv': sys.argv[1:]}}, sys.stdout)\n"
    )


def test_a_newer_version_is_installed_as_an_update_replacing_the_old(
    stack: RegistryStack, tmp_path: Path
) -> None:
    plugin_id = _name("updated")
    repo, _ = stack.publish_git(plugin_id, _versioned("1.0.0"), protocol="input")
    plugins = tmp_path / "plugins"
    agent_name = _name("official")
    agent_id, agent = stack.start_official_agent(agent_name, plugins)
    name = _name("update-wf")
    definition = workflow(name, agent_name, [{"name": "v", "plugin": plugin_id}])
    assert stack.apply(definition)["plugins"]["v"]["version"] == "1.0.0"
    done = stack.wait_finished(stack.run(name)["id"], timeout=8)
    # no config: empty input_data, so no --input either
    assert done["steps"][0]["result"] == {"version": "1.0.0", "argv": []}, done

    # 1.1.0: a new commit and tag in the same repository, published, and the workflow
    # applied again (so pinned to it).
    make_plugin(repo, plugin_id, version="1.1.0", code=_versioned("1.1.0"), protocol="input")
    git(repo, "commit", "-qam", "1.1.0")
    git(repo, "tag", "v1.1.0")
    response = stack.api.post("/api/v1/plugins", json={"source": str(repo), "ref": "v1.1.0"})
    assert response.status_code in (200, 201), response.text
    assert stack.apply(definition)["plugins"]["v"]["version"] == "1.1.0"
    done = stack.wait_finished(stack.run(name)["id"], timeout=8)

    assert done["steps"][0]["result"] == {"version": "1.1.0", "argv": []}, done
    assert _handed(agent) == ["plugin_install", "execute", "plugin_update", "execute"], (
        agent.stdout()
    )
    assert git(plugins / plugin_id, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")
    assert stack.actions(agent_id).count("plugin.installed") == 2


# Sleeps on its first run (the marker file not there yet), answers at once on the next.
SLOW_ONCE_PLUGIN = """import argparse, json, os, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--input", required=True)
with open(parser.parse_args().input) as handle:
    marker = json.load(handle)["input_data"]["marker"]
if not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(8)
json.dump({"done": True}, sys.stdout)
"""


def test_an_official_agent_killed_mid_step_the_step_succeeds_on_another(
    processes: Processes, database_url: str, tmp_path: Path
) -> None:
    """Killed (SIGKILL) while its plugin runs, an official agent just goes silent: with
    default error handling the step runs again on the other official agent once the
    step's timeout and the grace have passed, and succeeds there."""
    stack = RegistryStack(processes, tmp_path, database_url, STAVILY_LEASE_GRACE="1")
    try:
        stack.start_server()
        plugin_id = _name("slow-once")
        stack.publish_git(plugin_id, SLOW_ONCE_PLUGIN, configuration={"marker": {"type": "string"}})
        prefix = _name("official")
        started = {
            agent_id: agent
            for agent_id, agent in (
                stack.start_official_agent(f"{prefix}-{n}", tmp_path / f"plugins-{n}")
                for n in (1, 2)
            )
        }
        marker = tmp_path / "first-run-started"
        name = _name("killed-wf")
        stack.apply(
            {
                "name": name,
                "agents": {"pools": [{"pool_name": "both", "agent_regex": f"{prefix}-.*"}]},
                "actions": {
                    "steps": [
                        {
                            "name": "slow",
                            "plugin": plugin_id,
                            "timeout": "3s",
                            "config": {"marker": str(marker)},
                        }
                    ]
                },
            }
        )
        execution = stack.run(name)
        wait_until(marker.exists, 15, "the plugin running on the first agent")
        first = stack.step(execution["id"], "slow")
        holder = first["agent_id"]
        stack.processes.kill(started[holder])
        killed = time.monotonic()

        done = stack.wait_finished(execution["id"], timeout=15)

        waited = time.monotonic() - killed
        step = done["steps"][0]
        assert (done["status"], step["status"]) == ("succeeded", "succeeded"), done
        assert step["agent_id"] != holder and step["agent_id"] in started, step
        assert step["attempts"] == 2 and step["result"] == {"done": True}, step
        assert waited < 3 + 1 + 4, waited  # timeout, grace, then reaper, install and poll
        [expired] = [
            r for r in stack.audit(first["instruction_id"]) if r["action"] == "instruction.expired"
        ]
        assert expired["details"]["reason"] == (
            "agent lost: it went silent while running the step (no result within its 3s "
            "timeout and 1s of grace)"
        ), expired
    finally:
        stack.close()
