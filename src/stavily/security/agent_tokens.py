"""Short-lived agent JWTs, signed by the orchestrator with a key every replica shares.

The key is kept out of the database (whoever reads the database could otherwise sign
JWTs for any agent): `STAVILY_AGENT_JWT_KEY`, else the file `<data_dir>/agent-jwt.key`,
made on first start (mode 0600). The database holds only the key's SHA-256, so that a
replica with another key (another data dir, a forgotten variable) refuses to start rather
than refuse the JWTs its peers issued.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError

from stavily.errors import Unauthorized
from stavily.security.credentials import StartRefused
from stavily.store.db import Database
from stavily.store.models import server_keys
from stavily.timeutil import utcnow

# The clear key that earlier versions kept in server_keys (migration 0010 deletes it).
KEY_NAME = "agent-jwt-hs256"
FINGERPRINT_NAME = "agent-jwt-hs256-sha256"
KEY_FILE = "agent-jwt.key"
MIN_KEY_LENGTH = 32
ALGORITHM = "HS256"
SHORT_KEY = (
    "STAVILY_AGENT_JWT_KEY is too short: use at least 32 random characters, "
    "e.g. $(openssl rand -hex 32)"
)
MISMATCH = (
    "this server's agent JWT key ({source}) differs from the one the other replicas use: "
    "set the same STAVILY_AGENT_JWT_KEY on every replica"
)

log = structlog.get_logger("stavily.security")


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2 and credential.startswith("eyJ")


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key(
    configured: str | None,
    data_dir: Path,
    file: str = KEY_FILE,
    setting: str = "STAVILY_AGENT_JWT_KEY",
) -> str:
    """`configured` (the variable `setting`) when set, else the data dir's key `file`,
    made now if there is none. StartRefused for a key shorter than 32 characters. The
    server's other keys (security.sealing) are kept the same way."""
    if configured is not None:
        key = configured.strip()
        if len(key) < MIN_KEY_LENGTH:
            raise StartRefused(SHORT_KEY.replace("STAVILY_AGENT_JWT_KEY", setting))
        return key
    path = data_dir / file
    if not path.exists():
        _create_key_file(path, setting)
    return _read_key_file(path, setting)


def _create_key_file(path: Path, setting: str) -> None:
    """Write a new key to a file of our own, then link it into place: the link is atomic
    and fails if the name exists, so of processes starting together (`serve --workers N`)
    one makes the key and the others read that one, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # another process made it first: theirs is the key
        except OSError as exc:
            raise StartRefused(
                f"cannot create {path} ({exc.strerror}): set {setting} instead"
            ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    # A restart after a crash must find the same key: the new name is made durable too.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    log.info("key created", path=str(path))


def _read_key_file(path: Path, setting: str) -> str:
    key = path.read_text().strip()
    if len(key) < MIN_KEY_LENGTH:
        raise StartRefused(
            f"{path} holds no key of at least 32 characters: "
            f"set {setting} or remove the file to have a new key made"
        )
    if path.stat().st_mode & 0o077:
        log.warning("key file readable by others; chmod 600 it", path=str(path))
    return key


async def check_fingerprint(
    db: Database,
    key: str,
    source: str,
    name: str = FINGERPRINT_NAME,
    mismatch: str = MISMATCH,
    previous: Sequence[str] = (),
) -> None:
    """The first replica records its key's fingerprint; every other one must match it,
    or replace it: a replica whose `previous` keys hold the recorded one records its own
    (a rotation: the replicas still on the old key are refused from then on)."""
    mine = fingerprint(key)
    query = sa.select(server_keys.c.value).where(server_keys.c.name == name)
    async with db.read() as conn:
        stored = await conn.scalar(query)
    if stored is None:
        try:
            async with db.write() as conn:
                await conn.execute(
                    server_keys.insert().values(name=name, value=mine, created_at=utcnow())
                )
            stored = mine
        except IntegrityError:  # another replica recorded its own first: compare with it
            async with db.read_latest() as conn:
                stored = await conn.scalar(query)
    if stored != mine and stored in {fingerprint(old) for old in previous}:
        async with db.write() as conn:
            changed = await conn.execute(
                server_keys.update()
                .where(server_keys.c.name == name, server_keys.c.value == stored)
                .values(value=mine, created_at=utcnow())
            )
        if changed.rowcount:
            log.warning("key rotated: the previous key's fingerprint replaced", key=name)
        async with db.read() as conn:
            stored = await conn.scalar(query)
    if stored != mine:
        raise StartRefused(mismatch.format(source=source))


async def signing_key(db: Database, configured: str | None, data_dir: Path) -> str:
    """This server's signing key (see the module's doc), checked against the other
    replicas'. StartRefused when it is too short or not theirs."""
    key = load_key(configured, data_dir)
    source = "STAVILY_AGENT_JWT_KEY" if configured is not None else f"from {data_dir / KEY_FILE}"
    await check_fingerprint(db, key, source)
    return key


def issue(key: str, agent_id: str, organization_id: str, ttl_seconds: int) -> str:
    now = int(time.time())
    claims = {
        "sub": agent_id,
        "org": organization_id,
        "typ": "agent",
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(key: str, token: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[ALGORITHM], options={"require": ["sub", "exp", "iat"]}
        )
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid agent token: {exc}") from None
    if claims.get("typ") != "agent":
        raise Unauthorized("invalid agent token: not an agent token")
    return claims
