"""A plugin does not outlive the agent that runs it (docs/agent-processes.md): a real
`stavily agent run` is killed or stopped while its plugin, and the plugin's own child, run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stavily.agent.plugins import STOPPED_MESSAGE
from tests.e2e.support import (
    Process,
    Stack,
    descendants,
    process_alive,
    wait_until,
    workflow,
    write_plugin,
)
from tests.harness import fresh_database

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        sys.platform != "linux", reason="parent-death signals and /proc are Linux only"
    ),
]


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is under test is the agent's processes, not the server's database."""
    with fresh_database("sqlite", tmp_path) as url:
        yield url


# Starts a `sleep 60` child, then writes both pids and its own parent-death signal
# (PR_GET_PDEATHSIG) to `pidfile` and sleeps 60 s itself.
ORPHAN_PLUGIN = """
import ctypes
child = subprocess.Popen(["sleep", "60"])
death_signal = ctypes.c_int(-1)
ctypes.CDLL(None).prctl(2, ctypes.byref(death_signal), 0, 0, 0)
with open(config["pidfile"] + ".tmp", "w") as handle:
    json.dump({"plugin": os.getpid(), "child": child.pid, "death_signal": death_signal.value}, handle)
os.rename(config["pidfile"] + ".tmp", config["pidfile"])
time.sleep(60)
json.dump({"finished": True}, sys.stdout)
"""


def _command_line(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class Leftovers:
    """Processes a test saw; whichever still runs its command line is killed at the end,
    so that a failing test leaves nothing behind (a killed agent's plugins are no longer
    its descendants for the `processes` fixture to find)."""

    def __init__(self) -> None:
        self.seen: dict[int, list[str]] = {}

    def note(self, pid: int) -> int:
        with contextlib.suppress(OSError):
            self.seen[pid] = _command_line(pid)
        return pid

    def alive(self, pid: int) -> bool:
        return process_alive(pid, self.seen.get(pid))

    def kill(self) -> None:
        for pid in self.seen:
            if self.alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    seen = Leftovers()
    try:
        yield seen
    finally:
        seen.kill()


def _run_orphan_plugin(
    stack: Stack,
    tmp_path: Path,
    leftovers: Leftovers,
    timeout: str = "30s",
    limits: dict[str, Any] | None = None,
) -> tuple[Process, str, dict[str, int]]:
    """An agent running the orphan plugin: the agent, the execution id, the plugin's pids."""
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "orphan", ORPHAN_PLUGIN, limits=limits)
    pidfile = tmp_path / "orphan.pids"
    agent_name = f"orphan-agent-{uuid.uuid4().hex[:6]}"
    agent_id, key = stack.create_agent(agent_name)
    agent = stack.start_agent(agent_id, key, plugins)
    name = f"orphan-{uuid.uuid4().hex[:6]}"
    step = {
        "name": "orphan",
        "plugin": "orphan",
        "timeout": timeout,
        "config": {"pidfile": str(pidfile)},
    }
    stack.apply(workflow(name, agent_name, [step]))
    execution_id = stack.run(name)["id"]
    wait_until(pidfile.exists, timeout=10, what="the plugin to write its pids")
    pids: dict[str, int] = json.loads(pidfile.read_text())
    leftovers.note(pids["plugin"])
    leftovers.note(pids["child"])
    assert leftovers.seen[pids["child"]] == ["sleep", "60"], leftovers.seen
    return agent, execution_id, pids


def _guardian(agent: Process, leftovers: Leftovers) -> int:
    """The agent's plugin guardian: its child running `... stavily-plugin-guardian`."""
    for pid in descendants(agent.pid):
        with contextlib.suppress(OSError):
            if "stavily-plugin-guardian" in _command_line(pid):
                return leftovers.note(pid)
    raise AssertionError("the agent has no plugin guardian")


def _wait_gone(leftovers: Leftovers, pids: dict[str, int], *names: str, within: float) -> None:
    for name in names:
        wait_until(
            lambda name=name: not leftovers.alive(pids[name]),
            timeout=within,
            what=f"the {name} ({pids[name]}) to be gone",
        )


def test_sigkill_of_the_agent_kills_the_plugin_and_its_children(
    stack: Stack, tmp_path: Path, leftovers: Leftovers
) -> None:
    agent, _, pids = _run_orphan_plugin(stack, tmp_path, leftovers)
    guardian = _guardian(agent, leftovers)
    assert leftovers.alive(pids["plugin"]) and leftovers.alive(pids["child"])

    agent.popen.kill()
    agent.wait(timeout=5)

    _wait_gone(leftovers, pids, "plugin", "child", within=5)
    # Its job done, the guardian is gone too.
    wait_until(lambda: not leftovers.alive(guardian), timeout=5, what="the guardian to exit")


def test_parent_death_signal_kills_the_plugin_even_without_the_guardian(
    stack: Stack, tmp_path: Path, leftovers: Leftovers
) -> None:
    """A plugin with a memory limit is forked with a setup function anyway, which also
    gives it PR_SET_PDEATHSIG: SIGKILL. With the guardian killed first, the kernel still
    kills the plugin when the agent dies (its own children then survive: the limit
    docs/agent-processes.md states; the `leftovers` fixture kills them)."""
    agent, _, pids = _run_orphan_plugin(stack, tmp_path, leftovers, limits={"memory": "1GB"})
    assert pids["death_signal"] == signal.SIGKILL, pids
    guardian = _guardian(agent, leftovers)
    os.kill(guardian, signal.SIGKILL)
    wait_until(lambda: not leftovers.alive(guardian), timeout=5, what="the guardian killed")

    agent.popen.kill()
    agent.wait(timeout=5)

    _wait_gone(leftovers, pids, "plugin", within=5)


def test_sigterm_lets_the_plugin_run_out_and_leaves_none_of_its_processes(
    stack: Stack, tmp_path: Path, leftovers: Leftovers
) -> None:
    """One SIGTERM: the agent finishes what runs (here, until the step's 2 s timeout kills
    the plugin's group), reports it, and exits with nothing of the plugin left."""
    agent, execution_id, pids = _run_orphan_plugin(stack, tmp_path, leftovers, timeout="2s")
    agent.popen.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert agent.running and leftovers.alive(pids["plugin"]), "the plugin was not let run"

    assert agent.wait(timeout=8) == 0
    _wait_gone(leftovers, pids, "plugin", "child", within=1)
    step = stack.step(execution_id, "orphan")
    assert step["status"] == "failed", step
    assert "timed out" in step["error"], step


def test_a_second_sigterm_kills_the_plugin_and_its_children_at_once(
    stack: Stack, tmp_path: Path, leftovers: Leftovers
) -> None:
    agent, execution_id, pids = _run_orphan_plugin(stack, tmp_path, leftovers)
    agent.popen.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert agent.running and leftovers.alive(pids["plugin"]), "the plugin was not let run"

    started = time.monotonic()
    agent.popen.send_signal(signal.SIGTERM)
    _wait_gone(leftovers, pids, "plugin", "child", within=3)
    assert agent.wait(timeout=5) == 0
    assert time.monotonic() - started < 5
    # The step was reported, failed, saying why: no lease left to run out elsewhere.
    step = stack.step(execution_id, "orphan")
    assert step["status"] == "failed", step
    assert STOPPED_MESSAGE in step["error"], step


# The agent's side of the race: a child whose parent is no longer the process that set it
# up (the agent died between fork and prctl) exits instead of running the plugin.
RACE = textwrap.dedent(
    """
    import os, sys
    from stavily.agent.plugins import _child_setup
    setup = _child_setup(None, watched=False)
    child = os.fork()
    if child == 0:  # the plugin's child in the normal case: its parent set it up
        setup()
        grandchild = os.fork()
        if grandchild == 0:  # a process whose parent is not the one that set it up
            setup()
            os._exit(0)
        _, status = os.waitpid(grandchild, 0)
        os._exit(10 + os.waitstatus_to_exitcode(status))
    _, status = os.waitpid(child, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def test_a_child_set_up_after_its_agent_died_exits() -> None:
    result = subprocess.run([sys.executable, "-c", RACE], capture_output=True, timeout=10)
    # The child ran on (10 + ...); the grandchild, not the agent's child, exited with 1.
    assert result.returncode == 11, result
