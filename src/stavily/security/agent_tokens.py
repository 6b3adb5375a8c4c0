"""Short-lived agent JWTs, signed by the orchestrator with a key every replica shares."""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from stavily.errors import Unauthorized
from stavily.store.db import Database
from stavily.store.models import server_keys
from stavily.timeutil import utcnow

KEY_NAME = "agent-jwt-hs256"
ALGORITHM = "HS256"


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2 and credential.startswith("eyJ")


async def signing_key(db: Database) -> str:
    """The shared signing key, created by whichever replica starts first."""
    query = sa.select(server_keys.c.value).where(server_keys.c.name == KEY_NAME)
    async with db.read() as conn:
        key = await conn.scalar(query)
    if key is None:
        try:
            async with db.write() as conn:
                key = secrets.token_hex(32)
                await conn.execute(
                    server_keys.insert().values(name=KEY_NAME, value=key, created_at=utcnow())
                )
        except IntegrityError:  # another replica made it first: use theirs
            async with db.read() as conn:
                key = await conn.scalar(query)
    return str(key)


def issue(key: str, agent_id: str, organization_id: str, ttl_seconds: int) -> str:
    now = int(time.time())
    claims = {
        "sub": agent_id,
        "org": organization_id,
        "typ": "agent",
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(key: str, token: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[ALGORITHM], options={"require": ["sub", "exp", "iat"]}
        )
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid agent token: {exc}") from None
    if claims.get("typ") != "agent":
        raise Unauthorized("invalid agent token: not an agent token")
    return claims
