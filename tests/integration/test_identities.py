"""Users, logins and API tokens over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from stavily.store.models import api_tokens, users
from tests.harness import Orchestrator, api_token, fresh_database, on_database, serve

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def orch(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp(f"identities-{backend}")
    with (
        fresh_database(backend, tmp) as url,
        serve(
            url,
            tmp,
            credential_cache_seconds=0,  # every request looks its token up: changes show at once
            login_lockout_after=3,
            login_lockout_seconds=1,
            login_rate_limit="10000/minute",  # rate limits have tests of their own
            failed_credential_limit="10000/minute",
        ) as running,
    ):
        yield running


def _name(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _user(orch: Orchestrator, role: str = "viewer", **extra: Any) -> tuple[str, str]:
    username = _name()
    answer = orch.api.post(
        "/api/v1/users", json={"username": username, "password": PASSWORD, "role": role, **extra}
    )
    assert answer.status_code == 201, answer.text
    return username, answer.json()["id"]


def _login(orch: Orchestrator, username: str, password: str = PASSWORD) -> httpx.Response:
    return orch.client().post("/api/v1/login", json={"username": username, "password": password})


def _session(orch: Orchestrator, username: str) -> httpx.Client:
    answer = _login(orch, username)
    assert answer.status_code == 200, answer.text
    return orch.client(answer.json()["token"])


def _audit(orch: Orchestrator, action: str) -> list[dict[str, Any]]:
    answer = orch.api.get("/api/v1/audit", params={"action": action, "limit": 500})
    assert answer.status_code == 200, answer.text
    return answer.json()["records"]  # type: ignore[no-any-return]


# -- logins ----------------------------------------------------------------------------------


def test_a_user_logs_in_acts_with_their_role_and_logs_out(orch: Orchestrator) -> None:
    username, user_id = _user(orch, "operator")
    login = _login(orch, username.upper())  # names are not case-sensitive
    assert login.status_code == 200, login.text
    body = login.json()
    assert body["user"] == {"id": user_id, "username": username}
    assert body["role"] == "operator" and body["organization"]["name"] == "default"
    assert body["token"].startswith("stv_") and body["session_id"].startswith("ses_")
    session = orch.client(body["token"])

    me = session.get("/api/v1/me").json()
    assert me["kind"] == "session" and me["user"]["username"] == username
    assert "workflows:write" in me["permissions"] and "users:write" not in me["permissions"]
    assert session.get("/api/v1/workflows").status_code == 200
    assert session.get("/api/v1/users").status_code == 403  # not an operator's
    assert session.get("/api/v1/audit").status_code == 403

    logins = [r for r in _audit(orch, "user.login") if r["subject_id"] == user_id]
    assert logins and logins[0]["actor"] == f"user:{username}"

    assert session.post("/api/v1/logout").status_code == 204
    refused = session.get("/api/v1/me")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_wrong_names_and_passwords_are_refused_alike(orch: Orchestrator) -> None:
    username, _ = _user(orch)
    wrong_password = _login(orch, username, "not the password at all")
    no_such_user = _login(orch, _name("nobody"), "not the password at all")
    for answer in (wrong_password, no_such_user):
        assert answer.status_code == 401
        assert answer.json()["error"]["message"] == "wrong username or password"
    malformed = orch.client().post("/api/v1/login", json={"username": username})
    assert malformed.status_code == 422
    assert orch.client().post("/api/v1/login", content=b"{nope").status_code == 422


def test_failed_logins_lock_the_user_out_with_back_off_and_are_audited(
    orch: Orchestrator,
) -> None:
    username, user_id = _user(orch)
    for _ in range(3):
        assert _login(orch, username, "wrong password, again").status_code == 401
    locked = _login(orch, username)  # even the right password, while locked
    assert locked.status_code == 429
    assert int(locked.headers["Retry-After"]) >= 1
    failed = [r for r in _audit(orch, "user.login_failed") if r["subject_id"] == user_id]
    assert len(failed) == 3 and "locked_until" in failed[0]["details"]
    time.sleep(1.1)
    # one more failure after the lock: locked again, for twice as long
    assert _login(orch, username, "wrong password, again").status_code == 401
    again = _login(orch, username)
    assert again.status_code == 429 and int(again.headers["Retry-After"]) >= 2
    time.sleep(2.1)
    assert _login(orch, username).status_code == 200  # and the count starts again
    row = on_database(
        orch.database_url,
        lambda conn: _first(conn, sa.select(users.c.failed_logins).where(users.c.id == user_id)),
    )
    assert row.failed_logins == 0


async def _first(conn: Any, query: Any) -> Any:
    return (await conn.execute(query)).first()


def test_a_session_ends_when_unused_for_too_long(orch: Orchestrator) -> None:
    username, _ = _user(orch)
    session = _session(orch, username)
    assert session.get("/api/v1/me").status_code == 200
    token_id = session.get("/api/v1/me").json()["token_id"]
    idle = orch.settings.session_idle_seconds
    then = datetime.now(UTC) - timedelta(seconds=idle + 5)

    async def age(conn: Any) -> None:
        await conn.execute(
            api_tokens.update()
            .where(api_tokens.c.id == token_id)
            .values(last_used_at=then, created_at=then)
        )

    on_database(orch.database_url, age)
    refused = session.get("/api/v1/me")
    assert (
        refused.status_code == 401 and "unused for too long" in refused.json()["error"]["message"]
    )


def test_a_changed_password_ends_the_other_sessions(orch: Orchestrator) -> None:
    username, _ = _user(orch)
    first, second = _session(orch, username), _session(orch, username)
    wrong = first.put(
        "/api/v1/me/password",
        json={"current_password": "not it at all!", "new_password": "another long password"},
    )
    assert wrong.status_code == 403
    short = first.put(
        "/api/v1/me/password", json={"current_password": PASSWORD, "new_password": "short"}
    )
    assert short.status_code == 422
    changed = first.put(
        "/api/v1/me/password",
        json={"current_password": PASSWORD, "new_password": "another long password"},
    )
    assert changed.status_code == 204, changed.text
    assert first.get("/api/v1/me").status_code == 200  # the session that changed it stays
    assert second.get("/api/v1/me").status_code == 401
    assert _login(orch, username).status_code == 401
    assert _login(orch, username, "another long password").status_code == 200


# -- users -----------------------------------------------------------------------------------


def test_users_are_listed_changed_disabled_and_removed(orch: Orchestrator) -> None:
    username, user_id = _user(orch)
    listed = orch.api.get("/api/v1/users").json()["users"]
    mine = next(u for u in listed if u["id"] == user_id)
    assert mine["username"] == username and mine["role"] == "viewer" and not mine["disabled"]
    assert "password_hash" not in mine

    session = _session(orch, username)
    assert session.post("/api/v1/workflows", content="name: x").status_code == 403
    promoted = orch.api.patch(f"/api/v1/users/{user_id}", json={"role": "operator"})
    assert promoted.status_code == 200 and promoted.json()["role"] == "operator"
    assert "workflows:write" in session.get("/api/v1/me").json()["permissions"]  # at once

    disabled = orch.api.patch(f"/api/v1/users/{user_id}", json={"disabled": True})
    assert disabled.status_code == 200 and disabled.json()["disabled"]
    assert session.get("/api/v1/me").status_code == 401
    assert _login(orch, username).json()["error"]["message"] == "this user is disabled"
    orch.api.patch(f"/api/v1/users/{user_id}", json={"disabled": False})

    token = _session(orch, username).post("/api/v1/tokens", json={"name": "ci", "role": "viewer"})
    assert token.status_code == 403  # an operator may not make tokens
    assert orch.api.delete(f"/api/v1/users/{user_id}").status_code == 204
    assert orch.api.get(f"/api/v1/users/{user_id}").status_code == 404
    assert _login(orch, username).status_code == 401  # in no organization: disabled
    assert orch.api.delete(f"/api/v1/users/{user_id}").status_code == 404


def test_bad_users_are_refused_and_nothing_is_half_made(orch: Orchestrator) -> None:
    before = len(orch.api.get("/api/v1/users").json()["users"])
    cases = [
        ({"username": "x", "password": PASSWORD, "role": "viewer"}, 422),  # too short a name
        ({"username": "Bad Name!", "password": PASSWORD, "role": "viewer"}, 422),
        ({"username": _name(), "password": "short", "role": "viewer"}, 422),
        ({"username": _name(), "password": PASSWORD, "role": "no-such-role"}, 422),
        ({"username": _name(), "role": "viewer"}, 422),  # a new user needs a password
        ({"username": _name(), "password": PASSWORD, "role": "viewer", "admin": True}, 422),
    ]
    for body, status in cases:
        answer = orch.api.post("/api/v1/users", json=body)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["error"]["code"] == "invalid_input"
    username, _ = _user(orch)
    again = orch.api.post(
        "/api/v1/users", json={"username": username, "password": PASSWORD, "role": "viewer"}
    )
    assert again.status_code == 409
    assert len(orch.api.get("/api/v1/users").json()["users"]) == before + 1


def test_no_one_hands_out_more_than_they_may_do(orch: Orchestrator) -> None:
    """An admin may give every role; a token made with `tokens:write` and `users:write`
    but without audit:read may give neither a role with it nor make an admin."""
    put = orch.api.put(
        "/api/v1/roles/user-admin",
        json={"permissions": ["users:read", "users:write", "tokens:write", "tokens:read"]},
    )
    assert put.status_code in (200, 201), put.text
    made = orch.api.post("/api/v1/tokens", json={"name": "delegate", "role": "user-admin"})
    assert made.status_code == 201, made.text
    delegate = orch.client(made.json()["token"])
    for path, body in (
        ("/api/v1/users", {"username": _name(), "password": PASSWORD, "role": "admin"}),
        ("/api/v1/tokens", {"name": "up", "role": "auditor"}),
    ):
        refused = delegate.post(path, json=body)
        assert refused.status_code == 403, refused.text
        assert "grants what you may not do" in refused.json()["error"]["message"]
    own = delegate.post("/api/v1/tokens", json={"name": "same", "role": "user-admin"})
    assert own.status_code == 201


# -- tokens ----------------------------------------------------------------------------------


def test_api_tokens_are_shown_once_listed_used_and_revoked(orch: Orchestrator) -> None:
    made = orch.api.post("/api/v1/tokens", json={"name": "deploy bot", "role": "operator"})
    assert made.status_code == 201, made.text
    token = made.json()
    secret, token_id = token.pop("token"), token["id"]
    assert secret.startswith("stv_") and token["last_used_at"] is None
    listed = orch.api.get("/api/v1/tokens", params={"kind": "api"}).json()["tokens"]
    seen = next(t for t in listed if t["id"] == token_id)
    assert seen["name"] == "deploy bot" and "token" not in seen
    assert secret not in orch.api.get("/api/v1/tokens").text

    bot = orch.client(secret)
    assert bot.get("/api/v1/workflows").status_code == 200
    assert orch.api.get(f"/api/v1/tokens/{token_id}").json()["last_used_at"] is not None

    assert orch.api.delete(f"/api/v1/tokens/{token_id}").status_code == 204
    assert bot.get("/api/v1/workflows").status_code == 401
    assert orch.api.delete(f"/api/v1/tokens/{token_id}").status_code == 204  # again: no change
    revoked = [r for r in _audit(orch, "api_token.revoked") if r["subject_id"] == token_id]
    assert len(revoked) == 1
    assert all(t["id"] != token_id for t in orch.api.get("/api/v1/tokens").json()["tokens"])
    assert any(
        t["id"] == token_id
        for t in orch.api.get("/api/v1/tokens", params={"revoked": True}).json()["tokens"]
    )
    assert orch.api.delete("/api/v1/tokens/tok_nope").status_code == 404


def test_an_expired_token_is_refused(orch: Orchestrator) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1)
    made = orch.api.post(
        "/api/v1/tokens",
        json={"name": "short-lived", "role": "viewer", "expires_at": soon.isoformat()},
    )
    assert made.status_code == 201, made.text
    client = orch.client(made.json()["token"])
    assert client.get("/api/v1/workflows").status_code == 200
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)
    refused = client.get("/api/v1/workflows")
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "token expired"
    past = orch.api.post(
        "/api/v1/tokens",
        json={"name": "x", "role": "viewer", "expires_at": "2020-01-01T00:00:00Z"},
    )
    assert past.status_code == 422
    naive = orch.api.post(
        "/api/v1/tokens", json={"name": "x", "role": "viewer", "expires_at": "2030-01-01T00:00"}
    )
    assert naive.status_code == 422  # a time without its offset is ambiguous


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer stv_forged_" + "a" * 40,
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",  # a JWT with alg none
        "Bearer " + "x" * 5000,
    ],
)
def test_forged_and_malformed_credentials_are_refused(
    orch: Orchestrator, authorization: str
) -> None:
    answer = httpx.get(f"{orch.url}/api/v1/workflows", headers={"Authorization": authorization})
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_a_users_token_does_no_more_than_the_user_may(orch: Orchestrator, tmp_path: Path) -> None:
    username, user_id = _user(orch, "admin")
    session = _session(orch, username)
    made = session.post("/api/v1/tokens", json={"name": "mine", "role": "operator"})
    assert made.status_code == 201 and made.json()["user_id"] == user_id
    token = orch.client(made.json()["token"])
    assert token.get("/api/v1/executions").status_code == 200
    orch.api.patch(f"/api/v1/users/{user_id}", json={"role": "auditor"})
    # the token says operator, its user is now an auditor: only what both may
    assert token.post("/api/v1/workflows/x/runs", json={}).status_code == 403
    assert token.get("/api/v1/audit").status_code == 403
    assert token.get("/api/v1/executions").status_code == 200
    orch.api.delete(f"/api/v1/users/{user_id}")
    assert token.get("/api/v1/executions").status_code == 401


def test_every_refused_credential_is_audited_as_a_denied_attempt(orch: Orchestrator) -> None:
    """Forged, malformed, revoked and expired tokens, a session after its logout, and
    agent JWTs with `alg: none` or another key: each a 401 and an `auth.denied` record
    naming its source and reason (in the token's organization when its row was found)."""
    address = f"2001:db8:{uuid.uuid4().hex[:4]}::1"  # this test's own source
    revoked = orch.api.post("/api/v1/tokens", json={"name": "gone", "role": "viewer"}).json()
    assert orch.api.delete(f"/api/v1/tokens/{revoked['id']}").status_code == 204
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    expired = orch.api.post(
        "/api/v1/tokens", json={"name": "brief", "role": "viewer", "expires_at": soon}
    ).json()
    username, _ = _user(orch)
    session = _login(orch, username).json()["token"]
    assert orch.client(session).post("/api/v1/logout").status_code == 204
    agent_id, _ = orch.create_agent(_name())
    claims = {"sub": agent_id, "typ": "agent", "iat": int(time.time()), "exp": 2**31}
    wrong_key = jwt.encode(claims, "not-the-servers-key-0123456789abcdef", algorithm="HS256")
    unsigned = jwt.encode(claims, None, algorithm="none")
    time.sleep(max(0.0, (datetime.fromisoformat(soon) - datetime.now(UTC)).total_seconds()))

    api = [f"stv_forged_{'a' * 40}", "x" * 300, revoked["token"], expired["token"], session]
    for token in api:
        answer = httpx.get(
            f"{orch.url}/api/v1/workflows",
            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": address},
        )
        assert answer.status_code == 401, answer.text
    for token in (wrong_key, unsigned):
        answer = httpx.post(
            f"{orch.url}/agents/v1/{agent_id}/heartbeat",
            json={"agent_id": agent_id, "status": "online"},
            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": address},
        )
        assert answer.status_code == 401, answer.text

    denied = [r for r in _audit(orch, "auth.denied") if r["details"]["source"] == address]
    by_kind: dict[str, list[str]] = {}
    for record in denied:
        by_kind.setdefault(record["subject_type"], []).append(record["details"]["reason"])
    reasons = by_kind.get("api_token", [])
    # one record per reason and token: the forged and the malformed share theirs
    assert sorted(reasons) == ["token expired"] + ["unknown or revoked token"] * 3, denied
    subjects = {r["subject_id"] for r in denied if r["subject_type"] == "api_token"}
    assert {revoked["id"], expired["id"], "unknown"} <= subjects, subjects
    agent_reasons = by_kind.get("agent_credential", [])
    assert len(agent_reasons) == 2, denied
    assert all(r.startswith("invalid agent token") for r in agent_reasons), agent_reasons
    assert all(r["actor"] == "anonymous" for r in denied)
    # the same refusal again within the period adds no record (a flood fills no log)
    httpx.get(
        f"{orch.url}/api/v1/workflows",
        headers={"Authorization": f"Bearer {api[0]}", "X-Forwarded-For": address},
    )
    again = [r for r in _audit(orch, "auth.denied") if r["details"]["source"] == address]
    assert len(again) == len(denied)


def test_no_one_changes_a_user_or_token_that_may_do_more_than_they(orch: Orchestrator) -> None:
    """A help desk (users:write, tokens:write) resets the password of a user who may do
    no more than it, but not an admin's: it cannot reset, disable, demote or remove an
    admin, nor revoke their tokens, nor redefine or delete a role granting more."""
    desk = f"desk-{uuid.uuid4().hex[:6]}"
    granted = ["users:read", "users:write", "tokens:read", "tokens:write", "roles:write"]
    assert orch.api.put(f"/api/v1/roles/{desk}", json={"permissions": granted}).status_code == 201
    # a role that grants nothing is a role all the same: it can be given
    empty = f"empty-{uuid.uuid4().hex[:6]}"
    assert orch.api.put(f"/api/v1/roles/{empty}", json={"permissions": []}).status_code == 201
    _, plain_id = _user(orch, empty)
    helper = orch.client(api_token(orch, desk))
    _, admin_id = _user(orch, "admin")
    for change in (
        {"password": "a new password, long enough"},
        {"disabled": True},
        {"role": "viewer"},
    ):
        refused = helper.patch(f"/api/v1/users/{admin_id}", json=change)
        assert refused.status_code == 403, refused.text
        assert "may do what you may not" in refused.json()["error"]["message"]
    assert helper.delete(f"/api/v1/users/{admin_id}").status_code == 403
    assert orch.api.get(f"/api/v1/users/{admin_id}").json()["role"] == "admin"  # unchanged
    reset = helper.patch(f"/api/v1/users/{plain_id}", json={"password": "reset by the desk!"})
    assert reset.status_code == 200, reset.text

    admins = orch.api.post("/api/v1/tokens", json={"name": "ci", "role": "admin"}).json()
    assert helper.delete(f"/api/v1/tokens/{admins['id']}").status_code == 403
    assert orch.client(admins["token"]).get("/api/v1/workflows").status_code == 200
    mine = helper.post("/api/v1/tokens", json={"name": "mine", "role": empty}).json()
    assert helper.delete(f"/api/v1/tokens/{mine['id']}").status_code == 204

    wide = f"wide-{uuid.uuid4().hex[:6]}"
    made = orch.api.put(f"/api/v1/roles/{wide}", json={"permissions": ["secrets:write"]})
    assert made.status_code == 201
    narrowed = helper.put(f"/api/v1/roles/{wide}", json={"permissions": ["users:read"]})
    assert narrowed.status_code == 403, narrowed.text
    assert helper.delete(f"/api/v1/roles/{wide}").status_code == 403


def test_a_wrong_current_password_counts_as_a_failed_login(orch: Orchestrator) -> None:
    """A stolen session cannot guess its user's password: each wrong one is audited and
    they lock the user out like failed logins."""
    username, user_id = _user(orch)
    session = _session(orch, username)
    for _ in range(3):
        wrong = session.put(
            "/api/v1/me/password",
            json={"current_password": "a guess at it", "new_password": "whatever it is now"},
        )
        assert wrong.status_code == 403, wrong.text
    locked = session.put(
        "/api/v1/me/password", json={"current_password": PASSWORD, "new_password": "x" * 20}
    )
    assert locked.status_code == 429, locked.text
    assert _login(orch, username).status_code == 429  # the lock is the user's
    failed = [r for r in _audit(orch, "user.login_failed") if r["subject_id"] == user_id]
    assert len(failed) == 3, failed


def test_unknown_names_are_locked_out_like_users_and_audited(orch: Orchestrator) -> None:
    """A lockout does not tell whether a name exists: an unknown one is locked after as
    many failures, and each refusal is a denied attempt in the audit log."""
    nobody = _name("nobody")
    for _ in range(3):
        assert _login(orch, nobody, "not the password at all").status_code == 401
    locked = _login(orch, nobody, "not the password at all")
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
    denied = [r for r in _audit(orch, "auth.denied") if r["subject_id"] == nobody]
    reasons = {r["details"]["reason"] for r in denied}
    assert "wrong username or password" in reasons, denied
    assert any(reason.startswith("too many failed logins") for reason in reasons), denied


def test_applying_a_workflow_that_uses_secrets_needs_secrets_use(orch: Orchestrator) -> None:
    """workflows:write alone cannot be turned into reading every secret."""
    writer = f"writer-{uuid.uuid4().hex[:6]}"
    granted = ["workflows:read", "workflows:write"]
    assert orch.api.put(f"/api/v1/roles/{writer}", json={"permissions": granted}).status_code == 201
    name = _name("uses")
    source = (
        f"name: {name}\nsecrets: {{token: {{store: deploy_key}}}}\n"
        "actions: {steps: [{name: a, plugin: echo, config: {t: '{{ secrets.token }}'}}]}\n"
    )
    yaml = {"Content-Type": "application/yaml"}
    refused = orch.client(api_token(orch, writer)).post(
        "/api/v1/workflows", content=source, headers=yaml
    )
    assert refused.status_code == 403, refused.text
    assert "secrets:use" in refused.json()["error"]["message"]
    assert orch.api.get(f"/api/v1/workflows/{name}").status_code == 404  # nothing written
    plain = source.replace("secrets: {token: {store: deploy_key}}\n", "").replace(
        "{t: '{{ secrets.token }}'}", "{t: x}"
    )
    made = orch.client(api_token(orch, writer)).post(
        "/api/v1/workflows", content=plain, headers=yaml
    )
    assert made.status_code == 201, made.text
    operator = orch.client(api_token(orch, "operator"))
    assert operator.post("/api/v1/workflows", content=source, headers=yaml).status_code == 201
