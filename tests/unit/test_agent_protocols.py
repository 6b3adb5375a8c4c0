"""The reference agent speaks each way published plugins do (PLUGINS.md): JSON lines on
stdin, flags with the agent's socket, `--input`; a plugin's silence or failure is never
a success, and each run is sandboxed. Real plugin processes (tests/fixtures/plugins)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stavily.agent import plugins
from stavily.agent.plugins import Outcome, PluginProcesses, RunOptions, run_plugin
from stavily.agent.protocols import RunLog
from stavily.agent.venvs import Environments

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "plugins"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A plugins folder holding a copy of every fixture plugin."""
    folder = tmp_path / "plugins"
    shutil.copytree(FIXTURES, folder, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    return folder


async def run(
    root: Path,
    plugin_id: str,
    input_data: dict[str, Any] | None = None,
    configuration: dict[str, Any] | None = None,
    timeout: int = 20,
    log: RunLog | None = None,
    **options: Any,
) -> tuple[Outcome, list[str]]:
    log = log if log is not None else RunLog()
    outcome = await run_plugin(
        root,
        {
            "id": "ins_test",
            "plugin_id": plugin_id,
            "input_data": input_data or {},
            "plugin_configuration": configuration or {},
            "timeout_seconds": timeout,
        },
        options=RunOptions(agent_id="agt_test", **options),
        log=log,
    )
    return outcome, log.lines


def flags(arguments: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """A pinned flags version's plugin_configuration, as the orchestrator builds it."""
    return {"protocol": "flags", "sha256": "0" * 64, "arguments": arguments, "config": config}


def write(root: Path, plugin_id: str, code: str, **manifest: Any) -> Path:
    folder = root / plugin_id
    folder.mkdir(parents=True)
    fields = {
        "id": plugin_id,
        "version": "1.0.0",
        "type": "action",
        "runtime": {"type": "python", "entry_point": "main.py"},
        **manifest,
    }
    (folder / "plugin.yaml").write_text(yaml.safe_dump({"plugin": fields}))
    (folder / "main.py").write_text(textwrap.dedent(code))
    return folder


# -- JSON lines on stdin ------------------------------------------------------------------


async def test_a_stdin_action_is_driven_through_its_conversation(root: Path) -> None:
    outcome, log = await run(root, "stdin-action", {"target": "nginx"})
    assert outcome.success, outcome
    # the inner result is the step's: the plugin's own, whole
    assert outcome.output["status"] == "completed"
    assert outcome.output["id"] == "ins_test"
    assert outcome.output["data"] == {
        "target": "nginx",
        "demo_mode": "false",  # the agent says it outright: act for real
        "initialized_with": {"target": "nginx"},
    }
    assert "speaks JSON lines on stdin (protocol: stdin) (read from signs" in log[0]
    # its stderr is its log, in the order it came, never in the result
    assert "INFO acting on nginx" in log
    assert [line.split("] ")[1] for line in log if "stdin: " in line] == [
        "stdin: initialize: ok",
        "stdin: start: ok",
        "stdin: stop: ok",
    ]


async def test_demo_mode_is_the_agents_to_set(root: Path) -> None:
    outcome, _ = await run(root, "stdin-action", {"target": "x"}, demo_mode=True)
    assert outcome.output["data"]["demo_mode"] == "true"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"refuse_init": True},
            "the plugin answered 'initialize' with a failure: bad configuration",
        ),
        ({"fail": "disk full"}, "the plugin's action failed: disk full"),
        ({"exit_on": "execute_action"}, "the plugin exited (status 3) before it answered"),
        ({"exit_on": "initialize"}, "the plugin exited (status 3) before it answered"),
    ],
)
async def test_a_stdin_failure_is_a_failure(
    root: Path, config: dict[str, Any], message: str
) -> None:
    outcome, _ = await run(root, "stdin-action", config)
    assert not outcome.success
    assert outcome.error_message == message


async def test_a_failed_initialize_stops_the_conversation_before_any_action(
    root: Path,
) -> None:
    """Its `start` would still work and its action run with its defaults."""
    _, log = await run(root, "stdin-action", {"refuse_init": True, "target": "x"})
    assert not any("stdin: start" in line or "acting on" in line for line in log), log


async def test_a_stdin_plugin_that_says_nothing_is_no_success(root: Path) -> None:
    """What an agent that does not hold the conversation records as a success."""
    write(root, "mute", "import sys\nsys.stdin.read(0)\n", protocol="stdin")
    outcome, _ = await run(root, "mute", {"x": 1})
    assert not outcome.success
    assert outcome.error_message == "the plugin exited (status 0) before it answered"
    assert outcome.output is None


async def test_plugin_is_not_running_inside_a_successful_answer_is_a_failure(
    root: Path,
) -> None:
    """The published plugins answer before `start` with the outer success still true."""
    write(
        root,
        "not-running",
        """\
        import json, sys
        for line in sys.stdin:
            action = json.loads(line)["action"]
            data = {"error": "Plugin is not running"} if action == "execute_action" else None
            print(json.dumps({"action": action, "success": True, "data": data}), flush=True)
        """,
    )
    outcome, _ = await run(root, "not-running", {"x": 1})
    assert not outcome.success
    assert outcome.error_message == "the plugin's action failed: Plugin is not running"


async def test_a_stdin_plugin_that_never_answers_is_killed_at_the_timeout(root: Path) -> None:
    started = time.monotonic()
    outcome, _ = await run(root, "stdin-action", {"hang_on": "execute_action"}, timeout=1)
    assert not outcome.success
    assert outcome.error_message == "timed out after 1s"
    assert outcome.exit_code == -9  # killed, not waited for
    assert time.monotonic() - started < 5


async def test_each_answer_but_the_actions_has_its_own_timeout(root: Path) -> None:
    outcome, _ = await run(root, "stdin-action", {"hang_on": "initialize"}, answer_timeout=0.5)
    assert not outcome.success
    assert outcome.error_message == "no answer to 'initialize' within 0.5s"


async def test_lines_that_are_not_answers_go_to_the_log(root: Path) -> None:
    outcome, log = await run(root, "stdin-action", {"chatter": True, "target": "t"})
    assert outcome.success, outcome
    assert "not json: the plugin talks" in log


async def test_a_stdin_trigger_detects_its_events(root: Path) -> None:
    outcome, _ = await run(root, "stdin-trigger", {"threshold": 5, "value": 9})
    assert outcome.success, outcome
    event = {"id": "value-high-1", "type": "value.high", "data": {"value": 9}}
    assert outcome.output == {"events": [event]}
    quiet, _ = await run(root, "stdin-trigger", {"threshold": 50, "value": 9})
    assert quiet.success and quiet.output == {"events": []}


async def test_an_answer_over_the_limit_fails_the_step(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugins, "MAX_OUTPUT", 4096)
    write(
        root,
        "chatty",
        """\
        import json, sys
        for line in sys.stdin:
            print(json.dumps({"action": json.loads(line)["action"], "success": True,
                              "data": "x" * 10000}), flush=True)
        """,
        protocol="stdin",
    )
    outcome, _ = await run(root, "chatty", {"x": 1})
    assert not outcome.success
    assert outcome.error_message == "the plugin's answer is larger than 4096 bytes"


# -- flags and the socket -----------------------------------------------------------------


async def test_a_flags_plugin_gets_its_flags_and_talks_on_the_socket(root: Path) -> None:
    config = {"message": "hi", "targets": ["a", "b"]}
    changes: list[int] = []
    log = RunLog(changed=lambda: changes.append(1))
    outcome, lines = await run(
        root,
        "flags-action",
        {"ignored": True},  # no --input for a flags plugin, whatever comes
        flags(["--message", "hi", "--targets", "a", "b"], config),
        log=log,
        environment="staging",
    )
    assert outcome.success, outcome
    data = outcome.output["data"]
    assert outcome.output["status"] == "success"
    assert data["argv"] == ["--message", "hi", "--targets", "a", "b"]
    assert data["targets"] == ["a", "b"]
    assert data["agent"] == {
        "agent_id": "agt_test",
        "version": data["agent"]["version"],
        "environment": "staging",
    }
    assert data["config"] == config
    assert data["instruction_id"] == "ins_test"
    assert data["socket_mode"] == "0o600"
    assert data["first_trigger"] == {"accepted": True, "duplicate": False}
    assert data["duplicate_trigger"] is True
    assert data["unknown_method"].startswith("RPC error -32601: method not found")
    # the uploaded log and the trigger are the instruction's, told as they came
    assert any(line.endswith("INFO saying hi") for line in lines), lines
    assert any('trigger reported: said {"id": "said-1"}' in line for line in lines)
    assert outcome.events == [{"trigger_name": "said", "payload": {"id": "said-1"}}]
    assert len(changes) == len(lines)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            'import json\njson.dump({"status": "error", "message": "no such file"}, open(1, "w"))\n',
            "the plugin reported an error: no such file",
        ),
        ("import argparse\nargparse.ArgumentParser().parse_args()\n", "exit status 2"),
        ("import argparse\n", "the plugin printed no result (a flags plugin prints JSON)"),
    ],
)
async def test_a_flags_failure_is_a_failure(root: Path, code: str, message: str) -> None:
    write(root, "flagged", code)
    outcome, _ = await run(root, "flagged", configuration=flags(["--unknown", "1"], {}))
    assert not outcome.success
    assert outcome.error_message == message


async def test_the_run_folder_and_socket_are_gone_afterwards(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    outcome, _ = await run(root, "flags-action", configuration=flags([], {}))
    assert outcome.success, outcome
    assert list(scratch.iterdir()) == []


# -- --input and the sandbox ---------------------------------------------------------------


async def test_a_plugin_runs_in_a_sandbox(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_SECRET", "not for plugins")
    outcome, log = await run(root, "input-action", {"greeting": "yo", "leak_temp": True})
    assert outcome.success, outcome
    seen = outcome.output
    assert seen["greeting"] == "yo"
    assert "AGENT_SECRET" not in seen["env"]
    # a private temporary folder, gone with the run (and what the plugin left there)
    assert "stavily-run-" in seen["tmp"] and not await asyncio.to_thread(
        os.path.exists, seen["tmp"]
    )
    assert seen["fds"] == [0, 1, 2, 3]  # 3: its own listing's; nothing of the agent's
    assert seen["core_limit"] == 0
    assert seen["memory_limit"] == 512 * 1024**2  # the manifest's limits.memory
    assert "a line on stderr, the plugin's log" in log
    assert "as its manifest says" in log[0]


async def test_python_plugins_get_an_environment_of_their_own(root: Path, tmp_path: Path) -> None:
    """Not the agent's interpreter: what the agent has installed is not theirs."""
    environments = Environments(tmp_path / "venvs")
    outcome, log = await run(root, "input-action", {"greeting": "x"}, environments=environments)
    assert outcome.success, outcome
    assert outcome.output["agent_packages"] == []
    assert Path(outcome.output["executable"]).is_relative_to(tmp_path / "venvs")
    assert any("dependencies:" in line for line in log), log
    # without one it would have seen them
    assert "httpx" in (await run(root, "input-action", {"g": 1}))[0].output["agent_packages"]


async def test_a_hand_installed_plugin_with_no_sign_gets_the_official_convention(
    root: Path,
) -> None:
    write(root, "plain", 'import json, sys\njson.dump({"argv": sys.argv[1:]}, sys.stdout)\n')
    outcome, log = await run(root, "plain", {"a": 1})
    assert outcome.success, outcome
    assert outcome.output["argv"][0] == "--input"
    assert "the official agents' convention" in log[0]


async def test_an_unknown_protocol_is_refused(root: Path) -> None:
    write(root, "odd", "print('{}')\n", protocol="telepathy")
    outcome, _ = await run(root, "odd")
    assert not outcome.success
    assert (
        outcome.error_message == "unknown plugin protocol 'telepathy': one of input, stdin, flags"
    )


async def test_a_long_log_is_capped(root: Path) -> None:
    write(
        root,
        "loud",
        "import sys\nfor i in range(300):\n    print('line', i, file=sys.stderr)\nprint('{}')\n",
    )
    log = RunLog(limit=50)
    outcome, lines = await run(root, "loud", log=log)
    assert outcome.success, outcome
    assert len(lines) == 51
    assert lines[-1].endswith("more log lines dropped (limit 50)")


async def test_a_one_shot_plugin_printing_too_much_is_killed(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugins, "MAX_OUTPUT", 4096)
    write(root, "flood", "import sys, time\nsys.stdout.write('x' * 100000)\ntime.sleep(60)\n")
    started = time.monotonic()
    outcome, _ = await run(root, "flood")
    assert not outcome.success
    assert outcome.error_message == "the plugin printed more than 4096 bytes"
    assert time.monotonic() - started < 30


async def test_a_deep_temporary_folder_still_gets_a_socket(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Unix socket's path is at most about 107 bytes: the run folder moves to /tmp."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr("tempfile.tempdir", None)
    outcome, _ = await run(root, "flags-action", configuration=flags([], {}))
    assert outcome.success, outcome
    assert outcome.output["data"]["socket_mode"] == "0o600"


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux only")
def test_the_guardian_kills_a_marked_plugin_it_was_never_told_about() -> None:
    """The agent killed between a plugin's spawn and telling its guardian: the guardian
    still finds the plugin by the mark in its environment."""
    processes = PluginProcesses()
    assert processes.watched()
    unlisted = subprocess.Popen(
        ["sleep", "60"],
        env={"PATH": os.environ["PATH"], "STAVILY_AGENT_RUN": processes.mark},
        start_new_session=True,
    )
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        guardian = processes._guardian
        assert guardian is not None and guardian.stdin is not None
        guardian.stdin.close()  # what the agent's death does
        assert unlisted.wait(5) == -signal.SIGKILL
        guardian.wait(5)
        assert bystander.poll() is None  # not marked: left alone
    finally:
        for process in (unlisted, bystander):
            process.kill()
            process.wait()
