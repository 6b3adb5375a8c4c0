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
        self._entries: dict[str, tuple[float, T]] = {}
        self._generation = 0  # clears so far
        self._missed: dict[str, int] = {}  # key -> the generation its lookup began in

    def get(self, key: str) -> T | None:
        hit = self._entries.get(key)
        if hit is not None and hit[0] < time.monotonic():
            self._entries.pop(key, None)
            hit = None
        if hit is None:
            if len(self._missed) >= self.max_entries:
                self._missed.clear()
            self._missed[key] = self._generation
            return None
        return hit[1]

    def put(self, key: str, value: T) -> None:
        if self._missed.get(key, self._generation) != self._generation:
            return  # looked up before a clear: what was read may be what it revoked
        self._missed.pop(key, None)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl, value)

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()


def clear_caches(*caches: CredentialCache[Any]) -> None:
    """Forget every credential these caches trusted (told by another replica of a change)."""
    for cache in caches:
        cache.clear()
