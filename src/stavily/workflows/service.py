"""Applying and reading workflow definitions; every apply is a new immutable version."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import NotFound
from stavily.ids import new_id
from stavily.store.models import workflow_versions, workflows
from stavily.timeutil import isoformat, utcnow
from stavily.workflows.definition import WorkflowDefinition


async def apply(
    conn: AsyncConnection,
    organization_id: str,
    definition: WorkflowDefinition,
    source: str,
    actor: str,
) -> dict[str, Any]:
    now = utcnow()
    existing = (
        await conn.execute(
            sa.select(workflows.c.id, workflows.c.latest_version).where(
                workflows.c.organization_id == organization_id,
                workflows.c.name == definition.name,
            )
        )
    ).first()
    if existing is None:
        workflow_id, version = new_id("wf"), 1
        await conn.execute(
            workflows.insert().values(
                id=workflow_id,
                organization_id=organization_id,
                name=definition.name,
                latest_version=1,
                created_at=now,
                updated_at=now,
            )
        )
    else:
        workflow_id, version = existing.id, existing.latest_version + 1
        await conn.execute(
            workflows.update()
            .where(workflows.c.id == workflow_id)
            .values(latest_version=version, updated_at=now)
        )
    version_id = new_id("wfv")
    await conn.execute(
        workflow_versions.insert().values(
            id=version_id,
            organization_id=organization_id,
            workflow_id=workflow_id,
            version=version,
            definition=definition.model_dump(mode="json"),
            source=source,
            created_by=actor,
            created_at=now,
        )
    )
    await audit.append(
        conn,
        [
            audit.entry(
                organization_id,
                actor,
                "workflow.applied",
                "workflow",
                workflow_id,
                {"name": definition.name, "version": version},
                at=now,
            )
        ],
    )
    return await get(conn, organization_id, definition.name)


def _select_versions() -> sa.Select[Any]:
    return sa.select(
        workflows.c.id,
        workflows.c.name,
        workflows.c.created_at,
        workflows.c.updated_at,
        workflow_versions.c.id.label("version_id"),
        workflow_versions.c.version,
        workflow_versions.c.definition,
    ).join(
        workflow_versions,
        sa.and_(
            workflow_versions.c.workflow_id == workflows.c.id,
            workflow_versions.c.version == workflows.c.latest_version,
        ),
    )


def _view(row: Any) -> dict[str, Any]:
    definition = row.definition
    return {
        "id": row.id,
        "name": row.name,
        "version": row.version,
        "version_id": row.version_id,
        "description": definition.get("description"),
        "definition": definition,
        "created_at": isoformat(row.created_at),
        "updated_at": isoformat(row.updated_at),
    }


async def get(conn: AsyncConnection, organization_id: str, name: str) -> dict[str, Any]:
    row = (
        await conn.execute(
            _select_versions().where(
                workflows.c.organization_id == organization_id, workflows.c.name == name
            )
        )
    ).first()
    if row is None:
        raise NotFound(f"no workflow named '{name}'")
    return _view(row)


async def list_all(conn: AsyncConnection, organization_id: str) -> list[dict[str, Any]]:
    rows = await conn.execute(
        _select_versions()
        .where(workflows.c.organization_id == organization_id)
        .order_by(workflows.c.name)
    )
    return [_view(row) for row in rows]


async def versions(conn: AsyncConnection, organization_id: str, name: str) -> list[dict[str, Any]]:
    workflow = await get(conn, organization_id, name)
    rows = await conn.execute(
        sa.select(
            workflow_versions.c.version,
            workflow_versions.c.created_at,
            workflow_versions.c.created_by,
        )
        .where(workflow_versions.c.workflow_id == workflow["id"])
        .order_by(workflow_versions.c.version.desc())
    )
    return [
        {"version": r.version, "created_at": isoformat(r.created_at), "created_by": r.created_by}
        for r in rows
    ]


async def get_version(
    conn: AsyncConnection, organization_id: str, name: str, version: int
) -> dict[str, Any]:
    workflow = await get(conn, organization_id, name)
    row = (
        (
            await conn.execute(
                sa.select(workflow_versions).where(
                    workflow_versions.c.workflow_id == workflow["id"],
                    workflow_versions.c.version == version,
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"workflow '{name}' has no version {version}")
    return {
        "id": workflow["id"],
        "name": name,
        "version": row["version"],
        "version_id": row["id"],
        "definition": row["definition"],
        "source": row["source"],
        "created_by": row["created_by"],
        "created_at": isoformat(row["created_at"]),
    }
