"""High-entropy bearer credentials: generated here, stored only as SHA-256 digests."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, Generic, TypeVar

from stavily.errors import StavilyError

T = TypeVar("T")


class StartRefused(StavilyError):
    """A credential setting that the server will not start with; the message says what to
    set instead (`stavily serve` prints it alone)."""

    code = "start_refused"


def generate(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def digest(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


class CredentialCache(Generic[T]):
    """Digest -> resolved identity for a few seconds, so a request costs no lookup.

    `clear()` (a revocation, here or heard from another replica) also keeps out what a
    lookup begun before it puts afterwards: that lookup may have read the row as it was
    before the change."""

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        # key -> (expires, value, refresh from): monotonic seconds
        self._entries: dict[str, tuple[float, T, float]] = {}
        self._generation = 0  # clears so far
        self._missed: dict[str, int] = {}  # key -> the generation its lookup began in

    def _begin(self, key: str) -> None:
        if len(self._missed) >= self.max_entries:
            self._missed.clear()
        self._missed[key] = self._generation

    def get(self, key: str) -> T | None:
        hit = self._entries.get(key)
        if hit is not None and hit[0] < time.monotonic():
            self._entries.pop(key, None)
            hit = None
        if hit is None:
            self._begin(key)
            return None
        return hit[1]

    def due(self, key: str) -> bool:
        """Whether an entry is past half its time: the caller looks it up again in the
        background (once), so a credential in steady use never waits for a lookup."""
        hit = self._entries.get(key)
        if hit is None or hit[2] > time.monotonic():
            return False
        self._entries[key] = (hit[0], hit[1], float("inf"))
        self._begin(key)
        return True

    def put(self, key: str, value: T) -> None:
        if self._missed.get(key, self._generation) != self._generation:
            return  # looked up before a clear: what was read may be what it revoked
        self._missed.pop(key, None)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        now = time.monotonic()
        self._entries[key] = (now + self.ttl, value, now + self.ttl / 2)

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()


def clear_caches(*caches: CredentialCache[Any]) -> None:
    """Forget every credential these caches trusted (told by another replica of a change)."""
    for cache in caches:
        cache.clear()
