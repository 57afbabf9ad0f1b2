"""Arena battles: two generations of one modality, from two runs, shown side by side for one vote.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# names are written out in full (op.f: not to be run through schema.py's naming convention again)
ID = sa.String(64)
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "battles",
        sa.Column("id", ID, nullable=False),
        sa.Column("created", TIME, nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("prompt", sa.Text, nullable=True),
        sa.Column("left_id", ID, nullable=False),
        sa.Column("right_id", ID, nullable=False),
        sa.Column("vote_id", ID, nullable=True),
        sa.Column("key_id", ID, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_battles")),
        sa.ForeignKeyConstraint(["left_id"], ["generations.id"], name=op.f("fk_battles_left_id_generations")),
        sa.ForeignKeyConstraint(["right_id"], ["generations.id"], name=op.f("fk_battles_right_id_generations")),
        sa.ForeignKeyConstraint(["vote_id"], ["votes.id"], name=op.f("fk_battles_vote_id_votes")),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_battles_key_id_api_keys")),
        sa.UniqueConstraint("vote_id", name=op.f("uq_battles_vote_id")),
        sa.CheckConstraint("left_id <> right_id", name=op.f("ck_battles_sides")),
    )


def downgrade() -> None:
    op.drop_table("battles")
