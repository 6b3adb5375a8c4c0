"""Test harness: a real orchestrator on loopback HTTP against a real database.

`STAVILY_TEST_DATABASE_URL` (a PostgreSQL URL, e.g.
postgresql+asyncpg://postgres@127.0.0.1:5432/test) makes every database-backed
test also run on PostgreSQL, each server in a fresh database of its own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from stavily.api.http import HttpProtocol
from stavily.app import create_app
from stavily.config import Settings
from stavily.fleet import create_agent
from stavily.fleet.agents import AgentIdentity

PG_URL = os.environ.get("STAVILY_TEST_DATABASE_URL")
ADMIN_TOKEN = "stv_test_admin_token_0123456789abcdef"
# for tests of PostgreSQL's own ways (its statements, its round trips)
PG_ONLY = pytest.mark.skipif(
    not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: PostgreSQL runs skipped"
)


# Under pytest-xdist each worker (PYTEST_XDIST_WORKER=gw0, gw1, ...) hands out ports from
# a block of its own, below the kernel's ephemeral range (32768-60999 on Linux): a port one
# worker chose and has not bound yet (a server process still starting, or killed and about
# to be restarted on the same port) is never chosen by another worker, nor taken by any
# outgoing connection in the meantime. Within its block a worker goes round from a random
# start, so ports are not reused soon and two test runs at once rarely meet.
_PORT_BLOCK = 1500
_PORT_BASE = 20000
_port_lock = threading.Lock()
_next_port: int | None = None


def _worker_index() -> int | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        index = int(worker[2:])
        if _PORT_BASE + (index + 1) * _PORT_BLOCK <= 32768:
            return index
    return None


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts."""
    global _next_port
    index = _worker_index()
    if index is None:  # not under xdist: any port the kernel picks
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    low = _PORT_BASE + index * _PORT_BLOCK
    with _port_lock:
        if _next_port is None:
            _next_port = low + int.from_bytes(os.urandom(2), "big") % _PORT_BLOCK
        for _ in range(_PORT_BLOCK):
            port = _next_port
            _next_port = low + (_next_port + 1 - low) % _PORT_BLOCK
            if _bindable(port):
                return port
    raise RuntimeError(f"no free port in {low}-{low + _PORT_BLOCK - 1}")


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    parsed = make_url(url).set(drivername="postgresql")
    conn = await asyncpg.connect(parsed.render_as_string(hide_password=False))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def make_agents(
    conn: Any, organization_id: str, count: int, prefix: str
) -> list[AgentIdentity]:
    """`count` active action agents of capacity 4, created in the caller's transaction,
    as the engine sees them (for tests that drive the engine without HTTP)."""
    made = []
    for i in range(count):
        row, _ = await create_agent(
            conn,
            organization_id,
            name=f"{prefix}-{uuid.uuid4().hex[:8]}-{i}",
            type="action",
            labels={},
            capacity=4,
            actor="test",
        )
        made.append(
            AgentIdentity(row["id"], organization_id, row["name"], "action", {}, 4, "online")
        )
    return made


def on_database(url: str, work: Any) -> Any:
    """`await work(conn)` in a transaction on the database at `url`, outside any server
    (to look at or change what a test cannot reach through the API)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> Any:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                return await work(conn)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def api_token(orch: Orchestrator, role: str) -> str:
    """A token of `role` made straight in the database: any name, even a role the server
    does not know (which the API would refuse to hand out)."""
    import sqlalchemy as sa

    from stavily.security.access import create_api_token
    from stavily.store.models import organizations

    async def create(conn: Any) -> str:
        org = await conn.scalar(
            sa.select(organizations.c.id).where(organizations.c.name == "default")
        )
        name = f"{role}-{uuid.uuid4().hex[:8]}"
        _, secret = await create_api_token(conn, org, name=name, role=role, actor="test")
        return secret

    return on_database(orch.database_url, create)  # type: ignore[no-any-return]


@contextmanager
def fresh_database(backend: str, tmp: Path) -> Iterator[str]:
    """A new, empty database: a SQLite file, or a PostgreSQL database dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp / 'stavily.db'}"
        return
    assert PG_URL, "STAVILY_TEST_DATABASE_URL is not set"
    name = f"stavily_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(PG_URL, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(PG_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class Orchestrator:
    """A running orchestrator and an admin client for its private API."""

    url: str
    token: str
    database_url: str
    settings: Settings
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.clients.append(client)
        return client

    @property
    def api(self) -> httpx.Client:
        if not self.clients:
            self.client(self.token)
        return self.clients[0]

    def create_agent(self, name: str | None = None, **fields: Any) -> tuple[str, str]:
        body = {"name": name or f"agent-{uuid.uuid4().hex[:8]}", **fields}
        response = self.api.post("/api/v1/agents", json=body)
        assert response.status_code == 201, response.text
        return response.json()["agent_id"], response.json()["api_key"]

    def agent_client(self, key: str) -> httpx.Client:
        client = self.client(key)
        client.headers.update(
            {
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "Stavily-Agent/1.0.0",
            }
        )
        return client

    def apply(self, source: str) -> dict[str, Any]:
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

    def wait_for(self, execution_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            execution = self.execution(execution_id)
            if execution["status"] != "running" or time.monotonic() > deadline:
                return execution
            time.sleep(0.05)

    def close(self) -> None:
        for client in self.clients:
            client.close()


@contextmanager
def serve(database_url: str, data_dir: Path, **overrides: Any) -> Iterator[Orchestrator]:
    """Run the app with uvicorn in a thread: real HTTP on a loopback port."""
    port = free_port()
    settings = Settings(
        database_url=database_url,
        data_dir=data_dir,
        bootstrap_token=ADMIN_TOKEN,
        host="127.0.0.1",
        port=port,
        # tests hammer the API on purpose; rate limits have tests of their own
        **{
            "heartbeat_flush_interval": 0.05,
            "reaper_interval": 0.2,
            "heartbeat_rate_limit": "1000/second",
            "agent_rate_limit": "10000/second",
            "api_rate_limit": "1000000/second",
            "source_rate_limit": "1000000/second",
            "agent_source_rate_limit": "1000000/second",
            "failed_credential_limit": "1000000/minute",
            "webhook_rate_limit": "1000000/second",
            "login_rate_limit": "1000000/minute",
            "metrics_cache_seconds": 0,  # a scrape sees what the test just did
            # the engine's tests run plugins copied onto agents by hand; the registry's
            # tests (test_plugin_registry and others) set "refuse", the default
            "unregistered_plugins": "allow",
            **overrides,
        },
    )
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        loop="asyncio",
        http=HttpProtocol,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test orchestrator did not start")
        time.sleep(0.01)
    orchestrator = Orchestrator(f"http://127.0.0.1:{port}", ADMIN_TOKEN, database_url, settings)
    try:
        yield orchestrator
    finally:
        orchestrator.close()
        server.should_exit = True
        thread.join(timeout=15)


class SimAgent:
    """A simulated agent speaking the public API like an official agent."""

    def __init__(self, orch: Orchestrator, name: str | None = None, **fields: Any) -> None:
        self.orch = orch
        self.id, self.key = orch.create_agent(name, **fields)
        self.client = orch.agent_client(self.key)

    def poll(self, **params: Any) -> dict[str, Any] | None:
        response = self.client.get(f"/agents/v1/{self.id}/instructions", params=params)
        assert response.status_code == 200, response.text
        return response.json()["instruction"]  # type: ignore[no-any-return]

    def report(
        self,
        instruction: dict[str, Any],
        status: str = "completed",
        output: Any = None,
        error: str | None = None,
    ) -> httpx.Response:
        base = f"/agents/v1/{self.id}/instructions/{instruction['id']}"
        self.client.put(base, json={"status": "executing", "execution_log": ["started"]})
        body: dict[str, Any] = {"status": status}
        if status == "completed":
            body["result"] = {"execution_result": {"output_data": output}}
        else:
            body["error_message"] = error or "exit status 1"
        return self.client.post(f"{base}/result", json=body)

    def work(
        self, handler: Any = None, limit: int = 200, idle_polls: int = 1, **params: Any
    ) -> list[str]:
        """Answer instructions until `idle_polls` polls in a row find nothing.

        `handler(step, instruction)` returns (status, output) or (status, error); the
        default succeeds with {"step": step, "input": input_data}. Returns the steps seen.
        """
        seen: list[str] = []
        idle = 0
        while len(seen) < limit and idle < idle_polls:
            instruction = self.poll(**params)
            if instruction is None:
                idle += 1
                continue
            idle = 0
            step = instruction["correlation_id"].split("/", 1)[1]
            seen.append(step)
            status, value = (
                handler(step, instruction)
                if handler
                else ("completed", {"step": step, "input": instruction["input_data"]})
            )
            if status == "completed":
                answer = self.report(instruction, "completed", output=value)
            else:
                answer = self.report(instruction, "failed", error=value)
            assert answer.status_code == 200, answer.text
        return seen


Invoke = Callable[..., Result]


def cli_for(orchestrator: Orchestrator) -> Invoke:
    """Run `stavily ...` in-process with STAVILY_URL/STAVILY_TOKEN pointing at the
    orchestrator (plain, wide output); a user error ends in an exit code, never in an
    exception (a traceback), and one raised is raised here."""
    from stavily.cli.main import app

    runner = CliRunner()
    assert orchestrator.api  # made first: the first client the orchestrator makes is `api`
    logins = tempfile.mkdtemp(prefix="stavily-logins-")  # never the user's own (stavily login)

    def invoke(
        *args: str, env: dict[str, str | None] | None = None, input: str | None = None
    ) -> Result:
        result = runner.invoke(
            app,
            list(args),
            input=input,
            env={
                "STAVILY_URL": orchestrator.url,
                "STAVILY_TOKEN": orchestrator.token,
                "STAVILY_CONFIG_DIR": logins,
                "COLUMNS": "200",
                "NO_COLOR": "1",
                "FORCE_COLOR": None,
                "TTY_COMPATIBLE": None,
                **(env or {}),
            },
        )
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return invoke
