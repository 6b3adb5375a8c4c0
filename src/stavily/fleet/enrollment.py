"""Enrollment: operators create tokens, agents exchange one for their id and credential.

A token carries what the agent becomes (type, labels, capacity); its secret is shown once
and stored as a digest. Each exchange consumes one use in a single conditional UPDATE, so
two agents racing for the last use cannot both win, and a failed exchange consumes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict, InvalidInput, NotFound, Unauthorized
from stavily.fleet.agents import AGENT_TYPES, create_agent, get_agent
from stavily.ids import new_id
from stavily.security.credentials import digest, generate
from stavily.store.models import agents, enrollment_tokens
from stavily.timeutil import isoformat, utcnow

TOKEN_PREFIX = "stve"
DEFAULT_EXPIRES_IN = 24 * 3600
MAX_EXPIRES_IN = 30 * 24 * 3600


@dataclass(frozen=True)
class EnrollmentTokenSpec:
    """What an operator asks for; every agent enrolled with the token gets these."""

    name: str
    agent_type: str = "action"
    labels: dict[str, str] = field(default_factory=dict)
    capacity: int = 1
    max_uses: int | None = 1  # None: unlimited until it expires
    expires_in: int = DEFAULT_EXPIRES_IN


@dataclass(frozen=True)
class Enrollment:
    """What an agent sends with the token."""

    token: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    hostname: str | None = None
    version: str | None = None
    os: str | None = None


def token_state(row: Any, now: datetime | None = None) -> str:
    """active | revoked | expired | used_up"""
    now = now or utcnow()
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    if row["max_uses"] is not None and row["uses"] >= row["max_uses"]:
        return "used_up"
    return "active"


def token_view(row: Any, now: datetime | None = None) -> dict[str, Any]:
    """An enrollment token as the API shows it: never its secret nor its digest."""
    max_uses = row["max_uses"]
    return {
        "id": row["id"],
        "name": row["name"],
        "agent_type": row["agent_type"],
        "labels": row["labels"],
        "capacity": row["capacity"],
        "max_uses": max_uses,
        "uses": row["uses"],
        "remaining_uses": None if max_uses is None else max(0, max_uses - row["uses"]),
        "state": token_state(row, now),
        "expires_at": isoformat(row["expires_at"]),
        "created_by": row["created_by"],
        "created_at": isoformat(row["created_at"]),
        "revoked_at": isoformat(row["revoked_at"]),
    }


async def create_token(
    conn: AsyncConnection, organization_id: str, spec: EnrollmentTokenSpec, actor: str
) -> tuple[dict[str, Any], str]:
    """Returns the token's view and its secret (`stve_...`), shown only this once."""
    if spec.agent_type not in AGENT_TYPES:
        raise InvalidInput(
            f"'{spec.agent_type}' is not an agent type",
            [{"path": "agent_type", "message": f"expected one of {list(AGENT_TYPES)}"}],
        )
    if not 1 <= spec.capacity <= 1000:
        raise InvalidInput(
            "capacity is out of range", [{"path": "capacity", "message": "between 1 and 1000"}]
        )
    if spec.max_uses is not None and spec.max_uses < 1:
        raise InvalidInput(
            "max_uses must be at least 1 (or null: unlimited)",
            [{"path": "max_uses", "message": "at least 1, or null"}],
        )
    if not 1 <= spec.expires_in <= MAX_EXPIRES_IN:
        raise InvalidInput(
            "expires_in is out of range",
            [{"path": "expires_in", "message": f"between 1 and {MAX_EXPIRES_IN} seconds"}],
        )
    secret = generate(TOKEN_PREFIX)
    now = utcnow()
    row = {
        "id": new_id("enr"),
        "organization_id": organization_id,
        "name": spec.name,
        "token_hash": digest(secret),
        "agent_type": spec.agent_type,
        "labels": dict(spec.labels),
        "capacity": spec.capacity,
        "max_uses": spec.max_uses,
        "uses": 0,
        "expires_at": now + timedelta(seconds=spec.expires_in),
        "created_by": actor,
        "created_at": now,
        "revoked_at": None,
    }
    await conn.execute(enrollment_tokens.insert().values(**row))
    await audit.append(
        conn,
        [
            audit.entry(
                organization_id,
                actor,
                "enrollment_token.created",
                "enrollment_token",
                row["id"],
                {
                    "name": spec.name,
                    "agent_type": spec.agent_type,
                    "labels": row["labels"],
                    "capacity": spec.capacity,
                    "max_uses": spec.max_uses,
                    "expires_at": isoformat(row["expires_at"]),
                },
                at=now,
            )
        ],
    )
    return token_view(row, now), secret


async def list_tokens(conn: AsyncConnection, organization_id: str) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(enrollment_tokens)
        .where(enrollment_tokens.c.organization_id == organization_id)
        .order_by(enrollment_tokens.c.id.desc())
    )
    now = utcnow()
    return [token_view(row, now) for row in rows.mappings()]


async def get_token(conn: AsyncConnection, organization_id: str, token_id: str) -> Any:
    row = (
        (
            await conn.execute(
                sa.select(enrollment_tokens).where(
                    enrollment_tokens.c.organization_id == organization_id,
                    enrollment_tokens.c.id == token_id,
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no enrollment token '{token_id}'")
    return row


async def revoke_token(
    conn: AsyncConnection, organization_id: str, token_id: str, actor: str
) -> dict[str, Any]:
    """No agent can enroll with it from now on; agents it enrolled keep working.
    Revoking a revoked token changes nothing."""
    row = await get_token(conn, organization_id, token_id)
    if row["revoked_at"] is not None:
        return token_view(row)
    now = utcnow()
    await conn.execute(
        enrollment_tokens.update()
        .where(enrollment_tokens.c.id == token_id, enrollment_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    await audit.append(
        conn,
        [
            audit.entry(
                organization_id,
                actor,
                "enrollment_token.revoked",
                "enrollment_token",
                token_id,
                {"name": row["name"], "uses": row["uses"]},
                at=now,
            )
        ],
    )
    return token_view({**row, "revoked_at": now}, now)


async def _why_refused(conn: AsyncConnection, token_hash: str) -> str:
    row = (
        (
            await conn.execute(
                sa.select(enrollment_tokens).where(enrollment_tokens.c.token_hash == token_hash)
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        return "unknown enrollment token"
    return {
        "revoked": "this enrollment token is revoked",
        "expired": "this enrollment token has expired",
        "used_up": "this enrollment token has no uses left",
    }.get(token_state(row), "this enrollment token cannot be used")


async def enroll(conn: AsyncConnection, request: Enrollment) -> tuple[dict[str, Any], str]:
    """Exchange a token for a new agent: returns the agent's row and its credential.

    401 (nothing created, no use consumed) for an unknown, revoked, expired or used-up
    token; 409 for a name the organization already uses. Call inside a write transaction:
    a failure after the use was taken rolls it back with everything else.
    """
    token_hash = digest(request.token)
    now = utcnow()
    t = enrollment_tokens.c
    taken = (
        (
            await conn.execute(
                enrollment_tokens.update()
                .where(
                    t.token_hash == token_hash,
                    t.revoked_at.is_(None),
                    sa.or_(t.max_uses.is_(None), t.uses < t.max_uses),
                    sa.or_(t.expires_at.is_(None), t.expires_at > now),
                )
                .values(uses=t.uses + 1)
                .returning(
                    t.id,
                    t.organization_id,
                    t.name,
                    t.agent_type,
                    t.labels,
                    t.capacity,
                    t.uses,
                    t.max_uses,
                )
            )
        )
        .mappings()
        .first()
    )
    if taken is None:
        raise Unauthorized(await _why_refused(conn, token_hash))
    actor = f"enrollment_token:{taken['id']}"
    # The operator's labels win over what the agent asks for.
    labels = {**request.labels, **(taken["labels"] or {})}
    try:
        row, credential = await create_agent(
            conn,
            taken["organization_id"],
            name=request.name,
            type=taken["agent_type"],
            labels=labels,
            capacity=taken["capacity"],
            actor=actor,
        )
    except IntegrityError:  # a concurrent create took the name after the check
        raise Conflict(f"an agent named '{request.name}' already exists") from None
    extra = {
        "enrollment_token_id": taken["id"],
        "hostname": request.hostname,
        "version": request.version,
        "os": request.os,
    }
    await conn.execute(agents.update().where(agents.c.id == row["id"]).values(**extra))
    await audit.append(
        conn,
        [
            audit.entry(
                taken["organization_id"],
                actor,
                "enrollment_token.used",
                "enrollment_token",
                taken["id"],
                {
                    "agent_id": row["id"],
                    "agent_name": request.name,
                    "uses": taken["uses"],
                    "max_uses": taken["max_uses"],
                    "hostname": request.hostname,
                },
                at=now,
            )
        ],
    )
    return await get_agent(conn, taken["organization_id"], row["id"]), credential
