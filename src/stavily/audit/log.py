"""Audit records: built as plain dicts, inserted in one statement with the change they describe."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily.errors import InvalidInput
from stavily.store.db import write_later
from stavily.store.models import audit_records
from stavily.store.prebuilt import prebuilt
from stavily.timeutil import isoformat, utcnow


def entry(
    organization_id: str,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    details: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    return {
        "organization_id": organization_id,
        "created_at": at or utcnow(),
        "actor": actor,
        "action": action,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "details": details or {},
    }


_INSERT = prebuilt(audit_records.insert())


async def append(conn: AsyncConnection, entries: list[dict[str, Any]]) -> None:
    """Written in the caller's transaction; on PostgreSQL with its next statement."""
    if entries:
        await write_later(conn, _INSERT, entries)


_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE | re.ASCII)
_AGO_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`90s`, `30m`, `1h`, `7d`, `2w` ago, or an ISO 8601 time (UTC if it names no
    offset). Anything else is InvalidInput, located at `query:since`."""
    match = _AGO.match(text)
    try:
        if match:
            seconds = float(match.group(1)) * _AGO_SECONDS[match.group(2).lower()]
            return (now or utcnow()) - timedelta(seconds=seconds)
        at = datetime.fromisoformat(text.strip())
        return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        pass
    raise InvalidInput(
        "the request is invalid",
        [
            {
                "path": "query:since",
                "message": f"'{text}' is neither a time ago such as 30m, 1h or 7d nor an "
                "ISO 8601 time such as 2026-01-31T12:00:00Z",
            }
        ],
    )


async def list_records(
    conn: AsyncConnection,
    organization_id: str,
    *,
    subject_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Newest first. `action` is one action, or those under a prefix when it ends in
    `.*` (`workflow.*`); `since` keeps the records created from then on."""
    query = (
        sa.select(audit_records)
        .where(audit_records.c.organization_id == organization_id)
        .order_by(audit_records.c.id.desc())
        .limit(limit)
    )
    if subject_id:
        query = query.where(audit_records.c.subject_id == subject_id)
    if action:
        if action.endswith(".*"):
            query = query.where(audit_records.c.action.startswith(action[:-1], autoescape=True))
        else:
            query = query.where(audit_records.c.action == action)
    if since is not None:
        query = query.where(audit_records.c.created_at >= since)
    rows = (await conn.execute(query)).mappings().all()
    return [{**row, "created_at": isoformat(row["created_at"])} for row in rows]
