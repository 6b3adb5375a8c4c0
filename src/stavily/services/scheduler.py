"""The scheduler: a loop on every server process that fires due schedules only while
it holds the `scheduler` lease (services.leader), so one process fires them. Each fire
time is an event (source `schedule`) whose idempotency key is the schedule and the time,
so even two leaders at once cannot start one fire time twice."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import structlog

from stavily.config import Settings
from stavily.services.leader import Lease, holder_id
from stavily.store.db import Database
from stavily.store.models import schedules
from stavily.timeutil import isoformat, utcnow
from stavily.workflows import schedules as timing
from stavily.workflows.watches import Events

log = structlog.get_logger("stavily.scheduler")

LEASE = "scheduler"
BATCH = 100  # due schedules read per tick


class Scheduler:
    def __init__(self, db: Database, events: Events, settings: Settings) -> None:
        self.db = db
        self.events = events
        self.tick = settings.scheduler_tick
        self.grace = settings.scheduler_misfire_grace
        self.lease = Lease(db, LEASE, holder_id(), settings.scheduler_lease_ttl)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        """Stop firing and give the lease up, so another process takes over at once."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.lease.release()

    async def _run(self) -> None:
        while True:
            try:
                if await self.lease.acquire_or_renew():
                    await self.fire_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler tick failed; retrying")
            await asyncio.sleep(self.tick)

    async def fire_due(self, now: datetime | None = None) -> int:
        """Fire every due, unpaused schedule; the events sent."""
        now = now or utcnow()
        async with self.db.read() as conn:
            rows = [
                row._mapping
                for row in await conn.execute(
                    sa.select(schedules)
                    .where(schedules.c.paused.is_(False), schedules.c.next_fire_at <= now)
                    .order_by(schedules.c.next_fire_at)
                    .limit(BATCH)
                )
            ]
        sent = 0
        for row in rows:
            if not self.lease.held:  # lost it meanwhile: another process fires now
                break
            sent += await self._fire(row, now)
        return sent

    async def _fire(self, row: Any, now: datetime) -> int:
        when = timing.due(
            timing.timing_of(row), row["next_fire_at"], now, row["misfire"], self.grace
        )
        if when.skipped:
            log.warning(
                "schedule missed fire times",
                schedule_id=row["id"],
                workflow=row["workflow_name"],
                misfire=row["misfire"],
                skipped=when.skipped,
                about=when.about,
            )
        fired_at = isoformat(now)
        for at in when.fire:
            if not self.lease.held:
                return 0  # the next leader fires the rest: their keys keep them once
            scheduled_for = isoformat(at)
            payload: dict[str, Any] = {
                "schedule_id": row["id"],
                "scheduled_for": scheduled_for,
                "fired_at": fired_at,
                "timezone": row["timezone"],
            }
            if row["cron"] is not None:
                payload["cron"] = row["cron"]
            else:
                payload["every"] = row["every_seconds"]
            if row["name"] is not None:
                payload["name"] = row["name"]
            if when.skipped:
                payload["skipped"] = when.skipped
            await self.events.receive(
                row["organization_id"],
                "schedule",
                "schedule",
                payload,
                f"{row['id']}:{scheduled_for}",
                f"schedule:{row['id']}",
                workflow=row["workflow_name"],
                inputs=row["inputs"],
            )
        async with self.db.write() as conn:
            # only if no one moved it meanwhile (a resume, another leader)
            values: dict[str, Any] = {"next_fire_at": when.next_fire_at, "updated_at": now}
            if when.fire:
                values["last_fired_at"] = when.fire[-1]
            await conn.execute(
                schedules.update()
                .where(
                    schedules.c.id == row["id"],
                    schedules.c.next_fire_at == row["next_fire_at"],
                )
                .values(**values)
            )
        return len(when.fire)
