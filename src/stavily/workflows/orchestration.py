"""Moving an execution forward: which steps become ready, are skipped, fan out, retry,
and when the execution ends. Every write is guarded by the rules in `states`.

The rules, in the order they are applied each time something changes:
- A failed action step whose `on_failure` is `fail` (or `stop`) makes the execution
  fail: running and queued actions are cancelled, pending actions skipped.
- A step is ready when every step it depends on is final. A dependency that was
  skipped or failed with `on_failure: continue` counts as done: the dependent decides
  with its own `when` (it can read `steps.x.status`). Skips do not propagate on their own.
- Outputs wait for every action, then run if their `run_on` matches how the actions
  went (`success`, the default; `failure`; `always`).
- A ready step whose `when` is false is skipped. A template error fails the step.
- A `for_each` step becomes one item run per element, at most `parallel` at once; it
  succeeds with the list of item results when every item succeeded.
- When every step is final the execution succeeds, or fails if an action failed.
"""

from __future__ import annotations

import random
from collections import deque
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import StavilyError
from stavily.fleet.routing import Router
from stavily.ids import new_id
from stavily.plugins import instructions as plugin_instructions
from stavily.security import secrets
from stavily.security.secrets import SecretPolicy, SecretUnavailable
from stavily.store.db import write_later
from stavily.store.models import ACTIVE_INSTRUCTION, executions, instructions, one_of, step_runs
from stavily.store.prebuilt import prebuilt
from stavily.workflows import queries, states
from stavily.workflows.templating import RenderLimits, TemplateProblem, render_limited

log = structlog.get_logger("stavily.engine")
# Where a step's failure came from, for `error_handling.retry_on`.
ERROR, TIMEOUT, AGENT_LOST = "error", "timeout", "agent_lost"
UNROUTABLE = "unroutable"  # no eligible agent ever came: never retried


class IllegalTransition(StavilyError):
    status = 500
    code = "illegal_transition"


class IfUnset:
    """A value that `set_status` writes only where the column has none yet."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_STATUS_UPDATES: dict[tuple[Any, ...], sa.Update] = {}


def _status_update(
    table: sa.Table, allowed: tuple[str, ...], new: str, columns: tuple[tuple[str, bool], ...]
) -> sa.Update:
    """Built once per shape and reused: building a statement costs more than running it."""
    key = (table.name, allowed, new, columns)
    statement = _STATUS_UPDATES.get(key)
    if statement is None:
        values: dict[str, Any] = {"status": sa.literal(new)}
        for name, if_unset in columns:
            value = queries.param(table.c[name], f"v_{name}")
            values[name] = sa.func.coalesce(table.c[name], value) if if_unset else value
        statement = _STATUS_UPDATES[key] = prebuilt(
            table.update()
            .where(
                table.c.id == queries.param(table.c.id, "row_id"),
                one_of(table.c.status, allowed),
            )
            .values(values)
        )
    return statement


async def set_status(
    conn: AsyncConnection,
    table: sa.Table,
    rules: dict[str, frozenset[str]],
    row_id: str,
    new: str,
    **values: Any,
) -> None:
    """The one way a status is written: only from a state that may lead to `new`. On
    PostgreSQL the write may wait for the transaction's next statement (db.write_later):
    a transition that is not allowed then fails the transaction there."""
    columns = tuple((name, isinstance(value, IfUnset)) for name, value in values.items())
    statement = _status_update(table, states.allowed_from(rules, new), new, columns)
    params = {
        f"v_{name}": value.value if isinstance(value, IfUnset) else value
        for name, value in values.items()
    }
    failure = IllegalTransition(f"{table.name} {row_id} cannot become {new}")
    await write_later(conn, statement, {"row_id": row_id, **params}, 1, failure)


def retry_delay(policy: dict[str, Any], attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: fixed or exponential, capped, maybe jittered."""
    delay = float(policy.get("delay") or 0)
    if policy.get("backoff") == "exponential":
        delay *= 2 ** (attempt - 1)
    if policy.get("max_delay") is not None:
        delay = min(delay, float(policy["max_delay"]))
    if policy.get("jitter"):
        delay *= random.uniform(0.5, 1.0)
    return delay


def may_retry(spec: dict[str, Any], attempts: int, cause: str, agent_lost_budget: int) -> bool:
    policy = spec.get("retry") or {"max_retries": spec.get("max_retries", 0)}
    allowed = 1 + int(policy.get("max_retries", 0))
    if cause == AGENT_LOST:
        # Losing an agent is the fleet's fault, not the step's: it gets its own budget.
        allowed = max(allowed, agent_lost_budget)
    retry_on = policy.get("retry_on", [ERROR, TIMEOUT, AGENT_LOST])
    return cause in retry_on and attempts < allowed


class Progression:
    """Advances one execution inside the caller's transaction, one event at a time.

    Nothing here reloads the whole execution: each step row counts how many of its
    dependencies are still open (`waiting`) and names its `dependents`; the execution
    counts its open steps. A step ending decrements its dependents' counters, and those
    reaching zero are ready. So a report costs work in proportion to the steps it
    touches, not to the size of the workflow.
    """

    def __init__(
        self,
        conn: AsyncConnection,
        execution: dict[str, Any],
        actor: str,
        now: datetime,
        agent_lost_budget: int,
        router: Router | None = None,
        waiting: set[str] | None = None,
        secret_policy: SecretPolicy | None = None,
        render_limits: RenderLimits | None = None,
    ) -> None:
        self.secret_policy = secret_policy or SecretPolicy()
        self.render_limits = render_limits or RenderLimits()
        self.router = router
        self.waiting = waiting or set()
        self.conn = conn
        self.execution = execution
        self.actor = actor
        self.now = now
        self.agent_lost_budget = agent_lost_budget
        self.entries: list[dict[str, Any]] = []
        self.new_instructions: list[dict[str, Any]] = []
        self._ready: deque[dict[str, Any]] = deque()
        self._ended: set[str] = set()  # steps that reached a final state in this transaction
        self._counters_dirty = False

    def _audit(self, action: str, subject_type: str, subject_id: str, **details: Any) -> None:
        self.entries.append(
            audit.entry(
                self.execution["organization_id"],
                self.actor,
                action,
                subject_type,
                subject_id,
                details,
                at=self.now,
            )
        )

    async def _step(self, step: dict[str, Any], new: str, **values: Any) -> None:
        await set_status(self.conn, step_runs, states.STEP, step["id"], new, **values)
        step["status"] = new
        step.update(values)
        if new in states.FINAL_STEP:
            self._audit(
                f"step.{new}",
                "step_run",
                step["id"],
                execution_id=self.execution["id"],
                step=step["name"],
                **({"error": values["error"]} if values.get("error") else {}),
            )

    # -- entry points --------------------------------------------------------------------------

    async def begin(self, steps: list[dict[str, Any]]) -> None:
        """A new (or promoted) execution: queue every step that waits on nothing."""
        if self.execution["status"] != "running":
            return
        self._ready.extend(
            s
            for s in steps
            if s["parent_id"] is None and s["waiting"] == 0 and s["status"] == "pending"
        )
        await self._drain()

    async def step_ended(
        self,
        step: dict[str, Any],
        new: str,
        released: list[dict[str, Any]] | None = None,
        **values: Any,
    ) -> None:
        """A step (or a fan-out item) reached a final state: move everything it unblocks.
        `released`: its dependents, already released by the caller (see _final)."""
        await self._final(step, new, released, **values)
        await self._drain()

    async def retry_or_fail(
        self, step: dict[str, Any], previous: Any, cause: str, error: str
    ) -> None:
        """A failed attempt: queue the next one after its backoff, or fail the step."""
        spec = step["spec"]
        where = {"execution_id": self.execution["id"], "step": step["name"]}
        if may_retry(spec, step["attempts"], cause, self.agent_lost_budget):
            delay = retry_delay(spec.get("retry") or {}, step["attempts"])
            log.info("step retried", **where, attempt=step["attempts"], cause=cause, error=error)
            step["error"] = error
            await self.conn.execute(
                step_runs.update().where(step_runs.c.id == step["id"]).values(error=error)
            )
            context = previous.context or {}
            await self._queue_attempt(
                step,
                (previous.context or {}).get("config", previous.input_data),
                context.get("secrets") or {},
                context.get("secret_nonce") or "",
                delay,
            )
            return
        log.warning("step failed", **where, attempts=step["attempts"], cause=cause, error=error)
        await self.step_ended(step, "failed", error=error, finished_at=self.now)

    async def resume(self) -> None:
        """A rerun: recount what every step waits on, then continue from there."""
        steps = await load_steps(self.conn, self.execution["id"])
        top = [s for s in steps if s["parent_id"] is None]
        final = {s["name"] for s in top if s["status"] in states.FINAL_STEP}
        for step in top:
            if step["status"] == "running":  # a fan-out resuming its items
                waiting = sum(
                    1 for k in steps if k["parent_id"] == step["id"] and k["status"] != "succeeded"
                )
            else:
                waiting = sum(1 for d in step["depends_on"] if d not in final)
            if waiting != step["waiting"]:
                step["waiting"] = waiting
                await self.conn.execute(
                    step_runs.update().where(step_runs.c.id == step["id"]).values(waiting=waiting)
                )
        self.execution["open_steps"] = len(top) - len(final)
        self.execution["failed_step"] = None
        self._counters_dirty = True
        for parent in top:
            if parent["status"] == "running":
                await self._feed(parent, parent["spec"].get("parallel", 1))
        await self.begin(top)

    # -- the event loop of one transaction -----------------------------------------------------

    async def _final(
        self,
        step: dict[str, Any],
        new: str,
        released: list[dict[str, Any]] | None = None,
        **values: Any,
    ) -> None:
        if step["parent_id"] is not None or not step.get("dependents"):
            released = []
        elif released is None:
            # Its dependents wait on one step fewer (unless the caller's read did it, as
            # a result's does on PostgreSQL: queries.REPORTED_RELEASING). Done before its
            # own write, which does not change what this returns: on PostgreSQL the two
            # writes to step_runs would otherwise go in two round trips
            # (db.write_later), not one.
            rows = await self.conn.execute(
                queries.RELEASE_DEPENDENTS[self.conn.dialect.name],
                {"b_execution_id": self.execution["id"], "names": step["dependents"]},
            )
            released = [dict(r) for r in rows.mappings()]
        released = [r for r in released if r["waiting"] == 0]
        await self._step(step, new, **values)
        self._ended.add(step["id"])
        if step["parent_id"] is not None:
            await self._item_ended(step)
            return
        self.execution["open_steps"] -= 1
        self._counters_dirty = True
        if (
            new == "failed"
            and step["stage"] == "actions"
            and step["spec"]["on_failure"] != "continue"
            and not self.execution.get("failed_step")
        ):
            self.execution["failed_step"] = step["name"]
            await self._wind_down()
        self._ready.extend(
            sorted((r for r in released if r["status"] == "pending"), key=lambda r: r["position"])
        )
        if self.execution["open_steps"] == 0 and self.execution["status"] == "running":
            failed = self.execution.get("failed_step")
            error = None
            if failed:
                reason = await self.conn.scalar(
                    sa.select(step_runs.c.error).where(
                        step_runs.c.execution_id == self.execution["id"],
                        step_runs.c.name == failed,
                    )
                )
                error = f"step '{failed}' failed: {reason}"
            await self._save_counters()
            await self.finish("failed" if failed else "succeeded", error)

    async def _drain(self) -> None:
        while self._ready and self.execution["status"] == "running":
            step = self._ready.popleft()
            if step["id"] not in self._ended:  # a wind-down may have ended it already
                await self._start_step(step)
        await self._save_counters()

    async def _save_counters(self) -> None:
        if self._counters_dirty:
            await write_later(
                self.conn,
                queries.SAVE_COUNTERS,
                {
                    "row_id": self.execution["id"],
                    "v_open_steps": self.execution["open_steps"],
                    "v_failed_step": self.execution.get("failed_step"),
                },
            )
            self._counters_dirty = False

    async def _wind_down(self) -> None:
        """An action failed: nothing more of the actions runs."""
        rows = await self.conn.execute(
            sa.select(step_runs)
            .where(
                step_runs.c.execution_id == self.execution["id"],
                step_runs.c.stage == "actions",
                step_runs.c.status.in_(("pending", "queued", "running")),
            )
            .order_by(step_runs.c.position, step_runs.c.item_index)
        )
        stopped = [dict(r) for r in rows.mappings()]
        await self.conn.execute(
            instructions.update()
            .where(
                instructions.c.step_run_id.in_([s["id"] for s in stopped]),
                one_of(instructions.c.status, ("queued", *ACTIVE_INSTRUCTION)),
            )
            .values(status="cancelled", finished_at=self.now)
        )
        for step in stopped:  # items first (sorted by position, items after their parent)
            if step["parent_id"] is not None:
                await self._step(step, "cancelled", finished_at=self.now)
        for step in stopped:
            if step["parent_id"] is None:
                new = "skipped" if step["status"] == "pending" else "cancelled"
                await self._final(step, new, finished_at=self.now)

    async def _start_step(self, step: dict[str, Any]) -> None:
        spec = step["spec"]
        if step["stage"] == "actions" and self.execution.get("failed_step"):
            await self._final(step, "skipped", finished_at=self.now)
            return
        if step["stage"] == "outputs":
            outcome = "failure" if self.execution.get("failed_step") else "success"
            if spec.get("run_on", "success") not in ("always", outcome):
                await self._final(step, "skipped", finished_at=self.now)
                return
        try:
            nonce = secrets.new_nonce()
            context = await self.context(spec, nonce)
            if spec.get("when") and not await self._render(spec["when"], context):
                await self._final(step, "skipped", finished_at=self.now)
                return
            if spec.get("for_each") is not None:
                items = await self._render(spec["for_each"], context)
                if not isinstance(items, list):
                    raise TemplateProblem(
                        f"for_each must give a list, it gave {type(items).__name__}"
                    )
                await self._fan_out(step, items)
                return
            await self.queue(step, context, nonce)
        except (TemplateProblem, SecretUnavailable) as exc:
            await self._final(step, "failed", error=str(exc), finished_at=self.now)

    # -- the context a step's templates see ----------------------------------------------------

    async def _render(self, value: Any, context: dict[str, Any]) -> Any:
        return await render_limited(value, context, self.render_limits)

    async def context(self, spec: dict[str, Any], nonce: str) -> dict[str, Any]:
        execution = self.execution
        reads = spec.get("reads")
        steps: dict[str, Any] = {}
        if reads is None or reads:
            query = sa.select(
                step_runs.c.name,
                step_runs.c.status,
                step_runs.c.output,
                step_runs.c.error,
                step_runs.c.attempts,
            ).where(step_runs.c.execution_id == execution["id"], step_runs.c.parent_id.is_(None))
            if reads is not None:  # only what the templates name; None: unknown, all
                query = query.where(step_runs.c.name.in_(reads))
            steps = {
                r.name: {
                    "status": r.status,
                    "result": r.output,
                    "error": r.error,
                    "attempts": r.attempts,
                }
                for r in await self.conn.execute(query)
            }
        return {
            "inputs": execution["inputs"],
            "variables": execution.get("variables") or {},
            "trigger": execution["trigger"],
            "execution": {
                "id": execution["id"],
                "workflow": execution["workflow_name"],
                "version": execution["workflow_version"],
            },
            "steps": steps,
            "secrets": secrets.marks(nonce, spec.get("secrets") or {}),
            "item": spec.get("item"),
        }

    # -- fan-out -------------------------------------------------------------------------------

    async def _fan_out(self, step: dict[str, Any], items: list[Any]) -> None:
        if not items:
            await self._final(
                step, "succeeded", output=[], started_at=self.now, finished_at=self.now
            )
            return
        spec = {**step["spec"], "for_each": None, "when": None}
        kids = [
            {
                "id": new_id("stp"),
                "organization_id": step["organization_id"],
                "execution_id": step["execution_id"],
                "stage": step["stage"],
                "name": f"{step['name']}[{i}]",
                "position": step["position"],
                "depends_on": [],
                "dependents": [],
                "waiting": 0,
                "spec": {**spec, "item": item},
                "status": "pending",
                "attempts": 0,
                "parent_id": step["id"],
                "item_index": i,
            }
            for i, item in enumerate(items)
        ]
        await self.conn.execute(step_runs.insert(), kids)
        # The parent waits on its items.
        await self._step(step, "running", started_at=self.now, waiting=len(kids))
        await self._feed(step, spec.get("parallel", 1))

    async def _feed(self, parent: dict[str, Any], slots: int) -> None:
        """Queue up to `slots` more pending items of a fan-out, in item order."""
        busy = await self.conn.scalar(
            sa.select(sa.func.count())
            .select_from(step_runs)
            .where(
                step_runs.c.parent_id == parent["id"],
                step_runs.c.status.in_(("queued", "running")),
            )
        )
        free = min(slots, parent["spec"].get("parallel", 1) - int(busy or 0))
        while free > 0:
            row = (
                (
                    await self.conn.execute(
                        sa.select(step_runs)
                        .where(
                            step_runs.c.parent_id == parent["id"], step_runs.c.status == "pending"
                        )
                        .order_by(step_runs.c.item_index)
                        .limit(1)
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                break
            kid = dict(row)
            try:
                nonce = secrets.new_nonce()
                await self.queue(kid, await self.context(kid["spec"], nonce), nonce)
                free -= 1
            except (TemplateProblem, SecretUnavailable) as exc:
                await self._step(kid, "failed", error=str(exc), finished_at=self.now)
                parent = await self._count_down(kid)
        if parent["waiting"] == 0:
            await self._close_fan_out(parent)

    async def _count_down(self, kid: dict[str, Any]) -> dict[str, Any]:
        row = (
            (
                await self.conn.execute(
                    step_runs.update()
                    .where(step_runs.c.id == kid["parent_id"])
                    .values(waiting=step_runs.c.waiting - 1)
                    .returning(*step_runs.c)
                )
            )
            .mappings()
            .one()
        )
        return dict(row)

    async def _item_ended(self, kid: dict[str, Any]) -> None:
        parent = await self._count_down(kid)
        if parent["status"] != "running":
            return  # the fan-out is being cancelled
        if parent["waiting"] > 0:
            await self._feed(parent, 1)
        else:
            await self._close_fan_out(parent)

    async def _close_fan_out(self, parent: dict[str, Any]) -> None:
        """Every item ended: the step succeeds with their results, or fails."""
        rows = await self.conn.execute(
            sa.select(step_runs.c.name, step_runs.c.status, step_runs.c.output, step_runs.c.error)
            .where(step_runs.c.parent_id == parent["id"])
            .order_by(step_runs.c.item_index)
        )
        kids = rows.all()
        outputs = [k.output for k in kids]
        failed = [k for k in kids if k.status != "succeeded"]
        if failed:
            first = failed[0]
            await self._final(
                parent,
                "failed",
                finished_at=self.now,
                output=outputs,
                error=f"{len(failed)} of {len(kids)} items failed; "
                f"{first.name}: {first.error or first.status}",
            )
        else:
            await self._final(parent, "succeeded", finished_at=self.now, output=outputs)

    # -- queueing ------------------------------------------------------------------------------

    async def queue(self, step: dict[str, Any], context: dict[str, Any], nonce: str) -> None:
        """Render the step's configuration and queue its first instruction."""
        refs = step["spec"].get("secrets") or {}
        config = await self._render(step["spec"]["config"], context)
        refs, read = await secrets.resolve(
            self.conn, config, nonce, refs, self.secret_policy, self.execution["organization_id"]
        )
        for name, secret_id in read.items():
            self._audit(
                "secret.read",
                "secret",
                secret_id,
                name=name,
                execution_id=self.execution["id"],
                step=step["name"],
            )
        secrets.check_rendered(config, nonce, refs, self.secret_policy)
        await self._queue_attempt(step, config, refs, nonce, delay=0.0)

    async def _queue_attempt(
        self, step: dict[str, Any], config: Any, refs: dict[str, Any], nonce: str, delay: float
    ) -> None:
        spec = step["spec"]
        attempt = step["attempts"] + 1
        available_at = self.now + timedelta(seconds=delay) if delay > 0 else None
        configuration, input_data = plugin_instructions.build(spec, config)
        instruction = {
            "id": new_id("ins"),
            "organization_id": self.execution["organization_id"],
            "execution_id": self.execution["id"],
            "step_run_id": step["id"],
            "attempt": attempt,
            "status": "queued",
            "agent_type": spec["agent_type"],
            "target_agent_name": spec["selector"].get("single_agent"),
            "selector": spec["selector"],
            "plugin_id": spec["plugin_id"],
            "instruction_type": "execute",
            "plugin_configuration": configuration,
            "input_data": input_data,
            "context": {
                "execution_id": self.execution["id"],
                "workflow": self.execution["workflow_name"],
                "step": step["name"],
                "attempt": attempt,
                "inputs": self.execution["inputs"],
                **({"item": spec["item"]} if "item" in spec else {}),
                # a flags plugin's config, for its retries (never shown to the agent)
                **({"config": config} if input_data is not config else {}),
                **(
                    {
                        "secrets": refs,
                        "secret_nonce": nonce,
                        "secret_environment": secrets.environment_names(config, nonce, refs),
                    }
                    if refs
                    else {}
                ),
            },
            "timeout_seconds": spec["timeout_seconds"],
            "max_retries": spec["max_retries"],
            "correlation_id": f"{self.execution['id']}/{step['name']}",
            "created_at": self.now,
            "available_at": available_at,
        }
        if self.router is not None:
            preference = await self.router.choose(
                self.conn,
                self.execution["organization_id"],
                spec["agent_type"],
                spec["selector"],
                self.execution["id"],
                self.now,
                self.waiting,
                (spec["plugin_id"], spec["plugin"]["sha256"]) if spec.get("plugin") else None,
            )
            if preference is not None:
                instruction.update(
                    preferred_agent_id=preference.agent_id,
                    prefer_until=preference.until + timedelta(seconds=delay),
                )
        self.new_instructions.append(instruction)
        await write_later(self.conn, queries.INSERT_INSTRUCTION, instruction)
        await self._step(
            step,
            "queued",
            attempts=attempt,
            instruction_id=instruction["id"],
            agent_id=None,
            next_attempt_at=available_at,
        )
        self._audit(
            "step.queued",
            "step_run",
            step["id"],
            execution_id=self.execution["id"],
            step=step["name"],
            instruction_id=instruction["id"],
            attempt=attempt,
            **({"delay_seconds": round(delay, 3)} if delay else {}),
        )

    # -- ending --------------------------------------------------------------------------------

    async def finish(self, final: str, error: str | None) -> None:
        execution_id = self.execution["id"]
        if final != "succeeded":
            # Nothing else of this run may start, and late reports of running work get 409.
            await self.conn.execute(
                instructions.update()
                .where(
                    instructions.c.execution_id == execution_id,
                    one_of(instructions.c.status, ("queued", *ACTIVE_INSTRUCTION)),
                )
                .values(status="cancelled", finished_at=self.now)
            )
            await self.conn.execute(
                step_runs.update()
                .where(
                    step_runs.c.execution_id == execution_id,
                    step_runs.c.status.in_(("queued", "running")),
                )
                .values(status="cancelled", finished_at=self.now)
            )
            await self.conn.execute(
                step_runs.update()
                .where(step_runs.c.execution_id == execution_id, step_runs.c.status == "pending")
                .values(
                    status=("cancelled" if final == "cancelled" else "skipped"),
                    finished_at=self.now,
                )
            )
        await set_status(
            self.conn,
            executions,
            states.EXECUTION,
            execution_id,
            final,
            error=error,
            finished_at=self.now,
        )
        self.execution["status"] = final
        if final != "succeeded":
            (log.warning if final == "failed" else log.info)(
                f"execution {final}",
                execution_id=execution_id,
                workflow=self.execution.get("workflow_name"),
                error=error,
            )
        self._audit(
            f"execution.{final}", "execution", execution_id, **({"error": error} if error else {})
        )


async def load_steps(conn: AsyncConnection, execution_id: str) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(step_runs)
        .where(step_runs.c.execution_id == execution_id)
        .order_by(step_runs.c.position, step_runs.c.item_index)
    )
    return [dict(r) for r in rows.mappings()]


async def load_step(conn: AsyncConnection, step_id: str) -> dict[str, Any]:
    row = (await conn.execute(queries.STEP, {"id": step_id})).mappings()
    return dict(row.one())
