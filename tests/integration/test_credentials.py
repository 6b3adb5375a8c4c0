"""Credentials across starts and replicas, over real HTTP on each database: bootstrap tokens
retired when the variable changes, the agent JWT key kept out of the database and the
same on every replica, revocations heard by every replica at once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from stavily.security import agent_tokens, bootstrap
from stavily.security.access import RETIRED_REASON, REVOKED_BOOTSTRAP, WEAK_BOOTSTRAP
from stavily.security.credentials import StartRefused, digest
from stavily.store import migrate
from stavily.store.db import Database
from stavily.store.models import api_tokens, server_keys
from stavily.timeutil import utcnow
from tests import harness
from tests.harness import ADMIN_TOKEN, PG_ONLY, Orchestrator, fresh_database, on_database, serve

OLD_TOKEN = "stv_old_bootstrap_token_0123456789abcdefghij"
SHARED_KEY = "shared-agent-jwt-key-0123456789abcdef0123456789"
CLI = [sys.executable, "-m", "stavily.cli.main"]


def _database(url: str, work: Any) -> Any:
    """`work(db)` on a migrated database, as the server's start sees it."""

    async def run() -> Any:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            return await work(db)
        finally:
            await db.dispose()

    return asyncio.run(run())


async def _unmigrated(url: str, work: Any) -> None:
    db = Database(url)
    try:
        await work(db)
    finally:
        await db.dispose()


def _server_keys(url: str) -> dict[str, str]:
    async def read(conn: Any) -> dict[str, str]:
        rows = await conn.execute(sa.select(server_keys.c.name, server_keys.c.value))
        return {row.name: row.value for row in rows}

    return on_database(url, read)  # type: ignore[no-any-return]


def _token_id(url: str, secret: str) -> str:
    async def read(conn: Any) -> str:
        query = sa.select(api_tokens.c.id).where(api_tokens.c.token_hash == digest(secret))
        return str(await conn.scalar(query))

    return on_database(url, read)  # type: ignore[no-any-return]


def _status(orch: Orchestrator, token: str) -> int:
    return orch.client(token).get("/api/v1/agents").status_code


def _audit(orch: Orchestrator, subject_id: str) -> list[dict[str, Any]]:
    response = orch.api.get("/api/v1/audit", params={"subject_id": subject_id})
    assert response.status_code == 200, response.text
    return response.json()["records"]  # type: ignore[no-any-return]


def _serve_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STAVILY_")}
    return subprocess.run(
        [*CLI, "serve", "--port", str(harness.free_port()), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- the bootstrap token -----------------------------------------------------------------------


def test_serve_refuses_a_weak_bootstrap_token_in_one_line(tmp_path: Path) -> None:
    done = _serve_cli({"STAVILY_DATA_DIR": str(tmp_path), "STAVILY_BOOTSTRAP_TOKEN": "a"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {WEAK_BOOTSTRAP}"]
    assert not (tmp_path / "stavily.db").exists()  # refused before anything started


def test_a_changed_bootstrap_token_retires_the_old_one(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fresh_database(backend, tmp_path) as url:
        monkeypatch.setattr(harness, "ADMIN_TOKEN", OLD_TOKEN)
        with serve(url, tmp_path) as first:
            assert _status(first, OLD_TOKEN) == 200
        old_id = _token_id(url, OLD_TOKEN)
        monkeypatch.setattr(harness, "ADMIN_TOKEN", ADMIN_TOKEN)
        with serve(url, tmp_path) as second:
            assert _status(second, ADMIN_TOKEN) == 200
            assert _status(second, OLD_TOKEN) == 401
            revoked = [r for r in _audit(second, old_id) if r["action"] == "api_token.revoked"]
            assert len(revoked) == 1
            assert revoked[0]["actor"] == "system"
            assert revoked[0]["details"] == {"reason": RETIRED_REASON}
        # A restart with the same variable (what quickstart does) changes nothing.
        with serve(url, tmp_path) as third:
            assert _status(third, ADMIN_TOKEN) == 200
            assert _status(third, OLD_TOKEN) == 401
            assert [r["action"] for r in _audit(third, old_id)].count("api_token.revoked") == 1
            new_id = _token_id(url, ADMIN_TOKEN)
            assert "api_token.revoked" not in [r["action"] for r in _audit(third, new_id)]

        # Going back to the retired token is refused: it may be why it was changed.
        async def back(db: Database) -> None:
            with pytest.raises(StartRefused) as refused:
                await bootstrap(db, OLD_TOKEN)
            assert refused.value.message == REVOKED_BOOTSTRAP

        _database(url, back)


def test_setting_a_bootstrap_token_retires_the_generated_one(backend: str, tmp_path: Path) -> None:
    with fresh_database(backend, tmp_path) as url:

        async def first_start(db: Database) -> str:
            _, generated = await bootstrap(db, None)  # no variable: one printed once
            assert generated
            return generated

        generated = _database(url, first_start)
        with serve(url, tmp_path) as orch:
            assert _status(orch, ADMIN_TOKEN) == 200
            assert _status(orch, generated) == 401
            records = _audit(orch, _token_id(url, generated))
            assert [r["details"] for r in records if r["action"] == "api_token.revoked"] == [
                {"reason": RETIRED_REASON}
            ]


def test_tokens_not_made_by_bootstrap_are_kept(backend: str, tmp_path: Path) -> None:
    """Only bootstrap's own tokens retire: one named "bootstrap" but created by someone
    else (the audit log says who) stays valid."""
    from stavily.security import create_api_token

    with fresh_database(backend, tmp_path) as url:

        async def setup(db: Database) -> str:
            org, _ = await bootstrap(db, OLD_TOKEN)
            async with db.write() as conn:
                _, secret = await create_api_token(
                    conn, org, name="bootstrap", role="viewer", actor="token:tok_someone"
                )
            return secret

        other = _database(url, setup)
        with serve(url, tmp_path) as orch:
            assert _status(orch, OLD_TOKEN) == 401
            assert _status(orch, other) == 200


# -- the agent JWT key -------------------------------------------------------------------------


def _agent_jwt(orch: Orchestrator) -> tuple[str, str, str]:
    agent_id, key = orch.create_agent()
    answer = orch.agent_client(key).post(f"/agents/v1/{agent_id}/token")
    assert answer.status_code == 200, answer.text
    return agent_id, key, answer.json()["token"]


def _poll(orch: Orchestrator, agent_id: str, bearer: str) -> httpx.Response:
    return orch.agent_client(bearer).get(f"/agents/v1/{agent_id}/instructions")


def test_the_jwt_key_is_a_file_of_the_data_dir_and_only_its_fingerprint_in_the_database(
    backend: str, tmp_path: Path
) -> None:
    with fresh_database(backend, tmp_path) as url:
        with serve(url, tmp_path) as orch:
            agent_id, _, token = _agent_jwt(orch)
            assert _poll(orch, agent_id, token).status_code == 200
        path = tmp_path / agent_tokens.KEY_FILE
        assert path.stat().st_mode & 0o777 == 0o600
        key = path.read_text().strip()
        stored = _server_keys(url)
        assert key not in stored.values() and agent_tokens.KEY_NAME not in stored
        assert stored[agent_tokens.FINGERPRINT_NAME] == hashlib.sha256(key.encode()).hexdigest()
        # JWTs issued before a restart still verify after it: the same file, the same key.
        with serve(url, tmp_path) as again:
            assert _poll(again, agent_id, token).status_code == 200
            assert agent_tokens.verify(key, token)["sub"] == agent_id


def test_the_clear_key_of_earlier_versions_is_deleted(backend: str, tmp_path: Path) -> None:
    """An 0009 database holds the key in clear (row agent-jwt-hs256): 0010 deletes it."""
    from alembic import command

    async def at_0009_with_a_clear_key(db: Database) -> None:
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda s: command.upgrade(migrate.alembic_config(s), "0009"))
            await conn.execute(
                server_keys.insert().values(
                    name=agent_tokens.KEY_NAME, value="c" * 64, created_at=utcnow()
                )
            )

    with fresh_database(backend, tmp_path) as url:

        async def run(db: Database) -> None:
            await at_0009_with_a_clear_key(db)
            await migrate.upgrade(db)

        asyncio.run(_unmigrated(url, run))
        assert agent_tokens.KEY_NAME not in _server_keys(url)


@PG_ONLY
def test_a_replica_with_another_key_refuses_to_start(pg_url: str, tmp_path: Path) -> None:
    with serve(pg_url, tmp_path / "a") as first:
        agent_id, _, token = _agent_jwt(first)
        # Another data dir, so another key file: refused, in one line, before it serves.
        env = {
            "STAVILY_DATABASE_URL": pg_url,
            "STAVILY_DATA_DIR": str(tmp_path / "b"),
            "STAVILY_BOOTSTRAP_TOKEN": ADMIN_TOKEN,
        }
        done = _serve_cli(env)
        assert done.returncode == 2, done.stderr
        *logged, line = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr and all("agent-jwt.key" in x for x in logged)
        assert line.startswith("error: this server's agent JWT key (from ")
        assert line.endswith(
            "differs from the one the other replicas use: "
            "set the same STAVILY_AGENT_JWT_KEY on every replica"
        )
        # In process too (the server's own start): StartRefused.

        async def start(db: Database) -> None:
            with pytest.raises(StartRefused, match="differs from the one the other replicas"):
                await agent_tokens.signing_key(db, SHARED_KEY, tmp_path / "c")

        _database(pg_url, start)
        assert _poll(first, agent_id, token).status_code == 200  # the first one unharmed


@PG_ONLY
def test_replicas_with_the_same_key_take_each_others_jwts(pg_url: str, tmp_path: Path) -> None:
    with (
        serve(pg_url, tmp_path / "a", agent_jwt_key=SHARED_KEY, secrets_key=SHARED_KEY) as first,
        serve(pg_url, tmp_path / "b", agent_jwt_key=SHARED_KEY, secrets_key=SHARED_KEY) as second,
    ):
        agent_id, _, token = _agent_jwt(first)
        assert _poll(second, agent_id, token).status_code == 200
    assert not (tmp_path / "a" / agent_tokens.KEY_FILE).exists()


# -- revocations reach every replica -----------------------------------------------------------


def _until(condition: Any, timeout: float = 3) -> float:
    """Seconds until `condition()` holds (AssertionError at the deadline)."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise AssertionError("not within the deadline")
        time.sleep(0.02)
    return time.monotonic() - began


@PG_ONLY
def test_a_revocation_on_one_replica_reaches_the_other_at_once(pg_url: str, tmp_path: Path) -> None:
    """With credentials trusted for five minutes, the other replica refuses the revoked
    agent within a moment: it heard of it."""
    trust = {
        "agent_jwt_key": SHARED_KEY,
        "secrets_key": SHARED_KEY,
        "credential_cache_seconds": 300,
    }
    with (
        serve(pg_url, tmp_path / "a", **trust) as first,
        serve(pg_url, tmp_path / "b", **trust) as second,
    ):
        rotated_id, old_key = first.create_agent()
        revoked_id, key = first.create_agent()
        assert _poll(second, revoked_id, key).status_code == 200  # now trusted there
        assert _poll(second, rotated_id, old_key).status_code == 200
        assert first.api.post(f"/api/v1/agents/{revoked_id}/revoke").status_code == 200
        assert _until(lambda: _poll(second, revoked_id, key).status_code == 403) < 2
        answer = first.api.post(f"/api/v1/agents/{rotated_id}/credentials")
        assert answer.status_code == 201, answer.text
        assert _until(lambda: _poll(second, rotated_id, old_key).status_code == 401) < 2
        new_key = answer.json()["api_key"]
        assert _poll(second, rotated_id, new_key).status_code == 200


@PG_ONLY
def test_a_retired_bootstrap_token_is_refused_by_running_replicas_at_once(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust = {
        "agent_jwt_key": SHARED_KEY,
        "secrets_key": SHARED_KEY,
        "credential_cache_seconds": 300,
    }
    monkeypatch.setattr(harness, "ADMIN_TOKEN", OLD_TOKEN)
    with serve(pg_url, tmp_path / "a", **trust) as running:
        assert _status(running, OLD_TOKEN) == 200  # trusted there for five minutes
        monkeypatch.setattr(harness, "ADMIN_TOKEN", ADMIN_TOKEN)
        with serve(pg_url, tmp_path / "b", **trust) as restarted:  # the variable changed
            assert _status(restarted, ADMIN_TOKEN) == 200
            assert _until(lambda: _status(running, OLD_TOKEN) == 401) < 2
            assert _status(running, ADMIN_TOKEN) == 200
