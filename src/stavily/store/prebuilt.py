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
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import NoResultFound

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
        compiled = statement.compile(dialect=dialect, column_keys=keys)
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
        columns = compiled._result_columns
        self.row_type: type | None = None
        self.result_processors: list[Callable[[Any], Any] | None] = []
        if columns:
            names = [c.keyname for c in columns]
            self.row_type = namedtuple("Row", names, rename=True)  # type: ignore[misc]
            self.result_processors = [
                c.type._cached_result_processor(dialect, None) for c in columns
            ]

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
        rows: list[Any] = []
        if plan.row_type is not None:
            make, processors = plan.row_type._make, plan.result_processors
            rows = [
                make(p(v) if p else v for p, v in zip(processors, raw, strict=True))
                for raw in cursor.fetchall()
            ]
        return Result(plan.row_type, rows, cursor.rowcount)
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
    async with adapted._execute_mutex:
        if adapted._transaction is None:
            await adapted._start_transaction()
        if many:
            await driver.executemany(plan.sql, [plan.positional(p) for p in batch])
            return Result(None, [], len(batch))
        arguments = plan.positional(batch[0])
        if plan.row_type is None:
            status = await driver.execute(plan.sql, *arguments)  # "UPDATE 1", "INSERT 0 1"
            count = status.rsplit(" ", 1)[-1]
            return Result(None, [], int(count) if count.isdigit() else -1)
        records = await driver.fetch(plan.sql, *arguments)
    make, processors = plan.row_type._make, plan.result_processors
    rows = [
        make(p(v) if p else v for p, v in zip(processors, record, strict=True))
        for record in records
    ]
    return Result(plan.row_type, rows, len(rows))


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
