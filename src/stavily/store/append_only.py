"""The audit log's append-only guard: triggers that refuse to change or remove audit records.

SQLite: BEFORE UPDATE and BEFORE DELETE triggers (a DELETE without WHERE visits every row
when the table has triggers, so it is refused too). PostgreSQL: a row trigger on UPDATE
and DELETE, and a statement trigger on TRUNCATE, which row triggers do not see.

On SQLite a migration that rebuilds audit_records (batch_alter_table copies the table
into a new one) drops its triggers with the old table: such a migration must call
`protect(op.get_bind())` at its end. tests/integration/test_migrations.py checks every
migration from 0009 on.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

TABLE = "audit_records"
MESSAGE = "audit_records is append-only"
FUNCTION = "stavily_audit_append_only"
ROW_TRIGGER = "audit_records_append_only"
TRUNCATE_TRIGGER = "audit_records_no_truncate"
SQLITE_TRIGGERS = {"audit_records_no_update": "UPDATE", "audit_records_no_delete": "DELETE"}


def expected(dialect: str) -> tuple[str, ...]:
    """The triggers that make up the guard on this database ("sqlite", "postgresql")."""
    if dialect == "postgresql":
        return (ROW_TRIGGER, TRUNCATE_TRIGGER)
    return tuple(SQLITE_TRIGGERS)


def present(bind: Connection) -> set[str]:
    """The guard's triggers that exist and are enabled."""
    if bind.dialect.name == "postgresql":
        rows = bind.execute(
            sa.text(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(:table) "
                "AND NOT tgisinternal AND tgenabled <> 'D'"
            ),
            {"table": TABLE},
        )
    else:
        rows = bind.execute(
            sa.text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :table"),
            {"table": TABLE},
        )
    return {str(name) for (name,) in rows} & set(expected(bind.dialect.name))


def missing(bind: Connection) -> list[str]:
    """The guard's triggers that do not exist (or, on PostgreSQL, are disabled)."""
    found = present(bind)
    return [name for name in expected(bind.dialect.name) if name not in found]


def protect(bind: Connection) -> list[str]:
    """Create (or enable again) whichever of the guard's triggers is missing; returns them.
    Running it again changes nothing."""
    absent = missing(bind)
    if bind.dialect.name != "postgresql":
        for name in absent:
            bind.execute(
                sa.text(
                    f"CREATE TRIGGER IF NOT EXISTS {name} BEFORE {SQLITE_TRIGGERS[name]} ON "
                    f"{TABLE} BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END"
                )
            )
        return absent
    if absent:
        bind.execute(
            sa.text(
                f"CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger AS $$ "
                f"BEGIN RAISE EXCEPTION '{MESSAGE}'; END; $$ LANGUAGE plpgsql"
            )
        )
    statements = {
        ROW_TRIGGER: "BEFORE UPDATE OR DELETE ON {table} FOR EACH ROW",
        TRUNCATE_TRIGGER: "BEFORE TRUNCATE ON {table} FOR EACH STATEMENT",
    }
    for name in absent:
        # A disabled trigger is there (a second CREATE would fail): enable it.
        exists = bind.scalar(
            sa.text("SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(:table) AND tgname = :n"),
            {"table": TABLE, "n": name},
        )
        if exists:
            bind.execute(sa.text(f"ALTER TABLE {TABLE} ENABLE TRIGGER {name}"))
        else:
            when = statements[name].format(table=TABLE)
            bind.execute(sa.text(f"CREATE TRIGGER {name} {when} EXECUTE FUNCTION {FUNCTION}()"))
    return absent


def unprotect(bind: Connection, names: list[str] | tuple[str, ...]) -> None:
    """Drop these triggers of the guard, where they exist (for downgrades)."""
    for name in names:
        if bind.dialect.name == "postgresql":
            bind.execute(sa.text(f"DROP TRIGGER IF EXISTS {name} ON {TABLE}"))
        else:
            bind.execute(sa.text(f"DROP TRIGGER IF EXISTS {name}"))
