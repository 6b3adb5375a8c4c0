"""`stavily quickstart`: the orchestrator on SQLite, one local agent, the example workflow run.

It talks only to the server it started: the port is checked before anything starts, and
the readiness wait is for that process (on Linux: until that process holds the listening
socket). Whatever goes wrong is said in a line or two on standard error, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from stavily.cli.plugins import pack

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
AGENT_NAME = "local-agent-1"
LOG_TAIL = 15


class QuickstartError(Exception):
    """What stops the quickstart: printed as `error: <message>`, then exit 1."""


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


# -- the port -------------------------------------------------------------------------------


def _bind_error(host: str, port: int) -> OSError | None:
    """Whether the server could listen on host:port now (bound the way uvicorn binds)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
    return None


def port_problem(host: str, port: int) -> str | None:
    """One line saying why the orchestrator cannot listen on host:port, or None."""
    error = _bind_error(host, port)
    if error is None:
        return None
    if error.errno == errno.EADDRINUSE:
        spare = next((p for p in range(port + 1, port + 50) if _bind_error(host, p) is None), None)
        other = f" --port {spare}" if spare else " --port <another port>"
        return (
            f"port {port} is in use (another server?): stop it or start the quickstart with{other}"
        )
    reason = error.strerror or str(error)
    return f"cannot listen on {host}:{port}: {reason}"


def _listening_inodes(port: int) -> set[str] | None:
    """The inodes of the sockets listening on `port` (Linux), or None where unknown."""
    inodes: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # LISTEN
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes if readable else None


def listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a socket listening on `port`; None where unknown."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[")[:-1] in inodes:
                return True
    return False


# -- the processes --------------------------------------------------------------------------


def log_tail(path: Path, start: int = 0, lines: int = LOG_TAIL) -> str:
    """The last `lines` lines written to `path` after byte `start`, indented."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in kept)


def _exited(what: str, process: subprocess.Popen[bytes], log: Path, start: int) -> str:
    tail = log_tail(log, start)
    message = f"the {what} exited with status {process.returncode}"
    return f"{message}; the end of {log}:\n{tail}" if tail else f"{message} (see {log})"


def wait_ready(
    url: str,
    port: int,
    server: subprocess.Popen[bytes],
    log: Path,
    log_start: int = 0,
    seconds: float = 60,
) -> None:
    """Until the server we started answers /healthz; QuickstartError if it exits first.

    Where the system tells (Linux), nothing is asked of the port before that process
    itself listens on it, so that another server taking the port meanwhile is never
    talked to: ours then fails to bind, exits, and that is what is reported."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise QuickstartError(_exited("orchestrator", server, log, log_start))
        if listens(server.pid, port) is not False:
            try:
                healthy = httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and server.poll() is None:
                return
        time.sleep(0.2)
    raise QuickstartError(
        f"the orchestrator did not become ready in {seconds:g}s; the end of {log}:\n"
        f"{log_tail(log, log_start)}"
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- what the user reads --------------------------------------------------------------------


def applied_line(status_code: int, workflow: dict[str, Any]) -> str:
    """The apply's outcome: a new version (201) or the same definition again (200)."""
    name = workflow.get("name", "hello-stavily")
    version = workflow.get("version")
    what = f"{name} version {version}" if version is not None else name
    return f"{what} ({'applied' if status_code == 201 else 'unchanged'})"


def stavily_command() -> str:
    """How this installation's `stavily` is reached from a shell."""
    script = Path(sys.prefix) / "bin" / "stavily"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m stavily.cli.main"
    on_path = shutil.which("stavily")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "stavily"
    return shlex.quote(str(script))


def cli_hint(url: str, token: str, execution_id: str | None) -> str:
    """The lines to paste into another shell to use the CLI on this orchestrator."""
    command = stavily_command()
    lines = []
    activate = Path(sys.prefix) / "bin" / "activate"
    if command != "stavily" and sys.prefix != sys.base_prefix and activate.exists():
        lines.append(f"source {shlex.quote(str(activate))}")
        command = "stavily"
    lines.append(f"export STAVILY_URL={url} STAVILY_TOKEN={token}")
    if execution_id:
        lines.append(f"{command} execution show {execution_id}")
    lines.append(f"{command} workflow list")
    lines.append(f"{command} fleet status")
    return "\n".join(f"    {line}" for line in lines)


def _summary(
    data_dir: Path,
    url: str,
    state: dict[str, Any],
    workflow: str,
    execution: dict[str, Any],
) -> str:
    lines = [
        "",
        f"Stavily Orchestrator is running on SQLite in {data_dir}",
        f"  URL:          {url}   (API docs: {url}/api/v1/docs)",
        f"  Admin token:  {state['token']}",
        f"  Agent:        {AGENT_NAME} ({state['agent_id']})",
        f"  Workflow:     {workflow}",
        f"  Execution:    {execution['id']}  -> {execution['status']}",
    ]
    for step in execution.get("steps", []):
        detail = json.dumps(step["result"])[:80] if step.get("result") else step.get("error") or ""
        lines.append(f"    {step['stage']:8} {step['name']:15} {step['status']:10} {detail}")
    lines += [
        "",
        "Use the CLI from another shell: paste",
        cli_hint(url, state["token"], execution["id"]),
        "",
        f"Logs: {data_dir}/orchestrator.log, {data_dir}/agent.log",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def _checked(response: httpx.Response, what: str) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body = response.json()
        detail = (body.get("error") or {}).get("message") or body
    except ValueError:
        detail = response.text
    raise QuickstartError(f"{what}: the orchestrator answered {response.status_code}: {detail}")


# -- the quickstart -------------------------------------------------------------------------


def publish_example(api: httpx.Client, folder: Path) -> None:
    """Publish an example plugin to the registry (the same content again is a no-op), so
    the example workflow's steps are pinned to it and the agent installs it from there."""
    with tempfile.TemporaryFile() as archive:
        pack(folder, archive)
        _checked(
            api.post(
                "/api/v1/plugins",
                content=archive.read(),
                headers={"Content-Type": "application/gzip"},
            ),
            f"publishing the example plugin {folder.name}",
        )


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # stop as on Ctrl-C: the agent and the server too


def run(port: int, data_dir: Path) -> int:
    host = os.environ.get("STAVILY_HOST", "127.0.0.1")
    problem = port_problem(host, port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(port, data_dir.resolve())
    except QuickstartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(port: int, data_dir: Path) -> int:
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
    server_log, agent_log = data_dir / "orchestrator.log", data_dir / "agent.log"
    server_start, agent_start = _size(server_log), _size(agent_log)
    server: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    try:
        with server_log.open("ab") as log:
            server = subprocess.Popen(
                [*cli, "serve", "--port", str(port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_ready(url, port, server, server_log, server_start)
        api = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {state['token']}"}, timeout=30
        )
        try:
            if "agent_id" not in state:
                created = _checked(
                    api.post(
                        "/api/v1/agents", json={"name": AGENT_NAME, "labels": {"site": "local"}}
                    ),
                    f"creating the agent {AGENT_NAME}",
                ).json()
                state.update(agent_id=created["agent_id"], agent_key=created["api_key"])
                _save(data_dir, state)
            with agent_log.open("ab") as log:
                agent = subprocess.Popen(
                    [
                        *cli,
                        "agent",
                        "run",
                        "--url",
                        url,
                        "--agent-id",
                        state["agent_id"],
                        # its own: it installs the published plugins there
                        "--plugins-dir",
                        str(data_dir / "agent-plugins"),
                        "--heartbeat-interval",
                        "10",
                    ],
                    env={**env, "STAVILY_AGENT_TOKEN": state["agent_key"]},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            for manifest in sorted((EXAMPLES / "plugins").glob("*/plugin.yaml")):
                publish_example(api, manifest.parent)
            source = (EXAMPLES / "workflows" / "hello-stavily.yaml").read_text()
            applied = _checked(
                api.post(
                    "/api/v1/workflows",
                    content=source,
                    headers={"Content-Type": "application/yaml"},
                ),
                "applying the example workflow",
            )
            workflow = applied_line(applied.status_code, applied.json())
            execution = _checked(
                api.post("/api/v1/workflows/hello-stavily/runs", json={"inputs": {"who": "you"}}),
                "running the example workflow",
            ).json()
            deadline = time.monotonic() + 60
            while execution["status"] == "running" and time.monotonic() < deadline:
                if agent.poll() is not None:
                    raise QuickstartError(_exited("agent", agent, agent_log, agent_start))
                time.sleep(0.3)
                execution = _checked(
                    api.get(f"/api/v1/executions/{execution['id']}"), "reading the execution"
                ).json()
        except httpx.HTTPError as error:
            raise QuickstartError(
                f"talking to the orchestrator at {url}: {error}"
                + (f"\n{log_tail(server_log, server_start)}" if server.poll() is not None else "")
            ) from None
        finally:
            api.close()
        print(_summary(data_dir, url, state, workflow, execution), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.wait()
        if server.returncode is not None and server.returncode > 0:
            message = _exited("orchestrator", server, server_log, server_start)
            print(f"error: {message}", file=sys.stderr)
            return 1
        return 0 if execution["status"] == "succeeded" else 1
    finally:
        for process in (agent, server):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
