"""Audit records: built as plain dicts, inserted in one statement with the change they describe."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

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


async def list_records(
    conn: AsyncConnection,
    organization_id: str,
    *,
    subject_id: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    query = (
        sa.select(audit_records)
        .where(audit_records.c.organization_id == organization_id)
        .order_by(audit_records.c.id.desc())
        .limit(limit)
    )
    if subject_id:
        query = query.where(audit_records.c.subject_id == subject_id)
    rows = (await conn.execute(query)).mappings().all()
    return [{**row, "created_at": isoformat(row["created_at"])} for row in rows]
