"""The private API (`/api/v1/...`) for operators, the CLI and the dashboard."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from stavily import audit
from stavily.api.deps import AppState, CurrentPrincipal
from stavily.api.json import JSONResponse
from stavily.errors import InvalidInput
from stavily.fleet import create_agent, get_agent, list_agents
from stavily.fleet.agents import agent_view
from stavily.workflows import service as workflows
from stavily.workflows.definition import parse_source, validate

router = APIRouter(prefix="/api/v1")

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class AgentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=_NAME)
    type: Literal["action", "sensor"] = "action"
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    capacity: int = Field(default=1, ge=1, le=1000)


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(default_factory=dict)


@router.post("/agents", status_code=201, tags=["agents"])
async def create_agent_route(
    body: AgentCreate, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    principal.require("agents:write")
    async with state.db.write() as conn:
        row, credential = await create_agent(
            conn,
            principal.organization_id,
            name=body.name,
            type=body.type,
            labels=body.labels,
            capacity=body.capacity,
            actor=principal.actor,
        )
    view = agent_view(row)
    return JSONResponse({"agent_id": row["id"], "api_key": credential, **view}, status_code=201)


@router.get("/agents", tags=["agents"])
async def list_agents_route(principal: CurrentPrincipal, state: AppState) -> JSONResponse:
    async with state.db.read() as conn:
        rows = await list_agents(conn, principal.organization_id)
    return JSONResponse(
        {"agents": [agent_view(r, state.heartbeats.pending(r["id"])) for r in rows]}
    )


@router.get("/agents/{agent_id}", tags=["agents"])
async def get_agent_route(
    agent_id: str, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        row = await get_agent(conn, principal.organization_id, agent_id)
    return JSONResponse(agent_view(row, state.heartbeats.pending(row["id"])))


@router.post(
    "/workflows",
    status_code=201,
    tags=["workflows"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A workflow definition in the Stavily YAML shape, as YAML or JSON.",
            "content": {
                "application/yaml": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}},
            },
        }
    },
)
async def apply_workflow(
    request: Request, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    principal.require("workflows:write")
    raw = await request.body()
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the workflow must be UTF-8 text") from None
    definition = validate(parse_source(source, request.headers.get("content-type")))
    async with state.db.write() as conn:
        workflow = await workflows.apply(
            conn, principal.organization_id, definition, source, principal.actor
        )
    return JSONResponse(workflow, status_code=201)


@router.get("/workflows", tags=["workflows"])
async def list_workflows(principal: CurrentPrincipal, state: AppState) -> JSONResponse:
    async with state.db.read() as conn:
        items = await workflows.list_all(conn, principal.organization_id)
    return JSONResponse({"workflows": items})


@router.get("/workflows/{name}", tags=["workflows"])
async def get_workflow(name: str, principal: CurrentPrincipal, state: AppState) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(await workflows.get(conn, principal.organization_id, name))


@router.post("/workflows/{name}/runs", status_code=201, tags=["executions"])
async def run_workflow(
    name: str, principal: CurrentPrincipal, state: AppState, body: RunRequest | None = None
) -> JSONResponse:
    principal.require("executions:run")
    execution_id = await state.engine.start(
        principal.organization_id,
        name,
        (body or RunRequest()).inputs,
        principal.actor,
        {"type": "manual", "actor": principal.actor},
    )
    async with state.db.read() as conn:
        execution = await state.engine.get_execution(conn, principal.organization_id, execution_id)
    return JSONResponse(execution, status_code=201)


@router.get("/executions", tags=["executions"])
async def list_executions(
    principal: CurrentPrincipal,
    state: AppState,
    workflow: str | None = None,
    status: Literal["running", "succeeded", "failed", "cancelled"] | None = None,
    limit: int = Query(default=50, ge=1, le=500),
) -> JSONResponse:
    async with state.db.read() as conn:
        items = await state.engine.list_executions(
            conn, principal.organization_id, workflow=workflow, status=status, limit=limit
        )
    return JSONResponse({"executions": items})


@router.get("/executions/{execution_id}", tags=["executions"])
async def get_execution(
    execution_id: str, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(
            await state.engine.get_execution(conn, principal.organization_id, execution_id)
        )


@router.get("/audit", tags=["audit"])
async def list_audit(
    principal: CurrentPrincipal,
    state: AppState,
    subject_id: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> JSONResponse:
    principal.require("audit:read")
    async with state.db.read() as conn:
        records = await audit.list_records(
            conn, principal.organization_id, subject_id=subject_id, limit=limit
        )
    return JSONResponse({"records": records})
