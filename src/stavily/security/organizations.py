"""Organizations: the tenants every row belongs to. Create, list, rename; a user belongs
to one or more (security.identities), a token to one."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict, InvalidInput, NotFound
from stavily.ids import new_id
from stavily.security.access import DEFAULT_ORGANIZATION, Principal, create_api_token
from stavily.store.db import Database
from stavily.store.models import memberships, organizations
from stavily.timeutil import utcnow


async def organization_name(conn: AsyncConnection, organization_id: str) -> str:
    name = await conn.scalar(
        sa.select(organizations.c.name).where(organizations.c.id == organization_id)
    )
    return str(name)


ORGANIZATION_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")


def check_organization_name(name: str) -> str:
    if not ORGANIZATION_NAME.match(name):
        raise InvalidInput(
            "an organization's name is 1 to 100 characters: lower-case letters, digits, "
            "_ . and -, starting with a letter or digit",
            [{"path": "name", "message": "not a valid organization name"}],
        )
    return name


async def list_organizations(conn: AsyncConnection, me: Principal) -> list[dict[str, Any]]:
    """A user's organizations, with their role in each; a token's own."""
    columns = (organizations.c.id, organizations.c.name, organizations.c.created_at)
    if me.user_id is None:
        rows = await conn.execute(
            sa.select(*columns).where(organizations.c.id == me.organization_id)
        )
        return [{**row._asdict(), "role": me.role} for row in rows]
    rows = await conn.execute(
        sa.select(*columns, memberships.c.role)
        .select_from(organizations.join(memberships))
        .where(memberships.c.user_id == me.user_id)
        .order_by(organizations.c.name)
    )
    return [row._asdict() for row in rows]


async def create_organization(db: Database, by: Principal, name: str) -> dict[str, Any]:
    """A new organization. A user who makes one is its admin; a token belonging to no
    user gets an admin token for it in the answer (shown once)."""
    check_organization_name(name)
    org_id, now = new_id("org"), utcnow()
    async with db.write() as conn:
        try:
            async with conn.begin_nested():
                await conn.execute(
                    organizations.insert().values(id=org_id, name=name, created_at=now)
                )
        except IntegrityError:
            raise Conflict(f"an organization named '{name}' exists") from None
        answer: dict[str, Any] = {"id": org_id, "name": name, "created_at": now, "role": "admin"}
        if by.user_id is not None:
            await conn.execute(
                memberships.insert().values(
                    user_id=by.user_id, organization_id=org_id, role="admin", created_at=now
                )
            )
        else:
            _, secret = await create_api_token(
                conn, org_id, name=f"admin, made by {by.actor}", role="admin", actor=by.actor
            )
            answer["admin_token"] = secret
        # each organization's log names only what is its own
        details = {"name": name}
        await audit.append(
            conn,
            [
                audit.entry(
                    org_id, by.actor, "organization.created", "organization", org_id, details
                ),
                audit.entry(
                    by.organization_id,
                    by.actor,
                    "organization.created",
                    "organization",
                    org_id,
                    details,
                ),
            ],
        )
    return answer


async def rename_organization(
    db: Database, by: Principal, org_id: str, name: str
) -> dict[str, Any]:
    """Rename the caller's own organization (another's id: 404)."""
    check_organization_name(name)
    if org_id != by.organization_id:
        raise NotFound(f"no organization '{org_id}'")
    async with db.write() as conn:
        old = await organization_name(conn, org_id)
        if old == DEFAULT_ORGANIZATION:
            raise Conflict(
                f"the '{DEFAULT_ORGANIZATION}' organization keeps its name: the server's "
                "start finds it by it (STAVILY_BOOTSTRAP_TOKEN's organization)"
            )
        try:
            async with conn.begin_nested():
                await conn.execute(
                    organizations.update().where(organizations.c.id == org_id).values(name=name)
                )
        except IntegrityError:
            raise Conflict(f"an organization named '{name}' exists") from None
        await audit.append(
            conn,
            [
                audit.entry(
                    org_id,
                    by.actor,
                    "organization.renamed",
                    "organization",
                    org_id,
                    {"from": old, "to": name},
                )
            ],
        )
        created = await conn.scalar(
            sa.select(organizations.c.created_at).where(organizations.c.id == org_id)
        )
    return {"id": org_id, "name": name, "created_at": created, "role": by.role}
