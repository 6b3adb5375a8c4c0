"""Benchmark of the workflow engine, on SQLite and PostgreSQL, beside Celery on Redis.

    python bench/bench_engine.py [--backend sqlite|postgresql|both] [--quick] [--profile]
                                  [--only chain|throughput] [--no-celery]

Run it from the repository with PYTHONPATH=src:. (it sets that for the server itself if
it is missing). Each backend gets a fresh database and a real `stavily serve`
subprocess (bench_agent_api.Server), driven over loopback HTTP by simulated agents that
speak the public agent API (AGENT_API.md) and whose plugin does nothing. They use a
minimal keep-alive HTTP client (bench/rawhttp.py: a tenth of httpx's cost per request,
closer to the Go agents'); its own floor and ceiling on GET /healthz are printed too:

1. Chain overhead: one run of a workflow of 400 no-op steps, each `depends_on` the
   one before, on ONE agent. Measured twice: as the official agents do it (poll with
   ?wait=, PUT executing, POST result, poll again) and with our agent's piggyback (the
   result is posted with ?next=1 and its answer carries the next instruction). The
   time from POST .../runs to the 400th result acknowledged, divided by 400, is the
   orchestration overhead per step: the agent's plugin takes no time.
2. Throughput: N executions (10,000; --quick 1,000) of a 3-step workflow a -> b -> c
   are started up front from 4 processes; then 50 agents in several client processes
   loop poll (?wait=5) -> PUT executing -> POST result until every execution has
   ended. Executions/s and steps/s count from the moment the agents start to the
   N-th execution's last result. Step-dispatch latency (ready -> handed to an agent)
   is measured on the client side with one system-wide monotonic clock: for b and c,
   from the previous step's result POST returning (the server queued the step in that
   request's transaction) to the step's instruction arriving at an agent; for a, from
   the run's start (POST .../runs sent, or the agents starting if the run was
   started before them). Under a backlog of N queued executions this is queue wait.
   So a second, short phase starts executions at a steady 50% of the server's measured
   capacity for whole runs (starting one, timed in the set-up, plus working its three
   steps) while the same agents long-poll, and reports the same latencies below
   saturation.
   The server's resident memory is sampled throughout (peak of VmRSS and VmHWM).
   The whole test is then run again (new agents, N new runs) as our own agent speaks:
   PUT executing, POST result?next=1, and the instruction that answer carries, polling
   only when it carries none - two requests a step instead of three.
3. The peer in the same run: Celery with the local Redis (127.0.0.1:6379), a worker
   subprocess `celery -A bench.celery_app worker --concurrency=2`, results stored in
   Redis: a chain of 400 no-op tasks (time per task), and N no-op tasks queued up
   front, then consumed by the two worker processes (tasks/s). Celery is measured once
   and set beside each backend with the ratio. Without celery installed that column is
   skipped (pip install -r bench/requirements.txt).

Also measured: the Python load generator's ceiling (GET /healthz, which does no
database work, from the same processes and connections), and for each timed window the
CPU split between the server, PostgreSQL, the load generator and the rest of the
machine, to tell what the bottleneck was.

Correctness is checked after each test: every execution succeeded, with every step
succeeded on its first attempt (attempts == 1), every instruction's result accepted
once, checked through the private API and, once the server has stopped, in the
database itself (no step with two instructions, no instruction leased twice). Exit
status 1 when a check failed.

With --profile, the chain test (with --only throughput: the throughput test) is run
once more with the server under pyinstrument, on the backend given (SQLite with
--backend both), and the profile of its timed window is summarised; those timings are
slowed by the profiler and are not the benchmark's.

Run time: the throughput tests' fixed work (twice 30,000 steps and starting 20,000 runs
on each backend) dominates: about 15 minutes at 900 steps/s on SQLite and 200 on
PostgreSQL. --quick (twice 3,000 steps per backend) takes about 3 minutes; --only runs
one of the two shapes. --time-limit stops a throughput test that runs too long; its
rates are then over the work done by then.

PostgreSQL: STAVILY_BENCH_DATABASE_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test) names the server; a fresh database
is created for each run and dropped afterwards. Nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # `python bench/bench_engine.py` puts only bench/ on the path
    sys.path.insert(0, str(ROOT))

from bench.bench_agent_api import (  # noqa: E402
    AGENT_HEADERS,
    MP,
    CpuMeter,
    Server,
    _admin_async,
    _pg_execute,
    _proc_jiffies,
    admin_client,
    background_cpu,
    check_executions_proc,
    cpu_line,
    create_agents_proc,
    fresh_database,
    load,
    ms,
    parallel,
    percentile,
    print_profile,
    python_healthz_ceiling,
    query_database,
    result_report,
    rfc3339_now,
    say,
    source_version,
    split,
    summarise_profile,
)
from bench.rawhttp import RawClient, Response, ceiling  # noqa: E402

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
CHAIN_WORKFLOW = "bench-chain"
ABC_WORKFLOW = "bench-abc"
ABC_STEPS = ("a", "b", "c")
POLL_WAIT = 5.0

# Published reference figures and our targets, printed beside the measurements.
WINDMILL_MS_PER_STEP = 49.0
CELERY_REF_MS_PER_TASK = 5.0
CELERY_REF_TASKS_PER_S = 500.0
TARGET_MS_PER_STEP = 3.0
TARGET_STEPS_PER_S = 1000.0
TARGET_P99_DISPATCH = 0.100

Record = tuple[str, str, str, int, float, float]  # execution, step, instruction, agent,
# received (monotonic), result acknowledged (monotonic)


def chain_source(steps: int) -> str:
    lines = [f"name: {CHAIN_WORKFLOW}", 'version: "1.0.0"', "actions:", "  steps:"]
    for i in range(steps):
        lines += [f"    - name: s{i:03d}", "      plugin: noop", "      timeout: 30s"]
        if i:
            lines.append(f"      depends_on: [s{i - 1:03d}]")
    return "\n".join(lines) + "\n"


ABC_SOURCE = f"""
name: {ABC_WORKFLOW}
version: "1.0.0"
actions:
  steps:
    - name: a
      plugin: noop
      timeout: 30s
    - name: b
      plugin: noop
      timeout: 30s
      depends_on: [a]
    - name: c
      plugin: noop
      timeout: 30s
      depends_on: [b]
"""


def apply_workflow(url: str, source: str) -> None:
    with admin_client(url) as api:
        applied = api.post(
            "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
        )
    if applied.status_code not in (200, 201):  # 200: applied already, unchanged
        raise RuntimeError(f"applying a workflow: {applied.status_code} {applied.text[:500]}")


def progress_body() -> dict[str, Any]:
    stamp = rfc3339_now()
    return {
        "status": "executing",
        "execution_log": [f"[{stamp}] Instruction received", f"[{stamp}] Started plugin execution"],
    }


def result_body(instruction: dict[str, Any]) -> dict[str, Any]:
    return result_report(instruction, [f"[{rfc3339_now()}] Instruction received"])


def agent_client(url: str, key: str) -> RawClient:
    """The simulated agent's connection: bench/rawhttp.py, not httpx (see there why)."""
    return RawClient(url, {**AGENT_HEADERS, "Authorization": f"Bearer {key}"})


# -- client processes (module level so that they pickle) -------------------------------------


def start_runs_timed_proc(url: str, job: tuple[str, int, float]) -> list[tuple[str, float, float]]:
    """Start `count` runs of `workflow`: as fast as 8 requests in flight allow (rate 0),
    or one every 1/rate seconds. Returns (execution id, time.monotonic() when its
    POST was sent, and when it was answered) for each."""
    workflow, count, rate = job

    async def main() -> list[tuple[str, float, float]]:
        async with _admin_async(url) as client:
            await client.get("/healthz")
            limit = asyncio.Semaphore(8 if not rate else 64)
            began = time.monotonic()

            async def one(i: int) -> tuple[str, float, float]:
                if rate:
                    await asyncio.sleep(max(0.0, began + i / rate - time.monotonic()))
                async with limit:
                    sent = time.monotonic()
                    answer = await client.post(
                        f"/api/v1/workflows/{workflow}/runs", json={"inputs": {"n": i}}
                    )
                answered = time.monotonic()
                if answer.status_code != 201:
                    raise RuntimeError(f"POST runs: {answer.status_code} {answer.text[:300]}")
                return str(answer.json()["id"]), sent, answered

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    return asyncio.run(main())


def engine_agents_proc(
    url: str,
    agents: list[tuple[str, str]],
    shared: dict[str, Any],
    time_limit: float,
    queue: Any,
) -> None:  # pragma: no cover - runs in a child process
    """Simulated agents (long poll -> PUT executing -> POST result; with
    shared["piggyback"], POST result?next=1 and the instruction its answer carries, as
    our agent does) that record, for every instruction, when it arrived and when its
    result was acknowledged.

    bench_agent_api.agents_proc counts results only; dispatch latency needs these
    per-instruction times, hence this driver."""
    records: list[Record] = []
    # (when the answer came, how long it took): only the saturated window is reported
    latencies: dict[str, list[tuple[float, float]]] = {"poll": [], "progress": [], "result": []}
    errors: list[str] = []
    error_count = Counter[str]()
    empty_polls = 0
    last_step = ABC_STEPS[-1]

    def failed(kind: str, answer: Response) -> None:
        error_count[f"{kind} {answer.status_code}"] += 1
        if len(errors) < 20:
            errors.append(f"{kind} {answer.path} -> {answer.status_code} {answer.text}")

    async def agent_loop(client: RawClient, agent_id: str, index: int) -> None:
        nonlocal empty_polls
        base = f"/agents/v1/{agent_id}/instructions"
        instruction: dict[str, Any] | None = None  # the one a result's answer carried
        result_params = {"next": 1} if shared["piggyback"] else None
        while True:
            if instruction is None:
                began = time.monotonic()
                answer = await client.get(base, params={"wait": POLL_WAIT})
                received = time.monotonic()
                latencies["poll"].append((received, received - began))
                if answer.status_code != 200:
                    failed("poll", answer)
                    await asyncio.sleep(0.05)
                    continue
                instruction = answer.json().get("instruction")
                if instruction is None:
                    empty_polls += 1
                    continue
            path = f"{base}/{instruction['id']}"
            began = time.monotonic()
            answer = await client.put(path, json=progress_body())
            now = time.monotonic()
            latencies["progress"].append((now, now - began))
            if answer.status_code != 200:
                failed("progress", answer)
            began = time.monotonic()
            answer = await client.post(
                f"{path}/result", json=result_body(instruction), params=result_params
            )
            acknowledged = time.monotonic()
            latencies["result"].append((acknowledged, acknowledged - began))
            if answer.status_code != 200 or answer.json().get("acknowledged") is not True:
                failed("result", answer)
                instruction = None
                continue
            context = instruction.get("context") or {}
            step = str(context.get("step"))
            records.append(
                (
                    str(context.get("execution_id")),
                    step,
                    instruction["id"],
                    index,
                    received,
                    acknowledged,
                )
            )
            if step == last_step:
                with shared["done"].get_lock():
                    shared["done"].value += 1
            instruction = answer.json().get("next_instruction")
            received = acknowledged

    async def main() -> None:
        clients = [agent_client(url, key) for _, key in agents]
        for client in clients:
            await client.get("/healthz")  # open the connection before timing
        shared["barrier"].wait()
        started = time.monotonic()
        tasks = [
            asyncio.create_task(agent_loop(client, agent_id, shared["first"] + i))
            for i, (client, (agent_id, _)) in enumerate(zip(clients, agents, strict=True))
        ]
        while not shared["stop"].is_set() and time.monotonic() - started < time_limit:
            if all(task.done() for task in tasks):
                break
            await asyncio.sleep(0.02)
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                error_count[f"exception {type(outcome).__name__}"] += 1
                if len(errors) < 20:
                    errors.append(f"agent loop crashed: {outcome!r}")
        for client in clients:
            await client.aclose()

    asyncio.run(main())
    queue.put(
        {
            "records": records,
            "latencies": latencies,
            "errors": errors,
            "error_count": dict(error_count),
            "empty_polls": empty_polls,
        }
    )


# -- measuring helpers -----------------------------------------------------------------------


class LoadCpuMeter(CpuMeter):
    """CpuMeter, counting as load generator also client processes still running (their
    CPU reaches this process's rusage only once they have been waited for)."""

    def __init__(self, server: Server, client_pids: list[int]) -> None:
        self.client_pids = client_pids
        self.client_start = {pid: _proc_jiffies(pid) for pid in client_pids}
        super().__init__(server)

    def stop(self, window: float | None = None) -> dict[str, float]:
        seconds = window or (time.monotonic() - self.began)
        cpu = super().stop(window)
        used = sum(_proc_jiffies(pid) - self.client_start[pid] for pid in self.client_pids)
        extra = max(0, used) / self.hz / seconds * 100
        cpu["clients"] += extra
        cpu["other"] = max(0.0, cpu["other"] - extra)
        return cpu


class MemorySampler:
    """Peak resident memory of one process: VmRSS sampled every 0.1 s, and VmHWM."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.first = self.read().get("VmRSS", 0)

    def read(self) -> dict[str, int]:
        found = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return found

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            rss = self.read().get("VmRSS")
            if rss:
                self.samples.append(rss)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        final = self.read()
        peak = max([*self.samples, final.get("VmRSS", 0), final.get("VmHWM", 0)])
        return {"start_mb": self.first / 2**20, "peak_mb": peak / 2**20}


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values, default=float("nan")),
    }


def _print_kinds(kinds: dict[str, dict[str, float]], indent: str) -> None:
    for kind, s in kinds.items():
        say(
            f"{indent}{kind:<8} {s['n']:>6} requests  p50 {ms(s['p50']):>9}  "
            f"p99 {ms(s['p99']):>9}  max {ms(s['max']):>9}"
        )


# -- 1. the chain ----------------------------------------------------------------------------


async def _run_chain(
    url: str, agent: tuple[str, str], steps: int, piggyback: bool
) -> dict[str, Any]:
    agent_id, key = agent
    latencies: dict[str, list[float]] = {"start": [], "poll": [], "progress": [], "result": []}
    acknowledged: list[str] = []
    errors: list[str] = []
    empty_polls = 0
    async with agent_client(url, key) as client, _admin_async(url) as admin:
        await client.get("/healthz")
        await admin.get("/healthz")
        base = f"/agents/v1/{agent_id}/instructions"
        wall0 = time.time()
        began = time.perf_counter()
        answer = await admin.post(f"/api/v1/workflows/{CHAIN_WORKFLOW}/runs", json={"inputs": {}})
        latencies["start"].append(time.perf_counter() - began)
        if answer.status_code != 201:
            raise RuntimeError(f"starting the chain: {answer.status_code} {answer.text[:300]}")
        execution_id = str(answer.json()["id"])
        instruction: dict[str, Any] | None = None
        done = 0
        deadline = time.monotonic() + 120
        while done < steps and time.monotonic() < deadline and len(errors) < 20:
            if instruction is None:
                t = time.perf_counter()
                answer = await client.get(base, params={"wait": POLL_WAIT})
                latencies["poll"].append(time.perf_counter() - t)
                if answer.status_code != 200:
                    errors.append(f"poll -> {answer.status_code} {answer.text[:300]}")
                    continue
                instruction = answer.json().get("instruction")
                if instruction is None:
                    empty_polls += 1
                    continue
            path = f"{base}/{instruction['id']}"
            t = time.perf_counter()
            answer = await client.put(path, json=progress_body())
            latencies["progress"].append(time.perf_counter() - t)
            if answer.status_code != 200:
                errors.append(f"progress -> {answer.status_code} {answer.text[:300]}")
            t = time.perf_counter()
            answer = await client.post(
                f"{path}/result",
                params={"next": 1} if piggyback else None,
                json=result_body(instruction),
            )
            latencies["result"].append(time.perf_counter() - t)
            this, instruction = instruction["id"], None
            if answer.status_code != 200 or answer.json().get("acknowledged") is not True:
                errors.append(f"result -> {answer.status_code} {answer.text[:300]}")
                continue
            acknowledged.append(this)
            done += 1
            if piggyback:
                instruction = answer.json().get("next_instruction")
        elapsed = time.perf_counter() - began
    waiting = sum(sum(v) for v in latencies.values())
    return {
        "mode": "piggyback" if piggyback else "poll",
        "execution_id": execution_id,
        "steps": steps,
        "done": done,
        "elapsed": elapsed,
        "per_step": elapsed / max(1, done),
        "request_time_per_step": waiting / max(1, done),
        "requests": sum(len(v) for v in latencies.values()),
        "kinds": {k: _stats(v) for k, v in latencies.items() if v},
        "acknowledged": acknowledged,
        "empty_polls": empty_polls,
        "errors": errors,
        "window": (wall0, wall0 + elapsed),
    }


def chain_test(
    server: Server, options: argparse.Namespace, report: dict[str, Any], modes: tuple[bool, ...]
) -> None:
    apply_workflow(server.url, chain_source(options.chain_steps))
    agent = create_agents_proc(server.url, [f"chain-{uuid.uuid4().hex[:6]}"])[0]
    floor = report["chain_client"] = asyncio.run(ceiling(server.url))
    say(
        f"  the simulated agent's own floor: GET /healthz one at a time on its connection: "
        f"{floor['rate']:.0f}/s, p50 {ms(floor['p50'])} (client and server HTTP together)"
    )
    for piggyback in modes:
        label = "piggyback: POST result?next=1" if piggyback else "poll ?wait=, PUT, POST result"
        say(f"  chain: {options.chain_steps} sequential no-op steps, one agent ({label}) ...")
        cpu = CpuMeter(server)
        figures = asyncio.run(_run_chain(server.url, agent, options.chain_steps, piggyback))
        figures["cpu"] = cpu.stop(figures["elapsed"])
        figures["verify"] = verify_executions(
            server.url, [figures["execution_id"]], figures.pop("acknowledged"), options.chain_steps
        )
        report.setdefault("chain", {})[figures["mode"]] = figures
        say(
            f"    {figures['done']}/{figures['steps']} steps in {figures['elapsed']:.2f} s: "
            f"{ms(figures['per_step'])}/step, of which {ms(figures['request_time_per_step'])} "
            f"waiting on the server's answers ({figures['requests']} requests)"
        )
        _print_kinds(figures["kinds"], "      ")
        say(f"      {cpu_line(figures['cpu'])}")
        for line in figures["verify"]["lines"]:
            say(f"      {line}")
        for error in figures["errors"][:10]:
            say(f"      ERROR {error}")


# -- 2. throughput ---------------------------------------------------------------------------


def throughput_test(
    server: Server, options: argparse.Namespace, report: dict[str, Any], piggyback: bool = False
) -> None:
    url = server.url
    apply_workflow(url, ABC_SOURCE)
    names = [f"{'tn' if piggyback else 'tp'}-{i:03d}" for i in range(options.agents)]
    agents = [
        pair for chunk in parallel(create_agents_proc, url, split(names, 4), 4) for pair in chunk
    ]
    report["agents"] = len(agents)
    if piggyback:
        say("  THROUGHPUT again, as our agent does it: PUT executing, POST result?next=1")
        _throughput_runs(server, options, report, agents, "tp_next", piggyback)
        return

    say(
        f"  load generator ceiling: {options.client_procs} processes, {len(agents)} "
        f"connections on GET /healthz for {options.ceiling_duration:g} s ..."
    )
    ceiling = python_healthz_ceiling(
        url, options.client_procs, len(agents), options.ceiling_duration, raw=True
    )
    report["ceiling"] = ceiling
    say(
        f"    {ceiling['rate']:.0f} requests/s, p50 {ms(ceiling['p50'])}, "
        f"p99 {ms(ceiling['p99'])}, errors {ceiling['errors']}"
    )
    _throughput_runs(server, options, report, agents, "tp", piggyback)


def _throughput_runs(
    server: Server,
    options: argparse.Namespace,
    report: dict[str, Any],
    agents: list[tuple[str, str]],
    key: str,
    piggyback: bool,
) -> None:
    url = server.url
    runs = options.executions
    say(f"  starting {runs} runs of '{ABC_WORKFLOW}' (a -> b -> c) from 4 processes ...")
    began = time.monotonic()
    jobs = [(ABC_WORKFLOW, len(c), 0.0) for c in split(list(range(runs)), 4)]
    started = [pair for chunk in parallel(start_runs_timed_proc, url, jobs, 4) for pair in chunk]
    took = time.monotonic() - began
    report["runs_started_rate"] = len(started) / took
    say(f"    {len(started)} runs started in {took:.1f} s ({len(started) / took:.0f}/s)")
    if server.backend == "postgresql":
        # The database grew from empty to N runs in seconds: the planner's statistics
        # are still an empty database's until autovacuum comes by (a minute), and its
        # plans scan whole indexes meanwhile. In service they are kept current.
        asyncio.run(_pg_execute(server.database_url, "ANALYZE"))

    chunks = split(agents, options.client_procs)
    shared = {
        "done": MP.Value("i", 0),
        "stop": MP.Event(),
        "barrier": MP.Barrier(len(chunks) + 1),
        "first": 0,
        "piggyback": piggyback,
    }
    queue = MP.Queue()
    workers = []
    first = 0
    for chunk in chunks:
        mine = {**shared, "first": first}
        first += len(chunk)
        workers.append(
            MP.Process(
                target=engine_agents_proc, args=(url, chunk, mine, options.time_limit, queue)
            )
        )
    for worker in workers:
        worker.start()
    say(
        f"  throughput: {len(agents)} agents in {len(chunks)} client processes, "
        f"poll ?wait={POLL_WAIT:g} -> PUT executing -> POST result ..."
    )
    memory = MemorySampler(server.proc.pid if server.proc else 0).start()
    shared["barrier"].wait()
    cpu = LoadCpuMeter(server, [w.pid for w in workers if w.pid])
    t0 = time.monotonic()
    wall0 = time.time()
    while shared["done"].value < runs and time.monotonic() - t0 < options.time_limit:
        time.sleep(0.01)
    stopped = time.monotonic()
    saturated_cpu = cpu.stop()
    finished = shared["done"].value >= runs
    say(f"    {shared['done'].value}/{runs} executions ended after {stopped - t0:.1f} s")

    paced: list[tuple[str, float, float]] = []
    rate = 0.0
    if finished:
        # Half of what the server can do of whole runs: starting one (timed above,
        # before the agents ran) and working its three steps.
        capacity = 1 / ((stopped - t0) / runs + took / len(started))
        rate = max(5.0, min(300.0, 0.5 * capacity))
        count = max(20, int(rate * options.paced_seconds))
        say(
            f"  below saturation: {count} more runs at a steady {rate:.0f}/s (50% of "
            f"{capacity:.0f} runs/s: starting runs and working their steps, as just measured) "
            "while the agents long-poll ..."
        )
        with ProcessPoolExecutor(max_workers=1, mp_context=MP) as pool:
            paced = pool.submit(start_runs_timed_proc, url, (ABC_WORKFLOW, count, rate)).result()
        deadline = time.monotonic() + 60
        while shared["done"].value < runs + count and time.monotonic() < deadline:
            time.sleep(0.01)
    shared["stop"].set()
    results = [queue.get(timeout=options.time_limit + 120) for _ in workers]
    for worker in workers:
        worker.join()
    memory_figures = memory.stop()

    records = [r for result in results for r in result["records"]]
    error_count = Counter[str]()
    for result in results:
        error_count.update(result["error_count"])
    latencies = {  # the saturated window only: later polls wait idle up to ?wait=
        kind: [took for r in results for at, took in r["latencies"][kind] if at <= stopped]
        for kind in ("poll", "progress", "result")
    }
    tp = dispatch_figures(records, started, paced, t0, stopped)
    tp.update(
        runs=runs,
        finished=finished,
        cpu=saturated_cpu,
        errors=dict(error_count),
        error_samples=[e for r in results for e in r["errors"]],
        empty_polls=sum(r["empty_polls"] for r in results),
        kinds={k: _stats(v) for k, v in latencies.items()},
        paced_rate=rate,
        memory=memory_figures,
        request_rate=sum(len(v) for v in latencies.values()) / max(1e-9, stopped - t0),
        window=(wall0, wall0 + stopped - t0),
    )
    report[key] = tp
    say(
        f"    {tp['completed']}/{runs} executions and {tp['steps_done']} steps in "
        f"{tp['elapsed']:.2f} s: {tp['exec_rate']:.1f} executions/s, {tp['step_rate']:.0f} "
        f"steps/s ({tp['request_rate']:.0f} agent requests/s)"
    )
    if not finished:
        say(
            f"    NOT FINISHED: the time limit ({options.time_limit:g} s, --time-limit) stopped "
            "the agents; the rates are over the work done by then"
        )
    say(f"      {cpu_line(tp['cpu'])}")
    say(
        f"      server RSS {memory_figures['start_mb']:.0f} MB before, "
        f"peak {memory_figures['peak_mb']:.0f} MB"
    )
    say("      agent requests while the runs queued up front were worked off:")
    _print_kinds(tp["kinds"], "        ")
    say(
        "      dispatch latency = ready -> instruction received by an agent; ready = the "
        "previous step's result POST returned (b, c), or POST .../runs was sent (a)"
    )
    for phase in ("saturated", "paced"):
        d = tp["dispatch"].get(phase)
        if not d:
            continue
        say(f"      {phase}:")
        for group in ("all", "a", "b+c"):
            s = d[group]
            say(
                f"        {group:<4} {s['n']:>6} steps  p50 {ms(s['p50']):>9}  "
                f"p99 {ms(s['p99']):>9}  max {ms(s['max']):>9}"
            )
        e = d["execution"]
        say(
            f"        run start -> c acknowledged: p50 {ms(e['p50'])}, p99 {ms(e['p99'])} "
            f"({e['n']} executions)"
        )
        r = d["start_request"]
        say(f"        POST runs answered in: p50 {ms(r['p50'])}, p99 {ms(r['p99'])}")
    say(
        f"      empty polls {tp['empty_polls']}; steps handed out twice "
        f"{tp['duplicate_steps']}; instructions handed out twice {tp['duplicates']}"
    )
    if error_count:
        say(f"    ERRORS: {dict(error_count)}")
        for sample in tp["error_samples"][:10]:
            say(f"      {sample[:400]}")

    ids = [i for i, *_ in started] + [i for i, *_ in paced]
    say(f"  verifying all {len(ids)} executions through GET /api/v1/executions/{{id}} ...")
    began = time.monotonic()
    tp["verify"] = verify_executions(url, ids, [r[2] for r in records], len(ABC_STEPS), procs=4)
    say(f"    ({time.monotonic() - began:.1f} s)")
    for line in tp["verify"]["lines"]:
        say(f"    {line}")


def dispatch_figures(
    records: list[Record],
    started: list[tuple[str, float, float]],
    paced: list[tuple[str, float, float]],
    t0: float,
    stopped: float,
) -> dict[str, Any]:
    """Rates and dispatch latencies from the agents' records. The saturated window runs
    from the agents' start to the last of the runs started up front ending (or to
    `stopped`, if the time limit came first)."""
    by_step: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        by_step[(record[0], record[1])].append(record)
    instruction_ids = [r[2] for r in records]
    figures: dict[str, Any] = {
        "duplicate_steps": sum(len(v) - 1 for v in by_step.values()),
        "duplicates": len(instruction_ids) - len(set(instruction_ids)),
        "dispatch": {},
    }
    for phase, runs in (("saturated", started), ("paced", paced)):
        if not runs:
            continue
        groups: dict[str, list[float]] = {"a": [], "b+c": []}
        answers = [answered - sent for _, sent, answered in runs]
        execution: list[float] = []
        ends: list[float] = []
        acknowledged: list[float] = []
        for execution_id, started_at, _ in runs:
            ready = max(started_at, t0) if phase == "saturated" else started_at
            previous: Record | None = None
            for step in ABC_STEPS:
                got = by_step.get((execution_id, step))
                if not got:
                    break
                record = got[0]
                if previous is None:
                    groups["a"].append(record[4] - ready)
                else:
                    groups["b+c"].append(record[4] - previous[5])
                acknowledged.append(record[5])
                previous = record
            else:
                if previous is not None:
                    execution.append(previous[5] - ready)
                    ends.append(previous[5])
        figures["dispatch"][phase] = {
            "all": _stats(groups["a"] + groups["b+c"]),
            "a": _stats(groups["a"]),
            "b+c": _stats(groups["b+c"]),
            "execution": _stats(execution),
            "start_request": _stats(answers),
        }
        if phase == "saturated":
            end = max(ends) if len(ends) == len(runs) else stopped
            elapsed = max(1e-9, end - t0)
            steps = sum(1 for t in acknowledged if t <= end)
            completed = sum(1 for t in ends if t <= end)
            figures.update(
                completed=completed,
                steps_done=steps,
                elapsed=elapsed,
                exec_rate=completed / elapsed,
                step_rate=steps / elapsed,
            )
    return figures


# -- correctness -----------------------------------------------------------------------------


def verify_executions(
    url: str,
    execution_ids: list[str],
    acknowledged: list[str],
    steps_each: int,
    procs: int = 1,
) -> dict[str, Any]:
    """Every execution succeeded with its `steps_each` steps each succeeded on attempt 1,
    and the succeeded steps' instructions are exactly those whose results the agents saw
    acknowledged, once each. Runs that the time limit left unfinished are told apart
    from wrong ones."""
    if procs > 1:
        chunks = split(execution_ids, procs)
        checked = [r for c in parallel(check_executions_proc, url, chunks, procs) for r in c]
    else:
        checked = check_executions_proc(url, execution_ids)
    want = [("succeeded", 1)] * steps_each
    live = {("succeeded", 1), ("pending", 0), ("queued", 1), ("running", 1)}
    good, unfinished, bad = [], [], []
    for row in checked:
        steps = [tuple(s[:2]) for s in row.get("steps", [])]
        if row["http"] == 200 and row["status"] == "succeeded" and steps == want:
            good.append(row)
        elif row["http"] == 200 and row["status"] == "running" and set(steps) <= live:
            unfinished.append(row)
        else:
            bad.append(row)
    succeeded = [
        s[2] for r in checked if r["http"] == 200 for s in r["steps"] if s[0] == "succeeded"
    ]
    seen = set(acknowledged)
    ok = (
        not bad
        and not unfinished
        and set(succeeded) == seen
        and len(succeeded) == len(set(succeeded))
        and len(acknowledged) == len(seen)
    )
    lines = [
        f"{len(good)}/{len(execution_ids)} executions succeeded with all {steps_each} steps "
        "succeeded on attempt 1"
        + (f"; {len(unfinished)} not ended (time limit), none wrong" if unfinished else "")
        + (f"; {len(bad)} WRONG" if bad else ""),
        f"succeeded steps' instructions {len(set(succeeded))} distinct; results acknowledged "
        f"to the agents {len(acknowledged)} ({len(seen)} distinct); acknowledged but not a "
        f"succeeded step {len(seen - set(succeeded))}; succeeded without an acknowledged "
        f"result {len(set(succeeded) - seen)}" + ("" if ok else "  NOT OK"),
    ]
    for row in bad[:5]:
        summary = {k: v for k, v in row.items() if k != "steps"}
        summary["steps"] = dict(Counter(tuple(s[:2]) for s in row.get("steps", [])))
        lines.append(f"WRONG: {summary}")
    return {"ok": ok, "succeeded": len(good), "checked": len(execution_ids), "lines": lines}


DB_QUERIES = {
    "executions": "SELECT workflow_name, status, count(*) FROM executions GROUP BY 1, 2",
    "steps": "SELECT e.workflow_name, s.status, s.attempts, count(*) FROM step_runs s "
    "JOIN executions e ON e.id = s.execution_id GROUP BY 1, 2, 3",
    "instructions": "SELECT e.workflow_name, i.status, count(*) FROM instructions i "
    "JOIN executions e ON e.id = i.execution_id GROUP BY 1, 2",
    "multi": "SELECT count(*) FROM (SELECT step_run_id FROM instructions "
    "GROUP BY step_run_id HAVING count(*) > 1) AS x",
    "leases": "SELECT count(*), count(DISTINCT subject_id) FROM audit_records "
    "WHERE action = 'instruction.leased'",
}


def database_check(database_url: str, expected: dict[str, int]) -> dict[str, Any]:
    """Counted in the database once the server has stopped: per workflow, executions by
    status, steps by (status, attempts), instructions by status; no step with two
    instructions, no instruction leased twice."""
    rows = query_database(database_url, DB_QUERIES)
    lines, ok = [], True
    for workflow, steps in expected.items():
        execs = {s: n for w, s, n in rows["executions"] if w == workflow}
        step_rows = {(s, a): n for w, s, a, n in rows["steps"] if w == workflow}
        instrs = {s: n for w, s, n in rows["instructions"] if w == workflow}
        total = sum(execs.values())
        good = (
            execs == {"succeeded": total}
            and step_rows == {("succeeded", 1): total * steps}
            and instrs == {"completed": total * steps}
        )
        ok &= good
        lines.append(
            f"{workflow}: executions {execs}; steps (status, attempts) {step_rows}; "
            f"instructions {instrs}" + ("" if good else "  NOT OK")
        )
    multi = rows["multi"][0][0]
    leased, leased_distinct = rows["leases"][0]
    fine = multi == 0 and leased == leased_distinct
    ok &= fine
    lines.append(
        f"steps with more than one instruction: {multi}; instruction.leased audit records: "
        f"{leased} ({leased_distinct} distinct)" + ("" if fine else "  NOT OK")
    )
    return {"ok": ok, "lines": lines}


# -- one backend -----------------------------------------------------------------------------


def bench_backend(backend: str, options: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"backend": backend}
    tmp = Path(tempfile.mkdtemp(prefix=f"stavily-bench-engine-{backend}-"))
    keep = False
    try:
        with fresh_database(backend, tmp, options.pg_url) as database_url:
            server = Server(backend, database_url, tmp / "data", tmp / "server.log")
            say(f"\n== {backend}: server on {server.url} (load average {load()}) ==")
            server.start()
            try:
                if options.only in (None, "chain"):
                    chain_test(server, options, report, (False, True))
                if options.only in (None, "throughput"):
                    throughput_test(server, options, report)
                    throughput_test(server, options, report, piggyback=True)
            finally:
                server.stop()
                report["server_problems"] = server.problems()
                if report["server_problems"]:
                    keep = True
                    say(f"  SERVER LOG has {len(report['server_problems'])} error lines:")
                    for line in report["server_problems"][:15]:
                        say(f"    {line[:500]}")
                    say(f"  (full log: {server.log_path})")
            say("  the database after the server stopped:")
            expected = {CHAIN_WORKFLOW: options.chain_steps, ABC_WORKFLOW: 3}
            if options.only:
                name = CHAIN_WORKFLOW if options.only == "chain" else ABC_WORKFLOW
                expected = {name: expected[name]}
            report["db"] = database_check(database_url, expected)
            for line in report["db"]["lines"]:
                say(f"    {line}")
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return report


# -- the profile -----------------------------------------------------------------------------


def profile_shape(options: argparse.Namespace) -> dict[str, Any]:
    """The chain (or with --only throughput, the throughput test) once more on the
    backend given (SQLite for both), the server under pyinstrument; the timed window is
    cut out of its profile."""
    shape = options.only or "chain"
    backend = "sqlite" if options.backend == "both" else options.backend
    tmp = Path(tempfile.mkdtemp(prefix="stavily-bench-engine-profile-"))
    options.profile_dir.mkdir(parents=True, exist_ok=True)
    session = options.profile_dir / f"server-{backend}-whole.pyisession"
    report: dict[str, Any] = {"backend": backend}
    try:
        with fresh_database(backend, tmp, options.pg_url) as database_url:
            server = Server(backend, database_url, tmp / "data", tmp / "server.log", session)
            say(f"\n== profile: {backend} server under pyinstrument on {server.url} ==")
            server.start()
            try:
                if shape == "chain":
                    chain_test(server, options, report, (False,))
                else:
                    throughput_test(server, options, report)
            finally:
                server.stop()
            timed = report["chain"]["poll"] if shape == "chain" else report["tp"]
            summary = summarise_profile(
                session, options.profile_dir, backend, shape, timed["window"]
            )
            cut = options.profile_dir / f"server-{backend}-{shape}.pyisession"
            return {
                "backend": backend,
                "shape": shape,
                "timed": timed,
                "profile": summary,
                "places": profile_places(cut),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


IDLE = "(the event loop: waiting for I/O, and C code under it: uvloop, asyncpg's protocol)"
GREENLET = "(SQLAlchemy core in its greenlet: compiling and executing our statements)"
HTTP = "(HTTP outside our routes: uvicorn, starlette, fastapi parsing and validation)"


def profile_places(session_path: Path) -> dict[str, Any]:
    """Where the server's main thread spent the chain window: by request route, and by
    place in our code - the deepest stavily frame of each sample, at the line it was
    executing, so that time in SQLAlchemy, pydantic etc. is charged to the line of ours
    that called them."""
    from pyinstrument.session import Session

    session = Session.load(session_path)
    total = sum(seconds for _, seconds in session.frame_records) or 1.0
    routes: Counter[str] = Counter()
    places: Counter[str] = Counter()
    for stack, seconds in session.frame_records:
        frames = []
        for identifier in stack:
            head, *attributes = identifier.split("\x01")
            function, path, _ = ([*head.split("\x00"), "", ""])[:3]
            klass = next((a[1:] for a in attributes if a.startswith("c")), "")
            line = next((a[1:] for a in attributes if a.startswith("l")), "")
            frames.append((f"{klass}.{function}" if klass else function, path, line))
        if frames and frames[-1][0] == "Runner.run" and frames[-1][1].endswith("runners.py"):
            routes[IDLE] += seconds
            places[IDLE] += seconds
            continue
        ours = [
            f
            for f in frames
            if "/stavily/" in f[1] and "/stavily/cli/" not in f[1] and "middleware" not in f[1]
        ]
        if not ours:
            # SQLAlchemy runs its sync core in a greenlet whose stack does not hold the
            # caller's frames; anything else without our frames is the web framework.
            greenlet = len(frames) > 1 and "/sqlalchemy/" in frames[1][1]
            outside = GREENLET if greenlet else HTTP
            routes[outside] += seconds
            places[outside] += seconds
            continue
        route = next((f for f in ours if "/stavily/api/" in f[1]), None)
        routes[f"{route[0]} ({_short(route[1])})" if route else "(other code of ours)"] += seconds
        name, path, line = ours[-1]
        places[f"{name} ({_short(path)}:{line})"] += seconds
    return {
        "total": total,
        "routes": [(k, v / total) for k, v in routes.most_common(8)],
        "places": [(k, v / total) for k, v in places.most_common(20)],
    }


def print_places(places: dict[str, Any]) -> None:
    say("Main thread by request route (inclusive):")
    for name, share in places["routes"]:
        say(f"  {share:6.1%}  {name}")
    say(
        "Top places in our code (deepest stavily frame, at the line it was running; what "
        "it called in SQLAlchemy, pydantic etc. is charged to it):"
    )
    for name, share in places["places"]:
        say(f"  {share:6.1%}  {name}")


# -- 3. the peer: Celery on Redis ------------------------------------------------------------


def _pids_of(name: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if f"({name})" in stat.read_text():
                found.append(int(stat.parent.name))
    return found


def _tree(pid: int) -> list[int]:
    """A process and its children (the prefork pool)."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
    return pids


class PeerCpu:
    """CPU of the Celery worker (with its pool), Redis and this process, in % of a core."""

    def __init__(self, worker_pid: int) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.worker = _tree(worker_pid)
        self.redis = _pids_of("redis-server")
        self.began = time.monotonic()
        self.start = self._sample()

    def _sample(self) -> tuple[int, int, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (
            sum(_proc_jiffies(p) for p in self.worker),
            sum(_proc_jiffies(p) for p in self.redis),
            usage.ru_utime + usage.ru_stime,
        )

    def stop(self, seconds: float | None = None) -> dict[str, float]:
        seconds = seconds or (time.monotonic() - self.began)
        end = self._sample()
        return {
            "worker": (end[0] - self.start[0]) / self.hz / seconds * 100,
            "redis": (end[1] - self.start[1]) / self.hz / seconds * 100,
            "driver": (end[2] - self.start[2]) / seconds * 100,
        }


def _peer_cpu_line(cpu: dict[str, float]) -> str:
    return (
        f"CPU % of a core: worker (3 processes) {cpu['worker']:.0f}, redis {cpu['redis']:.0f}, "
        f"driver {cpu['driver']:.0f}"
    )


def celery_peer(options: argparse.Namespace) -> dict[str, Any]:
    try:
        import celery
        import redis
    except ImportError:
        say(
            "\ncelery is not installed: `pip install -r bench/requirements.txt` to measure "
            "the peer. Skipping the Celery column."
        )
        return {"skipped": "not installed: pip install -r bench/requirements.txt"}
    say(f"\n== Celery {celery.__version__} on Redis at {options.redis_url} ==")
    probe = redis.Redis.from_url(options.redis_url)
    try:
        probe.ping()
        databases = int(probe.config_get("databases").get("databases", 16))
    except redis.RedisError as exc:
        say(f"  Redis does not answer ({exc}): skipping the Celery column")
        return {"skipped": f"no Redis at {options.redis_url}"}
    finally:
        probe.close()
    empty = []
    for number in range(databases - 1, 0, -1):
        with redis.Redis.from_url(options.redis_url, db=number) as db:
            if db.dbsize() == 0:
                empty.append(number)
        if len(empty) == 2:
            break
    if len(empty) < 2:
        return {"skipped": "no two empty Redis databases"}
    broker_db, backend_db = empty[1], empty[0]
    base = options.redis_url.rstrip("/")
    os.environ["STAVILY_BENCH_CELERY_BROKER"] = f"{base}/{broker_db}"
    os.environ["STAVILY_BENCH_CELERY_BACKEND"] = f"{base}/{backend_db}"
    from celery import chain

    from bench.celery_app import app, noop

    broker = redis.Redis.from_url(options.redis_url, db=broker_db)
    backend = redis.Redis.from_url(options.redis_url, db=backend_db)
    tmp = Path(tempfile.mkdtemp(prefix="stavily-bench-celery-"))
    log_path = tmp / "worker.log"
    name = f"bench-{uuid.uuid4().hex[:8]}@localhost"
    chain_queue, tp_queue = "bench_chain", "bench_tp"
    command = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker"]
    command += ["--concurrency=2", "--pool=prefork", "-Q", chain_queue, "-n", name]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    command += ["--loglevel=WARNING"]
    log = log_path.open("wb")
    worker = subprocess.Popen(
        command,
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    report: dict[str, Any] = {"version": celery.__version__}
    try:
        say(f"  worker: {' '.join(command[2:])}")
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[name], timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Celery worker did not start:\n{log_path.read_text()}")
        noop.apply_async(queue=chain_queue).get(timeout=30)  # warm the pool

        steps = options.chain_steps
        say(f"  chain: {steps} no-op tasks (celery.chain of noop.si()) ...")
        signature = chain(noop.si().set(queue=chain_queue) for _ in range(steps))
        cpu = PeerCpu(worker.pid)
        began = time.perf_counter()
        last = signature.apply_async()
        last.get(timeout=300)
        elapsed = time.perf_counter() - began
        chain_cpu = cpu.stop(elapsed)
        ids = []
        node = last
        while node is not None:
            ids.append(node.id)
            node = node.parent
        states = _celery_states(backend, ids)
        report["chain"] = {
            "elapsed": elapsed,
            "per_task": elapsed / steps,
            "cpu": chain_cpu,
            "ok": len(ids) == steps and states == {"SUCCESS": steps},
            "states": states,
        }
        say(f"    {elapsed:.2f} s: {ms(elapsed / steps)}/task; results {states}")
        say(f"    {_peer_cpu_line(chain_cpu)}")

        count = options.executions
        say(f"  throughput: {count} no-op tasks queued up front, then consumed ...")
        began = time.perf_counter()
        with app.producer_or_acquire() as producer:
            results = [noop.apply_async(queue=tp_queue, producer=producer) for _ in range(count)]
        publish = time.perf_counter() - began
        baseline = backend.dbsize()
        say(f"    published in {publish:.1f} s ({count / publish:.0f}/s); consuming ...")
        cpu = PeerCpu(worker.pid)
        began = time.perf_counter()
        app.control.add_consumer(tp_queue, destination=[name], reply=True)
        deadline = time.monotonic() + options.time_limit
        stored = 0
        while time.monotonic() < deadline:
            stored = backend.dbsize() - baseline  # one result key per task
            if stored >= count:
                break
            time.sleep(0.005)
        elapsed = time.perf_counter() - began
        tp_cpu = cpu.stop(elapsed)
        states = _celery_states(backend, [r.id for r in results])
        report["tp"] = {
            "tasks": count,
            "elapsed": elapsed,
            "rate": stored / elapsed,
            "publish_rate": count / publish,
            "cpu": tp_cpu,
            "ok": states == {"SUCCESS": count},
            "states": states,
        }
        say(
            f"    {stored}/{count} results stored in {elapsed:.2f} s: {stored / elapsed:.0f} "
            f"tasks/s; results {states}"
        )
        say(f"    {_peer_cpu_line(tp_cpu)}")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        with contextlib.suppress(Exception):
            app.close()
        for db in (broker, backend):
            with contextlib.suppress(redis.RedisError):
                db.flushdb()  # both were empty before
                db.close()
        report["problems"] = [
            line
            for line in log_path.read_text(errors="replace").splitlines()
            if any(mark in line for mark in ("ERROR/", "CRITICAL/", "Traceback"))
        ]
        for line in report["problems"][:10]:
            say(f"  worker log: {line[:300]}")
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _celery_states(backend: Any, ids: list[str], patience: float = 5.0) -> dict[str, int]:
    """Each task's stored state. A chain's worker sends the next task before it stores
    the current one's result (celery.app.trace), so the last result can be there while
    the one before is still being written: missing results get a few seconds more."""
    deadline = time.monotonic() + patience
    while True:
        states: Counter[str] = Counter()
        for chunk in split(ids, max(1, len(ids) // 1000)):
            for raw in backend.mget([f"celery-task-meta-{i}" for i in chunk]):
                states[json.loads(raw)["status"] if raw else "MISSING"] += 1
        if not states.get("MISSING") or time.monotonic() > deadline:
            return dict(states)
        time.sleep(0.1)


# -- the table -------------------------------------------------------------------------------


def _pair(a: float, b: float) -> str:
    return f"{ms(a)} / {ms(b)}"


def _speed(factor: float) -> str:
    return f"{factor:.2f}x" if factor == factor else "n/a"  # NaN: no peer figure


def _cpu_cell(cpu: dict[str, float]) -> str:
    return " / ".join(f"{cpu[k]:.0f}" for k in ("server", "postgres", "clients", "other"))


def _peer_cpu(cpu: dict[str, float]) -> str:
    return f"{cpu['worker']:.0f} worker, {cpu['redis']:.0f} redis"


def _requests(kinds: dict[str, dict[str, float]], key: str) -> str:
    return " / ".join(f"{kinds[k][key] * 1000:.1f}" for k in ("poll", "progress", "result")) + " ms"


CPU_HEADER = "server / postgres / load gen. / other"

Row = tuple[str, str, str, str]  # figure, ours on one backend, Celery's, target or reference


def chain_rows(report: dict[str, Any], peer: dict[str, Any]) -> list[Row]:
    chain = report.get("chain", {})
    poll, piggy = chain.get("poll"), chain.get("piggyback")
    if not poll:
        return []
    theirs = peer.get("chain") or {}
    per_task = theirs.get("per_task", float("nan"))
    verified = all(c["verify"]["ok"] and not c["errors"] for c in chain.values())
    return [
        (
            f"CHAIN, {poll['steps']} no-op steps, 1 agent: ms/step",
            ms(poll["per_step"]),
            f"{ms(per_task)}/task" if theirs else "-",
            f"target <= {TARGET_MS_PER_STEP:g} ms; Windmill ~ {WINDMILL_MS_PER_STEP:g} ms",
        ),
        ("  (poll ?wait=, PUT executing, POST result)", "", "", ""),
        (
            "  ms/step, POST result?next=1 piggyback",
            ms(piggy["per_step"]) if piggy else "-",
            "",
            f"Celery ~ {CELERY_REF_MS_PER_TASK:g} ms/task (published)",
        ),
        (
            "  whole chain: poll / piggyback",
            f"{poll['elapsed']:.2f} s / " + (f"{piggy['elapsed']:.2f} s" if piggy else "-"),
            f"{theirs['elapsed']:.2f} s" if theirs else "-",
            "",
        ),
        ("  of which waiting on the server, per step", ms(poll["request_time_per_step"]), "", ""),
        (
            "  agent's floor: GET /healthz p50, 1 at a time",
            ms(report["chain_client"]["p50"]),
            "",
            "HTTP alone, no database: a step is 2-3 requests",
        ),
        (
            f"  chain CPU %: {CPU_HEADER}",
            _cpu_cell(poll["cpu"]),
            _peer_cpu(theirs["cpu"]) if theirs else "-",
            "",
        ),
        (
            "  ours vs Celery: Celery ms/task / ours",
            _speed(per_task / poll["per_step"])
            + (f"; piggyback {_speed(per_task / piggy['per_step'])}" if piggy else ""),
            "",
            "above 1x: ours faster",
        ),
        (
            "  chain verified (each step once, attempt 1)",
            "ok" if verified else "NOT OK",
            ("ok" if theirs["ok"] else "NOT OK") if theirs else "-",
            "",
        ),
    ]


def throughput_rows(report: dict[str, Any], peer: dict[str, Any]) -> list[Row]:
    tp = report.get("tp")
    if not tp:
        return []
    theirs = peer.get("tp") or {}
    rate = theirs.get("rate", float("nan"))
    sat, paced = tp["dispatch"].get("saturated"), tp["dispatch"].get("paced")
    rows: list[Row] = [
        (
            f"THROUGHPUT, {tp['runs']} runs a->b->c, {report['agents']} agents",
            "" if tp["finished"] else "TIME LIMIT HIT",
            f"{theirs['tasks']} tasks, 2 workers" if theirs else "",
            "",
        ),
        (
            "  runs started/s (set-up, before timing)",
            f"{report['runs_started_rate']:.0f}",
            f"{theirs['publish_rate']:.0f} published/s" if theirs else "-",
            "",
        ),
        ("  executions/s", f"{tp['exec_rate']:.1f}", "", ""),
        (
            "  steps/s end to end (Celery: tasks/s)",
            f"{tp['step_rate']:.0f}",
            f"{rate:.0f}" if theirs else "-",
            f"target >= {TARGET_STEPS_PER_S:g}; Celery ~ {CELERY_REF_TASKS_PER_S:g}",
        ),
        (
            "  ours vs Celery: steps/s / tasks/s",
            _speed(tp["step_rate"] / rate),
            "",
            "above 1x: ours faster",
        ),
        (
            "  elapsed: agents start -> last run ended",
            f"{tp['elapsed']:.1f} s",
            f"{theirs['elapsed']:.1f} s" if theirs else "-",
            "",
        ),
    ]
    if sat:
        rows += [
            (
                "  dispatch p50 / p99, all queued up front",
                _pair(sat["all"]["p50"], sat["all"]["p99"]),
                "",
                "= the wait in the queue",
            ),
            ("    a: from run start", _pair(sat["a"]["p50"], sat["a"]["p99"]), "", ""),
            (
                "    b, c: from the previous result POST",
                _pair(sat["b+c"]["p50"], sat["b+c"]["p99"]),
                "",
                "",
            ),
        ]
    if paced:
        rows += [
            (
                "  dispatch p50 / p99 at 50% load",
                _pair(paced["all"]["p50"], paced["all"]["p99"]),
                "",
                f"target p99 < {TARGET_P99_DISPATCH * 1000:g} ms",
            ),
            ("    50% load: runs started per second", f"{tp['paced_rate']:.0f}", "", ""),
            ("    a: from POST runs sent", _pair(paced["a"]["p50"], paced["a"]["p99"]), "", ""),
            (
                "      of which POST runs answered",
                _pair(paced["start_request"]["p50"], paced["start_request"]["p99"]),
                "",
                "",
            ),
            (
                "    b, c: from the previous result POST ",
                _pair(paced["b+c"]["p50"], paced["b+c"]["p99"]),
                "",
                "",
            ),
            (
                "    run start -> c acknowledged",
                _pair(paced["execution"]["p50"], paced["execution"]["p99"]),
                "",
                "",
            ),
        ]
    memory = tp["memory"]
    rows += [
        ("  requests p50 (backlog): poll / PUT / result", _requests(tp["kinds"], "p50"), "", ""),
        ("  requests p99 (backlog): poll / PUT / result", _requests(tp["kinds"], "p99"), "", ""),
        (
            "  server RSS: at start / peak",
            f"{memory['start_mb']:.0f} / {memory['peak_mb']:.0f} MB",
            "",
            "",
        ),
        (
            f"  throughput CPU %: {CPU_HEADER}",
            _cpu_cell(tp["cpu"]),
            _peer_cpu(theirs["cpu"]) if theirs else "-",
            "",
        ),
        ("  empty polls", str(tp["empty_polls"]), "", ""),
        (
            "  steps / instructions handed out twice",
            f"{tp['duplicate_steps']} / {tp['duplicates']}",
            "",
            "",
        ),
        ("  client-side errors", str(sum(tp["errors"].values())), "", ""),
        (
            "  runs verified (each step once, attempt 1)",
            f"{tp['verify']['succeeded']}/{tp['verify']['checked']}"
            + ("" if tp["verify"]["ok"] else " NOT OK"),
            f"{theirs['states'].get('SUCCESS', 0)}/{theirs['tasks']} SUCCESS" if theirs else "-",
            "",
        ),
    ]
    piggy = report.get("tp_next")
    if piggy:
        paced_next = piggy["dispatch"].get("paced")
        rows += [
            ("  our agent's protocol: PUT, POST result?next=1 (again)", "", "", ""),
            (
                "    steps/s end to end",
                f"{piggy['step_rate']:.0f}",
                "",
                f"target >= {TARGET_STEPS_PER_S:g}",
            ),
            ("    ours vs Celery", _speed(piggy["step_rate"] / rate), "", ""),
        ]
        if paced_next:
            rows.append(
                (
                    "    dispatch p50 / p99 at 50% load",
                    _pair(paced_next["all"]["p50"], paced_next["all"]["p99"]),
                    "",
                    f"target p99 < {TARGET_P99_DISPATCH * 1000:g} ms",
                )
            )
        rows += [
            ("    throughput CPU %", _cpu_cell(piggy["cpu"]), "", ""),
            (
                "    runs verified; handed out twice; errors",
                f"{piggy['verify']['succeeded']}/{piggy['verify']['checked']}"
                + ("" if piggy["verify"]["ok"] else " NOT OK")
                + f"; {piggy['duplicates']}; {sum(piggy['errors'].values())}",
                "",
                "",
            ),
        ]
    return rows


def table_rows(report: dict[str, Any], peer: dict[str, Any]) -> list[Row]:
    rows = chain_rows(report, peer) + throughput_rows(report, peer)
    ceiling = report.get("ceiling")
    if ceiling:
        rows.append(
            (
                f"LOAD GENERATOR ceiling: GET /healthz/s, {ceiling['procs']} procs, rawhttp",
                f"{ceiling['rate']:.0f}",
                "",
                "",
            )
        )
        if report.get("tp"):
            used = report["tp"]["request_rate"]
            rows.append(
                (
                    "  agent requests/s in the throughput test",
                    f"{used:.0f} ({used / ceiling['rate']:.0%})",
                    "",
                    "(share of the ceiling)",
                )
            )
    if "db" in report:
        rows.append(("database check after stop", "ok" if report["db"]["ok"] else "NOT OK", "", ""))
    rows.append(("server log error lines", str(len(report.get("server_problems", []))), "", ""))
    return rows


def print_table(
    reports: list[dict[str, Any]], peer: dict[str, Any], options: argparse.Namespace
) -> None:
    keys: list[str] = []
    peer_cells: dict[str, str] = {}
    references: dict[str, str] = {}
    values: list[dict[str, str]] = []
    for report in reports:
        rows = table_rows(report, peer)
        values.append({key: ours for key, ours, _, _ in rows})
        for key, _, theirs, reference in rows:
            if key not in keys:
                keys.append(key)
            peer_cells.setdefault(key, theirs)
            references.setdefault(key, reference)
    celery = "Celery+Redis"
    if peer.get("skipped"):
        celery = f"Celery: {peer['skipped']}"
    headers = ["figure", *(r["backend"] for r in reports), celery, "target / reference"]
    table = [
        [key, *(v.get(key, "-") for v in values), peer_cells[key], references[key]] for key in keys
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    say("")
    say(
        f"Stavily workflow engine benchmark ({options.version}) - nproc {os.cpu_count()}, "
        f"python {sys.version.split()[0]}, machine already busy before: {options.busy:.0f}% "
        "of a core" + (" (quick)" if options.quick else "")
    )
    say(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    say("-+-".join("-" * w for w in widths))
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1], strict=True)]
        cells.append(row[-1].ljust(widths[-1]))
        say(" | ".join(cells).rstrip())
    say(
        f"\nCPU in % of one core (the machine has {(os.cpu_count() or 1) * 100}%). Ratios: "
        "above 1x means ours is faster. Chain: Celery's time per task / ours per step. "
        "Throughput: our steps/s (each a step of a 3-step workflow, driven over the public "
        "HTTP API) / Celery's no-op tasks/s (2 worker processes, results stored in Redis); "
        "Celery was measured once, for both columns."
    )
    say(
        "Dispatch latency: ready -> the instruction received by an agent, on one system-wide "
        "monotonic clock. For b and c, ready = the previous step's result POST returned (that "
        "request's transaction queued the step); for a, ready = POST .../runs sent (for runs "
        "queued up front: the later of that and the agents' start). With every run queued up "
        "front it is the wait in the FIFO queue; the 50%-load phase starts runs at half the "
        "server's measured capacity for whole runs (start + steps) and shows it below saturation."
    )


# -- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="1,000 executions instead of 10,000")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run the chain (--only throughput: that) under pyinstrument",
    )
    parser.add_argument("--executions", type=int, help="throughput runs (10000; quick 1000)")
    parser.add_argument("--chain-steps", type=int, default=400)
    parser.add_argument("--agents", type=int, default=50, help="throughput agents")
    parser.add_argument("--client-procs", type=int, default=4, help="agent client processes")
    parser.add_argument("--paced-seconds", type=float, help="the 50%% load phase (4 s; quick 2)")
    parser.add_argument("--time-limit", type=float, default=900, help="throughput give-up (s)")
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery column")
    parser.add_argument(
        "--only", choices=("chain", "throughput"), help="run one of the two shapes, not both"
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "stavily-bench-engine-profile",
    )
    options = parser.parse_args()
    options.executions = options.executions or (1000 if options.quick else 10_000)
    options.paced_seconds = options.paced_seconds or (2.0 if options.quick else 4.0)
    options.ceiling_duration = 2.0 if options.quick else 3.0
    options.pg_url = os.environ.get("STAVILY_BENCH_DATABASE_URL", DEFAULT_PG_URL)
    options.redis_url = os.environ.get("STAVILY_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
    return options


def use_this_tree() -> str:
    """Make the server subprocesses and the Celery worker import this work tree's code;
    returns where `stavily` is imported from."""
    wanted = [str(ROOT / "src"), str(ROOT)]
    present = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([*wanted, *(p for p in present if p not in wanted)])
    found = subprocess.run(
        [sys.executable, "-c", "import stavily; print(stavily.__file__)"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    return found.stdout.strip() or found.stderr.strip()


def healthy(reports: list[dict[str, Any]], peer: dict[str, Any]) -> bool:
    ok = True
    for r in reports:
        ok &= all(c["verify"]["ok"] and not c["errors"] for c in r.get("chain", {}).values())
        for key in ("tp", "tp_next"):
            tp = r.get(key)
            if tp is not None or "chain" not in r:  # --only chain runs no throughput test
                tp = tp or {}
                ok &= bool(tp.get("verify", {}).get("ok") and tp.get("finished"))
                ok &= not tp.get("errors") and not tp.get("duplicates")
                ok &= not tp.get("duplicate_steps")
        ok &= bool(r.get("db", {}).get("ok")) and not r.get("server_problems")
    if peer.get("failed"):
        ok = False
    elif not peer.get("skipped"):
        ok &= bool(peer["chain"]["ok"] and peer["tp"]["ok"])
    return ok


def main() -> int:
    options = parse_args()
    imported = use_this_tree()
    options.version = source_version()
    busy = options.busy = background_cpu()
    say(
        f"machine: nproc {os.cpu_count()}; python {sys.version.split()[0]}; stavily "
        f"{options.version} from {imported}; CPU already busy before the benchmark: "
        f"{busy:.0f}% of one core (load average {load()})"
    )
    if busy > 25:
        say("  note: other work is running on this machine; the figures will be lower and noisier")
    backends = ["sqlite", "postgresql"] if options.backend == "both" else [options.backend]
    began = time.monotonic()
    peer: dict[str, Any] = {"skipped": "--no-celery"}
    if not options.no_celery:
        try:
            peer = celery_peer(options)
        except Exception as exc:  # the peer failing must not hide our figures
            say(f"  the Celery measurement failed: {exc!r}")
            peer = {"skipped": "failed (see above)", "failed": True}
    reports = [bench_backend(backend, options) for backend in backends]
    if options.profile:
        profiled = profile_shape(options)
        timed = profiled["timed"]
        rate = (
            f"{ms(timed['per_step'])}/step"
            if profiled["shape"] == "chain"
            else f"{timed['step_rate']:.0f} steps/s"
        )
        say(
            f"\nUnder pyinstrument the {profiled['shape']} test took {timed['elapsed']:.2f} s "
            f"({rate}; slowed by the profiler)"
        )
        print_profile(profiled["backend"], profiled["profile"])
        print_places(profiled["places"])
    print_table(reports, peer, options)
    say(f"\ntotal wall time {time.monotonic() - began:.0f} s")
    if not healthy(reports, peer):
        say("SOME CHECKS FAILED (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
