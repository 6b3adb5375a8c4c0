"""`GET /metrics`: the caller's organization in Prometheus' text format, read at each scrape.

Every figure is read from the database when Prometheus asks (a registry of the scrape's
own, dropped after it): nothing is counted on the request path, nothing is kept between
scrapes or organizations, and every replica answers the same. See docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import __version__
from stavily.api.deps import AppState, State, permitted
from stavily.api.schemas import errors
from stavily.fleet import admin
from stavily.fleet.agents import AGENT_TYPES
from stavily.security import Principal
from stavily.store.models import ACTIVE_INSTRUCTION, QUEUED, events, executions, instructions
from stavily.store.models import one_of as status_in
from stavily.workflows import states

router = APIRouter(tags=["metrics"])

# The text format Prometheus has always read, which generate_latest writes by default
# (prometheus-client's CONTENT_TYPE_LATEST now names version 1.0.0 of the format).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Instructions not yet finished: waiting for an agent, or held by one.
OPEN_INSTRUCTIONS = ("queued", *ACTIVE_INSTRUCTION)


class Figures:
    """A collector of metric families already read, for one scrape's registry."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def gauge(
    name: str, documentation: str, counts: Mapping[Any, int], labels: Iterable[str] = ()
) -> GaugeMetricFamily:
    """A gauge of one sample per key of `counts`: a label value, or a tuple of them."""
    names = list(labels)
    family = GaugeMetricFamily(name, documentation, labels=names)
    for key, count in sorted(counts.items()):
        values = list(key) if isinstance(key, tuple) else [str(key)]
        family.add_metric(values if names else [], count)
    return family


# -- the counts ------------------------------------------------------------------------------
# One statement each, filtered by organization first. (Agents are counted by the fleet
# summary, with heartbeats not yet written applied: the figures of GET /api/v1/fleet.)


async def executions_by_status(conn: AsyncConnection, organization_id: str) -> dict[str, int]:
    """Every execution of the organization, by status; each status there is, even at 0."""
    rows = await conn.execute(
        sa.select(executions.c.status, sa.func.count())
        .where(executions.c.organization_id == organization_id)
        .group_by(executions.c.status)
    )
    counts = dict.fromkeys(states.EXECUTION, 0)
    counts.update({status: int(count) for status, count in rows})
    return counts


async def open_instructions(conn: AsyncConnection, organization_id: str) -> dict[str, int]:
    """Instructions waiting for an agent (queued) and held by one (leased, executing).

    Two halves of one statement, each with its partial index's own condition (store.models)
    so that it reads only the open rows, never the history of finished ones."""
    halves = [
        sa.select(instructions.c.status, sa.func.count())
        .where(instructions.c.organization_id == organization_id, condition)
        .group_by(instructions.c.status)
        for condition in (QUEUED, status_in(instructions.c.status, ACTIVE_INSTRUCTION))
    ]
    counts = dict.fromkeys(OPEN_INSTRUCTIONS, 0)
    for status, count in await conn.execute(sa.union_all(*halves)):
        counts[status] = int(count)
    return counts


async def events_by_source_and_outcome(
    conn: AsyncConnection, organization_id: str
) -> dict[tuple[str, str], int]:
    rows = await conn.execute(
        sa.select(events.c.source, events.c.outcome, sa.func.count())
        .where(events.c.organization_id == organization_id)
        .group_by(events.c.source, events.c.outcome)
    )
    return {(source, outcome): int(count) for source, outcome, count in rows}


async def read_figures(state: State, organization_id: str) -> list[Metric]:
    """The organization's metric families, read in one connection, a statement per count."""
    pending = state.heartbeats.snapshot()  # before the rows: see v1.list_agents_route
    async with state.db.read() as conn:
        fleet = await admin.fleet_summary(conn, organization_id, pending)
        by_status = await executions_by_status(conn, organization_id)
        held = await open_instructions(conn, organization_id)
        by_event = await events_by_source_and_outcome(conn, organization_id)
    capacity = fleet["capacity"]
    info = InfoMetricFamily("stavily_build", "The orchestrator's version.")
    info.add_metric([], {"version": __version__})
    return [
        info,
        gauge(
            "stavily_agents",
            "Agents by the state the fleet view shows: online, busy (holding work), "
            "degraded, offline (health), draining, disabled, revoked (an operator's).",
            fleet["by_state"],
            ["state"],
        ),
        gauge(
            "stavily_agents_by_type",
            "Agents by type (action, sensor), whatever their state.",
            {**dict.fromkeys(AGENT_TYPES, 0), **fleet["by_type"]},
            ["type"],
        ),
        gauge(
            "stavily_agent_capacity",
            "Instructions the agents that are neither disabled nor revoked can hold at once.",
            {(): capacity["total"]},
        ),
        gauge(
            "stavily_agent_capacity_in_use",
            "Instructions agents hold now (leased or executing).",
            {(): capacity["in_use"]},
        ),
        gauge(
            "stavily_agent_capacity_available",
            "Free room on live (online, busy, degraded), active agents: instructions they could "
            "take now.",
            {(): capacity["available"]},
        ),
        gauge(
            "stavily_executions",
            "Workflow executions by status: queued (waiting for a concurrency slot), "
            "running, succeeded, failed, cancelled (finished ones stay counted).",
            by_status,
            ["status"],
        ),
        gauge(
            "stavily_instructions",
            "Open instructions: queued (waiting for an agent), leased (handed to an agent, "
            "not yet started), executing.",
            held,
            ["status"],
        ),
        gauge(
            "stavily_events",
            "Events received, by source (webhook, schedule, agent, api, manual) and outcome: "
            "accepted (stored, not yet processed), started, unmatched, refused.",
            by_event,
            ["source", "outcome"],
        ),
    ]


class Scrapes:
    """Each organization's last answer, given again for `ttl` seconds, and one read at a
    time per organization: however often (and however many tokens) scrape, the counts
    (whole tables, the fleet in Python) are read at most once per `ttl`."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self._last: dict[str, tuple[float, bytes]] = {}
        self._reading: dict[str, asyncio.Future[bytes]] = {}

    async def text(self, organization_id: str, read: Callable[[], Awaitable[bytes]]) -> bytes:
        last = self._last.get(organization_id)
        if last is not None and self.clock() - last[0] < self.ttl:
            return last[1]
        reading = self._reading.get(organization_id)
        if reading is None:
            reading = self._reading[organization_id] = asyncio.ensure_future(read())
            reading.add_done_callback(lambda _: self._reading.pop(organization_id, None))
        text = await asyncio.shield(reading)  # a scrape given up does not stop the others'
        if self.ttl:
            self._last[organization_id] = (self.clock(), text)
        return text


def scrapes(request: Request, state: State) -> Scrapes:
    """The app's Scrapes, made at its first scrape."""
    made: Scrapes | None = getattr(request.app.state, "metrics_scrapes", None)
    if made is None:
        made = request.app.state.metrics_scrapes = Scrapes(state.settings.metrics_cache_seconds)
    return made


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "The Prometheus text format (version 0.0.4).",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **errors(401),
    },
)
async def metrics(
    principal: Annotated[Principal, permitted("metrics:read")], state: AppState, request: Request
) -> Response:
    """The caller's organization in Prometheus' text format: agents by state and type,
    capacity, executions by status, open instructions, events by source and outcome.

    Read from the database at each scrape. The server process's own figures (`process_*`,
    `python_*`) only for the organization that runs the server (the first one). The same
    answer for `STAVILY_METRICS_CACHE_SECONDS` (5 s)."""
    organization_id = principal.organization_id

    async def read() -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Figures(await read_figures(state, organization_id)))
        if organization_id == state.organization_id:
            # This process's figures tell of every organization's load: the operator's only.
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=registry)
        return generate_latest(registry)

    text = await scrapes(request, state).text(organization_id, read)
    return Response(text, media_type=CONTENT_TYPE)
