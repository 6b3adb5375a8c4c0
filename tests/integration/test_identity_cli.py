"""`stavily login|logout|whoami|user|token|role` against a real orchestrator."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

from tests.harness import Invoke, Orchestrator

PASSWORD = "a long enough password"


def test_login_saves_a_session_that_commands_use_until_logout(
    orchestrator: Orchestrator, cli: Invoke, tmp_path: Path
) -> None:
    username = f"cli-{uuid.uuid4().hex[:8]}"
    added = cli(
        "user", "add", username, "--role", "operator", "--password-stdin", input=f"{PASSWORD}\n"
    )
    assert added.exit_code == 0, added.stderr
    user_id = next(
        u["id"]
        for u in json.loads(cli("user", "list", "-o", "json").stdout)["users"]
        if u["username"] == username
    )
    mine = {"STAVILY_TOKEN": None, "STAVILY_CONFIG_DIR": str(tmp_path)}
    wrong = cli("login", "-u", username, "--password-stdin", input="not the password!\n", env=mine)
    assert wrong.exit_code == 5 and "wrong username or password" in wrong.stderr
    assert not (tmp_path / "logins.json").exists()

    done = cli("login", "-u", username, "--password-stdin", input=f"{PASSWORD}\n", env=mine)
    assert done.exit_code == 0, done.stderr
    assert f"as {username} (operator in default)" in done.stdout
    saved = tmp_path / "logins.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())[orchestrator.url]["username"] == username

    me = cli("whoami", "-o", "json", env=mine)
    assert me.exit_code == 0 and json.loads(me.stdout)["user"]["id"] == user_id
    assert cli("workflow", "list", env=mine).exit_code == 0
    refused = cli("user", "list", env=mine)  # an operator's session: not theirs to see
    assert refused.exit_code == 5 and "may not do 'users:read'" in refused.stderr

    assert cli("logout", env=mine).exit_code == 0
    assert orchestrator.url not in json.loads(saved.read_text())
    after = cli("workflow", "list", env=mine)
    assert after.exit_code == 5 and "not logged in: run stavily login" in after.stderr
    assert "not logged in" in cli("logout", env=mine).stdout


def test_tokens_users_and_roles_from_the_cli(cli: Invoke) -> None:
    made = cli("token", "create", "ci", "--role", "viewer", "--expires", "30d", "-o", "json")
    assert made.exit_code == 0, made.stderr
    token = json.loads(made.stdout)
    assert token["token"].startswith("stv_") and token["expires_at"]
    listed = cli("token", "list")
    assert token["id"] in listed.stdout and token["token"] not in listed.stdout
    viewer = cli("whoami", env={"STAVILY_TOKEN": token["token"]})
    assert viewer.exit_code == 0 and viewer.stdout.startswith(f"token {token['id']}: viewer")
    assert cli("token", "revoke", token["id"]).exit_code == 0
    assert cli("whoami", env={"STAVILY_TOKEN": token["token"]}).exit_code == 5

    bad_expiry = cli("token", "create", "ci", "--role", "viewer", "--expires", "2030-01-01T00:00")
    assert bad_expiry.exit_code == 2 and "names no UTC offset" in bad_expiry.stderr

    role = f"runner-{uuid.uuid4().hex[:6]}"
    assert cli("role", "set", role, "executions:run", "executions:read").exit_code == 0
    unknown = cli("role", "set", role, "executions:fly")
    assert unknown.exit_code == 2 and "no such permission: executions:fly" in unknown.stderr
    username = f"cli-{uuid.uuid4().hex[:8]}"
    added = cli("user", "add", username, "--role", role, "--password-stdin", input=f"{PASSWORD}\n")
    assert added.exit_code == 0, added.stderr
    held = cli("role", "delete", role)
    assert held.exit_code == 4 and "held by 1 user(s)" in held.stderr
    user_id = next(
        u["id"]
        for u in json.loads(cli("user", "list", "-o", "json").stdout)["users"]
        if u["username"] == username
    )
    changed = cli("user", "set", user_id, "--role", "viewer", "--disable", "-o", "json")
    assert changed.exit_code == 0 and json.loads(changed.stdout)["disabled"] is True
    assert cli("role", "delete", role).exit_code == 0
    assert role not in cli("role", "list").stdout
    assert cli("user", "remove", user_id).exit_code == 0
    gone = cli("user", "remove", user_id)
    assert gone.exit_code == 3
    nothing = cli("user", "set", user_id)
    assert nothing.exit_code == 2 and "nothing to change" in nothing.stderr


def test_organizations_from_the_cli(cli: Invoke) -> None:
    name = f"cli-org-{uuid.uuid4().hex[:6]}"
    made = cli("org", "create", name, "-o", "json")
    assert made.exit_code == 0, made.stderr
    org = json.loads(made.stdout)
    theirs = {"STAVILY_TOKEN": org["admin_token"]}
    listed = cli("org", "list", env=theirs)
    assert listed.exit_code == 0 and name in listed.stdout and "default" not in listed.stdout
    assert cli("org", "rename", org["id"], f"{name}-x", env=theirs).exit_code == 0
    assert f"{name}-x" in cli("org", "list", env=theirs).stdout
    assert cli("org", "rename", org["id"], "whatever").exit_code == 3  # not the caller's
    bad = cli("org", "create", "Not OK")
    assert bad.exit_code == 2 and "organization's name" in bad.stderr
    assert cli("org", "create", name + "-x").exit_code == 4
