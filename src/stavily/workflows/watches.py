"""The triggers stage, run. A workflow's trigger steps are watches: plugins the sensor
agents its agent selection picks keep running (handed out in their heartbeat answers,
`watch`), and each event a watch reports is stored once (its idempotency key) and starts
the workflow, the event readable in its templates as `trigger.*` (docs/triggers.md)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError

from stavily.errors import Conflict, InvalidInput, NotFound
from stavily.fleet.agents import AgentIdentity, eligible
from stavily.ids import new_id
from stavily.plugins import instructions as plugin_instructions
from stavily.store.db import Database
from stavily.store.models import events
from stavily.timeutil import isoformat, utcnow
from stavily.workflows import service
from stavily.workflows.definition import WorkflowDefinition, watches
from stavily.workflows.templating import TemplateProblem, has_templates, render_limited

log = structlog.get_logger("stavily.watches")

# how long an organization's watches are reused before they are read again (an apply on
# this server forgets them at once; on another replica they are this stale at most)
WATCHES_TTL = 2.0
DEFAULT_INTERVAL = 60


def _interval(config: Any) -> int:
    """How often a watch looks: its config's `interval` (seconds), as the published
    trigger plugins name it, else a minute."""
    value = config.get("interval") if isinstance(config, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value <= 86400:
        return int(value)
    return DEFAULT_INTERVAL


def watch_id(workflow_id: str, step: str, handout: dict[str, Any]) -> str:
    """Stable while the trigger step is: applying a workflow again with the same step
    changes nothing on the agents, a changed one is a new watch."""
    text = json.dumps([workflow_id, step, handout], sort_keys=True, default=str)
    return "wat_" + hashlib.sha256(text.encode()).hexdigest()[:24]


class Watches:
    """Each organization's watches, read from its workflows' latest versions."""

    def __init__(self, db: Database, engine: Any) -> None:
        self.db = db
        self.engine = engine  # its validated definitions, cached by version (Engine.definition)
        # organization -> (when read, its watches, its `on:` rules)
        self._cache: dict[str, tuple[float, list[dict[str, Any]], list[dict[str, Any]]]] = {}
        self._unreadable: set[str] = set()  # versions that failed to validate, said once

    def forget(self, organization_id: str) -> None:
        """A workflow was applied: read the watches again."""
        self._cache.pop(organization_id, None)

    async def of_organization(self, organization_id: str) -> list[dict[str, Any]]:
        return (await self._read(organization_id))[1]

    async def rules(self, organization_id: str) -> list[dict[str, Any]]:
        """Each workflow's `on:` rules: {workflow, version_id, rule}."""
        return (await self._read(organization_id))[2]

    async def _read(
        self, organization_id: str
    ) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
        cached = self._cache.get(organization_id)
        if cached is not None and time.monotonic() - cached[0] < WATCHES_TTL:
            return cached
        async with self.db.read() as conn:
            rows = await service.list_all(conn, organization_id)
        found: list[dict[str, Any]] = []
        rules: list[dict[str, Any]] = []
        for workflow in rows:
            stored = workflow["definition"]
            if not stored.get("triggers") and not (stored.get("on_") or stored.get("on")):
                continue
            try:
                definition = await self.engine.definition(workflow)
            except Exception:  # one unreadable version must not stop the organization's
                if workflow["version_id"] not in self._unreadable:
                    self._unreadable.add(workflow["version_id"])
                    log.exception("a workflow version cannot be read", workflow=workflow["name"])
                continue
            for spec in watches(definition, workflow["plugins"]):
                watch = await self._watch(workflow, definition, spec)
                if watch is not None:
                    found.append(watch)
            for rule in definition.on_ or []:
                rules.append(
                    {
                        "workflow": workflow["name"],
                        "version_id": workflow["version_id"],
                        "rule": rule,
                    }
                )
        read = (time.monotonic(), found, rules)
        self._cache[organization_id] = read
        return read

    async def _watch(
        self, workflow: dict[str, Any], definition: WorkflowDefinition, spec: dict[str, Any]
    ) -> dict[str, Any] | None:
        config = spec["config"]
        if has_templates(config):
            try:  # a trigger runs before any run: only the workflow's variables exist
                config = await render_limited(config, {"variables": definition.variables or {}})
            except TemplateProblem as problem:
                log.warning(
                    "trigger step not watched",
                    workflow=workflow["name"],
                    step=spec["name"],
                    error=str(problem),
                )
                return None
        configuration, input_data = plugin_instructions.build(spec, config)
        handout = {
            "plugin_id": spec["plugin_id"],
            "instruction_type": "watch",
            "plugin_configuration": configuration,
            "input_data": input_data,
            "interval": _interval(config),
            "context": {"workflow": workflow["name"], "step": spec["name"]},
        }
        identifier = watch_id(workflow["id"], spec["name"], handout)
        return {
            "id": identifier,
            "workflow": workflow["name"],
            "version_id": workflow["version_id"],
            "step": spec["name"],
            "selector": spec["selector"],
            "handout": {"id": identifier, **handout},
        }

    async def for_agent(self, agent: AgentIdentity) -> list[dict[str, Any]]:
        """What a sensor agent keeps running: the watches whose selection picks it."""
        if agent.type != "sensor":
            return []
        return [
            w["handout"]
            for w in await self.of_organization(agent.organization_id)
            if eligible(agent, w["selector"])
        ]


class _Taken(Exception):
    """Another process processed the event first: this one's transaction is undone."""


def _event_view(row: Any) -> dict[str, Any]:
    """An event as the API shows it, from its row (a mapping)."""
    return {
        "id": row["id"],
        "source": row["source"],
        "type": row["type"],
        "payload": row["payload"],
        # a webhook request with no delivery id is told apart by its signature
        "idempotency_key": row["idempotency_key"] or row.get("signature"),
        "agent_id": row["agent_id"],
        "sent_by": row["sent_by"],
        "watch_id": row["watch_id"],
        "workflow": row["workflow_name"],
        "step": row["step"],
        "outcome": row["outcome"],
        "reason": row["reason"],
        "started": row["started"],
        "created_at": isoformat(row["created_at"]),
    }


class Events:
    """Events in: stored once per (source, idempotency key), each starting what it
    matches in the same transaction, so a repeated event never starts a second run."""

    def __init__(self, db: Database, engine: Any, watches: Watches) -> None:
        self.db = db
        self.engine = engine
        self.watches = watches

    async def from_agent(
        self,
        agent: AgentIdentity,
        event_type: str,
        payload: dict[str, Any],
        watch: str | None,
        key: str | None,
    ) -> tuple[dict[str, Any], bool]:
        """A sensor agent's event; (the event, whether it is new). It starts the workflow
        of the watch it names; one naming none (an official sensor agent's) starts every
        workflow whose trigger step runs the plugin its payload's `source` names and
        selects the agent; and every workflow an `on:` rule of which it matches. Its
        idempotency key is scoped to the agent: two hosts' "cpu-high-<time>" are two
        events."""
        scoped = f"{agent.id}:{key}" if key is not None else None
        return await self.receive(
            agent.organization_id, "agent", event_type, payload, scoped, agent.actor, agent, watch
        )

    async def receive(
        self,
        organization_id: str,
        source: str,
        event_type: str,
        payload: dict[str, Any],
        key: str | None,
        sent_by: str,
        agent: AgentIdentity | None = None,
        watch: str | None = None,
        workflow: str | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Any source's event: stored once per (source, key), starting what it matches in
        the same transaction; (the event, whether it is new). `workflow`: the one it is
        for (a webhook's, a schedule's), started with `inputs`, beside what rules match."""
        event_id = new_id("evt")
        trigger = {"type": event_type, "source": source, "event_id": event_id, "payload": payload}
        if agent is not None:
            trigger["agent_id"] = agent.id
        targets = await self._targets(organization_id, trigger, agent, watch, workflow, inputs)
        only = targets[0] if len(targets) == 1 else None
        row: dict[str, Any] = {
            "id": event_id,
            "organization_id": organization_id,
            "source": source,
            "type": event_type,
            "payload": payload,
            "idempotency_key": key,
            "agent_id": agent.id if agent else None,
            "sent_by": sent_by,
            "watch_id": watch or (only.get("id") if only else None),
            "workflow_name": only["workflow"] if only else None,
            "step": only["step"] if only else None,
            "outcome": "unmatched",
            "reason": None if targets else self._unmatched(agent, watch),
            "started": [],
            "created_at": utcnow(),
        }
        done: list[Any] = []
        try:
            async with self.db.write() as conn:
                await conn.execute(events.insert().values(**row))
                if targets:
                    outcome = await self._start(conn, organization_id, sent_by, targets, done)
                    row.update(outcome)
                    await conn.execute(
                        events.update().where(events.c.id == row["id"]).values(**outcome)
                    )
        except IntegrityError:  # the same key again: the first one's
            return await self._existing(organization_id, source, key), False
        self.engine.started(done)
        log.info(
            "event",
            event_id=row["id"],
            source=source,
            type=event_type,
            outcome=row["outcome"],
            started=row["started"],
        )
        return _event_view(row), True

    async def _targets(
        self,
        organization_id: str,
        trigger: dict[str, Any],
        agent: AgentIdentity | None,
        watch: str | None,
        workflow: str | None,
        inputs: dict[str, Any] | None,
    ) -> list[dict[str, Any]]:
        """What the event starts: the workflow it is for (its inputs templates over
        `trigger`), a sensor's watches, and each workflow an `on:` rule of which matches."""
        source, event_type, payload = trigger["source"], trigger["type"], trigger["payload"]
        targets: list[dict[str, Any]] = []
        if workflow is not None:
            targets.append(
                {"workflow": workflow, "version_id": None, "step": None, "inputs": inputs or {}}
            )
        if agent is not None:
            for w in await self._matching(agent, watch, payload.get("source")):
                targets.append({**w, "inputs": {}})
        named = {t["workflow"] for t in targets}
        for entry in await self.watches.rules(organization_id):
            if entry["workflow"] in named or not entry["rule"].matches(source, event_type, payload):
                continue
            named.add(entry["workflow"])
            targets.append({**entry, "step": None, "inputs": entry["rule"].inputs})
        for target in targets:
            target["trigger"] = {**trigger, "step": target["step"]}
            try:
                target["inputs"] = await render_limited(
                    target["inputs"], {"trigger": target["trigger"]}
                )
            except TemplateProblem as problem:
                target["refused"] = f"its inputs: {problem}"
        return targets

    async def process(self, event_id: str, inputs: dict[str, Any] | None = None) -> bool:
        """Start what an accepted event (a webhook's, stored before it was processed)
        matches: its workflow with `inputs` (templates over `trigger`), and the rules'.
        The runs and the event's outcome are written in one transaction, and only while
        the event is still `accepted`: an event two processes take up starts its runs
        once. Whether this call processed it."""
        async with self.db.read() as conn:
            row = (await conn.execute(sa.select(events).where(events.c.id == event_id))).first()
        if row is None or row.outcome != "accepted":
            return False
        trigger = {
            "type": row.type,
            "source": row.source,
            "event_id": row.id,
            "payload": row.payload,
            "sent_by": row.sent_by,
        }
        organization_id = row.organization_id
        targets = await self._targets(
            organization_id, trigger, None, None, row.workflow_name, inputs
        )
        done: list[Any] = []
        try:
            async with self.db.write() as conn:
                outcome = {
                    "outcome": "unmatched",
                    "started": [],
                    "reason": self._unmatched(None, None),
                }
                if targets:
                    outcome = await self._start(conn, organization_id, row.sent_by, targets, done)
                changed = await conn.execute(
                    events.update()
                    .where(events.c.id == row.id, events.c.outcome == "accepted")
                    .values(**outcome)
                )
                if changed.rowcount != 1:
                    raise _Taken
        except _Taken:
            return False
        self.engine.started(done)
        log.info("event", event_id=row.id, source=row.source, type=row.type, **outcome)
        return True

    async def manual(
        self, organization_id: str, workflow: str, inputs: dict[str, Any], actor: str
    ) -> str:
        """A manual run (the CLI's, the API's), recorded as an event with who did it, in
        the run's transaction; the execution's id."""
        event_id = new_id("evt")
        payload = {"inputs": inputs}
        trigger = {
            "type": "manual",
            "source": "manual",
            "event_id": event_id,
            "payload": payload,
            "actor": actor,
            "sent_by": actor,
        }
        async with self.db.write() as conn:
            execution_id, done = await self.engine.start_in(
                conn, organization_id, workflow, inputs, actor, trigger
            )
            await conn.execute(
                events.insert().values(
                    id=event_id,
                    organization_id=organization_id,
                    source="manual",
                    type="manual",
                    payload=payload,
                    sent_by=actor,
                    workflow_name=workflow,
                    outcome="started",
                    started=[execution_id],
                    created_at=utcnow(),
                )
            )
        self.engine.started(done)
        return execution_id

    async def _matching(
        self, agent: AgentIdentity, watch: str | None, source: Any
    ) -> list[dict[str, Any]]:
        if watch is None and not isinstance(source, str):
            return []
        mine = [
            w
            for w in await self.watches.of_organization(agent.organization_id)
            if agent.type == "sensor" and eligible(agent, w["selector"])
        ]
        if watch is not None:
            return [w for w in mine if w["id"] == watch]
        return [w for w in mine if w["handout"]["plugin_id"] == source]

    async def _start(
        self,
        conn: Any,
        organization_id: str,
        actor: str,
        targets: list[dict[str, Any]],
        done: list[Any],
    ) -> dict[str, Any]:
        """A run of each target's workflow, in the event's transaction; the event's
        outcome: started (any run), else refused with the workflows' reasons."""
        started, refusals = [], []
        for target in targets:
            if "refused" in target:
                refusals.append(f"{target['workflow']}: {target['refused']}")
                continue
            try:
                execution_id, progressions = await self.engine.start_in(
                    conn,
                    organization_id,
                    target["workflow"],
                    target["inputs"],
                    actor,
                    target["trigger"],
                    version_id=target["version_id"],
                )
            except (InvalidInput, Conflict, NotFound) as refused:
                details = "; ".join(
                    f"{d.get('path')}: {d.get('message')}" for d in refused.details or []
                )
                refusals.append(
                    f"{target['workflow']}: {refused}" + (f" ({details})" if details else "")
                )
            else:
                started.append(execution_id)
                done.extend(progressions)
        return {
            "outcome": "started" if started else "refused",
            "started": started,
            "reason": "; ".join(refusals) or None,
        }

    @staticmethod
    def _unmatched(agent: AgentIdentity | None, watch: str | None) -> str:
        if watch is not None:
            return (
                f"no current watch '{watch}' for this agent (its workflow was applied again, "
                "or its trigger step no longer selects this agent)"
            )
        if agent is not None:
            return (
                "no watch named, no trigger step runs the plugin its payload's source names "
                "on this agent, and no rule matched: recorded, it started nothing"
            )
        return "no workflow's rule matched: recorded, it started nothing"

    async def _existing(
        self, organization_id: str, source: str, key: str | None, signature: str | None = None
    ) -> dict[str, Any]:
        """The event a new one conflicted with: the same key, or (a webhook's) the same
        signature."""
        same = [events.c.idempotency_key == key] if key is not None else []
        if signature is not None:
            same.append(events.c.signature == signature)
        query = sa.select(events).where(
            events.c.organization_id == organization_id, events.c.source == source, sa.or_(*same)
        )
        async with self.db.read_latest() as conn:  # the first may not be committed yet
            row = (await conn.execute(query)).first()
        if row is None:  # cannot happen: the key conflicted with it
            raise Conflict("the event conflicted with one that is gone")
        return _event_view(row._mapping)

    async def list(
        self,
        organization_id: str,
        source: str | None = None,
        event_type: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        query = sa.select(events).where(events.c.organization_id == organization_id)
        if source is not None:
            query = query.where(events.c.source == source)
        if event_type is not None:
            query = query.where(events.c.type == event_type)
        query = query.order_by(events.c.created_at.desc(), events.c.id.desc()).limit(limit)
        async with self.db.read() as conn:
            return [_event_view(row._mapping) for row in await conn.execute(query)]

    async def get(self, organization_id: str, event_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(events).where(
                        events.c.organization_id == organization_id, events.c.id == event_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound(f"no event '{event_id}'")
        return _event_view(row._mapping)


def idempotency_key(payload: dict[str, Any], given: str | None) -> str | None:
    """An event's key: the one given, else its payload's `id` (a string of 1 to 300
    characters, or an integer); InvalidInput for an `id` that is neither."""
    if given is not None or "id" not in payload:
        return given
    value = payload["id"]
    key = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if not 1 <= len(key) <= 300:
        raise InvalidInput(
            "the payload's id is the event's idempotency key: a string of 1 to 300 "
            "characters (or an integer)",
            [{"path": "payload.id", "message": "expected a string of 1 to 300 characters"}],
        )
    return key
