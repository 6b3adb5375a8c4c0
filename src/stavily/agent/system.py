"""What the agent's heartbeat says about its machine (`system`): cpu, memory, disk, load.

Every figure is optional: one that cannot be read (no psutil, a platform without load
averages, a folder on a filesystem that refuses statvfs) is left out and the rest is sent.
Figures are kept within what the server accepts, so a strange reading never gets the whole
heartbeat refused.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency, but figures are optional
    psutil = None  # type: ignore[assignment]

log = structlog.get_logger("stavily.agent")

# psutil.cpu_percent(interval=None) compares with its previous call; closer calls than this
# measure nothing worth sending.
_CPU_MIN_SPAN = 0.1
_MAX_BYTES = 2**60
_MAX_LOAD = 100_000


def _percent(value: Any) -> float | None:
    number = float(value)
    if math.isnan(number):
        return None
    return round(min(100.0, max(0.0, number)), 1)


def _existing(path: Path) -> Path:
    """The folder itself, or its nearest existing parent (the plugins folder may not exist
    yet, and its filesystem is what matters)."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


class SystemFigures:
    """Reads the figures; one instance per agent, so cpu_percent measures between beats.

    Call it from one thread: psutil keeps cpu_percent's previous reading per thread, and a
    thread's first call measures nothing. Each figure is a quick read of /proc or statvfs.
    """

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self._failed: set[str] = set()
        self._cpu_at: float | None = None
        if psutil is not None:
            try:
                psutil.cpu_percent(interval=None)  # the first call only starts the count
                self._cpu_at = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - any failure only leaves the figure out
                self._note("cpu_percent", exc)

    def collect(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        if psutil is not None:
            self._read(figures, "cpu_percent", self._cpu_percent)
            memory: Any = self._read({}, "memory", psutil.virtual_memory)
            if memory is not None:
                self._read(figures, "memory_percent", lambda: _percent(memory.percent))
                self._read(figures, "memory_total_bytes", lambda: _bytes(memory.total))
            self._read(
                figures,
                "disk_percent",
                lambda: _percent(psutil.disk_usage(str(_existing(self.disk_path))).percent),
            )
        self._read(figures, "load", _load)
        self._read(figures, "cpu_count", _cpu_count)
        return figures

    def _cpu_percent(self) -> float | None:
        now = time.monotonic()
        if self._cpu_at is not None and now - self._cpu_at < _CPU_MIN_SPAN:
            return None
        value = psutil.cpu_percent(interval=None)
        self._cpu_at = now
        return _percent(value)

    def _read(self, figures: dict[str, Any], name: str, read: Callable[[], Any]) -> Any:
        try:
            value = read()
        except Exception as exc:  # noqa: BLE001 - any failure only leaves the figure out
            self._note(name, exc)
            return None
        if value is not None:
            figures[name] = value
        return value

    def _note(self, name: str, exc: Exception) -> None:
        if name not in self._failed:  # once per figure, not once per heartbeat
            self._failed.add(name)
            log.warning("a system figure cannot be read", figure=name, error=str(exc))


def _bytes(value: Any) -> int | None:
    number = int(value)
    return number if 0 <= number <= _MAX_BYTES else None


def _load() -> list[float] | None:
    if not hasattr(os, "getloadavg"):
        return None  # Windows
    values = [round(v, 2) for v in os.getloadavg()]
    if any(math.isnan(v) or not 0 <= v <= _MAX_LOAD for v in values):
        return None
    return values


def _cpu_count() -> int | None:
    count = None
    if psutil is not None:
        try:
            count = psutil.cpu_count()
        except Exception:  # noqa: BLE001 - os.cpu_count() is as good
            count = None
    count = count or os.cpu_count()
    return int(count) if count and count >= 1 else None
