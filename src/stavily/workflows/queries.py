"""The statements of the engine's hot path, built once with bound parameters.

Building a SQLAlchemy statement and computing its cache key costs more than running it
on SQLite (about 250 against 80 microseconds for a one-row UPDATE, measured): the
statements every step runs are made here once and executed with their parameters.
Membership tests use one bound literal per value rather than an "expanding" parameter,
which would be rendered anew on every execution.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by

from stavily.store import notify
from stavily.store.models import (
    ACTIVE_INSTRUCTION,
    QUEUED,
    agent_plugins,
    agents,
    audit_records,
    executions,
    instructions,
    one_of,
    step_runs,
)
from stavily.store.prebuilt import prebuilt
from stavily.workflows import states


def param(column: sa.Column[Any], name: str | None = None) -> sa.BindParameter[Any]:
    """A parameter of the column's type, named after it (UPDATEs need other names)."""
    return sa.bindparam(name or column.name, type_=column.type)


def values(table: sa.Table, columns: Iterable[str]) -> dict[str, sa.BindParameter[Any]]:
    """SET clauses bound to `v_<column>` parameters."""
    return {name: param(table.c[name], f"v_{name}") for name in columns}


# What a queued instruction's offer to the waiting agents needs (fleet.waiters.may_take,
# the same fields replicas tell each other), and what a claim needs to lease it.
OFFER_COLUMNS = [
    instructions.c[name]
    for name in (*notify.FIELDS, "execution_id", "step_run_id", "timeout_seconds")
]

# The agent as it is now (a long poll may outlive a drain, a disable or a revoke), with
# the number of instructions it holds.
_RUNNING = (
    sa.select(sa.func.count())
    .where(
        instructions.c.agent_id == param(agents.c.id, "agent_id"),
        one_of(instructions.c.status, ACTIVE_INSTRUCTION),
    )
    .scalar_subquery()
)
AGENT_NOW = sa.select(
    agents.c.admin_state,
    agents.c.revoked_at,
    agents.c.capacity,
    _RUNNING.label("running"),
).where(agents.c.id == param(agents.c.id, "agent_id"))

_now = param(instructions.c.created_at, "now")
# An official agent (it cannot fetch from the registry) is offered a step of a pinned
# plugin version only once it has installed that version (plugins.installs hands it
# the install first), and only one it can run (no stdin conversation, no socket); our
# agents install on demand, and take any.
# the sha256 of the pinned version an instruction runs (null: no registry plugin)
PINNED = instructions.c.plugin_configuration["sha256"].as_string()
# what an official agent can run (plugins.instructions.official_can_run): `--input`, or
# flags without the socket
_PROTOCOL = sa.func.coalesce(instructions.c.plugin_configuration["protocol"].as_string(), "input")
OFFICIAL_RUNNABLE = sa.or_(
    _PROTOCOL == "input",
    sa.and_(
        _PROTOCOL == "flags", instructions.c.plugin_configuration["socket"].as_string().is_(None)
    ),
)
_PLUGIN_READY = sa.or_(
    sa.not_(sa.bindparam("official", type_=sa.Boolean)),
    instructions.c.instruction_type != "execute",
    PINNED.is_(None),
    sa.and_(
        OFFICIAL_RUNNABLE,
        sa.exists().where(
            agent_plugins.c.agent_id == param(agents.c.id, "agent_id"),
            agent_plugins.c.plugin_id == instructions.c.plugin_id,
            agent_plugins.c.sha256 == PINNED,
            agent_plugins.c.status == "installed",
        ),
    ),
)
_CANDIDATES = (
    sa.select(*OFFER_COLUMNS)
    .where(
        QUEUED,
        instructions.c.organization_id == param(instructions.c.organization_id),
        instructions.c.agent_type == param(instructions.c.agent_type),
        sa.or_(
            instructions.c.target_agent_name.is_(None),
            instructions.c.target_agent_name == param(agents.c.name, "agent_name"),
        ),
        sa.or_(instructions.c.available_at.is_(None), instructions.c.available_at <= _now),
        sa.or_(
            instructions.c.preferred_agent_id.is_(None),
            instructions.c.preferred_agent_id == param(agents.c.id, "agent_id"),
            instructions.c.prefer_until <= _now,
        ),
        _PLUGIN_READY,
    )
    # The oldest execution first: steps of runs under way go before new runs.
    .order_by(instructions.c.execution_id, instructions.c.id)
)
# The next page, after the last candidate seen (none of them fitted the agent).
_AFTER = sa.tuple_(instructions.c.execution_id, instructions.c.id) > sa.tuple_(
    param(instructions.c.execution_id, "after_execution_id"),
    param(instructions.c.id, "after_id"),
)
_PAGES: dict[tuple[int, bool], sa.Select[Any]] = {}


def candidates(limit: int, after: bool = False) -> sa.Select[Any]:
    """The first `limit` queued instructions an agent may be offered (`after` a page
    already read): a power of two, written into the SQL. With a bound LIMIT, PostgreSQL's
    plan for an unknown limit looked dearer than one made for the value given, so it
    planned the statement anew at every call (more time than it took to run)."""
    if limit & (limit - 1):
        raise ValueError(f"not a power of two: {limit}")
    key = (limit, after)
    page = _PAGES.get(key)
    if page is None:
        page = _CANDIDATES.where(_AFTER) if after else _CANDIDATES
        page = _PAGES[key] = prebuilt(page.limit(sa.literal_column(str(limit), sa.Integer)))
    return page


# A step's instruction is leased only while the step may start running (as set_status
# would allow it): otherwise nothing is written.
_MAY_RUN = one_of(step_runs.c.status, states.allowed_from(states.STEP, "running"))
_STEP_MAY_RUN = sa.or_(
    instructions.c.step_run_id.is_(None),
    sa.exists().where(step_runs.c.id == instructions.c.step_run_id, _MAY_RUN),
)
_MAY_LEASE = one_of(instructions.c.status, states.allowed_from(states.INSTRUCTION, "leased"))

# SQLite: one instruction leased (no row back: it was not free to take).
LEASE = (
    instructions.update()
    .where(instructions.c.id == param(instructions.c.id, "row_id"), _MAY_LEASE, _STEP_MAY_RUN)
    .values(
        status=sa.literal("leased"),
        **values(instructions, ("agent_id", "leased_at", "lease_expires_at")),
    )
    .returning(*instructions.c)
)


def _audit(rows: sa.CTE, action: str) -> sa.CTE:
    """PostgreSQL: an audit record of `action` on each instruction of `rows`, by :actor
    at :now, with the details audit.entry() would be given."""
    columns = ("organization_id", "created_at", "actor", "action", "subject_type", "subject_id")
    return (
        audit_records.insert()
        .from_select(
            [*columns, "details"],
            sa.select(
                rows.c.organization_id,
                param(instructions.c.leased_at, "now"),
                param(audit_records.c.actor),
                sa.literal(action),
                sa.literal("instruction"),
                rows.c.id,
                sa.func.json_build_object(
                    sa.literal("execution_id"),
                    rows.c.execution_id,
                    sa.literal("attempt"),
                    rows.c.attempt,
                    type_=sa.JSON,
                ),
            ),
        )
        .cte(f"audit_{action.replace('.', '_')}")
    )


def _free_slots() -> sa.ScalarSelect[Any]:
    """How many instructions the agent :agent_id may take now, at most :slots (it is read
    here: a long poll may outlive a drain, a disable or a revoke)."""
    return (
        sa.select(
            sa.func.least(sa.bindparam("slots", type_=sa.Integer), agents.c.capacity - _RUNNING)
        )
        .where(
            agents.c.id == param(agents.c.id, "agent_id"),
            agents.c.admin_state == sa.literal("active"),
            agents.c.revoked_at.is_(None),
        )
        .scalar_subquery()
    )


def _lease_end(now: Any) -> Any:
    """PostgreSQL: when a lease taken or extended `now` ends: after the instruction's
    timeout and :grace seconds more."""
    second = sa.literal_column("interval '1 second'", type_=sa.Interval)
    return now + (instructions.c.timeout_seconds + sa.bindparam("grace", type_=sa.Integer)) * second


def _lease(source: Any, order: list[Any]) -> sa.Select[Any]:
    """PostgreSQL: lease the agent :agent_id the instructions of `source` (a FROM
    clause with an `id` column), in `order`, as many as it has room for. Rows another
    claim holds are skipped, not waited for. Each is leased, its step set running (only
    from a state that may lead there, as set_status would) and the lease audited: the
    leased rows (`leased`, all columns), in one statement, so in one round trip and,
    outside a transaction, without BEGIN and COMMIT."""
    agent_id = param(agents.c.id, "agent_id")
    now = param(instructions.c.leased_at, "now")
    locked = (
        sa.select(instructions.c.id)
        .join(source, source.c.id == instructions.c.id)
        .where(_MAY_LEASE, _STEP_MAY_RUN)
        .order_by(*order)
        .limit(sa.func.greatest(sa.func.coalesce(_free_slots(), 0), 0))
        .with_for_update(skip_locked=True, of=instructions)
        .cte("locked")
    )
    leased = (
        instructions.update()
        .where(instructions.c.id == locked.c.id)
        .values(
            status=sa.literal("leased"),
            agent_id=agent_id,
            leased_at=now,
            lease_expires_at=_lease_end(now),
        )
        .returning(*instructions.c)
        .cte("leased")
    )
    started = (
        step_runs.update()
        .where(step_runs.c.id == leased.c.step_run_id, _MAY_RUN)
        .values(
            status=sa.literal("running"),
            agent_id=agent_id,
            started_at=sa.func.coalesce(step_runs.c.started_at, now),
        )
        .cte("started")
    )
    return sa.select(leased).add_cte(started, _audit(leased, "instruction.leased"))


def _take() -> sa.Select[Any]:
    """PostgreSQL: of the candidates `ids` (oldest first, as _fitting chose them), lease
    the agent those it has room for (see _lease). Returns the leased rows."""
    # the candidates in the order given (oldest first), so that the rows are looked up
    # one by one until enough are locked, not all of them before a sort; in a sub-select:
    # a plan made for the values given, counting them, looked cheaper than the one kept
    # for any, so the statement was planned anew at many calls
    ids = sa.select(sa.bindparam("ids", type_=ARRAY(sa.String))).scalar_subquery()
    return _lease(*_in_order(ids))


def _in_order(ids: Any) -> tuple[Any, list[Any]]:
    """An array of ids as a FROM clause with an `id` column, and its order: PostgreSQL
    knows the rows of `unnest(...) WITH ORDINALITY` come in that order, so a lease of
    them needs no sort."""
    given = sa.func.unnest(ids).table_valued("id", with_ordinality="n").render_derived()
    return given, [given.c.n]


# What an agent is handed of an instruction (handout.instruction_payload).
PAYLOAD_COLUMNS = (
    *("id", "plugin_id", "instruction_type", "plugin_configuration", "input_data"),
    *("timeout_seconds", "max_retries", "correlation_id", "attempt", "context"),
)

# Selectors any agent of the type meets (fleet.agents.eligible): no agent named, no
# labels, no pools. Other keys (a routing strategy) do not restrict who may take it.
# Read from the JSON text as written (compact: db.dumps), not a JSONB made of it three
# times a row: an empty value written otherwise ('{ }') only leaves the match to Python.
_OPEN_TO_ANY = sa.literal_column(
    "(coalesce(instructions.selector ->> 'single_agent', '') = ''"
    " AND coalesce(CAST(instructions.selector -> 'labels' AS TEXT), '{}') IN ('{}', 'null')"
    " AND coalesce(CAST(instructions.selector -> 'pools' AS TEXT), '[]') IN ('[]', 'null'))",
    sa.Boolean,
)
_CLAIMS: dict[int, sa.CompoundSelect] = {}


def claim(limit: int) -> sa.CompoundSelect:
    """PostgreSQL: a claim in one round trip, candidates and lease together. Reads the
    first `limit` candidates (as candidates(limit)) and leases, oldest first, those
    before the first whose selector restricts who may take it (only Python can tell
    whether it is this agent: see _OPEN_TO_ANY), as many as the agent has room for (see
    _lease). Returns the leased rows (`taken` true; PAYLOAD_COLUMNS and the offer
    columns) and the page's other candidates (`taken` false; the offer columns and
    `open`) for the caller to offer to other agents, or, if a restricted one stopped the
    lease while the agent had room left, to match and lease itself (TAKE)."""
    statement = _CLAIMS.get(limit)
    if statement is not None:
        return statement
    read = (
        _CANDIDATES.add_columns(_OPEN_TO_ANY.label("open"))
        .limit(sa.literal_column(str(int(limit)), sa.Integer))
        .subquery("read")
    )
    # `clear`: no restricted one up to this row. A running bool_and over the rows as
    # read (in order: no sort), not a look at the rows before each.
    order = (read.c.execution_id, read.c.id)
    clear = sa.func.bool_and(read.c.open).over(order_by=order).label("clear")
    page = sa.select(read, clear).cte("page")
    # The ids before the first restricted one, oldest first, handed to the lease as TAKE
    # hands its own: looked up and locked one by one until the agent has enough, not all
    # of the page looked up, then sorted, then locked.
    prefix = (
        sa.select(
            sa.func.array_agg(
                aggregate_order_by(page.c.id, page.c.execution_id, page.c.id),
                type_=ARRAY(sa.String),
            )
        )
        .where(page.c.clear)
        .scalar_subquery()
    )
    lease = _lease(*_in_order(prefix))
    leased = lease.get_final_froms()[0]
    offered = {c.name for c in OFFER_COLUMNS}
    names = [c.name for c in instructions.c if c.name in offered or c.name in PAYLOAD_COLUMNS]
    taken = lease.with_only_columns(
        *(leased.c[n] for n in names), sa.true().label("taken"), sa.true().label("open")
    )
    others = sa.select(
        *(
            page.c[n] if n in offered else sa.cast(sa.null(), instructions.c[n].type).label(n)
            for n in names
        ),
        sa.false().label("taken"),
        page.c.open,
    ).where(page.c.id.not_in(sa.select(leased.c.id)))
    statement = _CLAIMS[limit] = prebuilt(sa.union_all(taken, others))
    return statement


TAKE = _take()

# What progress and results need of the instruction reported on (not its payload).
OWNED_COLUMNS = [
    instructions.c[name]
    for name in (
        "id",
        "agent_id",
        "status",
        "execution_id",
        "step_run_id",
        "attempt",
        "timeout_seconds",
        "lease_expires_at",
        "result_digest",
        "context",
        "execution_log",
        "input_data",  # a retry's
    )
]
_owned_where = (
    instructions.c.id == param(instructions.c.id),
    instructions.c.organization_id == param(instructions.c.organization_id),
)
OWNED = sa.select(*OWNED_COLUMNS).where(*_owned_where)

# What a result needs, in one round trip: the instruction (as OWNED), its execution and
# its step, their columns named `execution__<name>` and `step__<name>`. On PostgreSQL the
# execution and the instruction are locked, in the order kept everywhere.
REPORTED = (
    sa.select(
        *OWNED_COLUMNS,
        *(c.label(f"execution__{c.name}") for c in executions.c),
        *(c.label(f"step__{c.name}") for c in step_runs.c),
    )
    .select_from(
        instructions.join(executions, executions.c.id == instructions.c.execution_id).outerjoin(
            step_runs, step_runs.c.id == instructions.c.step_run_id
        )
    )
    .where(*_owned_where)
)
REPORTED_LOCKED = REPORTED.with_for_update(of=[executions, instructions])


def _named(execution_id: Any, names: Any, *where: Any, after: Any = None) -> sa.ColumnElement[bool]:
    """PostgreSQL: `step_runs.id = ANY(...)` for the top-level steps of the execution
    named in `names` (a table-valued function, column `value`, FROM `after` if given,
    whose columns it may take) where `where` holds: each looked up by its name, one
    probe of the execution's unique names, then changed by id. Filtering the
    execution's steps by a list of names made PostgreSQL read all of them, at every
    step of a long workflow."""
    step = step_runs.alias("named")
    one = (
        sa.select(step.c.id)
        .where(
            step.c.execution_id == execution_id,
            step.c.name == names.c.value,
            step.c.parent_id.is_(None),
        )
        .scalar_subquery()
        .correlate_except(step)
    )
    froms = (names,) if after is None else (after, names)
    ids = sa.select(one).select_from(*froms).where(*where).scalar_subquery()
    return step_runs.c.id == sa.any_(sa.func.array(ids))


def _reported_releasing() -> sa.CompoundSelect:
    """PostgreSQL: REPORTED_LOCKED for a result that completes its step, and in the same
    statement the step's dependents released (as RELEASE_DEPENDENTS) when the engine
    will end the step: the instruction active and leased to :agent_id, the step running
    on it, not a fan-out item. The reported row comes first (`released` false), then the
    dependents after the release, in its `step__` columns (`released` true).

    The release runs after the locks are taken (the UNION reads the reported row first),
    so in the lock order kept everywhere; and an UPDATE changes the latest version of a
    row, whatever the statement's snapshot: a concurrent release of the same dependents
    that committed while this one waited for the execution is counted."""
    reported = REPORTED_LOCKED.add_columns(sa.false().label("released")).cte("reported")
    names = sa.func.json_array_elements_text(reported.c.step__dependents).table_valued("value")
    release = (
        step_runs.update()
        .where(
            _named(
                reported.c.execution_id,
                names,
                one_of(reported.c.status, ACTIVE_INSTRUCTION),
                reported.c.agent_id == param(agents.c.id, "agent_id"),
                reported.c.step__instruction_id == reported.c.id,
                one_of(reported.c.step__status, ("running",)),
                reported.c.step__parent_id.is_(None),
                after=reported,
            )
        )
        .values(waiting=step_runs.c.waiting - 1)
        .returning(*step_runs.c)
        .cte("release")
    )
    empty = [
        sa.cast(sa.null(), c.type).label(c.name)
        for c in reported.c
        if c.name != "released" and not c.name.startswith("step__")
    ]
    return sa.union_all(
        sa.select(reported),
        sa.select(*empty, *(release.c[c.name] for c in step_runs.c), sa.true()),
    )


REPORTED_RELEASING = _reported_releasing()


def part(row: Any, prefix: str, table: sa.Table) -> dict[str, Any] | None:
    """One table's columns of a REPORTED row, by their own names (None: no such row)."""
    if getattr(row, f"{prefix}id") is None:
        return None
    return {name: getattr(row, prefix + name) for name in table.c.keys()}


EXECUTION = sa.select(executions).where(executions.c.id == param(executions.c.id))
EXECUTION_LOCKED = EXECUTION.with_for_update()

STEP = sa.select(step_runs).where(step_runs.c.id == param(step_runs.c.id))

SAVE_COUNTERS = (
    executions.update()
    .where(executions.c.id == param(executions.c.id, "row_id"))
    .values(values(executions, ("open_steps", "failed_step")))
)

INSERT_INSTRUCTION = instructions.insert()
INSERT_EXECUTION = executions.insert()
INSERT_STEPS = step_runs.insert()


def _release_dependents(names: sa.ColumnElement[bool]) -> sa.Update:
    return (
        step_runs.update()
        .where(
            step_runs.c.execution_id == param(step_runs.c.execution_id, "b_execution_id"),
            step_runs.c.parent_id.is_(None),
            names,
        )
        .values(waiting=step_runs.c.waiting - 1)
        .returning(*step_runs.c)
    )


# A step ended: its dependents wait on one step fewer. PostgreSQL takes the names as one
# array parameter, so the statement stays one prepared statement whatever their number.
RELEASE_DEPENDENTS = {
    "sqlite": _release_dependents(
        step_runs.c.name.in_(sa.bindparam("names", expanding=True, type_=sa.String))
    ),
    "postgresql": _release_dependents(
        _named(
            param(step_runs.c.execution_id, "b_execution_id"),
            sa.func.unnest(sa.bindparam("names", type_=ARRAY(sa.String)))
            .table_valued("value")
            .render_derived(),
        )
    ),
}

for _statement in (
    AGENT_NOW,
    LEASE,
    REPORTED,
    REPORTED_LOCKED,
    REPORTED_RELEASING,
    OWNED,
    EXECUTION,
    EXECUTION_LOCKED,
    STEP,
    SAVE_COUNTERS,
    INSERT_INSTRUCTION,
    INSERT_EXECUTION,
    INSERT_STEPS,
    TAKE,
    *RELEASE_DEPENDENTS.values(),
):
    prebuilt(_statement)

_GUARDED: dict[tuple[str, tuple[str, ...], bool], Any] = {}


def guarded_update(dialect: str, columns: tuple[str, ...], executing: bool) -> Any:
    """Progress's write: `UPDATE instructions SET columns...` only if the row still has
    the agent and status it was read with (:seen_agent_id, :seen_status); a row back if
    it had. On PostgreSQL, when the instruction starts `executing`, its audit record is
    written by the same statement (SQLite cannot: the caller writes it)."""
    key = (dialect, columns, executing)
    statement = _GUARDED.get(key)
    if statement is None:
        updated = (
            instructions.update()
            .where(
                instructions.c.id == param(instructions.c.id, "row_id"),
                instructions.c.agent_id == param(instructions.c.agent_id, "seen_agent_id"),
                instructions.c.status == param(instructions.c.status, "seen_status"),
            )
            .values(values(instructions, columns))
        )
        if dialect == "sqlite":
            statement = updated.returning(instructions.c.id)
        else:
            rows = updated.returning(
                *(instructions.c[n] for n in ("id", "organization_id", "execution_id", "attempt"))
            ).cte("updated")
            statement = sa.select(rows.c.id)
            if executing:
                statement = statement.add_cte(_audit(rows, "instruction.executing"))
        statement = _GUARDED[key] = prebuilt(statement)
    return statement


def _start(log: bool) -> sa.Select[Any]:
    """PostgreSQL: progress's common report, an agent saying it has started what it was
    leased (with a log: :v_execution_log), in one round trip with no read first: the
    instruction goes `executing` only if it is still leased to :agent_id (and, with a log,
    has no secrets its log would need masking of), its lease extended to :now plus its
    timeout and :grace if that is later (as the read-then-write path does), and the start
    audited. No row back: the caller takes that path."""
    now = param(instructions.c.leased_at, "now")
    where = [
        *_owned_where,
        instructions.c.agent_id == param(instructions.c.agent_id),
        one_of(instructions.c.status, ["leased"]),
    ]
    changes: dict[str, Any] = {
        "status": sa.literal("executing"),
        "started_at": now,
        "lease_expires_at": sa.func.greatest(instructions.c.lease_expires_at, _lease_end(now)),
    }
    if log:
        secrets = sa.cast(instructions.c.context.op("->")(sa.literal_column("'secrets'")), sa.Text)
        where.append(
            sa.func.coalesce(secrets, sa.literal_column("'{}'")).in_(
                [sa.literal_column("'{}'"), sa.literal_column("'null'")]
            )
        )
        changes.update(values(instructions, ["execution_log"]))
    rows = (
        instructions.update()
        .where(*where)
        .values(changes)
        .returning(
            *(instructions.c[n] for n in ("id", "organization_id", "execution_id", "attempt"))
        )
        .cte("updated")
    )
    return sa.select(rows.c.id).add_cte(_audit(rows, "instruction.executing"))


START = {log: prebuilt(_start(log)) for log in (False, True)}

_UPDATES: dict[tuple[str, tuple[str, ...]], sa.Update] = {}


def update_by_id(table: sa.Table, columns: Iterable[str]) -> sa.Update:
    """`UPDATE table SET columns... WHERE id = :row_id`, one statement per shape."""
    key = (table.name, tuple(columns))
    statement = _UPDATES.get(key)
    if statement is None:
        statement = _UPDATES[key] = prebuilt(
            table.update()
            .where(table.c.id == sa.bindparam("row_id", type_=table.c.id.type))
            .values(values(table, key[1]))
        )
    return statement
