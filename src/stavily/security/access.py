"""Organizations, API tokens and roles for the private API."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Forbidden, Unauthorized
from stavily.ids import new_id
from stavily.security.credentials import CredentialCache, StartRefused, digest, generate
from stavily.store.db import Database
from stavily.store.models import api_tokens, audit_records, organizations
from stavily.store.notify import announce_credentials_changed
from stavily.timeutil import utcnow

DEFAULT_ORGANIZATION = "default"
ROLES = ("admin", "operator", "viewer", "auditor")

# What each role may do; reading is open to every role.
_PERMISSIONS = {
    "admin": {
        "read",
        "agents:write",
        "workflows:write",
        "executions:run",
        "audit:read",
        "plugins:write",
    },
    "operator": {"read", "workflows:write", "executions:run"},
    "viewer": {"read"},
    "auditor": {"read", "audit:read"},
}


@dataclass(frozen=True)
class Principal:
    organization_id: str
    token_id: str
    role: str

    @property
    def actor(self) -> str:
        return f"token:{self.token_id}"

    def require(self, permission: str) -> None:
        if permission not in _PERMISSIONS.get(self.role, set()):
            raise Forbidden(f"role '{self.role}' may not do '{permission}'")


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
) -> tuple[str, str]:
    """Create a token; returns (token id, the secret), the secret shown only this once."""
    secret = value or generate("stv")
    token_id = new_id("tok")
    await conn.execute(
        api_tokens.insert().values(
            id=token_id,
            organization_id=organization_id,
            name=name,
            role=role,
            token_hash=digest(secret),
            created_at=utcnow(),
        )
    )
    await audit.append(
        conn,
        [
            audit.entry(
                organization_id,
                actor,
                "api_token.created",
                "api_token",
                token_id,
                {"name": name, "role": role},
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


async def authenticate_token(
    db: Database, credential: str | None, cache: CredentialCache[Principal]
) -> Principal:
    if not credential:
        raise Unauthorized("missing bearer token")
    key = digest(credential)
    principal = cache.get(key)
    if principal is not None:
        return principal
    async with db.read() as conn:
        row = (
            await conn.execute(
                sa.select(
                    api_tokens.c.id,
                    api_tokens.c.organization_id,
                    api_tokens.c.role,
                    api_tokens.c.revoked_at,
                ).where(api_tokens.c.token_hash == key)
            )
        ).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("unknown or revoked token")
    principal = Principal(row.organization_id, row.id, row.role)
    cache.put(key, principal)
    return principal
