"""The private API (`/api/v1/...`) for operators, the CLI and the dashboard."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from stavily import audit, offload
from stavily.api import schemas
from stavily.api.agents_v1 import EventBody, SensorTrigger, do_event
from stavily.api.deps import AppState, CredentialAgent, State, permitted
from stavily.api.json import JSONResponse
from stavily.api.schemas import errors
from stavily.audit.log import parse_since
from stavily.errors import Forbidden
from stavily.fleet import create_agent, get_agent, list_agents
from stavily.fleet.agents import agent_view, holding
from stavily.plugins.pins import pin_steps
from stavily.security import Principal
from stavily.timeutil import utcnow
from stavily.workflows import schedules
from stavily.workflows import service as workflows
from stavily.workflows.definition import (
    WorkflowDefinition,
    parse_source,
    plan,
    validate,
    workflow_schema,
)
from stavily.workflows.watches import idempotency_key

router = APIRouter(prefix="/api/v1")

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class AgentCreate(BaseModel):
    # strict: `true` is not a capacity, nor is `"2"` (a query parameter may say "2")
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, pattern=_NAME)
    type: Literal["action", "sensor"] = "action"
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    capacity: int = Field(default=1, ge=1, le=1000)


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: dict[str, Any] = Field(default_factory=dict)


@router.post(
    "/agents",
    status_code=201,
    tags=["agents"],
    response_model=schemas.CreatedAgent,
    responses=errors(401, 403, 409, 413, 422),
)
async def create_agent_route(
    body: AgentCreate, principal: Annotated[Principal, permitted("agents:write")], state: AppState
) -> JSONResponse:
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


@router.get("/agents", tags=["agents"], response_model=schemas.AgentList, responses=errors(401))
async def list_agents_route(
    principal: Annotated[Principal, permitted("agents:read")], state: AppState
) -> JSONResponse:
    # Heartbeats not yet written are newer than any row: take them before reading rows,
    # so a flush finishing during the read cannot leave us with neither.
    pending = state.heartbeats.snapshot()
    async with state.db.read() as conn:
        rows = await list_agents(conn, principal.organization_id)
        held = await holding(conn, principal.organization_id)
    views = [agent_view(r, pending.get(r["id"]), held.get(r["id"], 0)) for r in rows]
    return JSONResponse({"agents": views})


@router.get(
    "/agents/{agent_id}",
    tags=["agents"],
    response_model=schemas.AgentView,
    responses=errors(401, 404, 422),
)
async def get_agent_route(
    agent_id: str, principal: Annotated[Principal, permitted("agents:read")], state: AppState
) -> JSONResponse:
    pending = state.heartbeats.pending(agent_id)  # before the row: see list_agents_route
    async with state.db.read() as conn:
        row = await get_agent(conn, principal.organization_id, agent_id)
        held = await holding(conn, principal.organization_id, agent_id)
    return JSONResponse(agent_view(row, pending, held.get(agent_id, 0)))


@router.get(
    "/agents/{agent_id}/plugins",
    tags=["agents"],
    response_model=schemas.AgentPluginList,
    responses=errors(401, 404, 422),
)
async def agent_plugins_route(
    agent_id: str, principal: Annotated[Principal, permitted("agents:read")], state: AppState
) -> JSONResponse:
    """The registry versions the agent has, installs under way and installs that failed."""
    async with state.db.read() as conn:
        await get_agent(conn, principal.organization_id, agent_id)
    return JSONResponse({"plugins": await state.installs.of_agent(agent_id)})


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


async def _definition(request: Request, state: State) -> tuple[str, WorkflowDefinition]:
    """The body's workflow, parsed and validated on a worker thread: a big one takes a
    while, and the event loop serves everyone else meanwhile."""
    raw = await request.body()
    settings = state.settings
    policy = state.engine.secret_policy

    def check() -> WorkflowDefinition:
        data = parse_source(raw, request.headers.get("content-type"))
        return validate(data, settings.max_workflow_steps, policy)

    definition = await offload.run(check)  # refuses text that is not UTF-8 first
    return raw.decode("utf-8"), definition


@router.get("/schemas/workflow", tags=["workflows"], response_model=dict[str, Any])
async def workflow_schema_route() -> JSONResponse:
    """The JSON Schema of a workflow definition, for editors and CI checks: public (an
    editor fetching it sends no token), and the same for every organization."""
    return JSONResponse(workflow_schema())


@router.post(
    "/workflows/validate",
    tags=["workflows"],
    openapi_extra=_DEFINITION_BODY,
    response_model=schemas.Validation,
    responses=errors(401, 403, 413, 422),
)
async def validate_workflow(
    request: Request, principal: Annotated[Principal, permitted("workflows:write")], state: AppState
) -> JSONResponse:
    """Dry run: every problem (422), or what would run (200). Nothing is saved."""
    _, definition = await _definition(request, state)
    async with state.db.read() as conn:
        pins = await pin_steps(
            conn, principal.organization_id, definition, state.settings.unregistered_plugins
        )
    steps = await offload.run(plan, definition, pins)
    return JSONResponse(
        {
            "valid": True,
            "name": definition.name,
            "steps": [
                {"name": s["name"], "stage": s["stage"], "depends_on": s["depends_on"]}
                for s in steps
            ],
        }
    )


@router.post(
    "/workflows",
    status_code=201,
    tags=["workflows"],
    openapi_extra=_DEFINITION_BODY,
    response_model=schemas.AppliedWorkflow,
    response_description="A new version (`unchanged: false`).",
    responses={
        200: {
            "model": schemas.AppliedWorkflow,
            "description": "The definition is the latest version's: that version "
            "(`unchanged: true`), nothing written.",
        },
        **errors(401, 403, 413, 422),
    },
)
async def apply_workflow(
    request: Request, principal: Annotated[Principal, permitted("workflows:write")], state: AppState
) -> JSONResponse:
    """Create the workflow or a new version of it (201). A definition the same as the
    latest version's once parsed (spacing, comments, key order and defaults written out
    do not count) makes no version: 200 with that version and `unchanged: true`. A
    workflow that uses secrets needs `secrets:use` too: its steps are handed the values."""
    source, definition = await _definition(request, state)
    if definition.secrets and "secrets:use" not in principal.permissions:
        names = ", ".join(sorted(definition.secrets))
        raise Forbidden(f"this workflow uses secrets ({names}): applying it needs secrets:use")
    async with state.db.write() as conn:
        pins = await pin_steps(
            conn, principal.organization_id, definition, state.settings.unregistered_plugins
        )
        workflow = await workflows.apply(
            conn, principal.organization_id, definition, source, principal.actor, pins
        )
        if not workflow["unchanged"]:  # its `schedules:` as declared, in this transaction
            await schedules.sync(
                conn, principal.organization_id, definition, principal.actor, utcnow()
            )
    state.watches.forget(principal.organization_id)  # its trigger steps may have changed
    return JSONResponse(workflow, status_code=200 if workflow["unchanged"] else 201)


@router.get(
    "/workflows", tags=["workflows"], response_model=schemas.WorkflowList, responses=errors(401)
)
async def list_workflows(
    principal: Annotated[Principal, permitted("workflows:read")], state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        items = await workflows.list_all(conn, principal.organization_id)
    return JSONResponse({"workflows": items})


@router.get(
    "/workflows/{name}",
    tags=["workflows"],
    response_model=schemas.Workflow,
    responses=errors(401, 404, 422),
)
async def get_workflow(
    name: str, principal: Annotated[Principal, permitted("workflows:read")], state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(await workflows.get(conn, principal.organization_id, name))


@router.post(
    "/workflows/{name}/runs",
    status_code=201,
    tags=["executions"],
    response_model=schemas.Execution,
    responses=errors(401, 403, 404, 409, 413, 422),
)
async def run_workflow(
    name: str,
    principal: Annotated[Principal, permitted("executions:run")],
    state: AppState,
    body: RunRequest | None = None,
) -> JSONResponse:
    execution_id = await state.events.manual(
        principal.organization_id, name, (body or RunRequest()).inputs, principal.actor
    )
    async with state.db.read() as conn:
        execution = await state.engine.get_execution(conn, principal.organization_id, execution_id)
    return JSONResponse(execution, status_code=201)


@router.get(
    "/workflows/{name}/versions",
    tags=["workflows"],
    response_model=schemas.VersionList,
    responses=errors(401, 404, 422),
)
async def list_versions(
    name: str, principal: Annotated[Principal, permitted("workflows:read")], state: AppState
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(
            {"versions": await workflows.versions(conn, principal.organization_id, name)}
        )


@router.get(
    "/workflows/{name}/versions/{version}",
    tags=["workflows"],
    response_model=schemas.WorkflowVersion,
    responses=errors(401, 404, 422),
)
async def get_version(
    name: str,
    principal: Annotated[Principal, permitted("workflows:read")],
    state: AppState,
    version: int = Path(ge=1, le=2**31 - 1),  # the column is 32 bits; past it, 422 not 500
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(
            await workflows.get_version(conn, principal.organization_id, name, version)
        )


@router.get(
    "/executions",
    tags=["executions"],
    response_model=schemas.ExecutionList,
    responses=errors(401, 422),
)
async def list_executions(
    principal: Annotated[Principal, permitted("executions:read")],
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


@router.post(
    "/triggers",
    status_code=201,
    tags=["events"],
    response_model=schemas.AgentEventAnswer,
    responses={
        200: {"model": schemas.AgentEventAnswer, "description": "A repeated event: the first's."},
        **errors(401, 403, 413, 422, 429),
    },
)
async def sensor_trigger(
    body: SensorTrigger, agent: CredentialAgent, state: AppState
) -> JSONResponse:
    """A sensor agent's trigger event, in the documented Stavily shape, with the agent's
    own credential (the one route here an agent credential may call). Stored once per
    `payload.id` (scoped to the agent); it starts each workflow whose trigger step runs
    the plugin `payload.source` names and selects the agent. `tenant_id` is not read:
    the credential decides the organization."""
    state.heartbeats.touch(agent.id)  # a sign of life, as any request an agent makes
    if body.agent_id != agent.id:
        raise Forbidden("this credential does not belong to that agent")
    answer, new = await do_event(state, agent, body.trigger_type, body.payload)
    return JSONResponse({"success": True, **answer}, status_code=201 if new else 200)


@router.post(
    "/events",
    status_code=201,
    tags=["events"],
    response_model=schemas.Event,
    responses={
        200: {"model": schemas.Event, "description": "A repeated event: the first one."},
        **errors(401, 403, 413, 422),
    },
)
async def send_event(
    body: EventBody, principal: Annotated[Principal, permitted("executions:run")], state: AppState
) -> JSONResponse:
    """An event from the API (`stavily event send`): it starts every workflow an `on:`
    rule of which matches it, once per idempotency key (the one given, else the
    payload's `id`)."""
    key = idempotency_key(body.payload, body.idempotency_key)
    row, new = await state.events.receive(
        principal.organization_id, "api", body.type, body.payload, key, principal.actor
    )
    return JSONResponse(row, status_code=201 if new else 200)


@router.get(
    "/events", tags=["events"], response_model=schemas.EventList, responses=errors(401, 422)
)
async def list_events(
    principal: Annotated[Principal, permitted("executions:read")],
    state: AppState,
    source: Literal["agent", "api", "manual", "webhook", "schedule"] | None = None,
    type: str | None = Query(default=None, max_length=200),
    limit: int = Query(default=100, ge=1, le=1000),
) -> JSONResponse:
    """The newest events first: what came, from whom, and what it started or why not."""
    items = await state.events.list(principal.organization_id, source, type, limit)
    return JSONResponse({"events": items})


@router.get(
    "/events/{event_id}",
    tags=["events"],
    response_model=schemas.Event,
    responses=errors(401, 404, 422),
)
async def get_event(
    event_id: str, principal: Annotated[Principal, permitted("executions:read")], state: AppState
) -> JSONResponse:
    return JSONResponse(await state.events.get(principal.organization_id, event_id))


@router.get(
    "/executions/{execution_id}",
    tags=["executions"],
    response_model=schemas.Execution,
    responses=errors(401, 404, 422),
)
async def get_execution(
    execution_id: str,
    principal: Annotated[Principal, permitted("executions:read")],
    state: AppState,
) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(
            await state.engine.get_execution(conn, principal.organization_id, execution_id)
        )


@router.post(
    "/executions/{execution_id}/cancel",
    tags=["executions"],
    response_model=schemas.Execution,
    responses=errors(401, 403, 404, 409, 422),
)
async def cancel_execution(
    execution_id: str, principal: Annotated[Principal, permitted("executions:run")], state: AppState
) -> JSONResponse:
    """Cancel a running or queued execution; its agents' late reports get 409."""
    await state.engine.cancel(principal.organization_id, execution_id, principal.actor)
    return await _execution(state, principal, execution_id)


@router.post(
    "/executions/{execution_id}/rerun",
    tags=["executions"],
    response_model=schemas.Execution,
    responses=errors(401, 403, 404, 409, 422),
)
async def rerun_execution(
    execution_id: str, principal: Annotated[Principal, permitted("executions:run")], state: AppState
) -> JSONResponse:
    """Run a failed or cancelled execution again from its failed steps."""
    await state.engine.rerun(principal.organization_id, execution_id, principal.actor)
    return await _execution(state, principal, execution_id)


@router.get(
    "/executions/{execution_id}/logs",
    tags=["executions"],
    response_model=schemas.ExecutionLogs,
    responses=errors(401, 404, 422),
)
async def execution_logs(
    execution_id: str,
    principal: Annotated[Principal, permitted("executions:read")],
    state: AppState,
) -> JSONResponse:
    async with state.db.read() as conn:
        logs = await state.engine.logs(conn, principal.organization_id, execution_id)
    return JSONResponse({"logs": logs})


async def _execution(state: Any, principal: Any, execution_id: str) -> JSONResponse:
    async with state.db.read() as conn:
        return JSONResponse(
            await state.engine.get_execution(conn, principal.organization_id, execution_id)
        )


@router.get(
    "/audit",
    tags=["audit"],
    response_model=schemas.AuditList,
    responses=errors(401, 403, 422),
)
async def list_audit(
    principal: Annotated[Principal, permitted("audit:read")],
    state: AppState,
    subject_id: str | None = None,
    action: str | None = Query(
        default=None,
        max_length=100,
        description="This action (`workflow.applied`), or those under a prefix (`workflow.*`).",
    ),
    since: str | None = Query(
        default=None,
        max_length=64,
        description="Records from then on: a time ago (`90s`, `30m`, `1h`, `7d`, `2w`) or an "
        "ISO 8601 time (`2026-01-31T12:00:00Z`; without an offset, UTC).",
    ),
    limit: int = Query(default=100, ge=1, le=1000),
) -> JSONResponse:
    """The newest records first, filtered by subject, action and time."""
    since_at = parse_since(since) if since is not None else None
    async with state.db.read() as conn:
        records = await audit.list_records(
            conn,
            principal.organization_id,
            subject_id=subject_id,
            action=action,
            since=since_at,
            limit=limit,
        )
    return JSONResponse({"records": records})
