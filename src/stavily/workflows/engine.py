"""Executions: starting runs, handing instructions to agents, advancing on their reports.

Every transition below happens in one write transaction together with the audit
records that describe it, so a crash at any point leaves a consistent state that
the next start simply continues from.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.config import Settings
from stavily.errors import Conflict, Forbidden, InvalidInput, NotFound
from stavily.fleet.agents import ACTIVE_INSTRUCTION, AgentIdentity, eligible
from stavily.ids import new_id
from stavily.store.db import Database
from stavily.store.models import agents, executions, instructions, step_runs
from stavily.store.signals import WorkSignal
from stavily.timeutil import isoformat, utcnow
from stavily.workflows import service
from stavily.workflows.definition import WorkflowDefinition, plan

ACTIVE_STEP = ("queued", "running")
FINAL_STEP = ("succeeded", "failed", "skipped", "cancelled")
COMPLETED = {"completed", "success", "succeeded"}
FAILED = {"failed", "failure", "error", "timeout", "timed_out"}
PROGRESS_STATUSES = {"executing", "running", "in_progress", "started"}
UNREPORTED_GRACE = timedelta(seconds=15)


def step_output(report: dict[str, Any]) -> Any:
    """What a step produced: official agents wrap it in `execution_result.output_data`;
    our agent may send the plugin's output as `result` itself."""
    result = report.get("result")
    if isinstance(result, dict):
        wrapped = result.get("execution_result")
        if isinstance(wrapped, dict) and "output_data" in wrapped:
            return wrapped["output_data"]
    return result


def instruction_payload(row: Any) -> dict[str, Any]:
    """An instruction as AGENT_API.md fixes it, plus fields old agents ignore."""
    return {
        "id": row.id,
        "plugin_id": row.plugin_id,
        "instruction_type": row.instruction_type,
        "plugin_configuration": row.plugin_configuration,
        "input_data": row.input_data,
        "timeout_seconds": int(row.timeout_seconds),
        "max_retries": int(row.max_retries),
        "correlation_id": row.correlation_id,
        "attempt": int(row.attempt),
        "context": row.context,
    }


class Engine:
    def __init__(self, db: Database, settings: Settings, signal: WorkSignal) -> None:
        self.db = db
        self.settings = settings
        self.signal = signal

    # -- starting ---------------------------------------------------------------------------

    async def start(
        self,
        organization_id: str,
        workflow_name: str,
        inputs: dict[str, Any],
        actor: str,
        trigger: dict[str, Any],
    ) -> str:
        async with self.db.write() as conn:
            workflow = await service.get(conn, organization_id, workflow_name)
            definition = WorkflowDefinition.model_validate(workflow["definition"])
            now = utcnow()
            execution = {
                "id": new_id("exe"),
                "organization_id": organization_id,
                "workflow_id": workflow["id"],
                "workflow_version_id": workflow["version_id"],
                "workflow_name": workflow["name"],
                "workflow_version": workflow["version"],
                "status": "running",
                "inputs": inputs,
                "trigger": trigger,
                "created_by": actor,
                "created_at": now,
            }
            await conn.execute(executions.insert().values(**execution))
            steps = [
                {
                    "id": new_id("stp"),
                    "organization_id": organization_id,
                    "execution_id": execution["id"],
                    "status": "pending",
                    "attempts": 0,
                    **step,
                }
                for step in plan(definition)
            ]
            await conn.execute(step_runs.insert(), steps)
            entries = [
                audit.entry(
                    organization_id,
                    actor,
                    "execution.started",
                    "execution",
                    execution["id"],
                    {
                        "workflow": workflow["name"],
                        "version": workflow["version"],
                        "trigger": trigger.get("type"),
                    },
                    at=now,
                )
            ]
            entries += await self._advance(conn, execution, steps, actor, now)
            await audit.append(conn, entries)
        self.signal.notify()
        return str(execution["id"])

    # -- agents take work -------------------------------------------------------------------

    async def claim(self, agent: AgentIdentity, slots: int) -> list[dict[str, Any]]:
        now = utcnow()
        async with self.db.write() as conn:
            active = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(instructions)
                .where(
                    instructions.c.agent_id == agent.id,
                    instructions.c.status.in_(ACTIVE_INSTRUCTION),
                )
            )
            free = min(slots, agent.capacity - int(active or 0))
            if free <= 0:
                return []
            candidates_query = (
                sa.select(
                    instructions.c.id,
                    instructions.c.selector,
                    instructions.c.timeout_seconds,
                    instructions.c.step_run_id,
                    instructions.c.execution_id,
                )
                .where(
                    instructions.c.status == "queued",
                    instructions.c.organization_id == agent.organization_id,
                    instructions.c.agent_type == agent.type,
                    sa.or_(
                        instructions.c.target_agent_name.is_(None),
                        instructions.c.target_agent_name == agent.name,
                    ),
                )
                .order_by(instructions.c.id)
                .limit(max(32, free * 4))
            )
            candidates = (
                await conn.execute(self.db.for_update(candidates_query, skip_locked=True))
            ).all()
            chosen = [c for c in candidates if eligible(agent, c.selector)][:free]
            payloads, entries = [], []
            for candidate in chosen:
                lease = now + timedelta(
                    seconds=candidate.timeout_seconds + self.settings.lease_grace
                )
                row = (
                    await conn.execute(
                        instructions.update()
                        .where(instructions.c.id == candidate.id)
                        .values(
                            status="leased",
                            agent_id=agent.id,
                            leased_at=now,
                            lease_expires_at=lease,
                        )
                        .returning(*instructions.c)
                    )
                ).first()
                assert row is not None
                if candidate.step_run_id:
                    await conn.execute(
                        step_runs.update()
                        .where(step_runs.c.id == candidate.step_run_id)
                        .values(
                            status="running",
                            agent_id=agent.id,
                            started_at=sa.func.coalesce(step_runs.c.started_at, now),
                        )
                    )
                payloads.append(instruction_payload(row))
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
        return payloads

    async def poll(
        self,
        agent: AgentIdentity,
        slots: int,
        wait: float,
        wanted: Callable[[], bool] = lambda: True,
    ) -> list[dict[str, Any]]:
        """Claim now, or hold the poll open until work is queued or `wait` runs out.

        `wanted` is asked before every claim: a poll whose client hung up, or whose agent
        has since said it is going offline, must not lease work nobody will read.
        """
        loop_deadline = utcnow() + timedelta(seconds=wait)
        while wanted():
            event = self.signal.current()
            claimed = await self.claim(agent, slots)
            remaining = (loop_deadline - utcnow()).total_seconds()
            if claimed or remaining <= 0:
                return claimed
            if not await self.signal.wait(event, remaining):
                return []
        return []

    async def _owned(self, conn: AsyncConnection, agent: AgentIdentity, instruction_id: str) -> Any:
        query = sa.select(instructions).where(
            instructions.c.id == instruction_id,
            instructions.c.organization_id == agent.organization_id,
        )
        row = (await conn.execute(self.db.for_update(query))).first()
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
        async with self.db.write() as conn:
            row = await self._owned(conn, agent, instruction_id)
            if row.status not in ACTIVE_INSTRUCTION:
                raise Conflict(f"instruction '{instruction_id}' is {row.status}")
            values: dict[str, Any] = {
                "lease_expires_at": max(
                    row.lease_expires_at,
                    now + timedelta(seconds=row.timeout_seconds + self.settings.lease_grace),
                )
            }
            if "execution_log" in fields:
                values["execution_log"] = fields["execution_log"]
            if "max_retries" in fields:
                values["max_retries"] = fields["max_retries"]
            if status is not None and row.status == "leased":
                values.update(status="executing", started_at=now)
                await audit.append(
                    conn,
                    [
                        audit.entry(
                            agent.organization_id,
                            agent.actor,
                            "instruction.executing",
                            "instruction",
                            instruction_id,
                            {"execution_id": row.execution_id, "attempt": row.attempt},
                            at=now,
                        )
                    ],
                )
            await conn.execute(
                instructions.update().where(instructions.c.id == instruction_id).values(**values)
            )
        return [key for key in ("status", "execution_log", "max_retries") if key in fields]

    async def result(
        self, agent: AgentIdentity, instruction_id: str, report: dict[str, Any], digest: str
    ) -> None:
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
        queued = False
        async with self.db.write() as conn:
            row = await self._owned(conn, agent, instruction_id)
            if row.status in ("completed", "failed") and row.result_digest == digest:
                return  # the same report again: acknowledged, nothing changes
            if row.status not in ACTIVE_INSTRUCTION:
                raise Conflict(f"instruction '{instruction_id}' is {row.status}")
            error = None
            if final == "failed":
                error = str(report.get("error_message") or "the plugin failed")
            await conn.execute(
                instructions.update()
                .where(instructions.c.id == instruction_id)
                .values(
                    status=final,
                    finished_at=now,
                    result=report.get("result"),
                    result_digest=digest,
                    error_message=error,
                    error_details=report.get("error_details"),
                    execution_log=report.get("execution_log", row.execution_log),
                    started_at=sa.func.coalesce(instructions.c.started_at, now),
                )
            )
            entries = [
                audit.entry(
                    agent.organization_id,
                    agent.actor,
                    f"instruction.{final}",
                    "instruction",
                    instruction_id,
                    {"execution_id": row.execution_id, "attempt": row.attempt},
                    at=now,
                )
            ]
            if row.step_run_id:
                step_status = "succeeded" if final == "completed" else "failed"
                await conn.execute(
                    step_runs.update()
                    .where(step_runs.c.id == row.step_run_id)
                    .values(
                        status=step_status, output=step_output(report), error=error, finished_at=now
                    )
                )
                entries += await self._advance_execution(conn, row.execution_id, agent.actor, now)
                queued = any(e["action"] == "step.queued" for e in entries)
            await audit.append(conn, entries)
        if queued:
            self.signal.notify()

    # -- advancing --------------------------------------------------------------------------

    async def _advance_execution(
        self, conn: AsyncConnection, execution_id: str, actor: str, now: datetime
    ) -> list[dict[str, Any]]:
        execution = (
            (await conn.execute(sa.select(executions).where(executions.c.id == execution_id)))
            .mappings()
            .one()
        )
        steps = (
            (
                await conn.execute(
                    sa.select(step_runs)
                    .where(step_runs.c.execution_id == execution_id)
                    .order_by(step_runs.c.position)
                )
            )
            .mappings()
            .all()
        )
        return await self._advance(conn, execution, [dict(s) for s in steps], actor, now)

    async def _advance(
        self,
        conn: AsyncConnection,
        execution: Any,
        steps: list[dict[str, Any]],
        actor: str,
        now: datetime,
    ) -> list[dict[str, Any]]:
        """Queue what became ready, or end the execution; returns the audit entries."""
        if execution["status"] != "running":
            return []
        org = execution["organization_id"]
        status = {s["name"]: s["status"] for s in steps}
        blocking = [
            s for s in steps if s["status"] == "failed" and s["spec"]["on_failure"] != "continue"
        ]
        if blocking:
            failed = blocking[0]
            return await self._finish(
                conn,
                execution,
                steps,
                "failed",
                f"step '{failed['name']}' failed: {failed['error']}",
                actor,
                now,
            )

        def done(name: str) -> bool:
            return status[name] in ("succeeded", "failed")  # failed here means on_failure=continue

        entries: list[dict[str, Any]] = []
        new_instructions: list[dict[str, Any]] = []
        for step in steps:
            if step["status"] != "pending":
                continue
            if any(status[d] in ("skipped", "cancelled") for d in step["depends_on"]):
                step["status"] = status[step["name"]] = "skipped"
                await conn.execute(
                    step_runs.update()
                    .where(step_runs.c.id == step["id"])
                    .values(status="skipped", finished_at=now)
                )
            elif all(done(d) for d in step["depends_on"]):
                instruction = self._instruction_for(execution, step, now)
                new_instructions.append(instruction)
                step["status"] = status[step["name"]] = "queued"
                step["attempts"] += 1
                await conn.execute(
                    step_runs.update()
                    .where(step_runs.c.id == step["id"])
                    .values(
                        status="queued", attempts=step["attempts"], instruction_id=instruction["id"]
                    )
                )
                entries.append(
                    audit.entry(
                        org,
                        actor,
                        "step.queued",
                        "step_run",
                        step["id"],
                        {
                            "execution_id": execution["id"],
                            "step": step["name"],
                            "instruction_id": instruction["id"],
                            "attempt": step["attempts"],
                        },
                        at=now,
                    )
                )
        if new_instructions:
            await conn.execute(instructions.insert(), new_instructions)
        if all(s["status"] in FINAL_STEP for s in steps):
            entries += await self._finish(conn, execution, steps, "succeeded", None, actor, now)
        return entries

    def _instruction_for(
        self, execution: Any, step: dict[str, Any], now: datetime
    ) -> dict[str, Any]:
        spec = step["spec"]
        attempt = step["attempts"] + 1
        configuration = dict(spec["config"])
        if spec.get("plugin_version"):
            configuration.setdefault("plugin_version", spec["plugin_version"])
        return {
            "id": new_id("ins"),
            "organization_id": execution["organization_id"],
            "execution_id": execution["id"],
            "step_run_id": step["id"],
            "attempt": attempt,
            "status": "queued",
            "agent_type": spec["agent_type"],
            "target_agent_name": spec["selector"].get("single_agent"),
            "selector": spec["selector"],
            "plugin_id": spec["plugin_id"],
            "instruction_type": "execute",
            "plugin_configuration": configuration,
            # Official agents hand the plugin only input_data, so the step's config goes there.
            "input_data": dict(spec["config"]),
            "context": {
                "execution_id": execution["id"],
                "workflow": execution["workflow_name"],
                "step": step["name"],
                "attempt": attempt,
                "inputs": execution["inputs"],
            },
            "timeout_seconds": spec["timeout_seconds"],
            "max_retries": spec["max_retries"],
            "correlation_id": f"{execution['id']}/{step['name']}",
            "created_at": now,
        }

    async def _finish(
        self,
        conn: AsyncConnection,
        execution: Any,
        steps: list[dict[str, Any]],
        final: str,
        error: str | None,
        actor: str,
        now: datetime,
    ) -> list[dict[str, Any]]:
        org, execution_id = execution["organization_id"], execution["id"]
        if final != "succeeded":
            # Nothing else of this run may start, and late reports of running work get 409.
            await conn.execute(
                instructions.update()
                .where(
                    instructions.c.execution_id == execution_id,
                    instructions.c.status.in_(("queued", *ACTIVE_INSTRUCTION)),
                )
                .values(status="cancelled", finished_at=now)
            )
            await conn.execute(
                step_runs.update()
                .where(
                    step_runs.c.execution_id == execution_id, step_runs.c.status.in_(ACTIVE_STEP)
                )
                .values(status="cancelled", finished_at=now)
            )
            await conn.execute(
                step_runs.update()
                .where(step_runs.c.execution_id == execution_id, step_runs.c.status == "pending")
                .values(status="skipped", finished_at=now)
            )
        await conn.execute(
            executions.update()
            .where(executions.c.id == execution_id)
            .values(status=final, error=error, finished_at=now)
        )
        return [
            audit.entry(
                org,
                actor,
                f"execution.{final}",
                "execution",
                execution_id,
                {"error": error} if error else {},
                at=now,
            )
        ]

    # -- leases -----------------------------------------------------------------------------

    async def expire_leases(self) -> int:
        """Re-queue work whose lease ran out (the agent died or went silent), or fail it."""
        now = utcnow()
        return await self._take_back(
            sa.and_(
                instructions.c.status.in_(ACTIVE_INSTRUCTION),
                instructions.c.lease_expires_at < now,
            ),
            "lease expired",
            now,
        )

    async def release_unstarted(self, agent: AgentIdentity) -> int:
        """An agent going offline hands back what it was given but never started."""
        return await self._take_back(
            sa.and_(instructions.c.agent_id == agent.id, instructions.c.status == "leased"),
            "agent went offline before starting it",
            utcnow(),
        )

    async def release_unreported(self, agent: AgentIdentity, running: list[str]) -> int:
        """An agent that lists what it runs hands back the rest: work leased to it that it
        never received (a poll answer lost, a restart). Only leases older than
        UNREPORTED_GRACE count, so an answer still on its way is not taken back."""
        now = utcnow()
        unreported = sa.and_(
            instructions.c.agent_id == agent.id,
            instructions.c.status.in_(ACTIVE_INSTRUCTION),
            instructions.c.id.not_in(running),
            instructions.c.leased_at < now - UNREPORTED_GRACE,
        )
        async with self.db.read() as conn:  # the common answer, "none", costs no write
            if not await conn.scalar(sa.select(instructions.c.id).where(unreported).limit(1)):
                return 0
        return await self._take_back(unreported, "agent does not report running it", now)

    async def _take_back(self, condition: Any, reason: str, now: datetime) -> int:
        async with self.db.write() as conn:
            query = (
                sa.select(instructions)
                .where(condition)
                .order_by(instructions.c.lease_expires_at)
                .limit(200)
            )
            expired = (await conn.execute(self.db.for_update(query, skip_locked=True))).all()
            entries: list[dict[str, Any]] = []
            for row in expired:
                await conn.execute(
                    instructions.update()
                    .where(instructions.c.id == row.id)
                    .values(status="expired", finished_at=now, error_message=reason)
                )
                entries.append(
                    audit.entry(
                        row.organization_id,
                        "system",
                        "instruction.expired",
                        "instruction",
                        row.id,
                        {"agent_id": row.agent_id, "attempt": row.attempt, "reason": reason},
                        at=now,
                    )
                )
                if row.step_run_id:
                    entries += await self._step_lost(conn, row, now)
            await audit.append(conn, entries)
            await self._mark_silent_agents_offline(conn, now)
        if any(e["action"] == "step.queued" for e in entries):
            self.signal.notify()
        return len(expired)

    async def _step_lost(
        self, conn: AsyncConnection, row: Any, now: datetime
    ) -> list[dict[str, Any]]:
        step = (
            (await conn.execute(sa.select(step_runs).where(step_runs.c.id == row.step_run_id)))
            .mappings()
            .one()
        )
        if step["instruction_id"] != row.id or step["status"] not in ACTIVE_STEP:
            return []
        if step["attempts"] < self.settings.max_agent_lost_attempts:
            await conn.execute(
                step_runs.update()
                .where(step_runs.c.id == step["id"])
                .values(status="pending", agent_id=None)
            )
        else:
            await conn.execute(
                step_runs.update()
                .where(step_runs.c.id == step["id"])
                .values(
                    status="failed",
                    finished_at=now,
                    error=f"agent lost: no result within the lease, {step['attempts']} attempts",
                )
            )
        return await self._advance_execution(conn, row.execution_id, "system", now)

    async def _mark_silent_agents_offline(self, conn: AsyncConnection, now: datetime) -> None:
        # An agent running a plugin may be silent until its lease ends (official agents
        # send no heartbeats while executing), so only agents with no live lease qualify.
        silent_since = now - timedelta(
            seconds=self.settings.heartbeat_interval * self.settings.offline_after_missed
        )
        live_lease = sa.exists().where(
            instructions.c.agent_id == agents.c.id,
            instructions.c.status.in_(ACTIVE_INSTRUCTION),
        )
        await conn.execute(
            agents.update()
            .where(
                agents.c.status == "online",
                agents.c.last_heartbeat_at < silent_since,
                ~live_lease,
            )
            .values(status="offline")
        )

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
        steps = (
            (
                await conn.execute(
                    sa.select(step_runs)
                    .where(step_runs.c.execution_id == execution_id)
                    .order_by(step_runs.c.position)
                )
            )
            .mappings()
            .all()
        )
        return {**execution_view(row), "steps": [step_view(s) for s in steps]}

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


def execution_view(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "workflow": row["workflow_name"],
        "workflow_version": row["workflow_version"],
        "status": row["status"],
        "inputs": row["inputs"],
        "trigger": row["trigger"],
        "error": row["error"],
        "created_by": row["created_by"],
        "created_at": isoformat(row["created_at"]),
        "finished_at": isoformat(row["finished_at"]),
    }


def step_view(row: Any) -> dict[str, Any]:
    spec = row["spec"]
    plugin = spec["plugin_id"] + (f"-v{spec['plugin_version']}" if spec["plugin_version"] else "")
    return {
        "name": row["name"],
        "stage": row["stage"],
        "plugin": plugin,
        "depends_on": row["depends_on"],
        "status": row["status"],
        "attempts": row["attempts"],
        "agent_id": row["agent_id"],
        "instruction_id": row["instruction_id"],
        "result": row["output"],
        "error": row["error"],
        "started_at": isoformat(row["started_at"]),
        "finished_at": isoformat(row["finished_at"]),
    }


__all__ = ["Engine", "instruction_payload", "step_output"]
