"""Long polls waiting for work, and waking the right one when work is queued.

Each queued instruction wakes one waiting agent that may take it: the agent routing
chose for it if that one waits, otherwise the one that has waited longest. Waking every
waiter for every instruction (a thundering herd) would make each of them open a write
transaction to find, all but one, nothing.

A waiter is registered before its poll first looks for work, so an instruction queued
between that look and the wait still wakes it. A woken waiter that finds nothing goes
back to waiting. Work it saw but did not take is offered again by the claim itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from stavily.fleet.agents import AgentIdentity, eligible
from stavily.timeutil import utcnow


class Waiter:
    """One long poll: the agent it is for, and whether it was woken or hung up."""

    __slots__ = ("_event", "agent", "hung_up", "idle", "woken")

    def __init__(self, agent: AgentIdentity) -> None:
        self.agent = agent
        self.hung_up = False
        self.idle = False  # in wait(), not looking for work right now
        self.woken = False
        self._event = asyncio.Event()

    def wake(self) -> None:
        self.woken = True
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Until woken or `timeout` seconds: whether it was woken."""
        self.idle = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._event.wait()
        finally:
            self.idle = False
        woken, self.woken = self.woken, False
        self._event.clear()
        return woken


def may_take(agent: AgentIdentity, work: dict[str, Any], now: datetime) -> bool:
    """Whether `agent` could claim the queued instruction `work` now (as claim decides)."""
    if work["organization_id"] != agent.organization_id or work["agent_type"] != agent.type:
        return False
    target = work.get("target_agent_name")
    if target is not None and target != agent.name:
        return False
    preferred, until = work.get("preferred_agent_id"), work.get("prefer_until")
    if preferred is not None and preferred != agent.id and until is not None and until > now:
        return False
    return eligible(agent, work.get("selector") or {})


class Waiters:
    def __init__(self) -> None:
        self._waiters: dict[Waiter, None] = {}  # in the order they came: longest first

    @contextlib.contextmanager
    def register(self, waiter: Waiter) -> Iterator[Waiter]:
        self._waiters[waiter] = None
        try:
            yield waiter
        finally:
            del self._waiters[waiter]

    def idle_agents(self) -> set[str]:
        """Agents waiting for work right now: routing chooses among them."""
        return {w.agent.id for w in self._waiters if w.idle}

    def offer(self, work: Iterable[dict[str, Any]]) -> None:
        """Queued instructions: wake one waiter that may take each, preferring the agent
        each was routed to. Waiters already woken will look anyway and are not counted."""
        sleeping = [w for w in self._waiters if not w.woken]
        if not sleeping:
            return  # `work` not looked at: it may be built as it is read (engine._offers)
        now = utcnow()
        for item in work:
            # While a preference holds, only the preferred agent may take the item.
            for i, waiter in enumerate(sleeping):
                if may_take(waiter.agent, item, now):
                    waiter.wake()
                    del sleeping[i]
                    break
            if not sleeping:
                return

    def offer_later(self, delay: float, work: list[dict[str, Any]]) -> None:
        asyncio.get_running_loop().call_later(max(delay, 0.0), self.offer, work)
