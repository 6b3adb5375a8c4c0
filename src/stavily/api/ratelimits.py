"""Rate limits per token, source address, webhook and login, and refused credentials per
source: in this process's memory, or shared by every process and replica through Redis
(STAVILY_REDIS_URL). docs/rate-limits.md."""

from __future__ import annotations

import ipaddress
import math
import time
from functools import lru_cache
from typing import Any, Literal

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter as SharedLimiter
from limits.errors import StorageError
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import ConnectionPool

from stavily.config import Settings
from stavily.errors import RateLimited
from stavily.logging import Throttled

Scope = Literal["api", "login", "webhook", "source"]

# A Redis that does not answer within this is down: the request is not held for it.
REDIS_TIMEOUT = 0.25
# Once it failed, Redis is not asked again for this long (counting goes on in memory).
REDIS_RETRY_SECONDS = 5.0
MAX_KEYS = 100_000

_MESSAGES = {
    "api": "too many requests with this token",
    "login": "too many login attempts from this address",
    "webhook": "too many deliveries to this webhook",
    "source": "too many requests from this address",
}

log = Throttled(structlog.get_logger("stavily.ratelimits"))


@lru_cache(maxsize=4096)
def _network(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address) or ip.is_loopback:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def source_of(address: str) -> str:
    """What a source address is counted as: itself, or for IPv6 its /64, which one host
    or site is handed whole (counting each of its addresses would limit nothing)."""
    return address if ":" not in address else _network(address)


class Windows:
    """Sliding-window counters (limits' algorithm: this window's count plus the previous
    one's, weighted by how much of it is still in the last `window` seconds) in a dict,
    for the one limit counted on every agent request: limits' in-memory storage takes
    7 us a hit, this 1 us, against 200 us for a whole heartbeat."""

    def __init__(self, item: RateLimitItem) -> None:
        self.item = item
        self.amount, self.window = item.amount, float(item.get_expiry())
        self._counts: dict[str, tuple[int, int, int]] = {}  # key -> (window, previous, now)

    def hit(self, key: str) -> float:
        """0 when the request passes (it is counted), else the seconds until one would."""
        index, into = divmod(time.monotonic(), self.window)
        window = int(index)
        counted, previous, current = self._counts.get(key, (window, 0, 0))
        if counted != window:
            previous, current = (current if counted == window - 1 else 0), 0
        if previous * (1 - into / self.window) + current + 1 > self.amount:
            self._counts[key] = (window, previous, current)
            return self.window - into
        if len(self._counts) >= MAX_KEYS:
            self._counts.clear()
        self._counts[key] = (window, previous, current + 1)
        return 0.0


def rate_limited(message: str, item: RateLimitItem, seconds: float) -> RateLimited:
    """429 with Retry-After and the limit's RateLimit-* headers (draft-ietf-httpapi-
    ratelimit-headers-07): its size, nothing left, seconds until a request passes, and
    the policy as `<requests>;w=<window seconds>`."""
    retry_after = max(1, math.ceil(seconds))
    error = RateLimited(message, retry_after=retry_after)
    error.headers = {
        **(error.headers or {}),
        "RateLimit-Limit": str(item.amount),
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(retry_after),
        "RateLimit-Policy": f"{item.amount};w={item.get_expiry()}",
    }
    return error


class RateLimits:
    """Every limit but the agents' own (deps.BurstLimit, on `local`), sliding windows of
    limits' algorithm.

    With Redis, counters are shared, except per source on the agent API: that one is
    counted on every agent request, heartbeats included, and a Redis round trip each
    would cost about as much CPU as the request itself. A source is blocked by the
    process that counted its refused credential past the limit (the count is shared):
    elsewhere its next refused one blocks it there. When Redis fails, counting goes on
    in this process's memory (a warning logged every 10 s) and Redis is tried again 5 s
    later: requests are neither refused nor held up for it."""

    def __init__(self, settings: Settings, deployment: str) -> None:
        self.local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.shared: SharedLimiter | None = None
        self.pool: ConnectionPool | None = None
        if settings.redis_url:
            self.pool = ConnectionPool.from_url(
                settings.redis_url,
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
            )
            storage = RedisStorage(
                settings.redis_url,
                implementation="redispy",
                # one deployment's replicas share its organization; others sharing the
                # Redis do not meet its counters
                key_prefix=f"stavily:{deployment}",
                wrap_exceptions=True,
                connection_pool=self.pool,
            )
            self.shared = SharedLimiter(storage)
        self.items: dict[str, RateLimitItem] = {
            "api": parse(settings.api_rate_limit),
            "login": parse(settings.login_rate_limit),
            "webhook": parse(settings.webhook_rate_limit),
            "source": parse(settings.source_rate_limit),
        }
        self.failures = parse(settings.failed_credential_limit)
        self.agent_sources = Windows(parse(settings.agent_source_rate_limit))
        self._blocked: dict[str, float] = {}  # source -> until (monotonic)
        self._refused: dict[tuple[str, int], float] = {}  # (source, credential) -> until
        self._redis_back_at = 0.0

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.disconnect()

    async def hit(self, scope: Scope, key: str) -> None:
        """Count a request against `scope`'s limit for `key` (for "login", the address);
        RateLimited past it."""
        item = self.items[scope]
        if scope == "login":
            key = source_of(key)
        if not await self._ask("hit", item, scope, key):
            stats = await self._ask("get_window_stats", item, scope, key)
            raise rate_limited(_MESSAGES[scope], item, stats.reset_time - time.time())

    async def admit(self, api: str, source: str) -> None:
        """At the edge, before any credential is looked up: refused (RateLimited) while
        `source` is blocked for its refused credentials, or past its budget for `api`."""
        source = source_of(source)
        until = self._blocked.get(source)
        if until is not None:
            left = until - time.monotonic()
            if left > 0:
                raise rate_limited(
                    "too many refused credentials from this address", self.failures, left
                )
            del self._blocked[source]
        if api != "agents":
            await self.hit("source", f"{api}:{source}")
            return
        wait = self.agent_sources.hit(source)
        if wait:
            raise rate_limited(_MESSAGES["source"], self.agent_sources.item, wait)

    async def failed(self, source: str, credential: str | None = None) -> None:
        """Count a refused credential from `source`. Once it has presented the limit's
        number, it is blocked: every request from it is refused until the window has
        passed. The same credential refused again within the window (an agent whose key
        was revoked, retrying) counts once: guessing takes new ones."""
        now, source = time.monotonic(), source_of(source)
        window = self.failures.get_expiry()
        if credential is not None:
            seen = (source, hash(credential))
            if self._refused.get(seen, 0.0) > now:
                return
            if len(self._refused) >= MAX_KEYS:
                self._refused.clear()
            self._refused[seen] = now + window
        if await self._ask("hit", self.failures, "failed", source) and await self._ask(
            "test", self.failures, "failed", source
        ):
            return
        if len(self._blocked) >= MAX_KEYS:
            self._blocked = {s: until for s, until in self._blocked.items() if until > now}
        if len(self._blocked) < MAX_KEYS:
            self._blocked[source] = now + window
        log.warning("source blocked for refused credentials", source, seconds=window)

    async def _ask(self, method: str, item: RateLimitItem, *keys: str) -> Any:
        """The shared limiter's answer, else (no Redis, or Redis failing) this process's."""
        if self.shared is not None and time.monotonic() >= self._redis_back_at:
            try:
                return await getattr(self.shared, method)(item, *keys)
            except (StorageError, OSError) as exc:
                self._redis_back_at = time.monotonic() + REDIS_RETRY_SECONDS
                log.warning(
                    "rate-limit storage unreachable: counting in memory", "redis", error=str(exc)
                )
        return getattr(self.local, method)(item, *keys)
