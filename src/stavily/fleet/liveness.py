"""Liveness: which agents are alive, busy, late or lost.

Every request from an agent is a sign of life. Signs land in memory (`HeartbeatBuffer`)
and are written in one batch per flush interval, each with the agent's deadlines:
`late_at` (degraded from silence) and `dead_at` (offline: its work goes elsewhere). The
sweep reads only the agents whose deadline passed (indexes on status and each deadline),
so its cost follows the agents that fell silent, never the size of the fleet.

The states, as the fleet view shows them:
- `online`: alive, holding no work;
- `busy`: holding work. The official agents run a plugin in silence (one loop for
  polling, heartbeats and running), so an agent that falls silent while it holds a lease
  within its deadline is busy, not late: its deadline becomes the end of its lease;
- `degraded`: late, or its heartbeat's figures passed the limits;
- `offline`: silent past its deadline, or it said it was going.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime, timedelta
from time import monotonic
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.config import Settings
from stavily.store.db import Database
from stavily.store.models import ACTIVE_INSTRUCTION, agents, instructions, one_of
from stavily.store.prebuilt import prebuilt
from stavily.timeutil import utcnow

log = structlog.get_logger("stavily.fleet")

LIVE = ("online", "busy", "degraded")
# what a heartbeat says of the agent, written only when it changed
SAID = ("version", "hostname", "os", "facts")
FLUSH_AT_MOST = 250  # agents written per transaction of a flush
CHUNK = 2000  # ids per IN list: well inside every driver's limit on bound values


# A flush's update of each agent heard (prebuilt: run straight on the driver).
_FLUSH = prebuilt(
    agents.update()
    .where(agents.c.id == sa.bindparam("b_id"))
    .values(
        last_heartbeat_at=sa.bindparam("b_at"),
        late_at=sa.bindparam("b_late"),
        dead_at=sa.bindparam("b_dead"),
        status=sa.bindparam("b_status"),
        version=sa.func.coalesce(sa.bindparam("b_version"), agents.c.version),
        hostname=sa.func.coalesce(sa.bindparam("b_hostname"), agents.c.hostname),
        os=sa.func.coalesce(sa.bindparam("b_os"), agents.c.os),
        facts=sa.func.coalesce(
            sa.bindparam("b_facts", type_=sa.JSON(none_as_null=True)), agents.c.facts
        ),
        heartbeats_while_busy=sa.func.coalesce(
            sa.bindparam("b_busy", type_=sa.Boolean), agents.c.heartbeats_while_busy
        ),
    )
)


# New deadlines for agents, by id (a restart, a stretched interval).
_DEADLINES = (
    agents.update()
    .where(agents.c.id == sa.bindparam("b_id"))
    .values(late_at=sa.bindparam("b_late"), dead_at=sa.bindparam("b_dead"))
)


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


async def _held(conn: AsyncConnection, agent_ids: list[str]) -> dict[str, list[Any]]:
    """The instructions each agent holds (leased or executing), by agent."""
    held: dict[str, list[Any]] = defaultdict(list)
    for chunk in _chunks(agent_ids):
        rows = await conn.execute(
            sa.select(
                instructions.c.id,
                instructions.c.agent_id,
                instructions.c.leased_at,
                instructions.c.lease_expires_at,
            ).where(
                instructions.c.agent_id.in_(chunk),
                one_of(instructions.c.status, ACTIVE_INSTRUCTION),
            )
        )
        for row in rows:
            held[row.agent_id].append(row)
    return held


async def _live(conn: AsyncConnection, now: datetime) -> int:
    """Agents within their deadlines."""
    query = sa.select(sa.func.count()).select_from(agents)
    return int(
        await conn.scalar(query.where(agents.c.status.in_(LIVE), agents.c.dead_at >= now)) or 0
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
                    agents.c.status.in_(LIVE),
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
            await conn.execute(_DEADLINES, moved)
    return len(moved)


class HeartbeatBuffer:
    """Signs of life land in memory and are written in one batch per flush interval.

    Ten thousand agents beating every five seconds would otherwise be two thousand
    transactions a second; a lost batch on a crash costs only a moment of liveness. A
    flush also does, for the whole batch at once, what each beat would otherwise cost a
    read: it extends the leases of the agents' work, sets who is busy, and finds the work
    an agent no longer reports running (`running` in our heartbeats; an official agent
    polls only when it runs nothing).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pending: dict[str, dict[str, Any]] = {}
        self._flushing: dict[str, dict[str, Any]] = {}
        self._intervals: dict[str, float] = {}  # the agents' own, from their heartbeats
        self._health: dict[str, str] = {}  # from each agent's last heartbeat's figures
        self._written: dict[str, tuple[Any, ...]] = {}  # what the last flush wrote
        self.told_interval = float(settings.heartbeat_interval)  # see stretch()
        # agents heard since _heard_since, and how many in the interval before (stretch)
        self._heard: set[str] = set()
        self._heard_before = 0
        self._heard_since = monotonic()
        # official agents: what this server handed each, and when (see overdue())
        self._handed: dict[str, dict[str, float]] = {}

    # -- signs of life -----------------------------------------------------------------------

    def interval_for(self, agent_id: str) -> float:
        """The agent's heartbeat interval: its own (if it says), or longer while the
        server stretches them (see stretch); its deadlines and its heartbeat's answer
        (`next_heartbeat_interval`) follow it."""
        base = float(self.settings.heartbeat_interval)
        interval = self._intervals.get(agent_id, base)
        if self.told_interval > base:
            interval = max(interval, self.told_interval)
        return interval

    def deadlines(self, agent_id: str, at: datetime) -> dict[str, Any]:
        interval = self.interval_for(agent_id)
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
        running: list[str] | None = None,
        facts: dict[str, Any] | None = None,
    ) -> None:
        """A heartbeat: `status` is "online" or "offline" as the agent says; `running`
        the instructions it says it runs (our agents; None: it does not say)."""
        now = utcnow()
        self._heard.add(agent_id)
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
            health, reason = self.health(facts)
            entry["status"] = self._health[agent_id] = health
            if reason:
                facts["degraded_because"] = reason
            entry.update(self.deadlines(agent_id, now))
        if interval:
            facts["heartbeat_interval"] = interval
        if running is not None:
            entry.update(running=running, reported_at=now)
        entry.update(facts=facts, busy=running is not None, last_heartbeat_at=now, beat=True)

    def touch(self, agent_id: str, running: list[str] | None = None) -> None:
        """Any other request from the agent: it is alive, its health is what its last
        heartbeat said (online when this server has not heard one). `running=[]`: it
        says it runs nothing (an official agent's poll)."""
        now = utcnow()
        entry = self._pending.setdefault(agent_id, {})
        entry.update(
            status=self._health.get(agent_id, "online"),
            last_heartbeat_at=now,
            **self.deadlines(agent_id, now),
        )
        if running is not None:
            entry.update(running=running, reported_at=now)

    def handed(self, agent_id: str, instruction_ids: list[str]) -> None:
        self._handed.setdefault(agent_id, {}).update(dict.fromkeys(instruction_ids, monotonic()))

    def reported(self, agent_id: str, instruction_id: str) -> None:
        handed = self._handed.get(agent_id)
        if handed is not None and handed.pop(instruction_id, None) and not handed:
            del self._handed[agent_id]

    def overdue(self, agent_id: str) -> list[str]:
        """What this server handed an official agent longer than `unreported_grace` ago
        with no result since: polling again, it says it never got them. Checked now, so
        the work goes back before this poll claims (the flush finds it too, later, also
        for what other replicas handed out)."""
        handed = self._handed.get(agent_id)
        if not handed:
            return []
        cutoff = monotonic() - self.settings.unreported_grace
        overdue = [i for i, at in handed.items() if at < cutoff]
        for instruction_id in overdue:
            self.reported(agent_id, instruction_id)
        return overdue

    def pending(self, agent_id: str) -> dict[str, Any] | None:
        # A batch being written is still the truth until its transaction commits.
        beat = self._pending.get(agent_id) or self._flushing.get(agent_id)
        return dict(beat) if beat else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {**self._flushing, **{k: dict(v) for k, v in self._pending.items()}}

    def unwritten(self) -> set[str]:
        """Agents with a sign of life not yet in the database: alive, whatever it says."""
        return {
            a
            for a, b in (*self._flushing.items(), *self._pending.items())
            if b["status"] != "offline"
        }

    def stretch(self, live_agents: int) -> float:
        """The interval to tell agents (`next_heartbeat_interval`): the configured one, or
        longer when so many agents are live that they would beat faster than
        `heartbeat_rate_budget` (as Consul scales its agents' sync interval with the size
        of the cluster), so a fleet too big for the server slows its beats instead of
        missing its deadlines. Their deadlines follow the interval told. The fleet is the
        live agents, or those heard within the last interval if more (agents not yet
        written as live: a fleet calling a server for the first time)."""
        now = monotonic()
        if now - self._heard_since >= self.told_interval:
            self._heard_before, self._heard = len(self._heard), set()
            self._heard_since = now
        fleet = max(live_agents, self._heard_before, len(self._heard))
        base = float(self.settings.heartbeat_interval)
        budget = self.settings.heartbeat_rate_budget
        wanted = fleet / budget if budget else base
        self.told_interval = max(base, min(wanted, base * 10))
        return self.told_interval

    # -- writing ----------------------------------------------------------------------------

    async def flush(self, db: Database) -> list[str]:
        """Write what arrived; returns the instructions agents no longer report running."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, {}
        self._flushing = batch
        try:
            return await self._write(db, batch)
        except BaseException:
            # Keep what newer heartbeats have not superseded, for the next flush.
            for agent_id, beat in batch.items():
                self._pending.setdefault(agent_id, beat)
            raise
        finally:
            self._flushing = {}

    def _row(self, agent_id: str, beat: dict[str, Any], status: str) -> dict[str, Any]:
        """One agent's update: version, host and figures only when they changed since
        the last flush wrote them (None keeps what the row holds)."""
        said = tuple(beat.get(k) or None for k in SAID)
        last = self._written.get(agent_id)
        if last is not None:
            said = tuple(None if new == old else new for new, old in zip(said, last, strict=True))
        return {
            "b_id": agent_id,
            "b_at": beat["last_heartbeat_at"],
            "b_late": beat.get("late_at"),
            "b_dead": beat.get("dead_at"),
            "b_status": status,
            **{f"b_{key}": value for key, value in zip(SAID, said, strict=True)},
            "b_busy": beat.get("busy") if beat.get("beat") else None,
        }

    async def _write(self, db: Database, batch: dict[str, dict[str, Any]]) -> list[str]:
        """In transactions of FLUSH_AT_MOST agents, letting the event loop run between
        them: a flush of thousands would otherwise hold it (SQLite writes inline) while
        every request waits."""
        # In id order, like every other multi-row update of agents: no lock-order deadlocks.
        ids = sorted(batch)
        unreported: list[str] = []
        for i in range(0, len(ids), FLUSH_AT_MOST):
            if i:
                await asyncio.sleep(0)
            unreported += await self._write_some(db, batch, ids[i : i + FLUSH_AT_MOST])
        return unreported

    async def _write_some(
        self, db: Database, batch: dict[str, dict[str, Any]], ids: list[str]
    ) -> list[str]:
        now = utcnow()
        grace = timedelta(seconds=self.settings.unreported_grace)
        extended = now + timedelta(seconds=self.settings.lease_grace)
        async with db.write() as conn:
            before: dict[str, Any] = {}
            for chunk in _chunks(ids):
                query = sa.select(
                    agents.c.id,
                    agents.c.organization_id,
                    agents.c.status,
                    agents.c.last_heartbeat_at,
                )
                for row in await conn.execute(query.where(agents.c.id.in_(chunk))):
                    before[row.id] = row
            held = await _held(conn, ids)
            rows, extend, unreported, back = [], [], [], []
            for agent_id in ids:
                if agent_id not in before:
                    continue  # deleted meanwhile
                beat, work = batch[agent_id], held.get(agent_id, [])
                running = beat.get("running")
                if running is not None:
                    gone = [
                        i.id
                        for i in work
                        if i.id not in running and i.leased_at < beat["reported_at"] - grace
                    ]
                    unreported += gone
                    work = [i for i in work if i.id not in gone]
                status = beat["status"]
                if status == "online" and work:
                    status = "busy"
                if status != "offline":
                    # A sign of life extends the lease of the agent's running instructions.
                    extend += [i.id for i in work if i.lease_expires_at < extended]
                    if before[agent_id].status == "offline":
                        back.append(before[agent_id])
                rows.append(self._row(agent_id, beat, status))
            if rows:
                await conn.execute(_FLUSH, rows)
            for chunk in _chunks(extend):
                await conn.execute(
                    instructions.update()
                    .where(
                        instructions.c.id.in_(chunk),
                        one_of(instructions.c.status, ACTIVE_INSTRUCTION),
                        instructions.c.lease_expires_at < extended,
                    )
                    .values(lease_expires_at=extended)
                )
            # The other half of an agent.offline record (a first contact is only logged).
            again = [a for a in back if a.last_heartbeat_at]
            if again:
                await audit.append(
                    conn,
                    [
                        audit.entry(
                            a.organization_id,
                            "system",
                            "agent.online",
                            "agent",
                            a.id,
                            {"reason": "heard from again"},
                            at=now,
                        )
                        for a in again
                    ],
                )
        for agent_id in ids:
            if batch[agent_id].get("beat"):
                self._written[agent_id] = tuple(batch[agent_id].get(k) or None for k in SAID)
        if back:
            log.info("agents online", count=len(back), agents=[a.id for a in back[:10]])
        return unreported


class Liveness:
    """The sweep: agents silent past their deadlines are degraded when late and lost
    when dead. Returns the lost; the engine takes their work back."""

    COUNT_EVERY = 3  # sweeps between counts of the live fleet (for stretch)

    def __init__(self, db: Database, settings: Settings, buffer: HeartbeatBuffer) -> None:
        self.db = db
        self.settings = settings
        self.buffer = buffer
        self._sweeps = 0

    async def sweep(self, now: datetime | None = None) -> list[str]:
        now = now or utcnow()
        if self._sweeps % self.COUNT_EVERY == 0 and self.settings.heartbeat_rate_budget:
            async with self.db.read() as conn:
                self.buffer.stretch(await _live(conn, now))
        self._sweeps += 1
        settled = now - timedelta(seconds=self.settings.mass_death_settle)
        alive_here = self.buffer.unwritten()
        columns = (
            agents.c.id,
            agents.c.organization_id,
            agents.c.status,
            agents.c.heartbeats_while_busy,
            agents.c.dead_at,
            agents.c.last_heartbeat_at,
        )
        async with self.db.write() as conn:
            # Rows are locked in id order, as the heartbeat flush does: no deadlocks.
            late = await self._locked(
                conn, columns, agents.c.status.in_(("online", "busy")), agents.c.late_at < now
            )
            # A mass silence shows over a few sweeps, not in one: act on an agent only once
            # it has been past its deadline for a moment.
            dead = await self._locked(
                conn, columns, agents.c.status.in_(LIVE), agents.c.dead_at < settled
            )
            silent = {a.id: a for a in (*late, *dead) if a.id not in alive_here}
            given = await self._stretched(conn, list(silent.values()), now, settled)
            late = [a for a in late if a.id not in given or given[a.id] == "late"]
            dead = [a for a in dead if a.id not in given]
            silent = {a.id: a for a in (*late, *dead) if a.id in silent}
            if not silent:
                return []
            held = await _held(conn, sorted(silent))
            lease_ends = {
                agent_id: max(i.lease_expires_at for i in work)
                for agent_id, work in held.items()
                if any(i.lease_expires_at > now for i in work)
            }
            # Silent with work in hand, and not one to heartbeat while it works: busy until
            # its lease ends (the lease reaper takes the work back then, if no result came).
            busy = [
                a for a in silent.values() if a.id in lease_ends and not a.heartbeats_while_busy
            ]
            await self._busy(conn, busy, lease_ends)
            taken = {a.id for a in busy}
            degraded = [a.id for a in late if a.id in silent and a.id not in taken]
            dead = [a for a in dead if a.id in silent and a.id not in taken]
            if degraded:
                for chunk in _chunks(degraded):
                    await conn.execute(
                        agents.update()
                        .where(agents.c.id.in_(chunk), agents.c.status.in_(("online", "busy")))
                        .values(status="degraded")
                    )
            dead = await self._not_all_at_once(conn, dead, now)
            await self._offline(conn, dead, now)
        return [a.id for a in dead]

    async def _stretched(
        self, conn: AsyncConnection, silent: list[Any], now: datetime, settled: datetime
    ) -> dict[str, str]:
        """While the server stretches the heartbeat interval, agents whose deadlines were
        set under a shorter one get the longer window now (they were told to beat less
        often, or could not be heard sooner): `late` for those it leaves late, `alive`
        for the others. The rest are as silent as they seem."""
        if self.buffer.told_interval <= self.settings.heartbeat_interval:
            return {}
        given, rows = {}, []
        for agent in silent:
            if agent.last_heartbeat_at is None:
                continue
            deadlines = self.buffer.deadlines(agent.id, agent.last_heartbeat_at)
            if deadlines["dead_at"] > settled and deadlines["dead_at"] > agent.dead_at:
                given[agent.id] = "late" if deadlines["late_at"] <= now else "alive"
                rows.append(
                    {
                        "b_id": agent.id,
                        "b_late": deadlines["late_at"],
                        "b_dead": deadlines["dead_at"],
                    }
                )
        if rows:
            await conn.execute(_DEADLINES, rows)
        return given

    async def _locked(self, conn: AsyncConnection, columns: Any, *where: Any) -> list[Any]:
        query = sa.select(*columns).where(*where).order_by(agents.c.id).limit(5000)
        return list((await conn.execute(self.db.for_update(query))).all())

    async def _busy(
        self, conn: AsyncConnection, busy: list[Any], lease_ends: dict[str, datetime]
    ) -> None:
        if not busy:
            return
        await conn.execute(
            agents.update()
            .where(agents.c.id == sa.bindparam("b_id"))
            .values(status="busy", late_at=sa.bindparam("b_end"), dead_at=sa.bindparam("b_end")),
            [{"b_id": a.id, "b_end": lease_ends[a.id]} for a in busy],
        )
        log.info(
            "agents busy: silent while they run a step, so given until their lease ends",
            count=len(busy),
            agents=[a.id for a in busy[:10]],
        )

    async def _not_all_at_once(
        self, conn: AsyncConnection, dead: list[Any], now: datetime
    ) -> list[Any]:
        """Agents that fell silent just now, in numbers, are held back a while: half the
        live fleet falling silent in one sweep is more likely an overloaded server or a
        cut network than dead agents, and taking all their work back would make things
        worse (the same guard as Kubernetes' unhealthy-zone threshold). Those silent for
        longer than `mass_death_hold` are dead whatever their number."""
        held_until = now - timedelta(seconds=self.settings.mass_death_hold)
        if not any(a.dead_at > held_until for a in dead):
            return dead
        # Silent together: every agent past its deadline lately, including those still in
        # their settle time (acted on at a later sweep). Counting only the settled ones let
        # the first agent of a crowd that fell silent within one sweep go alone.
        together = sa.select(agents.c.id).where(
            agents.c.status.in_(LIVE), agents.c.dead_at < now, agents.c.dead_at > held_until
        )
        alive_here = self.buffer.unwritten()  # heard here, not yet written: not silent
        recent = sum(1 for i in (await conn.execute(together)).scalars() if i not in alive_here)
        if recent < self.settings.mass_death_min_agents:
            return dead
        alive = await _live(conn, now)
        if recent <= self.settings.mass_death_fraction * (recent + alive):
            return dead
        log.warning(
            "many agents fell silent at once: suspecting this server or the network, "
            "not the agents; their work stays for now",
            silent=recent,
        )
        return [a for a in dead if a.dead_at <= held_until]

    async def _offline(self, conn: AsyncConnection, dead: list[Any], now: datetime) -> None:
        if not dead:
            return
        log.warning(
            "agents offline: missed heartbeats", count=len(dead), agents=[a.id for a in dead[:50]]
        )
        for chunk in _chunks([a.id for a in dead]):
            await conn.execute(
                agents.update().where(agents.c.id.in_(chunk)).values(status="offline")
            )
        await audit.append(
            conn,
            [
                audit.entry(
                    a.organization_id,
                    "system",
                    "agent.offline",
                    "agent",
                    a.id,
                    {"reason": "missed heartbeats"},
                    at=now,
                )
                for a in dead
            ],
        )
