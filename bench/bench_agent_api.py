"""Benchmark of the public agent API (the hot path), on SQLite and PostgreSQL.

    python bench/bench_agent_api.py [--backend sqlite|postgresql|both] [--quick]
    python bench/bench_agent_api.py --profile            # server under pyinstrument (SQLite)
    python bench/bench_agent_api.py --quick --py-spy     # plus py-spy on every server thread

Each backend gets a fresh database and a real `stavily serve` subprocess, driven over
loopback HTTP:

1. Heartbeats: 1,000 agents are created through POST /api/v1/agents, then `wrk`
   (Debian package `wrk`) posts heartbeats for ~10 s, rotating over all their
   credentials (wrk_agents.lua). Afterwards GET /api/v1/agents (and the database
   itself, once the server has stopped) must show every agent's last_heartbeat_at.
2. Round trips: a one-step workflow (plugin `noop`, any agent) is started N times up
   front; then 20 simulated agents in several client processes loop
   poll (?wait=5) -> PUT progress `executing` -> POST result `completed` until every
   run has succeeded. Every execution is checked afterwards, and no instruction may be
   handed out twice. A burst check first queues 30 runs and has 20 other agents poll
   at once: each must get work at once, not wait while work stays queued.

The load generators' own ceilings (wrk and the Python client processes against
GET /healthz, which does no database work) are measured too, and the CPU used during
each test is split between the server, PostgreSQL, the load generator and whatever
else runs on the machine, so a reader can tell what the bottleneck was.

With --profile the server runs under pyinstrument, the ceilings are skipped, and the
profile is cut to each test's timed window and summarised; its figures are slowed by
the profiler and are not the benchmark's. pyinstrument samples the main thread only
(on SQLite the queries run in aiosqlite's threads and show up as the event loop
waiting); --py-spy samples every thread of the server during each test instead.

PostgreSQL: STAVILY_BENCH_DATABASE_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test) names the server; a fresh database
is created on it for the run and dropped afterwards. Nothing here is collected by
pytest. Exit status 1 when a correctness check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `python bench/bench_agent_api.py` puts only bench/ there
    sys.path.insert(0, str(HERE.parent))

from bench.rawhttp import RawClient  # noqa: E402

LUA_SCRIPT = HERE / "wrk_agents.lua"
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
ADMIN_TOKEN = "stv_bench_admin_" + uuid.uuid4().hex
WORKFLOW = "bench-noop"
WORKFLOW_SOURCE = f"""
name: {WORKFLOW}
version: "1.0.0"
actions:
  steps:
    - name: noop
      plugin: noop
      timeout: 30s
"""
AGENT_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "Stavily-Agent/1.0.0",
}
MP = mp.get_context("fork")


# -- small helpers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_report(instruction: dict[str, Any], execution_log: list[str]) -> dict[str, Any]:
    """A successful no-op result as the official agents send it (AGENT_API.md)."""
    stamp = rfc3339_now()
    return {
        "status": "completed",
        "result": {
            "instruction_id": instruction["id"],
            "duration": 0.0,
            "start_time": stamp,
            "end_time": stamp,
            "logs": ["Starting plugin execution", "Plugin execution completed"],
            "execution_result": {
                "plugin_id": instruction["plugin_id"],
                "success": True,
                "exit_code": 0,
                "duration": 0.0,
                "logs": [],
                "output_data": {"ok": True},
            },
        },
        "execution_log": [*execution_log, f"[{stamp}] Plugin execution completed"],
    }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [chunk for chunk in (items[i::parts] for i in range(parts)) if chunk]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def source_version() -> str:
    """The commit of the code under test (read-only git), marked when src has local edits."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=HERE.parent, capture_output=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + (" + local edits in src" if dirty else "")


def background_cpu(seconds: float = 1.0) -> float:
    """How busy the machine is before we start, in % of one core."""
    before = _machine_jiffies()
    time.sleep(seconds)
    after = _machine_jiffies()
    return (after[0] - before[0]) / max(1, after[1] - before[1]) * (os.cpu_count() or 1) * 100


def say(message: str) -> None:
    print(message, flush=True)


def pg_admin_dsn(url: str, database: str | None = None) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql")
    if database:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def _pg_execute(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(pg_admin_dsn(url))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_database(backend: str, tmp: Path, pg_url: str) -> Iterator[str]:
    """A new, empty database: a SQLite file, or a PostgreSQL database dropped afterwards."""
    if backend == "sqlite":
        # a file of its own each time: two tests sharing a folder must not share a database
        yield f"sqlite+aiosqlite:///{tmp / f'stavily-{uuid.uuid4().hex[:8]}.db'}"
        return
    from sqlalchemy.engine import make_url

    name = f"stavily_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_execute(pg_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        if os.environ.get("STAVILY_BENCH_KEEP_DATABASE"):
            say(f"  kept the database {name} (STAVILY_BENCH_KEEP_DATABASE)")
        else:
            asyncio.run(_pg_execute(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- the server under test -------------------------------------------------------------------


class Server:
    """`python -m stavily.cli.main serve` in a subprocess (optionally under pyinstrument)."""

    def __init__(
        self,
        backend: str,
        database_url: str,
        data_dir: Path,
        log_path: Path,
        profile_out: Path | None = None,
    ) -> None:
        self.backend = backend
        self.database_url = database_url
        self.data_dir = data_dir
        self.log_path = log_path
        self.profile_out = profile_out
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "STAVILY_DATABASE_URL": self.database_url,
            "STAVILY_DATA_DIR": str(self.data_dir),
            "STAVILY_BOOTSTRAP_TOKEN": ADMIN_TOKEN,
            # the engine is measured, not the per-agent policy: one simulated agent in a
            # fast chain sends more than the default 1000 requests/s on a fast machine
            "STAVILY_AGENT_RATE_LIMIT": os.environ.get(
                "STAVILY_AGENT_RATE_LIMIT", "1000000/second"
            ),
            # nor the per-token, per-source and per-webhook limits: load comes from one
            # address with one admin token (docs/rate-limits.md)
            **{
                name: os.environ.get(name, unlimited)
                for name, unlimited in (
                    ("STAVILY_API_RATE_LIMIT", "1000000/second"),
                    ("STAVILY_SOURCE_RATE_LIMIT", "1000000/second"),
                    ("STAVILY_AGENT_SOURCE_RATE_LIMIT", "1000000/second"),
                    ("STAVILY_WEBHOOK_RATE_LIMIT", "1000000/second"),
                )
            },
            # the simulated agents run a `noop` nobody publishes (the agent API is measured,
            # not installs: bench_plugins.py measures distribution)
            "STAVILY_UNREGISTERED_PLUGINS": "allow",
        }
        serve = ["-m", "stavily.cli.main", "serve", "--port", str(self.port)]
        if self.profile_out is not None:
            profiler = ["-m", "pyinstrument", "-r", "pyisession", "-o", str(self.profile_out)]
            command = [sys.executable, *profiler, *serve]
        else:
            command = [sys.executable, *serve]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120 if self.profile_out else 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def problems(self) -> list[str]:
        """Lines of the server's log that speak of errors."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            low = line.lower()
            if '"level": "error"' in low or "traceback" in low or '"level": "critical"' in low:
                found.append(line)
            elif "exception" in low and "pyinstrument" not in low:
                found.append(line)
        return found


def admin_client(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
    )


# -- work done in client processes (module level so that it pickles) ------------------------


def _admin_async(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=60,
        limits=httpx.Limits(max_connections=8),
    )


def create_agents_proc(url: str, names: list[str]) -> list[tuple[str, str]]:
    async def main() -> list[tuple[str, str]]:
        async with _admin_async(url) as client:
            limit = asyncio.Semaphore(8)

            async def one(name: str) -> tuple[str, str]:
                async with limit:
                    answer = await client.post("/api/v1/agents", json={"name": name})
                if answer.status_code != 201:
                    raise RuntimeError(f"POST /api/v1/agents: {answer.status_code} {answer.text}")
                body = answer.json()
                return body["agent_id"], body["api_key"]

            return list(await asyncio.gather(*(one(name) for name in names)))

    return asyncio.run(main())


def start_runs_proc(url: str, count: int) -> list[str]:
    async def main() -> list[str]:
        async with _admin_async(url) as client:
            limit = asyncio.Semaphore(8)

            async def one(i: int) -> str:
                async with limit:
                    answer = await client.post(
                        f"/api/v1/workflows/{WORKFLOW}/runs", json={"inputs": {"n": i}}
                    )
                if answer.status_code != 201:
                    raise RuntimeError(f"POST runs: {answer.status_code} {answer.text}")
                return str(answer.json()["id"])

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    return asyncio.run(main())


def check_executions_proc(url: str, ids: list[str]) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        async with _admin_async(url) as client:
            limit = asyncio.Semaphore(8)

            async def one(execution_id: str) -> dict[str, Any]:
                async with limit:
                    answer = await client.get(f"/api/v1/executions/{execution_id}")
                if answer.status_code != 200:
                    return {"id": execution_id, "http": answer.status_code}
                body = answer.json()
                steps = body["steps"]
                return {
                    "id": execution_id,
                    "http": 200,
                    "status": body["status"],
                    "steps": [(s["status"], s["attempts"], s["instruction_id"]) for s in steps],
                }

            return list(await asyncio.gather(*(one(i) for i in ids)))

    return asyncio.run(main())


def healthz_proc(
    url: str, tasks: int, duration: float, barrier: Any, queue: Any, raw: bool = False
) -> None:  # pragma: no cover - runs in a child process
    async def main() -> dict[str, Any]:
        clients: list[Any] = [
            RawClient(url, {}) if raw else httpx.AsyncClient(base_url=url, timeout=30)
            for _ in range(tasks)
        ]
        for client in clients:
            await client.get("/healthz")  # open the connection before timing
        barrier.wait()
        end = time.monotonic() + duration
        latencies: list[float] = []
        errors = 0

        async def loop(client: Any) -> None:
            nonlocal errors
            while time.monotonic() < end:
                began = time.perf_counter()
                answer = await client.get("/healthz")
                latencies.append(time.perf_counter() - began)
                if answer.status_code != 200:
                    errors += 1

        await asyncio.gather(*(loop(c) for c in clients))
        for client in clients:
            await client.aclose()
        return {"latencies": latencies, "errors": errors}

    queue.put(asyncio.run(main()))


@dataclass
class AgentShared:
    """Shared between the agent processes and the driver."""

    total: int
    completed: Any  # mp.Value("i")
    done_at: Any  # mp.Value("d"), time.monotonic() when the last result was acknowledged
    ninety_at: Any  # mp.Value("d"), time.monotonic() when 90% were acknowledged
    all_done: Any  # mp.Event
    barrier: Any  # mp.Barrier


def agents_proc(
    url: str,
    agents: list[tuple[str, str]],
    shared: AgentShared,
    wait: float,
    time_limit: float,
    queue: Any,
) -> None:  # pragma: no cover - runs in a child process
    latencies: dict[str, list[float]] = {"poll": [], "progress": [], "result": []}
    errors: list[str] = []
    error_count = Counter[str]()
    handed_out: list[str] = []
    empty_polls = 0

    def failed(kind: str, answer: httpx.Response) -> None:
        error_count[f"{kind} {answer.status_code}"] += 1
        if len(errors) < 20:
            errors.append(f"{kind} {answer.request.url.path} -> {answer.status_code} {answer.text}")

    def finished_one() -> None:
        with shared.completed.get_lock():
            shared.completed.value += 1
            if shared.completed.value == max(1, shared.total * 9 // 10):
                shared.ninety_at.value = time.monotonic()
            if shared.completed.value == shared.total:
                shared.done_at.value = time.monotonic()
                shared.all_done.set()

    polling_since: dict[str, float] = {}  # agent -> perf_counter of its poll in flight
    done_by: Counter[str] = Counter()  # agent -> results acknowledged

    async def agent_loop(client: httpx.AsyncClient, agent_id: str) -> None:
        nonlocal empty_polls
        base = f"/agents/v1/{agent_id}/instructions"
        while True:
            began = polling_since[agent_id] = time.perf_counter()
            answer = await client.get(base, params={"wait": wait})
            del polling_since[agent_id]
            latencies["poll"].append(time.perf_counter() - began)
            if answer.status_code != 200:
                failed("poll", answer)
                await asyncio.sleep(0.05)
                continue
            instruction = answer.json().get("instruction")
            if instruction is None:
                empty_polls += 1
                continue
            handed_out.append(instruction["id"])
            path = f"{base}/{instruction['id']}"
            log = [f"[{rfc3339_now()}] Instruction received"]
            began = time.perf_counter()
            answer = await client.put(
                path,
                json={
                    "status": "executing",
                    "execution_log": [*log, f"[{rfc3339_now()}] Started plugin execution"],
                },
            )
            latencies["progress"].append(time.perf_counter() - began)
            if answer.status_code != 200:
                failed("progress", answer)
            report = result_report(instruction, log)
            began = time.perf_counter()
            answer = await client.post(f"{path}/result", json=report)
            latencies["result"].append(time.perf_counter() - began)
            if answer.status_code != 200 or answer.json().get("acknowledged") is not True:
                failed("result", answer)
            else:
                done_by[agent_id] += 1
                finished_one()

    async def main() -> float:
        clients = [
            httpx.AsyncClient(
                base_url=url,
                headers={**AGENT_HEADERS, "Authorization": f"Bearer {key}"},
                timeout=wait + 30,
            )
            for _, key in agents
        ]
        for client in clients:
            await client.get("/healthz")  # open the connection before timing
        shared.barrier.wait()
        started = time.monotonic()
        tasks = [
            asyncio.create_task(agent_loop(client, agent_id))
            for client, (agent_id, _) in zip(clients, agents, strict=True)
        ]
        while not shared.all_done.is_set() and time.monotonic() - started < time_limit:
            if all(task.done() for task in tasks):
                break
            await asyncio.sleep(0.01)
        now = time.perf_counter()
        waiting.extend(now - since for since in polling_since.values())
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                error_count[f"exception {type(outcome).__name__}"] += 1
                if len(errors) < 20:
                    errors.append(f"agent loop crashed: {outcome!r}")
        for client in clients:
            await client.aclose()
        return started

    waiting: list[float] = []  # ages of the polls still open when the last run finished
    started = asyncio.run(main())
    queue.put(
        {
            "latencies": latencies,
            "errors": errors,
            "error_count": dict(error_count),
            "handed_out": handed_out,
            "empty_polls": empty_polls,
            "waiting_at_end": waiting,
            "per_agent": [done_by[agent_id] for agent_id, _ in agents],
            "started": started,
        }
    )


# -- where the CPU went ----------------------------------------------------------------------


def _proc_jiffies(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _postgres_jiffies() -> dict[int, int]:
    """CPU so far of every PostgreSQL process, by pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            fields = text.rsplit(")", 1)[1].split()
            found[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
    return found


def _machine_jiffies() -> tuple[int, int, int]:
    """(busy, total, interrupt handling) over all CPUs since boot."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values[:8]) - idle, sum(values[:8]), values[5] + values[6]


def _own_cpu() -> float:
    """CPU seconds of this process and its waited-for children (wrk, client processes)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class CpuMeter:
    """CPU used during a window, in % of one core: the server process, PostgreSQL, this
    benchmark's load generator (its waited-for children), and everything else."""

    def __init__(self, server: Server) -> None:
        self.pid = server.proc.pid if server.proc else 0
        self.hz = os.sysconf("SC_CLK_TCK")
        self.began = time.monotonic()
        self.machine = _machine_jiffies()
        self.server = _proc_jiffies(self.pid)
        self.postgres = _postgres_jiffies()
        self.children = _own_cpu()

    def stop(self, window: float | None = None) -> dict[str, float]:
        seconds = window or (time.monotonic() - self.began)
        busy, total, irq = _machine_jiffies()
        cores = os.cpu_count() or 1
        span = max(1, total - self.machine[1])
        machine_busy = (busy - self.machine[0]) / span * cores
        interrupts = (irq - self.machine[2]) / span * cores
        server = (_proc_jiffies(self.pid) - self.server) / self.hz / seconds
        now = _postgres_jiffies()
        used = sum(jiffies - self.postgres.get(pid, 0) for pid, jiffies in now.items())
        postgres = max(0, used) / self.hz / seconds
        clients = (_own_cpu() - self.children) / seconds
        return {
            "machine": machine_busy * 100,
            "server": server * 100,
            "postgres": postgres * 100,
            "clients": clients * 100,
            "irq": interrupts * 100,
            "other": max(0.0, machine_busy - server - postgres - clients - interrupts) * 100,
            "cores": cores * 100,
        }


def cpu_line(cpu: dict[str, float]) -> str:
    return (
        f"CPU in % of one core (machine max {cpu['cores']:.0f}%): machine {cpu['machine']:.0f}%, "
        f"server {cpu['server']:.0f}%, postgres {cpu['postgres']:.0f}%, "
        f"load generator {cpu['clients']:.0f}%, kernel irq {cpu['irq']:.0f}%, "
        f"other processes {cpu['other']:.0f}%"
    )


# -- measurements ----------------------------------------------------------------------------


def run_wrk(
    url: str, mode: str, duration: float, threads: int, connections: int, *extra: str
) -> dict[str, Any]:
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        mode,
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            figures: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            seconds = figures["duration_us"] / 1e6
            figures["rate"] = figures["requests"] / seconds if seconds else 0.0
            figures["socket_errors"] = sum(
                figures[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
            )
            figures["command"] = " ".join(command)
            return figures
    raise RuntimeError(f"wrk gave no figures:\n{done.stdout}\n{done.stderr}")


def python_healthz_ceiling(
    url: str, procs: int, tasks: int, duration: float, raw: bool = False
) -> dict[str, Any]:
    """GET /healthz from `procs` processes over `tasks` connections: the load generator's
    own ceiling, with httpx or (raw) the benchmarks' minimal client, bench/rawhttp.py."""
    barrier = MP.Barrier(procs + 1)
    queue = MP.Queue()
    per_proc = split(list(range(tasks)), procs)
    workers = [
        MP.Process(target=healthz_proc, args=(url, len(chunk), duration, barrier, queue, raw))
        for chunk in per_proc
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    results = [queue.get(timeout=duration + 120) for _ in workers]
    for worker in workers:
        worker.join()
    latencies = [x for r in results for x in r["latencies"]]
    return {
        "rate": len(latencies) / duration,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "errors": sum(r["errors"] for r in results),
        "procs": len(workers),
    }


def parallel(function: Any, url: str, chunks: list[Any], procs: int) -> list[Any]:
    with ProcessPoolExecutor(max_workers=procs, mp_context=MP) as pool:
        futures = [pool.submit(function, url, chunk) for chunk in chunks]
        return [f.result() for f in futures]


def heartbeat_test(
    server: Server, options: argparse.Namespace, tmp: Path, report: dict[str, Any]
) -> None:
    say(f"  creating {options.agents} agents through POST /api/v1/agents ...")
    names = [f"hb-{i:05d}" for i in range(options.agents)]
    began = time.monotonic()
    created = [
        pair
        for chunk in parallel(create_agents_proc, server.url, split(names, 4), 4)
        for pair in chunk
    ]
    took = time.monotonic() - began
    report["agents_created_rate"] = len(created) / took
    say(f"    {len(created)} agents in {took:.1f} s ({len(created) / took:.0f}/s)")
    credentials = tmp / "credentials.txt"
    credentials.write_text("".join(f"{agent_id} {key}\n" for agent_id, key in created))

    say(
        f"  wrk: heartbeats rotating over {len(created)} agents, {options.duration:g} s, "
        f"{options.wrk_threads} threads, {options.wrk_connections} connections ..."
    )
    spy = PySpy.start(server, options, "heartbeat")
    cpu = CpuMeter(server)
    wall0 = time.time()
    figures = run_wrk(
        server.url,
        "heartbeat",
        options.duration,
        options.wrk_threads,
        options.wrk_connections,
        str(credentials),
    )
    figures["cpu"] = cpu.stop()
    if spy:
        report.setdefault("pyspy", {})["heartbeat"] = spy.stop()
    report["heartbeat"] = figures
    report.setdefault("windows", {})["heartbeat"] = (wall0, wall0 + figures["duration_us"] / 1e6)
    say(
        f"    {figures['rate']:.0f} heartbeats/s, p50 {figures['p50_us'] / 1000:.2f} ms, "
        f"p99 {figures['p99_us'] / 1000:.2f} ms, non-2xx {figures['non2xx']}, "
        f"socket errors {figures['socket_errors']}"
    )
    say(f"    {cpu_line(figures['cpu'])}")
    # The server coalesces heartbeats in memory and flushes every 0.5 s: let it flush.
    time.sleep(1.5)
    ids = {agent_id for agent_id, _ in created}
    with admin_client(server.url) as api:
        listed = api.get("/api/v1/agents")
    listed.raise_for_status()
    beating = [a for a in listed.json()["agents"] if a["id"] in ids and a.get("last_heartbeat_at")]
    report["heartbeat_agents_api"] = len(beating)
    report["heartbeat_agents_total"] = len(created)
    say(f"    GET /api/v1/agents: {len(beating)}/{len(created)} agents have a last_heartbeat_at")


def round_trip_test(server: Server, options: argparse.Namespace, report: dict[str, Any]) -> None:
    with admin_client(server.url) as api:
        applied = api.post(
            "/api/v1/workflows",
            content=WORKFLOW_SOURCE,
            headers={"Content-Type": "application/yaml"},
        )
        if applied.status_code != 201:
            raise RuntimeError(f"applying the workflow: {applied.status_code} {applied.text}")
    names = [f"rt-{i:02d}" for i in range(options.rt_agents)]
    names += [f"burst-{i:02d}" for i in range(options.rt_agents)]
    created = [
        pair for chunk in parallel(create_agents_proc, server.url, [names], 1) for pair in chunk
    ]
    agents, burst_agents = created[: options.rt_agents], created[options.rt_agents :]

    queued = options.rt_agents * 3 // 2
    say(
        f"  burst check: {queued} runs queued, then {len(burst_agents)} other agents poll at "
        f"once (?wait={BURST_WAIT:g}) ..."
    )
    burst = burst_check(server.url, burst_agents, queued)
    report["burst"] = burst
    verdict = "ok" if burst["ok"] else "NOT OK: work stayed queued while agents waited"
    say(
        f"    {burst['got']}/{burst['agents']} agents got an instruction at once, "
        f"{burst['empty']} answered empty after {burst['empty_after']:.2f} s "
        f"with {burst['queued']} queued: {verdict}"
    )

    say(
        f"  python client ceiling: {options.client_procs} processes, {len(agents)} "
        f"connections on GET /healthz for {options.ceiling_duration:g} s ..."
    )
    if not options.profile:
        ceiling = python_healthz_ceiling(
            server.url, options.client_procs, len(agents), options.ceiling_duration
        )
        report["python_ceiling"] = ceiling
        say(
            f"    {ceiling['rate']:.0f} requests/s, p50 {ms(ceiling['p50'])}, "
            f"p99 {ms(ceiling['p99'])}, errors {ceiling['errors']}"
        )

    say(f"  starting {options.runs} runs of '{WORKFLOW}' (before timing) ...")
    began = time.monotonic()
    counts = [len(c) for c in split(list(range(options.runs)), 4)]
    with ProcessPoolExecutor(max_workers=4, mp_context=MP) as pool:
        futures = [pool.submit(start_runs_proc, server.url, count) for count in counts]
        execution_ids = [i for f in futures for i in f.result()]
    took = time.monotonic() - began
    report["runs_started_rate"] = len(execution_ids) / took
    say(
        f"    {len(execution_ids)} runs started in {took:.1f} s ({len(execution_ids) / took:.0f}/s)"
    )

    say(
        f"  round trips: {len(agents)} agents in {options.client_procs} processes, "
        f"poll ?wait=5 -> PUT executing -> POST result ..."
    )
    shared = AgentShared(
        total=len(execution_ids),
        completed=MP.Value("i", 0),
        done_at=MP.Value("d", 0.0),
        ninety_at=MP.Value("d", 0.0),
        all_done=MP.Event(),
        barrier=MP.Barrier(options.client_procs + 1),
    )
    queue = MP.Queue()
    chunks = split(agents, options.client_procs)
    if len(chunks) != options.client_procs:
        raise SystemExit("--client-procs may not exceed --rt-agents")
    workers = [
        MP.Process(
            target=agents_proc,
            args=(server.url, chunk, shared, 5.0, options.time_limit, queue),
        )
        for chunk in chunks
    ]
    for worker in workers:
        worker.start()
    spy = PySpy.start(server, options, "round-trip")
    shared.barrier.wait()
    cpu = CpuMeter(server)
    t0, wall0 = time.monotonic(), time.time()
    shared.all_done.wait(options.time_limit + 5)
    if spy:
        report.setdefault("pyspy", {})["round-trip"] = spy.stop()
    results = [queue.get(timeout=options.time_limit + 120) for _ in workers]
    for worker in workers:
        worker.join()
    # The load generator's CPU is counted once its processes have exited.
    rt_cpu = cpu.stop()
    finished = shared.all_done.is_set()
    elapsed = (shared.done_at.value if finished else time.monotonic()) - t0
    report.setdefault("windows", {})["round-trip"] = (wall0, wall0 + elapsed)
    handed_out = [i for r in results for i in r["handed_out"]]
    latencies = {
        kind: [x for r in results for x in r["latencies"][kind]]
        for kind in ("poll", "progress", "result")
    }
    every = [x for values in latencies.values() for x in values]
    errors = [e for r in results for e in r["errors"]]
    error_count = Counter[str]()
    for r in results:
        error_count.update(r["error_count"])
    completed = shared.completed.value
    report["rt"] = {
        "runs": len(execution_ids),
        "completed": completed,
        "finished": finished,
        "elapsed": elapsed,
        "ninety": shared.ninety_at.value - t0 if shared.ninety_at.value else float("nan"),
        "rate": completed / elapsed if elapsed else 0.0,
        "requests": len(every),
        "request_rate": len(every) / elapsed if elapsed else 0.0,
        "p50": percentile(every, 50),
        "p99": percentile(every, 99),
        "kinds": {
            kind: (len(v), percentile(v, 50), percentile(v, 99), max(v, default=float("nan")))
            for kind, v in latencies.items()
        },
        "slow_polls": sum(1 for x in latencies["poll"] if x > 1.0),
        "empty_polls": sum(r["empty_polls"] for r in results),
        "waiting_at_end": sorted(x for r in results for x in r["waiting_at_end"]),
        "per_agent": sorted(x for r in results for x in r["per_agent"]),
        "handed_out": len(handed_out),
        "duplicates": len(handed_out) - len(set(handed_out)),
        "errors": dict(error_count),
        "error_samples": errors,
        "cpu": rt_cpu,
    }
    rt = report["rt"]
    say(
        f"    {completed}/{len(execution_ids)} results acknowledged in {elapsed:.2f} s: "
        f"{rt['rate']:.0f} round trips/s ({rt['request_rate']:.0f} requests/s), "
        f"p50 {ms(rt['p50'])}, p99 {ms(rt['p99'])}"
    )
    say(f"      {cpu_line(rt['cpu'])}")
    for kind, (count, p50, p99, worst) in rt["kinds"].items():
        say(
            f"      {kind:<8} {count:>6} requests  p50 {ms(p50):>9}  p99 {ms(p99):>9}"
            f"  max {ms(worst):>9}"
        )
    waiting = rt["waiting_at_end"]
    say(
        f"      polls over 1 s: {rt['slow_polls']}; empty polls: {rt['empty_polls']}; "
        f"polls still open at the end: {len(waiting)}"
        + (f" (oldest {waiting[-1]:.2f} s)" if waiting else "")
    )
    say(f"      results per agent: min {rt['per_agent'][0]}, max {rt['per_agent'][-1]}")
    ninety = max(1, rt["runs"] * 9 // 10)
    say(
        f"      first 90% ({ninety} runs) took {rt['ninety']:.2f} s: "
        f"{ninety / rt['ninety']:.0f} round trips/s; the last 10% took "
        f"{rt['elapsed'] - rt['ninety']:.2f} s"
    )
    if error_count:
        say(f"    ERRORS: {dict(error_count)}")
        for sample in errors[:10]:
            say(f"      {sample[:400]}")

    execution_ids += burst["execution_ids"]
    handed_out += burst["handed_out"]

    say("  verifying every execution through the private API ...")
    report["verify"] = verify(server, execution_ids, set(handed_out))
    report["rt"]["duplicates"] = len(handed_out) - len(set(handed_out))
    for line in report["verify"]["lines"]:
        say(f"    {line}")


BURST_WAIT = 2.0


def burst_check(url: str, agents: list[tuple[str, str]], queued: int) -> dict[str, Any]:
    """With more work queued than agents, every agent polling at once must get some at
    once; then everything is finished so that the verification sees only successes."""
    execution_ids = start_runs_proc(url, queued)

    async def main() -> dict[str, Any]:
        clients = [
            httpx.AsyncClient(
                base_url=url, headers={**AGENT_HEADERS, "Authorization": f"Bearer {key}"}
            )
            for _, key in agents
        ]
        for client in clients:
            await client.get("/healthz")
        handed_out: list[str] = []

        async def poll(client: httpx.AsyncClient, agent_id: str, wait: float) -> Any:
            began = time.perf_counter()
            answer = await client.get(f"/agents/v1/{agent_id}/instructions", params={"wait": wait})
            answer.raise_for_status()
            return time.perf_counter() - began, answer.json()["instruction"]

        async def finish(client: httpx.AsyncClient, agent_id: str, instruction: Any) -> None:
            handed_out.append(instruction["id"])
            path = f"/agents/v1/{agent_id}/instructions/{instruction['id']}"
            (await client.put(path, json={"status": "executing"})).raise_for_status()
            report = {"status": "completed", "result": {"ok": True}}
            (await client.post(f"{path}/result", json=report)).raise_for_status()

        pairs = list(zip(clients, [agent_id for agent_id, _ in agents], strict=True))

        async def finish_all(polls: list[Any]) -> None:
            given = [(c, a, i) for (c, a), (_, i) in zip(pairs, polls, strict=True) if i]
            await asyncio.gather(*(finish(c, a, i) for c, a, i in given))

        first = await asyncio.gather(*(poll(c, a, BURST_WAIT) for c, a in pairs))
        await finish_all(first)
        deadline = time.monotonic() + 60
        while len(handed_out) < queued and time.monotonic() < deadline:
            polls = await asyncio.gather(*(poll(c, a, 0) for c, a in pairs))
            await finish_all(polls)
        for client in clients:
            await client.aclose()
        got = sum(1 for _, instruction in first if instruction)
        return {
            "queued": queued,
            "agents": len(agents),
            "got": got,
            "empty": len(agents) - got,
            "empty_after": max((t for t, i in first if not i), default=0.0),
            "ok": got == min(len(agents), queued),
            "handed_out": handed_out,
            "execution_ids": execution_ids,
        }

    return asyncio.run(main())


def verify(server: Server, execution_ids: list[str], handed_out: set[str]) -> dict[str, Any]:
    lines = []
    ok = True
    with admin_client(server.url) as api:
        for status in ("running", "failed", "cancelled", "succeeded"):
            listed = api.get("/api/v1/executions", params={"status": status, "limit": 500})
            listed.raise_for_status()
            found = len(listed.json()["executions"])
            expected = min(500, len(execution_ids)) if status == "succeeded" else 0
            ok &= found == expected
            lines.append(
                f"GET /api/v1/executions?status={status}&limit=500: {found} (expected {expected})"
            )
    checked = [
        row
        for chunk in parallel(check_executions_proc, server.url, split(execution_ids, 4), 4)
        for row in chunk
    ]
    succeeded = [
        r
        for r in checked
        if r["http"] == 200
        and r["status"] == "succeeded"
        and [s[:2] for s in r["steps"]] == [("succeeded", 1)]
    ]
    step_instructions = [s[2] for r in checked if r["http"] == 200 for s in r["steps"]]
    unknown = set(step_instructions) - handed_out
    ok &= len(succeeded) == len(execution_ids) and not unknown
    ok &= len(step_instructions) == len(set(step_instructions)) == len(handed_out)
    lines.append(
        f"GET /api/v1/executions/{{id}} for all {len(execution_ids)}: {len(succeeded)} succeeded "
        "with their one step succeeded on attempt 1"
    )
    lines.append(
        f"instructions in steps: {len(set(step_instructions))} distinct; handed out to agents: "
        f"{len(handed_out)} distinct; not handed out: {len(unknown)}"
    )
    bad = [r for r in checked if r not in succeeded][:5]
    for row in bad:
        lines.append(f"NOT OK: {row}")
    return {"ok": ok, "succeeded": len(succeeded), "checked": len(execution_ids), "lines": lines}


def query_database(database_url: str, queries: dict[str, str]) -> dict[str, list[tuple[Any, ...]]]:
    """Run read-only SQL straight on the benchmark's database (SQLite file or PostgreSQL)."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[1]
        with contextlib.closing(sqlite3.connect(path)) as conn:
            for key, sql in queries.items():
                rows[key] = [tuple(r) for r in conn.execute(sql).fetchall()]
    else:
        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(pg_admin_dsn(database_url))
            try:
                for key, sql in queries.items():
                    rows[key] = [tuple(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()

        asyncio.run(run())
    return rows


def database_figures(database_url: str) -> dict[str, Any]:
    """Counted in the database itself once the server has stopped (and flushed)."""
    queries = {
        "executions": "SELECT status, count(*) FROM executions GROUP BY status",
        "instructions": "SELECT status, count(*) FROM instructions GROUP BY status",
        "retried": "SELECT count(*) FROM instructions WHERE attempt > 1",
        "leased": "SELECT count(*), count(DISTINCT subject_id) FROM audit_records "
        "WHERE action = 'instruction.leased'",
        "heartbeats": "SELECT count(*) FROM agents "
        "WHERE name LIKE 'hb-%' AND last_heartbeat_at IS NOT NULL",
    }
    rows = query_database(database_url, queries)
    return {
        "executions": dict(rows["executions"]),
        "instructions": dict(rows["instructions"]),
        "retried": rows["retried"][0][0],
        "leased": rows["leased"][0][0],
        "leased_distinct": rows["leased"][0][1],
        "heartbeats": rows["heartbeats"][0][0],
    }


# -- one backend -----------------------------------------------------------------------------


def bench_backend(backend: str, options: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"backend": backend}
    tmp = Path(tempfile.mkdtemp(prefix=f"stavily-bench-{backend}-"))
    profile_session = None
    if options.profile:
        options.profile_dir.mkdir(parents=True, exist_ok=True)
        profile_session = options.profile_dir / f"server-{backend}.pyisession"
    try:
        with fresh_database(backend, tmp, options.pg_url) as database_url:
            server = Server(
                backend, database_url, tmp / "data", tmp / "server.log", profile_session
            )
            say(f"\n== {backend}: server on {server.url} (load average {load()}) ==")
            server.start()
            try:
                if options.wrk and not options.profile:
                    say(f"  wrk ceiling: GET /healthz for {options.duration:g} s ...")
                    ceiling = run_wrk(
                        server.url,
                        "healthz",
                        options.duration,
                        options.wrk_threads,
                        options.wrk_connections,
                    )
                    report["wrk_ceiling"] = ceiling
                    say(
                        f"    {ceiling['rate']:.0f} requests/s, p50 "
                        f"{ceiling['p50_us'] / 1000:.2f} ms, p99 "
                        f"{ceiling['p99_us'] / 1000:.2f} ms, non-2xx {ceiling['non2xx']}"
                    )
                if options.wrk:
                    heartbeat_test(server, options, tmp, report)
                else:
                    say("  wrk is missing: skipping the heartbeat test (apt-get install wrk)")
                round_trip_test(server, options, report)
            finally:
                server.stop()
                report["server_problems"] = server.problems()
                report["server_exit"] = server.proc.returncode if server.proc else None
                if report["server_problems"]:
                    say(f"  SERVER LOG has {len(report['server_problems'])} error lines:")
                    for line in report["server_problems"][:15]:
                        say(f"    {line[:500]}")
                    say(f"  (full log: {server.log_path})")
            report["load_after"] = load()
            say(f"  load average after the tests: {report['load_after']}")
            report["db"] = database_figures(database_url)
            say(f"  database after stop: {report['db']}")
            if profile_session is not None:
                report["profile"] = {
                    name: summarise_profile(profile_session, options.profile_dir, backend, name, w)
                    for name, w in report["windows"].items()
                }
    finally:
        if not report.get("server_problems"):
            shutil.rmtree(tmp, ignore_errors=True)
    return report


# -- the profile -----------------------------------------------------------------------------


class PySpy:
    """py-spy sampling the server (every thread, CPU-active samples only) for one test."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path, test: str, rate: int) -> None:
        self.proc, self.out, self.test, self.rate = proc, out, test, rate
        self.began = time.monotonic()

    @classmethod
    def start(cls, server: Server, options: argparse.Namespace, test: str) -> PySpy | None:
        if not options.py_spy or server.proc is None:
            return None
        options.profile_dir.mkdir(parents=True, exist_ok=True)
        out = options.profile_dir / f"pyspy-{server.backend}-{test}.txt"
        rate = 200
        command = ["py-spy", "record", "--pid", str(server.proc.pid), "--threads"]
        command += ["--format", "raw", "--rate", str(rate), "--nonblocking", "-o", str(out)]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # let it attach
        if proc.poll() is not None:
            raise RuntimeError(
                f"py-spy failed: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        return cls(proc, out, test, rate)

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.began
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        threads: Counter[str] = Counter()
        packages: Counter[str] = Counter()
        ours: Counter[str] = Counter()
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            # "thread (1234): Thread-7 (target)" -> "Thread (target)", to add up like threads
            thread = re.sub(r"^Thread-\d+", "Thread", frames[0].split(": ", 1)[-1])
            samples = int(count)
            threads[thread] += samples
            packages[f"{thread}: {_spy_package(frames[1:])}"] += samples
            for frame in {f for f in frames[1:] if "stavily/" in f and "stavily/cli" not in f}:
                ours[frame] += samples
        return {
            "test": self.test,
            "seconds": wall,
            "expected": wall * self.rate,
            "threads": threads.most_common(),
            "packages": packages.most_common(18),
            "ours": ours.most_common(15),
            "raw": str(self.out),
        }


def _spy_package(frames: list[str]) -> str:
    for frame in reversed(frames):
        location = frame.rpartition(" (")[2]
        for marker, label in _PACKAGES:
            if marker.lstrip("/") in location:
                return label
    return f"other ({frames[-1] if frames else '?'})"


def print_pyspy(backend: str, spy: dict[str, Any]) -> None:
    expected = spy["expected"] or 1.0
    say(
        f"\npy-spy ({backend}) during the {spy['test']} test ({spy['seconds']:.1f} s sampled at "
        f"{expected / spy['seconds']:.0f}/s; % = share of one core that was busy there)"
    )
    say("CPU-active time by thread:")
    for name, samples in spy["threads"]:
        say(f"  {samples / expected:6.1%}  {name}")
    say("CPU-active time by thread and package:")
    for name, samples in spy["packages"]:
        say(f"  {samples / expected:6.1%}  {name}")
    say("Stavily functions by inclusive CPU-active time (approximate for async code):")
    for name, samples in spy["ours"]:
        say(f"  {samples / expected:6.1%}  {name}")
    say(f"Raw stacks: {spy['raw']}")


def summarise_profile(
    session_path: Path, out_dir: Path, backend: str, test: str, window: tuple[float, float]
) -> dict[str, Any]:
    """Cut the server's pyinstrument session to one test's timed window, render it and
    rank functions by inclusive and own time."""
    from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer
    from pyinstrument.session import Session

    session = Session.load(session_path)
    start, end = window
    offset = session.start_time
    kept = []
    for stack, seconds in session.frame_records:
        offset += seconds
        if start <= offset <= end:
            kept.append((stack, seconds))
    cut = Session(
        frame_records=kept,
        start_time=start,
        duration=end - start,
        min_interval=session.min_interval,
        max_interval=session.max_interval,
        sample_count=len(kept),
        start_call_stack=session.start_call_stack,
        target_description=f"stavily serve ({backend}) during the {test} test",
        cpu_time=0,
        sys_path=session.sys_path,
        sys_prefixes=session.sys_prefixes,
    )
    text_path = out_dir / f"server-{backend}-{test}.txt"
    html_path = out_dir / f"server-{backend}-{test}.html"
    text_path.write_text(
        ConsoleRenderer(unicode=False, color=False, show_all=False, short_mode=False).render(cut)
    )
    html_path.write_text(HTMLRenderer().render(cut))
    cut.save(out_dir / f"server-{backend}-{test}.pyisession")

    total = sum(seconds for _, seconds in kept) or 1.0
    packages: Counter[str] = Counter()  # own time, by package (built-ins go to their caller)
    ours: Counter[str] = Counter()  # inclusive time of stavily functions
    calls: Counter[str] = Counter()  # inclusive time of library calls made by stavily code
    for stack, seconds in kept:
        frames = [_Frame.parse(identifier) for identifier in stack]
        packages[_package(frames)] += seconds
        for name in {f.name for f in frames if f.ours}:
            ours[name] += seconds
        seen = set()
        for caller, callee in zip(frames, frames[1:], strict=False):
            if caller.ours and not callee.ours and callee.name not in seen:
                seen.add(callee.name)
                calls[f"{callee.name} <- {caller.name}"] += seconds
    return {
        "test": test,
        "total": total,
        "packages": packages.most_common(),
        "ours": ours.most_common(22),
        "calls": calls.most_common(15),
        "text": str(text_path),
        "html": str(html_path),
    }


@dataclass(frozen=True)
class _Frame:
    function: str
    path: str
    line: str
    cls: str

    @classmethod
    def parse(cls, identifier: str) -> _Frame:
        head, *attributes = identifier.split("\x01")
        function, path, line = ([*head.split("\x00"), "", ""])[:3]
        klass = next((a[1:] for a in attributes if a.startswith("c")), "")
        return cls(function, path, line, klass)

    @property
    def ours(self) -> bool:
        return "/stavily/" in self.path and "/stavily/cli/" not in self.path

    @property
    def name(self) -> str:
        short = self.path
        for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
            if marker in short:
                short = short.split(marker, 1)[1]
                break
        qualified = f"{self.cls}.{self.function}" if self.cls else self.function
        return f"{qualified} ({short}:{self.line})"


_PACKAGES = [
    ("/sqlalchemy/sql/", "sqlalchemy: building, compiling, cache keys"),
    ("/sqlalchemy/engine/", "sqlalchemy: execution and result rows"),
    ("/sqlalchemy/dialects/", "sqlalchemy: dialect (driver adaptation)"),
    ("/sqlalchemy/", "sqlalchemy: async bridge (greenlets), pool, other"),
    ("/aiosqlite/", "aiosqlite (hand-off to its thread)"),
    ("/asyncpg/", "asyncpg"),
    ("/pydantic", "pydantic"),
    ("/fastapi/", "fastapi"),
    ("/starlette/", "starlette"),
    ("/anyio/", "anyio"),
    ("/uvicorn/", "uvicorn"),
    ("/stavily/", "stavily (own code)"),
    ("/asyncio/", "asyncio"),
    ("/json/", "json"),
]


def _package(frames: list[_Frame]) -> str:
    """The package a sample's own time belongs to; the bare event loop counts as idle."""
    if frames and frames[-1].function == "run" and frames[-1].path.endswith("asyncio/runners.py"):
        return "idle: event loop waiting (I/O, the aiosqlite thread, locks)"
    for frame in reversed(frames):
        for marker, label in _PACKAGES:
            if marker in frame.path:
                return label
    return "other"


def print_profile(backend: str, profile: dict[str, Any]) -> None:
    total = profile["total"]
    say(
        f"\nServer profile ({backend}, under pyinstrument) during the {profile['test']} test: "
        f"{total:.1f} s of the main thread"
    )
    say("Own time by package (% of the window):")
    for name, seconds in profile["packages"]:
        say(f"  {seconds / total:6.1%}  {name}")
    say("Stavily functions by inclusive time:")
    for name, seconds in profile["ours"]:
        say(f"  {seconds / total:6.1%}  {name}")
    say("Library calls made from stavily code, by inclusive time:")
    for name, seconds in profile["calls"]:
        say(f"  {seconds / total:6.1%}  {name}")
    say(f"Full tree: {profile['text']}  (HTML: {profile['html']})")


# -- the table -------------------------------------------------------------------------------


def figure_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    na = "n/a"
    hb = report.get("heartbeat")
    if hb:
        rows += [
            ("heartbeats/s (wrk, 1000 agents)", f"{hb['rate']:.0f}"),
            (
                "  heartbeat latency p50 / p99",
                f"{hb['p50_us'] / 1000:.2f} / {hb['p99_us'] / 1000:.2f} ms",
            ),
            ("  heartbeat non-2xx / socket errors", f"{hb['non2xx']} / {hb['socket_errors']}"),
            ("  CPU %: server / postgres / wrk / other", _cpu_cell(hb["cpu"])),
            (
                "  agents with last_heartbeat_at (API / DB)",
                f"{report['heartbeat_agents_api']} / {report['db']['heartbeats']}"
                f" of {report['heartbeat_agents_total']}",
            ),
        ]
    ceiling = report.get("wrk_ceiling")
    if ceiling:
        rows += [
            ("wrk ceiling: GET /healthz req/s", f"{ceiling['rate']:.0f}"),
            (
                "  wrk /healthz latency p50 / p99",
                f"{ceiling['p50_us'] / 1000:.2f} / {ceiling['p99_us'] / 1000:.2f} ms",
            ),
        ]
    rt = report.get("rt")
    if rt:
        kinds = rt["kinds"]
        rows += [
            ("runs started/s (setup, POST runs)", f"{report['runs_started_rate']:.0f}"),
            ("round trips/s (poll+progress+result)", f"{rt['rate']:.0f}"),
            ("  agent API requests/s", f"{rt['request_rate']:.0f}"),
            ("  request latency p50 / p99", f"{ms(rt['p50'])} / {ms(rt['p99'])}"),
            ("  CPU %: server / postgres / clients / other", _cpu_cell(rt["cpu"])),
        ]
        for kind in ("poll", "progress", "result"):
            count, p50, p99, worst = kinds[kind]
            rows.append((f"    {kind} p50 / p99", f"{ms(p50)} / {ms(p99)}"))
        rows += [
            ("  runs / elapsed", f"{rt['completed']}/{rt['runs']} in {rt['elapsed']:.2f} s"),
            (
                "  first 90% of runs: elapsed, round trips/s",
                f"{rt['ninety']:.2f} s, {max(1, rt['runs'] * 9 // 10) / rt['ninety']:.0f}/s",
            ),
            (
                "  results per agent min / max",
                f"{rt['per_agent'][0]} / {rt['per_agent'][-1]}",
            ),
            ("  instructions handed out twice", str(rt["duplicates"])),
            (
                "  burst: agents served at once",
                f"{report['burst']['got']}/{report['burst']['agents']} "
                f"({report['burst']['queued']} queued)"
                + ("" if report["burst"]["ok"] else " NOT OK"),
            ),
            ("  client-side errors", str(sum(rt["errors"].values()))),
            (
                "  executions verified succeeded",
                f"{report['verify']['succeeded']}/{report['verify']['checked']}"
                + ("" if report["verify"]["ok"] else " NOT OK"),
            ),
        ]
        db = report.get("db") or {}
        if db:
            rows.append(
                (
                    "  DB: leased audit records / retried",
                    f"{db['leased']} ({db['leased_distinct']} distinct) / {db['retried']}",
                )
            )
    pc = report.get("python_ceiling")
    if hb and ceiling:
        rows.append(
            ("heartbeats as a share of the wrk ceiling", f"{hb['rate'] / ceiling['rate']:.0%}")
        )
    if rt and pc:
        rows.append(
            (
                "agent requests as a share of python ceiling",
                f"{rt['request_rate'] / pc['rate']:.0%}",
            )
        )
    if pc:
        rows += [
            (f"python ceiling: {pc['procs']} procs GET /healthz/s", f"{pc['rate']:.0f}"),
            ("  python /healthz latency p50 / p99", f"{ms(pc['p50'])} / {ms(pc['p99'])}"),
        ]
    rows.append(("server log error lines", str(len(report.get("server_problems", [])) or 0)))
    return [(k, v if v else na) for k, v in rows]


def _cpu_cell(cpu: dict[str, float]) -> str:
    parts = ("server", "postgres", "clients", "other")
    return " / ".join(f"{cpu[k]:.0f}" for k in parts)


def print_table(reports: list[dict[str, Any]], options: argparse.Namespace) -> None:
    columns = [dict(figure_rows(r)) for r in reports]
    keys: list[str] = []
    for report in reports:
        for key, _ in figure_rows(report):
            if key not in keys:
                keys.append(key)
    headers = ["figure", *(r["backend"] for r in reports)]
    widths = [max(len(headers[0]), *(len(k) for k in keys))]
    for i, column in enumerate(columns):
        widths.append(max(len(headers[i + 1]), *(len(column.get(k, "-")) for k in keys)))
    say("")
    say(
        f"Stavily agent API benchmark ({options.version}) - nproc {os.cpu_count()}, python "
        f"{sys.version.split()[0]}, duration {options.duration:g} s, runs {options.runs}, "
        f"{options.rt_agents} agents in {options.client_procs} client processes"
        + (" (quick)" if options.quick else "")
    )
    line = "-+-".join("-" * w for w in widths)
    say(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    say(line)
    for key in keys:
        cells = [key.ljust(widths[0])]
        cells += [c.get(key, "-").rjust(w) for c, w in zip(columns, widths[1:], strict=True)]
        say(" | ".join(cells))


# -- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="short runs, fewer workflow runs")
    parser.add_argument("--duration", type=float, help="wrk seconds (default 10, quick 3)")
    parser.add_argument("--runs", type=int, help="workflow runs (default 2000, quick 300)")
    parser.add_argument("--agents", type=int, default=1000, help="heartbeating agents")
    parser.add_argument("--rt-agents", type=int, default=20, help="round-trip agents")
    parser.add_argument("--client-procs", type=int, default=4, help="round-trip processes")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=120, help="round-trip give-up (s)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the server under pyinstrument (default backend sqlite); no ceilings",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the server with py-spy (all threads) during each timed test",
    )
    parser.add_argument(
        "--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "stavily-bench-profile"
    )
    options = parser.parse_args()
    options.duration = options.duration or (3.0 if options.quick else 10.0)
    options.runs = options.runs or (300 if options.quick else 2000)
    options.ceiling_duration = min(options.duration, 5.0)
    options.pg_url = os.environ.get("STAVILY_BENCH_DATABASE_URL", DEFAULT_PG_URL)
    options.wrk = shutil.which("wrk") is not None
    if options.profile and options.backend == "both":
        options.backend = "sqlite"
    return options


def main() -> int:
    options = parse_args()
    if not options.wrk and not options.profile:
        say("wrk is not installed: install it with `apt-get install -y wrk` (Debian package wrk).")
        say("Continuing without the wrk measurements.")
    options.version = source_version()
    busy = background_cpu()
    say(
        f"machine: nproc {os.cpu_count()}; python {sys.version.split()[0]}; stavily "
        f"{options.version}; CPU already busy before the benchmark: {busy:.0f}% of one core "
        f"(load average {load()})"
    )
    if busy > 25:
        say("  note: other work is running on this machine; the figures will be lower and noisier")
    backends = ["sqlite", "postgresql"] if options.backend == "both" else [options.backend]
    began = time.monotonic()
    reports = []
    for backend in backends:
        reports.append(bench_backend(backend, options))
    for report in reports:
        for profile in report.get("profile", {}).values():
            print_profile(report["backend"], profile)
        for spy in report.get("pyspy", {}).values():
            print_pyspy(report["backend"], spy)
    print_table(reports, options)
    say(f"\ntotal wall time {time.monotonic() - began:.0f} s")
    healthy = all(
        r.get("verify", {}).get("ok")
        and not r["rt"]["duplicates"]
        and r["burst"]["ok"]
        and not r["rt"]["errors"]
        and not r.get("server_problems")
        and (not r.get("heartbeat") or not r["heartbeat"]["non2xx"])
        for r in reports
    )
    if not healthy:
        say("SOME CHECKS FAILED (see above)")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
