"""A sensor agent's watches: the trigger and monitor plugins the orchestrator asks it to
keep running (its heartbeat answers' `watch`, the whole set each time), each restarted
with back-off when it dies, its events deduplicated and delivered to
`POST /agents/v1/{id}/events` until the server takes them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import structlog

from stavily.agent.plugins import Outcome, Watching
from stavily.agent.protocols import RunLog

log = structlog.get_logger("stavily.agent")

# events waiting for the server, per agent: beyond this the oldest are dropped (logged)
QUEUE_LIMIT = 1000
# event keys remembered per watch, to drop a trigger reported again
SEEN_LIMIT = 1000
# restart back-off: doubles from the first, up to the last; a watch that ran this long
# before it died starts again from the first
BACKOFF = (1.0, 60.0)
HEALTHY_SECONDS = 60.0

RunWatch = Callable[[dict[str, Any], Watching, RunLog], Awaitable[Outcome]]


class WatchLog(RunLog):
    """A watch's lines go to the agent's own log: there is no step to hold them, and a
    long-lived plugin must not grow a list without end."""

    def __init__(self, watch_id: str) -> None:
        super().__init__()
        self.watch_id = watch_id

    def add(self, line: str) -> None:
        log.info("watch log", watch_id=self.watch_id, line=line[:2000])


def event_key(payload: Any, kind: str) -> str:
    """What makes two reports one event: the payload's `id`, else its whole content."""
    if isinstance(payload, dict) and isinstance(payload.get("id"), str | int):
        return str(payload["id"])
    text = json.dumps([kind, payload], sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class Watch:
    """One watch: its plugin run over and over, restarted with back-off."""

    def __init__(self, spec: dict[str, Any], run: RunWatch, deliver: Callable[..., None]) -> None:
        self.spec = spec
        self.id = str(spec["id"])
        self.deliver = deliver
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        interval = spec.get("interval")
        self.interval = float(interval) if isinstance(interval, int | float) else 60.0
        self.interval = min(max(self.interval, 1.0), 86400.0)
        self.runs = 0
        self.task = asyncio.create_task(self._loop(run))

    def report(self, kind: str, payload: dict[str, Any]) -> None:
        key = event_key(payload, kind)
        if key in self.seen:
            self.seen.move_to_end(key)
            return
        self.seen[key] = None
        while len(self.seen) > SEEN_LIMIT:
            self.seen.popitem(last=False)
        self.deliver(self.id, kind, payload)

    async def _loop(self, run: RunWatch) -> None:
        delay = BACKOFF[0]
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            self.runs += 1
            try:
                outcome = await run(
                    self.spec, Watching(self.interval, self.report), WatchLog(self.id)
                )
            except Exception as exc:  # noqa: BLE001 - a watch must not end the agent
                outcome = Outcome(False, error_message=f"{type(exc).__name__}: {exc}")
            lasted = loop.time() - started
            if outcome.success:
                # a one-shot trigger that ran and exited: the next look after its interval
                wait, delay = self.interval, BACKOFF[0]
            else:
                if lasted >= HEALTHY_SECONDS:
                    delay = BACKOFF[0]
                wait, delay = delay, min(delay * 2, BACKOFF[1])
                log.warning(
                    "watch ended; restarting",
                    watch_id=self.id,
                    plugin_id=self.spec.get("plugin_id"),
                    error=outcome.error_message,
                    exit_code=outcome.exit_code,
                    restart_in=wait,
                )
            await asyncio.sleep(wait)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Watches:
    """The watches this agent keeps, as the server last listed them, and the delivery of
    their events (in order, retried with back-off, at most QUEUE_LIMIT waiting)."""

    def __init__(self, client: httpx.AsyncClient, base: str, run: RunWatch) -> None:
        self.client = client
        self.base = base
        self.run = run
        self.running: dict[str, Watch] = {}
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.dropped = 0
        self._sender: asyncio.Task[None] | None = None

    async def update(self, specs: Any) -> None:
        """The server's whole set: new watches start, ones no longer listed stop, a
        changed one is a new id (the server's)."""
        if not isinstance(specs, list):
            return
        wanted = {
            str(s["id"]): s
            for s in specs
            if isinstance(s, dict) and isinstance(s.get("id"), str) and s.get("plugin_id")
        }
        for watch_id in [w for w in self.running if w not in wanted]:
            log.info("watch stopped", watch_id=watch_id)
            await self.running.pop(watch_id).stop()
        for watch_id, spec in wanted.items():
            if watch_id not in self.running:
                log.info("watch started", watch_id=watch_id, plugin_id=spec.get("plugin_id"))
                self.running[watch_id] = Watch(spec, self.run, self.deliver)

    def deliver(self, watch_id: str | None, kind: str, payload: dict[str, Any]) -> None:
        """Queue an event for the server: a watch's, or (`watch_id` None) one a step's
        plugin reported on the socket, which the server records."""
        key = payload.get("id") if isinstance(payload, dict) else None
        body = {
            "type": kind[:200] or "trigger",
            "payload": payload if isinstance(payload, dict) else {"value": payload},
            **({"watch_id": watch_id} if watch_id else {}),
            # the same key on every retry: the server stores it once
            "idempotency_key": None if isinstance(key, str | int) else uuid.uuid4().hex,
        }
        if body["idempotency_key"] is None:
            del body["idempotency_key"]
        self.queue.append(body)
        while len(self.queue) > QUEUE_LIMIT:
            self.queue.popleft()
            self.dropped += 1
            log.warning("event dropped: too many waiting for the server", dropped=self.dropped)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        delay = 0.5
        while self.queue:
            body = self.queue[0]
            try:
                response = await self.client.post(f"{self.base}/events", json=body, timeout=15)
            except httpx.HTTPError as exc:
                log.warning("event not delivered yet", error=str(exc))
            else:
                code = response.status_code
                if code in (200, 201):
                    log.info("event delivered", watch_id=body.get("watch_id"), **response.json())
                elif 400 <= code < 500 and code not in (408, 429):  # final: retrying won't help
                    log.warning("event refused", status=code, body=response.text[:300])
                else:
                    code = 0
                if code:
                    self.queue.popleft()
                    delay = 0.5
                    continue
                log.warning("event not accepted yet", status=response.status_code)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)

    async def close(self) -> None:
        """Every watch stopped (its plugin killed); events still waiting get a last try."""
        for watch in list(self.running.values()):
            await watch.stop()
        self.running.clear()
        if self._sender is not None and not self._sender.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._sender), 5)
            self._sender.cancel()
