"""Helpers for end-to-end tests: real `stavily serve` and `stavily agent run` processes.

Every process writes its stdout and stderr to files under the test's tmp_path; the
`processes` fixture stops them all (terminate, then kill, children included) and
prints their output when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from tests.harness import free_port

T = TypeVar("T")

CLI = [sys.executable, "-m", "stavily.cli.main"]
ADMIN_TOKEN = "stv_e2e_admin_token_0123456789abcdefghij"
HEARTBEAT_INTERVAL = "1"
POLL_WAIT = "2"


def base_env() -> dict[str, str]:
    """The test's environment without any STAVILY_* setting that could leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAVILY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(
    condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


# -- processes ----------------------------------------------------------------------------


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    parents = _parent_pids()
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found.extend(children)
        frontier.extend(children)
    return found


def process_alive(pid: int, cmdline: list[str] | None = None) -> bool:
    """A process exists and is not a zombie (and, if given, still runs `cmdline`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat[stat.rfind(")") + 2 :].split()[0]
    if state in ("Z", "X"):
        return False
    if cmdline is not None:
        return [a.decode(errors="replace") for a in args if a] == cmdline
    return True


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logged(self, event: str | None = None) -> list[dict[str, Any]]:
        """Its structured log lines (JSON objects on standard error), those of `event` if
        given; lines that are not JSON objects are left out."""
        found = []
        for line in self.stderr().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and (event is None or entry.get("event") == event):
                found.append(entry)
        return found

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)


class Processes:
    """Starts processes with their output in files; stops every one of them at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.started: list[Process] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        name = f"{len(self.started) + 1:02d}-{name}"
        stdout_path = self.root / f"{name}.stdout.log"
        stderr_path = self.root / f"{name}.stderr.log"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=self.root
            )
        process = Process(name, popen, stdout_path, stderr_path)
        self.started.append(process)
        return process

    def stop(self, process: Process, timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL after `timeout`; leftover children (plugins) are killed too."""
        if process.running:
            children = descendants(process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.popen.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.popen.kill()
                process.wait(10)
            self._kill_all(children)
        return process.popen.returncode  # type: ignore[return-value]

    def kill(self, process: Process) -> int:
        children = descendants(process.pid) if process.running else []
        with contextlib.suppress(ProcessLookupError):
            process.popen.kill()
        code = process.wait(10)
        self._kill_all(children)
        return code

    @staticmethod
    def _kill_all(pids: list[int]) -> None:
        own_group = os.getpgrp()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group == pid and group != own_group:
                    os.killpg(group, signal.SIGKILL)  # a plugin leads its own group
                else:
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        # Agents before the servers they talk to (a server may have been restarted after
        # its agent started), each kind newest first.
        agents = [p for p in self.started if p.name.endswith("-agent")]
        others = [p for p in self.started if p not in agents]
        for process in [*reversed(agents), *reversed(others)]:
            self.stop(process, timeout=5)

    def report(self) -> str:
        parts = []
        for process in self.started:
            parts.append(
                f"===== {process.name}: {' '.join(process.popen.args)}"  # type: ignore[arg-type]
                f" (exit {process.popen.returncode})"
            )
            parts.append(f"----- stdout\n{process.stdout()}")
            parts.append(f"----- stderr\n{process.stderr()}")
        return "\n".join(parts)


# -- the orchestrator and its agents ------------------------------------------------------


class Stack:
    """One orchestrator (which may be killed and restarted on the same port and database)
    and the agents that talk to it."""

    def __init__(self, processes: Processes, tmp: Path, database_url: str) -> None:
        self.processes = processes
        self.tmp = tmp
        self.database_url = database_url
        self.data_dir = tmp / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Process | None = None
        # No keep-alive: connections must not outlive a killed server.
        self.api = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=15,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def close(self) -> None:
        self.api.close()

    # servers

    def server_env(self) -> dict[str, str]:
        return {
            **base_env(),
            "STAVILY_DATABASE_URL": self.database_url,
            "STAVILY_DATA_DIR": str(self.data_dir),
            "STAVILY_BOOTSTRAP_TOKEN": ADMIN_TOKEN,
            # plugins copied onto agents by hand run too; registry plugins are pinned
            "STAVILY_UNREGISTERED_PLUGINS": "allow",
        }

    def start_server(self) -> Process:
        self.server = self.processes.start(
            "serve", [*CLI, "serve", "--port", str(self.port)], self.server_env()
        )
        wait_healthy(self.url, self.server)
        return self.server

    # agents

    def create_agent(self, name: str) -> tuple[str, str]:
        response = self.api.post("/api/v1/agents", json={"name": name})
        assert response.status_code == 201, response.text
        return response.json()["agent_id"], response.json()["api_key"]

    def start_agent(
        self,
        agent_id: str,
        key: str,
        plugins_dir: Path,
        poll_wait: str = POLL_WAIT,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Process:
        """`stavily agent run` for this agent; `extra` arguments and `env` variables added."""
        args = [
            *CLI,
            "agent",
            "run",
            "--url",
            self.url,
            "--agent-id",
            agent_id,
            "--token",
            key,
            "--plugins-dir",
            str(plugins_dir),
            "--heartbeat-interval",
            HEARTBEAT_INTERVAL,
            "--poll-wait",
            poll_wait,
            *extra,
        ]
        return self.processes.start("agent", args, {**base_env(), **(env or {})})

    def agent(self, agent_id: str) -> dict[str, Any]:
        response = self.api.get(f"/api/v1/agents/{agent_id}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    # workflows

    def apply(self, definition: dict[str, Any] | str) -> dict[str, Any]:
        source = definition if isinstance(definition, str) else yaml.safe_dump(definition)
        response = self.api.post(
            "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
        )
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def run(self, workflow: str, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.api.post(
            f"/api/v1/workflows/{workflow}/runs", json={"inputs": inputs or {}}
        )
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def execution(self, execution_id: str) -> dict[str, Any]:
        response = self.api.get(f"/api/v1/executions/{execution_id}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def step(self, execution_id: str, name: str) -> dict[str, Any]:
        steps = {s["name"]: s for s in self.execution(execution_id)["steps"]}
        return steps[name]

    def wait_finished(self, execution_id: str, timeout: float) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            execution = self.execution(execution_id)
            return execution if execution["status"] != "running" else None

        return wait_until(finished, timeout, f"execution {execution_id} to finish")

    def audit(self, subject_id: str) -> list[dict[str, Any]]:
        response = self.api.get("/api/v1/audit", params={"subject_id": subject_id})
        assert response.status_code == 200, response.text
        return response.json()["records"]  # type: ignore[no-any-return]


def wait_healthy(url: str, server: Process, timeout: float = 30) -> None:
    def healthy() -> bool:
        if not server.running:
            raise AssertionError(f"{server.name} exited with status {server.popen.returncode}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout, f"{server.name} to answer /healthz")


def recent(timestamp: str | None, seconds: float = 60) -> bool:
    if not timestamp:
        return False
    at = datetime.fromisoformat(timestamp)
    return abs((datetime.now(UTC) - at).total_seconds()) < seconds


# -- plugins ------------------------------------------------------------------------------

# What every test plugin starts with: the Stavily convention, `--input <file>` holding JSON.
PRELUDE = """\
import argparse, json, os, subprocess, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--input")  # only when the step has input (PLUGINS.md)
args, extra = parser.parse_known_args()
data = {}
if args.input:
    with open(args.input) as handle:
        data = json.load(handle)
config = data.get("input_data") or {}
context = data.get("context") or {}
"""


def write_plugin(
    root: Path, plugin_id: str, body: str, limits: dict[str, Any] | None = None
) -> Path:
    """A python plugin: plugin.yaml (the Stavily manifest) and its entry point main.py."""
    folder = root / plugin_id
    folder.mkdir(parents=True)
    manifest: dict[str, Any] = {
        "id": plugin_id,
        "name": plugin_id,
        "description": "an end-to-end test plugin",
        "version": "1.0.0",
        "type": "action",
        "runtime": {"type": "python", "version": "3.8+", "entry_point": "main.py"},
        "configuration": {},
    }
    if limits:
        manifest["limits"] = limits
    (folder / "plugin.yaml").write_text(yaml.safe_dump({"plugin": manifest}))
    (folder / "main.py").write_text(PRELUDE + textwrap.dedent(body))
    return folder


# Sleeps `seconds`, after appending its step's name to the file `marker` (one line per run).
SLOW_PLUGIN = """
with open(config["marker"], "a") as handle:
    handle.write(context["step"] + "\\n")
time.sleep(float(config.get("seconds", 0)))
json.dump({"step": context["step"], "slept": config.get("seconds", 0)}, sys.stdout)
"""


def marker_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def workflow(
    name: str, agent_name: str, steps: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """A workflow whose steps go only to the agent named `agent_name`."""
    return {
        "name": name,
        "version": "1.0.0",
        "agents": {"pools": [{"pool_name": "e2e", "agent_regex": re.escape(agent_name)}]},
        "actions": {"steps": steps},
        **extra,
    }
