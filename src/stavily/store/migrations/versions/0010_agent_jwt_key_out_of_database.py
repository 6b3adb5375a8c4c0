"""The agent JWT signing key leaves the database.

Whoever could read server_keys could sign a JWT for any agent. The key now comes from
STAVILY_AGENT_JWT_KEY or the file agent-jwt.key in the data dir; the database keeps only
its SHA-256 (row agent-jwt-hs256-sha256, written by the server on start), which replicas
compare theirs with. JWTs signed with the deleted key are refused from now on: they live
an hour, and agents renew them with their API key.

Downgrade leaves the key deleted (it cannot come back): an older server makes a new one.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

CLEAR_KEY = "agent-jwt-hs256"


def upgrade() -> None:
    op.execute(sa.text("DELETE FROM server_keys WHERE name = :name").bindparams(name=CLEAR_KEY))


def downgrade() -> None:
    pass
