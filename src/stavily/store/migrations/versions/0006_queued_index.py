"""The claim index holds queued instructions only.

Claims read queued instructions only. As a partial index, an instruction's later status
changes (leased, executing, completed: each a new row version) add no entry to it: fewer
index writes a step, and a smaller index to read.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

QUEUED = sa.text("status IN ('queued')")


def upgrade() -> None:
    op.drop_index("ix_instructions_claim", table_name="instructions")
    op.create_index(
        "ix_instructions_queued",
        "instructions",
        ["organization_id", "agent_type", "execution_id", "id"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )


def downgrade() -> None:
    op.drop_index("ix_instructions_queued", table_name="instructions")
    op.create_index(
        "ix_instructions_claim",
        "instructions",
        ["status", "organization_id", "agent_type", "execution_id", "id"],
    )
