"""The plugin registry: plugins, their immutable signed versions, artifact chunks (the
database store), which agent has which version, rollouts, and the plugin versions a
workflow version is pinned to.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plugins",
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), primary_key=True
        ),
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(200)),
        sa.Column("description", sa.Text),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "plugin_versions",
        sa.Column("organization_id", sa.String(40), primary_key=True),
        sa.Column("plugin_id", sa.String(200), primary_key=True),
        sa.Column("version", sa.String(100), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
        sa.Column("protocol", sa.String(20), nullable=False),
        sa.Column("signed", sa.JSON, nullable=False),
        sa.Column("signature", sa.String(200), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("source", sa.JSON, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("status_reason", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_by", sa.String(100), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id", "plugin_id"], ["plugins.organization_id", "plugins.id"]
        ),
    )
    op.create_table(
        "plugin_blob_chunks",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "agent_plugins",
        sa.Column("agent_id", sa.String(40), sa.ForeignKey("agents.id"), primary_key=True),
        sa.Column("plugin_id", sa.String(200), primary_key=True),
        sa.Column("version", sa.String(100), primary_key=True),
        sa.Column("sha256", sa.String(64)),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("instruction_id", sa.String(40)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "plugin_rollouts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), nullable=False
        ),
        sa.Column("plugin_id", sa.String(200), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("selector", sa.JSON, nullable=False),
        sa.Column("agents", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
    )

    # each step's plugin version, pinned at apply (stavily.plugins.pins)
    with op.batch_alter_table("workflow_versions") as batch:
        batch.add_column(sa.Column("plugins", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflow_versions") as batch:
        batch.drop_column("plugins")
    for table in (
        "plugin_rollouts",
        "agent_plugins",
        "plugin_blob_chunks",
        "plugin_versions",
        "plugins",
    ):
        op.drop_table(table)
