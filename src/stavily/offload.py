"""Heavy work off the event loop: on a worker thread, with the cyclic garbage collector
paused meanwhile.

A thread alone is not enough. Parsing and validating a big workflow makes hundreds of
thousands of objects, and the collections they set off stop every thread of the process,
the event loop's too: on a 2-core machine a 600 KB workflow cost pauses of 120-150 ms.
Paused, the collector runs after the work, when most of those objects are gone (freed by
their reference counts, as garbage without cycles always is)."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_paused = 0  # works in progress that paused the collector
_was_enabled = True  # the collector's state before the first of them


def _without_collections(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    global _paused, _was_enabled
    with _lock:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        return fn(*args, **kwargs)
    finally:
        with _lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on a worker thread, the collector paused until it returns."""
    return await asyncio.to_thread(_without_collections, fn, *args, **kwargs)
