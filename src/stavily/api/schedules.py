"""Schedules (`/api/v1/schedules`): list and read them, make them, pause and resume
them, delete those the API made. Declared ones (a workflow's `schedules:`) change with
their workflow."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import Field

from stavily.api import schemas
from stavily.api.deps import AppState, permitted
from stavily.api.json import JSONResponse
from stavily.api.schemas import errors
from stavily.security import Principal
from stavily.timeutil import utcnow
from stavily.workflows import schedules, service
from stavily.workflows.definition import Schedule, parse_duration

router = APIRouter(prefix="/api/v1", tags=["schedules"])


class ScheduleCreate(Schedule):
    """A schedule of the API's: exactly one of `cron` (with its `timezone`) and `every`."""

    workflow: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.()-]*$")


@router.get("/schedules", response_model=schemas.ScheduleList, responses=errors(401, 422))
async def list_schedules(
    principal: Annotated[Principal, permitted("workflows:read")],
    state: AppState,
    workflow: str | None = Query(default=None, max_length=200),
) -> JSONResponse:
    """Every schedule of the organization (or of one workflow), declared and the API's."""
    async with state.db.read() as conn:
        items = await schedules.list_all(conn, principal.organization_id, workflow)
    return JSONResponse({"schedules": items})


@router.get(
    "/schedules/{schedule_id}", response_model=schemas.Schedule, responses=errors(401, 404, 422)
)
async def get_schedule(
    schedule_id: str, principal: Annotated[Principal, permitted("workflows:read")], state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(await schedules.get(conn, principal.organization_id, schedule_id))


@router.post(
    "/schedules",
    status_code=201,
    response_model=schemas.Schedule,
    responses=errors(401, 403, 404, 413, 422),
)
async def create_schedule(
    body: ScheduleCreate,
    principal: Annotated[Principal, permitted("workflows:write")],
    state: AppState,
) -> JSONResponse:
    """A schedule of an existing workflow (404 if none), its inputs checked against the
    workflow's latest version (422)."""
    async with state.db.write() as conn:
        workflow = await service.get(conn, principal.organization_id, body.workflow)
        definition = await state.engine.definition(workflow)
        schedules.check_inputs(definition, body.inputs, "")
        spec = {
            "name": body.name,
            "cron": body.cron,
            "timezone": body.timezone,
            "every_seconds": int(parse_duration(body.every)) if body.every is not None else None,
            "inputs": body.inputs,
            "misfire": body.misfire,
        }
        created = await schedules.create(
            conn, principal.organization_id, body.workflow, spec, principal.actor, utcnow()
        )
    return JSONResponse(created, status_code=201)


@router.post(
    "/schedules/{schedule_id}/pause",
    response_model=schemas.Schedule,
    responses=errors(401, 403, 404, 422),
)
async def pause_schedule(
    schedule_id: str, principal: Annotated[Principal, permitted("workflows:write")], state: AppState
) -> JSONResponse:
    """It fires no more until resumed (a paused one stays paused across applies)."""
    async with state.db.write() as conn:
        row = await schedules.set_paused(
            conn, principal.organization_id, schedule_id, True, principal.actor, utcnow()
        )
    return JSONResponse(row)


@router.post(
    "/schedules/{schedule_id}/resume",
    response_model=schemas.Schedule,
    responses=errors(401, 403, 404, 422),
)
async def resume_schedule(
    schedule_id: str, principal: Annotated[Principal, permitted("workflows:write")], state: AppState
) -> JSONResponse:
    """It fires again from its next time after now: the times it was paused through are
    not made up."""
    async with state.db.write() as conn:
        row = await schedules.set_paused(
            conn, principal.organization_id, schedule_id, False, principal.actor, utcnow()
        )
    return JSONResponse(row)


@router.delete(
    "/schedules/{schedule_id}",
    status_code=204,
    response_model=None,
    responses=errors(401, 403, 404, 409, 422),
)
async def delete_schedule(
    schedule_id: str, principal: Annotated[Principal, permitted("workflows:write")], state: AppState
) -> Response:
    """Delete a schedule the API made. A declared one is 409: remove it from the
    workflow's `schedules:` and apply it again (or pause it)."""
    async with state.db.write() as conn:
        await schedules.delete(
            conn, principal.organization_id, schedule_id, principal.actor, utcnow()
        )
    return Response(status_code=204)
