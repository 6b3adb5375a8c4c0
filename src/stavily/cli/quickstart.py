"""`stavily quickstart`: the orchestrator on SQLite, one local agent, the example workflow run."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
AGENT_NAME = "local-agent-1"


def _state(data_dir: Path) -> dict[str, Any]:
    """The quickstart's own secrets, kept beside the data so a second start reuses them."""
    path = data_dir / "quickstart.json"
    if path.exists():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    state = {"token": f"stv_{secrets.token_urlsafe(32)}"}
    _save(data_dir, state)
    return state


def _save(data_dir: Path, state: dict[str, Any]) -> None:
    path = data_dir / "quickstart.json"
    path.write_text(json.dumps(state))
    path.chmod(0o600)


def _wait_healthy(url: str, server: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the orchestrator exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the orchestrator did not become healthy in time")


def run(port: int, data_dir: Path) -> int:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    state = _state(data_dir)
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "STAVILY_DATA_DIR": str(data_dir),
        "STAVILY_BOOTSTRAP_TOKEN": state["token"],
    }
    env.pop("STAVILY_DATABASE_URL", None)
    cli = [sys.executable, "-m", "stavily.cli.main"]
    log = (data_dir / "orchestrator.log").open("ab")
    server = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env, stdout=log, stderr=log)
    agent: subprocess.Popen[bytes] | None = None
    try:
        _wait_healthy(url, server)
        api = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {state['token']}"}, timeout=30
        )
        if "agent_id" not in state:
            created = api.post(
                "/api/v1/agents", json={"name": AGENT_NAME, "labels": {"site": "local"}}
            )
            created.raise_for_status()
            state.update(agent_id=created.json()["agent_id"], agent_key=created.json()["api_key"])
            _save(data_dir, state)
        agent_log = (data_dir / "agent.log").open("ab")
        agent = subprocess.Popen(
            [
                *cli,
                "agent",
                "run",
                "--url",
                url,
                "--agent-id",
                state["agent_id"],
                "--plugins-dir",
                str(EXAMPLES / "plugins"),
                "--heartbeat-interval",
                "10",
            ],
            env={**env, "STAVILY_AGENT_TOKEN": state["agent_key"]},
            stdout=agent_log,
            stderr=agent_log,
        )
        source = (EXAMPLES / "workflows" / "hello-stavily.yaml").read_text()
        api.post(
            "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
        ).raise_for_status()
        run = api.post("/api/v1/workflows/hello-stavily/runs", json={"inputs": {"who": "you"}})
        run.raise_for_status()
        execution_id = run.json()["id"]
        execution = run.json()
        deadline = time.monotonic() + 60
        while execution["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.3)
            execution = api.get(f"/api/v1/executions/{execution_id}").json()
        print(f"""
Stavily Orchestrator is running on SQLite in {data_dir}
  URL:          {url}   (API docs: {url}/api/v1/docs)
  Admin token:  {state["token"]}
  Agent:        {AGENT_NAME} ({state["agent_id"]})
  Execution:    {execution_id}  -> {execution["status"]}""")
        for step in execution.get("steps", []):
            print(
                f"    {step['stage']:8} {step['name']:15} {step['status']:10} "
                f"{json.dumps(step['result'])[:80] if step['result'] else step['error'] or ''}"
            )
        print(
            f"""
  Look at it:   export TOKEN={state["token"]}
                curl -H "Authorization: Bearer $TOKEN" {url}/api/v1/executions/{execution_id}
  Logs:         {data_dir}/orchestrator.log, {data_dir}/agent.log
Press Ctrl-C to stop.""",
            flush=True,
        )
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
        return 0 if execution["status"] == "succeeded" else 1
    finally:
        for process in (agent, server):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
