"""The secret store over real HTTP, on each database: write-only CRUD, one organization's
secrets invisible to another, rotation re-encrypting every value, rows that do not open
elsewhere; and a secret planted, used by a real agent's plugin, and then looked for,
plain and base64, in the database, the logs and every answer: it is nowhere."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from stavily.security import agent_tokens, sealing
from stavily.security.access import create_api_token
from stavily.security.sealing import Sealer
from stavily.security.store import SecretStore, SecretUnreadable
from stavily.store.db import Database
from stavily.store.models import metadata, organizations, secret_keys
from stavily.store.models import secrets as secret_rows
from stavily.timeutil import utcnow
from tests.e2e.support import CLI, Processes, base_env, workflow, write_plugin
from tests.harness import Orchestrator, api_token, cli_for, on_database


def _name() -> str:
    return f"s_{uuid.uuid4().hex[:8]}"


def _put(client: httpx.Client, name: str, value: str) -> httpx.Response:
    return client.put(f"/api/v1/secrets/{name}", json={"value": value})


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]  # type: ignore[no-any-return]


def _store(orch: Orchestrator) -> tuple[SecretStore, Database]:
    """The store as the server has it: its database, its secrets key (the data dir's)."""
    key = agent_tokens.load_key(None, orch.settings.data_dir, sealing.KEY_FILE, sealing.SETTING)
    db = Database(orch.database_url)
    return SecretStore(db, Sealer(key)), db


def _organization(orch: Orchestrator) -> str:
    async def default(conn: Any) -> str:
        query = sa.select(organizations.c.id).where(organizations.c.name == "default")
        return str(await conn.scalar(query))

    return on_database(orch.database_url, default)  # type: ignore[no-any-return]


def _read(orch: Orchestrator, organization_id: str, names: list[str]) -> dict[str, str]:
    store, db = _store(orch)

    async def read() -> dict[str, str]:
        try:
            async with db.read() as conn:
                found = await store.read(conn, organization_id, names)
                return {name: value for name, (_, value) in found.items()}
        finally:
            await db.dispose()

    return asyncio.run(read())


# -- the API -------------------------------------------------------------------------------


def test_write_only_crud(orchestrator: Orchestrator) -> None:
    api, name, value = orchestrator.api, _name(), f"crud-{uuid.uuid4().hex}"
    answers = []
    made = _put(api, name, value)
    assert made.status_code == 201, made.text
    assert made.json()["version"] == 1 and made.json()["created_by"] == made.json()["updated_by"]
    replaced = _put(api, name, value + "-2")
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    listed = api.get("/api/v1/secrets")
    shown = api.get(f"/api/v1/secrets/{name}")
    assert shown.status_code == 200 and shown.json()["name"] == name
    assert name in [s["name"] for s in listed.json()["secrets"]]
    answers += [made, replaced, listed, shown]
    assert _read(orchestrator, _organization(orchestrator), [name]) == {name: value + "-2"}

    records = api.get("/api/v1/audit", params={"action": "secret.*"}).json()["records"]
    mine = [r for r in records if r["details"].get("name") == name]
    assert sorted(r["action"] for r in mine) == ["secret.created", "secret.updated"]
    answers.append(api.get("/api/v1/audit"))
    for answer in answers:
        assert value not in answer.text

    assert api.delete(f"/api/v1/secrets/{name}").status_code == 204
    assert _problem(api.get(f"/api/v1/secrets/{name}"), 404)["code"] == "not_found"
    assert _problem(api.delete(f"/api/v1/secrets/{name}"), 404)["code"] == "not_found"
    deleted = api.get("/api/v1/audit", params={"action": "secret.deleted"}).json()["records"]
    assert any(r["details"]["name"] == name for r in deleted)


def test_bad_input_changes_nothing(orchestrator: Orchestrator) -> None:
    api, name = orchestrator.api, _name()
    for bad in ("-starts-badly", "has%20space", "x" * 101):
        assert _put(api, bad, "v").status_code == 422, bad
    assert _problem(_put(api, name, ""), 422)["code"] == "invalid_input"
    too_big = _problem(_put(api, name, "é" * 40_000), 422)  # 80,000 bytes
    assert too_big["details"][0]["path"] == "value"
    extra = api.put(f"/api/v1/secrets/{name}", json={"value": "v", "shown": True})
    assert extra.status_code == 422
    assert api.put(f"/api/v1/secrets/{name}", json={"value": 12}).status_code == 422
    assert _problem(api.get(f"/api/v1/secrets/{name}"), 404)["code"] == "not_found"


def test_roles(orchestrator: Orchestrator) -> None:
    name = _name()
    assert _put(orchestrator.api, name, "role-secret").status_code == 201
    operator = orchestrator.client(api_token(orchestrator, "operator"))
    viewer = orchestrator.client(api_token(orchestrator, "viewer"))
    assert operator.get(f"/api/v1/secrets/{name}").status_code == 200
    assert _problem(_put(operator, name, "x"), 403)["code"] == "forbidden"
    assert _problem(operator.post("/api/v1/secrets/rotate"), 403)["code"] == "forbidden"
    assert _problem(operator.delete(f"/api/v1/secrets/{name}"), 403)["code"] == "forbidden"
    assert _problem(viewer.get("/api/v1/secrets"), 403)["code"] == "forbidden"
    assert orchestrator.client().get("/api/v1/secrets").status_code == 401


def _other_organization(orch: Orchestrator) -> tuple[str, str]:
    """A second organization and an admin token of its (no API makes one yet)."""

    async def create(conn: Any) -> tuple[str, str]:
        org = f"org_{uuid.uuid4().hex[:12]}"
        await conn.execute(
            organizations.insert().values(id=org, name=f"other-{org}", created_at=utcnow())
        )
        _, secret = await create_api_token(conn, org, name="other", role="admin", actor="test")
        return org, secret

    return on_database(orch.database_url, create)  # type: ignore[no-any-return]


def test_another_organizations_secret_is_not_found(orchestrator: Orchestrator) -> None:
    name = _name()
    assert _put(orchestrator.api, name, "ours").status_code == 201
    other_org, token = _other_organization(orchestrator)
    other = orchestrator.client(token)
    assert _problem(other.get(f"/api/v1/secrets/{name}"), 404)["code"] == "not_found"
    assert _problem(other.delete(f"/api/v1/secrets/{name}"), 404)["code"] == "not_found"
    assert name not in [s["name"] for s in other.get("/api/v1/secrets").json()["secrets"]]
    # the same name there is its own secret, under its own data key
    theirs = _put(other, name, "theirs")
    assert theirs.status_code == 201, theirs.text
    ours = orchestrator.api.get(f"/api/v1/secrets/{name}").json()
    assert theirs.json()["key_id"] != ours["key_id"]
    assert _read(orchestrator, other_org, [name]) == {name: "theirs"}
    assert _read(orchestrator, _organization(orchestrator), [name]) == {name: "ours"}


def test_rotation_re_encrypts_every_value(orchestrator: Orchestrator) -> None:
    org_id, token = _other_organization(orchestrator)  # an organization of this test's own
    api = orchestrator.client(token)
    values = {_name(): f"rotated-{n}-{uuid.uuid4().hex}" for n in range(5)}
    for name, value in values.items():
        assert _put(api, name, value).status_code == 201
    before = {s["key_id"] for s in api.get("/api/v1/secrets").json()["secrets"]}
    assert len(before) == 1

    store, db = _store(orchestrator)

    async def rotate_in_batches() -> tuple[dict[str, Any], list[Any]]:
        try:
            rotated = await store.rotate(org_id, "test", batch=2)  # three batches
            async with db.read() as conn:
                keys = (
                    await conn.execute(
                        sa.select(secret_keys).where(secret_keys.c.organization_id == org_id)
                    )
                ).all()
            return rotated, keys
        finally:
            await db.dispose()

    rotated, keys = asyncio.run(rotate_in_batches())
    assert rotated["rewrapped"] == 5 and rotated["deleted_keys"] == 1
    assert [k.id for k in keys] == [rotated["key_id"]]  # the old key is gone, now unused
    after = api.get("/api/v1/secrets").json()["secrets"]
    assert {s["key_id"] for s in after} == {rotated["key_id"]}
    assert _read(orchestrator, org_id, list(values)) == values

    again = api.post("/api/v1/secrets/rotate")  # through the API, as the CLI does
    assert again.status_code == 200, again.text
    assert again.json()["rewrapped"] == 5 and again.json()["deleted_keys"] == 1
    assert _read(orchestrator, org_id, list(values)) == values
    records = api.get("/api/v1/audit", params={"action": "secret.key_rotated"}).json()
    assert any(r["subject_id"] == again.json()["key_id"] for r in records["records"])


def test_a_row_moved_elsewhere_does_not_open(orchestrator: Orchestrator) -> None:
    (org, token), (other_org, _) = (
        _other_organization(orchestrator),
        _other_organization(orchestrator),
    )
    api, first, second = orchestrator.client(token), _name(), _name()
    assert _put(api, first, "first-value").status_code == 201
    assert _put(api, second, "second-value").status_code == 201

    async def tamper(conn: Any) -> None:
        rows = secret_rows.c
        stolen = await conn.scalar(sa.select(rows.ciphertext).where(rows.name == first))
        await conn.execute(
            secret_rows.update().where(rows.name == second).values(ciphertext=stolen)
        )
        await conn.execute(
            secret_rows.update().where(rows.name == first).values(organization_id=other_org)
        )

    on_database(orchestrator.database_url, tamper)
    with pytest.raises(SecretUnreadable, match="altered or moved"):
        _read(orchestrator, org, [second])
    with pytest.raises(SecretUnreadable, match="not this organization's"):
        _read(orchestrator, other_org, [first])
    rotated = api.post("/api/v1/secrets/rotate")  # goes on past it, and says so
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["unreadable"] == [second] and rotated.json()["rewrapped"] == 0
    assert rotated.json()["deleted_keys"] == 0  # the old key is still used


def _apply(orch: Orchestrator, source: str) -> httpx.Response:
    return orch.api.post(
        "/api/v1/workflows", content=source, headers={"Content-Type": "application/yaml"}
    )


def test_a_step_whose_secret_is_not_stored_fails_saying_so(orchestrator: Orchestrator) -> None:
    name, missing = f"unstored-{uuid.uuid4().hex[:6]}", _name()
    config = '{token: "{{ secrets.token }}"}'
    orchestrator.apply(
        f"name: {name}\nsecrets: {{token: {{store: {missing}}}}}\n"
        f"actions: {{steps: [{{name: needs, plugin: echo, config: {config}}}]}}\n"
    )
    finished = orchestrator.wait_for(orchestrator.run(name)["id"])
    assert finished["status"] == "failed", finished
    error = finished["steps"][0]["error"]
    assert f"there is no secret '{missing}' in the secret store" in error, error

    bad = _apply(
        orchestrator,
        f"name: {name}-bad\nsecrets: {{t: {{store: 'no way'}}}}\n"
        "actions: {steps: [{name: a, plugin: echo}]}\n",
    )
    assert _problem(bad, 422)["details"][0]["path"].startswith("secrets.t.store")
    both = _apply(
        orchestrator,
        f"name: {name}-both\nsecrets: {{t: {{store: x, env: STAVILY_SECRET_X}}}}\n"
        "actions: {steps: [{name: a, plugin: echo}]}\n",
    )
    assert "one source" in json.dumps(_problem(both, 422)["details"])


def test_cli(orchestrator: Orchestrator, tmp_path: Path) -> None:
    cli, name, value = cli_for(orchestrator), _name(), f"cli-{uuid.uuid4().hex}"
    made = cli("secret", "set", name, input=value + "\n")
    assert made.exit_code == 0 and f"secret {name} stored" in made.output, made.output
    (tmp_path / "value").write_text(value + "-file\n")
    replaced = cli("secret", "set", name, "--value-file", str(tmp_path / "value"))
    assert replaced.exit_code == 0 and "replaced (version 2)" in replaced.output
    from_env = cli("secret", "set", name, "--from-env", "MY_VALUE", env={"MY_VALUE": value})
    assert from_env.exit_code == 0, from_env.output
    assert _read(orchestrator, _organization(orchestrator), [name]) == {name: value}
    listed = cli("secret", "list")
    shown = cli("secret", "show", name, "-o", "json")
    assert name in listed.output and json.loads(shown.stdout)["version"] == 3
    rotated = cli("secret", "rotate-key")
    assert rotated.exit_code == 0 and "re-encrypted" in rotated.output
    for result in (made, replaced, from_env, listed, shown, rotated):
        assert value not in result.output

    empty = cli("secret", "set", name, input="")
    assert empty.exit_code != 0 and "empty" in empty.output
    unset = cli("secret", "set", name, "--from-env", "NOT_SET_ANYWHERE")
    assert unset.exit_code != 0 and "not set" in unset.output
    both = cli("secret", "set", name, "--from-env", "X", "--value-file", "f")
    assert both.exit_code != 0 and "not both" in both.output
    bad = cli("secret", "set", "no way", input="v")
    assert bad.exit_code != 0 and "not a secret name" in bad.output
    assert cli("secret", "delete", name, "--yes").exit_code == 0
    gone = cli("secret", "show", name)
    assert gone.exit_code != 0 and "no secret" in gone.output


# -- a planted secret is nowhere -------------------------------------------------------------

SECRET = f"planted-Zq9{uuid.uuid4().hex}-end"
# Prints its token, plain and base64, to its output and its log; and its digest, to show
# it got the value itself.
ECHO_PLUGIN = """
token = config["token"]
encoded = __import__("base64").b64encode(token.encode()).decode()
print("the plugin's log: " + token + " " + encoded, file=sys.stderr)
json.dump(
    {
        "echo": token,
        "base64": encoded,
        "header": config["header"],
        "from_environment": os.environ.get("API_TOKEN"),
        "sha256": __import__("hashlib").sha256(token.encode()).hexdigest(),
    },
    sys.stdout,
)
"""


def _forms(value: str) -> list[str]:
    raw = value.encode()
    return [
        value,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
    ]


def _found(text: str | bytes, where: str) -> list[str]:
    data = text.encode(errors="replace") if isinstance(text, str) else text
    return [f"{where}: {form!r}" for form in _forms(SECRET) if form.encode() in data]


async def _database_text(url: str) -> str:
    """Every row of every table, as the database itself prints it."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            parts = []
            for table in metadata.sorted_tables:
                rows = await conn.execute(sa.text(f'SELECT t::text FROM "{table.name}" t'))
                parts.extend(str(r[0]) for r in rows)
            return "\n".join(parts)
    finally:
        await engine.dispose()


def _agent(orch: Orchestrator, processes: Processes, plugins: Path) -> tuple[Any, str]:
    """A real `stavily agent run`, its plugins in `plugins`: (its process, its name)."""
    name = f"secret-agent-{uuid.uuid4().hex[:6]}"
    agent_id, key = orch.create_agent(name)
    args = [*CLI, "agent", "run", "--url", orch.url, "--agent-id", agent_id, "--token", key]
    args += ["--plugins-dir", str(plugins), "--heartbeat-interval", "1", "--poll-wait", "2"]
    return processes.start("agent", args, base_env()), name


def test_a_planted_secret_is_nowhere(
    orchestrator: Orchestrator, backend: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The server runs in this process: its log lines are what capfd captures."""
    api, secret_name = orchestrator.api, _name()
    assert _found(f"x{SECRET}x", "a self-check") != []
    answers: list[httpx.Response] = []
    stored = _put(api, secret_name, SECRET)
    assert stored.status_code == 201, stored.text
    answers.append(stored)

    plugins = tmp_path / "plugins"
    write_plugin(plugins, "echo-secret", ECHO_PLUGIN)
    processes = Processes(tmp_path / "processes")
    try:
        agent, agent_name = _agent(orchestrator, processes, plugins)
        config = {
            "token": "{{ secrets.token }}",
            "header": "Bearer {{ secrets.token }}",
            "environment": {"API_TOKEN": "{{ secrets.token }}"},
        }
        name = f"planted-{uuid.uuid4().hex[:6]}"
        definition = workflow(
            name,
            agent_name,
            [{"name": "echo", "plugin": "echo-secret", "config": config}],
            secrets={"token": {"store": secret_name}},
        )
        applied = api.post(
            "/api/v1/workflows",
            content=json.dumps(definition),
            headers={"Content-Type": "application/json"},
        )
        assert applied.status_code == 201, applied.text
        run = api.post(f"/api/v1/workflows/{name}/runs", json={"inputs": {}})
        assert run.status_code == 201, run.text
        execution_id = run.json()["id"]
        finished = orchestrator.wait_for(execution_id)
        assert finished["status"] == "succeeded", (finished, processes.report())
    finally:
        processes.close()

    step = next(s for s in finished["steps"] if s["name"] == "echo")
    output = step["result"]
    assert output["sha256"] == hashlib.sha256(SECRET.encode()).hexdigest()  # it got it
    assert output["echo"] == output["from_environment"] == "***"
    # (what is left of an encoding at its edges depends on the bytes beside the value too)
    assert output["base64"].startswith("***") and len(output["base64"]) <= 6
    assert output["header"] == "Bearer ***"

    logs = api.get(f"/api/v1/executions/{execution_id}/logs")
    assert "***" in logs.text  # the plugin's log came back, masked
    audit = api.get("/api/v1/audit", params={"action": "secret.read"})
    read = [r for r in audit.json()["records"] if r["details"].get("execution_id") == execution_id]
    assert [(r["details"]["name"], r["details"]["step"]) for r in read] == [(secret_name, "echo")]
    answers += [
        applied,
        run,
        logs,
        audit,
        api.get(f"/api/v1/executions/{execution_id}"),
        api.get("/api/v1/executions"),
        api.get("/api/v1/audit"),
        api.get("/api/v1/secrets"),
        api.get(f"/api/v1/secrets/{secret_name}"),
        api.get(f"/api/v1/workflows/{name}"),
    ]

    leaks = []
    for answer in answers:
        assert answer.status_code < 300, answer.text
        leaks += _found(answer.content, f"{answer.request.method} {answer.request.url.path}")
    server_log = capfd.readouterr()
    assert f"/api/v1/secrets/{secret_name}" in server_log.out + server_log.err  # it is there
    leaks += _found(server_log.out + server_log.err, "the server's log")
    for process in processes.started:
        leaks += _found(process.stdout_path.read_bytes(), f"{process.name} stdout")
        leaks += _found(process.stderr_path.read_bytes(), f"{process.name} stderr")
    if backend == "sqlite":
        database = Path(orchestrator.database_url.split("///", 1)[1])
        for path in database.parent.glob(database.name + "*"):  # and its -wal, -shm
            leaks += _found(path.read_bytes(), path.name)
    else:
        leaks += _found(asyncio.run(_database_text(orchestrator.database_url)), "the database")
    assert leaks == []
