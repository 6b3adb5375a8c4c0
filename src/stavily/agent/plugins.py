"""Running one plugin the way the official agents do: entry point, `--input <file>`, JSON out."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
STDERR_KEPT = 64 * 1024


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


def parse_output(text: str) -> Any:
    """One JSON object becomes the result; anything else comes back as raw output."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
    except ValueError:
        return {"raw_output": text}
    return value if isinstance(value, dict) else {"raw_output": text}


async def run_plugin(plugins_dir: Path, instruction: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    plugin_id = str(instruction.get("plugin_id") or "")
    if not _SAFE_ID.match(plugin_id):
        return Outcome(False, error_message=f"invalid plugin id '{plugin_id}'")
    folder = (plugins_dir / plugin_id).resolve()
    if not folder.is_dir():
        return Outcome(False, error_message=f"plugin '{plugin_id}' is not installed")
    manifest = load_manifest(folder)
    configuration = instruction.get("plugin_configuration") or {}
    entry_name = configuration.get("entrypoint") or (manifest.get("runtime") or {}).get(
        "entry_point"
    )
    if not entry_name:
        return Outcome(False, error_message="entrypoint is required")
    entry = (folder / str(entry_name)).resolve()
    if folder not in entry.parents or not entry.is_file():
        return Outcome(False, error_message=f"entrypoint '{entry_name}' is not in the plugin")
    arguments = [str(a) for a in configuration.get("arguments") or []]
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update({str(k): str(v) for k, v in (configuration.get("environment") or {}).items()})
    env["STAVILY_INSTRUCTION_ID"] = str(instruction.get("id", ""))
    timeout = _time_limit(instruction, manifest)
    memory = _memory_limit(manifest)

    def limits() -> None:  # runs in the child, before exec
        if memory and sys.platform == "linux":
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(
            {
                "input_data": instruction.get("input_data") or {},
                "context": instruction.get("context") or {},
                "variables": {},
            },
            handle,
        )
        input_path = handle.name
    try:
        process = await asyncio.create_subprocess_exec(
            *_command(folder, entry, manifest),
            *arguments,
            "--input",
            input_path,
            cwd=folder,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=limits if memory else None,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            # The whole process group: a plugin's children die with it.
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            return Outcome(
                False,
                error_message=f"timed out after {timeout:g}s",
                duration=time.monotonic() - started,
            )
    except OSError as exc:
        return Outcome(False, error_message=f"could not start the plugin: {exc}")
    finally:
        os.unlink(input_path)
    text = stdout.decode(errors="replace")
    err = stderr.decode(errors="replace")[-STDERR_KEPT:]
    duration = time.monotonic() - started
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
