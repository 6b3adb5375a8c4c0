"""Logins, users and API tokens (`/api/v1/login`, `/me`, `/users`, `/tokens`):
security.identities behind HTTP."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from stavily.api import schemas
from stavily.api.deps import AppState, Authenticated, State, peer, permitted
from stavily.api.json import JSONResponse
from stavily.api.schemas import errors
from stavily.errors import Forbidden, RateLimited, Unauthorized
from stavily.security import Principal, identities, organizations, roles
from stavily.security.identities import MAX_PASSWORD, LoginPolicy

router = APIRouter(prefix="/api/v1")

Password = Annotated[str, Field(min_length=1, max_length=MAX_PASSWORD)]
RoleName = Annotated[str, Field(min_length=1, max_length=40)]


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    username: str = Field(min_length=1, max_length=100)
    password: Password
    organization: str | None = Field(
        default=None,
        max_length=200,
        description="The organization (name or id) to act in; unset: the user's only one, "
        "or `default` among several.",
    )


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    current_password: Password
    new_password: Password


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    username: str = Field(min_length=1, max_length=100)
    password: Password | None = Field(
        default=None,
        description="A new user's password; for an existing user (another organization's), "
        "their own, typed by them: they join by it.",
    )
    role: RoleName


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: RoleName | None = None
    password: Password | None = Field(default=None, description="A new password (a reset).")
    disabled: bool | None = None


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    role: RoleName
    expires_at: AwareDatetime | None = Field(
        default=None,
        strict=False,  # JSON has no time type: an ISO 8601 string, with its offset
        description="When it stops working, e.g. `2027-01-01T00:00:00Z` (unset: never).",
    )


def _policy(state: State) -> LoginPolicy:
    settings = state.settings
    return LoginPolicy(
        settings.session_idle_seconds,
        settings.session_max_seconds,
        settings.login_lockout_after,
        settings.login_lockout_seconds,
    )


def _forget(state: State) -> None:
    """A change to who may do what applies at once here; the other replicas hear of it
    from its transaction (store.notify.announce_credentials_changed)."""
    state.token_cache.clear()


# -- logins ---------------------------------------------------------------------------------


@router.post(
    "/login",
    tags=["users"],
    response_model=schemas.Session,
    responses=errors(401, 403, 413, 422, 429),
)
async def login(body: LoginRequest, request: Request, state: AppState) -> JSONResponse:
    """A session for a user: its token goes in `Authorization: Bearer` like an API
    token's. Wrong names and wrong passwords are refused alike; failed logins in a row
    lock the user out for a while (429 with `Retry-After`)."""
    source, name = peer(request), body.username.strip().lower()[:100]
    await state.rate_limits.hit("login", source)
    try:
        session = await identities.login(
            state.db, _policy(state), body.username, body.password, body.organization, source
        )
    except identities.UnknownUser as exc:  # a known user's failures are audited as theirs
        await state.denials.record(source, "login", exc, name)
        await state.rate_limits.failed(source)
        raise
    except Unauthorized:
        await state.rate_limits.failed(source)
        raise
    except RateLimited as exc:  # locked out: refused, and recorded
        await state.denials.record(source, "login", exc, name)
        raise
    return JSONResponse(session)


@router.post("/logout", status_code=204, tags=["users"], responses=errors(401, 422))
async def logout(principal: Authenticated, state: AppState) -> Response:
    """End this session (an API token is revoked through /tokens instead)."""
    await identities.logout(state.db, principal)
    _forget(state)
    return Response(status_code=204)


@router.get("/me", tags=["users"], response_model=schemas.Me, responses=errors(401, 422))
async def me(principal: Authenticated, state: AppState) -> JSONResponse:
    """Who this credential acts as, where, and what it may do."""
    async with state.db.read() as conn:
        organization = await organizations.organization_name(conn, principal.organization_id)
    user = None
    if principal.user_id is not None:
        user = {"id": principal.user_id, "username": principal.username}
    return JSONResponse(
        {
            "token_id": principal.token_id,
            "kind": principal.kind,
            "user": user,
            "organization": {"id": principal.organization_id, "name": organization},
            "role": principal.role,
            "permissions": sorted(principal.permissions),
            "expires_at": principal.expires_at,
        }
    )


@router.put(
    "/me/password", status_code=204, tags=["users"], responses=errors(401, 403, 413, 422, 429)
)
async def change_password(
    body: PasswordChange, principal: Authenticated, request: Request, state: AppState
) -> Response:
    """A user's own new password; their other sessions end. A wrong current password
    counts as a failed login (audited; the user is locked out after as many)."""
    source = peer(request)
    try:
        await identities.change_own_password(
            state.db, _policy(state), principal, body.current_password, body.new_password, source
        )
    except Forbidden:
        await state.rate_limits.failed(source)
        raise
    _forget(state)
    return Response(status_code=204)


# -- users ----------------------------------------------------------------------------------


@router.get("/users", tags=["users"], response_model=schemas.UserList, responses=errors(401, 422))
async def list_users(
    principal: Annotated[Principal, permitted("users:read")], state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse({"users": await identities.list_users(conn, principal.organization_id)})


@router.post(
    "/users",
    status_code=201,
    tags=["users"],
    response_model=schemas.User,
    responses=errors(401, 403, 409, 413, 422, 429),
)
async def add_user(
    body: UserCreate,
    principal: Annotated[Principal, permitted("users:write")],
    request: Request,
    state: AppState,
) -> JSONResponse:
    """A new user with a password, or an existing user (of another organization) made a
    member of this one by their own password, typed by them; with a role no more
    powerful than the caller's. A wrong password for an existing user counts as their
    failed login."""
    source = peer(request)
    try:
        user = await identities.add_user(
            state.db, _policy(state), principal, body.username, body.password, body.role, source
        )
    except Forbidden:
        await state.rate_limits.failed(source)
        raise
    return JSONResponse(user, status_code=201)


@router.get(
    "/users/{user_id}", tags=["users"], response_model=schemas.User, responses=errors(401, 404, 422)
)
async def get_user(
    user_id: str, principal: Annotated[Principal, permitted("users:read")], state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(await identities.get_user(conn, principal.organization_id, user_id))


@router.patch(
    "/users/{user_id}",
    tags=["users"],
    response_model=schemas.User,
    responses=errors(401, 404, 409, 413, 422),
)
async def update_user(
    user_id: str,
    body: UserUpdate,
    principal: Annotated[Principal, permitted("users:write")],
    state: AppState,
) -> JSONResponse:
    """Change a member's role here; reset the password of, disable or enable a user who
    belongs to this organization alone. A new password or a disable ends their sessions."""
    user = await identities.update_user(
        state.db,
        principal,
        user_id,
        role=body.role,
        password=body.password,
        disabled=body.disabled,
    )
    _forget(state)
    return JSONResponse(user)


@router.delete(
    "/users/{user_id}", status_code=204, tags=["users"], responses=errors(401, 404, 409, 422)
)
async def remove_user(
    user_id: str, principal: Annotated[Principal, permitted("users:write")], state: AppState
) -> Response:
    """The user leaves this organization; their sessions and tokens here are revoked."""
    await identities.remove_user(state.db, principal, user_id)
    _forget(state)
    return Response(status_code=204)


# -- tokens ---------------------------------------------------------------------------------


@router.post(
    "/tokens",
    status_code=201,
    tags=["tokens"],
    response_model=schemas.ApiTokenWithSecret,
    responses=errors(401, 413, 422),
)
async def create_token(
    body: TokenCreate,
    principal: Annotated[Principal, permitted("tokens:write")],
    state: AppState,
) -> JSONResponse:
    """A named API token with a role no more powerful than the caller's; its secret is in
    this answer only. A user's token does no more than its user may do at each request."""
    token = await identities.create_token(
        state.db, principal, body.name, body.role, body.expires_at
    )
    return JSONResponse(token, status_code=201)


@router.get(
    "/tokens", tags=["tokens"], response_model=schemas.ApiTokenList, responses=errors(401, 422)
)
async def list_tokens(
    principal: Annotated[Principal, permitted("tokens:read")],
    state: AppState,
    kind: Literal["api", "session"] | None = None,
    revoked: bool = Query(default=False, description="Include revoked and expired ones"),
) -> JSONResponse:
    async with state.db.read() as conn:
        tokens = await identities.list_tokens(conn, principal.organization_id, kind, revoked)
    return JSONResponse({"tokens": tokens})


@router.get(
    "/tokens/{token_id}",
    tags=["tokens"],
    response_model=schemas.ApiToken,
    responses=errors(401, 404, 422),
)
async def get_token(
    token_id: str, principal: Annotated[Principal, permitted("tokens:read")], state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(await identities.get_token(conn, principal.organization_id, token_id))


@router.delete(
    "/tokens/{token_id}", status_code=204, tags=["tokens"], responses=errors(401, 404, 422)
)
async def revoke_token(
    token_id: str, principal: Annotated[Principal, permitted("tokens:write")], state: AppState
) -> Response:
    """Revoke an API token or end a session: refused from now on, on every replica."""
    await identities.revoke_token(state.db, principal, token_id)
    _forget(state)
    return Response(status_code=204)


# -- roles ----------------------------------------------------------------------------------


class RoleDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    permissions: list[str] = Field(max_length=len(roles.PERMISSIONS))
    description: str | None = Field(default=None, max_length=500)


@router.get("/roles", tags=["roles"], response_model=schemas.RoleList, responses=errors(401, 422))
async def list_roles(
    principal: Annotated[Principal, permitted("roles:read")], state: AppState
) -> JSONResponse:
    """The built-in roles, this organization's own, and the catalog of permissions."""
    async with state.db.read() as conn:
        listed = await identities.list_roles(conn, principal.organization_id)
    return JSONResponse({"roles": listed, "permissions": roles.PERMISSIONS})


@router.put(
    "/roles/{name}",
    tags=["roles"],
    response_model=schemas.Role,
    responses={
        201: {"model": schemas.Role, "description": "A new role"},
        **errors(401, 409, 413, 422),
    },
)
async def put_role(
    name: str,
    body: RoleDefinition,
    principal: Annotated[Principal, permitted("roles:write")],
    state: AppState,
) -> JSONResponse:
    """Define (201) or redefine (200) a custom role from the catalog's permissions; no
    more than the caller may do. Its holders have the new set at once."""
    view, new = await identities.put_role(
        state.db, principal, name, body.permissions, body.description
    )
    _forget(state)
    return JSONResponse(view, status_code=201 if new else 200)


@router.delete(
    "/roles/{name}", status_code=204, tags=["roles"], responses=errors(401, 404, 409, 422)
)
async def delete_role(
    name: str, principal: Annotated[Principal, permitted("roles:write")], state: AppState
) -> Response:
    """Delete a custom role that no member or live token holds."""
    await identities.delete_role(state.db, principal, name)
    _forget(state)
    return Response(status_code=204)


# -- organizations --------------------------------------------------------------------------


class OrganizationBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=100)


@router.get(
    "/organizations",
    tags=["organizations"],
    response_model=schemas.OrganizationList,
    responses=errors(401),
)
async def list_organizations(
    principal: Annotated[Principal, permitted("organizations:read")], state: AppState
) -> JSONResponse:
    """The organizations the caller belongs to (a token: its own), with the role in each."""
    async with state.db.read() as conn:
        listed = await organizations.list_organizations(conn, principal)
    return JSONResponse({"organizations": listed})


@router.post(
    "/organizations",
    status_code=201,
    tags=["organizations"],
    response_model=schemas.NewOrganization,
    responses=errors(401, 409, 413, 422),
)
async def create_organization(
    body: OrganizationBody,
    principal: Annotated[Principal, permitted("organizations:write")],
    state: AppState,
) -> JSONResponse:
    """A new, empty organization: its resources are its own. The calling user is its
    admin; a token of no user gets an admin token for it, in this answer only."""
    made = await organizations.create_organization(state.db, principal, body.name)
    return JSONResponse(made, status_code=201)


@router.patch(
    "/organizations/{organization_id}",
    tags=["organizations"],
    response_model=schemas.Organization,
    responses=errors(401, 404, 409, 413, 422),
)
async def rename_organization(
    organization_id: str,
    body: OrganizationBody,
    principal: Annotated[Principal, permitted("organizations:write")],
    state: AppState,
) -> JSONResponse:
    """Rename the caller's organization."""
    renamed = await organizations.rename_organization(
        state.db, principal, organization_id, body.name
    )
    return JSONResponse(renamed)
