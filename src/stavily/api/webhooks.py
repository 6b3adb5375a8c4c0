"""Webhooks: managed under `/api/v1/webhooks`, served at `/hooks/{id}` (workflows.webhooks)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import Receive, Scope, Send

from stavily.api import schemas
from stavily.api.deps import AppState, State, permitted
from stavily.api.json import JSONResponse
from stavily.api.schemas import errors
from stavily.security import Principal
from stavily.workflows.definition import Duration, parse_duration

private = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])
public = APIRouter(tags=["webhooks"])

_FIELD = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    workflow: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=500)
    idempotency_field: str | None = Field(
        default=None,
        max_length=200,
        pattern=_FIELD,
        description="A dotted body field (e.g. `delivery.id`) whose value is the "
        "idempotency key, when the sender gives no delivery header.",
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        max_length=100,
        description="The run's inputs: values or templates over `trigger` "
        "(e.g. `{{ trigger.payload.ref }}`).",
    )
    tolerance_seconds: int | None = Field(
        default=None,
        ge=10,
        le=86400,
        description="How far an X-Stavily-Signature timestamp may be from now (default 300).",
    )


class WebhookRotate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keep_previous_for: Duration = Field(
        default="24h",
        description="How long the replaced secret is still accepted (`0s`: not at all; "
        "at most 30 days).",
    )

    @field_validator("keep_previous_for")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if parse_duration(value) > 30 * 86400:
            raise ValueError("at most 30 days")
        return value


def base_url(request: Request, state: State) -> str:
    """Where senders reach this server: STAVILY_PUBLIC_URL, else the URL this request
    came to."""
    return state.settings.public_url or str(request.base_url)


@private.post(
    "",
    status_code=201,
    response_model=schemas.WebhookWithSecret,
    responses=errors(401, 403, 404, 413, 422),
)
async def create_webhook(
    body: WebhookCreate,
    request: Request,
    principal: Annotated[Principal, permitted("workflows:write")],
    state: AppState,
) -> JSONResponse:
    """A webhook for a workflow. Its secret is in this answer only."""
    hook = await state.webhooks.create(
        principal.organization_id,
        body.workflow,
        principal.actor,
        base_url(request, state),
        body.description,
        body.idempotency_field,
        body.inputs,
        body.tolerance_seconds,
    )
    return JSONResponse(hook, status_code=201)


@private.get("", response_model=schemas.WebhookList, responses=errors(401, 422))
async def list_webhooks(
    request: Request,
    principal: Annotated[Principal, permitted("workflows:read")],
    state: AppState,
    workflow: str | None = Query(default=None, max_length=200),
) -> JSONResponse:
    items = await state.webhooks.list(principal.organization_id, base_url(request, state), workflow)
    return JSONResponse({"webhooks": items})


@private.get("/{hook_id}", response_model=schemas.Webhook, responses=errors(401, 404, 422))
async def get_webhook(
    hook_id: str,
    request: Request,
    principal: Annotated[Principal, permitted("workflows:read")],
    state: AppState,
) -> JSONResponse:
    return JSONResponse(
        await state.webhooks.get(principal.organization_id, hook_id, base_url(request, state))
    )


@private.post(
    "/{hook_id}/rotate",
    response_model=schemas.WebhookWithSecret,
    responses=errors(401, 403, 404, 413, 422),
)
async def rotate_webhook(
    hook_id: str,
    request: Request,
    principal: Annotated[Principal, permitted("workflows:write")],
    state: AppState,
    body: WebhookRotate | None = None,
) -> JSONResponse:
    """A new secret, in this answer only; the replaced one is accepted for
    `keep_previous_for` more (24 h unless said), so senders can move over."""
    keep = timedelta(seconds=parse_duration((body or WebhookRotate()).keep_previous_for))
    hook = await state.webhooks.rotate(
        principal.organization_id, hook_id, principal.actor, base_url(request, state), keep
    )
    return JSONResponse(hook)


@private.delete(
    "/{hook_id}", status_code=204, response_model=None, responses=errors(401, 403, 404, 422)
)
async def delete_webhook(
    hook_id: str, principal: Annotated[Principal, permitted("workflows:write")], state: AppState
) -> Response:
    """Requests to its URL are refused from now (404) on every replica within 2 s."""
    await state.webhooks.delete(principal.organization_id, hook_id, principal.actor)
    return Response(status_code=204)


@public.post(
    "/hooks/{hook_id}",
    status_code=202,
    response_model=schemas.HookAccepted,
    responses={
        200: {"model": schemas.HookAccepted, "description": "The same delivery again."},
        **errors(401, 404, 405, 413, 422),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "parameters": [
            {
                "name": name,
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": text,
            }
            for name, text in (
                ("X-Stavily-Signature", "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>'>"),
                ("X-Hub-Signature-256", "GitHub's: sha256=<hex HMAC-SHA256 of the body>"),
                ("X-GitHub-Delivery", "GitHub's delivery id: the idempotency key"),
                ("X-Stavily-Delivery", "A delivery id of the sender's: the idempotency key"),
                ("X-Stavily-Event", "The event's type (else X-GitHub-Event, else `webhook`)"),
            )
        ],
    },
)
async def receive_hook(hook_id: str, request: Request) -> None:
    """A signed request for the webhook's workflow: 202 with the event's id at once, the
    run begun just after. No API token: the signature is the credential. Answered at the
    edge (EdgeMiddleware hands `/hooks/` requests to `serve_hook` before any route), so
    this route is never reached: it documents the endpoint."""
    raise AssertionError("served by serve_hook")  # pragma: no cover


async def serve_hook(scope: Scope, receive: Receive, send: Send) -> None:
    state: State = scope["app"].state.stavily
    await state.intake(scope, receive, send)
