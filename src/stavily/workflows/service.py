"""Applying and reading workflow definitions; every change applied is a new immutable
version, and applying the latest version's definition again changes nothing."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit, offload
from stavily.errors import NotFound
from stavily.ids import new_id
from stavily.store.models import workflow_versions, workflows
from stavily.timeutil import isoformat, utcnow
from stavily.workflows.definition import WorkflowDefinition


def canonical(definition: Any) -> str:
    """A definition as one text, whatever wrote it: keys sorted, no spacing. Compared as
    text, not as Python values: `true` and `1`, or `30` and `30.0`, are not the same to a
    plugin, though Python finds them equal."""
    return json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _same(a: Any, b: Any) -> bool:
    return canonical(a) == canonical(b)


def _upsert_workflow(dialect: str, row: dict[str, Any]) -> Any:
    """The workflow's row, unless it is there already (then nothing, and no error)."""
    insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
    return (
        insert(workflows)
        .values(**row)
        .on_conflict_do_nothing(index_elements=[workflows.c.organization_id, workflows.c.name])
    )


async def apply(
    conn: AsyncConnection,
    organization_id: str,
    definition: WorkflowDefinition,
    source: str,
    actor: str,
    pins: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A new version of the workflow, or, when the definition is the latest version's
    (compared parsed and normalized: not its spacing, comments, key order or defaults
    written out) and so are the plugin versions its steps are pinned to (`pins`,
    plugins.pins), that version again with `unchanged: true`, and no audit record.

    The workflow's row is locked first (PostgreSQL; SQLite has one writer), so two
    applies at once are numbered one after the other: the second sees the first's
    version, and the same definition twice makes one version, never two."""
    now = utcnow()
    dumped = definition.model_dump(mode="json")
    locked = (
        sa.select(workflows.c.id, workflows.c.latest_version)
        .where(
            workflows.c.organization_id == organization_id,
            workflows.c.name == definition.name,
        )
        .with_for_update()
    )
    existing = (await conn.execute(locked)).first()
    if existing is None:
        # Two first applies at once: the second's insert waits for the first's commit,
        # then does nothing, and the lock below finds the first's row.
        await conn.execute(
            _upsert_workflow(
                conn.dialect.name,
                {
                    "id": new_id("wf"),
                    "organization_id": organization_id,
                    "name": definition.name,
                    "latest_version": 0,  # no version yet: this transaction writes one
                    "created_at": now,
                    "updated_at": now,
                },
            )
        )
        existing = (await conn.execute(locked)).one()
    workflow_id, latest = existing.id, existing.latest_version
    if latest:
        current = (
            await conn.execute(
                sa.select(workflow_versions.c.definition, workflow_versions.c.plugins).where(
                    workflow_versions.c.workflow_id == workflow_id,
                    workflow_versions.c.version == latest,
                )
            )
        ).one()
        # Off the event loop: for a definition of thousands of steps, tens of ms.
        if await offload.run(
            _same, [current.definition, current.plugins or {}], [dumped, pins or {}]
        ):
            return {**await get(conn, organization_id, definition.name), "unchanged": True}
    version = latest + 1
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
            definition=dumped,
            plugins=pins or None,
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
    return {**await get(conn, organization_id, definition.name), "unchanged": False}


def _select_versions() -> sa.Select[Any]:
    return sa.select(
        workflows.c.id,
        workflows.c.name,
        workflows.c.created_at,
        workflows.c.updated_at,
        workflow_versions.c.id.label("version_id"),
        workflow_versions.c.version,
        workflow_versions.c.definition,
        workflow_versions.c.plugins,
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
        "plugins": row.plugins or {},
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
        "plugins": row["plugins"] or {},
        "source": row["source"],
        "created_by": row["created_by"],
        "created_at": isoformat(row["created_at"]),
    }
