"""The secret store under `/api/v1/secrets` (security.store): write-only, no answer holds a
value."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from stavily.api import schemas
from stavily.api.deps import AppState, permitted
from stavily.api.json import JSONResponse
from stavily.api.schemas import errors
from stavily.security import Principal
from stavily.security.secrets import STORE_NAME
from stavily.security.store import MAX_VALUE_BYTES

router = APIRouter(prefix="/api/v1/secrets", tags=["secrets"])

Reader = Annotated[Principal, permitted("secrets:read")]
Writer = Annotated[Principal, permitted("secrets:write")]
NameArg = Annotated[str, Path(description=f"The secret's name: `{STORE_NAME}`")]


class SecretValue(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    value: str = Field(
        min_length=1,
        max_length=MAX_VALUE_BYTES,
        description=f"The value (at most {MAX_VALUE_BYTES} bytes in UTF-8); never shown again",
    )


@router.put(
    "/{name}",
    response_model=schemas.Secret,
    responses={
        201: {"model": schemas.Secret, "description": "Stored"},
        **errors(401, 403, 409, 413, 422, 429),
    },
)
async def put_secret(
    name: NameArg, body: SecretValue, principal: Writer, state: AppState
) -> JSONResponse:
    """Store a value under `name` (201), or replace its value (200)."""
    view, created = await state.secret_store.put(
        principal.organization_id, name, body.value, principal.actor
    )
    return JSONResponse(view, status_code=201 if created else 200)


@router.get("", response_model=schemas.SecretList, responses=errors(401, 403, 429))
async def list_secrets(principal: Reader, state: AppState) -> JSONResponse:
    """The organization's secrets: names and metadata."""
    return JSONResponse({"secrets": await state.secret_store.list(principal.organization_id)})


@router.post("/rotate", response_model=schemas.SecretKeyRotated, responses=errors(401, 403, 429))
async def rotate_secret_key(principal: Writer, state: AppState) -> JSONResponse:
    """A new data key for the organization: every secret is re-encrypted under it, and
    the old keys are deleted once unused. Workflows run on meanwhile."""
    return JSONResponse(await state.secret_store.rotate(principal.organization_id, principal.actor))


@router.get("/{name}", response_model=schemas.Secret, responses=errors(401, 403, 404, 422, 429))
async def get_secret(name: NameArg, principal: Reader, state: AppState) -> JSONResponse:
    """A secret's metadata; its value is never shown."""
    return JSONResponse(await state.secret_store.get(principal.organization_id, name))


@router.delete(
    "/{name}", status_code=204, response_model=None, responses=errors(401, 403, 404, 422, 429)
)
async def delete_secret(name: NameArg, principal: Writer, state: AppState) -> Response:
    """Steps queued from now on that use it fail; instructions already queued keep theirs."""
    await state.secret_store.delete(principal.organization_id, name, principal.actor)
    return Response(status_code=204)
