"""Webhooks: a URL per workflow, `/hooks/{id}`, whose requests start it once signed.

A request is accepted only with a valid HMAC-SHA256 of its raw body under one of the
hook's secrets: ours, `X-Stavily-Signature: t=<unix seconds>,v1=<hex>` over
"<t>.<body>" with `t` within the hook's tolerance, or GitHub's `X-Hub-Signature-256:
sha256=<hex>` over the body. Each accepted request is stored as an event (outcome
`accepted`) and answered 202 at once; the run it starts is begun just after, off the
request (`Intake`). Refused requests to a known hook are recorded as refused events for
the operator (a few a minute each, so a flood cannot fill the table). docs/triggers.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets as _random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from starlette.types import Receive, Scope, Send

from stavily.api.errors import error_body
from stavily.api.json import send_json
from stavily.api.middleware import nesting_problem
from stavily.audit import log as audit
from stavily.errors import (
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    StavilyError,
    Unauthorized,
)
from stavily.ids import new_id
from stavily.security.sealing import Sealer, Unsealable
from stavily.store.db import Database
from stavily.store.models import events, webhooks
from stavily.store.prebuilt import prebuilt
from stavily.timeutil import isoformat, utcnow
from stavily.workflows import service
from stavily.workflows.templating import references

log = structlog.get_logger("stavily.webhooks")

HOOKS_TTL = 2.0  # how long a hook (its secrets) is reused before it is read again
SECRET_PREFIX = "whsec_"
# larger bodies are hashed and parsed on a worker thread
_ON_THREAD = 64 * 1024
# refused requests recorded per hook and minute; the rest are counted into the next one
REFUSALS_RECORDED = 10
# an accepted event no replica has processed after this long is taken up by any
ORPHANED_AFTER = 5.0
# `t=` of our signature: ASCII digits only, no more than a unix time has for millennia
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
# headers naming a delivery, in the order they are read as its idempotency key
_DELIVERY_HEADERS = (b"x-github-delivery", b"x-stavily-delivery", b"idempotency-key")
_EVENT_TYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-/")


@dataclass(frozen=True)
class Hook:
    id: str
    organization_id: str
    workflow: str
    secrets: tuple[bytes, ...]  # the current one first, then one being rotated out
    idempotency_field: str | None
    inputs: dict[str, Any]
    tolerance: int


def _accepting(insert: Any) -> Any:
    """An accepted event's INSERT, doing nothing for a key or a signature already taken
    (no row returned): one statement, built once, on the request path."""
    return prebuilt(insert(events).on_conflict_do_nothing().returning(events.c.id))


_ACCEPT = {"sqlite": _accepting(sqlite_insert), "postgresql": _accepting(postgresql_insert)}


def new_secret() -> str:
    return SECRET_PREFIX + _random.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """Our header's value for `body` sent at `timestamp` (what senders compute)."""
    digest = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name: value for name, value in scope["headers"]}


def verify(hook: Hook, headers: dict[bytes, bytes], body: bytes, now: float) -> str:
    """Check the request's signature, and return it as a key: the same signed request
    again is a replay and starts nothing, whatever delivery id it says (no signature
    covers the headers). Ours carries its time, so it is refused anyway once outside the
    tolerance window; GitHub's does not. Raises Unauthorized saying what is wrong."""
    ours = headers.get(b"x-stavily-signature")
    if ours is not None:
        fields: dict[str, list[str]] = {}
        for part in ours.decode("latin-1").split(","):
            name, _, value = part.strip().partition("=")
            fields.setdefault(name, []).append(value)
        stamps, signatures = fields.get("t", []), fields.get("v1", [])
        if len(stamps) != 1 or not _UNIX_SECONDS.fullmatch(stamps[0]) or not signatures:
            raise Unauthorized(
                "X-Stavily-Signature must be t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>'>"
            )
        stamp = int(stamps[0])
        if abs(now - stamp) > hook.tolerance:
            raise Unauthorized(
                f"the signature's timestamp is {int(now - stamp)} s from now, outside this "
                f"webhook's {hook.tolerance} s tolerance: a stale or replayed request"
            )
        signed = b"%d." % stamp + body
        expected = [hmac.new(s, signed, hashlib.sha256).hexdigest() for s in hook.secrets]
        match = next((e for v in signatures for e in expected if _same(v, e)), None)
        if match is None:
            raise Unauthorized("the signature does not match this webhook's secret")
        return f"sig:{stamp}:{match[:32]}"
    github = headers.get(b"x-hub-signature-256")
    if github is not None:
        scheme, _, value = github.decode("latin-1").partition("=")
        if scheme.strip() != "sha256" or not value:
            raise Unauthorized("X-Hub-Signature-256 must be sha256=<hex HMAC-SHA256 of the body>")
        expected = [hmac.new(s, body, hashlib.sha256).hexdigest() for s in hook.secrets]
        match = next((e for e in expected if _same(value, e)), None)
        if match is None:
            raise Unauthorized("the signature does not match this webhook's secret")
        return f"sig:gh:{match[:32]}"
    raise Unauthorized(
        "the request is not signed: send X-Stavily-Signature (t=<unix seconds>,v1=<hex>) "
        "or X-Hub-Signature-256 (sha256=<hex>)"
    )


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.strip().lower().encode(), expected.encode())


def delivery_key(headers: dict[bytes, bytes]) -> str | None:
    """The delivery id the headers give, in _DELIVERY_HEADERS' order, or None."""
    value = next((headers[h] for h in _DELIVERY_HEADERS if headers.get(h)), None)
    if value is None:
        return None
    key = value.decode("latin-1").strip()
    if not 1 <= len(key) <= 300:
        raise InvalidInput("a delivery id is 1 to 300 characters")
    return key


def event_type(headers: dict[bytes, bytes]) -> str:
    """X-Stavily-Event, else GitHub's X-GitHub-Event, else `webhook`."""
    value = headers.get(b"x-stavily-event") or headers.get(b"x-github-event")
    if value is None:
        return "webhook"
    text = value.decode("latin-1").strip()
    if not 1 <= len(text) <= 200 or not set(text) <= _EVENT_TYPE_CHARS:
        raise InvalidInput("an event type is 1 to 200 letters, digits and . _ : - /")
    return text


def field_key(payload: Any, field: str) -> str:
    """The value at the dotted `field` of the body, as an idempotency key."""
    value = payload
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInput(
            f"the body has no string or integer at '{field}', which this webhook reads its "
            "idempotency key from"
        )
    key = str(value)
    if not 1 <= len(key) <= 300:
        raise InvalidInput(f"the body's '{field}' is not 1 to 300 characters")
    return key


def parse_body(body: bytes, max_depth: int) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(
            "the body is not JSON (a GitHub webhook's content type must be application/json)",
            [{"path": "(root)", "message": str(exc)}],
        ) from None
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object")
    problem = nesting_problem(body, payload, max_depth)
    if problem:
        raise InvalidInput(
            "the body is nested too deeply", [{"path": "(root)", "message": problem}]
        )
    return payload


def inputs_problems(inputs: dict[str, Any]) -> list[dict[str, str]]:
    """A webhook's inputs may be templates over `trigger` (the event) only."""
    problems = []
    for where, problem, roots, _ in references(inputs, "inputs"):
        if problem:
            problems.append({"path": where, "message": problem})
        elif roots - {"trigger"}:
            names = ", ".join(sorted(roots - {"trigger"}))
            problems.append(
                {"path": where, "message": f"only `trigger` can be read here, not {names}"}
            )
    return problems


def _view(row: Any, base_url: str) -> dict[str, Any]:
    return {
        "id": row["id"],
        "workflow": row["workflow_name"],
        "description": row["description"],
        "url": f"{base_url.rstrip('/')}/hooks/{row['id']}",
        "idempotency_field": row["idempotency_field"],
        "inputs": row["inputs"],
        "tolerance_seconds": row["tolerance_seconds"],
        "previous_secret_expires_at": isoformat(row["previous_expires_at"])
        if row["previous_secret"]
        else None,
        "created_by": row["created_by"],
        "created_at": isoformat(row["created_at"]),
        "rotated_at": isoformat(row["rotated_at"]),
    }


class Webhooks:
    """The organization's webhooks: made, listed, rotated, deleted; and read (cached
    briefly) by the intake."""

    def __init__(self, db: Database, sealer: Sealer, tolerance: int) -> None:
        self.db = db
        self.sealer = sealer
        self.tolerance = tolerance
        # hook id -> (when read, the hook or None for no such hook)
        self._cache: dict[str, tuple[float, Hook | None]] = {}

    async def create(
        self,
        organization_id: str,
        workflow: str,
        actor: str,
        base_url: str,
        description: str | None = None,
        idempotency_field: str | None = None,
        inputs: dict[str, Any] | None = None,
        tolerance: int | None = None,
    ) -> dict[str, Any]:
        """A new webhook and its secret, which is shown this once."""
        inputs = inputs or {}
        problems = inputs_problems(inputs)
        if problems:
            raise InvalidInput("invalid webhook inputs", problems)
        hook_id, secret, now = new_id("hook"), new_secret(), utcnow()
        row = {
            "id": hook_id,
            "organization_id": organization_id,
            "workflow_name": workflow,
            "description": description,
            "secret": self.sealer.seal(secret, hook_id),
            "previous_secret": None,
            "previous_expires_at": None,
            "idempotency_field": idempotency_field,
            "inputs": inputs,
            "tolerance_seconds": tolerance or self.tolerance,
            "created_by": actor,
            "created_at": now,
            "rotated_at": None,
        }
        async with self.db.write() as conn:
            await service.get(conn, organization_id, workflow)  # NotFound if none
            await conn.execute(webhooks.insert().values(**row))
            await self._audit(conn, organization_id, actor, "webhook.created", hook_id, workflow)
        return {**_view(row, base_url), "secret": secret}

    async def list(
        self, organization_id: str, base_url: str, workflow: str | None = None
    ) -> list[dict[str, Any]]:
        query = sa.select(webhooks).where(webhooks.c.organization_id == organization_id)
        if workflow is not None:
            query = query.where(webhooks.c.workflow_name == workflow)
        async with self.db.read() as conn:
            rows = await conn.execute(query.order_by(webhooks.c.created_at, webhooks.c.id))
            return [_view(r._mapping, base_url) for r in rows]

    async def get(self, organization_id: str, hook_id: str, base_url: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            return _view(await self._row(conn, organization_id, hook_id), base_url)

    async def rotate(
        self,
        organization_id: str,
        hook_id: str,
        actor: str,
        base_url: str,
        keep_previous: timedelta,
    ) -> dict[str, Any]:
        """A new secret, shown this once; the one it replaces is still accepted for
        `keep_previous` (zero: not at all), so senders can be moved over."""
        secret, now = new_secret(), utcnow()
        async with self.db.write() as conn:
            row = await self._row(conn, organization_id, hook_id)
            changes = {
                "secret": self.sealer.seal(secret, hook_id),
                "previous_secret": row["secret"] if keep_previous.total_seconds() > 0 else None,
                "previous_expires_at": now + keep_previous
                if keep_previous.total_seconds() > 0
                else None,
                "rotated_at": now,
            }
            await conn.execute(webhooks.update().where(webhooks.c.id == hook_id).values(**changes))
            await self._audit(
                conn, organization_id, actor, "webhook.rotated", hook_id, row["workflow_name"]
            )
        self._cache.pop(hook_id, None)
        return {**_view({**row, **changes}, base_url), "secret": secret}

    async def delete(self, organization_id: str, hook_id: str, actor: str) -> None:
        async with self.db.write() as conn:
            row = await self._row(conn, organization_id, hook_id)
            await conn.execute(webhooks.delete().where(webhooks.c.id == hook_id))
            await self._audit(
                conn, organization_id, actor, "webhook.deleted", hook_id, row["workflow_name"]
            )
        self._cache.pop(hook_id, None)

    async def hook(self, hook_id: str) -> Hook | None:
        """The hook with its open secrets, or None: cached for HOOKS_TTL seconds, unknown
        ids too (probes cost no query each). A rotation or deletion on another replica
        is seen here that much later."""
        cached = self._cache.get(hook_id)
        if cached is not None and time.monotonic() - cached[0] < HOOKS_TTL:
            return cached[1]
        if len(hook_id) > 40:
            return None
        async with self.db.read() as conn:
            row = (await conn.execute(sa.select(webhooks).where(webhooks.c.id == hook_id))).first()
        hook = None if row is None else self._hook(row._mapping)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[hook_id] = (time.monotonic(), hook)
        return hook

    def _hook(self, row: Any) -> Hook | None:
        try:
            current = [self.sealer.open(row["secret"], row["id"])]
            expires = row["previous_expires_at"]
            if row["previous_secret"] and expires is not None and expires > utcnow():
                current.append(self.sealer.open(row["previous_secret"], row["id"]))
        except Unsealable:
            log.error("webhook secret sealed with another key: requests refused", hook=row["id"])
            return None
        return Hook(
            id=row["id"],
            organization_id=row["organization_id"],
            workflow=row["workflow_name"],
            secrets=tuple(s.encode() for s in current),
            idempotency_field=row["idempotency_field"],
            inputs=row["inputs"],
            tolerance=row["tolerance_seconds"],
        )

    @staticmethod
    async def _row(conn: Any, organization_id: str, hook_id: str) -> Any:
        row = (
            await conn.execute(
                sa.select(webhooks).where(
                    webhooks.c.organization_id == organization_id, webhooks.c.id == hook_id
                )
            )
        ).first()
        if row is None:
            raise NotFound(f"no webhook '{hook_id}'")
        return row._mapping

    @staticmethod
    async def _audit(
        conn: Any, organization_id: str, actor: str, action: str, hook_id: str, workflow: str
    ) -> None:
        await audit.append(
            conn,
            [
                audit.entry(
                    organization_id, actor, action, "webhook", hook_id, {"workflow": workflow}
                )
            ],
        )


class Intake:
    """`/hooks/{id}`, answered before the framework (EdgeMiddleware hands it the
    request): checked, stored as an accepted event, answered 202, and processed after,
    in order, by one task of this process. Accepted events whose process ended before
    it processed them are taken up by any replica's sweep."""

    def __init__(
        self, db: Database, hooks: Webhooks, events: Any, max_body: int, max_depth: int
    ) -> None:
        self.db = db
        self.hooks = hooks
        self.events = events
        self.max_body = max_body
        self.max_depth = max_depth
        # accepted events to process: (event id, its hook's inputs)
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._queued: set[str] = set()  # their ids: not the sweep's to take
        self._task: asyncio.Task[None] | None = None
        # hook id -> (minute, refusals recorded in it, refusals not recorded)
        self._refusals: dict[str, list[int]] = {}
        self._unknown = [0.0, 0]  # when an unknown hook was last logged, and since

    def start(self) -> None:
        self._task = asyncio.create_task(self._process(), name="webhook-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = scope["path"].split("/")
        hook_id = parts[2] if len(parts) == 3 else ""
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("a webhook takes POST requests only", allow="POST")
            hook = await self.hooks.hook(hook_id) if hook_id else None
            if hook is None:
                self._log_unknown(hook_id)
                raise NotFound(f"no webhook '{hook_id}'")
            answer, status = await self._accept(scope, receive, hook)
        except StavilyError as exc:
            body = error_body(exc.code, exc.message, exc.details)
            await send_json(send, body, exc.status, exc.headers)
            return
        await send_json(send, answer, status)

    async def _accept(self, scope: Scope, receive: Receive, hook: Hook) -> tuple[dict, int]:
        headers = _headers(scope)
        try:
            body = await self._body(headers, receive)
            if len(body) > _ON_THREAD:
                key, signature, payload = await asyncio.to_thread(self._check, hook, headers, body)
            else:
                key, signature, payload = self._check(hook, headers, body)
            kind = event_type(headers)
        except StavilyError as exc:
            await self._refused(hook, scope, exc)
            raise
        # the signature is kept always; a key only when the request gave one (a request
        # without is told from another by its signature alone: one index entry, not two)
        scoped = f"{hook.id}:{key}" if key is not None else None
        signed = f"{hook.id}:{signature}"
        row = {
            "id": new_id("evt"),
            "organization_id": hook.organization_id,
            "source": "webhook",
            "type": kind,
            "payload": payload,
            "idempotency_key": scoped,
            "signature": signed,
            "sent_by": f"webhook:{hook.id}",
            "workflow_name": hook.workflow,
            "outcome": "accepted",
            "started": [],
            "created_at": utcnow(),
        }
        async with self.db.write() as conn:
            stored = (await conn.execute(_ACCEPT[self.db.dialect], row)).first()
        if stored is None:  # the same delivery, or the same signed request, again
            first = await self.events._existing(hook.organization_id, "webhook", scoped, signed)
            return {
                "event_id": first["id"],
                "status": "duplicate",
                "outcome": first["outcome"],
            }, 200
        self._queue.put_nowait((row["id"], hook.inputs))
        self._queued.add(row["id"])
        return {"event_id": row["id"], "status": "accepted"}, 202

    def _check(
        self, hook: Hook, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[str | None, str, dict]:
        """The request's idempotency key (its delivery id, else the body field the hook
        names, else None: its signature is its key), its signature's key, its payload."""
        signature = verify(hook, headers, body, time.time())
        payload = parse_body(body, self.max_depth)
        key = delivery_key(headers)
        if key is None and hook.idempotency_field:
            key = field_key(payload, hook.idempotency_field)
        return key, signature, payload

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise PayloadTooLarge(f"the request body is larger than {self.max_body} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                raise InvalidInput("the request ended before its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLarge(f"the request body is larger than {self.max_body} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _refused(self, hook: Hook, scope: Scope, error: StavilyError) -> None:
        """Record the refusal as a refused event, unless this hook has had its share this
        minute: then it is counted, and said in the next one recorded."""
        minute = int(time.time() // 60)
        counts = self._refusals.get(hook.id)
        if counts is None or counts[0] != minute:
            counts = self._refusals[hook.id] = [minute, 0, counts[2] if counts else 0]
        if counts[1] >= REFUSALS_RECORDED:
            counts[2] += 1
            return
        counts[1] += 1
        unrecorded, counts[2] = counts[2], 0
        client = scope.get("client")
        reason = f"{error.status} {error.code}: {error.message}"
        if unrecorded:
            reason += f" ({unrecorded} more refused requests to this webhook were not recorded)"
        try:
            async with self.db.write() as conn:
                await conn.execute(
                    events.insert().values(
                        id=new_id("evt"),
                        organization_id=hook.organization_id,
                        source="webhook",
                        type="webhook.refused",
                        payload={"webhook_id": hook.id, "client": client[0] if client else None},
                        sent_by=f"webhook:{hook.id}",
                        workflow_name=hook.workflow,
                        outcome="refused",
                        reason=reason,
                        started=[],
                        created_at=utcnow(),
                    )
                )
        except Exception:  # recording it must not turn the refusal into a 500
            log.exception("refused webhook request not recorded", hook=hook.id)

    def _log_unknown(self, hook_id: str) -> None:
        """Requests to no hook belong to no organization: logged, at most every 10 s."""
        self._unknown[1] += 1
        if time.monotonic() - self._unknown[0] >= 10:
            log.warning(
                "webhook requests to unknown hooks", last=hook_id[:40], count=self._unknown[1]
            )
            self._unknown[:] = [time.monotonic(), 0]

    async def _process(self) -> None:
        await self.sweep()  # what an earlier run of this server accepted and left
        last_sweep = time.monotonic()
        while True:
            try:
                event_id, inputs = await asyncio.wait_for(self._queue.get(), ORPHANED_AFTER)
            except TimeoutError:
                event_id = inputs = None
            try:
                if event_id is not None:
                    self._queued.discard(event_id)
                    await self.events.process(event_id, inputs)
                if time.monotonic() - last_sweep >= ORPHANED_AFTER:
                    last_sweep = time.monotonic()
                    await self.sweep(ORPHANED_AFTER)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook event not processed; the sweep retries it", event=event_id)

    async def sweep(self, older_than: float = 0.0) -> int:
        """Process accepted events older than `older_than` seconds (another process's,
        or this one's from before a restart); how many."""
        before: datetime = utcnow() - timedelta(seconds=older_than)
        query = (
            sa.select(events.c.id, events.c.sent_by)
            .where(events.c.outcome == "accepted", events.c.created_at <= before)
            .order_by(events.c.created_at, events.c.id)
            .limit(500)
        )
        async with self.db.read() as conn:
            waiting = (await conn.execute(query)).all()
        taken = [(e, s) for e, s in waiting if e not in self._queued]  # not our own backlog
        for event_id, sent_by in taken:
            hook = await self.hooks.hook(sent_by.removeprefix("webhook:"))
            await self.events.process(event_id, hook.inputs if hook else {})
        return len(taken)
