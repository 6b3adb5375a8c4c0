"""The `stavily` command itself: version, database upgrade, first start without a token."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from stavily import __version__
from tests.e2e.support import CLI, Processes, base_env, wait_healthy
from tests.harness import free_port

pytestmark = pytest.mark.e2e

_TOKEN_LINE = re.compile(r"Bootstrap admin API token \(shown once, store it now\): (\S+)")


def _stavily() -> list[str]:
    """The installed console script when it is on PATH, else the module."""
    script = shutil.which("stavily")
    return [script] if script else CLI


def _tables(url: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_version_prints_the_package_version() -> None:
    done = subprocess.run(
        [*_stavily(), "version"], env=base_env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stavily {__version__}"


def test_db_upgrade_on_a_fresh_database(backend: str, database_url: str) -> None:
    for _ in range(2):  # and a second time: nothing left to do is still success
        done = subprocess.run(
            [*_stavily(), "db", "upgrade", "--database-url", database_url],
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "database is up to date" in done.stdout
    tables = _tables(database_url)
    assert {"alembic_version", "agents", "executions", "audit_records"} <= tables, tables


def test_first_start_without_token_prints_one_bootstrap_token(
    backend: str, database_url: str, processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "fresh-data"  # does not exist yet
    env = {**base_env(), "STAVILY_DATA_DIR": str(data_dir)}
    if backend != "sqlite":
        env["STAVILY_DATABASE_URL"] = database_url
    # On SQLite the database is the default one, inside the data folder.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [*CLI, "serve", "--port", str(port)]

    first = processes.start("serve", args, env)
    wait_healthy(url, first)
    tokens = _TOKEN_LINE.findall(first.stderr())
    assert len(tokens) == 1, first.stderr()
    token = tokens[0]
    assert token not in first.stdout()
    if backend == "sqlite":
        assert (data_dir / "stavily.db").exists()

    answer = httpx.get(f"{url}/api/v1/agents", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"agents": []}
    refused = httpx.get(f"{url}/api/v1/agents", headers={"Authorization": "Bearer stv_wrong"})
    assert refused.status_code == 401, refused.text
    processes.stop(first)
    assert not first.running

    # A second start on the same data finds the token: none printed, the old one works.
    second = processes.start("serve", args, env)
    wait_healthy(url, second)
    assert "Bootstrap admin API token" not in second.stderr() + second.stdout()
    assert token not in second.stderr() + second.stdout()
    again = httpx.get(f"{url}/api/v1/agents", headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 200, again.text
