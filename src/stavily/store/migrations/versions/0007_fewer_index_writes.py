"""Fewer index entries a step.

An instruction changes status four times (queued, leased, executing, completed) and, with
the status in its indexes, each change is a new row version with an entry in every index
of the table. Two of them go: the lease expiry is looked up among the active instructions
only (the agent's active index gets the expiry as its second column) and an agent's
history is not looked up by status.

A step run's status was in an index too (its fan-out parent's), so every change of a step
was a new entry in all three of its indexes; the parent index now holds the fan-out items
only, by parent, and leaves the status out. With room left on each page (fillfactor), step
runs and executions change in place (HOT updates: no index entry at all).

Audit records no longer carry a foreign key to their organization: a log of what was done
must not be tied to what it records (the subject has none either), and the key was checked
(and the organization's row locked, FOR KEY SHARE) at each of the five records of a step.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ACTIVE = sa.text("status IN ('leased', 'executing')")
ITEM = sa.text("parent_id IS NOT NULL")
FILLFACTOR = {"step_runs": 80, "executions": 80}
AUDIT_FK = "fk_audit_records_organization_id_organizations"


def upgrade() -> None:
    op.drop_index("ix_instructions_lease", table_name="instructions")
    op.drop_index("ix_instructions_agent", table_name="instructions")
    op.drop_index("ix_instructions_agent_active", table_name="instructions")
    op.create_index(
        "ix_instructions_agent_active",
        "instructions",
        ["agent_id", "lease_expires_at"],
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )
    op.drop_index("ix_step_runs_parent", table_name="step_runs")
    op.create_index(
        "ix_step_runs_parent",
        "step_runs",
        ["parent_id"],
        sqlite_where=ITEM,
        postgresql_where=ITEM,
    )
    with op.batch_alter_table("audit_records") as batch_op:
        batch_op.drop_constraint(AUDIT_FK, type_="foreignkey")
    if op.get_bind().dialect.name == "postgresql":
        for table, fillfactor in FILLFACTOR.items():
            op.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactor})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in FILLFACTOR:
            op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
    with op.batch_alter_table("audit_records") as batch_op:
        batch_op.create_foreign_key(AUDIT_FK, "organizations", ["organization_id"], ["id"])
    op.drop_index("ix_step_runs_parent", table_name="step_runs")
    op.create_index("ix_step_runs_parent", "step_runs", ["parent_id", "status"])
    op.drop_index("ix_instructions_agent_active", table_name="instructions")
    op.create_index(
        "ix_instructions_agent_active",
        "instructions",
        ["agent_id"],
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )
    op.create_index("ix_instructions_agent", "instructions", ["agent_id", "status"])
    op.create_index("ix_instructions_lease", "instructions", ["status", "lease_expires_at"])
