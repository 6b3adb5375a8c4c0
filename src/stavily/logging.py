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
    with the count of those left out since the last: a flood of refused credentials must
    not fill the disk, and must still show."""

    def __init__(self, logger: Any, every: float = 10.0, max_keys: int = 10_000) -> None:
        self.logger = logger
        self.every = every
        self.max_keys = max_keys
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warning(self, event: str, source: str, **fields: Any) -> None:
        now = time.monotonic()
        key = (event, source)
        last, left_out = self._last.get(key, (-self.every, 0))
        if now - last < self.every:
            self._last[key] = (last, left_out + 1)
            return
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        extra = {"left_out": left_out} if left_out else {}
        self.logger.warning(event, source=source, **fields, **extra)
