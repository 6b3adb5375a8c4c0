"""`stavily db rekey`: what the database holds sealed under a previous secrets key
(security.sealing), sealed anew with the current one — the secret store's data keys,
webhook secrets, and the sealed secret copies of instructions not yet finished.

Online, beside running servers: each batch is its own transaction, and a row is written
only if it has not changed since it was read (a webhook rotated meanwhile keeps its new
secret). The values themselves never leave the process; the secret store's ciphertexts
are untouched (their data keys are what the secrets key wraps). Each organization whose
rows were re-sealed gets a `secrets_key.rekeyed` audit record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog

from stavily import audit
from stavily.security.sealing import Sealer, Unsealable
from stavily.store.db import Database
from stavily.store.models import instructions, one_of, secret_keys, webhooks

log = structlog.get_logger("stavily.secrets")

BATCH = 200
# instructions whose copies may still be handed to an agent
UNFINISHED = ("queued", "leased", "executing")


@dataclass
class Rekeyed:
    resealed: Counter[str] = field(default_factory=Counter)  # kind -> rows re-sealed
    unopenable: list[str] = field(default_factory=list)  # "<kind> <id>": no key opens it
    organizations: Counter[str] = field(default_factory=Counter)


def _data_key(sealer: Sealer, row: Any) -> dict[str, Any]:
    owner = f"secret-key/{row.organization_id}/{row.id}"  # security.store's
    wrapped = sealer.resealed(row.wrapped, owner)
    return {"wrapped": wrapped} if wrapped else {}


def _webhook(sealer: Sealer, row: Any) -> dict[str, Any]:
    values = {}
    for column in ("secret", "previous_secret"):
        sealed = getattr(row, column)
        if sealed and (again := sealer.resealed(sealed, row.id)):
            values[column] = again
    return values


def _instruction(sealer: Sealer, row: Any) -> dict[str, Any]:
    refs = (row.context or {}).get("secrets") or {}
    changed = {}
    for name, ref in refs.items():
        sealed = ref.get("sealed") if isinstance(ref, dict) else None
        if sealed and (again := sealer.resealed(str(sealed), f"secret-copy/{name}")):
            changed[name] = {**ref, "sealed": again}
    if not changed:
        return {}
    return {"context": {**row.context, "secrets": {**refs, **changed}}}


async def _reseal(
    db: Database,
    sealer: Sealer,
    kind: str,
    table: sa.Table,
    fix: Callable[[Sealer, Any], dict[str, Any]],
    where: list[sa.ColumnElement[bool]],
    done: Rekeyed,
    batch: int,
) -> None:
    after = ""
    while True:
        async with db.write() as conn:
            rows = (
                await conn.execute(
                    sa.select(table)
                    .where(table.c.id > after, *where)
                    .order_by(table.c.id)
                    .limit(batch)
                )
            ).all()
            for row in rows:
                try:
                    values = fix(sealer, row)
                except Unsealable:
                    done.unopenable.append(f"{kind} {row.id}")
                    continue
                if not values:
                    continue
                # written only if unchanged since read (JSON has no equality: instructions
                # are guarded by `where`, their status)
                unchanged = [table.c[c] == getattr(row, c) for c in values if c != "context"]
                result = await conn.execute(
                    table.update().where(table.c.id == row.id, *where, *unchanged).values(**values)
                )
                if result.rowcount:
                    done.resealed[kind] += 1
                    done.organizations[row.organization_id] += 1
        if len(rows) < batch:
            return
        after = rows[-1].id


async def rekey(db: Database, sealer: Sealer, batch: int = BATCH) -> Rekeyed:
    done = Rekeyed()
    await _reseal(db, sealer, "data_key", secret_keys, _data_key, [], done, batch)
    await _reseal(db, sealer, "webhook", webhooks, _webhook, [], done, batch)
    unfinished = [one_of(instructions.c.status, UNFINISHED)]
    await _reseal(db, sealer, "instruction", instructions, _instruction, unfinished, done, batch)
    if done.organizations:
        async with db.write() as conn:
            await audit.append(
                conn,
                [
                    audit.entry(
                        organization_id,
                        "system",
                        "secrets_key.rekeyed",
                        "organization",
                        organization_id,
                        {"resealed": count},
                    )
                    for organization_id, count in sorted(done.organizations.items())
                ],
            )
    log.info(
        "secrets key: values re-sealed",
        resealed=dict(done.resealed),
        unopenable=len(done.unopenable),
    )
    for what in done.unopenable:
        log.warning("sealed value opens with no configured key", value=what)
    return done
