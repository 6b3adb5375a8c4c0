"""The audit log append-only again, on both databases.

On SQLite, 0007 rebuilt audit_records (batch_alter_table copies the table into a new
one) and its triggers went with the old table: UPDATE and DELETE of audit records
succeeded. Here they come back. On PostgreSQL the row trigger of 0001 survived, but it
never saw TRUNCATE, which removes rows without visiting them: a statement trigger refuses
it now. The guard lives in stavily.store.append_only, for any later migration that
rebuilds the table to apply again.

Downgrade removes what the upgrade adds at an 0008 database: the SQLite triggers (0007
had dropped them) and PostgreSQL's TRUNCATE trigger (the row trigger is 0001's).

Revision ID: 0009
Revises: 0008
"""

from alembic import op

from stavily.store import append_only

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    append_only.protect(op.get_bind())


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        append_only.unprotect(bind, [append_only.TRUNCATE_TRIGGER])
    else:
        append_only.unprotect(bind, tuple(append_only.SQLITE_TRIGGERS))
