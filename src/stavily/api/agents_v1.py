"""The public agent API (`/agents/v1/...`), byte-compatible with AGENT_API.md."""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from starlette.types import Receive, Scope, Send

from stavily.api import schemas
from stavily.api.deps import (
    CurrentAgent,
    ReportingAgent,
    State,
    agent_for,
    bearer_of,
    peer,
    state_of,
)
from stavily.api.errors import error_body
from stavily.api.json import JSONResponse, send_json
from stavily.api.ratelimits import rate_limited
from stavily.api.schemas import errors
from stavily.errors import InvalidInput, StavilyError
from stavily.fleet.agents import AgentIdentity
from stavily.fleet.waiters import Waiter
from stavily.plugins.installs import is_install
from stavily.plugins.manifest import PLUGIN_ID
from stavily.workflows.watches import idempotency_key

router = APIRouter(prefix="/agents/v1", tags=["agents"])
ModelT = TypeVar("ModelT", bound=BaseModel)

_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
# The request models are strict (`true` is not a number, `"2"` not an integer), and they
# are validated in Python mode both by FastAPI and by _model() below, so both agree.
STRICT = ConfigDict(extra="allow", strict=True)
HEARTBEAT_STATUSES = {"online", "offline", "idle", "busy", "running", "healthy"}


class ProgressUpdate(BaseModel):
    model_config = STRICT

    status: str | None = Field(default=None, max_length=50)
    execution_log: list[str] | None = Field(default=None, max_length=100_000)
    max_retries: StrictInt | None = Field(default=None, ge=0, le=1000)


class ResultReport(BaseModel):
    model_config = STRICT

    status: str = Field(max_length=50)
    result: Any = None
    error_message: str | None = Field(default=None, max_length=100_000)
    error_details: dict[str, Any] | None = None
    execution_log: list[str] | None = Field(default=None, max_length=100_000)


class SystemFigures(BaseModel):
    """What a richer heartbeat says about the agent's machine; absurd figures are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cpu_percent: float | None = Field(default=None, ge=0, le=100)
    memory_percent: float | None = Field(default=None, ge=0, le=100)
    disk_percent: float | None = Field(default=None, ge=0, le=100)
    load: list[float] | float | None = None
    memory_total_bytes: int | None = Field(default=None, ge=0, le=2**60)
    cpu_count: int | None = Field(default=None, ge=1, le=100_000)

    @field_validator("load")
    @classmethod
    def _load(cls, value: list[float] | float | None) -> list[float] | float | None:
        values = value if isinstance(value, list) else [value] if value is not None else []
        if len(values) > 3 or any(not 0 <= v <= 100_000 for v in values):
            raise ValueError("load is up to three averages between 0 and 100000")
        return value


class InstalledPlugin(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(max_length=200, pattern=PLUGIN_ID)
    version: str = Field(max_length=100, pattern=_PRINTABLE)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Heartbeat(BaseModel):
    model_config = STRICT

    # not strict: in Python mode a strict datetime is only a datetime object, never the
    # agents' "2026-11-24T10:00:00Z"
    timestamp: datetime | None = Field(default=None, strict=False)
    status: str = Field(default="online", max_length=50)
    version: str | None = Field(default=None, max_length=100, pattern=_PRINTABLE)
    hostname: str | None = Field(default=None, max_length=255, pattern=_PRINTABLE)
    # our extensions
    os: str | None = Field(default=None, max_length=100, pattern=_PRINTABLE)
    labels: dict[str, str] | None = Field(default=None, max_length=64)
    capacity: StrictInt | None = Field(default=None, ge=1, le=1000)
    running: list[str] | None = Field(
        default=None, max_length=1000, description="Ids of the instructions the agent runs."
    )
    heartbeat_interval: float | None = Field(
        default=None, ge=1, le=3600, description="Seconds until the agent's next heartbeat."
    )
    system: SystemFigures | None = None
    plugins: list[InstalledPlugin] | None = Field(
        default=None, max_length=1000, description="The registry versions the agent has."
    )

    @field_validator("timestamp")
    @classmethod
    def _plausible(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        now = datetime.now(UTC)
        if not now - timedelta(days=1) <= value <= now + timedelta(minutes=10):
            raise ValueError("timestamp is too far from the server's clock")
        return value


def _poll_answer(
    claimed: list[dict[str, Any]], settings_interval: int, slots: int | None
) -> dict[str, Any]:
    if not claimed:
        body: dict[str, Any] = {
            "instruction": None,
            "status": "no_pending_instructions",
            "next_poll_interval": settings_interval,
        }
    else:
        body = {
            "status": "instruction_available",
            "next_poll_interval": settings_interval,
            "instruction": claimed[0],
        }
    if slots is not None:
        body["instructions"] = claimed
    return body


# -- what each call does, whichever way the request came in (see serve_fast) -----------------


async def do_poll(
    state: State,
    agent: AgentIdentity,
    wait: float,
    slots: int | None,
    official: bool,
    receive: Receive,
) -> dict[str, Any]:
    # A valid request is a sign of life. An official agent polls only when it runs
    # nothing: anything still leased to it was lost on the way (its poll answer, or its
    # never-retried result) and goes back (see HeartbeatBuffer).
    state.heartbeats.touch(agent.id, running=[] if official else None)
    state.installs.polled(agent.id, official)
    if official:
        await state.engine.release_unreported(state.heartbeats.overdue(agent.id))
    wait = min(wait, state.settings.max_poll_wait)
    waiter = Waiter(agent)
    watcher = asyncio.create_task(_watch_disconnect(receive, waiter)) if wait else None

    def wanted() -> bool:
        pending = state.heartbeats.pending(agent.id)
        return not waiter.hung_up and (pending is None or pending.get("status") != "offline")

    try:
        claimed = await state.engine.poll(agent, slots or 1, wait, wanted, waiter, official)
    finally:
        if watcher is not None:
            watcher.cancel()
    if official and not claimed and wanted():
        # idle, and maybe only because the steps waiting need a plugin it lacks
        install = await state.installs.next_for(agent)
        claimed = [install] if install else []
    if official and claimed:
        state.heartbeats.handed(agent.id, [c["id"] for c in claimed])
    return _poll_answer(claimed, state.settings.poll_interval, slots)


async def _watch_disconnect(receive: Receive, waiter: Waiter) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    waiter.hung_up = True
    waiter.wake()  # so the poll sees the hang-up now


async def do_progress(
    state: State, agent: AgentIdentity, instruction_id: str, update: ProgressUpdate
) -> dict[str, Any]:
    state.heartbeats.touch(agent.id)
    fields = update.model_dump(
        include={"status", "execution_log", "max_retries"}, exclude_unset=True
    )
    fields = {k: v for k, v in fields.items() if v is not None}
    if is_install(instruction_id):
        updated = await state.installs.progress(agent, instruction_id, fields)
        return {"success": True, "instruction_id": instruction_id, "updated_fields": updated}
    updated = await state.engine.progress(agent, instruction_id, fields)
    return {"success": True, "instruction_id": instruction_id, "updated_fields": updated}


async def do_result(
    state: State,
    agent: AgentIdentity,
    instruction_id: str,
    report: ResultReport,
    body: bytes,
    next: bool,
) -> dict[str, Any]:
    state.heartbeats.touch(agent.id)
    state.heartbeats.reported(agent.id, instruction_id)
    digest = hashlib.sha256(body).hexdigest()
    fields = report.model_dump(exclude_unset=True)
    if is_install(instruction_id):
        await state.installs.result(agent, instruction_id, fields, digest)
        claimed = await state.engine.claim(agent, 1) if next else []
    else:
        claimed = await state.engine.result(agent, instruction_id, fields, digest, int(next))
    return {"acknowledged": True, "next_instruction": claimed[0] if claimed else None}


_AGENT_PRODUCT = re.compile(r"^Stavily-Agent/([^\s/;()]{1,100})")


def agent_version(user_agent: str | None) -> str | None:
    """The version in `User-Agent: Stavily-Agent/1.0.0`: the official agents send it on
    every request, and no version in their heartbeats."""
    match = _AGENT_PRODUCT.match(user_agent or "")
    return match.group(1) if match else None


async def do_heartbeat(
    state: State, agent: AgentIdentity, beat: Heartbeat, user_agent: str | None = None
) -> dict[str, Any]:
    if beat.status not in HEARTBEAT_STATUSES:
        raise InvalidInput(
            f"'{beat.status}' is not a heartbeat status",
            [{"path": "status", "message": f"expected one of {sorted(HEARTBEAT_STATUSES)}"}],
        )
    if not state.heartbeat_limit.hit(agent.id):
        raise rate_limited("too many heartbeats from this agent", state.heartbeat_limit.item, 1)
    state.heartbeats.record(
        agent.id,
        "offline" if beat.status == "offline" else "online",
        version=beat.version or agent_version(user_agent),
        hostname=beat.hostname,
        os=beat.os,
        interval=beat.heartbeat_interval,
        running=beat.running,
        facts={
            **(beat.system.model_dump(exclude_none=True) if beat.system else {}),
            **({"labels": beat.labels} if beat.labels is not None else {}),
            **({"capacity": beat.capacity} if beat.capacity is not None else {}),
            **({"running": beat.running} if beat.running is not None else {}),
        },
    )
    if beat.plugins is not None:
        await state.installs.reported(agent, [p.model_dump() for p in beat.plugins])
    if beat.status == "offline":
        await state.engine.release_unstarted(agent)
    answer: dict[str, Any] = {
        "acknowledged": True,
        "next_heartbeat_interval": round(state.heartbeats.interval_for(agent.id)),
    }
    if agent.admin_state == "draining":
        answer["commands"] = ["drain"]  # our agent stops polling; old agents ignore it
    if agent.type == "sensor" and beat.status != "offline":
        answer["watch"] = await state.watches.for_agent(agent)
    return answer


class EventBody(BaseModel):
    """An event: its type, its payload, and what makes a repeat of it the same event."""

    model_config = STRICT

    type: str = Field(min_length=1, max_length=200, pattern=_PRINTABLE)
    payload: dict[str, Any] = Field(default_factory=dict)
    # default: the payload's `id`
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=300)


class AgentEvent(EventBody):
    """A trigger a sensor agent's watch reported (our extension, AGENT_API.md)."""

    # the watch it came from (the heartbeat answer's `watch[].id`)
    watch_id: str | None = Field(default=None, max_length=40, pattern=r"^wat_[0-9a-f]{1,36}$")


async def do_event(
    state: State,
    agent: AgentIdentity,
    event_type: str,
    payload: dict[str, Any],
    watch: str | None = None,
    key: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """An agent's event in (ours or the documented /api/v1/triggers): its answer, and
    whether it is new. Its key: the one given, else the payload's `id`."""
    state.heartbeats.touch(agent.id)
    key = idempotency_key(payload, key)
    row, new = await state.events.from_agent(agent, event_type, payload, watch, key)
    answer = {
        "event_id": row["id"],
        "duplicate": not new,
        "outcome": row["outcome"],
        "started": row["started"],
    }
    return answer, new


class SensorTrigger(BaseModel):
    """The documented Stavily trigger event (AGENT_API.md, "Other documented Stavily
    surfaces"), as an earlier official sensor agent sent it to POST /api/v1/triggers."""

    model_config = STRICT

    event_type: str = Field(default="trigger_event", max_length=50)
    agent_id: str = Field(min_length=1, max_length=40)
    tenant_id: str | None = Field(default=None, max_length=200)
    timestamp: datetime | None = Field(default=None, strict=False)
    trigger_type: str = Field(min_length=1, max_length=200, pattern=_PRINTABLE)
    payload: dict[str, Any] = Field(default_factory=dict)


# -- the routes: what the OpenAPI document shows, and where every request goes that the
# -- fast path below does not take --------------------------------------------------------


@router.get(
    "/{agent_id}/instructions",
    response_model=schemas.PollAnswer,
    responses=errors(401, 403, 422, 429),
)
async def poll(
    request: Request,
    agent: CurrentAgent,
    wait: float = Query(default=0, ge=0, le=300, description="Long poll: hold up to N seconds."),
    slots: int | None = Query(default=None, ge=1, le=100, description="Hand out up to N."),
) -> JSONResponse:
    official = not request.query_params
    answer = await do_poll(state_of(request), agent, wait, slots, official, request.receive)
    return JSONResponse(answer)


@router.put(
    "/{agent_id}/instructions/{instruction_id}",
    response_model=schemas.ProgressAnswer,
    responses=errors(401, 403, 404, 409, 413, 422, 429),
)
async def progress(
    request: Request, instruction_id: str, update: ProgressUpdate, agent: CurrentAgent
) -> JSONResponse:
    return JSONResponse(await do_progress(state_of(request), agent, instruction_id, update))


@router.post(
    "/{agent_id}/instructions/{instruction_id}/result",
    response_model=schemas.ResultAnswer,
    # not rate limited: official agents never retry a result (see deps.agent_for)
    responses=errors(401, 403, 404, 409, 413, 422),
)
async def result(
    request: Request,
    instruction_id: str,
    report: ResultReport,
    agent: ReportingAgent,
    next: bool = Query(default=False, description="Piggyback the next instruction."),
) -> JSONResponse:
    answer = await do_result(
        state_of(request), agent, instruction_id, report, await request.body(), next
    )
    return JSONResponse(answer)


@router.post(
    "/{agent_id}/events",
    status_code=201,
    response_model=schemas.AgentEventAnswer,
    responses={
        200: {"model": schemas.AgentEventAnswer, "description": "A repeated event: the first's."},
        **errors(401, 403, 413, 422, 429),
    },
)
async def event(request: Request, body: AgentEvent, agent: CurrentAgent) -> JSONResponse:
    """A trigger from one of the agent's watches: stored once per idempotency key (the
    payload's `id` unless given), starting the watch's workflow."""
    answer, new = await do_event(
        state_of(request), agent, body.type, body.payload, body.watch_id, body.idempotency_key
    )
    return JSONResponse(answer, status_code=201 if new else 200)


@router.post(
    "/{agent_id}/heartbeat",
    response_model=schemas.HeartbeatAnswer,
    responses=errors(401, 403, 413, 422, 429),
)
async def heartbeat(request: Request, beat: Heartbeat, agent: CurrentAgent) -> JSONResponse:
    user_agent = request.headers.get("user-agent")
    return JSONResponse(await do_heartbeat(state_of(request), agent, beat, user_agent))


# -- the fast path ---------------------------------------------------------------------------
#
# Agents make most of the server's requests, and for these small calls the framework's
# routing, dependency solving and request parsing cost as much as the work itself. So
# EdgeMiddleware hands each agent request here first. It is taken only when it is
# plainly well-formed (known route, query values of the plain form, a body the route's
# model accepts); everything else - a bad query value, an invalid body - declines, and
# the request goes on to the routes above, which give the framework's answers (422 and
# their details). Both ways run the same do_* functions above.

_NUMBER = re.compile(r"\d{1,6}(\.\d{1,9})?")
_COUNT = re.compile(r"\d{1,3}")
_FLAGS = {"1": True, "true": True, "0": False, "false": False}


def _query(scope: Scope) -> dict[str, str] | None:
    raw = scope.get("query_string", b"")
    if not raw:
        return {}
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    query = dict(pairs)
    return query if len(query) == len(pairs) else None  # repeated: the routes decide


def _poll_params(query: dict[str, str]) -> tuple[float, int | None] | None:
    wait, slots = query.get("wait", "0"), query.get("slots")
    if not _NUMBER.fullmatch(wait) or float(wait) > 300:
        return None
    if slots is not None and (not _COUNT.fullmatch(slots) or not 1 <= int(slots) <= 100):
        return None
    return float(wait), int(slots) if slots is not None else None


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return value.decode("latin-1")
    return None


def _credential(scope: Scope) -> str | None:
    return bearer_of(_header(scope, b"authorization"))


async def serve_fast(scope: Scope, receive: Receive, send: Send, body: bytes | None) -> bool:
    """Answer an agent request without the framework, or return False to let it pass.
    `body` is the request's body, read and checked as JSON by EdgeMiddleware (None for
    a request without a JSON body)."""
    parts = scope["path"].split("/")
    if len(parts) < 5 or parts[1] != "agents" or parts[2] != "v1" or not parts[3]:
        return False
    method, agent_id, tail = scope["method"], parts[3], parts[4:]
    query = _query(scope)
    if query is None:
        return False
    state: State = scope["app"].state.stavily
    try:
        if tail == ["instructions"] and method == "GET":
            params = _poll_params(query)
            if params is None:
                return False
            agent = await agent_for(state, _credential(scope), agent_id, source=peer(scope))
            answer = await do_poll(state, agent, *params, not query, receive)
        elif body is None or method not in ("PUT", "POST"):
            return False
        elif len(tail) == 2 and tail[0] == "instructions" and tail[1] and method == "PUT":
            update = _model(ProgressUpdate, body)
            if update is None:
                return False
            agent = await agent_for(state, _credential(scope), agent_id, source=peer(scope))
            answer = await do_progress(state, agent, tail[1], update)
        elif len(tail) == 3 and tail[0] == "instructions" and tail[1] and tail[2] == "result":
            report, piggyback = _model(ResultReport, body), _FLAGS.get(query.get("next", "0"))
            if method != "POST" or report is None or piggyback is None:
                return False
            agent = await agent_for(
                state, _credential(scope), agent_id, limited=False, source=peer(scope)
            )
            answer = await do_result(state, agent, tail[1], report, body, piggyback)
        elif tail == ["heartbeat"] and method == "POST":
            beat = _model(Heartbeat, body)
            if beat is None:
                return False
            agent = await agent_for(state, _credential(scope), agent_id, source=peer(scope))
            answer = await do_heartbeat(state, agent, beat, _header(scope, b"user-agent"))
        else:
            return False
    except StavilyError as exc:
        await send_json(
            send, error_body(exc.code, exc.message, exc.details), exc.status, exc.headers
        )
        return True
    await send_json(send, answer)
    return True


def _model(model: type[ModelT], body: bytes) -> ModelT | None:
    if not body:
        return None
    try:
        return model.model_validate(orjson.loads(body))
    except ValidationError:
        return None


async def refuse_result(
    scope: Scope, agent_id: str, instruction_id: str, body: bytes, problem: str
) -> None:
    """A result the edge refused for its nesting (api.middleware) fails its step now: the
    official agents never send a result again, and the step would wait for its lease.
    Only for the agent the instruction is leased to; anything else changes nothing."""
    state: State = scope["app"].state.stavily
    report = {
        "status": "failed",
        "error_message": f"the agent's result was refused: {problem}",
        "error_details": {"error_type": "result_refused"},
    }
    digest = hashlib.sha256(body or problem.encode()).hexdigest()
    try:
        agent = await agent_for(
            state, _credential(scope), agent_id, limited=False, source=peer(scope)
        )
        state.heartbeats.touch(agent.id)
        await state.engine.result(agent, instruction_id, report, digest)
    except StavilyError:
        pass  # not this agent's, or no longer running: the answer says what was wrong
