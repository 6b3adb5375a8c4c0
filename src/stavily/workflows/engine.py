"""Executions: starting runs, handing instructions to agents, taking their reports, and
the operator's controls (cancel, rerun).

Every transition happens in one write transaction together with the audit records
that describe it, so a crash at any point leaves a consistent state that the next
start simply continues from. The execution's row is locked first, so two reports for
one execution never advance it at the same time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit, offload
from stavily.config import Settings
from stavily.errors import Conflict, Forbidden, InvalidInput, NotFound
from stavily.fleet.agents import (
    IDENTITY_COLUMNS,
    AgentIdentity,
    eligible,
    identity_of,
)
from stavily.fleet.liveness import HeartbeatBuffer, Liveness
from stavily.fleet.routing import Router
from stavily.fleet.waiters import Waiter, Waiters
from stavily.ids import new_id
from stavily.plugins.installs import Installs
from stavily.security import secrets
from stavily.security.secrets import SecretPolicy
from stavily.security.store import SecretStore
from stavily.store.db import Database
from stavily.store.models import (
    ACTIVE_INSTRUCTION,
    QUEUED,
    agents,
    executions,
    instructions,
    one_of,
    step_runs,
    workflows,
)
from stavily.store.notify import WorkChannel
from stavily.timeutil import isoformat, utcnow
from stavily.workflows import queries, service, states
from stavily.workflows.definition import WorkflowDefinition, parse_duration, plan, stored
from stavily.workflows.handout import (
    COMPLETED,
    FAILED,
    instruction_payload,
    step_output,
    timed_out,
)
from stavily.workflows.orchestration import (
    AGENT_LOST,
    ERROR,
    TIMEOUT,
    UNROUTABLE,
    IfUnset,
    Progression,
    load_step,
    load_steps,
    set_status,
)
from stavily.workflows.templating import RenderLimits
from stavily.workflows.views import execution_view, step_view

log = structlog.get_logger("stavily.engine")

PROGRESS_STATUSES = {"executing", "running", "in_progress", "started"}


def _page(free: int, sqlite: bool = False) -> int:
    """How many candidates a claim reads for `free` slots: a few more (the rest are
    offered to other waiting agents), a power of two (few distinct statements). On
    PostgreSQL claims race each other for the oldest rows (those locked are skipped): a
    page of a few would often be all taken by others."""
    wanted = free * 4 if sqlite else max(32, free * 4)
    return 1 << (wanted - 1).bit_length()


def _oldest_first(rows: Iterable[Any]) -> list[Any]:
    return sorted(rows, key=lambda r: (r.execution_id, r.id))


def _released(row: Any) -> bool:
    """A dependent in REPORTED_RELEASING's rows, not the reported row."""
    return bool(getattr(row, "released", False))


def _offer(row: Any) -> dict[str, Any]:
    return {c.name: getattr(row, c.name) for c in queries.OFFER_COLUMNS}


def _offers(rows: Iterable[Any], agent: AgentIdentity | None = None) -> Iterator[dict[str, Any]]:
    """What a claim saw and left (those `agent` may take, if given), oldest first, as
    offers to the other waiting agents: built one by one as Waiters.offer takes them, so
    none while nobody waits (a claim reads a page of 32 and leases one)."""
    for row in _oldest_first(rows):
        if agent is None or eligible(agent, row.selector):
            yield _offer(row)


class Engine:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        heartbeats: HeartbeatBuffer | None = None,
        secret_store: SecretStore | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        # signs of life, and which agents are lost (the fleet's business)
        self.heartbeats = heartbeats or HeartbeatBuffer(settings)
        self.liveness = Liveness(db, settings, self.heartbeats)
        self.router = Router(settings.routing_prefer_seconds, settings.routing_sticky_seconds)
        self.secret_policy = SecretPolicy.of(
            settings.secret_env_prefix,
            settings.secret_env_names,
            settings.variables(),
            secret_store,
        )
        self.render_limits = RenderLimits(
            settings.template_timeout, settings.template_max_output_bytes
        )
        # agents in a long poll on this replica right now: routing chooses among them
        self.waiters = Waiters()
        # queued instructions routed to one agent, until they are claimed or it lapses
        self._preferred: dict[str, dict[str, Any]] = {}
        self._plans: dict[str, tuple[WorkflowDefinition, list[dict[str, Any]]]] = {}
        # PostgreSQL: how queued work reaches the long polls of the other replicas
        self.channel: WorkChannel | None = None
        # plugin versions on agents: installs handed out, and who failed one
        self.installs = Installs(db, settings)
        self.router.holders = self.installs.holders

    # -- plumbing ---------------------------------------------------------------------------

    def _progression(
        self, conn: AsyncConnection, execution: dict[str, Any], actor: str, now: datetime
    ) -> Progression:
        return Progression(
            conn,
            execution,
            actor,
            now,
            self.settings.max_agent_lost_attempts,
            self.router,
            self.waiters.idle_agents(),
            self.secret_policy,
            self.render_limits,
        )

    async def _lock_execution(
        self, conn: AsyncConnection, execution_id: str, organization_id: str | None = None
    ) -> dict[str, Any]:
        query = queries.EXECUTION if self.db.is_sqlite else queries.EXECUTION_LOCKED
        row = (await conn.execute(query, {"id": execution_id})).mappings().first()
        if row is None or organization_id not in (None, row["organization_id"]):
            raise NotFound(f"no execution '{execution_id}'")
        return dict(row)

    async def _settle(self, conn: AsyncConnection, done: list[Progression]) -> None:
        """After executions moved: start queued runs that a finished one made room for,
        then write every audit record of the transaction."""
        for progression in list(done):
            execution = progression.execution
            if execution["status"] in states.FINAL_EXECUTION and execution.get("concurrency_limit"):
                done += await self._promote(conn, execution, progression.actor, progression.now)
        await audit.append(conn, [e for p in done for e in p.entries])

    def started(self, done: list[Progression]) -> None:
        """After the commit of a `start_in`: its first steps offered to the agents."""
        self._wake(done)

    def _wake(self, done: list[Progression], taken: set[str] | None = None) -> None:
        """After a commit: what the transaction queued (and did not hand out itself,
        `taken`) is offered to the agents waiting here, and published to the other
        replicas (PostgreSQL) for theirs."""
        items = [i for p in done for i in p.new_instructions if not taken or i["id"] not in taken]
        if items:
            self.offer_queued(items)
            if self.channel is not None:
                self.channel.publish(items)

    def offer_queued(self, items: list[dict[str, Any]]) -> None:
        """Offer queued instructions to the agents waiting here: now, or when their retry
        delay ends; and to every eligible agent once their routing lapses."""
        now = utcnow()
        ready = []
        for item in items:
            if item.get("available_at") is not None:
                self.waiters.offer_later((item["available_at"] - now).total_seconds(), [item])
            else:
                ready.append(item)
            if item.get("prefer_until") is not None:
                self._preferred[item["id"]] = {**item, "preferred_agent_id": None}
                lapse = (item["prefer_until"] - now).total_seconds()
                asyncio.get_running_loop().call_later(lapse, self._lapse, item["id"])
        self.waiters.offer(ready)

    def _lapse(self, instruction_id: str) -> None:
        item = self._preferred.pop(instruction_id, None)
        if item is not None:  # not claimed here yet: any eligible agent may take it now
            self.waiters.offer([item])

    async def _promote(
        self, conn: AsyncConnection, finished: dict[str, Any], actor: str, now: datetime
    ) -> list[Progression]:
        limit = int(finished["concurrency_limit"])
        running = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(executions)
            .where(
                executions.c.workflow_id == finished["workflow_id"],
                executions.c.status == "running",
            )
        )
        free = limit - int(running or 0)
        if free <= 0:
            return []
        waiting = (
            (
                await conn.execute(
                    sa.select(executions.c.id)
                    .where(
                        executions.c.workflow_id == finished["workflow_id"],
                        executions.c.status == "queued",
                    )
                    .order_by(executions.c.id)
                    .limit(free)
                )
            )
            .scalars()
            .all()
        )
        started = []
        for execution_id in waiting:
            execution = await self._lock_execution(conn, execution_id)
            await set_status(conn, executions, states.EXECUTION, execution_id, "running")
            execution["status"] = "running"
            progression = self._progression(conn, execution, actor, now)
            progression._audit(
                "execution.started", "execution", execution_id, reason="a concurrency slot opened"
            )
            await progression.begin(await load_steps(conn, execution_id))
            started.append(progression)
        return started

    # -- starting ---------------------------------------------------------------------------

    async def definition(self, workflow: dict[str, Any]) -> WorkflowDefinition:
        """A version's validated definition (workflows.watches reads its trigger steps and
        rules), from the same cache as its plan."""
        return (await self._plan(workflow))[0]

    async def _plan(
        self, workflow: dict[str, Any]
    ) -> tuple[WorkflowDefinition, list[dict[str, Any]]]:
        """The version's definition and the steps a run of it has. Versions never change,
        so each is validated and planned once (a few hundred kept), not on every run, and
        on a worker thread: a big workflow takes a while."""
        version_id = workflow["version_id"]
        cached = self._plans.get(version_id)
        if cached is None:

            def planned() -> tuple[WorkflowDefinition, list[dict[str, Any]]]:
                definition = stored(workflow["definition"])
                return definition, plan(definition, workflow.get("plugins"))

            cached = await offload.run(planned)
            if len(self._plans) >= 256:
                del self._plans[next(iter(self._plans))]
            self._plans[version_id] = cached
        return cached

    async def start(
        self,
        organization_id: str,
        workflow_name: str,
        inputs: dict[str, Any],
        actor: str,
        trigger: dict[str, Any],
    ) -> str:
        async with self.db.write() as conn:
            execution_id, done = await self.start_in(
                conn, organization_id, workflow_name, inputs, actor, trigger
            )
        self._wake(done)
        return execution_id

    async def start_in(
        self,
        conn: AsyncConnection,
        organization_id: str,
        workflow_name: str,
        inputs: dict[str, Any],
        actor: str,
        trigger: dict[str, Any],
        version_id: str | None = None,
    ) -> tuple[str, list[Progression]]:
        """A run started within the caller's transaction (an event's, say); the caller
        wakes the returned progressions once it commits. `version_id`: only if the
        workflow is still at that version (NotFound otherwise)."""
        now = utcnow()
        workflow = await service.get(conn, organization_id, workflow_name)
        if version_id is not None and workflow["version_id"] != version_id:
            raise NotFound(
                f"workflow '{workflow_name}' was applied again since (version "
                f"{workflow['version']} now)"
            )
        definition, planned = await self._plan(workflow)
        inputs = definition.resolve_inputs(inputs)
        status = "running"
        if definition.concurrency is not None:
            # Serialize starts of this workflow so two cannot both take the last slot.
            await conn.execute(
                self.db.for_update(
                    sa.select(workflows.c.id).where(workflows.c.id == workflow["id"])
                )
            )
            running = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(executions)
                .where(
                    executions.c.workflow_id == workflow["id"],
                    executions.c.status.in_(("running", "queued")),
                )
            )
            if int(running or 0) >= definition.concurrency.limit:
                if definition.concurrency.policy == "reject":
                    raise Conflict(
                        f"workflow '{workflow_name}' already runs "
                        f"{definition.concurrency.limit} executions (its concurrency limit)"
                    )
                status = "queued"
        execution = {
            "id": new_id("exe"),
            "organization_id": organization_id,
            "workflow_id": workflow["id"],
            "workflow_version_id": workflow["version_id"],
            "workflow_name": workflow["name"],
            "workflow_version": workflow["version"],
            "status": status,
            "inputs": inputs,
            "trigger": trigger,
            "created_by": actor,
            "created_at": now,
            "variables": definition.variables or {},
            "deadline_at": (
                now + timedelta(seconds=parse_duration(definition.timeout))
                if definition.timeout is not None
                else None
            ),
            "concurrency_limit": (definition.concurrency.limit if definition.concurrency else None),
            "reruns": 0,
            "failed_step": None,
        }
        execution["open_steps"] = len(planned)
        await conn.execute(queries.INSERT_EXECUTION, execution)
        steps = [
            {
                "id": new_id("stp"),
                "organization_id": organization_id,
                "execution_id": execution["id"],
                "status": "pending",
                "attempts": 0,
                "parent_id": None,
                "item_index": None,
                **step,
            }
            for step in planned
        ]
        await conn.execute(queries.INSERT_STEPS, steps)
        progression = self._progression(conn, execution, actor, now)
        progression._audit(
            "execution.started" if status == "running" else "execution.queued",
            "execution",
            execution["id"],
            workflow=workflow["name"],
            version=workflow["version"],
            trigger=trigger.get("type"),
        )
        await progression.begin(steps)
        done = [progression]
        await self._settle(conn, done)
        return str(execution["id"]), done

    # -- agents take work -------------------------------------------------------------------

    async def claim(
        self, agent: AgentIdentity, slots: int, official: bool = False
    ) -> list[dict[str, Any]]:
        """`official`: an agent that cannot install from the registry (queries._PLUGIN_READY)."""
        if agent.admin_state != "active":
            return []  # draining: it finishes what it has and takes nothing new
        async with self.db.single_statements() as conn:
            payloads, left = await self._claim(conn, agent, slots, utcnow(), official)
        self._claimed(payloads, left)
        return payloads

    async def _claim(
        self,
        conn: AsyncConnection,
        agent: AgentIdentity,
        slots: int,
        now: datetime,
        official: bool = False,
    ) -> tuple[list[dict[str, Any]], Iterable[dict[str, Any]]]:
        """Lease up to `slots` instructions to the agent on `conn` (in the caller's
        transaction, or on PostgreSQL outside any): what it hands out, and what it saw
        eligible but left for others (built as they are taken: see _offers)."""
        free = slots
        if self.db.is_sqlite:
            # Read now, not from the request's start: a long poll may outlive a drain,
            # a disable or a revoke, and must then hand out nothing. (PostgreSQL's
            # statements read it themselves.)
            current = (await conn.execute(queries.AGENT_NOW, {"agent_id": agent.id})).first()
            if current is None or current.admin_state != "active" or current.revoked_at:
                return [], []
            free = min(slots, current.capacity - int(current.running))
            if free <= 0:
                return [], []
        else:
            # Candidates and lease in one statement, as long as no candidate's selector
            # needs Python to tell whether this agent may take it (queries.claim).
            limit = _page(free)
            params = self._lease_params(agent, free, now, official)
            rows = (await conn.execute(queries.claim(limit), params)).all()
            taken = _oldest_first(r for r in rows if r.taken)
            page = [r for r in rows if not r.taken]
            free -= len(taken)
            if free <= 0 or all(r.open for r in page):
                left = _offers(page, agent) if taken else ()
                return [instruction_payload(r, self.secret_policy) for r in taken], left
            fitting = _oldest_first(r for r in page if eligible(agent, r.selector))
            # One whose selector only Python matches stopped it: the page is matched here
            # and what fits leased (the pages are read again only if none of a full one
            # fits this agent).
            more, left = await self._take(
                conn,
                agent,
                free,
                now,
                official,
                fitting if fitting or len(rows) < limit else None,
            )
            return [instruction_payload(r, self.secret_policy) for r in (*taken, *more)], left
        rows, left = await self._take(conn, agent, free, now, official)
        return [instruction_payload(r, self.secret_policy) for r in rows], left

    async def _take(
        self,
        conn: AsyncConnection,
        agent: AgentIdentity,
        free: int,
        now: datetime,
        official: bool,
        fitting: list[Any] | None = None,
    ) -> tuple[list[Any], Iterable[dict[str, Any]]]:
        """Candidates (`fitting`, or read and matched here), then leased: the rows
        leased, and the eligible ones left to offer others (none if nothing was leased:
        others hold them)."""
        if fitting is None:
            fitting = await self._fitting(conn, agent, free, now, official)
        if not fitting:
            return [], []
        if self.db.is_sqlite:
            rows = await self._lease(conn, agent, fitting[:free], now)
        else:
            params = {
                **self._lease_params(agent, free, now, official),
                "ids": [c.id for c in fitting],
            }
            rows = _oldest_first((await conn.execute(queries.TAKE, params)).all())
        if not rows:  # no room, or others hold them all: they offer what they leave
            return [], []
        taken = {r.id for r in rows}
        return rows, _offers(c for c in fitting if c.id not in taken)

    def _lease_params(
        self, agent: AgentIdentity, free: int, now: datetime, official: bool
    ) -> dict[str, Any]:
        return {
            "official": official,
            "organization_id": agent.organization_id,
            "agent_type": agent.type,
            "agent_name": agent.name,
            "agent_id": agent.id,
            "now": now,
            "slots": free,
            "grace": self.settings.lease_grace,
            "actor": agent.actor,
        }

    async def _lease(
        self, conn: AsyncConnection, agent: AgentIdentity, chosen: list[Any], now: datetime
    ) -> list[Any]:
        """SQLite (one writer: nothing else can take them meanwhile): lease each that may
        be (queries.LEASE), set its step running, audit the leases."""
        rows, entries = [], []
        for candidate in chosen:
            lease = now + timedelta(seconds=candidate.timeout_seconds + self.settings.lease_grace)
            row = (
                await conn.execute(
                    queries.LEASE,
                    {
                        "row_id": candidate.id,
                        "v_agent_id": agent.id,
                        "v_leased_at": now,
                        "v_lease_expires_at": lease,
                    },
                )
            ).first()
            if row is None:
                continue
            if candidate.step_run_id:
                await set_status(
                    conn,
                    step_runs,
                    states.STEP,
                    candidate.step_run_id,
                    "running",
                    agent_id=agent.id,
                    started_at=IfUnset(now),
                )
            rows.append(row)
            entries.append(
                audit.entry(
                    agent.organization_id,
                    agent.actor,
                    "instruction.leased",
                    "instruction",
                    candidate.id,
                    {"execution_id": candidate.execution_id, "attempt": row.attempt},
                    at=now,
                )
            )
        await audit.append(conn, entries)
        return rows

    async def _fitting(
        self,
        conn: AsyncConnection,
        agent: AgentIdentity,
        free: int,
        now: datetime,
        official: bool,
    ) -> list[Any]:
        """The oldest queued instructions this agent may take, a few more than it has room
        for (the rest are offered to other waiting agents). Label selectors are matched
        here, not in SQL: while a page holds none for this agent, the next is read, so
        work for other agents queued earlier never hides this agent's."""
        params: dict[str, Any] = {
            "organization_id": agent.organization_id,
            "agent_type": agent.type,
            "agent_name": agent.name,
            "agent_id": agent.id,
            "now": now,
            "official": official,
        }
        limit = _page(free, self.db.is_sqlite)
        statement = queries.candidates(limit)
        while True:
            candidates = (await conn.execute(statement, params)).all()
            fitting = [c for c in candidates if eligible(agent, c.selector)]
            if fitting or len(candidates) < limit:
                return fitting
            last = candidates[-1]
            params.update(after_execution_id=last.execution_id, after_id=last.id)
            limit = min(limit * 4, 1024)
            statement = queries.candidates(limit, after=True)

    def _claimed(self, payloads: list[dict[str, Any]], left: Iterable[dict[str, Any]]) -> None:
        """After the commit: routing preferences of what was taken are settled, and what
        the claim left is offered to the other waiting agents."""
        for payload in payloads:
            self._preferred.pop(payload["id"], None)
        self.waiters.offer(left)

    async def poll(
        self,
        agent: AgentIdentity,
        slots: int,
        wait: float,
        wanted: Callable[[], bool] = lambda: True,
        waiter: Waiter | None = None,
        official: bool = False,
    ) -> list[dict[str, Any]]:
        """Claim now, or hold the poll open until work is queued or `wait` runs out.

        `wanted` is asked before every claim: a poll whose client hung up, or whose agent
        has since said it is going offline, must not lease work nobody will read.
        """
        if wait <= 0:
            return await self.claim(agent, slots, official) if wanted() else []
        loop_deadline = utcnow() + timedelta(seconds=wait)
        with self.waiters.register(waiter or Waiter(agent)) as registered:
            while wanted():
                claimed = await self.claim(agent, slots, official)
                remaining = (loop_deadline - utcnow()).total_seconds()
                if claimed or remaining <= 0 or not await registered.wait(remaining):
                    return claimed
        return []

    @staticmethod
    def _own(row: Any, agent: AgentIdentity, instruction_id: str) -> Any:
        if row is None:
            raise NotFound(f"no instruction '{instruction_id}' for this agent")
        if row.agent_id != agent.id:
            raise Forbidden("that instruction is not leased to this agent")
        return row

    async def progress(
        self, agent: AgentIdentity, instruction_id: str, fields: dict[str, Any]
    ) -> list[str]:
        status = fields.get("status")
        if status is not None and status not in PROGRESS_STATUSES:
            raise InvalidInput(
                f"'{status}' is not a progress status; report the end with POST .../result",
                [{"path": "status", "message": f"expected one of {sorted(PROGRESS_STATUSES)}"}],
            )
        now = utcnow()
        params = {"id": instruction_id, "organization_id": agent.organization_id}
        updated = [key for key in ("status", "execution_log", "max_retries") if key in fields]
        async with self.db.single_statements() as conn:
            if "status" in fields and fields.keys() <= {"status", "execution_log"}:
                if await self._started(conn, agent, params, fields.get("execution_log"), now):
                    return updated
            # Read, then write only if the instruction is still as read (its agent and
            # status): on PostgreSQL two round trips and no lock held between them; a
            # result or a cancel that came in between makes it read again.
            while True:
                found = (await conn.execute(queries.OWNED, params)).first()
                row = self._own(found, agent, instruction_id)
                if row.status not in ACTIVE_INSTRUCTION:
                    raise Conflict(f"instruction '{instruction_id}' is {row.status}")
                values: dict[str, Any] = {
                    "lease_expires_at": max(
                        row.lease_expires_at,
                        now + timedelta(seconds=row.timeout_seconds + self.settings.lease_grace),
                    )
                }
                refs = (row.context or {}).get("secrets") or {}
                if "execution_log" in fields:
                    values["execution_log"] = secrets.mask(
                        fields["execution_log"], refs, self.secret_policy
                    )
                if "max_retries" in fields:
                    values["max_retries"] = fields["max_retries"]
                executing = status is not None and row.status == "leased"
                if executing:
                    values.update(status="executing", started_at=now)
                statement = queries.guarded_update(self.db.dialect, tuple(values), executing)
                changed = await conn.execute(
                    statement,
                    {
                        "row_id": instruction_id,
                        "seen_agent_id": agent.id,
                        "seen_status": row.status,
                        "now": now,
                        "actor": agent.actor,
                        **{f"v_{k}": v for k, v in values.items()},
                    },
                )
                if changed.first() is None:
                    continue
                if executing and self.db.is_sqlite:  # PostgreSQL's statement wrote it
                    entry = audit.entry(
                        agent.organization_id,
                        agent.actor,
                        "instruction.executing",
                        "instruction",
                        instruction_id,
                        {"execution_id": row.execution_id, "attempt": row.attempt},
                        at=now,
                    )
                    await audit.append(conn, [entry])
                break
        return updated

    async def _started(
        self,
        conn: AsyncConnection,
        agent: AgentIdentity,
        params: dict[str, Any],
        log: list[str] | None,
        now: datetime,
    ) -> bool:
        """PostgreSQL: the common report, "started" (with a log), in one round trip
        (queries.START). False if it did not apply: the read-then-write path decides."""
        if self.db.is_sqlite:
            return False
        arguments = {
            **params,
            "agent_id": agent.id,
            "now": now,
            "grace": self.settings.lease_grace,
            "actor": agent.actor,
        }
        if log is not None:
            arguments["v_execution_log"] = log
        started = await conn.execute(queries.START[log is not None], arguments)
        return started.first() is not None

    async def result(
        self,
        agent: AgentIdentity,
        instruction_id: str,
        report: dict[str, Any],
        digest: str,
        claim_next: int = 0,
    ) -> list[dict[str, Any]]:
        """Record an agent's result and move its execution on; with `claim_next`, lease the
        agent its next instructions in the same transaction (the piggyback of
        POST .../result?next=1: one commit for both)."""
        status = report["status"]
        if status in COMPLETED:
            final = "completed"
        elif status in FAILED:
            final = "failed"
        else:
            raise InvalidInput(
                f"'{status}' is not a result status",
                [{"path": "status", "message": "expected 'completed' or 'failed'"}],
            )
        now = utcnow()
        payloads: list[dict[str, Any]] = []
        left: Iterable[dict[str, Any]] = ()
        async with self.db.write() as conn:
            done = await self._record(conn, agent, instruction_id, report, digest, final, now)
            if claim_next and agent.admin_state == "active":
                payloads, left = await self._claim(conn, agent, claim_next, now)
        self._wake(done, taken={p["id"] for p in payloads})
        self._claimed(payloads, left)
        return payloads

    async def _record(
        self,
        conn: AsyncConnection,
        agent: AgentIdentity,
        instruction_id: str,
        report: dict[str, Any],
        digest: str,
        final: str,
        now: datetime,
    ) -> list[Progression]:
        # One read for the instruction, its execution and its step; on PostgreSQL it
        # locks the execution, then the instruction: the lock order everywhere. A result
        # that completes its step releases the step's dependents in the same statement.
        params = {"id": instruction_id, "organization_id": agent.organization_id}
        if self.db.is_sqlite:
            query = queries.REPORTED
        elif final == "completed":
            query, params["agent_id"] = queries.REPORTED_RELEASING, agent.id
        else:
            query = queries.REPORTED_LOCKED
        rows = (await conn.execute(query, params)).all()
        row = self._own(next((r for r in rows if not _released(r)), None), agent, instruction_id)
        if row.status in ("completed", "failed") and row.result_digest == digest:
            return []  # the same report again: acknowledged, nothing changes
        if row.status not in ACTIVE_INSTRUCTION:
            raise Conflict(f"instruction '{instruction_id}' is {row.status}")
        refs = (row.context or {}).get("secrets") or {}
        report = secrets.mask(report, refs, self.secret_policy)
        error = None
        if final == "failed":
            # PostgreSQL text cannot hold NUL; an agent's message may.
            error = str(report.get("error_message") or "the plugin failed").replace(
                "\x00", "\ufffd"
            )
        await set_status(
            conn,
            instructions,
            states.INSTRUCTION,
            instruction_id,
            final,
            finished_at=now,
            result=report.get("result"),
            result_digest=digest,
            error_message=error,
            error_details=report.get("error_details"),
            execution_log=report.get("execution_log") or row.execution_log,
            started_at=IfUnset(now),
        )
        execution = queries.part(row, "execution__", executions)
        progression = self._progression(conn, execution, agent.actor, now)
        progression._audit(
            f"instruction.{final}",
            "instruction",
            instruction_id,
            execution_id=row.execution_id,
            attempt=row.attempt,
        )
        step = queries.part(row, "step__", step_runs)
        if step is not None and step["instruction_id"] == row.id and step["status"] == "running":
            if final == "completed":
                # (REPORTED_RELEASING released its dependents on the same conditions)
                released = None
                if query is queries.REPORTED_RELEASING:
                    released = [queries.part(r, "step__", step_runs) for r in rows if _released(r)]
                await progression.step_ended(
                    step,
                    "succeeded",
                    released=released,
                    output=step_output(report),
                    error=None,
                    finished_at=now,
                )
            else:
                cause = TIMEOUT if timed_out(report) else ERROR
                await progression.retry_or_fail(step, row, cause, error or "failed")
        done = [progression]
        await self._settle(conn, done)
        return done

    # -- leases -----------------------------------------------------------------------------

    async def expire_leases(self) -> int:
        """Take back work whose lease ran out: the agent died, or the step overran."""
        now = utcnow()
        count = await self._take_back(
            sa.and_(
                one_of(instructions.c.status, ACTIVE_INSTRUCTION),
                instructions.c.lease_expires_at < now,
            ),
            None,
            now,
        )
        lost = await self.liveness.sweep()
        if lost:
            await self._take_back(
                sa.and_(
                    instructions.c.agent_id.in_(lost),
                    one_of(instructions.c.status, ACTIVE_INSTRUCTION),
                ),
                "agent offline: missed heartbeats",
                utcnow(),
            )
        await self.fail_unroutable()
        await self.enforce_deadlines()
        return count

    async def release_unstarted(self, agent: AgentIdentity) -> int:
        """An agent going offline hands back what it was given but never started."""
        return await self._take_back(
            sa.and_(instructions.c.agent_id == agent.id, one_of(instructions.c.status, ["leased"])),
            "agent went offline before starting it",
            utcnow(),
        )

    async def release_agent(self, agent_id: str, reason: str) -> int:
        """An agent that may no longer report (disabled, revoked): its work goes elsewhere;
        whatever it still sends gets 403."""
        return await self._take_back(
            sa.and_(
                instructions.c.agent_id == agent_id,
                one_of(instructions.c.status, ACTIVE_INSTRUCTION),
            ),
            reason,
            utcnow(),
        )

    async def flush_heartbeats(self) -> int:
        """Write the signs of life heard; work an agent no longer reports running (a poll
        answer lost, a restart) goes back."""
        return await self.release_unreported(await self.heartbeats.flush(self.db))

    async def release_unreported(self, instruction_ids: list[str]) -> int:
        if not instruction_ids:
            return 0
        grace = timedelta(seconds=self.settings.unreported_grace)
        now = utcnow()
        return await self._take_back(
            sa.and_(
                instructions.c.id.in_(instruction_ids),
                one_of(instructions.c.status, ACTIVE_INSTRUCTION),
                instructions.c.leased_at < now - grace,
            ),
            "agent does not report running it",
            now,
        )

    async def _take_back(
        self, condition: Any, reason: str | None, now: datetime, cause: str = AGENT_LOST
    ) -> int:
        """Retire each matching attempt (a late result for it gets 409) and retry the step
        or fail it. Without a reason, the lease ran out: the agent is lost. Agents enforce
        the step's timeout themselves and report its expiry as a result; one that says
        nothing for the timeout and the grace after it has gone silent (an official agent
        killed mid-step sends nothing at all), so the step runs again elsewhere under the
        agent-lost budget, not as a timeout of its own."""
        done: list[Progression] = []
        async with self.db.write() as conn:
            query = (
                sa.select(instructions.c.id, instructions.c.execution_id)
                .where(condition)
                .order_by(instructions.c.lease_expires_at)
                .limit(200)
            )
            expired = (await conn.execute(query)).all()
            for candidate in expired:
                # Lock order everywhere: the execution, then its instructions.
                execution = (
                    await self._lock_execution(conn, candidate.execution_id)
                    if candidate.execution_id
                    else None
                )
                recheck = sa.select(instructions).where(
                    instructions.c.id == candidate.id, condition
                )
                row = (await conn.execute(self.db.for_update(recheck))).first()
                if row is None:
                    continue  # reported or taken back meanwhile
                if reason is None:
                    message = (
                        "agent lost: it went silent while running the step (no result "
                        f"within its {row.timeout_seconds}s timeout and "
                        f"{self.settings.lease_grace}s of grace)"
                        if row.status == "executing"
                        else "agent lost: the instruction was never started"
                    )
                else:
                    message = reason if cause == UNROUTABLE else f"agent lost: {reason}"
                await set_status(
                    conn,
                    instructions,
                    states.INSTRUCTION,
                    row.id,
                    "expired",
                    finished_at=now,
                    error_message=message,
                )
                log.warning(
                    "instruction taken back",
                    instruction_id=row.id,
                    execution_id=row.execution_id,
                    agent_id=row.agent_id,
                    attempt=row.attempt,
                    reason=message,
                )
                if execution is None:
                    continue
                progression = self._progression(conn, execution, "system", now)
                progression._audit(
                    "instruction.expired",
                    "instruction",
                    row.id,
                    agent_id=row.agent_id,
                    attempt=row.attempt,
                    reason=message,
                )
                step = await load_step(conn, row.step_run_id)
                if (
                    execution["status"] == "running"
                    and step["instruction_id"] == row.id
                    and step["status"] in ("queued", "running")
                ):
                    await progression.retry_or_fail(step, row, cause, message)
                done.append(progression)
            await self._settle(conn, done)
        self._wake(done)
        return len(expired)

    async def fail_unroutable(self) -> int:
        """Steps queued longer than `unroutable_after` with no eligible agent at all fail."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.settings.unroutable_after)
        async with self.db.read() as conn:
            waiting = (
                await conn.execute(
                    sa.select(
                        instructions.c.id,
                        instructions.c.organization_id,
                        instructions.c.agent_type,
                        instructions.c.selector,
                        instructions.c.plugin_id,
                        instructions.c.plugin_configuration,
                    )
                    .where(QUEUED, instructions.c.created_at < cutoff)
                    .limit(100)
                )
            ).all()
            if not waiting:
                return 0
            fleet = await conn.execute(
                sa.select(*IDENTITY_COLUMNS).where(
                    agents.c.admin_state == "active",
                    agents.c.revoked_at.is_(None),
                    agents.c.status != "offline",
                )
            )
            identities = [identity_of(row) for row in fleet]
            reasons = await self.installs.stranded(
                conn,
                waiting,
                identities,
                now,
                f"no eligible agent for {int(self.settings.unroutable_after)}s",
            )
        count = 0
        for reason, ids in reasons.items():
            count += await self._take_back(
                sa.and_(instructions.c.id.in_(ids), instructions.c.status == "queued"),
                reason,
                now,
                cause=UNROUTABLE,
            )
        return count

    async def enforce_deadlines(self) -> int:
        """Fail executions that ran past their whole-execution timeout."""
        now = utcnow()
        done: list[Progression] = []
        async with self.db.write() as conn:
            overdue = (
                (
                    await conn.execute(
                        sa.select(executions.c.id)
                        .where(executions.c.status == "running", executions.c.deadline_at < now)
                        .limit(100)
                    )
                )
                .scalars()
                .all()
            )
            for execution_id in overdue:
                execution = await self._lock_execution(conn, execution_id)
                if execution["status"] != "running":
                    continue
                progression = self._progression(conn, execution, "system", now)
                timeout = (execution["deadline_at"] - execution["created_at"]).total_seconds()
                await progression.finish("failed", f"execution timed out after {timeout:g}s")
                done.append(progression)
            await self._settle(conn, done)
        self._wake(done)
        return len(done)

    # -- operators --------------------------------------------------------------------------

    async def cancel(self, organization_id: str, execution_id: str, actor: str) -> None:
        now = utcnow()
        async with self.db.write() as conn:
            execution = await self._lock_execution(conn, execution_id, organization_id)
            if execution["status"] not in ("running", "queued"):
                raise Conflict(f"execution '{execution_id}' is {execution['status']}")
            progression = self._progression(conn, execution, actor, now)
            await progression.finish("cancelled", f"cancelled by {actor}")
            done = [progression]
            await self._settle(conn, done)
        self._wake(done)

    async def rerun(self, organization_id: str, execution_id: str, actor: str) -> None:
        """Run a failed or cancelled execution again from where it stopped: succeeded
        steps keep their results, the others run again (their attempts go on counting)."""
        now = utcnow()
        async with self.db.write() as conn:
            execution = await self._lock_execution(conn, execution_id, organization_id)
            if execution["status"] not in ("failed", "cancelled"):
                raise Conflict(
                    f"execution '{execution_id}' is {execution['status']}: only failed or "
                    "cancelled executions can be rerun"
                )
            steps = await load_steps(conn, execution_id)
            with_items = {s["parent_id"] for s in steps if s["parent_id"]}
            for step in steps:
                if step["status"] in ("succeeded", "pending"):
                    continue
                resumed = "running" if step["id"] in with_items else "pending"
                await set_status(
                    conn,
                    step_runs,
                    states.STEP,
                    step["id"],
                    resumed,
                    error=None,
                    finished_at=None,
                    next_attempt_at=None,
                )
                step.update(status=resumed, error=None)
            deadline = None
            if execution["deadline_at"] is not None:
                deadline = now + (execution["deadline_at"] - execution["created_at"])
            await set_status(
                conn,
                executions,
                states.EXECUTION,
                execution_id,
                "running",
                error=None,
                finished_at=None,
                reruns=execution["reruns"] + 1,
                deadline_at=deadline,
            )
            execution.update(status="running", reruns=execution["reruns"] + 1)
            progression = self._progression(conn, execution, actor, now)
            progression._audit(
                "execution.rerun", "execution", execution_id, rerun=execution["reruns"]
            )
            await progression.resume()
            done = [progression]
            await self._settle(conn, done)
        self._wake(done)

    # -- reading ----------------------------------------------------------------------------

    async def get_execution(
        self, conn: AsyncConnection, organization_id: str, execution_id: str
    ) -> dict[str, Any]:
        row = (
            (
                await conn.execute(
                    sa.select(executions).where(
                        executions.c.id == execution_id,
                        executions.c.organization_id == organization_id,
                    )
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise NotFound(f"no execution '{execution_id}'")
        steps = await load_steps(conn, execution_id)
        names = {s["id"]: s["name"] for s in steps}
        return {**execution_view(row), "steps": [step_view(s, names) for s in steps]}

    async def list_executions(
        self,
        conn: AsyncConnection,
        organization_id: str,
        *,
        workflow: str | None,
        status: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        query = (
            sa.select(executions)
            .where(executions.c.organization_id == organization_id)
            .order_by(executions.c.id.desc())
            .limit(limit)
        )
        if workflow:
            query = query.where(executions.c.workflow_name == workflow)
        if status:
            query = query.where(executions.c.status == status)
        return [execution_view(r) for r in (await conn.execute(query)).mappings()]

    async def logs(
        self, conn: AsyncConnection, organization_id: str, execution_id: str
    ) -> list[dict[str, Any]]:
        """Every attempt of every step, in order, with what its agent logged."""
        await self.get_execution(conn, organization_id, execution_id)  # 404 if not ours
        rows = await conn.execute(
            sa.select(
                step_runs.c.name,
                instructions.c.id,
                instructions.c.attempt,
                instructions.c.status,
                instructions.c.agent_id,
                instructions.c.started_at,
                instructions.c.finished_at,
                instructions.c.error_message,
                instructions.c.execution_log,
            )
            .join(step_runs, step_runs.c.id == instructions.c.step_run_id)
            .where(instructions.c.execution_id == execution_id)
            .order_by(instructions.c.id)
        )
        return [
            {
                "step": r.name,
                "instruction_id": r.id,
                "attempt": r.attempt,
                "status": r.status,
                "agent_id": r.agent_id,
                "started_at": isoformat(r.started_at),
                "finished_at": isoformat(r.finished_at),
                "error": r.error_message,
                "log": r.execution_log or [],
            }
            for r in rows
        ]
