"""Running one plugin the way the official agents do: entry point, `--input <file>` when
there is input, JSON out."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import structlog
import yaml

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
STDERR_KEPT = 64 * 1024
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
    logs: list[str] = field(default_factory=list)


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


def _command(folder: Path, entry: Path, manifest: dict[str, Any]) -> list[str]:
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


def parse_output(text: str) -> Any:
    """One JSON object becomes the result; anything else comes back as raw output."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
    except ValueError:
        return {"raw_output": text}
    return value if isinstance(value, dict) else {"raw_output": text}


def _input_file(instruction: dict[str, Any]) -> str | None:
    """The `--input` file, only when `input_data` is non-empty: that is the convention, and
    a plugin that takes its own flags exits 2 on an unknown `--input`."""
    input_data = instruction.get("input_data")
    if not input_data:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(
            {
                "input_data": input_data,
                "context": instruction.get("context") or {},
                "variables": {},
            },
            handle,
        )
    return handle.name


async def run_plugin(
    plugins_dir: Path,
    instruction: dict[str, Any],
    allow_env: Sequence[str] = (),
    folder: Path | None = None,
) -> Outcome:
    """Run one `execute` instruction's plugin; `allow_env` is the agent's own allow list
    (`--allow-env`), beside the manifest's `permissions.environment`. It runs from
    `folder` (a registry install) or else from the hand-installed `plugins_dir/<id>`."""
    started = time.monotonic()
    plugin_id = str(instruction.get("plugin_id") or "")
    if not _SAFE_ID.match(plugin_id):
        return Outcome(False, error_message=f"invalid plugin id '{plugin_id}'")
    folder = (folder or plugins_dir / plugin_id).resolve()
    if not folder.is_dir():
        return Outcome(False, error_message=f"plugin '{plugin_id}' is not installed")
    manifest = load_manifest(folder)
    configuration = instruction.get("plugin_configuration")
    if configuration is None:
        configuration = {}
    if not isinstance(configuration, dict):
        return Outcome(
            False,
            error_message=f"plugin_configuration must be a mapping, not {_kind(configuration)}",
        )
    try:
        entry = plugin_entry(folder, configuration, manifest)
        # After the entry point only: they reach the plugin, never its interpreter.
        arguments = plugin_arguments(configuration)
        env = plugin_environment(instruction, configuration, manifest, allow_env)
    except Refused as refused:
        return Outcome(False, error_message=str(refused), duration=time.monotonic() - started)
    timeout = _time_limit(instruction, manifest)
    setup = _child_setup(_memory_limit(manifest), watched=_PLUGIN_PROCESSES.watched())
    input_path = _input_file(instruction)
    try:
        process = await asyncio.create_subprocess_exec(
            *_command(folder, entry, manifest),
            *arguments,
            *(["--input", input_path] if input_path else []),
            cwd=folder,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own session and process group: the agent's terminal signals do not reach
            # it, and one killpg reaches everything it started.
            start_new_session=True,
            preexec_fn=setup,
        )
        _PLUGIN_PROCESSES.add(process.pid)
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            # The whole process group: a plugin's children die with it.
            kill_group(process.pid)
            await process.wait()
            return Outcome(
                False,
                error_message=f"timed out after {timeout:g}s",
                duration=time.monotonic() - started,
            )
        except asyncio.CancelledError:
            kill_group(process.pid)  # a cancelled run leaves nothing running
            raise
        finally:
            stopped = _PLUGIN_PROCESSES.discard(process.pid)
    except OSError as exc:
        return Outcome(False, error_message=f"could not start the plugin: {exc}")
    finally:
        if input_path:
            os.unlink(input_path)
    text = stdout.decode(errors="replace")
    err = stderr.decode(errors="replace")[-STDERR_KEPT:]
    duration = time.monotonic() - started
    if stopped:
        return Outcome(
            False,
            error_message=STOPPED_MESSAGE,
            exit_code=process.returncode,
            stderr=err,
            duration=duration,
        )
    if process.returncode != 0:
        return Outcome(
            False,
            output=parse_output(text) if text.strip() else None,
            error_message=f"exit status {process.returncode}",
            exit_code=process.returncode,
            stderr=err,
            duration=duration,
        )
    return Outcome(True, output=parse_output(text), exit_code=0, stderr=err, duration=duration)


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
# group still listed. Only that end of file may end it: it ignores the stop signals.
_GUARDIAN = """\
import os, signal, sys
for number in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
    signal.signal(number, signal.SIG_IGN)
groups = set()
for line in sys.stdin.buffer:
    (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
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
                [sys.executable, "-I", "-S", "-c", _GUARDIAN, "stavily-plugin-guardian"],
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
