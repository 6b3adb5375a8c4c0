"""Whether a plugin version talks to its agent's socket (STAVILY_AGENT_SOCKET): the
official agents serve none, so such a version's steps go to reference agents only.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("plugin_versions") as batch:
        batch.add_column(sa.Column("socket", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("plugin_versions") as batch:
        batch.drop_column("socket")
