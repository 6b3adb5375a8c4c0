"""Rotating the server's secrets key on a running database: a server started with the new
key and the old one as previous opens everything the old key sealed, `stavily db rekey`
re-seals it while that server runs, and then the old key can go — a webhook still signs,
a store secret still reads, a queued step's sealed copy still reaches its agent. A server
still on the old key is refused once the new one is recorded."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from stavily.cli.main import app
from stavily.security.credentials import StartRefused
from stavily.security.sealing import Sealer, Unsealable, sealer
from stavily.store.db import Database
from stavily.store.models import audit_records, instructions, secret_keys, webhooks
from stavily.workflows.webhooks import sign
from tests.harness import Orchestrator, fresh_database, on_database, serve

OLD = "the-old-secrets-key-0123456789abcdef"
NEW = "the-new-secrets-key-fedcba9876543210"


def _sealed(url: str) -> list[tuple[str, str]]:
    """Every sealed value the database holds, with what it is sealed for."""

    async def read(conn: Any) -> list[tuple[str, str]]:
        found = []
        for row in await conn.execute(sa.select(secret_keys)):
            found.append((row.wrapped, f"secret-key/{row.organization_id}/{row.id}"))
        for row in await conn.execute(sa.select(webhooks)):
            found.append((row.secret, row.id))
        for row in await conn.execute(sa.select(instructions.c.context)):
            for name, ref in ((row.context or {}).get("secrets") or {}).items():
                if ref.get("sealed"):
                    found.append((ref["sealed"], f"secret-copy/{name}"))
        return found

    return on_database(url, read)  # type: ignore[no-any-return]


def _opens_with(key: str, sealed: list[tuple[str, str]]) -> int:
    opened = 0
    for value, owner in sealed:
        try:
            Sealer(key).open(value, owner)
            opened += 1
        except Unsealable:
            pass
    return opened


def _hook_accepts(orch: Orchestrator, hook: dict[str, Any]) -> int:
    """A signed delivery to the hook, at this server (each test server has its port)."""
    body = json.dumps({"id": uuid.uuid4().hex}).encode()
    headers = {"X-Stavily-Signature": sign(hook["secret"], body, int(time.time()))}
    return httpx.post(
        orch.url + urlsplit(hook["url"]).path, content=body, headers=headers
    ).status_code


def _rekey(url: str, data_dir: Path, **env: str) -> Any:
    return CliRunner().invoke(
        app,
        ["db", "rekey", "--database-url", url, "--data-dir", str(data_dir)],
        env={"STAVILY_SECRETS_KEY": NEW, **env},
    )


def test_the_secrets_key_rotates_online(backend: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    with fresh_database(backend, tmp_path) as url:
        with serve(url, tmp_path, secrets_key=OLD) as orch:
            hook = _setup(orch, tag)
        sealed = _sealed(url)
        assert len(sealed) == 3 and _opens_with(OLD, sealed) == 3

        # without the old key as previous, the new one is refused: nothing would open
        async def refused() -> None:
            db = Database(url)
            try:
                with pytest.raises(StartRefused, match="STAVILY_SECRETS_KEY_PREVIOUS"):
                    await sealer(db, NEW, tmp_path)
            finally:
                await db.dispose()

        asyncio.run(refused())

        with serve(url, tmp_path, secrets_key=NEW, secrets_key_previous=OLD) as orch:
            assert _hook_accepts(orch, hook) == 202  # the old key's webhook secret opens
            result = _rekey(url, tmp_path, STAVILY_SECRETS_KEY_PREVIOUS=OLD)
            assert result.exit_code == 0, result.output
            assert "1 data key(s), 1 webhook(s), 1 instruction(s)" in result.output
            assert "STAVILY_SECRETS_KEY_PREVIOUS can go" in result.output
            assert _hook_accepts(orch, hook) == 202  # re-sealed under the running server
            again = _rekey(url, tmp_path, STAVILY_SECRETS_KEY_PREVIOUS=OLD)
            assert "0 data key(s), 0 webhook(s), 0 instruction(s)" in again.output
        sealed = _sealed(url)  # with the copies of the runs the webhook started
        assert len(sealed) == 5
        assert _opens_with(NEW, sealed) == 5 and _opens_with(OLD, sealed) == 0

        # a replica still on the old key: refused, by serve's own check
        async def stale() -> None:
            db = Database(url)
            try:
                with pytest.raises(StartRefused, match="differs from the one"):
                    await sealer(db, OLD, tmp_path)
            finally:
                await db.dispose()

        asyncio.run(stale())
        wrong = _rekey(url, tmp_path, STAVILY_SECRETS_KEY="not-this-servers-key-0123456789ab")
        assert wrong.exit_code == 1 and "error: this server's secrets key" in wrong.output

        with serve(url, tmp_path, secrets_key=NEW) as orch:
            assert _hook_accepts(orch, hook) == 202
            _the_queued_step_gets_its_secret(orch, tag)
            actions = _audit_actions(orch)
            assert "secrets_key.rekeyed" in actions, actions


def _setup(orch: Orchestrator, tag: str) -> dict[str, Any]:
    """A store secret, a webhook, and a step queued with the secret's sealed copy (its
    pool names an agent that does not exist yet)."""
    assert orch.api.put("/api/v1/secrets/deploy", json={"value": f"v-{tag}"}).status_code == 201
    name = f"rekeyed-{tag}"
    orch.apply(
        f"name: {name}\nsecrets: {{token: {{store: deploy}}}}\n"
        f'agents: {{pools: [{{agent_regex: "^late-{tag}$"}}]}}\n'
        "actions: {steps: [{name: use, plugin: echo, config: {t: '{{ secrets.token }}'}}]}\n"
    )
    orch.run(name)
    created = orch.api.post("/api/v1/webhooks", json={"workflow": name})
    assert created.status_code == 201, created.text
    return created.json()  # type: ignore[no-any-return]


def _the_queued_step_gets_its_secret(orch: Orchestrator, tag: str) -> None:
    agent_id, key = orch.create_agent(f"late-{tag}")
    agent = orch.agent_client(key)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        poll = agent.get(f"/agents/v1/{agent_id}/instructions")
        assert poll.status_code == 200, poll.text
        instruction = poll.json()["instruction"]
        if instruction:
            assert instruction["plugin_configuration"] == {"t": f"v-{tag}"}, instruction
            return
        time.sleep(0.1)
    raise AssertionError("the queued step never reached its agent")


def _audit_actions(orch: Orchestrator) -> list[str]:
    async def read(conn: Any) -> list[str]:
        return list((await conn.execute(sa.select(audit_records.c.action))).scalars())

    return on_database(orch.database_url, read)  # type: ignore[no-any-return]
