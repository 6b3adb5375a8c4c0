"""Every legal state transition, in one place.

The engine never writes a status without going through these tables: each UPDATE is
guarded by `WHERE status IN allowed_from(new)`, so an illegal move changes no row.
"""

from __future__ import annotations

import functools

EXECUTION: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),  # waiting for a concurrency slot
    "running": frozenset({"succeeded", "failed", "cancelled"}),
    "failed": frozenset({"running"}),  # rerun from the failed steps
    "cancelled": frozenset({"running"}),  # rerun
    "succeeded": frozenset(),
}

STEP: dict[str, frozenset[str]] = {
    # -> running: a fan-out starts its items; -> succeeded: a fan-out over no items
    "pending": frozenset({"queued", "running", "succeeded", "failed", "skipped", "cancelled"}),
    "queued": frozenset({"running", "failed", "cancelled"}),
    # -> queued: a retry, or the agent was lost and the step goes to another
    "running": frozenset({"succeeded", "failed", "queued", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset({"pending", "running"}),  # rerun (a fan-out resumes its items)
    "skipped": frozenset({"pending"}),  # rerun
    "cancelled": frozenset({"pending", "running"}),  # rerun
}

INSTRUCTION: dict[str, frozenset[str]] = {
    "queued": frozenset({"leased", "cancelled", "expired"}),
    "leased": frozenset({"executing", "completed", "failed", "cancelled", "expired"}),
    "executing": frozenset({"completed", "failed", "cancelled", "expired"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
    "expired": frozenset(),
}

# Final: nothing more happens unless an operator reruns the execution.
FINAL_EXECUTION = frozenset({"succeeded", "failed", "cancelled"})
FINAL_STEP = frozenset({"succeeded", "failed", "skipped", "cancelled"})
FINAL_INSTRUCTION = frozenset(s for s, nxt in INSTRUCTION.items() if not nxt)


@functools.cache
def _allowed_from(table: tuple[tuple[str, frozenset[str]], ...], new: str) -> tuple[str, ...]:
    return tuple(sorted(s for s, nxt in table if new in nxt))


def allowed_from(table: dict[str, frozenset[str]], new: str) -> tuple[str, ...]:
    """The states from which `new` may be entered."""
    return _allowed_from(tuple(table.items()), new)


def can(table: dict[str, frozenset[str]], old: str, new: str) -> bool:
    return new in table.get(old, frozenset())
