"""An index for the liveness sweep's late agents, as ix_agents_liveness is for the dead.

The sweep reads only the agents whose deadline passed: without it, finding the late ones
read every live agent's row each second, a cost that grew with the fleet.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_agents_late", "agents", ["status", "late_at"])


def downgrade() -> None:
    op.drop_index("ix_agents_late", table_name="agents")
