"""What operators do to agents (drain, disable, enable, revoke, rotate) and the fleet summary.

Every change is one conditional UPDATE with its audit record in the caller's transaction.
The agent API trusts a checked credential for `credential_cache_seconds`; the caller clears
its replica's cache after each change (so this replica applies it at once) and other
replicas apply it when their cached entry runs out.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict
from stavily.fleet.agents import agent_view, get_agent, holding
from stavily.fleet.liveness import LIVE
from stavily.security.credentials import digest, generate
from stavily.store.models import QUEUED, agents, instructions
from stavily.timeutil import utcnow

AdminState = Literal["active", "draining", "disabled"]
SHOWN_STATES = ("online", "busy", "degraded", "offline", "draining", "disabled", "revoked")
_ACTIONS = {"active": "agent.enabled", "draining": "agent.drained", "disabled": "agent.disabled"}


def admin_view(
    row: Any, pending: dict[str, Any] | None = None, held: int | None = None
) -> dict[str, Any]:
    """The private API's agent view plus `state` (the shown status, see agent_view)."""
    view = agent_view(row, pending, held)
    view["state"] = view["status"]
    return view


async def _changed(
    conn: AsyncConnection,
    organization_id: str,
    agent_id: str,
    values: dict[str, Any],
    action: str,
    actor: str,
    details: dict[str, Any],
    now: datetime,
) -> Any:
    """Apply `values` unless the agent was revoked meanwhile; audit; return the new row."""
    done = await conn.execute(
        agents.update()
        .where(
            agents.c.organization_id == organization_id,
            agents.c.id == agent_id,
            agents.c.revoked_at.is_(None),
        )
        .values(**values)
    )
    if done.rowcount != 1:
        raise Conflict(f"agent '{agent_id}' is revoked")
    await audit.append(
        conn, [audit.entry(organization_id, actor, action, "agent", agent_id, details, at=now)]
    )
    return await get_agent(conn, organization_id, agent_id)


async def set_admin_state(
    conn: AsyncConnection, organization_id: str, agent_id: str, state: AdminState, actor: str
) -> Any:
    """draining: the agent finishes and reports what it runs but is given nothing new;
    disabled: every request of the agent gets 403; active: back to normal. A revoked agent
    cannot be changed (409). Asking for the state the agent is in changes nothing."""
    row = await get_agent(conn, organization_id, agent_id)
    if row["revoked_at"] is not None:
        raise Conflict(f"agent '{agent_id}' is revoked; a revoked agent cannot be changed")
    if row["admin_state"] == state:
        return row
    now = utcnow()
    return await _changed(
        conn,
        organization_id,
        agent_id,
        {"admin_state": state},
        _ACTIONS[state],
        actor,
        {"from": row["admin_state"], "to": state, "name": row["name"]},
        now,
    )


async def revoke(conn: AsyncConnection, organization_id: str, agent_id: str, actor: str) -> Any:
    """For good: every request of the agent gets 403 and it cannot be enabled again.
    Revoking a revoked agent changes nothing."""
    row = await get_agent(conn, organization_id, agent_id)
    if row["revoked_at"] is not None:
        return row
    now = utcnow()
    return await _changed(
        conn,
        organization_id,
        agent_id,
        {"revoked_at": now},
        "agent.revoked",
        actor,
        {"name": row["name"], "admin_state": row["admin_state"]},
        now,
    )


async def rotate_credential(
    conn: AsyncConnection, organization_id: str, agent_id: str, actor: str
) -> tuple[Any, str]:
    """A new API key, returned once; the old key and every JWT issued before are refused.

    JWTs carry whole-second `iat`s, so `credential_issued_at` is set to the next whole
    second: a JWT issued in the same second, before the rotation, is refused too. A JWT
    asked for in what is left of that second has to wait for it (see api/fleet.py).
    """
    row = await get_agent(conn, organization_id, agent_id)
    if row["revoked_at"] is not None:
        raise Conflict(f"agent '{agent_id}' is revoked; its credential cannot be replaced")
    credential = generate("stva")
    now = utcnow()
    issued = now.replace(microsecond=0) + timedelta(seconds=1)
    row = await _changed(
        conn,
        organization_id,
        agent_id,
        {"credential_hash": digest(credential), "credential_issued_at": issued},
        "agent.credential_rotated",
        actor,
        {"name": row["name"]},
        now,
    )
    return row, credential


def selector_key(selector: Any) -> str:
    """One stable string per selector, whatever order its JSON was written in."""
    return json.dumps(selector, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


async def fleet_summary(
    conn: AsyncConnection, organization_id: str, pending: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Counts of the organization's agents by shown state, type, label and version; the
    capacity they offer and use; and the instructions waiting for an agent.

    `pending` is the heartbeat buffer's snapshot, taken by the caller before this read.
    """
    rows = (
        (
            await conn.execute(
                sa.select(
                    agents.c.id,
                    agents.c.type,
                    agents.c.labels,
                    agents.c.capacity,
                    agents.c.status,
                    agents.c.admin_state,
                    agents.c.revoked_at,
                    agents.c.version,
                ).where(agents.c.organization_id == organization_id)
            )
        )
        .mappings()
        .all()
    )
    in_use = await holding(conn, organization_id)
    waiting: Counter[str] = Counter()
    selector_text = sa.cast(instructions.c.selector, sa.Text)
    for text, count in await conn.execute(
        sa.select(selector_text, sa.func.count())
        .where(
            instructions.c.organization_id == organization_id,
            QUEUED,
        )
        .group_by(selector_text)
    ):
        # The same selector may have been written with its keys in another order.
        waiting[selector_key(json.loads(text) if text is not None else None)] += int(count)

    by_state: Counter[str] = Counter(dict.fromkeys(SHOWN_STATES, 0))
    by_type: Counter[str] = Counter()
    by_label: Counter[str] = Counter()
    by_version: Counter[str] = Counter()
    total = available = 0
    for row in rows:
        beat = pending.get(row["id"])
        state = agent_view(row, beat, in_use.get(row["id"], 0))["status"]
        by_state[state] += 1
        by_type[row["type"]] += 1
        for key, value in sorted((row["labels"] or {}).items()):
            by_label[f"{key}={value}"] += 1
        by_version[(beat or {}).get("version") or row["version"] or "unknown"] += 1
        if state in ("revoked", "disabled"):
            continue
        total += row["capacity"]
        if state in LIVE:
            available += max(0, row["capacity"] - in_use.get(row["id"], 0))
    return {
        "agents": len(rows),
        "by_state": dict(by_state),
        "by_type": dict(sorted(by_type.items())),
        "by_label": dict(sorted(by_label.items())),
        "by_version": dict(sorted(by_version.items())),
        "capacity": {"total": total, "in_use": sum(in_use.values()), "available": available},
        "waiting": {"total": sum(waiting.values()), "by_selector": dict(sorted(waiting.items()))},
    }
