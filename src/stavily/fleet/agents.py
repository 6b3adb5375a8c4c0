"""Agents: creation, credential checks, coalesced heartbeats and which work an agent may take."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import re2  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict, Forbidden, NotFound, Unauthorized
from stavily.ids import new_id
from stavily.security import agent_tokens
from stavily.security.credentials import CredentialCache, digest, generate
from stavily.store.db import Database
from stavily.store.models import agents, instructions
from stavily.timeutil import isoformat, utcnow

AGENT_TYPES = ("action", "sensor")
ACTIVE_INSTRUCTION = ("leased", "executing")


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


_IDENTITY_COLUMNS = (
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


def _identity(row: Any) -> AgentIdentity:
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
    await conn.execute(agents.insert().values(**row))
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


def agent_view(row: Any, pending: dict[str, Any] | None = None) -> dict[str, Any]:
    """An agent as the private API shows it, with heartbeats not yet flushed applied."""
    data = dict(row)
    data.pop("credential_hash", None)
    if pending:
        data["last_heartbeat_at"] = max(
            filter(None, [data.get("last_heartbeat_at"), pending["last_heartbeat_at"]])
        )
        if data["status"] != "disabled":
            data["status"] = pending["status"]
    for key in ("created_at", "last_heartbeat_at"):
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
        key, where = f"agent:{claims['sub']}", agents.c.id == str(claims["sub"])
    else:
        key, where = digest(credential), agents.c.credential_hash == digest(credential)
    identity = cache.get(key)
    if identity is None:
        async with db.read() as conn:
            row = (await conn.execute(sa.select(*_IDENTITY_COLUMNS).where(where))).first()
        if row is None:
            raise Unauthorized("unknown agent credential")
        identity = _identity(row)
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


def _labels_match(have: dict[str, str], want: dict[str, str]) -> bool:
    return all(have.get(key) == value for key, value in want.items())


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


class HeartbeatBuffer:
    """Heartbeats land in memory and are written in one batch per flush interval.

    Ten thousand agents beating every few seconds would otherwise be thousands of
    transactions a second; a lost batch on a crash costs only a few seconds of liveness.
    """

    def __init__(self, lease_grace: int) -> None:
        self.lease_grace = lease_grace
        self._pending: dict[str, dict[str, Any]] = {}
        self._flushing: dict[str, dict[str, Any]] = {}

    def record(self, agent_id: str, status: str, at: datetime | None = None, **facts: Any) -> None:
        entry = self._pending.setdefault(agent_id, {})
        entry.update({k: v for k, v in facts.items() if v is not None})
        entry["status"] = status
        entry["last_heartbeat_at"] = at or utcnow()

    def pending(self, agent_id: str) -> dict[str, Any] | None:
        # A batch being written is still the truth until its transaction commits.
        beat = self._pending.get(agent_id) or self._flushing.get(agent_id)
        return dict(beat) if beat else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {**self._flushing, **{k: dict(v) for k, v in self._pending.items()}}

    async def flush(self, db: Database) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        self._flushing = batch
        try:
            await self._write(db, batch)
        except BaseException:
            # Keep what newer heartbeats have not superseded, for the next flush.
            for agent_id, beat in batch.items():
                self._pending.setdefault(agent_id, beat)
            raise
        finally:
            self._flushing = {}
        return len(batch)

    async def _write(self, db: Database, batch: dict[str, dict[str, Any]]) -> None:
        rows = [
            {
                "b_id": agent_id,
                "b_status": beat["status"],
                "b_at": beat["last_heartbeat_at"],
                "b_version": beat.get("version"),
                "b_hostname": beat.get("hostname"),
            }
            for agent_id, beat in batch.items()
        ]
        update_agents = (
            agents.update()
            .where(agents.c.id == sa.bindparam("b_id"), agents.c.status != "disabled")
            .values(
                status=sa.bindparam("b_status"),
                last_heartbeat_at=sa.bindparam("b_at"),
                version=sa.func.coalesce(sa.bindparam("b_version"), agents.c.version),
                hostname=sa.func.coalesce(sa.bindparam("b_hostname"), agents.c.hostname),
            )
        )
        alive = [agent_id for agent_id, beat in batch.items() if beat["status"] != "offline"]
        extended = utcnow() + timedelta(seconds=self.lease_grace)
        async with db.write() as conn:
            await conn.execute(update_agents, rows)
            if alive:
                # A heartbeat extends the lease of the agent's running instructions.
                await conn.execute(
                    instructions.update()
                    .where(
                        instructions.c.agent_id.in_(alive),
                        instructions.c.status.in_(ACTIVE_INSTRUCTION),
                        instructions.c.lease_expires_at < extended,
                    )
                    .values(lease_expires_at=extended)
                )
