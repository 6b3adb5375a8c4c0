"""A stand-in for the official Stavily agent (a Go program), for end-to-end tests.

It speaks exactly what /work/shared/design/AGENT_API.md says the official agents speak,
and nothing of our extensions: polls with no query string, one loop with two timers
(heartbeat and poll, each first firing one interval after start), one instruction at a
time with no heartbeat and no poll meanwhile, one `executing` progress update, one
result POST never retried, `plugin_install`/`plugin_update` as a shallow git fetch into
`<plugins-dir>/<plugin_id>` (nothing verified), `execute` with `--input <file>` only when
`input_data` is non-empty (PLUGINS.md, "How plugins speak"), stdout and stderr merged.
On SIGTERM while idle it sends one last heartbeat `{"status": "offline"}`; during an
instruction it sends neither the result nor that heartbeat.

    python tests/official_agent.py --url U --agent-id ID --token T --plugins-dir D \
        [--poll-interval 10] [--heartbeat-interval 30]

Only the standard library and httpx.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

VERSION = "1.0.0"


class Terminated(Exception):
    """SIGTERM: raised from the handler wherever the loop happens to be."""


class Failure(Exception):
    """An instruction failed; `error_type` is what the Go agent reports (`%T`)."""

    def __init__(self, message: str, error_type: str = "*errors.errorString") -> None:
        super().__init__(message)
        self.error_type = error_type


def rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamped(line: str) -> str:
    return f"[{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3]}Z] {line}"


def say(message: str) -> None:
    print(f"{rfc3339()} official-agent: {message}", flush=True)


class OfficialAgent:
    def __init__(self, args: argparse.Namespace) -> None:
        token = args.token.removeprefix("Bearer ")
        self.agent_id = args.agent_id
        self.plugins = Path(args.plugins_dir)
        self.poll_interval = args.poll_interval
        self.heartbeat_interval = args.heartbeat_interval
        # A base URL ending in "/" gives "//agents/v1/...": the Go agents join strings.
        self.base = f"{args.url}/agents/v1/{self.agent_id}"
        self.http = httpx.Client(
            timeout=30,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": f"Stavily-Agent/{VERSION}",
            },
        )
        self.busy = False

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        next_beat = started + self.heartbeat_interval
        next_poll = started + self.poll_interval
        say(f"started, agent {self.agent_id}, plugins in {self.plugins}")
        try:
            while True:
                now = time.monotonic()
                if now >= next_beat:
                    self.heartbeat("online")
                    next_beat = max(next_beat + self.heartbeat_interval, now)
                elif now >= next_poll:
                    instruction = self.poll()
                    if instruction is not None:
                        self.busy = True
                        self.process(instruction)
                        self.busy = False
                    next_poll = max(next_poll + self.poll_interval, now)
                else:
                    time.sleep(min(next_beat, next_poll) - now)
        except Terminated:
            if self.busy:
                say("terminated during an instruction: no result, no offline heartbeat")
                return 0
            self.heartbeat("offline")
            say("stopped")
            return 0

    def heartbeat(self, status: str) -> None:
        body = {"timestamp": rfc3339(), "status": status}
        try:
            answer = self.http.post(f"{self.base}/heartbeat", json=body)
            if answer.status_code not in (200, 204):
                say(f"heartbeat failed: {answer.status_code} {answer.text}")
        except httpx.HTTPError as error:
            say(f"heartbeat failed: {error!r}")

    def poll(self) -> dict[str, Any] | None:
        try:
            answer = self.http.get(f"{self.base}/instructions")
        except httpx.HTTPError as error:
            say(f"poll failed: {error!r}")
            return None
        if answer.status_code != 200:  # 204 included: the Go agents want 200
            say(f"poll failed: {answer.status_code} {answer.text}")
            return None
        instruction: dict[str, Any] | None = answer.json().get("instruction")
        return instruction

    # -- one instruction --------------------------------------------------------------

    def process(self, instruction: dict[str, Any]) -> None:
        iid = instruction["id"]
        kind = instruction.get("instruction_type") or ""
        config = instruction.get("plugin_configuration") or {}
        if not kind:
            kind = (
                "plugin_install"
                if "plugin_url" in config or "repository_url" in config
                else "execute"
            )
        say(f"instruction {iid}: {kind} {instruction.get('plugin_id')}")
        log = ["Instruction received", stamped("Started plugin execution")]
        self.send("PUT", iid, {"status": "executing", "execution_log": log})
        try:
            if kind in ("plugin_install", "plugin_update"):
                result = self.install(instruction, replace=kind == "plugin_update")
            elif kind == "execute":
                result = self.execute(instruction)
            else:
                raise Failure(f"unsupported instruction type: {kind}")
        except Failure as failure:
            log.append(stamped(f"Error occurred: {failure}"))
            body = {
                "status": "failed",
                "error_message": str(failure),
                "error_details": {"error_type": failure.error_type, "timestamp": rfc3339()},
                "execution_log": log,
            }
        else:
            log.append(stamped("Task completed successfully"))
            body = {"status": "completed", "result": result, "execution_log": log}
        self.send("POST", f"{iid}/result", body)

    def send(self, method: str, path: str, body: dict[str, Any]) -> None:
        """Once: a failed progress update or result is only logged, never retried."""
        try:
            answer = self.http.request(method, f"{self.base}/instructions/{path}", json=body)
            outcome = f"{answer.status_code} {answer.text}"
        except httpx.HTTPError as error:
            outcome = repr(error)
        say(f"{method} {path} {body.get('status')}: {outcome}")

    def install(self, instruction: dict[str, Any], replace: bool) -> dict[str, Any]:
        started = time.monotonic()
        config = instruction.get("plugin_configuration") or {}
        target = self.plugins / instruction["plugin_id"]
        url = config.get("plugin_url") or config.get("repository_url")
        if not url:
            raise Failure("plugin_url or repository_url is required for plugin installation")
        logs: list[str] = []
        if target.exists() and not replace:
            logs.append(f"plugin already installed at {target}")
        else:
            ref = (
                config.get("commit_hash")
                or config.get("tag")
                or config.get("branch")
                or config.get("plugin_version")
                or "main"
            )
            self.plugins.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".clone-", dir=self.plugins))
            try:
                for command in (
                    ["git", "init", "-q", str(scratch)],
                    ["git", "-C", str(scratch), "fetch", "-q", "--depth", "1", url, ref],
                    ["git", "-C", str(scratch), "checkout", "-q", "FETCH_HEAD"],
                ):
                    done = subprocess.run(
                        command, capture_output=True, text=True, timeout=300, check=False
                    )
                    logs.append(f"{' '.join(command)}\n{done.stdout}{done.stderr}")
                    if done.returncode != 0:
                        raise Failure(
                            f"git clone failed: exit status {done.returncode}, output: "
                            f"{done.stdout}{done.stderr}",
                            "*fmt.wrapError",
                        )
                shutil.rmtree(target, ignore_errors=True)
                scratch.rename(target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return {
            "install_result": {
                "installed_path": str(target),
                "logs": logs,
                "duration": round(time.monotonic() - started, 3),
            }
        }

    def execute(self, instruction: dict[str, Any]) -> dict[str, Any]:
        config = instruction.get("plugin_configuration") or {}
        entrypoint = config.get("entrypoint")
        if not isinstance(entrypoint, str) or not entrypoint:
            raise Failure("entrypoint is required for plugin execution")
        folder = self.plugins / instruction["plugin_id"]
        if not folder.is_dir():
            raise Failure(f"plugin not installed: {instruction['plugin_id']}")
        command = (
            ["python3", entrypoint] if entrypoint.endswith(".py") else [str(folder / entrypoint)]
        )
        command += [str(a) for a in config.get("arguments") or []]
        environment = {
            **os.environ,
            **{k: str(v) for k, v in (config.get("environment") or {}).items()},
        }
        input_file = None
        if instruction.get("input_data"):
            input_file = folder / "input.json"
            document = {
                "input_data": instruction["input_data"],
                "context": instruction.get("context") or {},
                "variables": instruction.get("variables") or {},
            }
            input_file.write_text(json.dumps(document))
            command += ["--input", str(input_file)]
        start, began = datetime.now(UTC), time.monotonic()
        try:
            done = subprocess.run(
                command,
                cwd=folder,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # merged, as the Go agent's CombinedOutput
                timeout=instruction.get("timeout_seconds") or 300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Failure("signal: killed", "*exec.ExitError") from None
        except OSError as error:
            raise Failure(str(error), "*fs.PathError") from None
        finally:
            if input_file is not None:
                input_file.unlink(missing_ok=True)
        duration = round(time.monotonic() - began, 3)
        output = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            raise Failure(f"exit status {done.returncode}", "*exec.ExitError")
        execution: dict[str, Any] = {
            "plugin_id": instruction["plugin_id"],
            "success": True,
            "exit_code": 0,
            "duration": duration,
            "logs": [output],
        }
        if output.strip():
            try:
                parsed = json.loads(output)
            except ValueError:
                parsed = None
            execution["output_data"] = (
                parsed if isinstance(parsed, dict) else {"raw_output": output.strip()}
            )
        return {
            "instruction_id": instruction["id"],
            "duration": duration,
            "start_time": start.isoformat().replace("+00:00", "Z"),
            "end_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "logs": ["Starting plugin execution", "Plugin execution completed successfully"],
            "execution_result": execution,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--plugins-dir", required=True)
    parser.add_argument("--poll-interval", type=float, default=10)
    parser.add_argument("--heartbeat-interval", type=float, default=30)
    args = parser.parse_args(argv)

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    return OfficialAgent(args).run()


if __name__ == "__main__":
    sys.exit(main())
