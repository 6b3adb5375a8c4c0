"""The plugin registry's routes: publishing and reading versions (`/api/v1/plugins`), and
what agents fetch to install one (`/agents/v1/{agent_id}/plugins/...`): the signed
manifest, and the artifact with ETag, If-None-Match and Range, streamed."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stavily.api import schemas
from stavily.api.deps import AppState, CurrentAgent, State, permitted
from stavily.api.errors import error_response
from stavily.api.json import JSONResponse
from stavily.api.schemas import errors
from stavily.errors import InvalidInput, PayloadTooLarge
from stavily.fleet import AgentIdentity
from stavily.plugins.manifest import PLUGIN_ID
from stavily.plugins.registry import version_view
from stavily.security import Principal

private = APIRouter(prefix="/api/v1/plugins", tags=["plugins"])
public = APIRouter(prefix="/agents/v1/{agent_id}/plugins", tags=["agents"])

_VERSION = r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
ARCHIVE_TYPES = (
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/octet-stream",
)
_BINARY = {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    source: str = Field(min_length=1, max_length=2000, description="A git URL or server path.")
    ref: str | None = Field(default=None, max_length=200, description="Branch, tag or commit.")
    sub_directory: str | None = Field(default=None, max_length=500)


class RolloutSelector(BaseModel):
    """Which agents: by labels (`env: prod`, or one of a list), or one agent by name."""

    model_config = ConfigDict(extra="forbid", strict=True)

    labels: dict[str, str | list[str]] = Field(default_factory=dict, max_length=64)
    single_agent: str | None = Field(default=None, max_length=200)


class StatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str | None = Field(default=None, max_length=2000)


_PUBLISH_BODY = {
    "requestBody": {
        "required": True,
        "description": "Where the plugin comes from, or the plugin's folder as a tar.gz.",
        "content": {
            "application/json": {"schema": PublishRequest.model_json_schema()},
            "application/gzip": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _spooled(request: Request, state: State) -> Path:
    """The request body in a temporary file, never all of it in memory; 413 past the
    artifact limit."""
    limit = state.settings.plugin_max_archive_bytes
    state.plugins.work.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar.gz", dir=state.plugins.work)
    size = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the archive is larger than {limit} bytes")
                await asyncio.to_thread(handle.write, chunk)
    except BaseException:
        os.unlink(name)
        raise
    if size == 0:
        os.unlink(name)
        raise InvalidInput(
            "no plugin archive", [{"path": "(body)", "message": "the body is empty"}]
        )
    return Path(name)


@private.post(
    "",
    status_code=201,
    response_model=schemas.PublishedVersion,
    openapi_extra=_PUBLISH_BODY,
    responses={
        200: {
            "model": schemas.PublishedVersion,
            "description": "The same content was published already: that version, "
            "`created: false`.",
        },
        **errors(401, 403, 409, 413, 415, 422),
    },
)
async def publish(
    request: Request, principal: Annotated[Principal, permitted("plugins:write")], state: AppState
) -> JSONResponse:
    """Publish a version from git (`{"source", "ref"}`) or an uploaded archive: 201 with
    the new version, 200 when that version exists with the same content, 409 when it
    exists with other content."""
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if kind == "application/json":
        raw = await request.body()
        try:
            body = PublishRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidInput(
                "invalid publish request",
                [
                    {"path": ".".join(map(str, e["loc"])) or "(root)", "message": e["msg"]}
                    for e in exc.errors(include_url=False)
                ],
            ) from None
        view, created = await state.plugins.publish_source(
            principal.organization_id, principal.actor, body.source, body.ref, body.sub_directory
        )
    elif kind in ARCHIVE_TYPES:
        archive = await _spooled(request, state)
        try:
            view, created = await state.plugins.publish_archive(
                principal.organization_id, principal.actor, archive
            )
        finally:
            await asyncio.to_thread(archive.unlink, missing_ok=True)
    else:
        return error_response(
            415,
            "unsupported_media_type",
            'send application/json ({"source", "ref"}) or a plugin archive as application/gzip',
        )
    return JSONResponse({**view, "created": created}, status_code=201 if created else 200)


@private.get("", response_model=schemas.PluginList, responses=errors(401))
async def list_plugins(
    principal: Annotated[Principal, permitted("plugins:read")], state: AppState
) -> JSONResponse:
    return JSONResponse({"plugins": await state.plugins.list(principal.organization_id)})


@private.get("/keys", response_model=schemas.SigningKeyList, responses=errors(401))
async def plugin_keys(
    principal: Annotated[Principal, permitted("plugins:read")], state: AppState
) -> JSONResponse:
    """The public keys versions are signed with: the newest signs, older ones verify."""
    keys = await state.plugins.public_keys(fresh=True)
    return JSONResponse({"keys": [k.view() for k in keys]})


@private.get("/{plugin_id}", response_model=schemas.Plugin, responses=errors(401, 404, 422))
async def get_plugin(
    plugin_id: str, principal: Annotated[Principal, permitted("plugins:read")], state: AppState
) -> JSONResponse:
    return JSONResponse(await state.plugins.get(principal.organization_id, plugin_id))


@private.get(
    "/{plugin_id}/versions/{version}",
    response_model=schemas.PluginVersion,
    responses=errors(401, 404, 422),
)
async def get_version(
    plugin_id: str,
    version: str,
    principal: Annotated[Principal, permitted("plugins:read")],
    state: AppState,
) -> JSONResponse:
    row = await state.plugins.version(principal.organization_id, plugin_id, version)
    return JSONResponse(version_view(row))


def _status_route(action: Literal["deprecate", "yank", "restore"], status: str) -> None:
    @private.post(
        f"/{{plugin_id}}/versions/{{version}}/{action}",
        name=f"{action}_version",
        response_model=schemas.PluginVersion,
        responses=errors(401, 403, 404, 413, 422),
        summary=f"{action.capitalize()} a version",
    )
    async def change(
        plugin_id: str,
        version: str,
        principal: Annotated[Principal, permitted("plugins:write")],
        state: AppState,
        body: StatusChange | None = None,
    ) -> JSONResponse:
        view = await state.plugins.set_status(
            principal.organization_id,
            plugin_id,
            version,
            status,
            body.reason if body else None,
            principal.actor,
        )
        return JSONResponse(view)


_status_route("deprecate", "deprecated")
_status_route("yank", "yanked")
_status_route("restore", "active")


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: str = Field(pattern=_VERSION, max_length=100)
    selector: RolloutSelector = Field(default_factory=lambda: RolloutSelector())


@private.post(
    "/{plugin_id}/rollouts",
    status_code=201,
    response_model=schemas.Rollout,
    responses=errors(401, 403, 404, 409, 413, 422),
)
async def start_rollout(
    plugin_id: str,
    body: RolloutRequest,
    principal: Annotated[Principal, permitted("plugins:write")],
    state: AppState,
) -> JSONResponse:
    """Install a version on the agents the selector picks (all active agents without
    one); each takes its install when it next polls. 201 with the rollout's progress."""
    selector = body.selector.model_dump(exclude_none=True)
    view = await state.installs.rollout(
        principal.organization_id, principal.actor, plugin_id, body.version, selector
    )
    return JSONResponse(view, status_code=201)


@private.get(
    "/{plugin_id}/rollouts/{rollout_id}",
    response_model=schemas.Rollout,
    responses=errors(401, 404, 422),
)
async def get_rollout(
    plugin_id: str,
    rollout_id: str,
    principal: Annotated[Principal, permitted("plugins:read")],
    state: AppState,
) -> JSONResponse:
    return JSONResponse(
        await state.installs.rollout_view(principal.organization_id, plugin_id, rollout_id)
    )


# -- what agents fetch ---------------------------------------------------------------------


async def fetching_agent(request: Request, agent: CurrentAgent) -> AgentIdentity:
    """The agent fetching (its request is a sign of life, as any an agent makes)."""
    request.app.state.stavily.heartbeats.touch(agent.id)
    return agent


FetchingAgent = Annotated[AgentIdentity, Depends(fetching_agent)]


@public.get("/keys", response_model=schemas.SigningKeyList, responses=errors(401, 403, 422, 429))
async def agent_plugin_keys(agent: FetchingAgent, request: Request) -> JSONResponse:
    state: State = request.app.state.stavily
    return JSONResponse({"keys": [k.view() for k in await state.plugins.public_keys()]})


async def _agent_version(request: Request, agent: Any, plugin_id: str, version: str) -> Any:
    if not re.match(PLUGIN_ID, plugin_id) or not re.match(_VERSION, version):
        raise InvalidInput(
            "invalid plugin reference",
            [{"path": "(path)", "message": f"'{plugin_id}' {version} is not a plugin version"}],
        )
    state: State = request.app.state.stavily
    return await state.plugins.version(agent.organization_id, plugin_id, version)


@public.get(
    "/{plugin_id}/{version}",
    response_model=schemas.AgentPluginManifest,
    responses=errors(401, 403, 404, 422, 429),
)
async def agent_manifest(
    plugin_id: str, version: str, agent: FetchingAgent, request: Request
) -> JSONResponse:
    """The signed manifest: what the agent checks the artifact against, and how to run it."""
    row = await _agent_version(request, agent, plugin_id, version)
    return JSONResponse(
        {
            "manifest": row.signed,
            "signature": row.signature,
            "key_id": row.key_id,
            "algorithm": "ed25519",
            "protocol": row.protocol,
            "plugin": row.manifest,
            "status": row.status,
        }
    )


@public.get(
    "/{plugin_id}/{version}/artifact",
    response_class=Response,
    responses={
        200: {"description": "The artifact.", "content": _BINARY},
        206: {"description": "The range asked for (`Range: bytes=a-b`).", "content": _BINARY},
        304: {"description": "`If-None-Match` names this artifact's ETag: the copy is good."},
        **errors(401, 403, 404, 416, 422, 429),
    },
)
async def agent_artifact(
    plugin_id: str, version: str, agent: FetchingAgent, request: Request
) -> Response:
    """The artifact (tar.gz), streamed; `ETag` is its sha256 in quotes."""
    row = await _agent_version(request, agent, plugin_id, version)
    state: State = request.app.state.stavily
    etag = f'"{row.sha256}"'
    size = int(row.size)
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0"}
    match = request.headers.get("if-none-match")
    if match and (match.strip() == "*" or etag in [m.strip() for m in match.split(",")]):
        return Response(status_code=304, headers=headers)
    start, end, status = 0, size, 200
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted and (if_range is None or if_range.strip() == etag):
        parsed = _RANGE.match(wanted.strip())
        if parsed is None or parsed.groups() == ("", ""):
            return _unsatisfiable(size, headers)
        first, last = parsed.groups()
        if first == "":  # the last N bytes
            start, end = max(0, size - int(last)), size
        else:
            start = int(first)
            end = min(size, int(last) + 1) if last else size
        if start >= size or start >= end:
            return _unsatisfiable(size, headers)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in state.plugins.blobs.read(row.sha256, start, end):
            yield chunk

    return StreamingResponse(
        body(), status_code=status, media_type="application/gzip", headers=headers
    )


def _unsatisfiable(size: int, headers: dict[str, str]) -> Response:
    return error_response(
        416,
        "range_not_satisfiable",
        f"the artifact has {size} bytes",
        headers={**headers, "Content-Range": f"bytes */{size}"},
    )
