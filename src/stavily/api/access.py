"""The access log: one structured line a request, except for the agents' routine ones.

Operators' requests (the private API, the docs) are each logged at info: method, path (no
query string), status, milliseconds, client address; never a header, so never a
credential. Agents make almost all of a server's requests (10,000 agents heartbeating are
2,000 a second), so only their refused or failed ones are logged one by one; the rest are
counted and summed up in one line a minute, by status class. Webhook deliveries the same
(each accepted one is an event, listed by `stavily event list`), and answers refused for a
rate limit (429), wherever they went. Refused credentials (401, 403), wherever they went,
and the agents' and webhooks' other refused requests are logged throttled: a line per
source and status every 10 s at most, and no more than 50 such lines in 10 s in all, the
rest counted (stavily.logging.Throttled), so a flood cannot fill the disk.
"""

from __future__ import annotations

import time
from collections import Counter

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stavily.logging import Throttled

log = structlog.get_logger("stavily.access")

SUMMARY_EVERY = 60.0


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # routine answers counted, by kind: (the summary line's name, its counts, since)
        self._routine = {
            "/agents/v1/": ("agent requests", Counter[str](), [time.monotonic()]),
            "/hooks/": ("webhook requests", Counter[str](), [time.monotonic()]),
            # a flood that is rate limited would otherwise write a line per request
            "429": ("requests rate limited", Counter[str](), [time.monotonic()]),
        }
        self._refused = Throttled(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # an app that raised without answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._record(scope, status, time.perf_counter() - began)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        path = scope["path"]
        prefix = "/agents/v1/" if path.startswith("/agents/v1/") else path[:7]
        if status == 429:
            prefix = "429"
        routine = self._routine.get(prefix) if status < 400 or status == 429 else None
        if routine is not None:
            name, answers, since = routine
            answers[f"{status // 100}xx"] += 1
            now = time.monotonic()
            if now - since[0] >= SUMMARY_EVERY:
                log.info(name, seconds=round(now - since[0]), **dict(sorted(answers.items())))
                answers.clear()
                since[0] = now
            return
        if path in ("/healthz", "/health") and status < 400:
            return  # probes, every few seconds
        client = scope.get("client")
        fields = {
            "method": scope["method"],
            "path": path,
            "status": status,
            "ms": round(seconds * 1000, 1),
            "client": client[0] if client else None,
        }
        if status in (401, 403) or (400 <= status < 500 and prefix in self._routine):
            source = f"{fields['client']} {status} {prefix}"
            self._refused.info("request refused", source, **fields)
            return
        (log.warning if status >= 500 else log.info)("request", **fields)
