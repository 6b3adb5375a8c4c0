"""The workflow engine: retries that wait, fan-out items, deadlines, concurrency, reruns.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("variables", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("concurrency_limit", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reruns", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("open_steps", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("failed_step", sa.String(length=200), nullable=True))
        batch.create_index("ix_executions_workflow_status", ["workflow_id", "status"])
        batch.create_index("ix_executions_status_deadline", ["status", "deadline_at"])
    with op.batch_alter_table("step_runs") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("item_index", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("waiting", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("dependents", sa.JSON(), nullable=True))
        batch.create_index("ix_step_runs_parent", ["parent_id", "status"])
    with op.batch_alter_table("instructions") as batch:
        batch.add_column(sa.Column("available_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_instructions_execution", ["execution_id", "status"])


def downgrade() -> None:
    with op.batch_alter_table("instructions") as batch:
        batch.drop_index("ix_instructions_execution")
        batch.drop_column("available_at")
    with op.batch_alter_table("step_runs") as batch:
        batch.drop_index("ix_step_runs_parent")
        batch.drop_column("dependents")
        batch.drop_column("waiting")
        batch.drop_column("next_attempt_at")
        batch.drop_column("item_index")
        batch.drop_column("parent_id")
    with op.batch_alter_table("executions") as batch:
        batch.drop_index("ix_executions_status_deadline")
        batch.drop_index("ix_executions_workflow_status")
        batch.drop_column("failed_step")
        batch.drop_column("open_steps")
        batch.drop_column("reruns")
        batch.drop_column("concurrency_limit")
        batch.drop_column("deadline_at")
        batch.drop_column("variables")
