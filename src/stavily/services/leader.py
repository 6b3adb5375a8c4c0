"""Leases on singleton duties: of N server processes on one database, the one holding a
duty's lease does it (the scheduler first). A lease is one row, taken or renewed by one
conditional statement; a holder that stops renewing it loses it when it expires, and
another process takes it over then."""

from __future__ import annotations

import os
import secrets
import socket
import time
from datetime import timedelta

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from stavily.store.db import Database
from stavily.store.models import leases
from stavily.timeutil import utcnow

log = structlog.get_logger("stavily.leader")


def holder_id() -> str:
    """This process, told apart from every other: host, pid, and a random part (a pid
    is reused after a restart; the lease must not believe it is still ours)."""
    return f"{socket.gethostname()[:120]}:{os.getpid()}:{secrets.token_hex(4)}"


class Lease:
    """The lease `name` for `holder`, `ttl` seconds long. `held` is true only while the
    last renewal succeeded less than `ttl` minus a margin ago (measured on this process's
    monotonic clock), so a holder that fails to renew stops at once, before another can
    take over. The expiry in the row is compared with each process's own clock: keep the
    servers' clocks in step (NTP); a skew of S seconds shortens a takeover or lengthens it
    by S."""

    def __init__(self, db: Database, name: str, holder: str, ttl: float) -> None:
        self.db = db
        self.name = name
        self.holder = holder
        self.ttl = ttl
        self._valid_until = 0.0

    @property
    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    async def acquire_or_renew(self) -> bool:
        """Take the lease if it is free or expired, or renew it if ours; whether we hold
        it now. A failure to reach the database counts as not holding it."""
        started = time.monotonic()
        now = utcnow()
        expires = now + timedelta(seconds=self.ttl)
        try:
            async with self.db.write() as conn:
                insert = sqlite_insert if conn.dialect.name == "sqlite" else postgresql_insert
                await conn.execute(
                    insert(leases)
                    .values(name=self.name, holder=self.holder, expires_at=expires)
                    .on_conflict_do_nothing(index_elements=[leases.c.name])
                )
                result = await conn.execute(
                    leases.update()
                    .where(
                        leases.c.name == self.name,
                        sa.or_(leases.c.holder == self.holder, leases.c.expires_at < now),
                    )
                    .values(holder=self.holder, expires_at=expires)
                )
                held = result.rowcount == 1
        except Exception:
            log.exception("lease not renewed", lease=self.name)
            held = False
        was = self.held
        # a margin for the time the statement took and the clocks' drift
        self._valid_until = started + self.ttl * 0.8 if held else 0.0
        if held and not was:
            log.info("lease taken", lease=self.name, holder=self.holder)
        elif was and not held:
            log.warning("lease lost", lease=self.name, holder=self.holder)
        return held

    async def release(self) -> None:
        """Give the lease up (a clean shutdown), so another process takes it at once."""
        self._valid_until = 0.0
        try:
            async with self.db.write() as conn:
                await conn.execute(
                    leases.delete().where(
                        leases.c.name == self.name, leases.c.holder == self.holder
                    )
                )
        except Exception:
            log.exception("lease not released", lease=self.name)
