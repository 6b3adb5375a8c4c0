"""Time-ordered, prefixed identifiers (ULID layout: 48-bit milliseconds, 80 random bits).

Monotonic within a process (the ULID spec's monotonic mode): an id made in the same
millisecond as the one before, or while the clock stepped back, is the one before plus
one, so ids sort in the order they were made. Claims rely on it: the oldest execution's
steps go first.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last = 0


def new_id(prefix: str) -> str:
    global _last
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    with _lock:
        if value >> 80 <= _last >> 80:
            value = _last + 1
        _last = value
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
