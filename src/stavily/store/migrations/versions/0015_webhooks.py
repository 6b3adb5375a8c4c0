"""Webhooks: a URL per workflow (/hooks/{id}) whose requests are accepted only when
signed with one of its secrets (kept sealed with the server's secrets key); and events
accepted before they are processed (outcome `accepted`), found again after a restart.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), nullable=False
        ),
        sa.Column("workflow_name", sa.String(200), nullable=False),
        sa.Column("description", sa.String(500)),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("previous_secret", sa.Text),
        sa.Column("previous_expires_at", sa.DateTime(timezone=True)),
        sa.Column("idempotency_field", sa.String(200)),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("tolerance_seconds", sa.Integer, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_webhooks_org", "webhooks", ["organization_id", "workflow_name"])
    op.create_index(
        "ix_events_accepted",
        "events",
        ["created_at"],
        sqlite_where=sa.text("outcome = 'accepted'"),
        postgresql_where=sa.text("outcome = 'accepted'"),
    )


def downgrade() -> None:
    op.drop_index("ix_events_accepted", table_name="events")
    op.drop_index("ix_webhooks_org", table_name="webhooks")
    op.drop_table("webhooks")
