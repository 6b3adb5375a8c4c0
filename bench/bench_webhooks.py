"""Webhook benchmark: signed events accepted per second, and event-to-first-instruction latency.

    python bench/bench_webhooks.py [--backend sqlite|postgresql|both] [--quick]
    python bench/bench_webhooks.py --backend sqlite --py-spy   # where the server's time goes

Each backend gets a fresh database and a real `stavily serve` subprocess, driven over
loopback HTTP. Two workflows are applied (one `noop` step each) and a webhook made for
each through POST /api/v1/webhooks; every request is signed as a sender would:
`X-Stavily-Signature: t=<unix seconds>,v1=<HMAC-SHA256 of "<t>.<body>">`, with a unique
JSON object body of about 300 bytes (a deploy notification: ids, repository, commit...).

1. Event-to-first-instruction latency, measured first, on the fresh server with nothing
   else queued (so phase 3's backlog cannot interfere): one agent created through
   POST /api/v1/agents, the only one the latency workflow's step selects. One signed
   webhook at a time, 200 (--quick: 50), each measured from just before the webhook is
   sent to the moment the agent's poll returns the instruction of the run that event
   started; the agent then completes it as the official agents do (PUT `executing` with
   its log, POST the result) before the next event is sent, so no queue builds up. Twice:
   - "official": the official agents' protocol exactly (their User-Agent, no query
     string). An official agent does not long-poll: its poll is answered at once and it
     polls again after `poll_interval` (10 s by default). Here it polls back to back
     (poll_interval 0), so the figure is the server's, not the interval's; in the field
     add up to one poll_interval.
   - "long poll": the same agent with our extension `?wait=30` (the reference agent's
     way): its poll is held and woken when the step is queued.
   Each instruction is checked to belong to its event (input_data.n is the event's n, and
   the event's `started` in GET /api/v1/events/{id} is the instruction's execution).
   Client: bench/rawhttp.py (a tenth of httpx's cost), sender and agent in one process.
2. wrk's own ceiling: GET /healthz (no database work) on the same server, same threads
   and connections.
3. Accepted events/s: wrk (-t2 -c32 by default; the server is one process on a 2-core
   machine shared with wrk) posts signed webhooks to the load workflow's hook for
   --duration s (10; --quick 5). wrk's LuaJIT has no HMAC, so --max-rate x --duration
   requests (default 8,000/s, above anything reached here) are signed just before the
   run and written to a file that wrk_webhooks.lua reads in init(); each wrk thread sends
   its share once, in order. Should a thread run out it starts over: those repeats are
   counted and shown, and the server answers them 200 `duplicate`, which are counted apart
   from the 202s. Reported: 202s a second, latency p50/p99 (service time of a sent
   request), answers by status, socket errors, CPU split. The load workflow's step selects
   no agent, so each run's step just stays queued.
   Then, straight from the database (a read-only connection): every 202 stored (events
   of the hook at least the 202s counted, at most those plus the requests still in flight
   when wrk stopped, which the server stored but wrk never counted), and the backlog: how
   long after wrk stopped until no event of the hook is still `accepted`, i.e. each has
   started its run (the server processes accepted events in one task, after answering);
   then each started event must have its execution (when one started nothing, the
   outcomes and reasons the server recorded are printed). A request wrk cut off as it
   stopped, its body not all sent, is stored refused; at most those in flight may be.
4. A peer, in the same run: the same signed requests against a minimal ASGI app on
   uvicorn with `stavily serve`'s settings (uvloop, stavily.api.http.HttpProtocol over
   httptools, log level warning), one process on its own port. It checks each request as
   the server does (stavily.workflows.webhooks.verify: the timestamp window and the HMAC;
   parse_body: a JSON object) and answers 202 with a new event id, and stores nothing: the
   ceiling of the HTTP stack with the signature check. It runs once, before the
   backends, with three times the requests (it is far faster; it keeps no record, so a
   repeat would cost it what a new request does). The gap to (3) is what the server's
   other work costs (its middleware, the per-request log line, storing the event durably,
   processing it into a run).

Targets (issue 19), on SQLite: at least 2,000 accepted events/s with the 202s' p99 under
50 ms, in (3). The event-to-first-instruction latency is measured and printed without a
target (the official agents' own poll interval dominates it in the field), and
PostgreSQL's figures have no target.

PostgreSQL: STAVILY_BENCH_DATABASE_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test) names the server; a fresh database is
created for each backend run and dropped afterwards. wrk: Debian package `wrk`. Nothing
here is collected by pytest. Exit status 1 when a check failed or a target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_agent_api as base  # noqa: E402
from bench.bench_agent_api import (  # noqa: E402
    CpuMeter,
    Server,
    admin_client,
    cpu_line,
    free_port,
    fresh_database,
    load,
    percentile,
    pg_admin_dsn,
    result_report,
    rfc3339_now,
    say,
)
from bench.bench_fleet import report_problems, wrk_ceiling  # noqa: E402
from bench.rawhttp import RawClient, Response  # noqa: E402
from stavily.workflows.webhooks import sign  # noqa: E402

HERE = Path(__file__).resolve().parent
WEBHOOKS_LUA = HERE / "wrk_webhooks.lua"
DEFAULT_PG_URL = base.DEFAULT_PG_URL
LOAD_WORKFLOW = "bench-hook-load"
LATENCY_WORKFLOW = "bench-hook-latency"
AGENT_NAME = "bench-hook-agent"
SQLITE_RATE_TARGET = 2000.0
P99_TARGET_MS = 50.0
OFFICIAL_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "Stavily-Agent/1.0.0",
}
SENDER_HEADERS = {"Content-Type": "application/json", "User-Agent": "Stavily-Bench-Webhooks/1.0"}


def workflow_source(name: str, agent_regex: str) -> str:
    # `n` of the event reaches the instruction (input_data), so each instruction can be
    # matched to the event that started its run.
    return f"""
name: {name}
version: "1.0.0"
actions:
  steps:
    - name: first
      plugin: noop
      timeout: 30s
      config:
        n: "{{{{ trigger.payload.n }}}}"
      agents:
        pools:
          - pool_name: {name}
            agent_regex: "{agent_regex}"
"""


def event_body(run: str, n: int) -> bytes:
    """A deploy notification of about 300 bytes; unique by (run, n)."""
    commit = hashlib.sha1(f"{run}:{n}".encode()).hexdigest()
    return orjson.dumps(
        {
            "n": n,
            "run": run,
            "delivery": f"dlv-{run}-{n:08d}",
            "event": "deployment.finished",
            "repository": {"full_name": "acme/payments-api", "default_branch": "main"},
            "ref": "refs/heads/main",
            "commit": commit,
            "environment": "production",
            "status": "success",
            "duration_ms": 48213 + n % 1000,
            "sender": {"login": "release-bot", "type": "Bot"},
            "finished_at": "2026-12-03T20:00:00Z",
        }
    )


def write_requests(path: Path, secret: str, run: str, count: int) -> dict[str, Any]:
    """`count` signed requests, one "<signature>\\t<body>" a line, signed now."""
    began = time.monotonic()
    stamp = int(time.time())
    size = 0
    with path.open("wb") as out:
        for n in range(count):
            body = event_body(run, n)
            size += len(body)
            out.write(sign(secret, body, stamp).encode() + b"\t" + body + b"\n")
    return {
        "count": count,
        "body_bytes": size / max(count, 1),
        "signed_at": stamp,
        "seconds": time.monotonic() - began,
    }


def run_hooks_wrk(
    url: str, requests: Path, path: str, duration: float, threads: int, connections: int
) -> dict[str, Any]:
    """bench_agent_api's wrk runner, with this benchmark's script."""
    with mock.patch.object(base, "LUA_SCRIPT", WEBHOOKS_LUA):
        figures = base.run_wrk(
            url, "hooks", duration, threads, connections, str(requests), path, str(threads)
        )
    seconds = figures["duration_us"] / 1e6
    figures["accepted_rate"] = figures["status202"] / seconds if seconds else 0.0
    figures["in_flight"] = max(0, figures["sent"] - figures["responses"])
    return figures


# -- the server's database, read-only --------------------------------------------------------


def event_outcomes(database_url: str, workflow: str) -> dict[str, int]:
    """The hook's events by outcome, read straight from the database (read-only)."""
    sql = (
        "SELECT outcome, count(*) FROM events WHERE source = 'webhook' "
        f"AND workflow_name = '{workflow}' GROUP BY outcome"
    )
    return {k: int(v) for k, v in db_rows(database_url, sql)}


def db_rows(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows read straight from the database (read-only)."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[1]
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
    return asyncio.run(_pg_rows(database_url, sql))


def db_value(database_url: str, sql: str) -> Any:
    return db_rows(database_url, sql)[0][0]


async def _pg_rows(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(
        pg_admin_dsn(database_url), server_settings={"default_transaction_read_only": "on"}
    )
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


# -- the peer: the HTTP stack and the signature check, nothing stored ------------------------


def serve_peer(port: int, secret: str) -> None:  # pragma: no cover - runs in a subprocess
    import uvicorn

    from stavily.api.errors import error_body
    from stavily.api.http import HttpProtocol
    from stavily.api.json import send_json
    from stavily.config import Settings
    from stavily.errors import StavilyError
    from stavily.ids import new_id
    from stavily.workflows.webhooks import Hook, parse_body, verify

    settings = Settings()
    hook = Hook(
        id="hook_peer",
        organization_id="org_peer",
        workflow="peer",
        secrets=(secret.encode(),),
        idempotency_field=None,
        inputs={},
        tolerance=settings.webhook_tolerance_seconds,
    )
    depth = settings.max_json_depth

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/healthz":
            await send_json(send, {"status": "ok"})
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            verify(hook, dict(scope["headers"]), body, time.time())
            parse_body(body, depth)
        except StavilyError as exc:
            await send_json(send, error_body(exc.code, exc.message, exc.details), exc.status)
            return
        await send_json(send, {"event_id": new_id("evt"), "status": "accepted"}, 202)

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=HttpProtocol,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )


class Peer:
    """This file run with --peer-port in a subprocess: the peer app above."""

    def __init__(self, secret: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STAVILY_BENCH_PEER_SECRET": secret}
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--peer-port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.log_path = log_path
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the peer exited early:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the peer did not start:\n{log_path.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def peer_test(options: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    secret = "whsec_bench_peer_" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    peer = Peer(secret, tmp / "peer.log")
    try:
        requests = tmp / "peer-requests.txt"
        # The peer keeps no record of what it saw, so a repeat costs it what a new request
        # does; still, give it enough that it seldom repeats (it runs far faster).
        made = write_requests(requests, secret, "peer", options.request_count * 3)
        say(
            f"  peer on {peer.url}: {made['count']} signed requests "
            f"({made['body_bytes']:.0f}-byte bodies), wrk {options.duration:g} s, "
            f"-t{options.wrk_threads} -c{options.wrk_connections} ..."
        )
        cpu = CpuMeter(peer)  # type: ignore[arg-type]
        figures = run_hooks_wrk(
            peer.url,
            requests,
            "/hooks/hook_peer",
            options.duration,
            options.wrk_threads,
            options.wrk_connections,
        )
        figures["cpu"] = cpu.stop()
        say(f"    {describe_run(figures)}")
        say(f"    {cpu_line(figures['cpu'])}")
        return figures
    finally:
        peer.stop()


# -- 1. event-to-first-instruction latency ---------------------------------------------------


class SigningClient(RawClient):
    """bench/rawhttp.py's client, each POST signed with the webhook's secret."""

    def __init__(self, base_url: str, secret: str) -> None:
        super().__init__(base_url, SENDER_HEADERS)
        self._plain = self._headers
        self.secret = secret

    async def send_event(self, path: str, body: bytes) -> Response:
        signature = sign(self.secret, body, int(time.time()))
        self._headers = f"{self._plain}X-Stavily-Signature: {signature}\r\n"
        return await self.post(path, json=orjson.Fragment(body))


async def _latency(
    url: str,
    agent: tuple[str, str],
    hook: dict[str, Any],
    mode: str,
    count: int,
    run: str,
) -> dict[str, Any]:
    agent_id, key = agent
    client = RawClient(url, {**OFFICIAL_HEADERS, "Authorization": f"Bearer {key}"})
    sender = SigningClient(url, hook["secret"])
    await client.get("/healthz")  # open both connections before timing
    await sender.get("/healthz")
    polls = f"/agents/v1/{agent_id}/instructions"
    params = {"wait": 30} if mode == "long poll" else None
    handed: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
    finished: asyncio.Queue[bool] = asyncio.Queue()
    counts = {"polls": 0, "empty": 0}

    async def agent_loop() -> None:
        while True:
            answer = await client.get(polls, params)
            seen = time.perf_counter()
            counts["polls"] += 1
            if answer.status_code != 200:
                raise RuntimeError(f"poll: {answer.status_code} {answer.text}")
            instruction = answer.json().get("instruction")
            if instruction is None:
                counts["empty"] += 1
                continue
            handed.put_nowait((seen, instruction))
            # as the official agents do: one `executing` with the log so far, one result
            path = f"{polls}/{instruction['id']}"
            log = [f"[{rfc3339_now()}] Instruction received"]
            progress = await client.put(
                path,
                json={
                    "status": "executing",
                    "execution_log": [*log, f"[{rfc3339_now()}] Started plugin execution"],
                },
            )
            report = await client.post(f"{path}/result", json=result_report(instruction, log))
            finished.put_nowait(progress.status_code == 200 and report.status_code == 200)

    task = asyncio.create_task(agent_loop())
    latencies: list[float] = []
    acks: list[float] = []
    pairs: list[tuple[str, str]] = []  # (event id, the instruction's execution id)
    problems: list[str] = []
    try:
        await asyncio.sleep(0.2)  # the first (long) poll is held by now
        for n in range(count):
            began = time.perf_counter()
            answer = await sender.send_event(f"/hooks/{hook['id']}", event_body(run, n))
            acked = time.perf_counter()
            if answer.status_code != 202:
                problems.append(f"webhook {n}: {answer.status_code} {answer.text}")
                continue
            try:
                seen, instruction = await asyncio.wait_for(handed.get(), 10)
            except TimeoutError:
                problems.append(f"event {n}: no instruction within 10 s")
                if task.done():
                    break
                continue
            latencies.append(seen - began)
            acks.append(acked - began)
            if str(instruction["input_data"].get("n")) != str(n):
                problems.append(f"event {n}: handed the instruction of {instruction['input_data']}")
            pairs.append((answer.json()["event_id"], instruction["context"]["execution_id"]))
            if not await asyncio.wait_for(finished.get(), 10):
                problems.append(f"event {n}: progress or result not answered 200")
            await asyncio.sleep(0.02)  # the agent is polling (held, for the long poll) again
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await client.aclose()
        await sender.aclose()
    return {
        "mode": mode,
        "count": count,
        "latencies": latencies,
        "acks": acks,
        "pairs": pairs,
        "problems": problems,
        **counts,
    }


def latency_test(
    server: Server,
    agent: tuple[str, str],
    hook: dict[str, Any],
    mode: str,
    count: int,
) -> dict[str, Any]:
    run = "lat-" + mode.replace(" ", "")
    result = asyncio.run(_latency(server.url, agent, hook, mode, count, run))
    # every instruction belongs to its event: the event's run is the instruction's execution
    wrong = 0
    with admin_client(server.url) as api:
        for event_id, execution_id in result["pairs"]:
            started = api.get(f"/api/v1/events/{event_id}").json().get("started")
            if started != [execution_id]:
                wrong += 1
    result["mismatched"] = wrong
    values = result["latencies"]
    result["p50"] = percentile(values, 50)
    result["p99"] = percentile(values, 99)
    result["max"] = max(values, default=float("nan"))
    result["ack_p50"] = percentile(result["acks"], 50)
    result["ok"] = len(values) == count and not wrong and not result["problems"] and len(values) > 0
    say(
        f"    {mode}: {len(values)}/{count} events to their first instruction: p50 "
        f"{result['p50'] * 1000:.1f} ms, p99 {result['p99'] * 1000:.1f} ms, max "
        f"{result['max'] * 1000:.1f} ms (the 202 itself p50 {result['ack_p50'] * 1000:.1f} "
        f"ms); {result['polls']} polls, {result['empty']} empty; instructions of another "
        f"event's run: {wrong}"
    )
    for problem in result["problems"][:5]:
        say(f"      PROBLEM: {problem}")
    return result


# -- 3. accepted events/s, the backlog -------------------------------------------------------


def describe_run(figures: dict[str, Any]) -> str:
    others = ", ".join(f"{k}: {v}" for k, v in sorted(figures["other_statuses"].items()))
    return (
        f"{figures['accepted_rate']:.0f} accepted (202)/s; p50 {figures['p50_us'] / 1000:.2f} "
        f"ms, p99 {figures['p99_us'] / 1000:.2f} ms, max {figures['max_us'] / 1000:.0f} ms; "
        f"202: {figures['status202']}, 200 (duplicate): {figures['status200']}, other: "
        f"{figures['others']}" + (f" ({others})" if others else "") + f"; socket errors "
        f"{figures['socket_errors']}; requests prepared {figures['prepared']}, sent "
        f"{figures['sent']}, repeats {figures['repeats']}"
    )


def accepted_test(
    server: Server,
    database_url: str,
    hook: dict[str, Any],
    options: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    requests = tmp / "requests.txt"
    made = write_requests(requests, hook["secret"], "load", options.request_count)
    say(
        f"  wrk: signed webhooks, {made['count']} requests prepared ({made['body_bytes']:.0f}-"
        f"byte bodies, signed in {made['seconds']:.1f} s), {options.duration:g} s, "
        f"-t{options.wrk_threads} -c{options.wrk_connections} ..."
    )
    spy = base.PySpy.start(server, options, "webhooks")
    cpu = CpuMeter(server)
    figures = run_hooks_wrk(
        server.url,
        requests,
        f"/hooks/{hook['id']}",
        options.duration,
        options.wrk_threads,
        options.wrk_connections,
    )
    ended = time.monotonic()
    figures["cpu"] = cpu.stop()
    if spy:
        figures["pyspy"] = spy.stop()
    say(f"    {describe_run(figures)}")
    say(f"    {cpu_line(figures['cpu'])}")
    if figures["repeats"]:
        say(
            f"    NOTE: the prepared requests ran out: {figures['repeats']} repeats (answered "
            "200 duplicate); raise --max-rate"
        )

    # Every 202 stored, and the backlog processed into runs.
    at_end = event_outcomes(database_url, LOAD_WORKFLOW)
    stored_at_end = sum(at_end.values())
    drained_after = None
    outcomes = at_end
    while time.monotonic() - ended < options.drain_limit:
        outcomes = event_outcomes(database_url, LOAD_WORKFLOW)
        if not outcomes.get("accepted"):
            drained_after = time.monotonic() - ended
            break
        time.sleep(0.2)
    stored = sum(outcomes.values())
    executions = int(
        db_value(
            database_url,
            f"SELECT count(*) FROM executions WHERE workflow_name = '{LOAD_WORKFLOW}'",
        )
    )
    figures["stored"] = stored
    figures["outcomes"] = outcomes
    figures["processed_during_run"] = stored_at_end - at_end.get("accepted", 0)
    figures["accepted_at_end"] = at_end.get("accepted", 0)
    figures["drained_after"] = drained_after
    figures["executions"] = executions
    lost = figures["status202"] - stored
    figures["lost"] = max(0, lost)
    figures["stored_ok"] = (
        figures["status202"] <= stored <= figures["status202"] + figures["in_flight"]
    )
    # A request wrk cut off when it stopped (its connection closed before the body was
    # all in) is stored refused, as any sender's would be: one of those in flight.
    cut_off = int(
        db_value(
            database_url,
            "SELECT count(*) FROM events WHERE source = 'webhook' "
            f"AND workflow_name = '{LOAD_WORKFLOW}' AND outcome = 'refused' "
            "AND reason LIKE '%the request ended before its body'",
        )
    )
    figures["cut_off"] = cut_off
    figures["runs_ok"] = (
        executions == outcomes.get("started", 0) == stored - cut_off
        and cut_off <= figures["in_flight"]
    )
    figures["reasons"] = []
    if stored - cut_off != outcomes.get("started", 0):
        # why an event started nothing: the server's own words, as the operator sees them
        figures["reasons"] = db_rows(
            database_url,
            "SELECT outcome, reason, count(*) FROM events WHERE source = 'webhook' "
            f"AND workflow_name = '{LOAD_WORKFLOW}' AND outcome <> 'started' "
            "GROUP BY outcome, reason ORDER BY count(*) DESC LIMIT 5",
        )
    say(
        f"    stored: {stored} events of the hook (wrk counted {figures['status202']} 202s; "
        f"{figures['in_flight']} requests in flight when wrk stopped) -> "
        + ("every 202 stored" if figures["stored_ok"] else f"NOT OK ({max(0, lost)} missing)")
    )
    say(
        f"    processed into runs while wrk ran: {figures['processed_during_run']}; still "
        f"accepted when wrk stopped: {figures['accepted_at_end']}"
        + (f"; cut off by wrk's stop, stored refused: {cut_off}" if cut_off else "")
    )
    if drained_after is not None:
        rate = figures["accepted_at_end"] / drained_after if drained_after else 0.0
        figures["drain_rate"] = rate
        say(
            f"    backlog drained in {drained_after:.1f} s ({rate:.0f} events/s processed "
            f"after the run); outcomes {outcomes}; executions {executions}"
            + ("" if figures["runs_ok"] else " NOT OK: an event without its run")
        )
        for outcome, reason, count in figures["reasons"]:
            say(f"      {count} events {outcome}: {reason}")
    else:
        figures["drain_rate"] = None
        say(
            f"    backlog NOT drained within {options.drain_limit:g} s: outcomes {outcomes}, "
            f"executions {executions}"
        )
    return figures


# -- one backend -----------------------------------------------------------------------------


def setup(server: Server) -> dict[str, Any]:
    with admin_client(server.url) as api:
        made = api.post("/api/v1/agents", json={"name": AGENT_NAME})
        made.raise_for_status()
        hooks = {}
        for name, regex in ((LATENCY_WORKFLOW, f"^{AGENT_NAME}$"), (LOAD_WORKFLOW, "^nobody$")):
            applied = api.post(
                "/api/v1/workflows",
                content=workflow_source(name, regex),
                headers={"Content-Type": "application/yaml"},
            )
            if applied.status_code != 201:
                raise RuntimeError(f"applying {name}: {applied.status_code} {applied.text}")
            hook = api.post("/api/v1/webhooks", json={"workflow": name})
            if hook.status_code != 201:
                raise RuntimeError(f"POST /api/v1/webhooks: {hook.status_code} {hook.text}")
            hooks[name] = hook.json()
    return {"agent": (made.json()["agent_id"], made.json()["api_key"]), "hooks": hooks}


def bench_backend(backend: str, options: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"backend": backend}
    tmp = Path(tempfile.mkdtemp(prefix=f"stavily-hooks-{backend}-"))
    try:
        with fresh_database(backend, tmp, options.pg_url) as database_url:
            server = Server(backend, database_url, tmp / "data", tmp / "server.log")
            server.start()
            say(f"\n== {backend}: server on {server.url} (load average {load()}) ==")
            try:
                made = setup(server)
                say(
                    f"  event-to-first-instruction: {options.events} events one at a time, "
                    "the agent completing each ..."
                )
                hook = made["hooks"][LATENCY_WORKFLOW]
                report["latency"] = {
                    mode: latency_test(server, made["agent"], hook, mode, options.events)
                    for mode in ("official", "long poll")
                }
                say(f"  wrk ceiling: GET /healthz, {options.ceiling_duration:g} s ...")
                cpu = CpuMeter(server)
                ceiling = wrk_ceiling(
                    server.url,
                    options.ceiling_duration,
                    options.wrk_threads,
                    options.wrk_connections,
                )
                ceiling["cpu"] = cpu.stop()
                report["ceiling"] = ceiling
                say(
                    f"    {ceiling['rate']:.0f} requests/s, p50 {ceiling['p50_us'] / 1000:.2f} "
                    f"ms, p99 {ceiling['p99_us'] / 1000:.2f} ms"
                )
                report["accepted"] = accepted_test(
                    server, database_url, made["hooks"][LOAD_WORKFLOW], options, tmp
                )
            finally:
                server.stop()
                report["server_problems"] = server.problems()
                report_problems(server, report["server_problems"])
    finally:
        if report.get("server_problems"):
            say(f"  logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return report


# -- the table -------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _cpu(cpu: dict[str, float]) -> str:
    return " / ".join(f"{cpu[k]:.0f}" for k in ("server", "postgres", "clients", "other"))


def verdicts(report: dict[str, Any]) -> dict[str, bool]:
    """The targets (SQLite only)."""
    if report["backend"] != "sqlite":
        return {}
    run = report["accepted"]
    return {
        "rate": run["accepted_rate"] >= SQLITE_RATE_TARGET,
        "p99": run["p99_us"] / 1000 < P99_TARGET_MS,
    }


def figure_rows(report: dict[str, Any], peer: dict[str, Any]) -> list[tuple[str, str]]:
    run, ceiling = report["accepted"], report["ceiling"]
    marks = verdicts(report)

    def mark(key: str) -> str:
        if key not in marks:
            return ""
        return " PASS" if marks[key] else " FAIL"

    others = ", ".join(f"{k}: {v}" for k, v in sorted(run["other_statuses"].items())) or "0"
    rows = [
        (
            f"accepted events/s, 202 (SQLite target >= {SQLITE_RATE_TARGET:,.0f})",
            f"{run['accepted_rate']:.0f}" + mark("rate"),
        ),
        (
            f"  latency p50 / p99 (SQLite p99 < {P99_TARGET_MS:g} ms)",
            f"{run['p50_us'] / 1000:.1f} / {run['p99_us'] / 1000:.1f} ms" + mark("p99"),
        ),
        ("  answers 202 / 200 duplicate", f"{run['status202']} / {run['status200']}"),
        ("  other statuses / socket errors", f"{others} / {run['socket_errors']}"),
        ("  prepared / sent / repeats", f"{run['prepared']} / {run['sent']} / {run['repeats']}"),
        ("  CPU %: server / postgres / wrk / other", _cpu(run["cpu"])),
        (
            "  server CPU per accepted event",
            f"{run['cpu']['server'] / 100 / max(run['accepted_rate'], 1) * 1000:.2f} ms",
        ),
        (
            "  events stored (202s + in flight at stop)",
            f"{run['stored']} ({run['status202']} + <= {run['in_flight']})"
            + ("" if run["stored_ok"] else " NOT OK"),
        ),
        ("  processed into runs while wrk ran", str(run["processed_during_run"])),
        (
            "  backlog drained in",
            f"{run['drained_after']:.1f} s" if run["drained_after"] is not None else "NOT",
        ),
        (
            "  processing after the run, events/s",
            f"{run['drain_rate']:.0f}" if run.get("drain_rate") else "n/a",
        ),
        (
            "  executions / started events",
            f"{run['executions']} / {run['outcomes'].get('started', 0)}"
            + ("" if run["runs_ok"] else " NOT OK"),
        ),
        ("wrk ceiling GET /healthz req/s", f"{ceiling['rate']:.0f}"),
        (
            "  /healthz latency p50 / p99",
            f"{ceiling['p50_us'] / 1000:.2f} / {ceiling['p99_us'] / 1000:.2f} ms",
        ),
        (
            "peer (HMAC check, no DB) accepted/s",
            f"{peer['accepted_rate']:.0f}" if peer else "n/a",
        ),
        (
            "  peer latency p50 / p99",
            f"{peer['p50_us'] / 1000:.1f} / {peer['p99_us'] / 1000:.1f} ms" if peer else "n/a",
        ),
        (
            "  accepted/s as a share of the peer",
            f"{run['accepted_rate'] / peer['accepted_rate']:.0%}" if peer else "n/a",
        ),
    ]
    for mode, figures in report["latency"].items():
        rows += [
            (
                f"event -> first instruction p50 / p99, {mode}",
                f"{_ms(figures['p50'])} / {_ms(figures['p99'])}",
            ),
            ("  max", _ms(figures["max"])),
            (
                "  events measured / mismatched",
                f"{len(figures['latencies'])}/{figures['count']} / {figures['mismatched']}",
            ),
        ]
    rows.append(("server log error lines", str(len(report["server_problems"]))))
    return rows


def print_table(
    reports: list[dict[str, Any]], peer: dict[str, Any], options: argparse.Namespace
) -> None:
    columns = [figure_rows(r, peer) for r in reports]
    labels = [label for label, _ in columns[0]]
    headers = ["figure", *(r["backend"] for r in reports)]
    widths = [max(len(headers[0]), *(len(k) for k in labels))]
    for header, rows in zip(headers[1:], columns, strict=True):
        widths.append(max(len(header), *(len(v) for _, v in rows)))
    say("")
    say(
        f"Stavily webhook benchmark ({options.version}) - nproc {os.cpu_count()}, python "
        f"{sys.version.split()[0]}, wrk -t{options.wrk_threads} -c{options.wrk_connections} "
        f"for {options.duration:g} s, {options.events} events for the latency"
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
    say(
        "Latency of the 202s: wrk's service time of a sent request; with a closed loop of "
        f"{options.wrk_connections} connections it is about connections / rate (Little's "
        "law). Event -> first instruction: from just before the webhook is sent to the "
        "agent's poll returning that event's instruction; 'official' polls back to back "
        "with no query string (the official agents poll every poll_interval, 10 s by "
        "default, which adds up to that much in the field), 'long poll' holds ?wait=30. "
        "CPU in % of one core."
    )


def healthy(report: dict[str, Any]) -> bool:
    run = report["accepted"]
    return bool(
        all(verdicts(report).values())
        and run["stored_ok"]
        and run["runs_ok"]
        and run["drained_after"] is not None
        and not run["others"]
        and not run["socket_errors"]
        and not run["repeats"]
        and all(figures["ok"] for figures in report["latency"].values())
        and not report["server_problems"]
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="5 s of wrk, 50 latency events")
    parser.add_argument("--duration", type=float, help="wrk seconds (default 10, quick 5)")
    parser.add_argument("--events", type=int, help="latency events (default 200, quick 50)")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=32)
    parser.add_argument(
        "--max-rate",
        type=float,
        default=8000.0,
        help="requests signed per second of --duration (more than the server can take)",
    )
    parser.add_argument(
        "--drain-limit", type=float, default=300.0, help="give up waiting for the backlog (s)"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the peer")
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the server with py-spy (all threads) during the accepted-events run",
    )
    parser.add_argument(
        "--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "stavily-bench-profile"
    )
    parser.add_argument("--peer-port", type=int, help=argparse.SUPPRESS)  # the peer itself
    options = parser.parse_args()
    options.duration = options.duration or (5.0 if options.quick else 10.0)
    options.events = options.events or (50 if options.quick else 200)
    options.request_count = int(options.max_rate * options.duration)
    options.ceiling_duration = 3.0
    options.pg_url = os.environ.get("STAVILY_BENCH_DATABASE_URL", DEFAULT_PG_URL)
    return options


def main() -> int:
    options = parse_args()
    if options.peer_port:
        serve_peer(options.peer_port, os.environ["STAVILY_BENCH_PEER_SECRET"])
        return 0
    if shutil.which("wrk") is None:
        say("wrk is not installed: apt-get install -y wrk (Debian package wrk)")
        return 2
    options.version = base.source_version()
    busy = options.busy = base.background_cpu()
    say(
        f"machine: nproc {os.cpu_count()}; python {sys.version.split()[0]}; stavily "
        f"{options.version}; CPU already busy: {busy:.0f}% of one core (load {load()})"
    )
    began = time.monotonic()
    peer: dict[str, Any] = {}
    if not options.no_peer:
        say("\n== peer: uvicorn, the signature check, nothing stored ==")
        tmp = Path(tempfile.mkdtemp(prefix="stavily-hooks-peer-"))
        try:
            peer = peer_test(options, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    backends = ["sqlite", "postgresql"] if options.backend == "both" else [options.backend]
    reports = [bench_backend(backend, options) for backend in backends]
    for report in reports:
        if report["accepted"].get("pyspy"):
            base.print_pyspy(report["backend"], report["accepted"]["pyspy"])
    print_table(reports, peer, options)
    say(f"\ntotal wall time {time.monotonic() - began:.0f} s")
    ok = all(healthy(r) for r in reports)
    if not ok:
        say("SOME CHECKS FAILED OR TARGETS WERE MISSED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
