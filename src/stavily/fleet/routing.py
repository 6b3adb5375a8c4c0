"""Routing: which eligible agent a queued step goes to first.

Agents pull their work, so a choice is a preference among the agents waiting for work
right now (in a long poll): the chosen one takes it at once, and if it does not, any
eligible agent may after a short window. With fewer than two such agents there is nothing
to choose and whoever polls first takes the work. Strategies:
- `least_loaded` (default): the agent with the lowest running/capacity, online or busy
  before degraded, then by name.
- `round_robin`: eligible waiting agents in turn, per selector (kept by each replica).
- `sticky`: the agent that ran this execution's latest step, waiting or not, if it is still
  eligible and has room (held for longer); otherwise least loaded.
Whatever the strategy, a step of a pinned plugin version goes to a waiting agent that has
that version, when one does (`holders`): the others would download it first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily.fleet.agents import AgentIdentity, eligible
from stavily.fleet.liveness import LIVE
from stavily.store.models import ACTIVE_INSTRUCTION, agents, instructions, one_of, step_runs


@dataclass(frozen=True)
class Preference:
    agent_id: str
    until: datetime


class Router:
    def __init__(
        self,
        prefer_seconds: float,
        sticky_seconds: float,
        holders: Callable[[str, str], set[str]] | None = None,
    ) -> None:
        self.prefer_seconds = prefer_seconds
        self.sticky_seconds = sticky_seconds
        # the agents known to have (plugin id, sha256): plugins.installs.Installs.holders
        self.holders = holders
        self._turns: dict[str, int] = {}

    async def choose(
        self,
        conn: AsyncConnection,
        organization_id: str,
        agent_type: str,
        selector: dict[str, Any],
        execution_id: str,
        now: datetime,
        waiting: set[str],
        pinned: tuple[str, str] | None = None,
    ) -> Preference | None:
        """`pinned`: the step's plugin and the sha256 of its pinned version, if any."""
        strategy = selector.get("strategy") or "least_loaded"
        if strategy != "sticky" and len(waiting) < 2:
            return None  # no choice to make: spare the query
        running = (
            sa.select(sa.func.count())
            .where(
                instructions.c.agent_id == agents.c.id,
                one_of(instructions.c.status, ACTIVE_INSTRUCTION),
            )
            .scalar_subquery()
        )
        query = sa.select(
            agents.c.id,
            agents.c.name,
            agents.c.labels,
            agents.c.capacity,
            agents.c.status,
            running.label("running"),
        ).where(
            agents.c.organization_id == organization_id,
            agents.c.type == agent_type,
            # states as literals: with bound values, PostgreSQL planned it at every call
            one_of(agents.c.admin_state, ["active"]),
            agents.c.revoked_at.is_(None),
            one_of(agents.c.status, LIVE),
        )
        if selector.get("single_agent"):
            query = query.where(agents.c.name == selector["single_agent"])
        candidates = [
            row
            for row in await conn.execute(query)
            if row.running < row.capacity
            and eligible(
                AgentIdentity(
                    row.id,
                    organization_id,
                    row.name,
                    agent_type,
                    row.labels,
                    row.capacity,
                    row.status,
                ),
                selector,
            )
        ]
        if strategy == "sticky" and len(candidates) > 1:
            last = await conn.scalar(
                sa.select(step_runs.c.agent_id)
                .where(step_runs.c.execution_id == execution_id, step_runs.c.agent_id.is_not(None))
                .order_by(step_runs.c.started_at.desc())
                .limit(1)
            )
            if last in {c.id for c in candidates}:
                return Preference(last, now + timedelta(seconds=self.sticky_seconds))
        candidates = [c for c in candidates if c.id in waiting]
        if len(candidates) < 2:
            return None  # nothing to choose: whoever polls first takes it
        if pinned is not None and self.holders is not None:
            have = self.holders(*pinned)
            candidates = [c for c in candidates if c.id in have] or candidates
        if strategy == "round_robin":
            ordered = sorted(candidates, key=lambda c: c.name)
            key = json.dumps(selector, sort_keys=True)
            turn = self._turns.get(key, -1) + 1
            self._turns[key] = turn
            choice = ordered[turn % len(ordered)]
        else:
            choice = min(
                candidates,
                key=lambda c: (c.status == "degraded", c.running / c.capacity, c.running, c.name),
            )
        return Preference(choice.id, now + timedelta(seconds=self.prefer_seconds))
