"""Step runs and instructions without a foreign key to their organization.

A step's transactions insert an instruction and change a step run whose row they changed
already, and each such write checked the key: the organization's row was locked, FOR KEY
SHARE, by the transactions of every agent at once, so PostgreSQL made a multixact of
their locks at most of them (about one a step, with the 50 agents of the benchmark). The
rows' execution carries the key, and their organization is their execution's.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = ("step_runs", "instructions")


def _key(table: str) -> str:
    return f"fk_{table}_organization_id_organizations"


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(_key(table), type_="foreignkey")


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.create_foreign_key(_key(table), "organizations", ["organization_id"], ["id"])
