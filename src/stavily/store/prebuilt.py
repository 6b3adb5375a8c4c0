"""Statements of the hot path, run without SQLAlchemy's per-call machinery.

A statement marked with `prebuilt()` is compiled once (per database, per set of INSERT
columns and per length of each expanding list) by SQLAlchemy itself, which also gives
the type conversions of every parameter and result column. Write transactions then run
it straight on the driver: on SQLite the sqlite3 cursor (about 10 microseconds instead
of 100 for the engine's one-row UPDATEs and SELECTs), on PostgreSQL asyncpg's own
prepared statements inside the transaction SQLAlchemy began (about 100 instead of 250).
Reads, and statements not marked, go through SQLAlchemy as usual: both paths run the
same SQL with the same conversions.

Results offer what the engine uses of SQLAlchemy's: rows with attribute and index
access and `_asdict()`, `first()`, `one()`, `all()`, `scalar()`, `scalars()`,
`mappings()` and `rowcount`. Driver errors come as the driver raises them, not wrapped in
SQLAlchemy's exceptions: mark no statement whose caller catches one (IntegrityError...).

On PostgreSQL, writes whose results nobody reads can also wait and go together, as the
data-modifying WITH clauses of one statement (run_deferred; db.write_later decides when).
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import NoResultFound
from sqlalchemy.sql.util import find_tables

S = TypeVar("S", bound=sa.Executable)

_PREBUILT: set[int] = set()
_POSTCOMPILE = "(__[POSTCOMPILE_{}])"


def prebuilt(statement: S) -> S:
    """Mark a module-level statement (it must live as long as the process) as hot."""
    _PREBUILT.add(id(statement))
    return statement


def is_prebuilt(statement: Any) -> bool:
    return id(statement) in _PREBUILT


def uniform(parameters: Any) -> bool:
    """One compiled form serves a batch only if every row names the same columns."""
    if not isinstance(parameters, list):
        return True
    return bool(parameters) and all(p.keys() == parameters[0].keys() for p in parameters)


class _Plan:
    """One compiled form: SQL with `?` placeholders, how to turn a dict of parameters
    into the positional tuple, and how to convert result columns."""

    def __init__(self, statement: Any, dialect: Dialect, keys: list[str] | None) -> None:
        # for_executemany: no implicit RETURNING of a generated key nobody reads
        many = isinstance(statement, sa.Insert)
        compiled = statement.compile(dialect=dialect, column_keys=keys, for_executemany=many)
        self.compiled = compiled
        self.sql: str = compiled.string
        self.names: list[str] = list(compiled.positiontup or [])
        processors = compiled._bind_processors
        self.expanding = {
            name for name, bind in compiled.binds.items() if getattr(bind, "expanding", False)
        }
        self.bind_processors: list[Callable[[Any], Any] | None] = [
            processors.get(name) for name in self.names
        ]
        self.sources = self._sources()
        # every table it reads or writes (PostgreSQL: whether it may run beside deferred
        # writes, see run_deferred)
        self.tables = frozenset(
            t.name
            for t in find_tables(statement, check_columns=True, include_crud=True)
            if isinstance(t, sa.Table)
        )
        columns = compiled._result_columns
        self.row_type: type | None = None
        self.result_processors: list[Callable[[Any], Any] | None] = []
        if columns:
            names = [c.keyname for c in columns]
            self.row_type = namedtuple("Row", names, rename=True)  # type: ignore[misc]
            self.result_processors = [
                c.type._cached_result_processor(dialect, None) for c in columns
            ]
        # The columns a result processor converts, by position. A NULL is left None
        # unconverted, as every type's processor would return it (tested for each type
        # of the schema: test_prebuilt).
        self.converted = [(i, p) for i, p in enumerate(self.result_processors) if p]

    def sql_for(self, lengths: dict[str, int]) -> str:
        sql = self.sql
        for name, n in lengths.items():
            sql = sql.replace(_POSTCOMPILE.format(name), "(" + ", ".join("?" * n) + ")")
        return sql

    def positional(self, parameters: dict[str, Any]) -> list[Any]:
        if self.sources is None:
            return self._positional(parameters)
        out: list[Any] = []
        for (key, name, bind), processor in zip(self.sources, self.bind_processors, strict=True):
            if key in parameters:
                value = parameters[key]
            elif name in parameters:
                value = parameters[name]
            elif bind.required:
                raise sa.exc.InvalidRequestError(f"A value is required for bind parameter {key!r}")
            else:
                value = bind.effective_value
            out.append(processor(value) if processor else value)
        return out

    def _positional(self, parameters: dict[str, Any]) -> list[Any]:
        values = self.compiled.construct_params(parameters)
        out: list[Any] = []
        for name, processor in zip(self.names, self.bind_processors, strict=True):
            value = values[name]
            if name in self.expanding:
                out.extend(processor(v) if processor else v for v in value)
            else:
                out.append(processor(value) if processor else value)
        return out

    def _sources(self) -> list[tuple[str, str, Any]] | None:
        """Where each positional value comes from: the parameter of the bind's key, else
        the bind's own value. What construct_params() does, minus its generality; None
        (use it) for the statements that need that: expanding lists, escaped names."""
        compiled = self.compiled
        if self.expanding or compiled.escaped_bind_names:
            return None
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        if any(name not in binds for name in self.names):
            return None
        return [(binds[name].key, name, binds[name]) for name in self.names]


_plans: dict[tuple[Any, ...], _Plan] = {}


def _plan_for(statement: Any, dialect: Dialect, first: dict[str, Any]) -> _Plan:
    keys = sorted(first) if isinstance(statement, sa.Insert) else None
    key = (dialect.name, id(statement), tuple(keys) if keys else None)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _Plan(statement, dialect, keys)
    return plan


def run(connection: Connection, statement: Any, parameters: Any) -> Result:
    """Run a prebuilt statement on the sqlite3 connection under `connection`."""
    many = isinstance(parameters, list)
    batch: list[dict[str, Any]] = parameters if many else [parameters or {}]
    plan = _plan_for(statement, connection.dialect, batch[0])
    sql = plan.sql
    if plan.expanding:
        sql = plan.sql_for({name: len(batch[0][name]) for name in plan.expanding})
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if many:
            cursor.executemany(sql, [plan.positional(p) for p in batch])
            return Result(None, [], cursor.rowcount)
        cursor.execute(sql, plan.positional(batch[0]))
        if plan.row_type is None:
            return Result(None, [], cursor.rowcount)
        return _rows(plan, cursor.fetchall(), cursor.rowcount)
    finally:
        cursor.close()


def has_expanding(statement: Any, dialect: Dialect, parameters: Any) -> bool:
    first = parameters[0] if isinstance(parameters, list) else parameters or {}
    return bool(_plan_for(statement, dialect, first).expanding)


async def run_asyncpg(adapted: Any, dialect: Dialect, statement: Any, parameters: Any) -> Result:
    """Run a prebuilt statement (without expanding lists: their `$n` would need
    renumbering) on the asyncpg connection under SQLAlchemy's adapter `adapted`, in the
    transaction SQLAlchemy began or begins now, as its own cursor would."""
    many = isinstance(parameters, list)
    batch: list[dict[str, Any]] = parameters if many else [parameters or {}]
    plan = _plan_for(statement, dialect, batch[0])
    driver = adapted._connection
    async with _in_transaction(adapted):
        if many:
            await driver.executemany(plan.sql, [plan.positional(p) for p in batch])
            return Result(None, [], len(batch))
        arguments = plan.positional(batch[0])
        if plan.row_type is None:
            status = await driver.execute(plan.sql, *arguments)  # "UPDATE 1", "INSERT 0 1"
            count = status.rsplit(" ", 1)[-1]
            return Result(None, [], int(count) if count.isdigit() else -1)
        records = await driver.fetch(plan.sql, *arguments)
    return _rows(plan, records)


def _rows(plan: _Plan, records: list[Any], rowcount: int | None = None) -> Result:
    """Result rows as SQLAlchemy would give them, converted by each column's type."""
    make, converted = plan.row_type._make, plan.converted  # type: ignore[union-attr]
    count = len(records) if rowcount is None else rowcount
    if not converted:
        return Result(plan.row_type, [make(r) for r in records], count)
    rows = []
    for record in records:
        values = list(record)
        for i, process in converted:
            value = values[i]
            if value is not None:  # NULL is None in every type (_Plan.converted)
                values[i] = process(value)
        rows.append(make(values))
    return Result(plan.row_type, rows, count)


class Deferred(NamedTuple):
    """A write sent later (see run_deferred): its plan, its positional arguments, and the
    number of rows it must change (None: any), else `failure` is raised."""

    plan: _Plan
    arguments: list[Any]
    expect: int | None
    failure: Exception | None


def deferrable(statement: Any, dialect: Dialect, parameters: dict[str, Any]) -> _Plan | None:
    """The plan of a prebuilt write that can wait in a batch of deferred writes: one that
    returns no rows, has no expanding list and no WITH of its own (a data-modifying WITH
    cannot be nested in another)."""
    if not is_prebuilt(statement):
        return None
    plan = _plan_for(statement, dialect, parameters)
    if plan.row_type is not None or not _combinable(plan):
        return None
    return plan


def _combinable(plan: _Plan) -> bool:
    return not plan.expanding and not plan.sql.startswith("WITH")


def may_run_beside(
    statement: Any, dialect: Dialect, parameters: Any, written: frozenset[str]
) -> _Plan | None:
    """The plan of a prebuilt statement that returns rows and touches none of the tables
    `written` by the deferred writes: it gives the same rows run with them in one
    statement (seeing the database as before them) as run after them."""
    if not is_prebuilt(statement) or not isinstance(parameters, dict):
        return None
    plan = _plan_for(statement, dialect, parameters)
    if plan.row_type is None or not _combinable(plan) or plan.tables & written:
        return None
    return plan


_NUMBER = re.compile(r"\$(\d+)")
_combined: dict[tuple[Any, ...], str] = {}


def _shifted(sql: str, offset: int) -> str:
    """The statement's `$n` parameters numbered after `offset` others. (Its SQL holds no
    `$` elsewhere: literals in prebuilt statements are state names, see models.one_of.)"""
    return _NUMBER.sub(lambda m: f"${int(m.group(1)) + offset}", sql) if offset else sql


def _combined_sql(plans: list[_Plan], then: _Plan | None) -> str:
    """WITH w0 AS (write RETURNING 1), ... then, if given, r AS (statement): its rows, and
    one more row with the number of rows each write changed."""
    key = (tuple(map(id, plans)), id(then))
    sql = _combined.get(key)
    if sql is None:
        parts, offset = [], 0
        for i, plan in enumerate(plans):
            parts.append(f"w{i} AS ({_shifted(plan.sql, offset)} RETURNING 1)")
            offset += len(plan.names)
        counts = ", ".join(f"(SELECT count(*) FROM w{i})" for i in range(len(plans)))
        tail = f"SELECT ARRAY[{counts}]"
        if then is not None:
            parts.append(f"r AS ({_shifted(then.sql, offset)})")
            nulls = "NULL, " * len(then.result_processors)
            tail = f"SELECT r.*, NULL::bigint[] FROM r UNION ALL SELECT {nulls}ARRAY[{counts}]"
        sql = "WITH " + ", ".join(parts) + " " + tail
        if len(_combined) >= 1024:
            _combined.clear()
        _combined[key] = sql
    return sql


async def run_deferred(
    adapted: Any,
    writes: list[Deferred],
    then: _Plan | None = None,
    arguments: list[Any] | None = None,
) -> Result | None:
    """PostgreSQL: deferred writes in one round trip, as data-modifying WITH clauses of
    one statement, with `then` (a may_run_beside plan and its `arguments`) as its main
    part if given: its result is returned. Every part sees the database as it was before
    the statement (so no two of them may change the same row: the caller sees to it);
    each write is checked for the number of rows it had to change."""
    sql = _combined_sql([w.plan for w in writes], then)
    values = [a for w in writes for a in w.arguments] + (arguments or [])
    async with _in_transaction(adapted):
        records = await adapted._connection.fetch(sql, *values)
    counts = next(r[-1] for r in records if r[-1] is not None)
    for write, count in zip(writes, counts, strict=True):
        check_count(count, write.expect, write.failure)
    if then is None:
        return None
    return _rows(then, [r[:-1] for r in records if r[-1] is None])


def check_count(count: int, expect: int | None, failure: Exception | None) -> None:
    """A write had to change `expect` rows (None: any number)."""
    if expect is not None and count != expect:
        raise failure or RuntimeError(f"a write changed {count} rows")


@asynccontextmanager
async def _in_transaction(adapted: Any) -> AsyncIterator[None]:
    """The asyncpg connection to ourselves, in the transaction SQLAlchemy began or begins
    now, as its own cursor would."""
    async with adapted._execute_mutex:
        if adapted._transaction is None:
            await adapted._start_transaction()
        yield


def asyncpg_adapter(raw: Any) -> Any:
    """SQLAlchemy's asyncpg adapter under a pooled connection, if it is one whose
    transaction handling this module knows; None otherwise (then SQLAlchemy runs all)."""
    adapted = getattr(raw, "dbapi_connection", None)
    known = ("_connection", "_execute_mutex", "_transaction", "_start_transaction")
    if adapted is None or not all(hasattr(adapted, name) for name in known):
        return None
    return adapted


class Result:
    def __init__(self, row_type: type | None, rows: list[Any], rowcount: int) -> None:
        self._row_type = row_type
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise NoResultFound(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalars(self) -> Iterator[Any]:
        return (row[0] for row in self._rows)

    def mappings(self) -> Result:
        return Result(None, [row._asdict() for row in self._rows], self.rowcount)
