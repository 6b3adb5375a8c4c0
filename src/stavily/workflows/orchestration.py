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

import os
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.errors import StavilyError
from stavily.ids import new_id
from stavily.store.models import executions, instructions, step_runs
from stavily.workflows import states
from stavily.workflows.templating import TemplateProblem, render

ACTIVE_INSTRUCTION = ("leased", "executing")
SECRET_MARK = "\u2063secret:{}\u2063"
# Where a step's failure came from, for `error_handling.retry_on`.
ERROR, TIMEOUT, AGENT_LOST = "error", "timeout", "agent_lost"


class IllegalTransition(StavilyError):
    status = 500
    code = "illegal_transition"


async def set_status(
    conn: AsyncConnection,
    table: sa.Table,
    rules: dict[str, frozenset[str]],
    row_id: str,
    new: str,
    **values: Any,
) -> None:
    """The one way a status is written: only from a state that may lead to `new`."""
    result = await conn.execute(
        table.update()
        .where(table.c.id == row_id, table.c.status.in_(states.allowed_from(rules, new)))
        .values(status=new, **values)
    )
    if result.rowcount != 1:
        raise IllegalTransition(f"{table.name} {row_id} cannot become {new}")


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


def _walk_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_strings(item)


def _replace_strings(value: Any, replace: Any) -> Any:
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, dict):
        return {k: _replace_strings(v, replace) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, replace) for v in value]
    return value


def secret_values(refs: dict[str, Any]) -> dict[str, str]:
    """Resolve secret references at the moment they are needed; values are never stored."""
    values = {}
    for name, ref in refs.items():
        if ref.get("env") and ref["env"] in os.environ:
            values[name] = os.environ[ref["env"]]
    return values


def reveal_secrets(value: Any, refs: dict[str, Any]) -> Any:
    """Put secret values into what is handed to an agent, in place of their marks."""
    if not refs:
        return value
    resolved = secret_values(refs)

    def replace(text: str) -> str:
        for name, secret in resolved.items():
            text = text.replace(SECRET_MARK.format(name), secret)
        return text

    return _replace_strings(value, replace)


def mask_secrets(value: Any, refs: dict[str, Any]) -> Any:
    """Hide secret values in what an agent reports before it is stored."""
    if not refs:
        return value
    resolved = [v for v in secret_values(refs).values() if v]

    def replace(text: str) -> str:
        for secret in resolved:
            text = text.replace(secret, "***")
        return text

    return _replace_strings(value, replace)


class Progression:
    """Advances one execution inside the caller's transaction."""

    def __init__(
        self,
        conn: AsyncConnection,
        execution: dict[str, Any],
        actor: str,
        now: datetime,
        agent_lost_budget: int,
    ) -> None:
        self.conn = conn
        self.execution = execution
        self.actor = actor
        self.now = now
        self.agent_lost_budget = agent_lost_budget
        self.entries: list[dict[str, Any]] = []
        self.new_instructions: list[dict[str, Any]] = []
        self.wake_after: list[float] = []  # delays of retries queued for later

    @property
    def queued_work(self) -> bool:
        return bool(self.new_instructions)

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
        if new in ("succeeded", "failed", "skipped", "cancelled"):
            self._audit(
                f"step.{new}",
                "step_run",
                step["id"],
                execution_id=self.execution["id"],
                step=step["name"],
                **({"error": values["error"]} if values.get("error") else {}),
            )

    # -- the context a step's templates see --------------------------------------------------

    def context(self, steps: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
        execution = self.execution
        return {
            "inputs": execution["inputs"],
            "variables": execution.get("variables") or {},
            "trigger": execution["trigger"],
            "execution": {
                "id": execution["id"],
                "workflow": execution["workflow_name"],
                "version": execution["workflow_version"],
            },
            "steps": {
                s["name"]: {
                    "status": s["status"],
                    "result": s.get("output"),
                    "error": s.get("error"),
                    "attempts": s["attempts"],
                }
                for s in steps
                if s["parent_id"] is None
            },
            "secrets": {name: SECRET_MARK.format(name) for name in spec.get("secrets") or {}},
            "item": spec.get("item"),
        }

    # -- advancing -----------------------------------------------------------------------------

    async def advance(self, steps: list[dict[str, Any]]) -> None:
        if self.execution["status"] != "running":
            return
        top = [s for s in steps if s["parent_id"] is None]
        by_name = {s["name"]: s for s in top}
        children: dict[str, list[dict[str, Any]]] = {}
        for s in steps:
            if s["parent_id"] is not None:
                children.setdefault(s["parent_id"], []).append(s)
        changed = True
        while changed:
            changed = await self._close_fan_outs(top, children)
            failing = self._failing(top)
            if failing:
                changed |= await self._wind_down(top)
            for step in top:
                if step["status"] != "pending":
                    continue
                if not all(by_name[d]["status"] in states.FINAL_STEP for d in step["depends_on"]):
                    continue
                await self._ready(step, steps, children, failing)
                changed = True
            changed |= await self._feed_fan_outs(top, steps, children)
        if all(s["status"] in states.FINAL_STEP for s in top):
            failed = self._failing(top)
            await self.finish(
                "failed" if failed else "succeeded",
                f"step '{failed['name']}' failed: {failed['error']}" if failed else None,
            )

    @staticmethod
    def _failing(top: list[dict[str, Any]]) -> dict[str, Any] | None:
        for s in top:
            if (
                s["stage"] == "actions"
                and s["status"] == "failed"
                and s["spec"]["on_failure"] != "continue"
            ):
                return s
        return None

    async def _wind_down(self, top: list[dict[str, Any]]) -> bool:
        """An action failed: nothing more of the actions runs."""
        changed = False
        for s in top:
            if s["stage"] != "actions":
                continue
            if s["status"] in ("queued", "running"):
                await self._cancel_step(s)
                changed = True
            elif s["status"] == "pending":
                await self._step(s, "skipped", finished_at=self.now)
                changed = True
        return changed

    async def _cancel_step(self, step: dict[str, Any]) -> None:
        await self.conn.execute(
            instructions.update()
            .where(
                instructions.c.step_run_id == step["id"],
                instructions.c.status.in_(("queued", *ACTIVE_INSTRUCTION)),
            )
            .values(status="cancelled", finished_at=self.now)
        )
        await self._step(step, "cancelled", finished_at=self.now)

    async def _ready(
        self,
        step: dict[str, Any],
        steps: list[dict[str, Any]],
        children: dict[str, list[dict[str, Any]]],
        failing: dict[str, Any] | None,
    ) -> None:
        spec = step["spec"]
        if step["stage"] == "actions" and failing:
            await self._step(step, "skipped", finished_at=self.now)
            return
        if step["stage"] == "outputs":
            outcome = "failure" if failing else "success"
            if spec.get("run_on", "success") not in ("always", outcome):
                await self._step(step, "skipped", finished_at=self.now)
                return
        context = self.context(steps, spec)
        try:
            if spec.get("when") and not render(spec["when"], context):
                await self._step(step, "skipped", finished_at=self.now)
                return
            if spec.get("for_each") is not None:
                items = render(spec["for_each"], context)
                if not isinstance(items, list):
                    raise TemplateProblem(
                        f"for_each must give a list, it gave {type(items).__name__}"
                    )
                await self._fan_out(step, items, steps, children)
                return
            await self.queue(step, context)
        except TemplateProblem as exc:
            await self._step(step, "failed", error=str(exc), finished_at=self.now)

    async def _fan_out(
        self,
        step: dict[str, Any],
        items: list[Any],
        steps: list[dict[str, Any]],
        children: dict[str, list[dict[str, Any]]],
    ) -> None:
        if not items:
            await self._step(
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
                "spec": {**spec, "item": item},
                "status": "pending",
                "attempts": 0,
                "parent_id": step["id"],
                "item_index": i,
                "agent_id": None,
                "instruction_id": None,
                "output": None,
                "error": None,
                "started_at": None,
                "finished_at": None,
                "next_attempt_at": None,
            }
            for i, item in enumerate(items)
        ]
        await self.conn.execute(step_runs.insert(), kids)
        steps.extend(kids)
        children[step["id"]] = kids
        await self._step(step, "running", started_at=self.now)

    async def _feed_fan_outs(
        self,
        top: list[dict[str, Any]],
        steps: list[dict[str, Any]],
        children: dict[str, list[dict[str, Any]]],
    ) -> bool:
        changed = False
        for parent in top:
            if parent["status"] != "running" or parent["id"] not in children:
                continue
            kids = children[parent["id"]]
            busy = sum(1 for k in kids if k["status"] in ("queued", "running"))
            for kid in kids:
                if busy >= parent["spec"].get("parallel", 1):
                    break
                if kid["status"] == "pending":
                    try:
                        await self.queue(kid, self.context(steps, kid["spec"]))
                    except TemplateProblem as exc:
                        await self._step(kid, "failed", error=str(exc), finished_at=self.now)
                    busy += 1
                    changed = True
        return changed

    async def _close_fan_outs(
        self, top: list[dict[str, Any]], children: dict[str, list[dict[str, Any]]]
    ) -> bool:
        changed = False
        for parent in top:
            kids = children.get(parent["id"])
            if parent["status"] != "running" or not kids:
                continue
            if not all(k["status"] in states.FINAL_STEP for k in kids):
                continue
            failed = [k for k in kids if k["status"] != "succeeded"]
            ordered = sorted(kids, key=lambda k: k["item_index"])
            if failed:
                first = min(failed, key=lambda k: k["item_index"])
                await self._step(
                    parent,
                    "failed",
                    finished_at=self.now,
                    output=[k.get("output") for k in ordered],
                    error=f"{len(failed)} of {len(kids)} items failed; "
                    f"{first['name']}: {first.get('error') or first['status']}",
                )
            else:
                await self._step(
                    parent,
                    "succeeded",
                    finished_at=self.now,
                    output=[k.get("output") for k in ordered],
                )
            changed = True
        return changed

    # -- queueing ------------------------------------------------------------------------------

    async def queue(self, step: dict[str, Any], context: dict[str, Any]) -> None:
        """Render the step's configuration and queue its first instruction."""
        refs = step["spec"].get("secrets") or {}
        config = render(step["spec"]["config"], context)
        self._check_secrets(config, refs)
        await self._queue_attempt(step, config, refs, delay=0.0)

    def _check_secrets(self, config: Any, refs: dict[str, Any]) -> None:
        used = {
            name
            for name in refs
            for text in _walk_strings(config)
            if SECRET_MARK.format(name) in text
        }
        for name in sorted(used):
            ref = refs[name]
            if ref.get("env"):
                if ref["env"] not in os.environ:
                    raise TemplateProblem(
                        f"secret '{name}' is not available: environment variable "
                        f"{ref['env']} is not set on the orchestrator"
                    )
            else:
                raise TemplateProblem(
                    f"secret '{name}' has no source this orchestrator can read (use env)"
                )

    async def _queue_attempt(
        self, step: dict[str, Any], config: Any, refs: dict[str, Any], delay: float
    ) -> None:
        spec = step["spec"]
        attempt = step["attempts"] + 1
        available_at = self.now + timedelta(seconds=delay) if delay > 0 else None
        configuration = dict(config) if isinstance(config, dict) else {"config": config}
        if spec.get("plugin_version"):
            configuration.setdefault("plugin_version", spec["plugin_version"])
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
            # Official agents hand the plugin only input_data, so the config goes there too.
            "input_data": config if isinstance(config, dict) else {"config": config},
            "context": {
                "execution_id": self.execution["id"],
                "workflow": self.execution["workflow_name"],
                "step": step["name"],
                "attempt": attempt,
                "inputs": self.execution["inputs"],
                **({"item": spec["item"]} if "item" in spec else {}),
                **({"secrets": refs} if refs else {}),
            },
            "timeout_seconds": spec["timeout_seconds"],
            "max_retries": spec["max_retries"],
            "correlation_id": f"{self.execution['id']}/{step['name']}",
            "created_at": self.now,
            "available_at": available_at,
        }
        self.new_instructions.append(instruction)
        await self.conn.execute(instructions.insert().values(**instruction))
        await self._step(
            step,
            "queued",
            attempts=attempt,
            instruction_id=instruction["id"],
            agent_id=None,
            next_attempt_at=available_at,
        )
        if delay > 0:
            self.wake_after.append(delay)
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

    async def retry_or_fail(
        self, step: dict[str, Any], previous: Any, cause: str, error: str
    ) -> None:
        """A failed attempt: queue the next one after its backoff, or fail the step."""
        spec = step["spec"]
        if may_retry(spec, step["attempts"], cause, self.agent_lost_budget):
            delay = retry_delay(spec.get("retry") or {}, step["attempts"])
            step["error"] = error
            await self.conn.execute(
                step_runs.update().where(step_runs.c.id == step["id"]).values(error=error)
            )
            refs = (previous.context or {}).get("secrets", {})
            await self._queue_attempt(step, previous.input_data, refs, delay)
            return
        await self._step(step, "failed", error=error, finished_at=self.now)

    # -- ending --------------------------------------------------------------------------------

    async def finish(self, final: str, error: str | None) -> None:
        execution_id = self.execution["id"]
        if final != "succeeded":
            # Nothing else of this run may start, and late reports of running work get 409.
            await self.conn.execute(
                instructions.update()
                .where(
                    instructions.c.execution_id == execution_id,
                    instructions.c.status.in_(("queued", *ACTIVE_INSTRUCTION)),
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
