"""Waking long polls: one eligible waiter per queued instruction, never a herd."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from stavily.fleet.agents import AgentIdentity
from stavily.fleet.waiters import Waiter, Waiters, may_take
from stavily.timeutil import utcnow


def agent(name: str, *, org: str = "org", type: str = "action", **labels: str) -> AgentIdentity:
    return AgentIdentity(f"agt-{name}", org, name, type, dict(labels), 4, "online")


def work(**fields: Any) -> dict[str, Any]:
    return {
        "organization_id": "org",
        "agent_type": "action",
        "target_agent_name": None,
        "selector": {},
        "preferred_agent_id": None,
        "prefer_until": None,
        **fields,
    }


def test_each_item_wakes_one_waiter_the_longest_waiting_first() -> None:
    waiters = Waiters()
    first, second, third = (Waiter(agent(n)) for n in ("a", "b", "c"))
    with waiters.register(first), waiters.register(second), waiters.register(third):
        waiters.offer([work()])
        assert [first.woken, second.woken, third.woken] == [True, False, False]
        # the woken one will look anyway: the next item goes to the next waiter
        waiters.offer([work(), work()])
        assert [first.woken, second.woken, third.woken] == [True, True, True]
        waiters.offer([work()])  # nobody left asleep: nothing to do, nothing breaks


def test_offers_are_read_only_as_far_as_there_are_waiters_to_wake() -> None:
    """A claim's offers are built as they are read: none while nobody waits, and no more
    once every waiter is awake."""
    read: list[int] = []

    def offers(n: int) -> Any:
        for i in range(n):
            read.append(i)
            yield work()

    waiters = Waiters()
    waiters.offer(offers(5))
    assert read == []
    first, second = Waiter(agent("a")), Waiter(agent("b"))
    with waiters.register(first), waiters.register(second):
        waiters.offer(offers(5))
    assert read == [0, 1] and first.woken and second.woken


def test_only_waiters_that_may_take_the_item_are_woken() -> None:
    waiters = Waiters()
    other_org = Waiter(agent("x", org="elsewhere"))
    sensor = Waiter(agent("s", type="sensor"))
    staging = Waiter(agent("st", env="staging"))
    prod = Waiter(agent("p", env="prod"))
    with contextlib.ExitStack() as stack:
        for waiter in (other_org, sensor, staging, prod):
            stack.enter_context(waiters.register(waiter))
        waiters.offer([work(selector={"labels": {"env": "prod"}})])
        assert [w.woken for w in (other_org, sensor, staging, prod)] == [False, False, False, True]
        waiters.offer([work(target_agent_name="nobody-here")])
        assert not staging.woken


def test_a_routed_item_wakes_only_its_agent_until_the_preference_lapses() -> None:
    now = utcnow()
    busy, chosen = agent("busy"), agent("chosen")
    routed = work(preferred_agent_id=chosen.id, prefer_until=now + timedelta(seconds=30))
    assert not may_take(busy, routed, now)
    assert may_take(chosen, routed, now)
    assert may_take(busy, routed, now + timedelta(seconds=31))

    waiters = Waiters()
    w_busy, w_chosen = Waiter(busy), Waiter(chosen)
    with waiters.register(w_busy), waiters.register(w_chosen):
        waiters.offer([routed])
        assert (w_busy.woken, w_chosen.woken) == (False, True)


def test_wait_reports_whether_it_was_woken_and_rearms() -> None:
    async def scenario() -> None:
        waiters = Waiters()
        waiter = Waiter(agent("a"))
        with waiters.register(waiter):
            assert not await waiter.wait(0.01)  # timed out
            task = asyncio.create_task(waiter.wait(5))
            await asyncio.sleep(0)
            assert waiters.idle_agents() == {"agt-a"}  # routing sees it waiting
            waiters.offer([work()])
            assert await task
            assert not waiter.woken and waiters.idle_agents() == set()
            assert not await waiter.wait(0.01)  # the wake-up was used up
        assert waiters.idle_agents() == set()

    asyncio.run(scenario())
