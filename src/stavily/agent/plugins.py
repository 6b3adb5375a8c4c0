"""Running one plugin: what the step may ask of it (entry point, arguments, environment),
checked; how it speaks (PLUGINS.md), read; its interpreter and dependencies, its private
run folder and socket, its limits; and the processes, killed at the timeout and when the
agent goes (protocols.py holds the conversations)."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import structlog
import yaml

from stavily import __version__
from stavily.agent.protocols import (
    EXIT_GRACE,
    MAX_OUTPUT,
    Conversation,
    PluginGone,
    RunLog,
    Said,
    StderrPump,
    TooLarge,
    now,
    oneshot_result,
    read_capped,
)
from stavily.agent.rpc import RunChannel, RunSocket
from stavily.agent.venvs import DependencyFailed, Environments
from stavily.plugins.manifest import PROTOCOLS, protocol_sign
from stavily.security.environment import PASSED_ENV as _PASSED_ENV
from stavily.security.environment import refusal
from stavily.workflows.definition import parse_duration

_SAFE_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_MEMORY = re.compile(r"^\s*(\d+)\s*(KB|MB|GB|K|M|G|B)?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1024,
    "M": 1024**2,
    "MB": 1024**2,
    "G": 1024**3,
    "GB": 1024**3,
}
_RUNTIMES = {
    "python": [sys.executable],
    "javascript": ["node"],
    "node": ["node"],
    "shell": ["sh"],
    "bash": ["bash"],
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOPPED_MESSAGE = "killed: the agent was told to stop now"

log = structlog.get_logger("stavily.agent")


class Refused(Exception):
    """A step asks for something the agent does not do; the step fails with this message."""


@dataclass
class Outcome:
    success: bool
    output: Any = None
    error_message: str | None = None
    exit_code: int | None = None
    stderr: str = ""
    duration: float = 0.0
    # triggers the plugin reported on the socket, deduplicated: {trigger_name, payload}
    events: list[Any] = field(default_factory=list)


def load_manifest(folder: Path) -> dict[str, Any]:
    for name in ("plugin.yaml", "plugin.yml"):
        path = folder / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            plugin = data.get("plugin", data) if isinstance(data, dict) else {}
            return plugin if isinstance(plugin, dict) else {}
    return {}


def _memory_limit(manifest: dict[str, Any]) -> int | None:
    text = str((manifest.get("limits") or {}).get("memory") or "")
    match = _MEMORY.match(text)
    if not match:
        return None
    return int(match.group(1)) * _MEMORY_UNITS[(match.group(2) or "").upper()]


def _time_limit(instruction: dict[str, Any], manifest: dict[str, Any]) -> float:
    """The step's timeout, or the manifest's `limits.execution_time` when that is shorter."""
    limit = float(instruction.get("timeout_seconds") or 300)
    declared = (manifest.get("limits") or {}).get("execution_time")
    if declared is not None:
        try:
            limit = min(limit, parse_duration(declared))
        except ValueError:
            pass
    return limit


def _is_python(entry: Path, manifest: dict[str, Any]) -> bool:
    runtime = str((manifest.get("runtime") or {}).get("type") or "").lower()
    return runtime == "python" or (runtime not in _RUNTIMES and entry.suffix == ".py")


def _command(entry: Path, manifest: dict[str, Any], python: Path | None) -> list[str]:
    """The runtime and the entry point: Python plugins with their own environment's
    interpreter when they have one."""
    if python is not None:
        return [str(python), str(entry)]
    runtime = str((manifest.get("runtime") or {}).get("type") or "").lower()
    if runtime in _RUNTIMES:
        return [*_RUNTIMES[runtime], str(entry)]
    if entry.suffix == ".py":
        return [sys.executable, str(entry)]
    if entry.suffix == ".js":
        return ["node", str(entry)]
    if entry.suffix == ".sh":
        return ["sh", str(entry)]
    return [str(entry)]


def _kind(value: Any) -> str:
    """A JSON value's kind, for messages (never the value: it may be a secret)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__}"


def _patterns(value: Any) -> tuple[str, ...] | None:
    """A list of names or glob patterns; None when it is not one."""
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return None


def _allowed(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def plugin_environment(
    instruction: dict[str, Any],
    configuration: dict[str, Any],
    manifest: dict[str, Any],
    allow_env: Sequence[str] = (),
) -> dict[str, str]:
    """The agent's base, then each step variable the manifest's `permissions.environment`,
    the agent's `allow_env` or the step's secrets allow; never a refused one."""
    requested = configuration.get("environment")
    if requested is None:
        requested = {}
    if not isinstance(requested, dict):
        raise Refused(
            "plugin_configuration.environment must be a mapping of names to values, "
            f"not {_kind(requested)}"
        )
    context = instruction.get("context")
    secrets = context.get("secret_environment") if isinstance(context, dict) else None
    secret_names = set(_patterns(secrets) or ())
    permissions = manifest.get("permissions")
    declared = _patterns(permissions.get("environment") if isinstance(permissions, dict) else None)
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    # In name order, and every refused name before any unallowed one: the step's message
    # names the variable that matters most, the same one each time.
    texts: dict[str, str] = {}
    for name in sorted(requested, key=str):
        value = requested[name]
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise Refused(
                f"environment variable name {str(name)!r} is invalid: letters, digits and "
                "underscores, not starting with a digit"
            )
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str | int | float):
            text = str(value)
        else:
            raise Refused(
                f"environment variable '{name}' must be a string, number or boolean, "
                f"not {_kind(value)}"
            )
        if "\0" in text:
            raise Refused(f"environment variable '{name}' holds a NUL character")
        reason = refusal(name)
        if reason is not None:
            raise Refused(f"environment variable '{name}' is refused: {reason}")
        texts[name] = text
    for name, text in texts.items():
        if name not in secret_names and not _allowed(name, allow_env):
            if declared is None:
                raise Refused(
                    f"environment variable '{name}' is not allowed: the plugin's manifest "
                    "permissions.environment must be a list of variable names"
                )
            if not _allowed(name, declared):
                raise Refused(
                    f"environment variable '{name}' is not allowed by the plugin's manifest "
                    "(permissions.environment) or the agent's --allow-env"
                )
        env[name] = text
    env["STAVILY_INSTRUCTION_ID"] = str(instruction.get("id", ""))
    return env


def plugin_arguments(configuration: dict[str, Any]) -> list[str]:
    """The step's `arguments`: strings and numbers, passed after the entry point."""
    arguments = configuration.get("arguments")
    if arguments is None:
        return []
    if not isinstance(arguments, list):
        raise Refused(
            "plugin_configuration.arguments must be a list of strings or numbers, "
            f"not {_kind(arguments)}"
        )
    texts = []
    for index, argument in enumerate(arguments):
        if isinstance(argument, bool) or not isinstance(argument, str | int | float):
            raise Refused(
                f"plugin_configuration.arguments[{index}] must be a string or a number, "
                f"not {_kind(argument)}"
            )
        text = str(argument)
        if "\0" in text:
            raise Refused(f"plugin_configuration.arguments[{index}] holds a NUL character")
        texts.append(text)
    return texts


def plugin_entry(folder: Path, configuration: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """The manifest's `runtime.entry_point`, which a step may name but not change; the
    step's `entrypoint` only for a plugin whose manifest names none."""
    asked = configuration.get("entrypoint")
    if asked is not None and not isinstance(asked, str):
        raise Refused(f"plugin_configuration.entrypoint must be a string, not {_kind(asked)}")
    runtime = manifest.get("runtime")
    declared = runtime.get("entry_point") if isinstance(runtime, dict) else None
    if declared:
        entry = (folder / str(declared)).resolve()
        if asked and (folder / asked).resolve() != entry:
            raise Refused(
                f"entrypoint '{asked}' is refused: the plugin's manifest runs '{declared}' "
                "(runtime.entry_point)"
            )
        name = str(declared)
    elif asked:
        entry = (folder / asked).resolve()
        name = asked
    else:
        raise Refused("entrypoint is required")
    if folder not in entry.parents or not entry.is_file():
        raise Refused(f"entrypoint '{name}' is not in the plugin")
    return entry


def plugin_protocol(
    configuration: dict[str, Any], manifest: dict[str, Any], entry: Path
) -> tuple[str, str]:
    """How the plugin takes its input, and where that was read: the registry's record
    (a pinned version's `plugin_configuration.protocol`), the manifest's `protocol`, or
    the documented signs in its entry point. A hand-installed plugin none of them tells
    about gets the official agents' convention, `--input` (the registry refuses to
    publish such a plugin)."""
    if configuration.get("sha256") and configuration.get("protocol") is not None:
        given, where = configuration["protocol"], "as the registry recorded it"
    elif manifest.get("protocol") is not None:
        given, where = manifest["protocol"], "as its manifest says"
    else:
        try:
            text = entry.read_bytes()[: 1024 * 1024]
        except OSError:
            text = b""
        given, where = protocol_sign(text), "read from signs in its entry point"
        if given is None:
            given = "input"
            where = "the official agents' convention: neither its manifest nor its code tells"
    if given not in PROTOCOLS:
        raise Refused(f"unknown plugin protocol {str(given)!r}: one of {', '.join(PROTOCOLS)}")
    return given, where


@dataclass
class RunOptions:
    """What the agent, not the step, decides about each run."""

    # step environment variables any plugin may receive (names or globs, `--allow-env`)
    allow_env: Sequence[str] = ()
    agent_id: str = ""
    environment: str = "production"
    # STAVILY_DEMO_MODE for the plugins: the published ones only simulate when it is not
    # "false", so the agent says it outright (`--demo-mode`; default: act for real)
    demo_mode: bool = False
    # Python plugins' virtual environments; None runs them with the agent's interpreter
    environments: Environments | None = None
    # stdin plugins: each answer but the action's (initialize, start, stop)
    answer_timeout: float = 30.0


@dataclass
class Watching:
    """A run kept going as a watch (stavily.agent.watches): no timeout; each trigger the
    plugin detects (stdin), reports on the socket or prints (one-shot) goes to `report`
    as (type, payload)."""

    interval: float
    report: Callable[[str, dict[str, Any]], None]


# a watch's run has no deadline of its own: it ends when the plugin dies or is stopped
_WATCH_SECONDS = 10.0**9


def _event_type(event: Any, default: str = "trigger") -> str:
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) and kind else default


def printed_events(output: Any) -> list[Any]:
    """What a one-shot trigger printed: its `events`, or one event (a mapping with an
    `id` or a `type`); nothing else counts."""
    if not isinstance(output, dict):
        return []
    if isinstance(output.get("events"), list):
        return [e for e in output["events"] if isinstance(e, dict)]
    return [output] if output.get("id") or output.get("type") else []


def _stdin_kind(manifest: dict[str, Any]) -> str:
    kind = str(manifest.get("type") or "action").lower()
    return "detect_triggers" if kind in ("trigger", "monitor") else "execute_action"


def _step_config(instruction: dict[str, Any], configuration: dict[str, Any]) -> Any:
    """The step's rendered config: a flags plugin's rides in `plugin_configuration`."""
    if configuration.get("protocol") == "flags" and "config" in configuration:
        return configuration["config"]
    input_data = instruction.get("input_data")
    return input_data if input_data is not None else {}


def _run_folder() -> Path:
    """A private folder for one run (0700): the socket, the input file, the plugin's TMPDIR.
    In /tmp when the agent's own temporary folder is too deep for a Unix socket's path
    (about 107 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="stavily-run-"))
    if len(str(root / "agent.sock")) > 100:
        root.rmdir()
        root = Path(tempfile.mkdtemp(prefix="stv-", dir="/tmp"))
    (root / "tmp").mkdir(mode=0o700)
    return root


def _input_file(run: Path, instruction: dict[str, Any]) -> str | None:
    """The `--input` file, only when `input_data` is non-empty: that is the convention, and
    a plugin that takes its own flags exits 2 on an unknown `--input`."""
    input_data = instruction.get("input_data")
    if not input_data:
        return None
    path = run / "input.json"
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        json.dump(
            {
                "input_data": input_data,
                "context": instruction.get("context") or {},
                "variables": {},
            },
            handle,
        )
    return str(path)


async def run_plugin(
    plugins_dir: Path,
    instruction: dict[str, Any],
    allow_env: Sequence[str] = (),
    folder: Path | None = None,
    *,
    options: RunOptions | None = None,
    log: RunLog | None = None,
    watch: Watching | None = None,
) -> Outcome:
    """Run one `execute` instruction's plugin, the way its protocol says, from `folder` (a
    registry install) or else from the hand-installed `plugins_dir/<id>`. `log` gets the
    run's lines as they come (the protocol used, the plugin's stderr and uploaded logs).
    With `watch`, the run is a watch's: see Watching."""
    options = options or RunOptions(allow_env=allow_env)
    allow = tuple(allow_env) or tuple(options.allow_env)
    log = log if log is not None else RunLog()
    started = time.monotonic()

    def refused(message: str) -> Outcome:
        return Outcome(False, error_message=message, duration=time.monotonic() - started)

    plugin_id = str(instruction.get("plugin_id") or "")
    if not _SAFE_ID.match(plugin_id):
        return refused(f"invalid plugin id '{plugin_id}'")
    folder = (folder or plugins_dir / plugin_id).resolve()
    if not folder.is_dir():
        return refused(f"plugin '{plugin_id}' is not installed")
    manifest = load_manifest(folder)
    configuration = instruction.get("plugin_configuration")
    if configuration is None:
        configuration = {}
    if not isinstance(configuration, dict):
        return refused(f"plugin_configuration must be a mapping, not {_kind(configuration)}")
    try:
        entry = plugin_entry(folder, configuration, manifest)
        protocol, where = plugin_protocol(configuration, manifest, entry)
        # After the entry point only: they reach the plugin, never its interpreter.
        arguments = plugin_arguments(configuration)
        env = plugin_environment(instruction, configuration, manifest, allow)
    except Refused as exc:
        return refused(str(exc))
    log.note(f"The plugin speaks {_SPOKEN[protocol]} ({where})")
    interpreter = None
    if options.environments is not None and _is_python(entry, manifest):
        try:
            interpreter, lines = await options.environments.python_for(folder, manifest)
        except DependencyFailed as exc:
            return refused(str(exc))
        for line in lines:
            log.note(line)
    run = await asyncio.to_thread(_run_folder)
    try:
        return await _run(
            instruction,
            configuration,
            manifest,
            protocol,
            options,
            log,
            started,
            command=[*_command(entry, manifest, interpreter), *arguments],
            env=env,
            folder=folder,
            run=run,
            watch=watch,
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, run, True)
        log.close()


_SPOKEN = {
    "input": "--input <file> (protocol: input)",
    "stdin": "JSON lines on stdin (protocol: stdin)",
    "flags": "its own flags and the agent's socket (protocol: flags)",
}


async def _run(
    instruction: dict[str, Any],
    configuration: dict[str, Any],
    manifest: dict[str, Any],
    protocol: str,
    options: RunOptions,
    log: RunLog,
    started: float,
    *,
    command: list[str],
    env: dict[str, str],
    folder: Path,
    run: Path,
    watch: Watching | None,
) -> Outcome:
    instruction_id = str(instruction.get("id", ""))
    config = _step_config(instruction, configuration)
    events: list[Any] = []
    seen: set[str] = set()

    def uploaded(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            stamp = entry.get("timestamp") or now()
            log.add(f"[{stamp}] {str(entry.get('level', 'INFO')).upper()} {entry['message']}")

    def reported(name: str, payload: dict[str, Any]) -> dict[str, Any]:
        key = str(payload.get("id") or json.dumps([name, payload], sort_keys=True, default=str))
        duplicate = key in seen
        if not duplicate:
            seen.add(key)
            events.append({"trigger_name": name, "payload": payload})
            text = json.dumps(payload, ensure_ascii=False, default=str)
            log.note(f"trigger reported: {name} {text}")
            if watch is not None:
                watch.report(name, payload)
        return {"accepted": True, "duplicate": duplicate}

    channel = RunChannel(
        instruction_id=instruction_id,
        agent_id=options.agent_id,
        agent_version=__version__,
        environment=options.environment,
        config=config,
        on_logs=uploaded,
        on_trigger=reported,
    )
    socket_path = run / "agent.sock"
    env.update(
        STAVILY_AGENT_SOCKET=str(socket_path),
        STAVILY_DEMO_MODE="true" if options.demo_mode else "false",
        PYTHONUNBUFFERED="1",  # answers and logs as they come, not at exit
        STAVILY_AGENT_RUN=_PLUGIN_PROCESSES.mark,  # the guardian finds it by this
        TMPDIR=str(run / "tmp"),
        TMP=str(run / "tmp"),
        TEMP=str(run / "tmp"),
    )
    timeout = _WATCH_SECONDS if watch else _time_limit(instruction, manifest)
    input_path = _input_file(run, instruction) if protocol == "input" else None
    if input_path:
        command = [*command, "--input", input_path]
    setup = _child_setup(_memory_limit(manifest), watched=_PLUGIN_PROCESSES.watched())
    loop = asyncio.get_running_loop()
    try:
        served = RunSocket(socket_path, channel)
        await served.start()
    except (OSError, ValueError) as exc:
        return Outcome(False, error_message=f"could not open the agent's socket: {exc}")
    try:
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=folder,
                env=env,
                stdin=asyncio.subprocess.PIPE
                if protocol == "stdin"
                else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own session and process group: the agent's terminal signals do not
                # reach it, and one killpg reaches everything it started.
                start_new_session=True,
                preexec_fn=setup,
                limit=MAX_OUTPUT,
            )
        except OSError as exc:
            return Outcome(False, error_message=f"could not start the plugin: {exc}")
        _PLUGIN_PROCESSES.add(process.pid)
        _no_core_dumps(process.pid)
        assert process.stdout is not None and process.stderr is not None
        stderr = StderrPump(process.stderr, log)
        deadline = loop.time() + timeout
        try:
            if protocol == "stdin":
                said = await _converse(
                    process, manifest, instruction_id, config, options, log, deadline, watch
                )
            else:
                said = await _oneshot(process, protocol, deadline)
                if watch is not None and said.success:
                    for event in printed_events(said.output):
                        watch.report(_event_type(event), event)
        except asyncio.CancelledError:
            kill_group(process.pid)  # a cancelled run leaves nothing running
            raise
        finally:
            if process.returncode is None:
                kill_group(process.pid)
            await _drain(process)
            await process.wait()
            stopped = _PLUGIN_PROCESSES.discard(process.pid)
        err = await stderr.finish()
    finally:
        await served.close()
    outcome = Outcome(
        said.success,
        output=said.output,
        error_message=said.error_message,
        exit_code=process.returncode,
        stderr=err,
        duration=time.monotonic() - started,
        events=events,
    )
    if said.timed_out:
        outcome.error_message = f"timed out after {timeout:g}s"
        outcome.output = None
    if stopped:
        outcome.success, outcome.error_message = False, STOPPED_MESSAGE
    return outcome


async def _oneshot(process: asyncio.subprocess.Process, protocol: str, deadline: float) -> Said:
    """`--input` and flags: wait for the exit, the printed JSON is the result."""
    assert process.stdout is not None
    try:
        async with asyncio.timeout_at(deadline):
            stdout = await read_capped(process.stdout, MAX_OUTPUT)
            await process.wait()
    except TimeoutError:
        return Said(False, timed_out=True)
    except TooLarge:
        return Said(False, None, f"the plugin printed more than {MAX_OUTPUT} bytes")
    assert process.returncode is not None
    return oneshot_result(protocol, stdout.decode(errors="replace"), process.returncode)


async def _converse(
    process: asyncio.subprocess.Process,
    manifest: dict[str, Any],
    instruction_id: str,
    config: Any,
    options: RunOptions,
    log: RunLog,
    deadline: float,
    watch: Watching | None,
) -> Said:
    """The stdin conversation; a plugin that closes its output first failed, whatever its
    exit status."""
    conversation = Conversation(process, log, options.answer_timeout, deadline)
    try:
        if watch is not None:
            said = await conversation.watch(
                config, watch.interval, lambda event: watch.report(_event_type(event), event)
            )
        else:
            said = await conversation.run(_stdin_kind(manifest), instruction_id, config)
    except PluginGone:
        await conversation.close()
        code = await process.wait()
        return Said(False, None, f"the plugin exited (status {code}) before it answered")
    except TooLarge:
        return Said(False, None, f"the plugin's answer is larger than {MAX_OUTPUT} bytes")
    if said.timed_out or not said.success:
        return said  # killed by the caller: no grace for one that failed or hangs
    await conversation.close()
    try:
        await asyncio.wait_for(process.wait(), EXIT_GRACE)
    except TimeoutError:
        log.note(f"the plugin did not exit within {EXIT_GRACE:g}s of `stop`: killed")
    return said


async def _drain(process: asyncio.subprocess.Process) -> None:
    """Read what is left of the plugin's stdout: a pipe left paused unread (a result too
    large, a run cut short) would keep `wait()` waiting for its end forever. A second at
    most (something outside the plugin's group holding it open), then it is closed."""
    assert process.stdout is not None
    try:
        async with asyncio.timeout(1.0):
            while await process.stdout.read(65536):
                pass
    except TimeoutError:
        transport = getattr(process, "_transport", None)
        pipe = transport.get_pipe_transport(1) if transport is not None else None
        if pipe is not None:
            pipe.close()


def _no_core_dumps(pid: int) -> None:
    """No core file of a plugin that crashes: its memory holds the step's secrets."""
    if sys.platform == "linux":
        import resource

        with contextlib.suppress(OSError):
            resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))


# -- plugin processes: what runs, and what kills it when the agent goes away ----------------


def kill_group(pgid: int) -> None:
    """SIGKILL a plugin's process group; one already gone is no error."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@cache
def _prctl() -> Callable[..., int]:
    """libc's prctl, looked up once in the agent: the child only calls it."""
    import ctypes

    function = ctypes.CDLL(None, use_errno=True).prctl
    function.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    function.restype = ctypes.c_int
    return function


def _child_setup(memory: int | None, watched: bool) -> Callable[[], None] | None:
    """What the plugin's child runs between fork and exec (Linux only), or None.

    With None CPython vforks, about 1 ms; with a function it must fork the whole agent
    (~75 MB), about 5 ms more. So there is one only for a memory limit (RLIMIT_AS) or when
    no guardian watches the plugins; it then also sets the parent-death signal, which is
    free once the child runs anyway. Elsewhere than Linux neither exists."""
    if sys.platform != "linux" or (watched and not memory):
        return None
    import resource  # here, not in the child: an import there would cost each start

    parent = os.getpid()  # before the fork: the child compares its parent with it
    prctl = _prctl()

    def setup() -> None:
        # SIGKILL when the *thread* that forked this child exits. asyncio forks from the
        # event loop's thread, which lives as long as the agent does.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the agent died before the signal was set: nobody waits for us
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return setup


# The guardian: it reads "+<pgid>" and "-<pgid>" lines from the agent until the pipe closes,
# which happens however the agent ends (SIGKILL, a crash, the OOM killer), then kills every
# group still listed, and (Linux) the group of every process whose environment carries the
# agent's mark: a plugin started in the moment before the agent could list it (killed
# then) is found too. Only that end of file may end it: it ignores the stop signals.
_GUARDIAN = """\
import os, signal, sys
for number in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
    signal.signal(number, signal.SIG_IGN)
mark = b"STAVILY_AGENT_RUN=" + sys.argv[2].encode()
groups = set()
for line in sys.stdin.buffer:
    (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
if os.path.isdir("/proc"):
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if mark in handle.read().split(b"\\0"):
                    groups.add(os.getpgid(int(pid)))
        except (OSError, ValueError):
            pass
groups.discard(os.getpgid(0))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class PluginProcesses:
    """The process groups of the plugins this agent runs now, and their guardian.

    Each plugin leads its own session, so nothing the kernel does on the agent's death
    reaches the plugin's children. One small guardian process per agent (started with the
    first plugin, never one per run) holds a pipe from the agent: when the agent is gone,
    however it went, the pipe closes and the guardian kills every group still running.
    Telling it costs one pipe write per start and one per end."""

    def __init__(self) -> None:
        self.running: set[int] = set()
        self._stopped: set[int] = set()
        self._stopping = False
        self._guardian: subprocess.Popen[bytes] | None = None
        # in every plugin's environment (STAVILY_AGENT_RUN): what the guardian looks for
        self.mark = uuid.uuid4().hex

    def watched(self) -> bool:
        """Whether a guardian watches the plugins; starts one if none runs."""
        if self._guardian is not None and self._guardian.poll() is not None:
            log.warning("the plugin guardian is gone", exit_code=self._guardian.returncode)
            self._guardian = None
        if self._guardian is None:
            self._start_guardian()
        return self._guardian is not None

    def add(self, pgid: int) -> None:
        self.running.add(pgid)
        self._tell(b"+%d\n" % pgid)
        if self._stopping:  # started after `stop`, or while it ran
            self._stopped.add(pgid)
            kill_group(pgid)

    def discard(self, pgid: int) -> bool:
        """Forget a plugin whose leader has exited; whether `stop` killed it."""
        self.running.discard(pgid)
        self._tell(b"-%d\n" % pgid)
        stopped = pgid in self._stopped
        self._stopped.discard(pgid)
        return stopped

    def stop(self) -> int:
        """Kill every running plugin's group now, and each one started from now on; their
        steps fail saying so."""
        self._stopping = True
        for pgid in self.running:
            self._stopped.add(pgid)
            kill_group(pgid)
        return len(self.running)

    def _start_guardian(self) -> None:
        try:
            self._guardian = subprocess.Popen(
                [
                    *(sys.executable, "-I", "-S", "-c", _GUARDIAN),
                    *("stavily-plugin-guardian", self.mark),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                bufsize=0,
                # Out of the agent's session: a Ctrl-C or hang-up of its terminal is the
                # agent's to handle, and the guardian must outlive it.
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("no plugin guardian: plugins may outlive a killed agent", error=str(exc))
            return
        if self.running:  # a guardian started again: it learns what runs
            self._tell(b"".join(b"+%d\n" % pgid for pgid in self.running))

    def _tell(self, message: bytes) -> None:
        guardian = self._guardian
        if guardian is None or guardian.stdin is None:
            return
        try:
            guardian.stdin.write(message)
        except OSError:  # the next plugin start starts another, which learns what runs
            log.warning("the plugin guardian is gone", exit_code=guardian.poll())
            self._guardian = None


# One per process: the agent's plugins, whichever coroutine started them.
_PLUGIN_PROCESSES = PluginProcesses()


def kill_running_plugins() -> int:
    """Kill every plugin this agent runs now, children included, and any it starts later;
    how many were running."""
    return _PLUGIN_PROCESSES.stop()
