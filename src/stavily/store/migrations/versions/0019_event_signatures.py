"""A webhook event keeps the signature it came with, unique per hook: a signed request
replayed with another delivery id (a header no signature covers) starts nothing new.

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_SIGNED = "signature IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("signature", sa.String(120)))
    op.create_index(
        "ux_events_signature",
        "events",
        ["organization_id", "source", "signature"],
        unique=True,
        sqlite_where=sa.text(_SIGNED),
        postgresql_where=sa.text(_SIGNED),
    )


def downgrade() -> None:
    op.drop_index("ux_events_signature", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("signature")
