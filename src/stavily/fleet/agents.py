"""Agents: creation, credential checks, coalesced heartbeats and which work an agent may take."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import re2  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict, Forbidden, NotFound, Unauthorized
from stavily.ids import new_id
from stavily.security import agent_tokens
from stavily.security.credentials import CredentialCache, digest, generate
from stavily.store.db import Database
from stavily.store.models import agents
from stavily.timeutil import isoformat, utcnow

AGENT_TYPES = ("action", "sensor")


@dataclass(frozen=True)
class AgentIdentity:
    id: str
    organization_id: str
    name: str
    type: str
    labels: dict[str, str]
    capacity: int
    status: str
    admin_state: str = "active"
    revoked: bool = False
    credential_issued_at: float = 0.0  # JWTs issued before this are no longer valid

    @property
    def actor(self) -> str:
        return f"agent:{self.id}"


IDENTITY_COLUMNS = (
    agents.c.id,
    agents.c.organization_id,
    agents.c.name,
    agents.c.type,
    agents.c.labels,
    agents.c.capacity,
    agents.c.status,
    agents.c.admin_state,
    agents.c.revoked_at,
    agents.c.credential_issued_at,
    agents.c.created_at,
)


def identity_of(row: Any) -> AgentIdentity:
    issued = row.credential_issued_at or row.created_at
    return AgentIdentity(
        row.id,
        row.organization_id,
        row.name,
        row.type,
        row.labels,
        row.capacity,
        row.status,
        row.admin_state,
        row.revoked_at is not None,
        issued.timestamp(),
    )


async def create_agent(
    conn: AsyncConnection,
    organization_id: str,
    *,
    name: str,
    type: str,
    labels: dict[str, str],
    capacity: int,
    actor: str,
) -> tuple[dict[str, Any], str]:
    """Returns the agent and its credential, which is stored only as a digest."""
    taken = await conn.scalar(
        sa.select(agents.c.id).where(
            agents.c.organization_id == organization_id, agents.c.name == name
        )
    )
    if taken:
        raise Conflict(f"an agent named '{name}' already exists", {"agent_id": taken})
    credential = generate("stva")
    now = utcnow()
    row = {
        "id": new_id("agt"),
        "organization_id": organization_id,
        "name": name,
        "type": type,
        "labels": labels,
        "capacity": capacity,
        "status": "offline",
        "credential_hash": digest(credential),
        "created_at": now,
        "credential_issued_at": now,
        "admin_state": "active",
    }
    try:
        async with conn.begin_nested():
            await conn.execute(agents.insert().values(**row))
    except IntegrityError:  # the same name created at the same moment
        raise Conflict(f"an agent named '{name}' already exists") from None
    await audit.append(
        conn,
        [
            audit.entry(
                organization_id,
                actor,
                "agent.created",
                "agent",
                row["id"],
                {"name": name, "type": type, "labels": labels},
                at=now,
            )
        ],
    )
    return row, credential


def shown_status(agent: Any) -> str:
    """Revoked, else the operator's state unless active, else health."""
    if agent.get("revoked_at"):
        return "revoked"
    if agent.get("admin_state", "active") != "active":
        return str(agent["admin_state"])
    return str(agent["status"])


def agent_view(row: Any, pending: dict[str, Any] | None = None) -> dict[str, Any]:
    """An agent as the private API shows it, with heartbeats not yet flushed applied.

    `status` is what an operator needs first: the operator's state when the agent is not
    active (draining, disabled, revoked), else its health (online, busy, degraded,
    offline: see fleet.liveness).
    """
    data = dict(row)
    for key in ("credential_hash", "late_at", "dead_at"):
        data.pop(key, None)
    if pending:
        # Whether it holds work is known at the next flush: until then, busy stays busy.
        keep_busy = data["status"] == "busy" and pending.get("status") == "online"
        for key in ("status", "version", "hostname", "os"):
            if pending.get(key) is not None and not (key == "status" and keep_busy):
                data[key] = pending[key]
        if pending.get("facts"):
            data["facts"] = pending["facts"]
        data["last_heartbeat_at"] = max(
            filter(None, [data.get("last_heartbeat_at"), pending["last_heartbeat_at"]])
        )
    data["health"] = data["status"]
    data["status"] = shown_status(data)
    for key in ("created_at", "last_heartbeat_at", "revoked_at", "credential_issued_at"):
        data[key] = isoformat(data.get(key))
    return data


async def list_agents(conn: AsyncConnection, organization_id: str) -> list[Any]:
    rows = await conn.execute(
        sa.select(agents).where(agents.c.organization_id == organization_id).order_by(agents.c.name)
    )
    return list(rows.mappings())


async def get_agent(conn: AsyncConnection, organization_id: str, agent_id: str) -> Any:
    row = (
        (
            await conn.execute(
                sa.select(agents).where(
                    agents.c.organization_id == organization_id, agents.c.id == agent_id
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no agent '{agent_id}'")
    return row


async def authenticate_agent(
    db: Database,
    credential: str | None,
    path_agent_id: str,
    cache: CredentialCache[AgentIdentity],
    jwt_key: str | None = None,
) -> AgentIdentity:
    """The agent behind a credential: its API key, or a JWT the orchestrator issued.

    401 for no, unknown or expired credential; 403 for another agent's path, or an agent
    that is revoked or disabled.
    """
    if not credential:
        raise Unauthorized("missing bearer credential")
    claims = None
    if jwt_key and agent_tokens.looks_like_jwt(credential):
        claims = agent_tokens.verify(jwt_key, credential)
        key = f"agent:{claims['sub']}"
    else:
        key = digest(credential)
    identity = cache.get(key)
    if identity is None:
        if claims is not None:
            where = agents.c.id == str(claims["sub"])
        else:
            where = agents.c.credential_hash == key
        async with db.read() as conn:
            row = (await conn.execute(sa.select(*IDENTITY_COLUMNS).where(where))).first()
        if row is None:
            raise Unauthorized("unknown agent credential")
        identity = identity_of(row)
        cache.put(key, identity)
    if claims is not None and claims["iat"] < int(identity.credential_issued_at):
        raise Unauthorized("this token was issued before the agent's credential was replaced")
    if identity.id != path_agent_id:
        raise Forbidden("this credential does not belong to that agent")
    if identity.revoked:
        raise Forbidden("this agent's credential is revoked")
    if identity.admin_state == "disabled":
        raise Forbidden("this agent is disabled")
    return identity


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> Any:
    # RE2 matches in linear time: no workflow's pattern can stall the claim path.
    return re2.compile(pattern)


def _labels_match(have: dict[str, str], want: dict[str, Any]) -> bool:
    """Every rule holds: a string equals, a list contains, an expression tests
    `exists`, `in` or `not_in`."""
    for key, rule in want.items():
        value = have.get(key)
        if isinstance(rule, str):
            ok = value == rule
        elif isinstance(rule, list):
            ok = value in rule
        else:
            ok = (
                ("exists" not in rule or (key in have) == rule["exists"])
                and ("in" not in rule or value in rule["in"])
                and ("not_in" not in rule or value not in rule["not_in"])
            )
        if not ok:
            return False
    return True


def eligible(agent: AgentIdentity, selector: dict[str, Any]) -> bool:
    """Whether the agent satisfies a step's resolved selection (single agent, pools, labels)."""
    single = selector.get("single_agent")
    if single and agent.name != single:
        return False
    if not _labels_match(agent.labels, selector.get("labels") or {}):
        return False
    pools = selector.get("pools") or []
    if not pools:
        return True
    return any(
        (not pool.get("agent_regex") or _regex(pool["agent_regex"]).fullmatch(agent.name))
        and _labels_match(agent.labels, pool.get("labels") or {})
        for pool in pools
    )
