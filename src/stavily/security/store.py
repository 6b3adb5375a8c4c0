"""The secret store: each organization's secrets, encrypted at rest, written through the
API and read only by the engine for the step that needs one (security.secrets).

Envelope encryption. A secret's value is AES-GCM under a data key of its organization's;
the data key is kept wrapped (sealed, security.sealing) by the server's secrets key, the
key-encryption key. A secret's row names the data key that opens it, and its associated
data is (organization, name): a ciphertext copied to another name or organization does
not open. `rotate` makes a new data key and re-encrypts the organization's secrets under
it in small batches, while the server runs; a data key is deleted once no secret uses it.
Unwrapped data keys are cached in memory: they never change.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import Conflict, InvalidInput, NotFound
from stavily.ids import new_id
from stavily.security.sealing import Sealer, Unsealable
from stavily.security.secrets import name_problem
from stavily.store.db import Database
from stavily.store.models import secret_keys
from stavily.store.models import secrets as secret_rows
from stavily.timeutil import isoformat, utcnow

log = structlog.get_logger("stavily.secrets")

MAX_VALUE_BYTES = 64 * 1024
ROTATE_BATCH = 100
_VERSION = "v1."
_NONCE = 12


class SecretUnreadable(ValueError):
    """A stored secret that does not open: its data key is gone or another server's, or
    the row was altered or moved."""


def _associated(organization_id: str, name: str) -> bytes:
    return f"stavily secret\n{organization_id}\n{name}".encode()


def _key_owner(organization_id: str, key_id: str) -> str:
    return f"secret-key/{organization_id}/{key_id}"


def _view(row: Any) -> dict[str, Any]:
    """What the API shows of a secret: never its value."""
    return {
        "name": row["name"],
        "version": row["version"],
        "key_id": row["key_id"],
        "created_by": row["created_by"],
        "created_at": isoformat(row["created_at"]),
        "updated_by": row["updated_by"],
        "updated_at": isoformat(row["updated_at"]),
    }


def _checked(name: str, value: str | None = None) -> None:
    problems = []
    problem = name_problem(name)
    if problem:
        problems.append({"path": "name", "message": problem})
    if value is not None and len(value.encode()) > MAX_VALUE_BYTES:
        problems.append({"path": "value", "message": f"at most {MAX_VALUE_BYTES} bytes"})
    if value is not None and not value:
        problems.append({"path": "value", "message": "a secret cannot be empty"})
    if problems:
        raise InvalidInput("invalid secret", problems)


class SecretStore:
    def __init__(self, db: Database, sealer: Sealer) -> None:
        self.db = db
        self.sealer = sealer
        # (organization, data key id) -> the unwrapped key
        self._keys: dict[tuple[str, str], AESGCM] = {}

    # -- data keys ---------------------------------------------------------------------------

    def _unwrap(self, organization_id: str, key_id: str, wrapped: str) -> AESGCM:
        aead = self._keys.get((organization_id, key_id))
        if aead is None:
            try:
                raw = self.sealer.open(wrapped, _key_owner(organization_id, key_id))
            except Unsealable as exc:
                raise SecretUnreadable(
                    f"data key {key_id} does not open with this server's secrets key"
                ) from exc
            aead = self._keys[organization_id, key_id] = AESGCM(base64.b64decode(raw))
        return aead

    async def _key(self, conn: AsyncConnection, organization_id: str, key_id: str) -> AESGCM:
        if (organization_id, key_id) in self._keys:
            return self._keys[organization_id, key_id]
        wrapped = await conn.scalar(
            sa.select(secret_keys.c.wrapped).where(
                secret_keys.c.id == key_id, secret_keys.c.organization_id == organization_id
            )
        )
        if wrapped is None:
            raise SecretUnreadable(f"data key {key_id} is not this organization's")
        return self._unwrap(organization_id, key_id, wrapped)

    async def _new_key(self, conn: AsyncConnection, organization_id: str, now: datetime) -> str:
        key_id = new_id("dk")
        raw = AESGCM.generate_key(bit_length=256)
        wrapped = self.sealer.seal(
            base64.b64encode(raw).decode(), _key_owner(organization_id, key_id)
        )
        await conn.execute(
            secret_keys.insert().values(
                id=key_id, organization_id=organization_id, wrapped=wrapped, created_at=now
            )
        )
        self._keys[organization_id, key_id] = AESGCM(raw)
        return key_id

    async def _current_key(self, conn: AsyncConnection, organization_id: str) -> str:
        """The organization's newest data key in use, made on its first secret."""
        key_id = await conn.scalar(
            sa.select(secret_keys.c.id)
            .where(
                secret_keys.c.organization_id == organization_id,
                secret_keys.c.retired_at.is_(None),
            )
            .order_by(secret_keys.c.created_at.desc(), secret_keys.c.id.desc())
            .limit(1)
        )
        return key_id or await self._new_key(conn, organization_id, utcnow())

    # -- values ------------------------------------------------------------------------------

    def _encrypt(self, aead: AESGCM, organization_id: str, name: str, value: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = aead.encrypt(nonce, value.encode(), _associated(organization_id, name))
        return _VERSION + base64.urlsafe_b64encode(nonce + sealed).decode()

    def _decrypt(self, aead: AESGCM, organization_id: str, name: str, ciphertext: str) -> str:
        try:
            if not ciphertext.startswith(_VERSION):
                raise ValueError("unknown format")
            raw = base64.urlsafe_b64decode(ciphertext[len(_VERSION) :])
            plain = aead.decrypt(raw[:_NONCE], raw[_NONCE:], _associated(organization_id, name))
        except (InvalidTag, ValueError) as exc:
            raise SecretUnreadable(f"secret '{name}' does not open: altered or moved") from exc
        return plain.decode()

    async def _open(self, conn: AsyncConnection, row: Any) -> str:
        aead = await self._key(conn, row.organization_id, row.key_id)
        return self._decrypt(aead, row.organization_id, row.name, row.ciphertext)

    # -- the API's ---------------------------------------------------------------------------

    async def put(
        self, organization_id: str, name: str, value: str, actor: str
    ) -> tuple[dict[str, Any], bool]:
        """Store `value` as `name`, or replace its value: (its view, whether it is new)."""
        _checked(name, value)
        now = utcnow()
        async with self.db.write() as conn:
            row = await self._row(conn, organization_id, name, missing_ok=True)
            key_id = await self._current_key(conn, organization_id)
            aead = await self._key(conn, organization_id, key_id)
            values = {
                "key_id": key_id,
                "ciphertext": self._encrypt(aead, organization_id, name, value),
                "updated_by": actor,
                "updated_at": now,
            }
            if row is None:
                values.update(
                    id=new_id("sec"),
                    organization_id=organization_id,
                    name=name,
                    version=1,
                    created_by=actor,
                    created_at=now,
                )
                try:
                    async with conn.begin_nested():
                        await conn.execute(secret_rows.insert().values(**values))
                except IntegrityError:  # the same name stored at the same moment
                    raise Conflict(f"secret '{name}' was just stored: try again") from None
            else:
                values.update(id=row["id"], version=row["version"] + 1)
                await conn.execute(
                    secret_rows.update().where(secret_rows.c.id == row["id"]).values(**values)
                )
            action = "secret.created" if row is None else "secret.updated"
            details = {"name": name, "version": values["version"], "key_id": key_id}
            await audit.append(
                conn,
                [audit.entry(organization_id, actor, action, "secret", values["id"], details)],
            )
            saved = {**(row or {}), **values}
        return _view(saved), row is None

    async def list(self, organization_id: str) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(secret_rows)
                .where(secret_rows.c.organization_id == organization_id)
                .order_by(secret_rows.c.name)
            )
            return [_view(r._mapping) for r in rows]

    async def get(self, organization_id: str, name: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            return _view(await self._row(conn, organization_id, name))

    async def delete(self, organization_id: str, name: str, actor: str) -> None:
        async with self.db.write() as conn:
            row = await self._row(conn, organization_id, name)
            await conn.execute(secret_rows.delete().where(secret_rows.c.id == row["id"]))
            entry = audit.entry(
                organization_id, actor, "secret.deleted", "secret", row["id"], {"name": name}
            )
            await audit.append(conn, [entry])

    async def rotate(
        self, organization_id: str, actor: str, batch: int = ROTATE_BATCH
    ) -> dict[str, Any]:
        """A new data key for the organization; its secrets re-encrypted under it, `batch`
        at a time (each batch its own transaction: writes go on meanwhile, to the new key);
        the old keys deleted once nothing uses them. A secret that does not open (altered,
        moved) is left as it is, and named in the answer."""
        now = utcnow()
        async with self.db.write() as conn:
            key_id = await self._new_key(conn, organization_id, now)
            await conn.execute(
                secret_keys.update()
                .where(
                    secret_keys.c.organization_id == organization_id,
                    secret_keys.c.id != key_id,
                    secret_keys.c.retired_at.is_(None),
                )
                .values(retired_at=now)
            )
        new = self._keys[organization_id, key_id]
        rewrapped, after = 0, ""
        unreadable: list[str] = []
        while True:
            async with self.db.write() as conn:
                rows = (
                    await conn.execute(
                        sa.select(secret_rows)
                        .where(
                            secret_rows.c.organization_id == organization_id,
                            secret_rows.c.key_id != key_id,
                            secret_rows.c.id > after,
                        )
                        .order_by(secret_rows.c.id)
                        .limit(batch)
                    )
                ).all()
                for row in rows:
                    try:
                        value = await self._open(conn, row)
                    except SecretUnreadable as exc:
                        # left as it is, its key kept: the operator sets it again
                        log.warning("secret not re-encrypted", reason=str(exc))
                        unreadable.append(row.name)
                        continue
                    # only if unchanged since read: a concurrent write used the new key
                    changed = await conn.execute(
                        secret_rows.update()
                        .where(
                            secret_rows.c.id == row.id,
                            secret_rows.c.key_id == row.key_id,
                            secret_rows.c.version == row.version,
                        )
                        .values(
                            key_id=key_id,
                            ciphertext=self._encrypt(new, organization_id, row.name, value),
                        )
                    )
                    rewrapped += changed.rowcount
            if rows:
                after = rows[-1].id
            if len(rows) < batch:
                break
        async with self.db.write() as conn:
            unused = sa.select(secret_rows.c.id).where(secret_rows.c.key_id == secret_keys.c.id)
            deleted = await conn.execute(
                secret_keys.delete()
                .where(
                    secret_keys.c.organization_id == organization_id,
                    secret_keys.c.retired_at.is_not(None),
                    ~unused.exists(),
                )
                .returning(secret_keys.c.id)
            )
            retired = [r.id for r in deleted]
            details = {
                "key_id": key_id,
                "rewrapped": rewrapped,
                "unreadable": unreadable,
                "deleted_keys": retired,
            }
            entry = audit.entry(
                organization_id, actor, "secret.key_rotated", "secret_key", key_id, details
            )
            await audit.append(conn, [entry])
        for old in retired:
            self._keys.pop((organization_id, old), None)
        return {
            "key_id": key_id,
            "rewrapped": rewrapped,
            "unreadable": unreadable,
            "deleted_keys": len(retired),
        }

    async def _row(
        self, conn: AsyncConnection, organization_id: str, name: str, missing_ok: bool = False
    ) -> Any:
        if name_problem(name):
            raise NotFound(f"no secret '{name}'")
        row = (
            (
                await conn.execute(
                    sa.select(secret_rows).where(
                        secret_rows.c.organization_id == organization_id,
                        secret_rows.c.name == name,
                    )
                )
            )
            .mappings()
            .first()
        )
        if row is None and not missing_ok:
            raise NotFound(f"no secret '{name}'")
        return dict(row) if row is not None else None

    # -- the engine's ------------------------------------------------------------------------

    async def read(
        self, conn: AsyncConnection, organization_id: str, names: Iterable[str]
    ) -> dict[str, tuple[str, str]]:
        """The values of those of `names` the organization has, in one query: name ->
        (the secret's id, its value). Whoever calls this audits the reads."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        rows = await conn.execute(
            sa.select(secret_rows).where(
                secret_rows.c.organization_id == organization_id,
                secret_rows.c.name.in_(wanted),
            )
        )
        return {row.name: (row.id, await self._open(conn, row)) for row in rows.all()}

    # -- copies in an instruction (security.secrets) -----------------------------------------

    def seal_copy(self, name: str, value: str) -> str:
        return self.sealer.seal(value, f"secret-copy/{name}")

    def open_copy(self, name: str, sealed: str) -> str:
        try:
            return self.sealer.open(sealed, f"secret-copy/{name}")
        except Unsealable as exc:
            raise SecretUnreadable(f"the copy of secret '{name}' does not open") from exc
