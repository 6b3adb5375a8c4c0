"""Fleet benchmark: heartbeats from 10,000 agents, and how fast a dead agent's work moves.

    python bench/bench_fleet.py [--backend sqlite|postgresql|both] [--quick]
    python bench/bench_fleet.py --backend sqlite --quick --py-spy   # where the server's time goes

Each backend gets a fresh database per test and a real `stavily serve` subprocess
(STAVILY_HEARTBEAT_INTERVAL=5, STAVILY_REAPER_INTERVAL=1), driven over loopback HTTP:

1. Heartbeat ingestion: 10,000 agents (--quick: 2,000) are created through
   POST /api/v1/agents from several processes; then `wrk` posts their heartbeats for
   20 s (--quick: 10 s), each agent once every 5 s: 2,000 a second (--quick: 400).
   Plain wrk has no rate control (-R is wrk2's), so wrk_fleet.lua paces every wrk thread
   with delay(): each request waits for the next slot of its thread's schedule. The
   achieved rate shows whether the server kept up. A short unpaced run then gives the
   sustained maximum, and wrk on GET /healthz (no database work) the load generator's
   own ceiling. Reported: rate, latency p50/p99 (service time from sending the request;
   a request waiting for a free connection is not counted), non-2xx, database write
   transactions a second, CPU (and the server's CPU per heartbeat, the figure least
   disturbed by other work on the machine), and whether every agent's heartbeat arrived
   (no agent went offline, every last_heartbeat_at recent). Each wrk connection carries
   many agents' beats over keep-alive (-c 200), unlike 10,000 real agents.

   Database writes are counted in the database, during the steady part of the paced run:
   - PostgreSQL: pg_stat_database of the benchmark database alone, sampled every 0.5 s
     from another database: xact_commit counts the server's write transactions (its
     db.write() blocks end with COMMIT, including the reaper's that change nothing), and
     xact_rollback its read transactions (SQLAlchemy ends a read-only connection's
     transaction with ROLLBACK); also rows inserted, updated and deleted. Backends publish
     these counters about once a second; the window is the run less its first 1.5 s and
     last 0.5 s, the same as for SQLite.
   - SQLite: commits that changed the file, seen by a separate reader that polls
     PRAGMA data_version every millisecond (two commits within one poll count once;
     read-only and no-op write transactions are not seen).

2. Dead-agent detection: two real reference agents (`stavily agent run
   --heartbeat-interval 5`) whose plugin sleeps 60 s; one workflow step pinned by a pool
   regex matching both. Once one of them (A) runs the step (GET /api/v1/executions/{id}
   shows the step running on A, and the plugin has started), A is killed with SIGKILL,
   and the time until the step runs again on the other (B, attempt 2) is measured, 3
   times (--quick: 1). Target: under 2 x the heartbeat interval (10 s). A wait is given
   up after --detect-limit seconds; then the agent's and the step's state are shown.

3. A dead official agent: two agents speaking exactly the official protocol (their
   User-Agent, no query strings, silent while "running"); A takes a step with a 5 s
   timeout, says `executing` and then sends nothing (killed, or SIGTERM: it sends nothing
   either); B polls every second. Measured: the time until B is handed attempt 2, against
   timeout + STAVILY_LEASE_GRACE (5 s for this test) + a reaper turn + B's poll.

PostgreSQL: STAVILY_BENCH_DATABASE_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test) names the server; a fresh database is
created for each test and dropped afterwards. wrk: Debian package `wrk`. Nothing here is
collected by pytest. Exit status 1 when a check failed or a target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_agent_api as base  # noqa: E402
from bench.bench_agent_api import (  # noqa: E402
    CpuMeter,
    Server,
    admin_client,
    cpu_line,
    create_agents_proc,
    fresh_database,
    load,
    parallel,
    pg_admin_dsn,
    say,
    split,
)

HERE = Path(__file__).resolve().parent
FLEET_LUA = HERE / "wrk_fleet.lua"
DEFAULT_PG_URL = base.DEFAULT_PG_URL
INTERVAL = 5  # seconds between heartbeats, the agents' and the server's
SERVER_ENV = {
    "STAVILY_HEARTBEAT_INTERVAL": str(INTERVAL),
    "STAVILY_REAPER_INTERVAL": "1",
}
SLEEP_SECONDS = 60
SLEEPER_MANIFEST = """\
plugin:
  id: sleeper
  name: Sleeper
  description: Sleeps, so that its agent can be killed mid-step.
  version: 1.0.0
  type: action
  runtime:
    type: python
    entry_point: sleeper.py
"""
# The agent's name and the marker folder are written in: a plugin gets a minimal
# environment, and each agent has its own plugins folder, as on its own machine.
SLEEPER_SCRIPT = """\
import os, time
from pathlib import Path
Path({markers!r}, {agent!r} + "." + str(os.getpid())).touch()
time.sleep({seconds})
print('{{"slept": {seconds}}}')
"""


def dead_workflow(name: str, regex: str) -> str:
    return f"""
name: {name}
version: "1.0.0"
actions:
  steps:
    - name: sleep
      plugin: sleeper
      timeout: {SLEEP_SECONDS * 2}s
      agents:
        pools:
          - pool_name: bench-dead
            agent_regex: "{regex}"
"""


# -- plumbing --------------------------------------------------------------------------------


@contextlib.contextmanager
def server_env(extra: dict[str, str]) -> Iterator[None]:
    """Server.start() passes os.environ on: add the benchmark's settings for its start."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_fleet_wrk(
    url: str, mode: str, duration: float, threads: int, connections: int, *extra: str
) -> dict[str, Any]:
    """bench_agent_api's wrk runner, with this benchmark's script."""
    with mock.patch.object(base, "LUA_SCRIPT", FLEET_LUA):
        return base.run_wrk(url, mode, duration, threads, connections, *extra)


def wrk_ceiling(url: str, duration: float, threads: int, connections: int) -> dict[str, Any]:
    """wrk's own ceiling: GET /healthz (no database work), bench_agent_api's script."""
    return base.run_wrk(url, "healthz", duration, threads, connections)


class WriteCounter:
    """Counts the database's write transactions in a background thread (see the docstring)."""

    def __init__(self, database_url: str, pg_url: str) -> None:
        self.database_url = database_url
        self.pg_url = pg_url
        self.sqlite = database_url.startswith("sqlite")
        # (t, xact_commit, xact_rollback, rows)
        self.samples: list[tuple[float, int, int, int]] = []
        self.commits: list[float] = []  # SQLite: when each commit was seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: str | None = None

    @property
    def method(self) -> str:
        if self.sqlite:
            return "commits that changed the SQLite file (reader polling PRAGMA data_version, 1 ms)"
        return (
            "pg_stat_database of the benchmark database: xact_commit = write transactions "
            "(every db.write(), also those that change nothing), xact_rollback = read "
            "transactions (SQLAlchemy ends them with ROLLBACK)"
        )

    def __enter__(self) -> WriteCounter:
        self._thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            if self.sqlite:
                self._run_sqlite()
            else:
                asyncio.run(self._run_pg())
        except Exception as exc:  # reported, not fatal
            self.error = repr(exc)

    def _run_sqlite(self) -> None:
        path = self.database_url.split("///", 1)[1]
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            while not self._stop.is_set():
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    last = version
                    self.commits.append(time.monotonic())
                time.sleep(0.001)
        finally:
            conn.close()

    async def _run_pg(self) -> None:
        import asyncpg
        from sqlalchemy.engine import make_url

        name = make_url(self.database_url).database
        conn = await asyncpg.connect(pg_admin_dsn(self.pg_url))  # not the benchmark's database
        try:
            while not self._stop.is_set():
                row = await conn.fetchrow(
                    "SELECT xact_commit, xact_rollback, "
                    "tup_updated + tup_inserted + tup_deleted AS rows "
                    "FROM pg_stat_database WHERE datname = $1",
                    name,
                )
                self.samples.append(
                    (
                        time.monotonic(),
                        int(row["xact_commit"]),
                        int(row["xact_rollback"]),
                        int(row["rows"]),
                    )
                )
                await asyncio.sleep(0.5)
        finally:
            await conn.close()

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Rates between two monotonic times."""
        if self.sqlite:
            seen = [t for t in self.commits if start <= t <= end]
            return {"writes": len(seen) / (end - start), "seconds": end - start}
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, c0, b0, r0), (t1, c1, b1, r1) = inside[0], inside[-1]
        seconds = t1 - t0
        return {
            "writes": (c1 - c0) / seconds,
            "xact_commit": (c1 - c0) / seconds,
            "xact_rollback": (b1 - b0) / seconds,
            "rows": (r1 - r0) / seconds,
            "seconds": seconds,
        }


def db_scalar(database_url: str, sql: str) -> Any:
    """One value read from the server's database directly (it may still be running)."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[1]
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return conn.execute(sql).fetchone()[0]
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(pg_admin_dsn(database_url))
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def parse_time(text: str | None) -> float | None:
    from datetime import datetime

    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- 1. heartbeat ingestion ------------------------------------------------------------------


def heartbeat_test(backend: str, options: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with fresh_database(backend, tmp, options.pg_url) as database_url:
        server = Server(backend, database_url, tmp / "data-hb", tmp / "server-hb.log")
        with server_env(SERVER_ENV):
            server.start()
        say(f"  server on {server.url} (load average {load()})")
        try:
            _heartbeat_test(server, database_url, options, tmp, result)
        finally:
            server.stop()
            result["server_problems"] = server.problems()
            report_problems(server, result["server_problems"])
    return result


def _heartbeat_test(
    server: Server,
    database_url: str,
    options: argparse.Namespace,
    tmp: Path,
    result: dict[str, Any],
) -> None:
    say(
        f"  creating {options.agents} agents through POST /api/v1/agents "
        f"({options.create_procs} processes) ..."
    )
    names = [f"fleet-{i:05d}" for i in range(options.agents)]
    began = time.monotonic()
    chunks = split(names, options.create_procs)
    created = [
        pair
        for chunk in parallel(create_agents_proc, server.url, chunks, options.create_procs)
        for pair in chunk
    ]
    took = time.monotonic() - began
    result["created"] = len(created)
    result["create_rate"] = len(created) / took
    say(f"    {len(created)} agents in {took:.1f} s ({len(created) / took:.0f}/s)")
    credentials = tmp / "credentials.txt"
    credentials.write_text("".join(f"{agent_id} {key}\n" for agent_id, key in created))
    threads, connections = options.wrk_threads, options.wrk_connections
    target = len(created) / INTERVAL

    say(f"  wrk ceiling: GET /healthz, {options.ceiling_duration:g} s ...")
    cpu = CpuMeter(server)
    ceiling = wrk_ceiling(server.url, options.ceiling_duration, threads, connections)
    ceiling["cpu"] = cpu.stop()
    result["ceiling"] = ceiling
    say(
        f"    {ceiling['rate']:.0f} requests/s, p50 {ceiling['p50_us'] / 1000:.2f} ms, "
        f"p99 {ceiling['p99_us'] / 1000:.2f} ms"
    )

    say(
        f"  wrk paced: every agent beats once per {INTERVAL} s (target {target:.0f}/s), "
        f"{options.duration:g} s, {threads} threads, {connections} connections ..."
    )
    spy = base.PySpy.start(server, options, "heartbeat")
    with WriteCounter(database_url, options.pg_url) as writes:
        cpu = CpuMeter(server)
        began = time.monotonic()
        paced = run_fleet_wrk(
            server.url,
            "paced",
            options.duration,
            threads,
            connections,
            str(credentials),
            str(INTERVAL),
            str(threads),
        )
        paced["cpu"] = cpu.stop()
        wall_ended = time.time()
        if spy:
            result["pyspy"] = spy.stop()
        # The steady part: from 1.5 s in to 0.5 s before the end.
        counted = writes.window(began + 1.5, began + options.duration - 0.5)
    # Told to beat less often (the server stretching its fleet's beats), the fleet's due
    # rate is what that interval gives.
    told = max(INTERVAL, paced.get("told_s") or 0)
    if told > INTERVAL:
        say(f"    the server told the agents to beat every {told} s (stretched from {INTERVAL} s)")
        target = len(created) / told
    paced["told"] = told
    paced["target"] = target
    paced["writes"] = counted
    paced["write_method"] = writes.method
    paced["write_error"] = writes.error
    result["paced"] = paced
    say(
        f"    {paced['rate']:.0f} heartbeats/s of {target:.0f} target; p50 "
        f"{paced['p50_us'] / 1000:.2f} ms, p99 {paced['p99_us'] / 1000:.2f} ms, max "
        f"{paced['max_us'] / 1000:.0f} ms; non-2xx {paced['non2xx']} (429: "
        f"{paced['status429']}, other 4xx {paced['status4xx']}, 5xx {paced['status5xx']}); "
        f"socket errors {paced['socket_errors']}; schedule behind at most "
        f"{paced['max_behind_us'] / 1000:.0f} ms, beats dropped {paced['dropped_slots']}"
    )
    say(f"    {cpu_line(paced['cpu'])}")
    say(f"    database writes ({writes.method}): {describe_writes(counted, paced['rate'])}")
    if writes.error:
        say(f"    NOTE: the write counter failed: {writes.error}")

    # Did every beat land? Wait for the flush (0.5 s), then ask the API and the database
    # at once: an agent whose last beat came a whole interval before the end would be
    # late soon after (degraded 1.2 intervals after its last beat).
    time.sleep(0.7)
    result["delivery"] = delivery_check(
        server, database_url, {a for a, _ in created}, wall_ended, told
    )
    d = result["delivery"]
    say(
        f"    after the paced run: {d['recent']}/{d['agents']} agents with a heartbeat in its "
        f"last {told + 1} s (API), health {d['health']}, agent.offline audit records "
        f"{d['offline_records']}"
    )

    say(
        f"  wrk max: no pacing, {options.max_duration:g} s, {threads} threads, "
        f"{connections} connections ..."
    )
    cpu = CpuMeter(server)
    fastest = run_fleet_wrk(
        server.url,
        "max",
        options.max_duration,
        threads,
        connections,
        str(credentials),
        str(INTERVAL),
        str(threads),
    )
    fastest["cpu"] = cpu.stop()
    result["max"] = fastest
    say(
        f"    {fastest['rate']:.0f} heartbeats/s ({fastest['rate'] / target:.2f} x the "
        f"target); p50 {fastest['p50_us'] / 1000:.2f} ms, p99 {fastest['p99_us'] / 1000:.2f} "
        f"ms; non-2xx {fastest['non2xx']}, socket errors {fastest['socket_errors']}"
    )
    say(f"    {cpu_line(fastest['cpu'])}")


def describe_writes(counted: dict[str, Any], beats: float) -> str:
    if not counted:
        return "no figures"
    text = f"{counted['writes']:.1f} write transactions/s"
    if "xact_commit" in counted:
        text += (
            f" (xact_commit); read transactions {counted['xact_rollback']:.0f}/s "
            f"(xact_rollback, {counted['xact_rollback'] / max(beats, 1):.2f} per heartbeat); "
            f"rows written {counted['rows']:.0f}/s"
        )
    return text + f" (over {counted['seconds']:.1f} s)"


def delivery_check(
    server: Server, database_url: str, ids: set[str], ended: float, interval: float
) -> dict[str, Any]:
    """After the paced run: every agent heard from within its last interval, none offline."""
    with admin_client(server.url) as api:
        listed = api.get("/api/v1/agents")
    listed.raise_for_status()
    ours = [a for a in listed.json()["agents"] if a["id"] in ids]
    health: dict[str, int] = {}
    recent = 0
    for agent in ours:
        health[agent.get("health", "?")] = health.get(agent.get("health", "?"), 0) + 1
        beat = parse_time(agent.get("last_heartbeat_at"))
        if beat is not None and beat >= ended - interval - 1:
            recent += 1
    offline = db_scalar(
        database_url, "SELECT count(*) FROM audit_records WHERE action = 'agent.offline'"
    )
    return {
        "agents": len(ids),
        "listed": len(ours),
        "recent": recent,
        "health": health,
        "offline_records": int(offline),
        "ok": recent == len(ids) and int(offline) == 0 and health.get("online") == len(ids),
    }


# -- 2. dead-agent detection -----------------------------------------------------------------


class AgentProcess:
    """One `stavily agent run` with its own plugins folder holding the sleeper plugin."""

    def __init__(self, label: str, agent_id: str, key: str, url: str, home: Path) -> None:
        self.label, self.agent_id = label, agent_id
        plugins = home / "plugins" / "sleeper"
        plugins.mkdir(parents=True)
        (plugins / "plugin.yaml").write_text(SLEEPER_MANIFEST)
        self.markers = home.parent / "markers"
        self.markers.mkdir(exist_ok=True)
        (plugins / "sleeper.py").write_text(
            SLEEPER_SCRIPT.format(markers=str(self.markers), agent=label, seconds=SLEEP_SECONDS)
        )
        self.command = [
            sys.executable,
            "-m",
            "stavily.cli.main",
            "agent",
            "run",
            "--url",
            url,
            "--agent-id",
            agent_id,
            "--token",
            key,
            "--plugins-dir",
            str(home / "plugins"),
            "--heartbeat-interval",
            str(INTERVAL),
            "--poll-wait",
            "25",
        ]
        self.killed = False
        self.log_path = home / "agent.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def plugin_pids(self) -> list[int]:
        return [int(p.suffix[1:]) for p in self.markers.glob(f"{self.label}.*")]

    def kill(self) -> None:
        """SIGKILL: the agent (its session) and the plugins it started."""
        if self.killed:
            return
        self.killed = True
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.plugin_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def command_line(self) -> str:
        shown = [*self.command]
        shown[shown.index("--token") + 1] = "<key>"
        return " ".join(shown)


def dead_agent_test(backend: str, options: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"repeats": []}
    with fresh_database(backend, tmp, options.pg_url) as database_url:
        server = Server(backend, database_url, tmp / "data-dead", tmp / "server-dead.log")
        with server_env(SERVER_ENV):
            server.start()
        say(f"  server on {server.url} with {SERVER_ENV} (load average {load()})")
        try:
            for repeat in range(1, options.repeats + 1):
                outcome = one_detection(server, tmp / f"dead-{repeat}", repeat, options)
                result["repeats"].append(outcome)
                if outcome.get("seconds") is None:
                    left = options.repeats - repeat
                    if left:
                        say(f"    not detected: skipping the {left} other repeat(s)")
                    break
        finally:
            server.stop()
            result["server_problems"] = server.problems()
            report_problems(server, result["server_problems"])
    return result


def one_detection(
    server: Server, home: Path, repeat: int, options: argparse.Namespace
) -> dict[str, Any]:
    names = [f"dead{repeat}-a", f"dead{repeat}-b"]
    workflow = f"bench-dead-{repeat}"
    created = create_agents_proc(server.url, names)
    agents = {}
    with admin_client(server.url) as api:
        applied = api.post(
            "/api/v1/workflows",
            content=dead_workflow(workflow, f"dead{repeat}-[ab]"),
            headers={"Content-Type": "application/yaml"},
        )
        if applied.status_code != 201:
            raise RuntimeError(f"applying the workflow: {applied.status_code} {applied.text}")
        try:
            for name, (agent_id, key) in zip(names, created, strict=True):
                agents[agent_id] = AgentProcess(name, agent_id, key, server.url, home / name)
            if repeat == 1:
                say(f"    agents: {next(iter(agents.values())).command_line()}")
            return _one_detection(api, server, agents, workflow, repeat, options)
        finally:
            for agent in agents.values():
                agent.kill()


def _one_detection(
    api: httpx.Client,
    server: Server,
    agents: dict[str, AgentProcess],
    workflow: str,
    repeat: int,
    options: argparse.Namespace,
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while not all(api.get(f"/api/v1/agents/{a}").json()["health"] == "online" for a in agents):
        if time.monotonic() > deadline:
            raise RuntimeError("the reference agents did not come online within 30 s")
        time.sleep(0.1)
    started = api.post(f"/api/v1/workflows/{workflow}/runs", json={"inputs": {}})
    if started.status_code != 201:
        raise RuntimeError(f"POST runs: {started.status_code} {started.text}")
    execution_id = started.json()["id"]

    def step() -> dict[str, Any]:
        answer = api.get(f"/api/v1/executions/{execution_id}")
        answer.raise_for_status()
        return dict(answer.json()["steps"][0])

    deadline = time.monotonic() + 30
    while True:
        current = step()
        victim = agents.get(current["agent_id"] or "")
        if current["status"] == "running" and victim and victim.plugin_pids():
            break  # leased to A, and A's plugin is running
        if time.monotonic() > deadline:
            raise RuntimeError(f"the step did not start within 30 s: {current}")
        time.sleep(0.05)
    survivor = next(a for a in agents.values() if a is not victim)
    since_beat = time.time() - (
        parse_time(api.get(f"/api/v1/agents/{victim.agent_id}").json()["last_heartbeat_at"])
        or time.time()
    )
    victim.kill()
    killed = time.monotonic()
    offline_at = requeued_at = None
    outcome: dict[str, Any] = {"repeat": repeat, "victim": victim.label, "seconds": None}
    next_agent_check = 0.0
    while time.monotonic() - killed < options.detect_limit:
        now = time.monotonic()
        if offline_at is None and now >= next_agent_check:
            next_agent_check = now + 0.25
            if api.get(f"/api/v1/agents/{victim.agent_id}").json()["health"] == "offline":
                offline_at = now
        current = step()
        if requeued_at is None and (current["attempts"] > 1 or current["status"] == "queued"):
            requeued_at = now
        if (
            current["status"] == "running"
            and current["agent_id"] == survivor.agent_id
            and current["attempts"] == 2
        ):
            outcome["seconds"] = now - killed
            if offline_at is None:
                offline_at = now  # checked every 0.25 s: at the latest now
            break
        time.sleep(0.05)
    outcome["offline_after"] = offline_at - killed if offline_at else None
    outcome["requeued_after"] = requeued_at - killed if requeued_at else None
    outcome["last_beat_before_kill"] = since_beat
    if outcome["seconds"] is not None:
        say(
            f"    repeat {repeat}: {victim.label} killed {since_beat:.1f} s after its last "
            f"heartbeat; offline after {fmt_s(outcome['offline_after'])}, step queued again "
            f"after {fmt_s(outcome['requeued_after'])}, running on {survivor.label} "
            f"(attempt 2) after {outcome['seconds']:.2f} s"
        )
    else:
        view = api.get(f"/api/v1/agents/{victim.agent_id}").json()
        current = step()
        outcome["victim_view"] = {
            k: view.get(k) for k in ("health", "heartbeats_while_busy", "facts")
        }
        outcome["step"] = {k: current.get(k) for k in ("status", "agent_id", "attempts")}
        where = "it" if current["agent_id"] == victim.agent_id else current["agent_id"]
        say(
            f"    repeat {repeat}: NOT re-run within {options.detect_limit:g} s of killing "
            f"{victim.label}: the step is still {current['status']} on {where} (attempt "
            f"{current['attempts']}); the agent's health is {view.get('health')}"
            + (
                f" (offline after {outcome['offline_after']:.2f} s)"
                if outcome["offline_after"]
                else ""
            )
        )
        say(f"      agent as the API shows it: {json.dumps(outcome['victim_view'])}")
        if view.get("heartbeats_while_busy") is False:
            say(
                "      heartbeats_while_busy is false: its heartbeats did not list `running`, "
                "so the server's liveness sweep leaves it its lease and only the lease's end "
                f"(step timeout {SLEEP_SECONDS * 2} s + STAVILY_LEASE_GRACE) takes the work back"
            )
    with contextlib.suppress(httpx.HTTPError):
        api.post(f"/api/v1/executions/{execution_id}/cancel")
    return outcome


# -- 3. a dead official agent ----------------------------------------------------------------

OFFICIAL_TIMEOUT = 5  # the step's timeout_seconds
OFFICIAL_GRACE = 5  # STAVILY_LEASE_GRACE for this test
OFFICIAL_HEADERS = {"User-Agent": "Stavily-Agent/1.0.0", "Content-Type": "application/json"}


def official_death_test(backend: str, options: argparse.Namespace, tmp: Path) -> list[float | None]:
    """An official agent dies mid-step. It heartbeats nothing while a plugin runs (one loop
    for everything), so killed it simply goes silent, as a silent healthy one would: the
    server waits for the lease (timeout + STAVILY_LEASE_GRACE) and the step runs again on
    another agent, attempt 2. Two agents speak exactly the official protocol (no query
    strings, their User-Agent): A polls, says `executing`, then sends nothing ("killed");
    B polls every second as the official agents do when idle (every 10 s by default).
    Measured: from A's last request to B being handed attempt 2. Expected at most timeout
    + grace + one reaper turn (1 s) + B's poll interval (1 s)."""
    env = {**SERVER_ENV, "STAVILY_LEASE_GRACE": str(OFFICIAL_GRACE)}
    times: list[float | None] = []
    with fresh_database(backend, tmp, options.pg_url) as database_url:
        server = Server(backend, database_url, tmp / "data-official", tmp / "server-off.log")
        with server_env(env):
            server.start()
        try:
            for repeat in range(1, options.repeats + 1):
                times.append(_official_death(server, repeat, options))
        finally:
            server.stop()
            report_problems(server, server.problems())
    return times


def _official_death(server: Server, repeat: int, options: argparse.Namespace) -> float | None:
    names = [f"go{repeat}-a", f"go{repeat}-b"]
    (a_id, a_key), (b_id, b_key) = create_agents_proc(server.url, names)
    workflow = f"bench-go-{repeat}"
    with admin_client(server.url) as api:
        applied = api.post(
            "/api/v1/workflows",
            content=(
                f"name: {workflow}\nagents: {{pools: [{{agent_regex: 'go{repeat}-[ab]'}}]}}\n"
                "actions: {steps: [{name: only, plugin: echo, timeout: "
                f"{OFFICIAL_TIMEOUT}s}}]}}\n"
            ),
            headers={"Content-Type": "application/yaml"},
        )
        applied.raise_for_status()
        api.post(f"/api/v1/workflows/{workflow}/runs", json={"inputs": {}}).raise_for_status()
    a = httpx.Client(
        base_url=server.url, headers={**OFFICIAL_HEADERS, "Authorization": f"Bearer {a_key}"}
    )
    b = httpx.Client(
        base_url=server.url, headers={**OFFICIAL_HEADERS, "Authorization": f"Bearer {b_key}"}
    )
    try:
        taken = a.get(f"/agents/v1/{a_id}/instructions").json()["instruction"]
        if taken is None:
            raise RuntimeError("the step was not handed to A")
        a.put(f"/agents/v1/{a_id}/instructions/{taken['id']}", json={"status": "executing"})
        died = time.monotonic()  # from here A sends nothing
        limit = OFFICIAL_TIMEOUT + OFFICIAL_GRACE + options.detect_limit
        while time.monotonic() - died < limit:
            again = b.get(f"/agents/v1/{b_id}/instructions").json()["instruction"]
            if again is not None and again["attempt"] == 2:
                seconds = time.monotonic() - died
                b.post(
                    f"/agents/v1/{b_id}/instructions/{again['id']}/result",
                    json={"status": "completed", "result": {}},
                )
                say(f"    repeat {repeat}: attempt 2 on B {seconds:.2f} s after A went silent")
                return seconds
            time.sleep(1)
        say(f"    repeat {repeat}: NOT re-run within {limit:g} s")
        return None
    finally:
        a.close()
        b.close()


def fmt_s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


# -- one backend, the table ------------------------------------------------------------------


def report_problems(server: Server, problems: list[str]) -> None:
    if problems:
        say(f"  SERVER LOG has {len(problems)} error lines:")
        for line in problems[:10]:
            say(f"    {line[:400]}")
        say(f"  (full log: {server.log_path})")


def bench_backend(backend: str, options: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"backend": backend}
    tmp = Path(tempfile.mkdtemp(prefix=f"stavily-fleet-{backend}-"))
    keep = False
    try:
        say(f"\n== {backend}: heartbeat ingestion ==")
        report["hb"] = heartbeat_test(backend, options, tmp)
        say(f"\n== {backend}: dead-agent detection ==")
        report["dead"] = dead_agent_test(backend, options, tmp)
        say(f"\n== {backend}: a dead official agent ==")
        report["official"] = official_death_test(backend, options, tmp)
        keep = bool(report["hb"]["server_problems"] or report["dead"]["server_problems"])
    finally:
        if keep:
            say(f"  logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _cpu(cpu: dict[str, float]) -> str:
    return " / ".join(f"{cpu[k]:.0f}" for k in ("server", "postgres", "clients", "other"))


def _latency(figures: dict[str, Any]) -> str:
    return f"{figures['p50_us'] / 1000:.1f} / {figures['p99_us'] / 1000:.1f} ms"


def _per_beat(figures: dict[str, Any]) -> str:
    return f"{figures['cpu']['server'] / 100 / max(figures['rate'], 1) * 1000:.2f} ms"


def figure_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The same labels, in the same order, for every backend."""
    hb, dead = report["hb"], report["dead"]
    paced, fastest, ceiling = hb["paced"], hb["max"], hb["ceiling"]
    writes, delivery = paced["writes"], hb["delivery"]
    target = paced["target"]
    pg = bool(writes) and "xact_commit" in writes
    rows = [
        (f"agents created/s ({hb['created']} agents)", f"{hb['create_rate']:.0f}"),
        (
            f"paced heartbeats/s (target {target:.0f})",
            f"{paced['rate']:.0f}" + ("" if paced["rate"] >= 0.97 * target else " LOW"),
        ),
        (
            "  latency p50 / p99 (target p99 < 50 ms)",
            _latency(paced) + ("" if paced["p99_us"] < 50_000 else " HIGH"),
        ),
        ("  next_heartbeat_interval told", f"{paced.get('told', INTERVAL)} s"),
        ("  non-2xx / socket errors", f"{paced['non2xx']} / {paced['socket_errors']}"),
        ("  beats dropped (schedule > 1 s late)", str(paced["dropped_slots"])),
        ("  DB write transactions/s", f"{writes['writes']:.1f}" if writes else "n/a"),
        (
            "  heartbeats per write transaction",
            f"{paced['rate'] / writes['writes']:.0f}" if writes and writes["writes"] else "n/a",
        ),
        (
            "  DB read transactions/s (per heartbeat)",
            f"{writes['xact_rollback']:.0f} ({writes['xact_rollback'] / max(paced['rate'], 1):.2f})"
            if pg
            else "n/a",
        ),
        ("  DB rows written/s", f"{writes['rows']:.0f}" if pg else "n/a"),
        ("  CPU %: server / postgres / wrk / other", _cpu(paced["cpu"])),
        (
            "  server CPU per heartbeat (target < 0.3 ms)",
            _per_beat(paced)
            + ("" if paced["cpu"]["server"] / 100 / max(paced["rate"], 1) < 0.0003 else " HIGH"),
        ),
        (
            f"  agents heard in the last {paced.get('told', INTERVAL) + 1} s",
            f"{delivery['recent']}/{delivery['agents']}",
        ),
        (
            "  health at the end",
            " ".join(f"{k} {v}" for k, v in sorted(delivery["health"].items())),
        ),
        ("  agent.offline records while beating", str(delivery["offline_records"])),
        (
            "max heartbeats/s (unpaced)",
            f"{fastest['rate']:.0f} ({fastest['rate'] / target:.2f} x target)",
        ),
        ("  latency p50 / p99 ", _latency(fastest)),
        ("  non-2xx / socket errors ", f"{fastest['non2xx']} / {fastest['socket_errors']}"),
        ("  CPU %: server / postgres / wrk / other ", _cpu(fastest["cpu"])),
        ("  server CPU per heartbeat ", _per_beat(fastest)),
        ("wrk ceiling GET /healthz req/s", f"{ceiling['rate']:.0f}"),
        # what a request costs that does nothing: the HTTP stack's own floor
        ("  server CPU per /healthz request", _per_beat(ceiling)),
    ]
    repeats = dead["repeats"]
    times = [r["seconds"] for r in repeats]
    median = statistics.median(times) if times and None not in times else None
    rows += [
        (
            "dead agent: step running on B after",
            " ".join(fmt_s(t) if t is not None else "> limit" for t in times) or "n/a",
        ),
        (
            f"  median (target < {2 * INTERVAL} s)",
            (fmt_s(median) + (" ok" if median < 2 * INTERVAL else " MISSED"))
            if median is not None
            else "MISSED",
        ),
        ("  A marked offline after", " ".join(fmt_s(r["offline_after"]) for r in repeats)),
        (
            "  A killed after its last heartbeat",
            " ".join(f"{r['last_beat_before_kill']:.1f} s" for r in repeats),
        ),
        (
            "official agent dead mid-step: re-run after",
            " ".join(fmt_s(t) for t in report["official"]),
        ),
        (
            f"  expected (timeout {OFFICIAL_TIMEOUT} s + grace {OFFICIAL_GRACE} s + reaper + poll)",
            f"<= {OFFICIAL_TIMEOUT + OFFICIAL_GRACE + 2} s",
        ),
        (
            "server log error lines",
            str(len(hb["server_problems"]) + len(dead["server_problems"])),
        ),
    ]
    return rows


def print_table(reports: list[dict[str, Any]], options: argparse.Namespace) -> None:
    columns = [figure_rows(r) for r in reports]
    labels = [label for label, _ in columns[0]]
    headers = ["figure", *(r["backend"] for r in reports)]
    widths = [max(len(headers[0]), *(len(k) for k in labels))]
    for header, rows in zip(headers[1:], columns, strict=True):
        widths.append(max(len(header), *(len(v) for _, v in rows)))
    say("")
    say(
        f"Stavily fleet benchmark ({options.version}) - nproc {os.cpu_count()}, python "
        f"{sys.version.split()[0]}, {options.agents} agents beating every {INTERVAL} s for "
        f"{options.duration:g} s, wrk -t{options.wrk_threads} -c{options.wrk_connections}"
        + (" (quick)" if options.quick else "")
        + f"; CPU busy before the start: {options.busy:.0f}% of one core"
    )
    say(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    say("-+-".join("-" * w for w in widths))
    for index, label in enumerate(labels):
        cells = [label.ljust(widths[0])]
        for rows, width in zip(columns, widths[1:], strict=True):
            cells.append(rows[index][1].rjust(width))
        say(" | ".join(cells))
    say("")
    for report in reports:
        say(f"DB writes on {report['backend']}: {report['hb']['paced']['write_method']}")
    say(
        "Paced: plain wrk has no -R, so wrk_fleet.lua gives each wrk thread a schedule of one "
        f"request per {INTERVAL} s / (its agents); LOW marks under 97% of the target. Latency "
        "is the service time of a sent request (a beat waiting for a free connection is not "
        "in it, but shows as the schedule falling behind). CPU in % of one core; 'other' is "
        "the rest of the machine."
    )
    from stavily.config import Settings

    missed = Settings().offline_after_missed  # STAVILY_OFFLINE_AFTER_MISSED, as the server
    say(
        "Dead agent: the time from SIGKILL to GET /api/v1/executions/{id} showing the step "
        "running on B, attempt 2. The server's deadline is the last heartbeat + "
        f"STAVILY_OFFLINE_AFTER_MISSED x interval = {missed:g} x {INTERVAL} s = "
        f"{missed * INTERVAL:g} s, checked every STAVILY_REAPER_INTERVAL (1 s): a kill right "
        "after a heartbeat is the slowest case."
    )


def healthy(report: dict[str, Any]) -> bool:
    hb, dead = report["hb"], report["dead"]
    times = [r["seconds"] for r in dead["repeats"]]
    return bool(
        hb["paced"]["rate"] >= 0.97 * hb["paced"]["target"]
        and not hb["paced"]["non2xx"]
        and not hb["paced"]["socket_errors"]
        and hb["delivery"]["ok"]
        and times
        and all(t is not None for t in times)
        and statistics.median(times) < 2 * INTERVAL
        and not hb["server_problems"]
        and not dead["server_problems"]
        and all(
            t is not None and t <= OFFICIAL_TIMEOUT + OFFICIAL_GRACE + 3 for t in report["official"]
        )
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="2,000 agents, 10 s, 1 repeat")
    parser.add_argument("--agents", type=int, help="heartbeating agents (default 10000)")
    parser.add_argument("--duration", type=float, help="paced wrk seconds (default 20)")
    parser.add_argument("--max-duration", type=float, help="unpaced wrk seconds (default 5)")
    parser.add_argument("--repeats", type=int, help="dead-agent repeats (default 3)")
    parser.add_argument(
        "--detect-limit", type=float, default=30.0, help="give up a dead-agent wait (s)"
    )
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=200)
    parser.add_argument("--create-procs", type=int, default=4)
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the server with py-spy (all threads) during the paced heartbeat run",
    )
    parser.add_argument(
        "--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "stavily-bench-profile"
    )
    options = parser.parse_args()
    options.agents = options.agents or (2000 if options.quick else 10_000)
    options.duration = options.duration or (10.0 if options.quick else 20.0)
    options.max_duration = options.max_duration or (3.0 if options.quick else 5.0)
    options.repeats = options.repeats or (1 if options.quick else 3)
    options.ceiling_duration = 3.0
    options.pg_url = os.environ.get("STAVILY_BENCH_DATABASE_URL", DEFAULT_PG_URL)
    return options


def main() -> int:
    options = parse_args()
    if shutil.which("wrk") is None:
        say("wrk is not installed: apt-get install -y wrk (Debian package wrk)")
        return 2
    options.version = base.source_version()
    busy = options.busy = base.background_cpu()
    say(
        f"machine: nproc {os.cpu_count()}; python {sys.version.split()[0]}; stavily "
        f"{options.version}; CPU already busy: {busy:.0f}% of one core (load {load()})"
    )
    backends = ["sqlite", "postgresql"] if options.backend == "both" else [options.backend]
    began = time.monotonic()
    reports = [bench_backend(backend, options) for backend in backends]
    for report in reports:
        if report["hb"].get("pyspy"):
            base.print_pyspy(report["backend"], report["hb"]["pyspy"])
    print_table(reports, options)
    say(f"\ntotal wall time {time.monotonic() - began:.0f} s")
    ok = all(healthy(r) for r in reports)
    if not ok:
        say("SOME CHECKS FAILED OR TARGETS WERE MISSED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
