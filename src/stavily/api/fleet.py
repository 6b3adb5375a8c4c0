"""Fleet routes: enrollment and JWTs for agents (public), fleet administration (private).

Public: `POST /agents/v1/register` exchanges an enrollment token for an agent;
`POST /agents/v1/{agent_id}/token` trades the agent's API key for a short-lived JWT.
Private (`/api/v1`): enrollment tokens, drain/disable/enable/revoke/rotate, the summary.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from stavily.api import schemas
from stavily.api.deps import AppState, CurrentAgent, bearer, permitted
from stavily.api.json import JSONResponse
from stavily.api.schemas import errors
from stavily.errors import Forbidden
from stavily.fleet import admin, enrollment
from stavily.fleet.agents import holding
from stavily.security import Principal, agent_tokens

public = APIRouter(prefix="/agents/v1", tags=["agents"])
private = APIRouter(prefix="/api/v1", tags=["fleet"])

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
JWT_TTL_SECONDS = 3600


# -- the agent's side ------------------------------------------------------------------------


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enrollment_token: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=200, pattern=_NAME)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    hostname: str | None = Field(default=None, max_length=255, pattern=_PRINTABLE)
    version: str | None = Field(default=None, max_length=100, pattern=_PRINTABLE)
    os: str | None = Field(default=None, max_length=100, pattern=_PRINTABLE)


@public.post(
    "/register",
    status_code=201,
    response_model=schemas.AgentWithCredential,
    responses=errors(401, 409, 413, 422),
)
async def register(body: Registration, state: AppState) -> JSONResponse:
    """Exchange an enrollment token for a new agent: its id and API key (shown once).

    No bearer: the enrollment token is the credential. 401 for an unknown, revoked,
    expired or used-up token (nothing is created); 409 when the name is taken."""
    request = enrollment.Enrollment(
        token=body.enrollment_token.removeprefix("Bearer ").strip(),
        name=body.name,
        labels=body.labels,
        hostname=body.hostname,
        version=body.version,
        os=body.os,
    )
    async with state.db.write() as conn:
        row, credential = await enrollment.enroll(conn, request)
    view = admin.admin_view(row)
    return JSONResponse({"agent_id": row["id"], "api_key": credential, **view}, status_code=201)


@public.post(
    "/{agent_id}/token",
    response_model=schemas.AgentToken,
    responses=errors(401, 403, 422, 429),
)
async def agent_token(request: Request, agent: CurrentAgent, state: AppState) -> JSONResponse:
    """A JWT for this agent, valid for an hour on every agent route, until the agent's
    credential is replaced. Asked for with the API key (a JWT cannot renew itself)."""
    credential = bearer(request) or ""
    if agent_tokens.looks_like_jwt(credential):
        raise Forbidden("a token is issued for the agent's API key, not for another token")
    # JWTs carry whole seconds; right after a rotation the new credential counts from the
    # next whole second (fleet.admin.rotate_credential), so a token issued now would be
    # refused: wait for that second.
    wait = agent.credential_issued_at - time.time()
    if 0 < wait <= 2:
        await asyncio.sleep(wait)
    token = agent_tokens.issue(state.jwt_key, agent.id, agent.organization_id, JWT_TTL_SECONDS)
    return JSONResponse({"token": token, "token_type": "Bearer", "expires_in": JWT_TTL_SECONDS})


# -- enrollment tokens -----------------------------------------------------------------------


class EnrollmentTokenCreate(BaseModel):
    # strict: `true` is not a number of uses, nor is `"60"` a number of seconds
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, pattern=_PRINTABLE)
    agent_type: Literal["action", "sensor"] = "action"
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    capacity: int = Field(default=1, ge=1, le=1000)
    max_uses: int | None = Field(
        default=1, ge=1, le=1_000_000, description="How many agents may enroll; null: unlimited."
    )
    expires_in: int = Field(
        default=enrollment.DEFAULT_EXPIRES_IN,
        ge=1,
        le=enrollment.MAX_EXPIRES_IN,
        description="Seconds until the token expires (default 24 h, at most 30 days).",
    )


@private.post(
    "/enrollment-tokens",
    status_code=201,
    response_model=schemas.CreatedEnrollmentToken,
    responses=errors(401, 403, 413, 422),
)
async def create_enrollment_token(
    body: EnrollmentTokenCreate,
    principal: Annotated[Principal, permitted("agents:write")],
    state: AppState,
) -> JSONResponse:
    """Create an enrollment token; its secret (`token`, `stve_...`) is shown only here."""
    spec = enrollment.EnrollmentTokenSpec(**body.model_dump())
    async with state.db.write() as conn:
        view, secret = await enrollment.create_token(
            conn, principal.organization_id, spec, principal.actor
        )
    return JSONResponse({**view, "token": secret}, status_code=201)


@private.get(
    "/enrollment-tokens", response_model=schemas.EnrollmentTokenList, responses=errors(401)
)
async def list_enrollment_tokens(
    principal: Annotated[Principal, permitted("agents:read")], state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        tokens = await enrollment.list_tokens(conn, principal.organization_id)
    return JSONResponse({"enrollment_tokens": tokens})


@private.post(
    "/enrollment-tokens/{token_id}/revoke",
    response_model=schemas.EnrollmentToken,
    responses=errors(401, 403, 404, 422),
)
async def revoke_enrollment_token(
    token_id: str, principal: Annotated[Principal, permitted("agents:write")], state: AppState
) -> JSONResponse:
    """No agent can enroll with the token any more; agents it enrolled keep working."""
    async with state.db.write() as conn:
        view = await enrollment.revoke_token(
            conn, principal.organization_id, token_id, principal.actor
        )
    return JSONResponse(view)


# -- agents ----------------------------------------------------------------------------------

# what drain, disable, enable and revoke answer (409: the agent is revoked)
_ADMIN_ROUTE: dict[str, Any] = {
    "response_model": schemas.AdminAgentView,
    "responses": errors(401, 403, 404, 409, 422),
}


def _forget_credentials(state: Any) -> None:
    """Credentials checked before a change must not be trusted after it: on this replica
    now; on the others when they hear of it (PostgreSQL's LISTEN/NOTIFY), or at the
    latest within `credential_cache_seconds` if they miss it."""
    state.agent_cache.clear()
    if state.engine.channel is not None:
        state.engine.channel.publish_credentials_changed()


def _applied(state: Any, agent_id: str, row: Any, held: dict[str, int]) -> JSONResponse:
    _forget_credentials(state)
    view = admin.admin_view(row, state.heartbeats.pending(agent_id), held.get(agent_id, 0))
    return JSONResponse(view)


async def _set_state(
    agent_id: str, target: admin.AdminState, principal: Any, state: Any
) -> JSONResponse:
    async with state.db.write() as conn:
        row = await admin.set_admin_state(
            conn, principal.organization_id, agent_id, target, principal.actor
        )
        held = await holding(conn, principal.organization_id, agent_id)
    return _applied(state, agent_id, row, held)


@private.post("/agents/{agent_id}/drain", **_ADMIN_ROUTE)
async def drain_agent(
    agent_id: str, principal: Annotated[Principal, permitted("agents:write")], state: AppState
) -> JSONResponse:
    """The agent finishes and reports what it runs, and is given nothing new."""
    return await _set_state(agent_id, "draining", principal, state)


@private.post("/agents/{agent_id}/disable", **_ADMIN_ROUTE)
async def disable_agent(
    agent_id: str, principal: Annotated[Principal, permitted("agents:write")], state: AppState
) -> JSONResponse:
    """Every request of the agent gets 403 until it is enabled; its work goes elsewhere."""
    answer = await _set_state(agent_id, "disabled", principal, state)
    await state.engine.release_agent(agent_id, "agent disabled")
    return answer


@private.post("/agents/{agent_id}/enable", **_ADMIN_ROUTE)
async def enable_agent(
    agent_id: str, principal: Annotated[Principal, permitted("agents:write")], state: AppState
) -> JSONResponse:
    """Back to active after a drain or a disable (not after a revoke: 409)."""
    return await _set_state(agent_id, "active", principal, state)


@private.post("/agents/{agent_id}/revoke", **_ADMIN_ROUTE)
async def revoke_agent(
    agent_id: str, principal: Annotated[Principal, permitted("agents:write")], state: AppState
) -> JSONResponse:
    """For good: every request of the agent gets 403; it cannot be enabled again."""
    async with state.db.write() as conn:
        row = await admin.revoke(conn, principal.organization_id, agent_id, principal.actor)
    answer = _applied(state, agent_id, row, {})
    await state.engine.release_agent(agent_id, "agent revoked")
    return answer


@private.post(
    "/agents/{agent_id}/credentials",
    status_code=201,
    response_model=schemas.AgentWithCredential,
    responses=errors(401, 403, 404, 409, 422),
)
async def rotate_agent_credential(
    agent_id: str, principal: Annotated[Principal, permitted("agents:write")], state: AppState
) -> JSONResponse:
    """A new API key (shown once); the old key and the agent's JWTs are refused."""
    async with state.db.write() as conn:
        row, credential = await admin.rotate_credential(
            conn, principal.organization_id, agent_id, principal.actor
        )
        held = await holding(conn, principal.organization_id, agent_id)
    _forget_credentials(state)
    view = admin.admin_view(row, state.heartbeats.pending(agent_id), held.get(agent_id, 0))
    return JSONResponse({"agent_id": agent_id, "api_key": credential, **view}, status_code=201)


@private.get("/fleet", response_model=schemas.FleetSummary, responses=errors(401))
async def fleet(
    principal: Annotated[Principal, permitted("agents:read")], state: AppState
) -> JSONResponse:
    """Agents by state, type, label and version; capacity; instructions waiting."""
    pending = state.heartbeats.snapshot()  # before the rows: see v1.list_agents_route
    async with state.db.read() as conn:
        summary = await admin.fleet_summary(conn, principal.organization_id, pending)
    return JSONResponse(summary)
