"""High-entropy bearer credentials: generated here, stored only as SHA-256 digests."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Generic, TypeVar

T = TypeVar("T")


def generate(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def digest(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


class CredentialCache(Generic[T]):
    """Digest -> resolved identity for a few seconds, so a request costs no lookup."""

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, T]] = {}

    def get(self, key: str) -> T | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            self._entries.pop(key, None)
            return None
        return hit[1]

    def put(self, key: str, value: T) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl, value)

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
