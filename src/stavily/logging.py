"""Structured JSON logs (structlog) on standard error."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog


def configure(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(message)s")
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class Throttled:
    """At most one line per `every` seconds for each key (a kind of event and its source),
    with the count of those left out since the last; and, however many sources there are,
    at most `per_event` lines of one kind of event per `every` seconds, those past it
    counted into one line: a flood of refused credentials must not fill the disk, and
    must still show."""

    def __init__(
        self, logger: Any, every: float = 10.0, max_keys: int = 10_000, per_event: int = 50
    ) -> None:
        self.logger = logger
        self.every = every
        self.max_keys = max_keys
        self.per_event = per_event
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        # per kind of event: when its window began, lines written in it, lines left out
        self._events: dict[str, list[float]] = {}

    def warning(self, event: str, source: str, **fields: Any) -> None:
        self._log(self.logger.warning, event, source, fields)

    def info(self, event: str, source: str, **fields: Any) -> None:
        self._log(self.logger.info, event, source, fields)

    def _log(self, write: Any, event: str, source: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        key = (event, source)
        last, left_out = self._last.get(key, (-self.every, 0))
        if now - last < self.every:
            self._last[key] = (last, left_out + 1)
            return
        window = self._events.setdefault(event, [now, 0, 0])
        if now - window[0] >= self.every:
            if window[2]:
                write(event, source="(many)", left_out=int(window[2]), seconds=self.every)
            window[:] = [now, 0, 0]
        if window[1] >= self.per_event:
            window[2] += 1
            return
        window[1] += 1
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        extra = {"left_out": left_out} if left_out else {}
        write(event, source=source, **fields, **extra)
