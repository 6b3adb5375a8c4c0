"""The instructions an agent holds get an index of their own.

Every claim, heartbeat and routing choice counts them; with only (agent_id, status), the
count could read through the agent's whole history of finished instructions.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ACTIVE = sa.text("status IN ('leased', 'executing')")


def upgrade() -> None:
    op.create_index(
        "ix_instructions_agent_active",
        "instructions",
        ["agent_id"],
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ix_instructions_agent_active", table_name="instructions")
