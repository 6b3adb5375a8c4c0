"""`stavily quickstart` (what `./scripts/quickstart` runs once installed): start and stop.

A busy port is said in one line, before anything starts and without talking to whoever
holds it; the readiness wait is for the process the quickstart started; a normal start
prints the lines to paste to use the CLI, and those lines work.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stavily.cli import quickstart
from tests.e2e.support import CLI, Processes, base_env, descendants, process_alive, wait_until
from tests.harness import free_port

pytestmark = pytest.mark.e2e

READY = "Press Ctrl-C to stop."


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain socket listening on a loopback port, accepting nothing by itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        yield sock


def _quickstart(port: int, data_dir: Path) -> list[str]:
    return [*CLI, "quickstart", "--port", str(port), "--data-dir", str(data_dir)]


def test_a_busy_port_is_said_in_one_line_before_anything_starts(
    listener: socket.socket, tmp_path: Path
) -> None:
    port = listener.getsockname()[1]
    data_dir = tmp_path / "data"
    started = time.monotonic()
    done = subprocess.run(
        _quickstart(port, data_dir), env=base_env(), capture_output=True, text=True, timeout=30
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert elapsed < 10, elapsed
    assert output.strip().count("\n") == 0, output
    assert f"port {port} is in use" in output
    assert "--port" in output  # and how to choose another
    assert "Traceback" not in output
    with pytest.raises(BlockingIOError):  # nobody connected to the port's holder
        listener.accept()
    assert not data_dir.exists()  # nothing was started or written


def test_port_problem_names_the_port_and_a_free_one(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    problem = quickstart.port_problem("127.0.0.1", port)
    assert problem is not None
    assert problem.startswith(f"port {port} is in use (another server?)")
    spare = int(problem.rsplit("--port ", 1)[1])
    assert spare != port
    assert quickstart.port_problem("127.0.0.1", spare) is None
    assert quickstart.port_problem("127.0.0.1", free_port()) is None


class _Healthy(BaseHTTPRequestHandler):
    """Another server on the port: answers /healthz and counts who asked."""

    asked = 0

    def do_GET(self) -> None:
        type(self).asked += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: object) -> None:
        pass


def test_the_readiness_wait_is_for_the_process_it_started(tmp_path: Path) -> None:
    """Another server answers /healthz on the port and the process started never listens:
    the wait reports that process's exit and the end of its log, and never asks the other
    server anything."""
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    port = other.server_address[1]
    if quickstart.listens(os.getpid(), port) is None:
        pytest.skip("this system does not tell which process listens on a port")
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    log = tmp_path / "orchestrator.log"
    log.write_text("a line from an earlier start\n")
    start = log.stat().st_size
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "import time; print('starting up', flush=True); time.sleep(1)"],
            stdout=out,
            stderr=out,
        )
    try:
        with pytest.raises(quickstart.QuickstartError) as raised:
            quickstart.wait_ready(f"http://127.0.0.1:{port}", port, process, log, start, 20)
    finally:
        process.kill()
        process.wait()
        other.shutdown()
        other.server_close()
    message = str(raised.value)
    assert message.startswith("the orchestrator exited with status 0"), message
    assert "starting up" in message
    assert "earlier start" not in message
    assert _Healthy.asked == 0


def test_an_orchestrator_that_refuses_to_start_is_reported_without_traceback(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "quickstart.json").write_text(json.dumps({"token": "weak"}))
    done = subprocess.run(
        _quickstart(free_port(), data_dir),
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert done.stderr.startswith("error: the orchestrator exited with status 2"), output
    assert "STAVILY_BOOTSTRAP_TOKEN is too weak" in done.stderr  # the end of its log
    assert "Traceback" not in output


def test_the_apply_line_reads_well_for_a_new_version_and_an_unchanged_one() -> None:
    workflow = {"name": "hello-stavily", "version": 3}
    assert quickstart.applied_line(201, workflow) == "hello-stavily version 3 (applied)"
    assert quickstart.applied_line(200, workflow) == "hello-stavily version 3 (unchanged)"
    assert quickstart.applied_line(200, {}) == "hello-stavily (unchanged)"


def test_the_cli_hint_is_lines_to_paste() -> None:
    hint = quickstart.cli_hint("http://127.0.0.1:8700", "stv_secret", "exe_1")
    lines = [line.strip() for line in hint.splitlines()]
    assert "export STAVILY_URL=http://127.0.0.1:8700 STAVILY_TOKEN=stv_secret" in lines
    assert "TOKEN=" not in hint.replace("STAVILY_TOKEN=", "")
    assert any(line.endswith("execution show exe_1") for line in lines), lines
    if sys.prefix != sys.base_prefix and quickstart.stavily_command() != "stavily":
        assert lines[0] == f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"


def _hint_lines(stdout: str) -> list[str]:
    block = stdout.split("Use the CLI from another shell: paste\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines()]


def _run_pasted(lines: list[str], command: str) -> subprocess.CompletedProcess[str]:
    """The pasted lines, then `command`, in a fresh shell without any STAVILY_* setting."""
    script = "\n".join(["set -e", *lines[:2], command])
    if not lines[0].startswith("source "):
        script = "\n".join(["set -e", lines[0], command])
    return subprocess.run(
        ["bash", "-c", script], env=base_env(), capture_output=True, text=True, timeout=60
    )


def _start_check_and_stop(processes: Processes, port: int, data_dir: Path, again: bool) -> str:
    """One quickstart: ready, its pasted lines work, SIGTERM stops it and its children."""
    running = processes.start("quickstart", _quickstart(port, data_dir), base_env())
    wait_until(
        lambda: READY in running.stdout() or not running.running,
        90,
        "the quickstart to be ready",
        interval=0.2,
    )
    stdout = running.stdout()
    assert READY in stdout, stdout + running.stderr()
    assert "Traceback" not in stdout + running.stderr()
    assert "-> succeeded" in stdout
    assert "export TOKEN=" not in stdout

    lines = _hint_lines(stdout)
    token = json.loads((data_dir / "quickstart.json").read_text())["token"]
    assert f"export STAVILY_URL=http://127.0.0.1:{port} STAVILY_TOKEN={token}" in lines
    show = next(line for line in lines if " execution show " in line)
    execution_id = show.rsplit(" ", 1)[1]
    done = _run_pasted(lines, show)
    assert done.returncode == 0, done.stdout + done.stderr
    assert execution_id in done.stdout and "succeeded" in done.stdout
    done = _run_pasted(lines, "stavily workflow list")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hello-stavily" in done.stdout
    applied = next(line for line in stdout.splitlines() if "Workflow:" in line)
    if again:  # a new version while the server makes one; "unchanged" once it does not
        assert applied.endswith(("(applied)", "(unchanged)")), applied
    else:
        assert applied.endswith("version 1 (applied)"), applied

    children = descendants(running.pid)
    assert len(children) >= 2  # the orchestrator and the agent
    os.kill(running.pid, signal.SIGTERM)  # stops as on Ctrl-C
    running.wait(30)
    wait_until(
        lambda: not any(process_alive(pid) for pid in children),
        20,
        "the orchestrator and the agent to stop",
    )
    return stdout


def test_a_start_prints_lines_to_paste_that_work_and_a_stop_stops_everything(
    processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    first = _start_check_and_stop(processes, port, data_dir, again=False)
    # A second start reuses the data, the token and the agent.
    second = _start_check_and_stop(processes, port, data_dir, again=True)
    tokens = [
        line for out in (first, second) for line in out.splitlines() if "Admin token:" in line
    ]
    assert len(tokens) == 2 and tokens[0] == tokens[1], tokens
    agents = [line for out in (first, second) for line in out.splitlines() if "Agent:" in line]
    assert agents[0] == agents[1], agents
