"""Events: what may start workflows (a sensor agent's trigger, and later webhooks,
schedules, the API), each once per idempotency key, with what it started.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), nullable=False
        ),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("idempotency_key", sa.String(400)),
        sa.Column("agent_id", sa.String(40)),
        sa.Column("sent_by", sa.String(100), nullable=False),
        sa.Column("watch_id", sa.String(40)),
        sa.Column("workflow_name", sa.String(200)),
        sa.Column("step", sa.String(200)),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("started", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint(
            "organization_id",
            "source",
            "idempotency_key",
            name="uq_events_organization_id",
        ),
    )
    op.create_index("ix_events_org_created", "events", ["organization_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_events_org_created", table_name="events")
    op.drop_table("events")
