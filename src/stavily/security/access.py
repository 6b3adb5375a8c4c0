"""Organizations, API tokens and roles for the private API."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Forbidden, Unauthorized
from stavily.ids import new_id
from stavily.security.credentials import CredentialCache, digest, generate
from stavily.store.db import Database
from stavily.store.models import api_tokens, organizations
from stavily.timeutil import utcnow

DEFAULT_ORGANIZATION = "default"
ROLES = ("admin", "operator", "viewer", "auditor")

# What each role may do; reading is open to every role.
_PERMISSIONS = {
    "admin": {"read", "agents:write", "workflows:write", "executions:run", "audit:read"},
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


async def bootstrap(db: Database, bootstrap_token: str | None) -> tuple[str, str | None]:
    """First start: the default organization and an admin token.

    Returns (organization id, a newly generated token to print once, or None).
    """
    async with db.write() as conn:
        if not db.is_sqlite:
            # Replicas or workers starting together take turns: one organization, one token.
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _BOOTSTRAP_LOCK})
        org_id = await ensure_default_organization(conn)
        if bootstrap_token:
            exists = await conn.scalar(
                sa.select(api_tokens.c.id).where(api_tokens.c.token_hash == digest(bootstrap_token))
            )
            if not exists:
                await create_api_token(
                    conn,
                    org_id,
                    name="bootstrap",
                    role="admin",
                    actor="system",
                    value=bootstrap_token,
                )
            return org_id, None
        any_token = await conn.scalar(sa.select(api_tokens.c.id).limit(1))
        if any_token:
            return org_id, None
        _, secret = await create_api_token(
            conn, org_id, name="bootstrap", role="admin", actor="system"
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
