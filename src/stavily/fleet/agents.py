"""Agents: creation, credential checks, coalesced heartbeats and which work an agent may take."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import re2  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.config import Settings
from stavily.errors import Conflict, Forbidden, NotFound, Unauthorized
from stavily.ids import new_id
from stavily.security import agent_tokens
from stavily.security.credentials import CredentialCache, digest, generate
from stavily.store.db import Database
from stavily.store.models import ACTIVE_INSTRUCTION, agents, instructions, one_of
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
    active (draining, disabled, revoked), else its health (online, degraded, offline).
    """
    data = dict(row)
    for key in ("credential_hash", "late_at", "dead_at"):
        data.pop(key, None)
    if pending:
        for key in ("status", "version", "hostname", "os"):
            if pending.get(key) is not None:
                data[key] = pending[key]
        if pending.get("status") is None and data["status"] == "offline":
            data["status"] = "online"  # any request from it shows it is alive (as flushed)
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


async def restart_deadlines(db: Database, now: datetime | None = None) -> int:
    """A server starting was not there to hear its agents: each live agent's silence counts
    from now, with the window its last sign of life gave it, so a server's own downtime
    never makes its fleet look dead (and their running work is not taken back for it).
    Deadlines only move later. Returns how many agents were given time."""
    now = now or utcnow()
    async with db.write() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    agents.c.id, agents.c.last_heartbeat_at, agents.c.late_at, agents.c.dead_at
                ).where(
                    agents.c.status.in_(("online", "degraded")),
                    agents.c.dead_at.is_not(None),
                    agents.c.last_heartbeat_at.is_not(None),
                )
            )
        ).all()
        moved = [
            {
                "b_id": row.id,
                "b_late": now + (row.late_at - row.last_heartbeat_at) if row.late_at else None,
                "b_dead": now + (row.dead_at - row.last_heartbeat_at),
            }
            for row in rows
            if now + (row.dead_at - row.last_heartbeat_at) > row.dead_at
        ]
        if moved:
            await conn.execute(
                agents.update()
                .where(agents.c.id == sa.bindparam("b_id"))
                .values(late_at=sa.bindparam("b_late"), dead_at=sa.bindparam("b_dead")),
                moved,
            )
    return len(moved)


class HeartbeatBuffer:
    """Heartbeats land in memory and are written in one batch per flush interval.

    Ten thousand agents beating every five seconds would otherwise be two thousand
    transactions a second; a lost batch on a crash costs only a moment of liveness.
    Each beat sets the agent's health (degraded when its figures pass the limits) and
    its deadlines: `late_at` (degraded from silence) and `dead_at` (offline).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pending: dict[str, dict[str, Any]] = {}
        self._flushing: dict[str, dict[str, Any]] = {}
        self._intervals: dict[str, float] = {}

    def _deadlines(self, agent_id: str, at: datetime) -> dict[str, Any]:
        interval = self._intervals.get(agent_id, float(self.settings.heartbeat_interval))
        return {
            "late_at": at + timedelta(seconds=interval * self.settings.degraded_after_missed),
            "dead_at": at + timedelta(seconds=interval * self.settings.offline_after_missed),
        }

    def health(self, facts: dict[str, Any]) -> tuple[str, str | None]:
        limits = {
            "cpu_percent": self.settings.degraded_cpu_percent,
            "memory_percent": self.settings.degraded_memory_percent,
            "disk_percent": self.settings.degraded_disk_percent,
        }
        for key, limit in limits.items():
            if facts.get(key) is not None and facts[key] >= limit:
                return "degraded", f"{key} {facts[key]:g} >= {limit:g}"
        return "online", None

    def record(
        self,
        agent_id: str,
        status: str,
        *,
        version: str | None = None,
        hostname: str | None = None,
        os: str | None = None,
        interval: float | None = None,
        busy: bool = False,
        facts: dict[str, Any] | None = None,
    ) -> None:
        """A heartbeat: `status` is "online" or "offline" as the agent says."""
        now = utcnow()
        if interval:
            self._intervals[agent_id] = interval
        entry = self._pending.setdefault(agent_id, {})
        entry.update(
            {
                k: v
                for k, v in (("version", version), ("hostname", hostname), ("os", os))
                if v is not None
            }
        )
        facts = dict(facts or {})
        if status == "offline":
            entry.update(status="offline", late_at=None, dead_at=None)
        else:
            entry["status"], reason = self.health(facts)
            if reason:
                facts["degraded_because"] = reason
            entry.update(self._deadlines(agent_id, now))
        if interval:
            facts["heartbeat_interval"] = interval
        entry.update(facts=facts, busy=busy, last_heartbeat_at=now, beat=True)

    def touch(self, agent_id: str) -> None:
        """Any other request from the agent: it is alive, its health is what it last said."""
        now = utcnow()
        entry = self._pending.setdefault(agent_id, {})
        if entry.get("status") == "offline":
            entry["status"] = "online"
        entry.update(last_heartbeat_at=now, **self._deadlines(agent_id, now))

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
        beats, touches = [], []
        # In id order, like every other multi-row update of agents: no lock-order deadlocks.
        for agent_id, beat in sorted(batch.items()):
            row = {
                "b_id": agent_id,
                "b_at": beat["last_heartbeat_at"],
                "b_late": beat.get("late_at"),
                "b_dead": beat.get("dead_at"),
            }
            if beat.get("beat"):
                beats.append(
                    {
                        **row,
                        "b_status": beat["status"],
                        "b_version": beat.get("version"),
                        "b_hostname": beat.get("hostname"),
                        "b_os": beat.get("os"),
                        "b_facts": beat.get("facts") or None,
                        "b_busy": bool(beat.get("busy")),
                    }
                )
            else:
                touches.append(row)
        common = {
            "last_heartbeat_at": sa.bindparam("b_at"),
            "late_at": sa.bindparam("b_late"),
            "dead_at": sa.bindparam("b_dead"),
        }
        by_id = agents.c.id == sa.bindparam("b_id")
        alive = sorted(a for a, beat in batch.items() if beat.get("status") != "offline")
        extended = utcnow() + timedelta(seconds=self.settings.lease_grace)
        async with db.write() as conn:
            if beats:
                await conn.execute(
                    agents.update()
                    .where(by_id)
                    .values(
                        **common,
                        status=sa.bindparam("b_status"),
                        version=sa.func.coalesce(sa.bindparam("b_version"), agents.c.version),
                        hostname=sa.func.coalesce(sa.bindparam("b_hostname"), agents.c.hostname),
                        os=sa.func.coalesce(sa.bindparam("b_os"), agents.c.os),
                        facts=sa.func.coalesce(
                            sa.bindparam("b_facts", type_=sa.JSON(none_as_null=True)),
                            agents.c.facts,
                        ),
                        heartbeats_while_busy=sa.bindparam("b_busy"),
                    ),
                    beats,
                )
            if touches:
                await conn.execute(
                    agents.update()
                    .where(by_id)
                    .values(
                        **common,
                        status=sa.case(
                            (agents.c.status == "offline", "online"), else_=agents.c.status
                        ),
                    ),
                    touches,
                )
            if alive:
                # A sign of life extends the lease of the agent's running instructions.
                await conn.execute(
                    instructions.update()
                    .where(
                        instructions.c.agent_id.in_(alive),
                        one_of(instructions.c.status, ACTIVE_INSTRUCTION),
                        instructions.c.lease_expires_at < extended,
                    )
                    .values(lease_expires_at=extended)
                )
