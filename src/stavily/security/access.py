"""Organizations, API tokens and the principal a private API request acts as."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Forbidden, StavilyError, Unauthorized
from stavily.ids import new_id
from stavily.security import roles
from stavily.security.credentials import CredentialCache, StartRefused, digest, generate
from stavily.store.db import Database
from stavily.store.models import api_tokens, audit_records, memberships, organizations, users
from stavily.store.models import roles as role_table
from stavily.store.notify import announce_credentials_changed
from stavily.timeutil import utcnow

DEFAULT_ORGANIZATION = "default"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a token (an API token or a user's login session) in one
    organization, with the permissions its role had when it was looked up."""

    organization_id: str
    token_id: str
    role: str
    permissions: frozenset[str] = frozenset()
    kind: str = "api"
    user_id: str | None = None
    username: str | None = None
    expires_at: datetime | None = None

    @property
    def actor(self) -> str:
        if self.kind == "session":
            return f"user:{self.username}"
        return f"token:{self.token_id}"

    def require(self, permission: str) -> None:
        if permission not in self.permissions:
            raise Forbidden(f"role '{self.role}' may not do '{permission}'")


class TokenRefused(Unauthorized):
    """A refused token whose row was found (revoked, expired...): the denied attempt is
    recorded in its organization, under its id. Neither goes into the answer."""

    def __init__(self, message: str, organization_id: str, token_id: str) -> None:
        super().__init__(message)
        self.organization_id, self.token_id = organization_id, token_id


class Denials:
    """Refused credentials, recorded in the audit log as denied attempts (`auth.denied`):
    at most one record per source address, kind, reason and subject (the token or agent,
    when known) every `period` seconds, with
    how many were refused since the last one, so that a flood cannot fill the log (a
    source refused too often is rate limited before it gets here)."""

    def __init__(self, db: Database, default_organization: str, period: float = 10.0) -> None:
        self.db, self.default_organization, self.period = db, default_organization, period
        self._seen: dict[tuple[str, str, str, str], tuple[float, int]] = {}  # -> (written, since)

    async def record(
        self, source: str, kind: str, error: StavilyError, subject: str | None = None
    ) -> None:
        subject_id = getattr(error, "token_id", None) or subject or "unknown"
        key = (source, kind, error.message, subject_id)
        now = time.monotonic()
        written, since = self._seen.get(key, (-self.period, 0))
        if now - written < self.period:
            self._seen[key] = (written, since + 1)
            return
        if len(self._seen) >= 100_000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        organization = getattr(error, "organization_id", None) or self.default_organization
        details = {"kind": kind, "reason": error.message, "source": source}
        if since:
            details["refused_since_last_record"] = since
        async with self.db.write() as conn:
            await audit.append(
                conn,
                [audit.entry(organization, "anonymous", "auth.denied", kind, subject_id, details)],
            )


async def ensure_default_organization(conn: AsyncConnection) -> str:
    existing = await conn.scalar(
        sa.select(organizations.c.id).where(organizations.c.name == DEFAULT_ORGANIZATION)
    )
    if existing:
        return str(existing)
    org_id = new_id("org")
    await conn.execute(
        organizations.insert().values(id=org_id, name=DEFAULT_ORGANIZATION, created_at=utcnow())
    )
    await audit.append(
        conn,
        [audit.entry(org_id, "system", "organization.created", "organization", org_id)],
    )
    return org_id


async def create_api_token(
    conn: AsyncConnection,
    organization_id: str,
    *,
    name: str,
    role: str,
    actor: str,
    value: str | None = None,
    kind: str = "api",
    user_id: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, str]:
    """Create a token; returns (token id, the secret), the secret shown only this once
    (only its digest is kept)."""
    secret = value or generate("stv")
    token_id = new_id("tok" if kind == "api" else "ses")
    await conn.execute(
        api_tokens.insert().values(
            id=token_id,
            organization_id=organization_id,
            name=name,
            role=role,
            token_hash=digest(secret),
            created_at=utcnow(),
            kind=kind,
            user_id=user_id,
            created_by=actor,
            expires_at=expires_at,
        )
    )
    if kind == "api":  # a login is audited as the login
        details = {"name": name, "role": role}
        if expires_at is not None:
            details["expires_at"] = expires_at.isoformat()
        await audit.append(
            conn,
            [
                audit.entry(
                    organization_id, actor, "api_token.created", "api_token", token_id, details
                )
            ],
        )
    return token_id, secret


_BOOTSTRAP_LOCK = 0x57A72
BOOTSTRAP_NAME = "bootstrap"
BOOTSTRAP_ACTOR = "system"
MIN_BOOTSTRAP_LENGTH = 32
MIN_BOOTSTRAP_DISTINCT = 10  # a cheap stand-in for entropy: refuses "aaaa..."
WEAK_BOOTSTRAP = (
    "STAVILY_BOOTSTRAP_TOKEN is too weak: use at least 32 random characters, "
    "e.g. stv_$(openssl rand -hex 32)"
)
REVOKED_BOOTSTRAP = (
    "STAVILY_BOOTSTRAP_TOKEN is a revoked token: set a new one, e.g. stv_$(openssl rand -hex 32)"
)
RETIRED_REASON = "replaced by a new STAVILY_BOOTSTRAP_TOKEN"


def check_bootstrap_token(token: str | None) -> None:
    """Refuse (StartRefused) a bootstrap token shorter than 32 characters or made of
    fewer than 10 distinct ones. No token is fine: one is generated."""
    if token is None:
        return
    if len(token) < MIN_BOOTSTRAP_LENGTH or len(set(token)) < MIN_BOOTSTRAP_DISTINCT:
        raise StartRefused(WEAK_BOOTSTRAP)


async def _retire_bootstrap_tokens(conn: AsyncConnection, org_id: str, keep: str) -> list[str]:
    """Revoke every token an earlier bootstrap made (given or generated) but `keep`: the
    tokens named "bootstrap" whose creation the audit log attributes to the system."""
    made_by_bootstrap = sa.exists().where(
        audit_records.c.subject_id == api_tokens.c.id,
        audit_records.c.subject_type == "api_token",
        audit_records.c.action == "api_token.created",
        audit_records.c.actor == BOOTSTRAP_ACTOR,
    )
    query = sa.select(api_tokens.c.id).where(
        api_tokens.c.organization_id == org_id,
        api_tokens.c.name == BOOTSTRAP_NAME,
        api_tokens.c.revoked_at.is_(None),
        api_tokens.c.id != keep,
        made_by_bootstrap,
    )
    stale = [str(token_id) for token_id in (await conn.execute(query)).scalars()]
    if not stale:
        return []
    await conn.execute(
        api_tokens.update()
        .where(api_tokens.c.id.in_(stale), api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    reason = {"reason": RETIRED_REASON}
    await audit.append(
        conn,
        [
            audit.entry(org_id, BOOTSTRAP_ACTOR, "api_token.revoked", "api_token", token_id, reason)
            for token_id in stale
        ],
    )
    await announce_credentials_changed(conn)  # replicas running now forget what they trusted
    return stale


async def bootstrap(db: Database, bootstrap_token: str | None) -> tuple[str, str | None]:
    """First start: the default organization and an admin token.

    With a bootstrap token given, the tokens of earlier bootstraps (an earlier variable's,
    or the one generated when there was none) are revoked: changing the variable retires
    the old token. Returns (organization id, a newly generated token to print once, or
    None). StartRefused for a weak token, or one that was revoked.
    """
    check_bootstrap_token(bootstrap_token)
    async with db.write() as conn:
        if not db.is_sqlite:
            # Replicas or workers starting together take turns: one organization, one token.
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _BOOTSTRAP_LOCK})
        org_id = await ensure_default_organization(conn)
        if bootstrap_token:
            existing = (
                await conn.execute(
                    sa.select(api_tokens.c.id, api_tokens.c.revoked_at).where(
                        api_tokens.c.token_hash == digest(bootstrap_token)
                    )
                )
            ).first()
            if existing is not None and existing.revoked_at is not None:
                raise StartRefused(REVOKED_BOOTSTRAP)
            if existing is None:
                token_id, _ = await create_api_token(
                    conn,
                    org_id,
                    name=BOOTSTRAP_NAME,
                    role="admin",
                    actor=BOOTSTRAP_ACTOR,
                    value=bootstrap_token,
                )
            else:
                token_id = existing.id
            await _retire_bootstrap_tokens(conn, org_id, keep=token_id)
            return org_id, None
        any_token = await conn.scalar(sa.select(api_tokens.c.id).limit(1))
        if any_token:
            return org_id, None
        _, secret = await create_api_token(
            conn, org_id, name=BOOTSTRAP_NAME, role="admin", actor=BOOTSTRAP_ACTOR
        )
        return org_id, secret


async def permissions_of(conn: AsyncConnection, organization_id: str, role: str) -> frozenset[str]:
    """A built-in role's permissions, else the organization's custom role's; a role it
    does not know grants nothing."""
    known = roles.builtin(role)
    if known is not None:
        return known
    granted = await conn.scalar(
        sa.select(role_table.c.permissions).where(
            role_table.c.organization_id == organization_id, role_table.c.name == role
        )
    )
    return frozenset(p for p in granted or () if p in roles.PERMISSIONS)


_LOOKUP = sa.select(
    api_tokens.c.id,
    api_tokens.c.organization_id,
    api_tokens.c.role,
    api_tokens.c.kind,
    api_tokens.c.user_id,
    api_tokens.c.revoked_at,
    api_tokens.c.expires_at,
    api_tokens.c.created_at,
    api_tokens.c.last_used_at,
    users.c.username,
    users.c.disabled_at,
    memberships.c.role.label("member_role"),
).select_from(
    api_tokens.outerjoin(users, users.c.id == api_tokens.c.user_id).outerjoin(
        memberships,
        sa.and_(
            memberships.c.user_id == api_tokens.c.user_id,
            memberships.c.organization_id == api_tokens.c.organization_id,
        ),
    )
)


class TokenUse:
    """When each token was last used, written at most once a `period` per token (a
    session's idle timeout is counted from it), so steady use costs no write a request."""

    def __init__(self, period: float = 60.0, max_entries: int = 100_000) -> None:
        self.period = period
        self.max_entries = max_entries
        self._written: dict[str, float] = {}  # token id -> monotonic time of the write

    async def touch(self, db: Database, token_id: str) -> None:
        now = time.monotonic()
        if now - self._written.get(token_id, -self.period) < self.period:
            return
        if len(self._written) >= self.max_entries:
            self._written.clear()
        self._written[token_id] = now
        async with db.write() as conn:
            await conn.execute(
                api_tokens.update().where(api_tokens.c.id == token_id).values(last_used_at=utcnow())
            )


async def authenticate_token(
    db: Database,
    credential: str | None,
    cache: CredentialCache[Principal],
    use: TokenUse | None = None,
    session_idle_seconds: float = 8 * 3600,
) -> Principal:
    """The principal behind a bearer credential. Unauthorized when it is missing,
    unknown, revoked or expired, a session unused for `session_idle_seconds`, or its user
    disabled or no longer a member of the token's organization."""
    if not credential:
        raise Unauthorized("missing bearer token")
    key = digest(credential)
    principal = cache.get(key)
    if principal is None:
        principal = await _look_up(db, key, session_idle_seconds)
        cache.put(key, principal)
    if principal.expires_at is not None and principal.expires_at <= utcnow():
        cache.discard(key)
        raise TokenRefused("token expired", principal.organization_id, principal.token_id)
    if use is not None:
        await use.touch(db, principal.token_id)
    return principal


async def _look_up(db: Database, key: str, session_idle_seconds: float) -> Principal:
    async with db.read() as conn:
        row = (await conn.execute(_LOOKUP.where(api_tokens.c.token_hash == key))).first()
        if row is None:
            raise Unauthorized("unknown or revoked token")

        def refused(message: str) -> TokenRefused:
            return TokenRefused(message, row.organization_id, row.id)

        if row.revoked_at is not None:
            raise refused("unknown or revoked token")
        now = utcnow()
        if row.expires_at is not None and row.expires_at <= now:
            raise refused("token expired")
        role = row.role
        if row.user_id is not None:
            if row.disabled_at is not None:
                raise refused("this token's user is disabled")
            if row.member_role is None:
                raise refused("this token's user is no longer a member of its organization")
            if row.kind == "session":
                role = row.member_role  # a session acts with its user's role of now
        if row.kind == "session":
            used = row.last_used_at or row.created_at
            if used + timedelta(seconds=session_idle_seconds) <= now:
                raise refused("session expired: unused for too long; log in again")
        permissions = await permissions_of(conn, row.organization_id, role)
        if row.user_id is not None and row.kind != "session":
            # a user's API token does no more than its user may do now
            permissions &= await permissions_of(conn, row.organization_id, row.member_role)
    return Principal(
        row.organization_id,
        row.id,
        role,
        permissions,
        kind=row.kind,
        user_id=row.user_id,
        username=row.username,
        expires_at=row.expires_at,
    )
