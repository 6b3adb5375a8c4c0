"""Schedules: cron (in a time zone) and interval timings that start a workflow, declared
in it (`schedules:`) or made by the API; when each fires, what a misfire policy does
after downtime, and their rows (docs/triggers.md, "Schedules"). The scheduler that fires
them is services.scheduler."""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from croniter import CroniterBadDateError, croniter
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict, InvalidInput, NotFound
from stavily.ids import new_id
from stavily.store.models import schedules
from stavily.timeutil import isoformat

if TYPE_CHECKING:
    from stavily.workflows.definition import WorkflowDefinition

Misfire = Literal["skip", "once", "all"]
MISFIRES = ("skip", "once", "all")
MIN_EVERY_SECONDS = 1.0
MAX_EVERY_SECONDS = 366 * 86400.0
# `misfire: all` fires at most this many missed times at once; older ones are skipped
MAX_CATCH_UP = 100
# missed cron times walked one by one at most; past it, only the latest stretch is
_SCAN_LIMIT = 2000
_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


# -- timing --------------------------------------------------------------------------------


def cron_problem(expression: str) -> str | None:
    """Why a cron expression is refused, or None: five fields (minute, hour, day of
    month, month, day of week) as croniter reads them, or an alias such as @daily; one
    that never fires (`0 0 31 2 *`) is refused too."""
    text = expression.strip()
    if text.startswith("@"):
        if text not in _ALIASES:
            return f"'{text}' is not a cron alias ({', '.join(_ALIASES)})"
    elif len(text.split()) != 5:
        return (
            f"'{text}' is not a cron expression of five fields (minute hour day-of-month "
            "month day-of-week); for seconds, use `every`"
        )
    try:
        valid = croniter.is_valid(text)
    except Exception:  # croniter's parser on text it did not expect
        valid = False
    if not valid:
        return f"'{text}' is not a valid cron expression"
    try:
        croniter(text, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        return f"'{text}' never fires"
    except Exception:
        return f"'{text}' is not a valid cron expression"
    return None


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The IANA time zone of that name; ValueError for one there is none of."""
    try:
        if not name or name != name.strip() or ".." in name or name.startswith("/"):
            raise ValueError
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError, TypeError):
        raise ValueError(
            f"'{name}' is not a known time zone (an IANA name such as UTC or Europe/Paris)"
        ) from None


def every_problem(seconds: float) -> str | None:
    if not math.isfinite(seconds) or not MIN_EVERY_SECONDS <= seconds <= MAX_EVERY_SECONDS:
        return "an interval is between 1s and 366d"
    if seconds != int(seconds):
        return "an interval is a whole number of seconds"
    return None


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: a cron expression read in `timezone`, or every N seconds
    (anchored at its previous fire time, so the phase never drifts)."""

    cron: str | None
    timezone: str = "UTC"
    every_seconds: int | None = None

    def next_after(self, at: datetime, anchor: datetime | None = None) -> datetime:
        """The first fire time strictly after `at`. An interval's times are `anchor`
        plus a whole number of intervals (`anchor`: its previous fire time, else `at`)."""
        if self.every_seconds is not None:
            step = self.every_seconds
            start = anchor or at
            if at < start:
                return start
            count = math.floor((at - start).total_seconds() / step) + 1
            return start + timedelta(seconds=count * step)
        assert self.cron is not None
        return _cron_after(self.cron, self.timezone, at)

    def first(self, now: datetime) -> datetime:
        """The first fire time of a schedule made (or resumed) now."""
        return self.next_after(now)


def _cron_after(expression: str, timezone: str, at: datetime) -> datetime:
    """The next time after `at` whose wall-clock time in the zone matches. Across a
    change of the clocks: a repeated wall time (autumn) fires once, at its first
    occurrence; a skipped one (spring, 02:30 on a night from 02:00 to 03:00) fires at the
    offset before the change (03:30), once, as Java's and Python's zone rules shift it."""
    tz = zone(timezone)
    wall = at.astimezone(tz).replace(tzinfo=None)
    walker = croniter(expression, wall)
    best: datetime | None = None
    bound: datetime | None = None
    while True:
        naive = walker.get_next(datetime)
        if bound is not None and naive > bound:
            return best  # type: ignore[return-value]
        instant = naive.replace(tzinfo=tz).astimezone(UTC)  # fold=0: the first of two
        if instant > at and (best is None or instant < best):
            best = instant
            # a later wall time can still come sooner (a skipped time shifted past it)
            bound = best.astimezone(tz).replace(tzinfo=None)


@dataclass(frozen=True)
class Due:
    """What a schedule fires now: `fire` (oldest first), `skipped` (due times its misfire
    policy does not fire; `about` when there were too many to count one by one), and
    its next fire time after them."""

    fire: list[datetime]
    skipped: int
    next_fire_at: datetime
    about: bool = False


def due(
    timing: Timing,
    next_fire_at: datetime,
    now: datetime,
    misfire: str,
    grace: float,
    cap: int = MAX_CATCH_UP,
) -> Due:
    """The fire times from `next_fire_at` to `now`, as the policy fires them:

    - `all`: each (at most `cap`, the latest; older ones skipped);
    - `once`: the latest only;
    - `skip`: the latest only if it is at most `grace` seconds late (so a server a
      moment behind still fires), else none: nothing missed while down is made up.

    The next fire time is always the first after `now`."""
    if next_fire_at > now:
        return Due([], 0, next_fire_at)
    keep = cap if misfire == "all" else 1
    kept: deque[datetime] = deque(maxlen=keep)
    about = False
    if timing.every_seconds is not None:
        step = timing.every_seconds
        count = math.floor((now - next_fire_at).total_seconds() / step) + 1
        kept.extend(
            next_fire_at + timedelta(seconds=k * step) for k in range(max(0, count - keep), count)
        )
        following = next_fire_at + timedelta(seconds=count * step)
    else:
        count, following = 0, next_fire_at
        while following <= now and count < _SCAN_LIMIT:
            kept.append(following)
            count += 1
            following = timing.next_after(following)
        if following <= now:  # too many to walk: only the last stretch, counted roughly
            spacing = (following - next_fire_at) / count
            start = now - spacing * keep * 3
            if start > following:
                count += int((start - following) / spacing)
                kept.clear()
                about = True
                following = timing.next_after(start)
            while following <= now:
                kept.append(following)
                count += 1
                following = timing.next_after(following)
    fire = list(kept)
    if misfire == "skip" and fire and (now - fire[-1]).total_seconds() > grace:
        fire = []
    return Due(fire, count - len(fire), following, about)


# -- rows ------------------------------------------------------------------------------------


def spec_key(spec: dict[str, Any]) -> str:
    """A declared schedule's identity: its spec, hashed. Applying the workflow again
    with the same entry keeps the schedule (its id, pause and next fire time)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def view(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "workflow": row["workflow_name"],
        "origin": row["origin"],
        "name": row["name"],
        "cron": row["cron"],
        "timezone": row["timezone"],
        "every_seconds": row["every_seconds"],
        "inputs": row["inputs"],
        "misfire": row["misfire"],
        "paused": bool(row["paused"]),
        "next_fire_at": isoformat(row["next_fire_at"]),
        "last_fired_at": isoformat(row["last_fired_at"]),
        "created_by": row["created_by"],
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
    }


def timing_of(row: Any) -> Timing:
    return Timing(row["cron"], row["timezone"], row["every_seconds"])


def _row(
    organization_id: str,
    workflow: str,
    origin: str,
    spec: dict[str, Any],
    actor: str,
    now: datetime,
    key: str | None = None,
) -> dict[str, Any]:
    timing = Timing(spec.get("cron"), spec.get("timezone") or "UTC", spec.get("every_seconds"))
    return {
        "id": new_id("sch"),
        "organization_id": organization_id,
        "workflow_name": workflow,
        "origin": origin,
        "key": key,
        "name": spec.get("name"),
        "cron": timing.cron,
        "timezone": timing.timezone,
        "every_seconds": timing.every_seconds,
        "inputs": spec.get("inputs") or {},
        "misfire": spec.get("misfire") or "once",
        "paused": False,
        "next_fire_at": timing.first(now),
        "last_fired_at": None,
        "created_by": actor,
        "created_at": now,
        "updated_at": now,
    }


def declared(definition: WorkflowDefinition) -> list[dict[str, Any]]:
    """The workflow's `schedules:` as row specs (every in seconds), in order."""
    from stavily.workflows.definition import parse_duration

    found = []
    for entry in definition.schedules or []:
        found.append(
            {
                "name": entry.name,
                "cron": entry.cron,
                "timezone": entry.timezone,
                "every_seconds": int(parse_duration(entry.every))
                if entry.every is not None
                else None,
                "inputs": entry.inputs,
                "misfire": entry.misfire,
            }
        )
    return found


async def sync(
    conn: AsyncConnection,
    organization_id: str,
    definition: WorkflowDefinition,
    actor: str,
    now: datetime,
) -> None:
    """The workflow's declared schedules, made to be its `schedules:` (in the apply's
    transaction): new entries made, unchanged ones kept as they are (paused or not, their
    next fire time), entries gone deleted. API-made schedules are not touched."""
    wanted = {spec_key(spec): spec for spec in declared(definition)}
    rows = (
        await conn.execute(
            sa.select(schedules.c.id, schedules.c.key).where(
                schedules.c.organization_id == organization_id,
                schedules.c.workflow_name == definition.name,
                schedules.c.origin == "workflow",
            )
        )
    ).all()
    have = {row.key: row.id for row in rows}
    gone = [schedule_id for key, schedule_id in have.items() if key not in wanted]
    if gone:
        await conn.execute(schedules.delete().where(schedules.c.id.in_(gone)))
    new = [
        _row(organization_id, definition.name, "workflow", spec, actor, now, key)
        for key, spec in wanted.items()
        if key not in have
    ]
    if new:
        await conn.execute(schedules.insert(), new)


async def create(
    conn: AsyncConnection,
    organization_id: str,
    workflow: str,
    spec: dict[str, Any],
    actor: str,
    now: datetime,
) -> dict[str, Any]:
    """A schedule made by the API (the workflow's existence and its inputs are the
    caller's to check)."""
    row = _row(organization_id, workflow, "api", spec, actor, now)
    await conn.execute(schedules.insert().values(**row))
    await audit.append(
        conn,
        [
            audit.entry(
                organization_id,
                actor,
                "schedule.created",
                "schedule",
                row["id"],
                {"workflow": workflow, "cron": row["cron"], "every_seconds": row["every_seconds"]},
                at=now,
            )
        ],
    )
    return view(row)


async def list_all(
    conn: AsyncConnection, organization_id: str, workflow: str | None = None
) -> list[dict[str, Any]]:
    query = sa.select(schedules).where(schedules.c.organization_id == organization_id)
    if workflow is not None:
        query = query.where(schedules.c.workflow_name == workflow)
    query = query.order_by(schedules.c.workflow_name, schedules.c.created_at, schedules.c.id)
    return [view(row._mapping) for row in await conn.execute(query)]


async def _get_row(conn: AsyncConnection, organization_id: str, schedule_id: str) -> Any:
    row = (
        await conn.execute(
            sa.select(schedules).where(
                schedules.c.organization_id == organization_id, schedules.c.id == schedule_id
            )
        )
    ).first()
    if row is None:
        raise NotFound(f"no schedule '{schedule_id}'")
    return row._mapping


async def get(conn: AsyncConnection, organization_id: str, schedule_id: str) -> dict[str, Any]:
    return view(await _get_row(conn, organization_id, schedule_id))


async def set_paused(
    conn: AsyncConnection,
    organization_id: str,
    schedule_id: str,
    paused: bool,
    actor: str,
    now: datetime,
) -> dict[str, Any]:
    """Pause, or resume: a resumed schedule's next fire time is its first after now, so
    the times it was paused through are not fired (whatever its misfire policy). Doing
    what is already so changes nothing and writes no audit record."""
    row = await _get_row(conn, organization_id, schedule_id)
    if bool(row["paused"]) == paused:
        return view(row)
    values: dict[str, Any] = {"paused": paused, "updated_at": now}
    if not paused:
        values["next_fire_at"] = timing_of(row).next_after(now, anchor=row["next_fire_at"])
    await conn.execute(schedules.update().where(schedules.c.id == schedule_id).values(**values))
    await audit.append(
        conn,
        [
            audit.entry(
                organization_id,
                actor,
                "schedule.paused" if paused else "schedule.resumed",
                "schedule",
                schedule_id,
                {"workflow": row["workflow_name"]},
                at=now,
            )
        ],
    )
    return view({**row, **values})


async def delete(
    conn: AsyncConnection, organization_id: str, schedule_id: str, actor: str, now: datetime
) -> None:
    row = await _get_row(conn, organization_id, schedule_id)
    if row["origin"] == "workflow":
        raise Conflict(
            f"schedule '{schedule_id}' is declared in workflow '{row['workflow_name']}' "
            "(`schedules:`): remove it there and apply the workflow again, or pause it"
        )
    await conn.execute(schedules.delete().where(schedules.c.id == schedule_id))
    await audit.append(
        conn,
        [
            audit.entry(
                organization_id,
                actor,
                "schedule.deleted",
                "schedule",
                schedule_id,
                {"workflow": row["workflow_name"]},
                at=now,
            )
        ],
    )


def check_inputs(definition: WorkflowDefinition, inputs: dict[str, Any], base: str) -> None:
    """InvalidInput, located under `base`, for inputs the workflow would refuse."""
    try:
        definition.resolve_inputs(inputs)
    except InvalidInput as refused:
        raise InvalidInput(
            "the schedule's inputs are not the workflow's",
            [
                {**d, "path": f"{base}.{d['path']}" if base else d["path"]}
                for d in refused.details or []
            ],
        ) from None
