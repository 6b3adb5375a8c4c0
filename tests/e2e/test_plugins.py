"""How the reference agent runs plugins (PLUGINS.md), seen through a real server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import Stack, process_alive, wait_until, workflow, write_plugin
from tests.harness import fresh_database

pytestmark = pytest.mark.e2e


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is under test is how the agent runs plugins; the server's side of it runs on
    both databases in the integration tests."""
    with fresh_database("sqlite", tmp_path) as url:
        yield url


# Starts a `sleep 30` child, writes both pids to `pidfile`, then sleeps 30 s itself.
HANGING_PLUGIN = """
child = subprocess.Popen(["sleep", "30"])
with open(config["pidfile"] + ".tmp", "w") as handle:
    json.dump({"plugin": os.getpid(), "child": child.pid}, handle)
os.rename(config["pidfile"] + ".tmp", config["pidfile"])
time.sleep(30)
json.dump({"finished": True}, sys.stdout)
"""

TEXT_OUTPUT = "plain text, not JSON\nsecond line"
TEXT_PLUGIN = f"""
print({TEXT_OUTPUT!r})
print("a warning on standard error", file=sys.stderr)
"""

INSPECT_PLUGIN = """
json.dump({"argv": sys.argv[1:], "input": data, "cwd": os.getcwd()}, sys.stdout)
"""

EXIT_PLUGIN = """
print("about to fail", file=sys.stderr)
json.dump({"partial": True}, sys.stdout)
sys.exit(3)
"""


def _agent(stack: Stack, plugins: Path, prefix: str) -> tuple[str, str]:
    agent_name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    agent_id, key = stack.create_agent(agent_name)
    stack.start_agent(agent_id, key, plugins)
    return agent_name, agent_id


def test_step_timeout_kills_the_plugin_and_its_children(stack: Stack, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "hang", HANGING_PLUGIN)
    pidfile = tmp_path / "hang.pids"
    agent_name, _ = _agent(stack, plugins, "timeout-agent")
    name = f"timeout-{uuid.uuid4().hex[:6]}"
    stack.apply(
        workflow(
            name,
            agent_name,
            [
                {
                    "name": "hang",
                    "plugin": "hang",
                    "timeout": "1s",
                    "config": {"pidfile": str(pidfile)},
                }
            ],
        )
    )
    started = time.monotonic()
    execution_id = stack.run(name)["id"]
    done = stack.wait_finished(execution_id, timeout=15)
    elapsed = time.monotonic() - started

    assert done["status"] == "failed", done
    step = done["steps"][0]
    assert step["status"] == "failed", step
    assert "timed out" in step["error"], step
    assert "timed out" in done["error"], done
    assert elapsed < 10, f"the 1 s timeout took {elapsed:.1f}s to fail the step"

    # The plugin ran (it wrote its pids), and neither it nor its `sleep 30` child survived.
    assert pidfile.exists(), "the plugin never started"
    pids = json.loads(pidfile.read_text())
    wait_until(
        lambda: not process_alive(pids["child"], ["sleep", "30"]),
        timeout=3,
        what="the plugin's `sleep 30` child to be killed",
    )
    wait_until(lambda: not process_alive(pids["plugin"]), timeout=3, what="the plugin to be killed")


def test_manifest_execution_time_limit_kills_the_plugin(stack: Stack, tmp_path: Path) -> None:
    """PLUGINS.md: the process group is killed at the instruction's timeout *or* the
    manifest's `limits.execution_time`, whichever is shorter."""
    plugins = tmp_path / "plugins"
    write_plugin(
        plugins,
        "overrun",
        """
time.sleep(4)
json.dump({"finished": True}, sys.stdout)
""",
        limits={"execution_time": "1s"},
    )
    agent_name, _ = _agent(stack, plugins, "limit-agent")
    name = f"limit-{uuid.uuid4().hex[:6]}"
    # No step timeout: the step's own limit is the default 300 s.
    stack.apply(workflow(name, agent_name, [{"name": "overrun", "plugin": "overrun"}]))
    done = stack.wait_finished(stack.run(name)["id"], timeout=15)
    step = done["steps"][0]
    assert step["status"] == "failed", step
    assert "timed out" in step["error"], step


def test_plugin_conventions_raw_output_exit_status_and_input_file(
    stack: Stack, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "text-out", TEXT_PLUGIN)
    inspect_dir = write_plugin(plugins, "inspect-input", INSPECT_PLUGIN)
    write_plugin(plugins, "exit-three", EXIT_PLUGIN)
    agent_name, agent_id = _agent(stack, plugins, "conventions-agent")
    name = f"conventions-{uuid.uuid4().hex[:6]}"
    config = {"greeting": "hi", "count": 3, "nested": {"list": [1, 2], "flag": True}}
    stack.apply(
        workflow(
            name,
            agent_name,
            [
                {"name": "text", "plugin": "text-out"},
                {"name": "inspect", "plugin": "inspect-input", "config": config},
                {"name": "broken", "plugin": "exit-three", "depends_on": ["text", "inspect"]},
            ],
        )
    )
    execution_id = stack.run(name, {"who": "e2e", "n": 1})["id"]
    done = stack.wait_finished(execution_id, timeout=20)
    steps = {s["name"]: s for s in done["steps"]}

    # Text that is not JSON comes back as raw output; standard error stays out of it.
    text = steps["text"]
    assert text["status"] == "succeeded", text
    assert set(text["result"]) == {"raw_output"}, text
    assert text["result"]["raw_output"].strip() == TEXT_OUTPUT
    assert "standard error" not in text["result"]["raw_output"]

    # The plugin gets `--input <file>`; the file holds input_data (the step's config),
    # context and variables; it runs in its own folder.
    inspect = steps["inspect"]
    assert inspect["status"] == "succeeded", inspect
    seen = inspect["result"]
    assert seen["argv"][:1] == ["--input"] and len(seen["argv"]) == 2, seen
    assert set(seen["input"]) == {"input_data", "context", "variables"}, seen
    assert seen["input"]["input_data"] == config
    context = seen["input"]["context"]
    assert context["execution_id"] == execution_id
    assert context["workflow"] == name
    assert context["step"] == "inspect"
    assert context["inputs"] == {"who": "e2e", "n": 1}
    assert isinstance(seen["input"]["variables"], dict)
    assert Path(seen["cwd"]).resolve() == inspect_dir.resolve()

    # A non-zero exit fails the step with its exit status, and the run with it.
    broken = steps["broken"]
    assert broken["status"] == "failed", broken
    assert broken["attempts"] == 1, broken
    assert broken["agent_id"] == agent_id, broken
    assert "exit status 3" in broken["error"], broken
    assert done["status"] == "failed", done
    assert "broken" in done["error"] and "exit status 3" in done["error"], done
