"""Users, their logins, and the API tokens of an organization.

A user is one person across organizations: a username, an argon2 password hash, and a
membership with a role in each organization they belong to. Logging in makes a session:
a token of kind "session", acting with the user's role of the moment, ended by logout,
by `session_idle_seconds` unused or `session_max_seconds` after the login. Failed logins
in a row lock the user out for a while that doubles with each further failure.

No one hands out more than they may do: a role given to a user or a token must grant
nothing its giver's role does not (`roles.exceeding`); and no one changes, resets,
removes or revokes a user, token or role that may do more than they may.

Unknown usernames are locked out like known ones (their failures are counted in memory),
so a lockout tells nothing of whether a name exists.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict, Forbidden, InvalidInput, NotFound, RateLimited, Unauthorized
from stavily.ids import new_id
from stavily.security import roles
from stavily.security.access import (
    Principal,
    create_api_token,
    permissions_of,
)
from stavily.store.db import Database
from stavily.store.models import api_tokens, memberships, organizations, users
from stavily.store.models import roles as role_table
from stavily.store.notify import announce_credentials_changed
from stavily.timeutil import utcnow

USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{1,99}$")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
MAX_LOCKOUT_SECONDS = 3600
T = TypeVar("T")
WRONG_LOGIN = "wrong username or password"

_hasher = PasswordHasher()  # argon2id, RFC 9106's low-memory profile: 64 MiB, 3 passes
# Each hash takes 64 MiB and some 50 ms of a core: a few at a time, off the event loop, on
# threads of their own (a flood of logins waits here, not in front of other offloaded work).
_hashing = ThreadPoolExecutor(max_workers=4, thread_name_prefix="argon2")


@functools.cache
def _dummy_hash() -> str:
    """Verified when the user does not exist, so that an unknown name costs what a known
    one does (made on the first login, not at import)."""
    return _hasher.hash("not a password of anyone's")


async def _off_loop(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(_hashing, fn)


async def hash_password(password: str) -> str:
    return await _off_loop(lambda: _hasher.hash(password))


async def _verify(password_hash: str | None, password: str) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(password_hash or _dummy_hash(), password) and bool(password_hash)
        except (VerificationError, InvalidHashError):
            return False

    return await _off_loop(verify)


def check_username(username: str) -> str:
    name = username.strip().lower()
    if not USERNAME.match(name):
        raise InvalidInput(
            "a username is 2 to 100 characters: lower-case letters, digits and . _ @ -, "
            "starting with a letter or digit",
            [{"path": "username", "message": "not a valid username"}],
        )
    return name


def check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidInput(
            f"a password is {MIN_PASSWORD} to {MAX_PASSWORD} characters",
            [{"path": "password", "message": "too short or too long"}],
        )


async def check_role(conn: AsyncConnection, giver: Principal, role: str) -> frozenset[str]:
    """The permissions of `role` in the giver's organization: InvalidInput for a role it
    does not have, Forbidden for one granting what the giver may not do."""
    granted = await permissions_of(conn, giver.organization_id, role)
    if not granted and roles.builtin(role) is None and not await _custom_role(conn, giver, role):
        raise InvalidInput(
            f"no role '{role}' in this organization",
            [{"path": "role", "message": "unknown role"}],
        )
    beyond = roles.exceeding(granted, giver.permissions)
    if beyond:
        raise Forbidden(f"role '{role}' grants what you may not do: {', '.join(beyond)}")
    return granted


async def _custom_role(conn: AsyncConnection, by: Principal, name: str) -> bool:
    query = sa.select(role_table.c.name).where(
        role_table.c.organization_id == by.organization_id, role_table.c.name == name
    )
    return await conn.scalar(query) is not None


async def not_above(conn: AsyncConnection, by: Principal, role: str | None, what: str) -> None:
    """Forbidden when `role` grants what `by` may not do: `what` (a user, a token, a role)
    is changed only by someone who may do as much."""
    granted = await permissions_of(conn, by.organization_id, role) if role else frozenset()
    beyond = roles.exceeding(granted, by.permissions)
    if beyond:
        raise Forbidden(
            f"{what} may do what you may not ({', '.join(beyond)}): only someone who may do "
            "as much can change it"
        )


# -- users ----------------------------------------------------------------------------------


_USER_COLUMNS = (
    users.c.id,
    users.c.username,
    users.c.created_at,
    users.c.last_login_at,
    users.c.locked_until,
    users.c.disabled_at,
    memberships.c.role,
)


def user_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "username": row.username,
        "role": row.role,
        "disabled": row.disabled_at is not None,
        "locked_until": row.locked_until,
        "last_login_at": row.last_login_at,
        "created_at": row.created_at,
    }


def _members(organization_id: str) -> sa.Select[Any]:
    return (
        sa.select(*_USER_COLUMNS)
        .select_from(users.join(memberships, memberships.c.user_id == users.c.id))
        .where(memberships.c.organization_id == organization_id)
    )


async def list_users(conn: AsyncConnection, organization_id: str) -> list[dict[str, Any]]:
    rows = await conn.execute(_members(organization_id).order_by(users.c.username))
    return [user_view(row) for row in rows]


async def get_user(conn: AsyncConnection, organization_id: str, user_id: str) -> dict[str, Any]:
    row = (await conn.execute(_members(organization_id).where(users.c.id == user_id))).first()
    if row is None:
        raise NotFound(f"no user '{user_id}' in this organization")
    return user_view(row)


async def add_user(
    db: Database,
    policy: LoginPolicy,
    by: Principal,
    username: str,
    password: str | None,
    role: str,
    source: str,
) -> dict[str, Any]:
    """A new user with `password`, or an existing one (another organization's) made a
    member of the caller's organization, with `role`. An existing user joins only by
    their own password, typed by them: no organization takes in someone else's user
    unasked (a wrong one counts as their failed login)."""
    name = check_username(username)
    if password is not None:
        check_password(password)
    async with db.read() as conn:
        existing = (
            await conn.execute(
                sa.select(users.c.id, users.c.password_hash, users.c.locked_until).where(
                    users.c.username == name
                )
            )
        ).first()
    if existing is None:
        if password is None:
            raise InvalidInput(
                f"no user '{name}' yet: give a password to create one",
                [{"path": "password", "message": "required for a new user"}],
            )
        password_hash = await hash_password(password)
    else:
        if password is None:
            raise InvalidInput(
                f"user '{name}' exists: they join this organization by giving their own "
                "password (stavily user add NAME --existing, typed by them)",
                [{"path": "password", "message": "the user's own password"}],
            )
        _refuse_if_locked(existing.locked_until, utcnow())
        if not await _verify(existing.password_hash, password):
            await _failed(db, policy, existing.id, name, source)
            raise Forbidden(f"that is not the password of user '{name}'")
    async with db.write() as conn:
        await check_role(conn, by, role)
        now = utcnow()
        if existing is None:
            user_id = new_id("usr")
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        users.insert().values(
                            id=user_id, username=name, password_hash=password_hash, created_at=now
                        )
                    )
            except IntegrityError:  # the same name made at the same moment
                raise Conflict(f"user '{name}' was just created: try again") from None
            action = "user.created"
        else:
            user_id, action = existing.id, "user.added"
        try:
            async with conn.begin_nested():
                await conn.execute(
                    memberships.insert().values(
                        user_id=user_id,
                        organization_id=by.organization_id,
                        role=role,
                        created_at=now,
                    )
                )
        except IntegrityError:
            raise Conflict(f"user '{name}' is already a member of this organization") from None
        await audit.append(
            conn,
            [
                audit.entry(
                    by.organization_id,
                    by.actor,
                    action,
                    "user",
                    user_id,
                    {"username": name, "role": role},
                )
            ],
        )
        return await get_user(conn, by.organization_id, user_id)


async def _only_here(conn: AsyncConnection, organization_id: str, user_id: str) -> None:
    """A user's password and their being enabled are theirs across organizations: an
    organization changes them only for a user who belongs to no other."""
    elsewhere = await conn.scalar(
        sa.select(sa.func.count())
        .select_from(memberships)
        .where(memberships.c.user_id == user_id, memberships.c.organization_id != organization_id)
    )
    if elsewhere:
        raise Conflict(
            "this user belongs to other organizations too: only they can change their "
            "password (PUT /api/v1/me/password), and only an organization of theirs alone "
            "can disable them"
        )


async def update_user(
    db: Database,
    by: Principal,
    user_id: str,
    *,
    role: str | None = None,
    password: str | None = None,
    disabled: bool | None = None,
) -> dict[str, Any]:
    if password is not None:
        check_password(password)
        password_hash = await hash_password(password)
    async with db.write() as conn:
        target = await get_user(conn, by.organization_id, user_id)
        if user_id != by.user_id:
            await not_above(conn, by, target["role"], "this user")
        changes: dict[str, Any] = {}
        if role is not None:
            await check_role(conn, by, role)
            await conn.execute(
                memberships.update()
                .where(
                    memberships.c.user_id == user_id,
                    memberships.c.organization_id == by.organization_id,
                )
                .values(role=role)
            )
            changes["role"] = role
        if password is not None or disabled is not None:
            await _only_here(conn, by.organization_id, user_id)
            values: dict[str, Any] = {}
            if password is not None:
                values.update(password_hash=password_hash, failed_logins=0, locked_until=None)
                changes["password"] = "changed"
            if disabled is not None:
                values["disabled_at"] = utcnow() if disabled else None
                changes["disabled"] = disabled
            await conn.execute(users.update().where(users.c.id == user_id).values(**values))
            if password is not None or disabled:
                await _end_sessions(conn, user_id)
        if changes:
            await announce_credentials_changed(conn)
            await audit.append(
                conn,
                [
                    audit.entry(
                        by.organization_id, by.actor, "user.updated", "user", user_id, changes
                    )
                ],
            )
        return await get_user(conn, by.organization_id, user_id)


async def _end_sessions(
    conn: AsyncConnection, user_id: str, organization_id: str | None = None
) -> None:
    """Revoke the user's sessions (and, leaving an organization, their tokens there)."""
    query = api_tokens.update().where(
        api_tokens.c.user_id == user_id, api_tokens.c.revoked_at.is_(None)
    )
    if organization_id is None:
        query = query.where(api_tokens.c.kind == "session")
    else:
        query = query.where(api_tokens.c.organization_id == organization_id)
    await conn.execute(query.values(revoked_at=utcnow()))


async def remove_user(db: Database, by: Principal, user_id: str) -> None:
    """The user leaves the caller's organization, their sessions and tokens there
    revoked; a user left in no organization is disabled."""
    if user_id == by.user_id:
        raise Conflict("you cannot remove yourself: another admin can")
    async with db.write() as conn:
        view = await get_user(conn, by.organization_id, user_id)
        await not_above(conn, by, view["role"], "this user")
        await conn.execute(
            memberships.delete().where(
                memberships.c.user_id == user_id,
                memberships.c.organization_id == by.organization_id,
            )
        )
        await _end_sessions(conn, user_id, by.organization_id)
        remaining = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(memberships)
            .where(memberships.c.user_id == user_id)
        )
        if not remaining:
            await conn.execute(
                users.update().where(users.c.id == user_id).values(disabled_at=utcnow())
            )
        await announce_credentials_changed(conn)
        await audit.append(
            conn,
            [
                audit.entry(
                    by.organization_id,
                    by.actor,
                    "user.removed",
                    "user",
                    user_id,
                    {"username": view["username"]},
                )
            ],
        )


async def change_own_password(
    db: Database, policy: LoginPolicy, me: Principal, current: str, new: str, source: str
) -> None:
    """A wrong current password counts as a failed login: it is audited, and locks the
    user out like one (a stolen session cannot guess the password)."""
    if me.user_id is None:
        raise InvalidInput("this token belongs to no user: there is no password to change")
    check_password(new)
    async with db.read() as conn:
        user = (
            await conn.execute(
                sa.select(users.c.password_hash, users.c.locked_until).where(
                    users.c.id == me.user_id
                )
            )
        ).first()
    if user is None:
        raise Forbidden("the current password is wrong")
    _refuse_if_locked(user.locked_until, utcnow())
    if not await _verify(user.password_hash, current):
        await _failed(db, policy, me.user_id, me.username or "", source)
        raise Forbidden("the current password is wrong")
    password_hash = await hash_password(new)
    async with db.write() as conn:
        await conn.execute(
            users.update().where(users.c.id == me.user_id).values(password_hash=password_hash)
        )
        # every other session of theirs ends: a changed password locks out who knew the old
        await conn.execute(
            api_tokens.update()
            .where(
                api_tokens.c.user_id == me.user_id,
                api_tokens.c.kind == "session",
                api_tokens.c.id != me.token_id,
                api_tokens.c.revoked_at.is_(None),
            )
            .values(revoked_at=utcnow())
        )
        await announce_credentials_changed(conn)
        await audit.append(
            conn,
            [
                audit.entry(
                    me.organization_id, me.actor, "user.password_changed", "user", me.user_id
                )
            ],
        )


# -- logins ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginPolicy:
    idle_seconds: int
    max_seconds: int
    lockout_after: int
    lockout_seconds: int

    def lockout(self, failures: int) -> int:
        """How long `failures` failed logins in a row lock the user out (0: not yet)."""
        if failures < self.lockout_after:
            return 0
        return min(
            MAX_LOCKOUT_SECONDS, self.lockout_seconds * 2 ** min(failures - self.lockout_after, 20)
        )


async def login(
    db: Database,
    policy: LoginPolicy,
    username: str,
    password: str,
    organization: str | None,
    source: str,
) -> dict[str, Any]:
    """A new session for the user, in `organization` (a name or id; unset: their only
    one, or "default" among several). Unauthorized for a wrong name or password, alike;
    RateLimited while the user is locked out."""
    name = username.strip().lower()
    async with db.read() as conn:
        user = (
            await conn.execute(
                sa.select(
                    users.c.id,
                    users.c.password_hash,
                    users.c.failed_logins,
                    users.c.locked_until,
                    users.c.disabled_at,
                ).where(users.c.username == name)
            )
        ).first()
    now = utcnow()
    _refuse_if_locked(user.locked_until if user else _unknown.locked_until(name), now)
    valid = await _verify(user.password_hash if user else None, password[:MAX_PASSWORD])
    if user is None:
        _unknown.failed(name, policy, now)
        raise UnknownUser(WRONG_LOGIN)
    if not valid:
        await _failed(db, policy, user.id, name, source)
        raise Unauthorized(WRONG_LOGIN)
    if user.disabled_at is not None:
        raise Unauthorized("this user is disabled")
    rehashed = None  # hashed before the transaction: a write lock is not held for it
    if _hasher.check_needs_rehash(user.password_hash):
        rehashed = await hash_password(password)
    async with db.write() as conn:
        member = await _membership(conn, user.id, organization)
        expires_at = now + timedelta(seconds=policy.max_seconds)
        session_id, token = await create_api_token(
            conn,
            member.organization_id,
            name=f"login from {source}",
            role=member.role,
            actor=f"user:{name}",
            kind="session",
            user_id=user.id,
            expires_at=expires_at,
        )
        values: dict[str, Any] = {"failed_logins": 0, "locked_until": None, "last_login_at": now}
        if rehashed is not None:
            values["password_hash"] = rehashed
        await conn.execute(users.update().where(users.c.id == user.id).values(**values))
        await audit.append(
            conn,
            [
                audit.entry(
                    member.organization_id,
                    f"user:{name}",
                    "user.login",
                    "user",
                    user.id,
                    {"session": session_id, "source": source},
                )
            ],
        )
    return {
        "token": token,
        "session_id": session_id,
        "expires_at": expires_at,
        "idle_timeout_seconds": policy.idle_seconds,
        "user": {"id": user.id, "username": name},
        "organization": {"id": member.organization_id, "name": member.name},
        "role": member.role,
    }


class UnknownUser(Unauthorized):
    """A login with a name no user has: answered as a wrong password is."""


def _refuse_if_locked(locked_until: datetime | None, now: datetime) -> None:
    if locked_until is not None and locked_until > now:
        wait = max(1, int((locked_until - now).total_seconds()) + 1)
        raise RateLimited(f"too many failed logins: try again in {wait} s", retry_after=wait)


class _UnknownNames:
    """Failed logins with names no user has, counted in memory like a user's in the
    database: a name is locked out after as many, for as long."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._failures: dict[str, tuple[int, datetime | None]] = {}

    def locked_until(self, name: str) -> datetime | None:
        return self._failures.get(name, (0, None))[1]

    def failed(self, name: str, policy: LoginPolicy, now: datetime) -> None:
        if len(self._failures) >= self.max_entries:
            self._failures.clear()
        failures = self._failures.get(name, (0, None))[0] + 1
        lock = policy.lockout(failures)
        self._failures[name] = (failures, now + timedelta(seconds=lock) if lock else None)


_unknown = _UnknownNames()


async def _membership(conn: AsyncConnection, user_id: str, organization: str | None) -> Any:
    query = (
        sa.select(memberships.c.organization_id, memberships.c.role, organizations.c.name)
        .select_from(
            memberships.join(organizations, organizations.c.id == memberships.c.organization_id)
        )
        .where(memberships.c.user_id == user_id)
        .order_by(organizations.c.name)
    )
    if organization is not None:
        query = query.where(
            sa.or_(organizations.c.name == organization, organizations.c.id == organization)
        )
    found = (await conn.execute(query)).all()
    if organization is not None and not found:
        raise Forbidden(f"you are not a member of an organization '{organization}'")
    if not found:
        raise Forbidden("you are a member of no organization: ask an admin to add you")
    if len(found) > 1:
        default = [m for m in found if m.name == "default"]
        if not default:
            names = ", ".join(m.name for m in found)
            raise InvalidInput(
                f"you are a member of several organizations ({names}): name one",
                [{"path": "organization", "message": "required"}],
            )
        return default[0]
    return found[0]


async def _failed(db: Database, policy: LoginPolicy, user_id: str, name: str, source: str) -> None:
    async with db.write() as conn:
        failures = await conn.scalar(
            users.update()
            .where(users.c.id == user_id)
            .values(failed_logins=users.c.failed_logins + 1)
            .returning(users.c.failed_logins)
        )
        lock = policy.lockout(int(failures or 0))
        details: dict[str, Any] = {"username": name, "source": source, "failures": failures}
        if lock:
            locked_until = utcnow() + timedelta(seconds=lock)
            await conn.execute(
                users.update().where(users.c.id == user_id).values(locked_until=locked_until)
            )
            details["locked_until"] = locked_until.isoformat()
        org_ids = (
            await conn.execute(
                sa.select(memberships.c.organization_id).where(memberships.c.user_id == user_id)
            )
        ).scalars()
        await audit.append(
            conn,
            [
                audit.entry(org_id, "system", "user.login_failed", "user", user_id, details)
                for org_id in org_ids
            ],
        )


async def logout(db: Database, me: Principal) -> None:
    if me.kind != "session":
        raise InvalidInput(
            "this is an API token, not a login session: revoke it with DELETE /api/v1/tokens/ID"
        )
    async with db.write() as conn:
        await conn.execute(
            api_tokens.update().where(api_tokens.c.id == me.token_id).values(revoked_at=utcnow())
        )
        await announce_credentials_changed(conn)
        await audit.append(
            conn,
            [audit.entry(me.organization_id, me.actor, "user.logout", "user", me.user_id or "")],
        )


# -- tokens ---------------------------------------------------------------------------------


def token_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "role": row.role,
        "user_id": row.user_id,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "last_used_at": row.last_used_at,
        "revoked_at": row.revoked_at,
    }


_TOKEN_COLUMNS = (
    api_tokens.c.id,
    api_tokens.c.name,
    api_tokens.c.kind,
    api_tokens.c.role,
    api_tokens.c.user_id,
    api_tokens.c.created_by,
    api_tokens.c.created_at,
    api_tokens.c.expires_at,
    api_tokens.c.last_used_at,
    api_tokens.c.revoked_at,
)


async def create_token(
    db: Database, by: Principal, name: str, role: str, expires_at: datetime | None
) -> dict[str, Any]:
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidInput(
            "expires_at is in the past", [{"path": "expires_at", "message": "in the past"}]
        )
    async with db.write() as conn:
        await check_role(conn, by, role)
        token_id, secret = await create_api_token(
            conn,
            by.organization_id,
            name=name,
            role=role,
            actor=by.actor,
            user_id=by.user_id,
            expires_at=expires_at,
        )
        row = (
            await conn.execute(sa.select(*_TOKEN_COLUMNS).where(api_tokens.c.id == token_id))
        ).one()
    return {**token_view(row), "token": secret}


async def list_tokens(
    conn: AsyncConnection, organization_id: str, kind: str | None, revoked: bool
) -> list[dict[str, Any]]:
    query = sa.select(*_TOKEN_COLUMNS).where(api_tokens.c.organization_id == organization_id)
    if kind is not None:
        query = query.where(api_tokens.c.kind == kind)
    if not revoked:
        query = query.where(
            api_tokens.c.revoked_at.is_(None),
            sa.or_(api_tokens.c.expires_at.is_(None), api_tokens.c.expires_at > utcnow()),
        )
    rows = await conn.execute(query.order_by(api_tokens.c.created_at.desc()).limit(1000))
    return [token_view(row) for row in rows]


async def get_token(conn: AsyncConnection, organization_id: str, token_id: str) -> dict[str, Any]:
    row = (
        await conn.execute(
            sa.select(*_TOKEN_COLUMNS).where(
                api_tokens.c.id == token_id, api_tokens.c.organization_id == organization_id
            )
        )
    ).first()
    if row is None:
        raise NotFound(f"no token '{token_id}'")
    return token_view(row)


async def revoke_token(db: Database, by: Principal, token_id: str) -> None:
    """Revoke a token or session of the caller's organization (again: nothing changes)."""
    async with db.write() as conn:
        view = await get_token(conn, by.organization_id, token_id)
        if view["revoked_at"] is not None:
            return
        own = token_id == by.token_id or (
            by.user_id is not None and view.get("user_id") == by.user_id
        )
        if not own:
            await not_above(conn, by, view["role"], "this token")
        await conn.execute(
            api_tokens.update().where(api_tokens.c.id == token_id).values(revoked_at=utcnow())
        )
        await announce_credentials_changed(conn)
        await audit.append(
            conn,
            [
                audit.entry(
                    by.organization_id,
                    by.actor,
                    "api_token.revoked",
                    "api_token",
                    token_id,
                    {"name": view["name"], "kind": view["kind"]},
                )
            ],
        )


# -- roles ----------------------------------------------------------------------------------


async def list_roles(conn: AsyncConnection, organization_id: str) -> list[dict[str, Any]]:
    listed = [
        {"name": name, "builtin": True, "description": None, "permissions": sorted(granted)}
        for name, granted in roles.BUILTIN_ROLES.items()
    ]
    rows = await conn.execute(
        sa.select(role_table)
        .where(role_table.c.organization_id == organization_id)
        .order_by(role_table.c.name)
    )
    listed += [
        {
            "name": row.name,
            "builtin": False,
            "description": row.description,
            "permissions": sorted(row.permissions),
        }
        for row in rows
    ]
    return listed


async def put_role(
    db: Database, by: Principal, name: str, permissions: list[str], description: str | None
) -> tuple[dict[str, Any], bool]:
    """Define or redefine a custom role; (its view, whether it is new)."""
    if not roles.ROLE_NAME.match(name):
        raise InvalidInput(
            "a role name is 1 to 40 characters: lower-case letters, digits, _ and -, "
            "starting with a letter",
            [{"path": "(path)", "message": "not a valid role name"}],
        )
    if roles.builtin(name) is not None:
        raise Conflict(f"'{name}' is a built-in role: it cannot be changed")
    unknown = roles.unknown_permissions(permissions)
    if unknown:
        raise InvalidInput(
            f"no such permission: {', '.join(unknown)}",
            [{"path": "permissions", "message": f"unknown: {p}"} for p in unknown],
        )
    beyond = roles.exceeding(permissions, by.permissions)
    if beyond:
        raise Forbidden(f"the role would grant what you may not do: {', '.join(beyond)}")
    granted = sorted(set(permissions))
    now = utcnow()
    key = (role_table.c.organization_id == by.organization_id) & (role_table.c.name == name)
    async with db.write() as conn:
        exists = await conn.scalar(sa.select(role_table.c.name).where(key))
        if exists is None:
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        role_table.insert().values(
                            organization_id=by.organization_id,
                            name=name,
                            description=description,
                            permissions=granted,
                            created_at=now,
                            updated_at=now,
                        )
                    )
            except IntegrityError:  # the same role defined at the same moment
                raise Conflict(f"role '{name}' was just defined: try again") from None
        else:
            await not_above(conn, by, name, f"role '{name}'")
            await conn.execute(
                role_table.update()
                .where(key)
                .values(description=description, permissions=granted, updated_at=now)
            )
        await announce_credentials_changed(conn)
        await audit.append(
            conn,
            [
                audit.entry(
                    by.organization_id,
                    by.actor,
                    "role.created" if exists is None else "role.updated",
                    "role",
                    name,
                    {"permissions": granted},
                )
            ],
        )
    view = {"name": name, "builtin": False, "description": description, "permissions": granted}
    return view, exists is None


async def delete_role(db: Database, by: Principal, name: str) -> None:
    """Delete a custom role no member or live token has (409 names who has it)."""
    if roles.builtin(name) is not None:
        raise Conflict(f"'{name}' is a built-in role: it cannot be deleted")
    key = (role_table.c.organization_id == by.organization_id) & (role_table.c.name == name)
    async with db.write() as conn:
        if await conn.scalar(sa.select(role_table.c.name).where(key)) is None:
            raise NotFound(f"no role '{name}'")
        await not_above(conn, by, name, f"role '{name}'")
        members = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(memberships)
            .where(memberships.c.organization_id == by.organization_id, memberships.c.role == name)
        )
        tokens = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(api_tokens)
            .where(
                api_tokens.c.organization_id == by.organization_id,
                api_tokens.c.role == name,
                api_tokens.c.revoked_at.is_(None),
            )
        )
        if members or tokens:
            raise Conflict(
                f"role '{name}' is held by {members} user(s) and {tokens} token(s): "
                "give them another role or revoke them first"
            )
        await conn.execute(role_table.delete().where(key))
        await audit.append(
            conn, [audit.entry(by.organization_id, by.actor, "role.deleted", "role", name)]
        )
