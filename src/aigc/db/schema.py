"""The tables of the store (docs/store.md): what the migrations in migrations/versions/ build, and what the code
reads and writes. Portable types only (the same migrations build SQLite and PostgreSQL, docs/postgres.md): no
dialect-specific column types.

A change here needs a migration; tests/test_db.py compares this metadata with a migrated database and fails on
any difference.
"""

from __future__ import annotations

import sqlalchemy as sa

VERSION_TABLE = "aigc_alembic_version"  # not Alembic's default: Optuna's storage owns `alembic_version`
MODALITIES = ("text", "image", "series", "music", "video", "sound")
SOURCES = ("api", "cli", "studio")  # what made a generation
WINNERS = ("left", "right", "tie", "both_bad")

# deterministic constraint names, so that a later migration can name what it alters (SQLite's batch mode
# rebuilds a table and needs them)
metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

ID = sa.String(64)  # new_id(): "gen-" + 24 hex characters
TIME = sa.DateTime(timezone=True)  # always UTC

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("prefix", sa.String(12), nullable=False),  # the secret's first characters, to tell keys apart
    sa.Column("sha256", sa.String(64), nullable=False),  # hex digest of the secret; the secret is never stored
    sa.Column("created", TIME, nullable=False),
    sa.Column("revoked", TIME, nullable=True),
)

generations = sa.Table(
    "generations", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("created", TIME, nullable=False, index=True),
    sa.Column("run", sa.String(255), nullable=False, index=True),  # the run's name
    sa.Column("run_path", sa.Text, nullable=True),
    sa.Column("run_sha256", sa.String(64), nullable=True),  # sha256 of the run's manifest.json, if it has one
    sa.Column("modality", sa.String(16), nullable=False),
    sa.Column("family", sa.String(64), nullable=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("request", sa.JSON, nullable=False),  # the full request, as sent
    sa.Column("seed", sa.BigInteger, nullable=True),
    sa.Column("output", sa.JSON, nullable=True),  # e.g. a list of texts, a forecast
    sa.Column("file", sa.Text, nullable=True),  # a file it wrote (a PNG): relative to AIGC_HOME, or absolute
    sa.Column("latency_s", sa.Float, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=True),
    sa.Column("completion_tokens", sa.Integer, nullable=True),
    sa.Column("key_id", ID, sa.ForeignKey("api_keys.id"), nullable=True),
    # best-of-n: {best_of, candidates, chosen, scores, features} of a generation that a reward model picked
    # (aigc.optimize.rerank); null otherwise
    sa.Column("rerank", sa.JSON, nullable=True),
)

ratings = sa.Table(
    "ratings", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("generation_id", ID, sa.ForeignKey("generations.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("created", TIME, nullable=False),
    sa.Column("score", sa.Integer, nullable=False),  # -1 bad, 0 neutral, +1 good
    sa.Column("stars", sa.Integer, nullable=True),  # 1..5
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("index", sa.Integer, nullable=True),  # which of the generation's outputs
    sa.Column("key_id", ID, sa.ForeignKey("api_keys.id"), nullable=True),
    sa.CheckConstraint("score IN (-1, 0, 1)", name="score"),
    sa.CheckConstraint("stars IS NULL OR (stars BETWEEN 1 AND 5)", name="stars"),
    sa.CheckConstraint('"index" IS NULL OR "index" >= 0', name="index"),
)

votes = sa.Table(
    "votes", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("created", TIME, nullable=False),
    sa.Column("left_id", ID, sa.ForeignKey("generations.id"), nullable=False),
    sa.Column("right_id", ID, sa.ForeignKey("generations.id"), nullable=False),
    sa.Column("winner", sa.String(16), nullable=False),
    sa.Column("prompt", sa.Text, nullable=True),  # what both sides answered (a prompt, an image class)
    sa.Column("key_id", ID, sa.ForeignKey("api_keys.id"), nullable=True),
    sa.CheckConstraint("winner IN ('left', 'right', 'tie', 'both_bad')", name="winner"),
    sa.CheckConstraint("left_id <> right_id", name="sides"),
)

battles = sa.Table(
    "battles", metadata,  # an arena battle: two runs' anonymous answers to one prompt, and the vote on them
    sa.Column("id", ID, primary_key=True),
    sa.Column("created", TIME, nullable=False),
    sa.Column("modality", sa.String(16), nullable=False),  # both sides' modality
    sa.Column("prompt", sa.Text, nullable=True),  # what both sides answered; copied into the vote
    sa.Column("left_id", ID, sa.ForeignKey("generations.id"), nullable=False),
    sa.Column("right_id", ID, sa.ForeignKey("generations.id"), nullable=False),
    sa.Column("vote_id", ID, sa.ForeignKey("votes.id"), nullable=True, unique=True),  # null until voted on
    sa.Column("key_id", ID, sa.ForeignKey("api_keys.id"), nullable=True),  # the API key that opened it
    sa.CheckConstraint("left_id <> right_id", name="sides"),
)
