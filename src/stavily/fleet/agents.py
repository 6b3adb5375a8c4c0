"""Agents: creation, credential checks, coalesced heartbeats and which work an agent may take."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import re2  # type: ignore[import-untyped]
import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict, Forbidden, NotFound, Unauthorized
from stavily.ids import new_id
from stavily.security import agent_tokens
from stavily.security.credentials import CredentialCache, digest, generate
from stavily.store.db import Database
from stavily.store.models import ACTIVE_INSTRUCTION, agents, instructions, one_of
from stavily.timeutil import isoformat, utcnow

log = structlog.get_logger("stavily.fleet")

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


async def holding(
    conn: AsyncConnection, organization_id: str, agent_id: str | None = None
) -> dict[str, int]:
    """How many instructions each agent holds (leased or executing), by agent id."""
    query = sa.select(instructions.c.agent_id, sa.func.count()).where(
        instructions.c.organization_id == organization_id,
        one_of(instructions.c.status, ACTIVE_INSTRUCTION),
    )
    if agent_id is not None:
        query = query.where(instructions.c.agent_id == agent_id)
    rows = await conn.execute(query.group_by(instructions.c.agent_id))
    return {held_by: int(count) for held_by, count in rows}


def agent_view(
    row: Any, pending: dict[str, Any] | None = None, held: int | None = None
) -> dict[str, Any]:
    """An agent as the private API shows it, with heartbeats not yet flushed applied,
    and busy as it is now when `held` (the instructions it holds) is given.

    `status` is what an operator needs first: the operator's state when the agent is not
    active (draining, disabled, revoked), else its health (online, busy, degraded,
    offline: see fleet.liveness).
    """
    data = dict(row)
    for key in ("credential_hash", "late_at", "dead_at"):
        data.pop(key, None)
    if pending:
        for key in ("status", "version", "hostname", "os"):
            if pending.get(key) is not None:
                data[key] = pending[key]
        if pending.get("facts"):
            data["facts"] = pending["facts"]
        data["last_heartbeat_at"] = max(
            filter(None, [data.get("last_heartbeat_at"), pending["last_heartbeat_at"]])
        )
    if held is not None and data["status"] in ("online", "busy"):
        data["status"] = "busy" if held else "online"
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


class AgentLookups:
    """Credential look-ups, gathered: those that missed the cache into one query per turn
    of the event loop (ten thousand agents calling a server that just started, nothing
    cached, cost a few queries, not ten thousand), and the background refreshes of cached
    ones into one query a second."""

    REFRESH_EVERY = 1.0
    AT_ONCE = 250

    def __init__(self, db: Database) -> None:
        self.db = db
        self._waiting: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._stale: dict[tuple[str, str], tuple[CredentialCache[AgentIdentity], str]] = {}
        self._running: set[asyncio.Task[None]] = set()

    def find(self, by: str, key: str) -> asyncio.Future[Any]:
        """The agent's row (IDENTITY_COLUMNS) by its credential's digest (`by="hash"`) or
        its id (`by="id"`), or None."""
        future = self._waiting.get((by, key))
        if future is None:
            if not self._waiting:
                self._start(self._answer())
            future = self._waiting[(by, key)] = asyncio.get_running_loop().create_future()
        return future

    def refresh(
        self, cache: CredentialCache[AgentIdentity], cache_key: str, by: str, key: str
    ) -> None:
        """Look a cached identity up again in the background (see CredentialCache.due)."""
        if not self._stale:
            self._start(self._refresh())
        self._stale[(by, key)] = (cache, cache_key)

    def _start(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _answer(self) -> None:
        await asyncio.sleep(0)  # the requests of this turn join in
        batch, self._waiting = self._waiting, {}
        try:
            found = await self._query(list(batch))
        except BaseException as exc:
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for wanted, future in batch.items():
            if not future.done():
                future.set_result(found.get(wanted))

    async def _refresh(self) -> None:
        await asyncio.sleep(self.REFRESH_EVERY)
        batch, self._stale = self._stale, {}
        try:
            found = await self._query(list(batch))
        except Exception:
            log.exception("refreshing cached agent credentials failed", count=len(batch))
            return  # they expire as they would have; a request then looks them up
        for wanted, (cache, cache_key) in batch.items():
            row = found.get(wanted)
            if row is None:
                cache.discard(cache_key)
            else:
                cache.put(cache_key, identity_of(row))

    async def _query(self, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """In queries of AT_ONCE keys, letting the event loop run between them: turning
        rows into identities costs tens of microseconds each."""
        found: dict[tuple[str, str], Any] = {}
        async with self.db.read() as conn:
            for by, column in (("hash", agents.c.credential_hash), ("id", agents.c.id)):
                keys = sorted(key for kind, key in wanted if kind == by)
                for i in range(0, len(keys), self.AT_ONCE):
                    if i:
                        await asyncio.sleep(0)
                    query = sa.select(*IDENTITY_COLUMNS, agents.c.credential_hash)
                    chunk = keys[i : i + self.AT_ONCE]
                    for row in await conn.execute(query.where(column.in_(chunk))):
                        found[(by, row.credential_hash if by == "hash" else row.id)] = row
        return found


async def authenticate_agent(
    lookups: AgentLookups,
    credential: str | None,
    path_agent_id: str | None,
    cache: CredentialCache[AgentIdentity],
    jwt_key: str | None = None,
) -> AgentIdentity:
    """The agent behind a credential: its API key, or a JWT the orchestrator issued.

    401 for no, unknown or expired credential; 403 for another agent's path (unless
    `path_agent_id` is None: a route without one checks), or an agent that is revoked
    or disabled.
    """
    if not credential:
        raise Unauthorized("missing bearer credential")
    claims = None
    if jwt_key and agent_tokens.looks_like_jwt(credential):
        claims = agent_tokens.verify(jwt_key, credential)
        by, lookup, key = "id", str(claims["sub"]), f"agent:{claims['sub']}"
    else:
        key = digest(credential)
        by, lookup = "hash", key
    identity = cache.get(key)
    if identity is None:
        # shielded: one request given up must not cancel the others' shared look-up
        row = await asyncio.shield(lookups.find(by, lookup))
        if row is None:
            raise Unauthorized("unknown agent credential")
        identity = identity_of(row)
        cache.put(key, identity)
    elif cache.due(key):
        lookups.refresh(cache, key, by, lookup)
    if claims is not None and claims["iat"] < int(identity.credential_issued_at):
        raise Unauthorized("this token was issued before the agent's credential was replaced")
    if path_agent_id is not None and identity.id != path_agent_id:
        raise Forbidden("this credential does not belong to that agent")
    if identity.revoked:
        raise AgentRefused("this agent's credential is revoked", identity)
    if identity.admin_state == "disabled":
        raise AgentRefused("this agent is disabled", identity)
    return identity


class AgentRefused(Forbidden):
    """A known agent refused (revoked, disabled): recorded as a denied attempt in its own
    organization's audit log, the agent as its subject."""

    def __init__(self, message: str, identity: AgentIdentity) -> None:
        super().__init__(message)
        self.organization_id, self.token_id = identity.organization_id, identity.id


@lru_cache(maxsize=4096)
def regex(pattern: str) -> Any:
    """RE2, compiled once: linear time whatever the pattern and the text, so no
    workflow's pattern stalls the claim path, nor an event's payload its rules."""
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
        (not pool.get("agent_regex") or regex(pool["agent_regex"]).fullmatch(agent.name))
        and _labels_match(agent.labels, pool.get("labels") or {})
        for pool in pools
    )
