"""Request dependencies: the app's state and the caller's identity."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from limits import RateLimitItem
from limits.strategies import RateLimiter

from stavily.api.ratelimits import RateLimits, rate_limited
from stavily.api.schemas import errors
from stavily.config import Settings
from stavily.errors import StavilyError, Unauthorized
from stavily.fleet import AgentIdentity, HeartbeatBuffer, authenticate_agent
from stavily.fleet.agents import AgentLookups, AgentRefused
from stavily.logging import Throttled
from stavily.plugins.installs import Installs
from stavily.plugins.registry import Registry
from stavily.security import CredentialCache, Principal, authenticate_token
from stavily.security.access import Denials, TokenUse
from stavily.security.store import SecretStore
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
    token_use: TokenUse
    denials: Denials
    organization_id: str
    jwt_key: str
    agent_limit: BurstLimit
    heartbeat_limit: BurstLimit
    rate_limits: RateLimits
    plugins: Registry
    installs: Installs
    watches: Watches
    events: Events
    webhooks: Webhooks
    intake: Intake
    secret_store: SecretStore


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
        principal = await authenticate_token(
            state.db,
            credential,
            state.token_cache,
            state.token_use,
            state.settings.session_idle_seconds,
        )
    except StavilyError as exc:
        source = peer(request)
        refusals.warning("API token refused", source, reason=exc.message)
        if credential and isinstance(exc, Unauthorized):  # no credential is no attempt
            await state.denials.record(source, "api_token", exc)
        raise  # counted against its source at the edge (api.middleware)
    await state.rate_limits.hit("api", principal.token_id)
    return principal


async def agent_for(
    state: State,
    credential: str | None,
    agent_id: str | None,
    limited: bool = True,
    source: str = "unknown",
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
        if credential and isinstance(exc, Unauthorized | AgentRefused):
            await state.denials.record(source, "agent_credential", exc, agent_id)
        raise
    if limited and not state.agent_limit.hit(agent.id):
        raise rate_limited("too many requests from this agent", state.agent_limit.item, 1)
    return agent


async def reporting_agent(
    request: Request, agent_id: str, credential: AgentCredential
) -> AgentIdentity:
    return await agent_for(
        state_of(request), credential, agent_id, limited=False, source=peer(request)
    )


async def current_agent(
    request: Request, agent_id: str, credential: AgentCredential
) -> AgentIdentity:
    return await agent_for(state_of(request), credential, agent_id, source=peer(request))


async def credential_agent(request: Request, credential: AgentCredential) -> AgentIdentity:
    """The agent behind the credential, for a route whose path names no agent (its body
    does: the route checks it)."""
    return await agent_for(state_of(request), credential, None, source=peer(request))


def peer(scope: Any) -> str:
    """The caller's address: an ASGI scope's, or a Request's (uvicorn has applied
    X-Forwarded-For from the proxies it trusts)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def permitted(permission: str) -> Any:
    """The route's one declaration of what it needs: the caller, refused (403) unless
    its role grants `permission`. `Annotated[Principal, permitted("x:y")]`."""

    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        principal.require(permission)
        return principal

    check.permission = permission  # type: ignore[attr-defined]
    return Depends(check)


def permission_of(route: APIRoute) -> str | None:
    """The permission `route` declared with `permitted`, or None."""
    stack = list(route.dependant.dependencies)
    while stack:
        dependency = stack.pop()
        permission = getattr(dependency.call, "permission", None)
        if permission is not None:
            return str(permission)
        stack.extend(dependency.dependencies)
    return None


def document_permissions(router: APIRouter) -> None:
    """Each route that declared a permission documents it (`x-permission`) and its 403."""
    for route in router.routes:
        if isinstance(route, APIRoute) and (permission := permission_of(route)) is not None:
            route.responses.setdefault(403, errors(403)[403])
            route.openapi_extra = {**(route.openapi_extra or {}), "x-permission": permission}


AppState = Annotated[State, Depends(get_state)]
# Routes any signed-in caller may use on themselves (who am I, log out): no permission.
Authenticated = Annotated[Principal, Depends(current_principal)]
CurrentAgent = Annotated[AgentIdentity, Depends(current_agent)]
ReportingAgent = Annotated[AgentIdentity, Depends(reporting_agent)]
CredentialAgent = Annotated[AgentIdentity, Depends(credential_agent)]
