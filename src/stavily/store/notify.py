"""Work queued on one replica wakes the long polls of the others: PostgreSQL LISTEN/NOTIFY.

Every replica listens on one channel over a connection of its own. After a commit that
queued instructions, the replica wakes its own waiters at once and publishes what it
queued; the others offer it to theirs. A lost message costs only latency (the poll finds
the work when it next looks, at the latest when its wait ends), never work: the queue is
the table, not the channel. A replica ignores its own messages.

The same connection listens on a second channel: a credential revoked, rotated or disabled
on one replica makes the others forget the credentials they trusted (their caches), so a
revocation reaches every replica at once rather than when their caches expire. A replica
whose listening connection was lost forgets them all when it is back, as it may have
missed such a message meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import make_url

log = structlog.get_logger("stavily.notify")

CHANNEL = "stavily_work"
CREDENTIALS_CHANNEL = "stavily_credentials"
MAX_PAYLOAD = 7000  # PostgreSQL refuses NOTIFY payloads of 8000 bytes and more
# What a waiting agent's replica needs to know of a queued instruction (fleet.waiters).
FIELDS = (
    "id",
    "organization_id",
    "agent_type",
    "target_agent_name",
    "selector",
    "preferred_agent_id",
    "prefer_until",
    "available_at",
)
TIMES = ("prefer_until", "available_at")


def encode(items: list[dict[str, Any]]) -> list[str]:
    """The items as NOTIFY payloads, each under the size PostgreSQL allows. An item too big
    alone goes without its selector: it may then wake an agent that cannot take it, which
    looks, finds nothing and waits again."""
    payloads: list[str] = []
    batch: list[str] = []
    size = 2
    for item in items:
        fields = {k: item.get(k) for k in FIELDS}
        for name in TIMES:
            if isinstance(fields[name], datetime):
                fields[name] = fields[name].isoformat()
        text = json.dumps(fields, separators=(",", ":"))
        if len(text) > MAX_PAYLOAD:
            text = json.dumps({**fields, "selector": {}}, separators=(",", ":"))
        if batch and size + len(text) + 1 > MAX_PAYLOAD:
            payloads.append("[" + ",".join(batch) + "]")
            batch, size = [], 2
        batch.append(text)
        size += len(text) + 1
    if batch:
        payloads.append("[" + ",".join(batch) + "]")
    return payloads


def decode(payload: str) -> list[dict[str, Any]]:
    items = json.loads(payload)
    for item in items:
        for name in TIMES:
            if item.get(name):
                item[name] = datetime.fromisoformat(item[name])
    return items  # type: ignore[no-any-return]


async def announce_credentials_changed(conn: Any) -> None:
    """In the caller's transaction, on PostgreSQL: when it commits, every replica forgets
    the credentials it trusted (a revocation made outside a request, at start)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.text("SELECT pg_notify(:c, '')"), {"c": CREDENTIALS_CHANNEL})


class WorkChannel:
    def __init__(
        self,
        database_url: str,
        on_work: Callable[[list[dict[str, Any]]], None],
        on_credentials: Callable[[], None] | None = None,
    ) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._on_work = on_work
        self._on_credentials = on_credentials
        self._connection: asyncpg.Connection | None = None
        self._pid: int | None = None
        self._lost = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending: list[dict[str, Any]] = []
        self._sender: asyncio.Task[None] | None = None
        self._credentials_changed = False

    async def start(self, timeout: float = 10) -> None:
        self._task = asyncio.create_task(self._listen())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()

    async def _listen(self) -> None:
        """Keep a listening connection, reconnecting a second after it is lost."""
        while True:
            try:
                connection = await asyncpg.connect(self._dsn)
                self._lost.clear()
                connection.add_termination_listener(lambda _: self._lost.set())
                await connection.add_listener(CHANNEL, self._received)
                if self._on_credentials is not None:
                    await connection.add_listener(CREDENTIALS_CHANNEL, self._credentials)
                    self._on_credentials()  # what was published while we did not listen
                self._connection, self._pid = connection, connection.get_server_pid()
                self._ready.set()
                await self._lost.wait()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("work channel unavailable; retrying", error=str(exc))
            self._connection = None
            await asyncio.sleep(1)

    def _received(self, _connection: Any, pid: int, _channel: str, payload: str) -> None:
        if pid == self._pid:
            return  # our own: already offered here
        try:
            items = decode(payload)
        except (ValueError, TypeError):
            log.warning("unreadable work notification", payload=payload[:200])
            return
        self._on_work(items)

    def _credentials(self, _connection: Any, pid: int, _channel: str, _payload: str) -> None:
        if pid != self._pid and self._on_credentials is not None:
            self._on_credentials()

    def publish_credentials_changed(self) -> None:
        """Tell the other replicas to forget the credentials they trusted (after a
        revocation, rotation or disable was committed), without making the caller wait."""
        if self._connection is None:
            return
        self._credentials_changed = True
        self._wake_sender(self._connection)

    def publish(self, items: list[dict[str, Any]]) -> None:
        """Tell the other replicas, without making the caller wait for it. What is
        published while a notification is on its way goes in the next one, together."""
        if not items or self._connection is None:
            return
        self._pending.extend(items)
        self._wake_sender(self._connection)

    def _wake_sender(self, connection: asyncpg.Connection) -> None:
        # One sender at a time: a connection runs one statement at a time.
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(connection))

    async def _send(self, connection: asyncpg.Connection) -> None:
        while self._pending or self._credentials_changed:
            if self._credentials_changed:
                self._credentials_changed = False
                try:
                    await connection.execute("SELECT pg_notify($1, '')", CREDENTIALS_CHANNEL)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("could not publish a credential change", error=str(exc))
            if not self._pending:
                continue
            items, self._pending = self._pending, []
            try:
                await connection.execute(
                    "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CHANNEL, encode(items)
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not publish queued work", error=str(exc))

    async def close(self) -> None:
        if self._sender is not None:
            await asyncio.wait([self._sender], timeout=5)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
