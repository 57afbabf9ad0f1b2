"""The first schema: generations, their ratings, pairwise votes and API keys.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# names are written out in full (op.f: not to be run through schema.py's naming convention again)
ID = sa.String(64)
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(12), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created", TIME, nullable=False),
        sa.Column("revoked", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
    )
    op.create_table(
        "generations",
        sa.Column("id", ID, nullable=False),
        sa.Column("created", TIME, nullable=False),
        sa.Column("run", sa.String(255), nullable=False),
        sa.Column("run_path", sa.Text, nullable=True),
        sa.Column("run_sha256", sa.String(64), nullable=True),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("family", sa.String(64), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=True),
        sa.Column("output", sa.JSON, nullable=True),
        sa.Column("file", sa.Text, nullable=True),
        sa.Column("latency_s", sa.Float, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=True),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("key_id", ID, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generations")),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_generations_key_id_api_keys")),
    )
    op.create_index(op.f("ix_generations_created"), "generations", ["created"])
    op.create_index(op.f("ix_generations_run"), "generations", ["run"])
    op.create_table(
        "ratings",
        sa.Column("id", ID, nullable=False),
        sa.Column("generation_id", ID, nullable=False),
        sa.Column("created", TIME, nullable=False),
        sa.Column("score", sa.Integer, nullable=False),
        sa.Column("stars", sa.Integer, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("index", sa.Integer, nullable=True),
        sa.Column("key_id", ID, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ratings")),
        sa.ForeignKeyConstraint(["generation_id"], ["generations.id"], ondelete="CASCADE",
                                name=op.f("fk_ratings_generation_id_generations")),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_ratings_key_id_api_keys")),
        sa.CheckConstraint("score IN (-1, 0, 1)", name=op.f("ck_ratings_score")),
        sa.CheckConstraint("stars IS NULL OR (stars BETWEEN 1 AND 5)", name=op.f("ck_ratings_stars")),
        sa.CheckConstraint('"index" IS NULL OR "index" >= 0', name=op.f("ck_ratings_index")),
    )
    op.create_index(op.f("ix_ratings_generation_id"), "ratings", ["generation_id"])
    op.create_table(
        "votes",
        sa.Column("id", ID, nullable=False),
        sa.Column("created", TIME, nullable=False),
        sa.Column("left_id", ID, nullable=False),
        sa.Column("right_id", ID, nullable=False),
        sa.Column("winner", sa.String(16), nullable=False),
        sa.Column("prompt", sa.Text, nullable=True),
        sa.Column("key_id", ID, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_votes")),
        sa.ForeignKeyConstraint(["left_id"], ["generations.id"], name=op.f("fk_votes_left_id_generations")),
        sa.ForeignKeyConstraint(["right_id"], ["generations.id"], name=op.f("fk_votes_right_id_generations")),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_votes_key_id_api_keys")),
        sa.CheckConstraint("winner IN ('left', 'right', 'tie', 'both_bad')", name=op.f("ck_votes_winner")),
        sa.CheckConstraint("left_id <> right_id", name=op.f("ck_votes_sides")),
    )


def downgrade() -> None:
    op.drop_table("votes")
    op.drop_index(op.f("ix_ratings_generation_id"), table_name="ratings")
    op.drop_table("ratings")
    op.drop_index(op.f("ix_generations_run"), table_name="generations")
    op.drop_index(op.f("ix_generations_created"), table_name="generations")
    op.drop_table("generations")
    op.drop_table("api_keys")
