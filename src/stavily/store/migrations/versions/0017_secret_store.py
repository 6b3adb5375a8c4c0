"""The secret store: each organization's data keys (wrapped by the server's secrets key)
and its secrets, each encrypted under one data key, named by the key's id.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secret_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), nullable=False
        ),
        sa.Column("wrapped", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_secret_keys_org", "secret_keys", ["organization_id", "created_at"])
    op.create_table(
        "secrets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), nullable=False
        ),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("key_id", sa.String(40), sa.ForeignKey("secret_keys.id"), nullable=False),
        sa.Column("ciphertext", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("organization_id", "name", name="uq_secrets_organization_id"),
    )
    op.create_index("ix_secrets_key_id", "secrets", ["key_id"])


def downgrade() -> None:
    op.drop_index("ix_secrets_key_id", table_name="secrets")
    op.drop_table("secrets")
    op.drop_index("ix_secret_keys_org", table_name="secret_keys")
    op.drop_table("secret_keys")
