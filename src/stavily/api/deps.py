"""Request dependencies: the app's state and the caller's identity."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from limits import RateLimitItem
from limits.strategies import RateLimiter

from stavily.config import Settings
from stavily.errors import RateLimited, StavilyError
from stavily.fleet import AgentIdentity, HeartbeatBuffer, authenticate_agent
from stavily.fleet.agents import AgentLookups
from stavily.logging import Throttled
from stavily.plugins.installs import Installs
from stavily.plugins.registry import Registry
from stavily.security import CredentialCache, Principal, authenticate_token
from stavily.store.db import Database
from stavily.workflows.engine import Engine
from stavily.workflows.watches import Events, Watches
from stavily.workflows.webhooks import Intake, Webhooks


class BurstLimit:
    """A rate limit per key (limits' algorithm and storage) that sees only the requests
    following the same key's previous one within the limit's window.

    A limit is for bursts: an agent calling every few seconds (normally all of them)
    then costs the limiter nothing, and its bookkeeping - limits' in-memory storage scans
    every key it holds each 10 ms - grows with the agents that burst, not with the fleet.
    The request that began a burst is counted with the one that shows it, so the count
    is exact: the limit's N requests pass, the next is refused."""

    MAX_KEYS = 200_000

    def __init__(self, limiter: RateLimiter, item: RateLimitItem, kind: str) -> None:
        self.limiter, self.item, self.kind = limiter, item, kind
        self.window = float(item.get_expiry())
        self._last: dict[str, tuple[float, bool]] = {}  # key -> (when, counted)

    def hit(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if len(self._last) >= self.MAX_KEYS:
            self._last.clear()
        if last is None or now - last[0] >= self.window:
            self._last[key] = (now, False)
            return True
        self._last[key] = (now, True)
        return self.limiter.hit(self.item, self.kind, key, cost=1 if last[1] else 2)


@dataclass
class State:
    settings: Settings
    db: Database
    engine: Engine
    heartbeats: HeartbeatBuffer
    agent_cache: CredentialCache[AgentIdentity]
    agent_lookups: AgentLookups
    token_cache: CredentialCache[Principal]
    organization_id: str
    jwt_key: str
    agent_limit: BurstLimit
    heartbeat_limit: BurstLimit
    plugins: Registry
    installs: Installs
    watches: Watches
    events: Events
    webhooks: Webhooks
    intake: Intake


def state_of(request: Request) -> State:
    return request.app.state.stavily  # type: ignore[no-any-return]


async def get_state(request: Request) -> State:
    # async: a plain function dependency would cost a thread-pool hop on every request
    return state_of(request)


def bearer(request: Request) -> str | None:
    return bearer_of(request.headers.get("authorization"))


def bearer_of(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    return None


class BearerScheme(HTTPBearer):
    """A bearer credential, declared in the OpenAPI document (so the routes carry
    `security` and the docs page its Authorize button) but read our way: no credential
    is None, and the route answers its own 401 in the one error shape."""

    async def __call__(self, request: Request) -> str | None:  # type: ignore[override]
        return bearer(request)


api_token = BearerScheme(
    scheme_name="APIToken",
    bearerFormat="stv_...",
    description="An API token of the private API (`/api/v1`); its role sets what it may do.",
    auto_error=False,
)
agent_credential = BearerScheme(
    scheme_name="AgentCredential",
    bearerFormat="stva_... or JWT",
    description="An agent's API key, or a JWT from `POST /agents/v1/{agent_id}/token`.",
    auto_error=False,
)
APIToken = Annotated[str | None, Depends(api_token)]
AgentCredential = Annotated[str | None, Depends(agent_credential)]


# Refused credentials are logged, at most a line per kind and source every 10 s.
refusals = Throttled(structlog.get_logger("stavily.access"))


async def current_principal(request: Request, credential: APIToken) -> Principal:
    state = state_of(request)
    try:
        return await authenticate_token(state.db, credential, state.token_cache)
    except StavilyError as exc:
        source = request.client.host if request.client else "unknown"
        refusals.warning("API token refused", source, reason=exc.message)
        raise


async def agent_for(
    state: State, credential: str | None, agent_id: str | None, limited: bool = True
) -> AgentIdentity:
    """The agent behind the credential, held to its rate limit unless `limited` is off:
    results are not, as official agents never retry one (a refused result is lost and
    its step waits for its lease to expire)."""
    try:
        agent = await authenticate_agent(
            state.agent_lookups, credential, agent_id, state.agent_cache, state.jwt_key
        )
    except StavilyError as exc:
        refusals.warning("agent credential refused", agent_id, reason=exc.message)
        raise
    if limited and not state.agent_limit.hit(agent.id):
        raise RateLimited("too many requests from this agent", retry_after=1)
    return agent


async def reporting_agent(
    request: Request, agent_id: str, credential: AgentCredential
) -> AgentIdentity:
    return await agent_for(state_of(request), credential, agent_id, limited=False)


async def current_agent(
    request: Request, agent_id: str, credential: AgentCredential
) -> AgentIdentity:
    return await agent_for(state_of(request), credential, agent_id)


async def credential_agent(request: Request, credential: AgentCredential) -> AgentIdentity:
    """The agent behind the credential, for a route whose path names no agent (its body
    does: the route checks it)."""
    return await agent_for(state_of(request), credential, None)


AppState = Annotated[State, Depends(get_state)]
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
CurrentAgent = Annotated[AgentIdentity, Depends(current_agent)]
ReportingAgent = Annotated[AgentIdentity, Depends(reporting_agent)]
CredentialAgent = Annotated[AgentIdentity, Depends(credential_agent)]
