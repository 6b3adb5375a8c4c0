"""Identities: users (argon2 password hashes, lockout), their memberships of
organizations with a role in each, custom roles; API tokens gain an owner, a kind (an API
token or a login session), an expiry and the time they were last used.

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("username", sa.String(100), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", sa.DateTime(timezone=True)),
        sa.Column("last_login_at", sa.DateTime(timezone=True)),
        sa.Column("disabled_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id"), primary_key=True),
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), primary_key=True
        ),
        sa.Column("role", sa.String(40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_memberships_org", "memberships", ["organization_id"])
    op.create_table(
        "roles",
        sa.Column(
            "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), primary_key=True
        ),
        sa.Column("name", sa.String(40), primary_key=True),
        sa.Column("description", sa.String(500)),
        sa.Column("permissions", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("api_tokens") as batch:
        batch.alter_column("role", type_=sa.String(40), existing_nullable=False)
        batch.add_column(sa.Column("kind", sa.String(10), nullable=False, server_default="api"))
        batch.add_column(sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id")))
        batch.add_column(sa.Column("created_by", sa.String(100)))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True)))
    op.create_index("ix_api_tokens_org", "api_tokens", ["organization_id", "kind"])
    op.create_index("ix_api_tokens_user", "api_tokens", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_api_tokens_user", table_name="api_tokens")
    op.drop_index("ix_api_tokens_org", table_name="api_tokens")
    with op.batch_alter_table("api_tokens") as batch:
        for column in ("last_used_at", "expires_at", "created_by", "user_id", "kind"):
            batch.drop_column(column)
        batch.alter_column("role", type_=sa.String(20), existing_nullable=False)
    op.drop_table("roles")
    op.drop_index("ix_memberships_org", table_name="memberships")
    op.drop_table("memberships")
    op.drop_table("users")
