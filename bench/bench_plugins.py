"""Plugin distribution benchmark: 200 agents fetching a 10 MiB plugin at once over loopback.

    python bench/bench_plugins.py [--database sqlite|postgres|both] [--agents 200]
        [--size-mb 10] [--processes 4] [--repeats 1] [--store folder|database] [--py-spy]

A plugin (plugin.yaml, main.py and --size-mb MiB of random bytes, so that the artifact does
not compress) is published through POST /api/v1/plugins to a real `stavily serve` subprocess
on a fresh database, and --agents agents are created through POST /api/v1/agents. They are
driven from --processes client processes (asyncio + httpx, one connection per agent, as
real agents have), each doing what an agent does to install the plugin:

    GET /agents/v1/{id}/plugins/keys                  the registry's public keys
    GET /agents/v1/{id}/plugins/big/1.0.0             the signed manifest: signature checked
    GET /agents/v1/{id}/plugins/big/1.0.0/artifact    streamed into sha256, never kept:
                                                      sha256 and size checked

Round 1: every agent at once (the processes open their connections, then one barrier
releases them). Reported: the aggregate throughput (artifact bytes received / from the
first agent's start to the last artifact's end), the time until the last agent had
verified its copy, each agent's time p50 / p99, errors, and the server's RSS, sampled
every 20 ms with psutil: the baseline (median of the half second before), the peak during
the round, and what the peak added, against artifact size x agents (a server holding a
copy per agent). "flat": each concurrent download added under 1 MiB (and under a quarter of
the artifact), so what the server holds does not grow with the artifact's size (run with
--size-mb 40: the same figure per agent). The RSS 1 s after the round shows whether the
memory came back.

Round 2: every agent again, the manifest and then the artifact with If-None-Match (the
ETag it was given): the share of 304 answers, and the round's time.

The load generator's ceiling is measured in the same run, by the same client processes
running the same code against two peers serving the server's own artifact bytes, keys and
signed manifest from memory, with ETag and 304:
  - "raw peer": an asyncio protocol on uvloop writing prepared answers (no HTTP
    framework): what the clients can take, the ceiling;
  - "uvicorn peer": a bare ASGI app on uvicorn (uvloop, httptools, as `stavily serve`)
    sending the artifact in the server's 64 KiB pieces, but as views of one buffer: the
    same HTTP stack without the server's work (auth, database, file reads in threads, a
    new buffer per piece).
The server and the peers take turns, round 1 --repeats times each (the median run is
reported), so that other work on the machine falls on all of them alike. With
--database both, the peers run beside the first server only.

CPU during round 1 is in % of one core: the target (server or peer process), PostgreSQL,
the client processes (their own getrusage) and the rest of the machine ("other": a busy
machine makes every figure lower; the header says how busy it was before the start).

PostgreSQL: STAVILY_BENCH_DATABASE_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test) names the server; a fresh database is
created for the run and dropped afterwards. Nothing here is collected by pytest. Exit
status 1 when an agent failed to verify its copy, an answer was an error, round 2 had
answers other than 304, the server's RSS was not flat, or its log has error lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/bench_plugins.py` puts only bench/ there
    sys.path.insert(0, str(ROOT))

from bench import bench_agent_api as base  # noqa: E402
from bench.bench_agent_api import (  # noqa: E402
    MP,
    CpuMeter,
    Server,
    admin_client,
    create_agents_proc,
    free_port,
    fresh_database,
    load,
    parallel,
    percentile,
    say,
    split,
)
from bench.bench_fleet import report_problems, server_env  # noqa: E402
from stavily.plugins.blobs import PIECE  # noqa: E402

PLUGIN_ID = "big"
VERSION = "1.0.0"
MiB = 1024 * 1024
CHUNK = PIECE  # what the server streams in (stavily.plugins.blobs), and the uvicorn peer
RSS_INTERVAL = 0.02
# flat: each concurrent download added under 1 MiB (and under a quarter of the artifact):
# it holds a few pieces in flight, never the artifact, so what it adds does not grow with
# the artifact's size (--size-mb 40 gives the same figure per agent)
FLAT_PER_DOWNLOAD = MiB
MANIFEST = f"""\
plugin:
  id: {PLUGIN_ID}
  name: Big
  description: A large plugin, for the distribution benchmark.
  version: {VERSION}
  type: action
  runtime:
    type: python
    entry_point: main.py
  protocol: input
"""
MAIN_PY = 'import json\nprint(json.dumps({"ok": True}))\n'
AGENT_HEADERS = {"Accept": "application/json", "User-Agent": "Stavily-Agent/1.0.0"}


# -- the plugin --------------------------------------------------------------------------------


def plugin_archive(size_mb: float) -> bytes:
    """plugin.yaml, main.py and `size_mb` MiB of random bytes, as a tar.gz (in memory)."""
    payload = os.urandom(int(size_mb * MiB))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name, data in (
            ("plugin.yaml", MANIFEST.encode()),
            ("main.py", MAIN_PY.encode()),
            ("data.bin", payload),
        ):
            info = tarfile.TarInfo(f"big/{name}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def publish(url: str, archive: bytes) -> dict[str, Any]:
    with admin_client(url) as api:
        answer = api.post(
            "/api/v1/plugins", content=archive, headers={"Content-Type": "application/gzip"}
        )
    if answer.status_code != 201:
        raise RuntimeError(f"POST /api/v1/plugins: {answer.status_code} {answer.text[:2000]}")
    return dict(answer.json())


def agent_json(url: str, agent: tuple[str, str]) -> tuple[bytes, bytes]:
    """The keys and manifest answers as the server gives them, for the peers to serve."""
    agent_id, key = agent
    headers = {**AGENT_HEADERS, "Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        keys = client.get(f"/agents/v1/{agent_id}/plugins/keys")
        manifest = client.get(f"/agents/v1/{agent_id}/plugins/{PLUGIN_ID}/{VERSION}")
    keys.raise_for_status()
    manifest.raise_for_status()
    return keys.content, manifest.content


def download(url: str, agent: tuple[str, str]) -> bytes:
    """The artifact's bytes, once, for the peers to serve."""
    agent_id, key = agent
    headers = {**AGENT_HEADERS, "Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        answer = client.get(f"/agents/v1/{agent_id}/plugins/{PLUGIN_ID}/{VERSION}/artifact")
    answer.raise_for_status()
    return answer.content


# -- the agents (in client processes) ----------------------------------------------------------


async def install(client: httpx.AsyncClient, agent_id: str, etag: str | None) -> dict[str, Any]:
    """What an agent does to install the plugin; `etag`: it has a copy (If-None-Match)."""
    from stavily.plugins.signing import verify

    record: dict[str, Any] = {"agent": agent_id, "start": time.monotonic(), "error": None}
    base_path = f"/agents/v1/{agent_id}/plugins"
    try:
        keys: dict[str, str] = {}
        if etag is None:  # an agent with a copy knows the keys already
            answer = await client.get(f"{base_path}/keys")
            if answer.status_code != 200:
                raise RuntimeError(f"keys {answer.status_code} {answer.text[:200]}")
            keys = {k["key_id"]: k["public_key"] for k in answer.json()["keys"]}
            record["keys_at"] = time.monotonic()
        answer = await client.get(f"{base_path}/{PLUGIN_ID}/{VERSION}")
        if answer.status_code != 200:
            raise RuntimeError(f"manifest {answer.status_code} {answer.text[:200]}")
        body = answer.json()
        manifest = body["manifest"]
        if keys:
            record["signed"] = verify(keys[body["key_id"]], manifest, body["signature"])
        record["manifest_at"] = time.monotonic()
        headers = {"If-None-Match": etag} if etag else {}
        digest = hashlib.sha256()
        size = 0
        async with client.stream(
            "GET", f"{base_path}/{PLUGIN_ID}/{VERSION}/artifact", headers=headers
        ) as answer:
            record["status"] = answer.status_code
            record["first_byte_at"] = time.monotonic()
            record["etag"] = answer.headers.get("etag")
            if answer.status_code not in (200, 304):
                await answer.aread()
                raise RuntimeError(f"artifact {answer.status_code} {answer.text[:200]}")
            async for chunk in answer.aiter_raw():  # hashed as it comes, never kept
                digest.update(chunk)
                size += len(chunk)
        record["bytes"] = size
        if answer.status_code == 200:
            record["verified"] = bool(
                record.get("signed", True)
                and size == manifest["size"]
                and digest.hexdigest() == manifest["sha256"]
            )
        else:
            record["verified"] = bool(record.get("signed", True)) and size == 0
    except Exception as exc:  # counted, the round goes on
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        record["verified"] = False
    record["end"] = time.monotonic()
    return record


def fetch_proc(
    url: str,
    agents: list[tuple[str, str]],
    etags: dict[str, str],
    barrier: Any,
    queue: Any,
) -> None:  # pragma: no cover - runs in a child process
    """One client process: its agents' connections opened, then all at once."""

    async def main() -> dict[str, Any]:
        clients = [
            httpx.AsyncClient(
                base_url=url,
                headers={**AGENT_HEADERS, "Authorization": f"Bearer {key}"},
                timeout=httpx.Timeout(300, connect=60),
                limits=httpx.Limits(max_connections=1),
            )
            for _, key in agents
        ]
        for client in clients:
            await client.get("/healthz")  # open the connection before timing
        barrier.wait()
        before = resource.getrusage(resource.RUSAGE_SELF)
        records = await asyncio.gather(
            *(
                install(client, agent_id, etags.get(agent_id))
                for client, (agent_id, _) in zip(clients, agents, strict=True)
            )
        )
        after = resource.getrusage(resource.RUSAGE_SELF)
        for client in clients:
            await client.aclose()
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {"records": records, "cpu_seconds": cpu}

    queue.put(asyncio.run(main()))


def fetch_round(
    url: str,
    agents: list[tuple[str, str]],
    procs: int,
    etags: dict[str, str],
    meter: Any = None,
) -> dict[str, Any]:
    """Every agent installs the plugin at once, from `procs` processes; `meter` (a
    CpuMeter maker) is started as they are released, once their connections are open."""
    chunks = split(agents, procs)
    barrier = MP.Barrier(len(chunks) + 1)
    queue = MP.Queue()
    workers = [
        MP.Process(target=fetch_proc, args=(url, chunk, etags, barrier, queue)) for chunk in chunks
    ]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=120)
    released = time.monotonic()
    cpu = meter() if meter is not None else None
    results = [queue.get(timeout=600) for _ in workers]
    records = [r for result in results for r in result["records"]]
    figures = summarise(records, released, sum(r["cpu_seconds"] for r in results))
    if cpu is not None:
        figures["cpu"] = split_cpu(cpu.stop(figures["last"] - released), figures["client_cpu"])
    for worker in workers:
        worker.join()
    return figures


def split_cpu(cpu: dict[str, float], clients: float) -> dict[str, float]:
    """CpuMeter's figures with the client processes' own CPU (they are not waited for
    yet, so CpuMeter cannot see them), and what is left for the rest of the machine."""
    cpu["clients"] = clients
    rest = cpu["machine"] - cpu["server"] - cpu["postgres"] - clients - cpu["irq"]
    cpu["other"] = max(0.0, rest)
    return cpu


def summarise(records: list[dict[str, Any]], released: float, cpu_seconds: float) -> dict[str, Any]:
    first = min(r["start"] for r in records)
    last = max(r["end"] for r in records)
    took = [r["end"] - r["start"] for r in records]
    keys = [r["keys_at"] - r["start"] for r in records if "keys_at" in r]
    manifest = [
        r["manifest_at"] - r.get("keys_at", r["start"]) for r in records if "manifest_at" in r
    ]
    received = sum(r.get("bytes", 0) for r in records)
    statuses = Counter(str(r.get("status", "-")) for r in records)
    errors = Counter(r["error"].split(":")[0] for r in records if r["error"])
    return {
        "agents": len(records),
        "released": released,
        "first": first,
        "last": last,
        "wall": last - first,
        "bytes": received,
        "mib_s": received / MiB / max(last - first, 1e-9),
        "p50": percentile(took, 50),
        "p99": percentile(took, 99),
        "keys_p50": percentile(keys, 50),
        "keys_p99": percentile(keys, 99),
        "manifest_p50": percentile(manifest, 50),
        "manifest_p99": percentile(manifest, 99),
        "verified": sum(1 for r in records if r["verified"]),
        "statuses": dict(statuses),
        "not_modified": statuses.get("304", 0),
        "errors": dict(errors),
        "error_samples": [r["error"] for r in records if r["error"]][:5],
        "etags": {r["agent"]: r["etag"] for r in records if r.get("etag")},
        "client_cpu": cpu_seconds / max(last - first, 1e-9) * 100,
    }


# -- the server's memory -----------------------------------------------------------------------


class RssSampler:
    """The RSS of one process, every RSS_INTERVAL, in a background thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(RSS_INTERVAL)

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in list(self.samples) if start <= t <= end]

    def window(self, seconds: float) -> tuple[float, float]:
        """Sleep `seconds`: the (start, end) of what was sampled meanwhile."""
        began = time.monotonic()
        time.sleep(seconds)
        return began, time.monotonic()


def memory_figures(
    sampler: RssSampler,
    baseline: tuple[float, float],
    round1: dict[str, Any],
    settled: tuple[float, float],
    artifact: int,
    agents: int,
) -> dict[str, Any]:
    before = sampler.between(*baseline)
    during = sampler.between(round1["released"], round1["last"])
    after = sampler.between(*settled)
    base_rss = statistics.median(before) if before else float("nan")
    peak = max(during) if during else float("nan")
    added = peak - base_rss
    copies = artifact * agents
    return {
        "baseline": base_rss,
        "peak": peak,
        "added": added,
        "share": added / copies,
        "per_agent": added / agents,
        "after": statistics.median(after) if after else float("nan"),
        "samples": len(during),
        "flat": added / agents < min(FLAT_PER_DOWNLOAD, artifact / 4),
    }


# -- the peers ---------------------------------------------------------------------------------


class Answers:
    """What a peer serves: the artifact, the keys and the manifest JSON, from memory."""

    def __init__(self, artifact: bytes, keys: bytes, manifest: bytes) -> None:
        self.artifact = artifact
        self.keys = keys
        self.manifest = manifest
        self.etag = ('"' + hashlib.sha256(artifact).hexdigest() + '"').encode()

    def pick(self, path: str, if_none_match: bytes | None) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for a path."""
        if path.endswith("/artifact"):
            if if_none_match is not None and if_none_match.strip() == self.etag:
                return 304, b"application/gzip", b""
            return 200, b"application/gzip", self.artifact
        if path.endswith("/keys"):
            return 200, b"application/json", self.keys
        if path == "/healthz":
            return 200, b"application/json", b'{"status":"ok"}'
        return 200, b"application/json", self.manifest


def raw_peer_proc(port: int, answers: Answers, ready: Any) -> None:  # pragma: no cover
    """An asyncio protocol on uvloop: prepared answers, no HTTP framework."""
    import uvloop

    reasons = {200: b"OK", 304: b"Not Modified"}

    class Peer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                path = lines[0].split(b" ")[1].decode()
                match = None
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"if-none-match":
                        match = value.strip()
                status, kind, body = answers.pick(path, match)
                self.transport.write(
                    b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\netag: %s\r\n"
                    b"content-length: %d\r\n\r\n"
                    % (status, reasons[status], kind, answers.etag, len(body))
                )
                if body:
                    self.transport.write(body)  # the same bytes object each time: no copy

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            Peer, "127.0.0.1", port, backlog=2048
        )
        ready.set()
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def uvicorn_peer_proc(port: int, answers: Answers, ready: Any) -> None:  # pragma: no cover
    """A bare ASGI app on uvicorn (uvloop, httptools): the artifact in the server's pieces."""
    import uvicorn

    view = memoryview(answers.artifact)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                    ready.set()
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = dict(scope["headers"])
        status, kind, body = answers.pick(scope["path"], headers.get(b"if-none-match"))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", kind),
                    (b"etag", answers.etag),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        if status != 200 or body is not answers.artifact:
            await send({"type": "http.response.body", "body": body})
            return
        for offset in range(0, len(body), CHUNK):
            more = offset + CHUNK < len(body)
            await send(
                {
                    "type": "http.response.body",
                    "body": view[offset : offset + CHUNK],
                    "more_body": more,
                }
            )

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        backlog=2048,
    )


class Peer:
    def __init__(self, kind: str, answers: Answers) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        target = raw_peer_proc if kind == "raw" else uvicorn_peer_proc
        self.ready = MP.Event()
        self.proc = MP.Process(target=target, args=(self.port, answers, self.ready), daemon=True)

    def start(self) -> None:
        self.proc.start()
        if not self.ready.wait(30):
            raise RuntimeError(f"the {self.kind} peer did not start")
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(timeout=10)


# -- the targets: the server and the peers, taking turns ------------------------------------


@dataclass
class Target:
    """Something the agents install from: the server, or a peer (for the ceiling)."""

    column: str
    pid: int
    url: str
    server: Server | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    rss: dict[str, Any] = field(default_factory=dict)
    round2: dict[str, Any] = field(default_factory=dict)
    pyspy: dict[str, Any] | None = None
    sampler: RssSampler | None = None

    def meter(self) -> CpuMeter:
        return CpuMeter(SimpleNamespace(proc=SimpleNamespace(pid=self.pid)))  # type: ignore[arg-type]


def say_run(target: Target, run: dict[str, Any], number: int, repeats: int) -> None:
    during = target.sampler.between(run["released"], run["last"]) if target.sampler else []
    say(
        f"    {target.column}, round 1{f' ({number}/{repeats})' if repeats > 1 else ''}: "
        f"{run['verified']}/{run['agents']} verified, {run['mib_s']:.0f} MiB/s, all verified "
        f"after {run['wall']:.2f} s (p50 {run['p50']:.2f} s, p99 {run['p99']:.2f} s), "
        f"answers {run['statuses']}"
        + (f", errors {run['errors']} e.g. {run['error_samples'][:2]}" if run["errors"] else "")
        + f"; CPU % target {run['cpu']['server']:.0f}, postgres {run['cpu']['postgres']:.0f}, "
        f"clients {run['cpu']['clients']:.0f}, other {run['cpu']['other']:.0f}"
        + (f"; RSS peak {max(during) / MiB:.0f} MiB" if during else "")
    )


def first_install(
    target: Target, agents: list[tuple[str, str]], options: argparse.Namespace, artifact: int
) -> None:
    """Round 1 on a quiet target, its RSS sampled from half a second before to 1 s after."""
    spy = base.PySpy.start(target.server, options, "round1") if target.server else None
    rss = target.sampler
    assert rss is not None
    baseline = rss.window(0.5)
    run = fetch_round(target.url, agents, options.processes, {}, target.meter)
    if spy:
        target.pyspy = spy.stop()
    settled = rss.window(1.0)
    target.rss = memory_figures(rss, baseline, run, settled, artifact, len(agents))
    target.runs.append(run)
    say_run(target, run, 1, options.repeats)
    memory = target.rss
    say(
        f"      RSS {memory['baseline'] / MiB:.0f} MiB before, peak {memory['peak'] / MiB:.0f} "
        f"MiB (+{memory['added'] / MiB:.0f} MiB = {memory['share'] * 100:.1f}% of "
        f"{len(agents)} x {artifact / MiB:.1f} MiB; {memory['samples']} samples), "
        f"{memory['after'] / MiB:.0f} MiB 1 s after"
    )


def measure(
    targets: list[Target],
    agents: list[tuple[str, str]],
    options: argparse.Namespace,
    artifact: int,
) -> None:
    """Round 1 --repeats times on each target in turn (so that other work on the machine
    falls on all of them alike), then round 2 (If-None-Match) on each. Each target's RSS
    is sampled throughout: the first round's figures, and the peak and end of them all."""
    with contextlib.ExitStack() as stack:
        for target in targets:
            target.sampler = stack.enter_context(RssSampler(target.pid))
        _measure(targets, agents, options, artifact)
        time.sleep(0.5)
    for target in targets:
        assert target.sampler is not None
        samples = [rss for _, rss in target.sampler.samples]
        target.rss["peak_all"] = max(samples)
        target.rss["end"] = statistics.median(samples[-20:])


def _measure(
    targets: list[Target],
    agents: list[tuple[str, str]],
    options: argparse.Namespace,
    artifact: int,
) -> None:
    for number in range(1, options.repeats + 1):
        for target in targets:
            if number == 1:
                first_install(target, agents, options, artifact)
            else:
                time.sleep(0.5)
                run = fetch_round(target.url, agents, options.processes, {}, target.meter)
                target.runs.append(run)
                say_run(target, run, number, options.repeats)
    for target in targets:
        round2 = fetch_round(target.url, agents, options.processes, target.runs[0]["etags"])
        target.round2 = round2
        say(
            f"    {target.column}, round 2 (If-None-Match): {round2['not_modified']}/"
            f"{round2['agents']} answered 304, all done after {round2['wall']:.2f} s (p50 "
            f"{round2['p50'] * 1000:.0f} ms, p99 {round2['p99'] * 1000:.0f} ms), answers "
            f"{round2['statuses']}" + (f", errors {round2['errors']}" if round2["errors"] else "")
        )


def report_of(target: Target, problems: list[str]) -> dict[str, Any]:
    """The median run's figures; correctness counted over every run."""
    runs = target.runs
    round1 = dict(sorted(runs, key=lambda run: run["mib_s"])[(len(runs) - 1) // 2])
    round1["runs"] = [run["mib_s"] for run in runs]
    round1["verified"] = sum(run["verified"] for run in runs)
    round1["agents"] = sum(run["agents"] for run in runs)
    round1["errors"] = dict(sum((Counter(run["errors"]) for run in runs), Counter()))
    round1["statuses"] = dict(sum((Counter(run["statuses"]) for run in runs), Counter()))
    return {
        "column": target.column,
        "round1": round1,
        "round2": target.round2,
        "rss": target.rss,
        "pyspy": target.pyspy,
        "problems": problems,
    }


def bench_backend(
    backend: str, options: argparse.Namespace, archive: bytes, peers: bool
) -> list[dict[str, Any]]:
    """A server on `backend` (and the peers, serving its artifact): one report each."""
    tmp = Path(tempfile.mkdtemp(prefix=f"stavily-plugins-{backend}-"))
    env = {"STAVILY_PLUGIN_STORE": options.store}
    problems: list[str] = []
    started: list[Peer] = []
    try:
        with fresh_database(backend, tmp, options.pg_url) as database_url:
            server = Server(backend, database_url, tmp / "data", tmp / "server.log")
            with server_env(env):
                server.start()
            assert server.proc is not None
            say(
                f"\n== {backend}: server on {server.url}, store {options.store} "
                f"(load average {load()}) =="
            )
            try:
                began = time.monotonic()
                view = publish(server.url, archive)
                artifact = int(view["size"])
                say(
                    f"  published {PLUGIN_ID} {VERSION}: artifact {artifact / MiB:.2f} MiB "
                    f"(upload {len(archive) / MiB:.2f} MiB) in {time.monotonic() - began:.2f} s"
                )
                names = [f"plug-{i:04d}" for i in range(options.agents)]
                began = time.monotonic()
                procs = min(4, options.processes)
                chunks = split(names, procs)
                agents = [
                    pair
                    for chunk in parallel(create_agents_proc, server.url, chunks, procs)
                    for pair in chunk
                ]
                say(f"  {len(agents)} agents created in {time.monotonic() - began:.1f} s")
                targets = [Target(f"server {backend}", server.proc.pid, server.url, server)]
                if peers:
                    # the server's own bytes, keys and signed manifest: the checks pass as-is
                    keys, manifest = agent_json(server.url, agents[0])
                    answers = Answers(download(server.url, agents[0]), keys, manifest)
                    for kind in ("uvicorn", "raw"):
                        peer = Peer(kind, answers)
                        peer.start()
                        started.append(peer)
                        assert peer.proc.pid is not None
                        targets.append(Target(f"{kind} peer", peer.proc.pid, peer.url))
                        say(f"  {kind} peer on {peer.url}")
                say(
                    f"  {len(agents)} agents from {options.processes} processes, round 1 x "
                    f"{options.repeats} on each target in turn ..."
                )
                measure(targets, agents, options, artifact)
            finally:
                for peer in started:
                    peer.stop()
                server.stop()
                problems = server.problems()
                report_problems(server, problems)
    finally:
        if problems:
            say(f"  logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    reports = [report_of(targets[0], problems)]
    reports += [report_of(target, []) for target in targets[1:]]
    for report in reports:
        report["artifact"] = artifact
    return reports


# -- the table ---------------------------------------------------------------------------------


def figure_rows(report: dict[str, Any], agents: int, artifact: int) -> list[tuple[str, str]]:
    one, two, rss = report["round1"], report["round2"], report["rss"]
    cpu = one["cpu"]
    errors = sum(one["errors"].values()) + sum(two["errors"].values())
    bad = sum(v for k, v in one["statuses"].items() if k != "200")
    bad += sum(v for k, v in two["statuses"].items() if k not in ("200", "304"))
    return [
        (
            "round 1: aggregate throughput",
            f"{one['mib_s']:.0f} MiB/s"
            + (f" ({min(one['runs']):.0f}-{max(one['runs']):.0f})" if len(one["runs"]) > 1 else ""),
        ),
        ("  all verified after", f"{one['wall']:.2f} s"),
        ("  per agent p50 / p99", f"{one['p50']:.2f} / {one['p99']:.2f} s"),
        ("  GET keys p50 / p99", f"{one['keys_p50'] * 1000:.0f} / {one['keys_p99'] * 1000:.0f} ms"),
        (
            "  GET manifest p50 / p99",
            f"{one['manifest_p50'] * 1000:.0f} / {one['manifest_p99'] * 1000:.0f} ms",
        ),
        ("  verified (sha256, size, signature)", f"{one['verified']}/{one['agents']}"),
        ("  errors / non-2xx answers", f"{errors} / {bad}"),
        ("  RSS before / peak", f"{rss['baseline'] / MiB:.0f} / {rss['peak'] / MiB:.0f} MiB"),
        (
            f"  RSS added (vs {agents} x {artifact / MiB:.0f} MiB)",
            f"+{rss['added'] / MiB:.0f} MiB {rss['share'] * 100:.1f}% "
            + ("flat" if rss["flat"] else "GROWS"),
        ),
        ("  RSS added per agent", f"{rss['per_agent'] / MiB:.2f} MiB"),
        ("  RSS 1 s after the round", f"{rss['after'] / MiB:.0f} MiB"),
        (
            "  RSS peak of all rounds / at the end",
            f"{rss['peak_all'] / MiB:.0f} / {rss['end'] / MiB:.0f} MiB",
        ),
        (
            "  CPU %: target / postgres / clients / other",
            " / ".join(f"{cpu[k]:.0f}" for k in ("server", "postgres", "clients", "other")),
        ),
        ("round 2 (If-None-Match): 304 share", f"{two['not_modified'] / two['agents'] * 100:.1f}%"),
        ("  all answered after", f"{two['wall'] * 1000:.0f} ms"),
        ("  per agent p50 / p99", f"{two['p50'] * 1000:.0f} / {two['p99'] * 1000:.0f} ms"),
        ("server log error lines", str(len(report["problems"]))),
    ]


def print_table(reports: list[dict[str, Any]], options: argparse.Namespace, artifact: int) -> None:
    columns = [figure_rows(r, options.agents, artifact) for r in reports]
    labels = [label for label, _ in columns[0]]
    headers = ["figure", *(r["column"] for r in reports)]
    widths = [max(len(headers[0]), *(len(k) for k in labels))]
    for header, rows in zip(headers[1:], columns, strict=True):
        widths.append(max(len(header), *(len(v) for _, v in rows)))
    say("")
    say(
        f"Stavily plugin distribution benchmark ({options.version}) - nproc {os.cpu_count()}, "
        f"python {sys.version.split()[0]}, {options.agents} agents in {options.processes} "
        f"client processes (asyncio + httpx), round 1 x {options.repeats} (median), artifact "
        f"{artifact / MiB:.2f} MiB, store "
        f"{options.store}; CPU busy before the start: {options.busy:.0f}% of one core"
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
        "Throughput: artifact bytes received / (last artifact's end - first agent's start). "
        "RSS: psutil every 20 ms; 'before' the median of the 0.5 s before round 1, 'added' "
        "the peak less it; flat = under 1 MiB per concurrent download (and a quarter of the "
        f"artifact): it does not grow with the artifact; the server streams {CHUNK // 1024} "
        "KiB pieces. CPU in % "
        "of one core during round 1 (target: the server or the peer process). raw peer: "
        "prepared answers on uvloop, the load generator's ceiling; uvicorn peer: a bare ASGI "
        "app on uvicorn, the server's HTTP stack without its work."
    )


def failures(report: dict[str, Any]) -> list[str]:
    one, two = report["round1"], report["round2"]
    checks = [
        (one["verified"] == one["agents"], f"{one['agents'] - one['verified']} copies unverified"),
        (not one["errors"] and not two["errors"], "errors"),
        (two["not_modified"] == two["agents"], "round 2 had answers other than 304"),
        (not report["problems"], "error lines in the server's log"),
        (report["rss"]["flat"], "RSS not flat"),
    ]
    return [f"{report['column']}: {why}" for ok, why in checks if not ok]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database", choices=("sqlite", "postgres", "postgresql", "both"), default="both"
    )
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--size-mb", type=float, default=10.0, help="random bytes, MiB")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument(
        "--store",
        choices=("folder", "database"),
        default="folder",
        help="STAVILY_PLUGIN_STORE: artifacts in a folder (default) or in the database",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="round 1 this many times: the median run's figures (RSS: the first run's)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the two peers")
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the server with py-spy (all threads) during round 1 (slows it down)",
    )
    parser.add_argument(
        "--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "stavily-bench-profile"
    )
    options = parser.parse_args()
    options.pg_url = os.environ.get("STAVILY_BENCH_DATABASE_URL", base.DEFAULT_PG_URL)
    return options


def main() -> int:
    options = parse_args()
    options.version = base.source_version()
    busy = options.busy = base.background_cpu()
    say(
        f"machine: nproc {os.cpu_count()}; python {sys.version.split()[0]}; stavily "
        f"{options.version}; CPU already busy: {busy:.0f}% of one core (load {load()})"
    )
    if busy > 25:
        say("  note: other work is running on this machine; the figures will be lower and noisier")
    backends = {
        "sqlite": ["sqlite"],
        "postgres": ["postgresql"],
        "postgresql": ["postgresql"],
        "both": ["sqlite", "postgresql"],
    }[options.database]
    began = time.monotonic()
    say(f"building the plugin: {options.size_mb:g} MiB of random bytes ...")
    archive = plugin_archive(options.size_mb)
    reports: list[dict[str, Any]] = []
    for index, backend in enumerate(backends):
        # the peers once, beside the first server
        reports += bench_backend(backend, options, archive, not options.no_peers and index == 0)
    for report in reports:
        if report.get("pyspy"):
            base.print_pyspy(report["column"], report["pyspy"])
    print_table(reports, options, reports[0]["artifact"])
    say(f"\ntotal wall time {time.monotonic() - began:.0f} s")
    failed = [why for report in reports for why in failures(report)]
    if failed:
        say("SOME CHECKS FAILED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
