"""The private API (`/api/v1/...`) for operators, the CLI and the dashboard."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from stavily import audit
from stavily.api.deps import AppState, CurrentPrincipal
from stavily.api.json import JSONResponse
from stavily.fleet import create_agent, get_agent, list_agents
from stavily.fleet.agents import agent_view
from stavily.workflows import service as workflows
from stavily.workflows.definition import (
    WorkflowDefinition,
    parse_source,
    plan,
    validate,
    workflow_schema,
)

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
    # Heartbeats not yet written are newer than any row: take them before reading rows,
    # so a flush finishing during the read cannot leave us with neither.
    pending = state.heartbeats.snapshot()
    async with state.db.read() as conn:
        rows = await list_agents(conn, principal.organization_id)
    return JSONResponse({"agents": [agent_view(r, pending.get(r["id"])) for r in rows]})


@router.get("/agents/{agent_id}", tags=["agents"])
async def get_agent_route(
    agent_id: str, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    pending = state.heartbeats.pending(agent_id)  # before the row: see list_agents_route
    async with state.db.read() as conn:
        row = await get_agent(conn, principal.organization_id, agent_id)
    return JSONResponse(agent_view(row, pending))


_DEFINITION_BODY = {
    "requestBody": {
        "required": True,
        "description": "A workflow definition in the Stavily YAML shape, as YAML or JSON.",
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


async def _definition(request: Request) -> tuple[str, WorkflowDefinition]:
    raw = await request.body()
    data = parse_source(raw, request.headers.get("content-type"))
    return raw.decode("utf-8"), validate(data)


@router.get("/schemas/workflow", tags=["workflows"])
async def workflow_schema_route() -> JSONResponse:
    """The JSON Schema of a workflow definition, for editors and CI checks."""
    return JSONResponse(workflow_schema())


@router.post("/workflows/validate", tags=["workflows"], openapi_extra=_DEFINITION_BODY)
async def validate_workflow(request: Request, principal: CurrentPrincipal) -> JSONResponse:
    """Dry run: every problem (422), or what would run (200). Nothing is saved."""
    _, definition = await _definition(request)
    return JSONResponse(
        {
            "valid": True,
            "name": definition.name,
            "steps": [
                {"name": s["name"], "stage": s["stage"], "depends_on": s["depends_on"]}
                for s in plan(definition)
            ],
        }
    )


@router.post("/workflows", status_code=201, tags=["workflows"], openapi_extra=_DEFINITION_BODY)
async def apply_workflow(
    request: Request, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    principal.require("workflows:write")
    source, definition = await _definition(request)
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


@router.get("/workflows/{name}/versions", tags=["workflows"])
async def list_versions(name: str, principal: CurrentPrincipal, state: AppState) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(
            {"versions": await workflows.versions(conn, principal.organization_id, name)}
        )


@router.get("/workflows/{name}/versions/{version}", tags=["workflows"])
async def get_version(
    name: str, version: int, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(
            await workflows.get_version(conn, principal.organization_id, name, version)
        )


@router.get("/executions", tags=["executions"])
async def list_executions(
    principal: CurrentPrincipal,
    state: AppState,
    workflow: str | None = None,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
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


@router.post("/executions/{execution_id}/cancel", tags=["executions"])
async def cancel_execution(
    execution_id: str, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    """Cancel a running or queued execution; its agents' late reports get 409."""
    principal.require("executions:run")
    await state.engine.cancel(principal.organization_id, execution_id, principal.actor)
    return await _execution(state, principal, execution_id)


@router.post("/executions/{execution_id}/rerun", tags=["executions"])
async def rerun_execution(
    execution_id: str, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    """Run a failed or cancelled execution again from its failed steps."""
    principal.require("executions:run")
    await state.engine.rerun(principal.organization_id, execution_id, principal.actor)
    return await _execution(state, principal, execution_id)


@router.get("/executions/{execution_id}/logs", tags=["executions"])
async def execution_logs(
    execution_id: str, principal: CurrentPrincipal, state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        logs = await state.engine.logs(conn, principal.organization_id, execution_id)
    return JSONResponse({"logs": logs})


async def _execution(state: Any, principal: Any, execution_id: str) -> JSONResponse:
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
