"""Claims take the oldest execution's steps first: the claim index follows that order.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_instructions_claim", table_name="instructions")
    op.create_index(
        "ix_instructions_claim",
        "instructions",
        ["status", "organization_id", "agent_type", "execution_id", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_instructions_claim", table_name="instructions")
    op.create_index(
        "ix_instructions_claim", "instructions", ["status", "organization_id", "agent_type", "id"]
    )
