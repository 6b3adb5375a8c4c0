"""The public agent API (`/agents/v1/...`), byte-compatible with AGENT_API.md."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from stavily.api.deps import CurrentAgent, ReportingAgent, state_of
from stavily.api.json import JSONResponse
from stavily.errors import InvalidInput, RateLimited
from stavily.fleet.waiters import Waiter

router = APIRouter(prefix="/agents/v1", tags=["agents"])

_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
HEARTBEAT_STATUSES = {"online", "offline", "idle", "busy", "running", "healthy"}


class ProgressUpdate(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str | None = Field(default=None, max_length=50)
    execution_log: list[str] | None = Field(default=None, max_length=100_000)
    max_retries: StrictInt | None = Field(default=None, ge=0, le=1000)


class ResultReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str = Field(max_length=50)
    result: Any = None
    error_message: str | None = Field(default=None, max_length=100_000)
    error_details: dict[str, Any] | None = None
    execution_log: list[str] | None = Field(default=None, max_length=100_000)


class SystemFigures(BaseModel):
    """What a richer heartbeat says about the agent's machine; absurd figures are refused."""

    model_config = ConfigDict(extra="forbid")

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


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="allow")

    timestamp: datetime | None = None
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


def _poll_answer(claimed: list[dict[str, Any]], settings_interval: int, slots: int | None) -> Any:
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


@router.get("/{agent_id}/instructions")
async def poll(
    request: Request,
    agent: CurrentAgent,
    wait: float = Query(default=0, ge=0, le=300, description="Long poll: hold up to N seconds."),
    slots: int | None = Query(default=None, ge=1, le=100, description="Hand out up to N."),
) -> JSONResponse:
    state = state_of(request)
    state.heartbeats.touch(agent.id)  # a valid request is a sign of life
    if not request.query_params:
        # An official agent polls only when it runs nothing: anything still leased to it
        # was lost on the way (its poll answer, or its never-retried result) and goes back.
        await state.engine.release_unreported(agent, [])
    wait = min(wait, state.settings.max_poll_wait)
    waiter = Waiter(agent)
    watcher = asyncio.create_task(_watch_disconnect(request, waiter)) if wait else None

    def wanted() -> bool:
        pending = state.heartbeats.pending(agent.id)
        return not waiter.hung_up and (pending is None or pending.get("status") != "offline")

    try:
        claimed = await state.engine.poll(agent, slots or 1, wait, wanted, waiter)
    finally:
        if watcher is not None:
            watcher.cancel()
    return JSONResponse(_poll_answer(claimed, state.settings.poll_interval, slots))


async def _watch_disconnect(request: Request, waiter: Waiter) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    waiter.hung_up = True
    waiter.wake()  # so the poll sees the hang-up now


@router.put("/{agent_id}/instructions/{instruction_id}")
async def progress(
    request: Request, instruction_id: str, update: ProgressUpdate, agent: CurrentAgent
) -> JSONResponse:
    state = state_of(request)
    state.heartbeats.touch(agent.id)
    fields = update.model_dump(
        include={"status", "execution_log", "max_retries"}, exclude_unset=True
    )
    fields = {k: v for k, v in fields.items() if v is not None}
    updated = await state.engine.progress(agent, instruction_id, fields)
    return JSONResponse(
        {"success": True, "instruction_id": instruction_id, "updated_fields": updated}
    )


@router.post("/{agent_id}/instructions/{instruction_id}/result")
async def result(
    request: Request,
    instruction_id: str,
    report: ResultReport,
    agent: ReportingAgent,
    next: bool = Query(default=False, description="Piggyback the next instruction."),
) -> JSONResponse:
    state = state_of(request)
    state.heartbeats.touch(agent.id)
    digest = hashlib.sha256(await request.body()).hexdigest()
    fields = report.model_dump(exclude_unset=True)
    claimed = await state.engine.result(agent, instruction_id, fields, digest, int(next))
    next_instruction = claimed[0] if claimed else None
    return JSONResponse({"acknowledged": True, "next_instruction": next_instruction})


@router.post("/{agent_id}/heartbeat")
async def heartbeat(request: Request, beat: Heartbeat, agent: CurrentAgent) -> JSONResponse:
    state = state_of(request)
    if beat.status not in HEARTBEAT_STATUSES:
        raise InvalidInput(
            f"'{beat.status}' is not a heartbeat status",
            [{"path": "status", "message": f"expected one of {sorted(HEARTBEAT_STATUSES)}"}],
        )
    if not state.limiter.hit(state.heartbeat_limit, "heartbeat", agent.id):
        raise RateLimited("too many heartbeats from this agent", retry_after=1)
    state.heartbeats.record(
        agent.id,
        "offline" if beat.status == "offline" else "online",
        version=beat.version,
        hostname=beat.hostname,
        os=beat.os,
        interval=beat.heartbeat_interval,
        busy=beat.running is not None,
        facts={
            **(beat.system.model_dump(exclude_none=True) if beat.system else {}),
            **({"labels": beat.labels} if beat.labels is not None else {}),
            **({"capacity": beat.capacity} if beat.capacity is not None else {}),
            **({"running": beat.running} if beat.running is not None else {}),
        },
    )
    if beat.status == "offline":
        await state.engine.release_unstarted(agent)
    elif beat.running is not None:
        await state.engine.release_unreported(agent, beat.running)
    answer: dict[str, Any] = {
        "acknowledged": True,
        "next_heartbeat_interval": state.settings.heartbeat_interval,
    }
    if agent.admin_state == "draining":
        answer["commands"] = ["drain"]  # our agent stops polling; old agents ignore it
    return JSONResponse(answer)
