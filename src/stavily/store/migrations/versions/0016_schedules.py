"""Schedules: cron and interval schedules that start workflows, declared in a workflow
or created by the API; and leases, which choose the one server process that runs a
singleton duty (the scheduler first).

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), nullable=False
        ),
        sa.Column("workflow_name", sa.String(200), nullable=False),
        sa.Column("origin", sa.String(20), nullable=False),
        sa.Column("key", sa.String(64)),
        sa.Column("name", sa.String(200)),
        sa.Column("cron", sa.String(200)),
        sa.Column("timezone", sa.String(100), nullable=False),
        sa.Column("every_seconds", sa.Integer),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("misfire", sa.String(10), nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_fired_at", sa.DateTime(timezone=True)),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint(
            "organization_id", "workflow_name", "key", name="uq_schedules_organization_id"
        ),
    )
    op.create_index("ix_schedules_due", "schedules", ["next_fire_at"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("ix_schedules_due", table_name="schedules")
    op.drop_table("schedules")
