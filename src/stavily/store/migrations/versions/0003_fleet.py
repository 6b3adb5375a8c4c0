"""The fleet: enrollment tokens, operator states, health facts, routing preferences.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_keys",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_server_keys")),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("organization_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("agent_type", sa.String(length=20), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_enrollment_tokens_organization_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrollment_tokens_token_hash")),
    )
    with op.batch_alter_table("agents") as batch:
        batch.add_column(
            sa.Column("admin_state", sa.String(length=20), nullable=False, server_default="active")
        )
        batch.add_column(sa.Column("os", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("facts", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("credential_issued_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("enrollment_token_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("late_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column(
                "heartbeats_while_busy", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
        batch.create_index("ix_agents_liveness", ["status", "dead_at"])
    with op.batch_alter_table("instructions") as batch:
        batch.add_column(sa.Column("preferred_agent_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("prefer_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instructions") as batch:
        batch.drop_column("prefer_until")
        batch.drop_column("preferred_agent_id")
    with op.batch_alter_table("agents") as batch:
        batch.drop_index("ix_agents_liveness")
        for column in (
            "heartbeats_while_busy",
            "dead_at",
            "late_at",
            "enrollment_token_id",
            "credential_issued_at",
            "revoked_at",
            "facts",
            "os",
            "admin_state",
        ):
            batch.drop_column(column)
    op.drop_table("enrollment_tokens")
    op.drop_table("server_keys")
