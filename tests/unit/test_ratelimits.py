"""RateLimits on its own: refused credentials, the 429's headers, what goes to Redis."""

from __future__ import annotations

import os
import uuid
from types import SimpleNamespace

import pytest
from limits import parse
from redis.asyncio import Redis

from stavily.api import ratelimits
from stavily.api.ratelimits import RateLimits, Windows, rate_limited
from stavily.config import Settings
from stavily.errors import RateLimited

REDIS_URL = os.environ.get("STAVILY_TEST_REDIS_URL")


def test_retry_after_is_whole_seconds_rounded_up_and_never_zero() -> None:
    item = parse("20/minute")
    assert rate_limited("slow down", item, 0.01).headers == {
        "Retry-After": "1",
        "RateLimit-Limit": "20",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "1",
        "RateLimit-Policy": "20;w=60",
    }
    late = rate_limited("slow down", item, 59.2)
    assert late.status == 429 and late.details == {"retry_after": 60}
    assert late.headers is not None and late.headers["Retry-After"] == "60"


def test_a_window_counts_the_previous_one_by_how_much_of_it_is_still_in_reach(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [600.0]  # the start of a window
    monkeypatch.setattr(ratelimits, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    windows = Windows(parse("4/minute"))
    assert [windows.hit("a") for _ in range(4)] == [0.0] * 4
    assert windows.hit("a") == 60.0 and windows.hit("b") == 0.0
    clock[0] += 75  # a quarter into the next window: 4 x 3/4 = 3 still count
    assert windows.hit("a") == 0.0
    assert windows.hit("a") == 45.0
    clock[0] += 120  # two windows on: nothing counts
    assert [windows.hit("a") for _ in range(4)] == [0.0] * 4


async def test_a_source_is_blocked_once_it_presented_the_limit_of_refused_credentials() -> None:
    limits = RateLimits(Settings(failed_credential_limit="3/minute"), "org")
    for _ in range(5):
        await limits.failed("10.0.0.1", "stv_the_same_one")  # counts once
    await limits.failed("10.0.0.1", "stv_another")
    await limits.admit("api", "10.0.0.1")  # two of three: not blocked
    await limits.failed("10.0.0.1")  # a refused login: no credential to tell apart
    with pytest.raises(RateLimited, match="refused credentials") as refused:
        await limits.admit("agents", "10.0.0.1")
    assert 1 <= refused.value.details["retry_after"] <= 60
    await limits.admit("agents", "10.0.0.2")


async def test_an_ipv6_source_is_its_slash_64() -> None:
    """One host or site is handed a /64 whole: each of its addresses is no new source."""
    limits = RateLimits(Settings(failed_credential_limit="2/minute"), "org")
    await limits.failed("2001:db8:1:2::a", "stv_one")
    await limits.failed("2001:db8:1:2:ffff::b", "stv_two")
    with pytest.raises(RateLimited, match="refused credentials"):
        await limits.admit("api", "2001:db8:1:2::c")
    await limits.admit("api", "2001:db8:1:3::a")  # the next /64
    await limits.admit("api", "::ffff:192.0.2.1")  # IPv4 as IPv6 is its IPv4 address


@pytest.mark.skipif(not REDIS_URL, reason="STAVILY_TEST_REDIS_URL is not set: Redis runs skipped")
async def test_only_the_agent_apis_source_budget_stays_out_of_redis() -> None:
    deployment = f"unit-{uuid.uuid4().hex}"
    limits = RateLimits(
        Settings(redis_url=REDIS_URL, agent_source_rate_limit="2/minute"), deployment
    )
    redis = Redis.from_url(str(REDIS_URL))
    try:
        await limits.admit("agents", "10.0.0.3")
        await limits.admit("agents", "10.0.0.3")
        with pytest.raises(RateLimited, match="from this address"):
            await limits.admit("agents", "10.0.0.3")
        assert await redis.keys(f"stavily:{deployment}*") == []
        await limits.admit("api", "10.0.0.3")  # its own budget, and shared
        await limits.hit("webhook", "whk_1")
        assert len(await redis.keys(f"stavily:{deployment}*")) == 2
    finally:
        await redis.aclose()
        await limits.close()
