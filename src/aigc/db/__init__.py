"""The store of every generation, rating, pairwise vote, arena battle and API key (docs/store.md): one SQL
database, SQLite at $AIGC_HOME/aigc.db unless AIGC_DATABASE_URL names another, its schema built and upgraded by
the Alembic migrations in migrations/ whenever a Store is opened.

Plain Python (no torch, numpy or pandas), so that a server's key check and `aigc history` start fast. Rows come
back as plain dicts, JSON-serialisable, with times as ISO-8601 strings in UTC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from aigc.db.schema import MODALITIES, SOURCES, VERSION_TABLE, WINNERS, api_keys, battles, generations, ratings, votes
from aigc.errors import BadRequest, Conflict, NotFound, UserError
from aigc.fsutil import atomic_write_text, json_safe
from aigc.store import aigc_home, valid_name

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_S = 30  # how long a SQLite writer waits for another one before "database is locked"
MAX_TEXT = 10_000  # characters of a rating's comment or a vote's prompt
MIGRATION_LOCK = 0x61696763  # the PostgreSQL advisory lock that migrate() holds ("aigc")
WRITE = "aigc_write"  # the execution option that makes a SQLite transaction BEGIN IMMEDIATE (_begin)


def default_url() -> str:
    return os.environ.get("AIGC_DATABASE_URL") or f"sqlite:///{aigc_home() / 'aigc.db'}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


# ----------------------------------------------------------------------------------
# engine and migrations


def dumps(value) -> str:
    """JSON columns as text: non-ASCII kept as is (a search for a Chinese prompt finds it), NaN as null."""
    return json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False)


def create_engine(url: str) -> sa.Engine:
    """An engine that threads share. For SQLite: WAL, foreign keys, a busy timeout, and BEGIN IMMEDIATE for the
    transactions of an engine with the WRITE option (Store opens its writes that way)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pool_pre_ping: a connection that the server closed (a restart, an idle timeout) is replaced before use
        try:
            return sa.create_engine(url, json_serializer=dumps, pool_pre_ping=True)
        except sa.exc.NoSuchModuleError as e:
            raise BadRequest(f"database {parsed.render_as_string()!r}: SQLAlchemy knows no database "
                             f"{parsed.drivername!r} (for PostgreSQL write postgresql+psycopg://user@host/db)") from e
        except ModuleNotFoundError as e:
            raise UserError(f"database {parsed.render_as_string()!r}: its driver {e.name!r} is not installed "
                            f"(for PostgreSQL: pip install 'aigc[postgres]', which brings psycopg)") from e
    if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file:"):
        raise BadRequest(f"database {url!r}: give SQLite a file (sqlite:///path/to/aigc.db); an in-memory "
                         f"database is one per connection, and the store's threads would not share it")
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, json_serializer=dumps,
                              connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S})
    sa.event.listen(engine, "connect", _connect)
    sa.event.listen(engine, "begin", _begin)
    return engine


def _connect(dbapi_connection, connection_record) -> None:
    dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own: _begin does
    cursor = dbapi_connection.cursor()
    for pragma in (f"busy_timeout = {BUSY_TIMEOUT_S * 1000}", "foreign_keys = ON", "journal_mode = WAL",
                   "synchronous = NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _begin(connection: sa.Connection) -> None:
    # A deferred BEGIN that reads, then writes, cannot wait for the write lock: SQLite fails it at once with
    # "database is locked" (414 of 800 concurrent read-then-write transactions in a probe). BEGIN IMMEDIATE
    # takes the lock first, so the busy timeout applies (0 of 800 failed). Readers keep the deferred BEGIN:
    # in WAL mode they never wait.
    immediate = connection.get_execution_options().get(WRITE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """The Alembic configuration of the store's migrations (there is no alembic.ini); env.py migrates
    `connection`, inside its open transaction. Use it for any Alembic command:
    `with engine.begin() as c: alembic.command.downgrade(alembic_config(c), "base")`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def migrate(engine: sa.Engine) -> str:
    """Bring the database to the newest revision (one query when it is there already); returns that revision."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_heads()
    known = {s.revision for s in script.walk_revisions()}
    unknown = [r for r in current if r not in known]
    if unknown:
        raise Conflict(f"database {engine.url.render_as_string()!r} is at revision {unknown[0]!r}, which this "
                       f"version of aigc does not know (its newest is {head!r}): it was written by a newer "
                       f"aigc; upgrade aigc to use it")
    if tuple(current) != (head,):
        with engine.execution_options(**{WRITE: True}).begin() as connection:
            if connection.dialect.name == "postgresql":
                # one migrator at a time, as BEGIN IMMEDIATE does on SQLite: without it, servers opening a new
                # database at once each run CREATE TABLE and all but one fail (in one process, they hang).
                # The others wait here, then Alembic finds the database at head and does nothing.
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            command.upgrade(alembic_config(connection), "head")
    return head


# ----------------------------------------------------------------------------------
# rows as dicts


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value):
    if not isinstance(value, datetime):
        return value
    return (value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)).isoformat()


def _plain(row: Mapping) -> dict:
    return {key: _iso(value) for key, value in row.items()}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_of(field: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise BadRequest(f"{field} {value!r}: use one of {', '.join(allowed)}")


def _text(field: str, value) -> None:
    if value is not None and not (isinstance(value, str) and len(value) <= MAX_TEXT):
        raise BadRequest(f"{field}: give a text of at most {MAX_TEXT:,} characters")


def _no_nul(**fields) -> None:
    """PostgreSQL stores no NUL character in a text column, nor reads one back out of a JSON field (a request
    holding one would break every search): refused on every database, so that both take the same data. An
    output may hold one: it is stored as JSON's \\u0000 and only ever read whole."""
    for field, value in fields.items():
        if any("\x00" in text for text in _strings(value)):
            raise BadRequest(f"{field}: remove the NUL character (\\x00); the database cannot store it")


def _strings(value):
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


KEY_COLUMNS = [c for c in api_keys.c if c.name != "sha256"]  # what a key's row shows: never its hash


class Store:
    """The database at `url` (default_url() when None), opened and migrated to the newest revision.

    One Store serves many threads: each call takes a pooled connection for one transaction. Writes are one
    transaction each, and on SQLite they begin with BEGIN IMMEDIATE (_begin).
    """

    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        self.engine = create_engine(self.url)
        self._writer = self.engine.execution_options(**{WRITE: True})
        try:
            migrate(self.engine)
        except sa.exc.OperationalError as e:  # a server that is down, a wrong password, a locked file
            self.engine.dispose()
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            raise UserError(f"cannot open the database {self.engine.url.render_as_string()!r}: {reason}") from e
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------
    # generations

    def add_generation(self, *, run: str, modality: str, request: dict, output=None, file: str | None = None,
                       seed: int | None = None, family: str | None = None, run_path: str | None = None,
                       run_sha256: str | None = None, latency_s: float = 0.0, prompt_tokens: int | None = None,
                       completion_tokens: int | None = None, key_id: str | None = None, source: str = "api",
                       id: str | None = None, rerank: dict | None = None) -> str:
        """A generation's row; `rerank`: what best-of-n reranking chose ({best_of, candidates, chosen, scores,
        features}), for a generation that a reward model picked."""
        if not (isinstance(run, str) and run):
            raise BadRequest("run: give the name of the run that made the generation")
        _one_of("modality", modality, MODALITIES)
        _one_of("source", source, SOURCES)
        if not isinstance(request, dict):
            raise BadRequest("request: give the request as a dict")
        if rerank is not None and not isinstance(rerank, dict):
            raise BadRequest("rerank: give what the reranking chose as a dict")
        _no_nul(run=run, family=family, run_path=run_path, run_sha256=run_sha256, file=file, request=request,
                key_id=key_id, id=id)
        if seed is not None and not (_is_int(seed) and -2**63 <= seed < 2**63):
            raise BadRequest(f"seed {seed!r}: give an integer that fits in 64 bits")
        row = {"id": id or new_id("gen"), "created": _now(), "run": run, "run_path": run_path,
               "run_sha256": run_sha256, "modality": modality, "family": family, "source": source,
               "request": request, "seed": seed, "output": output, "file": file, "latency_s": float(latency_s),
               "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "key_id": key_id,
               "rerank": rerank}
        with self._writer.begin() as connection:
            self._check_key_id(connection, key_id)
            if connection.scalar(sa.select(generations.c.id).where(generations.c.id == row["id"])):
                raise Conflict(f"a generation with id {row['id']!r} exists already")
            connection.execute(generations.insert().values(row))
        return row["id"]

    def get_generation(self, id: str) -> dict:
        _no_nul(id=id)
        with self.engine.connect() as connection:
            return self._generation(connection, id)

    def list_generations(self, *, run: str | None = None, modality: str | None = None, rated: bool | None = None,
                         query: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
        """Newest first, each with its "ratings"; `query` is a case-insensitive substring of the request's prompt
        (or, for a chat request, of its messages)."""
        if not (_is_int(limit) and limit >= 0 and _is_int(offset) and offset >= 0):
            raise BadRequest(f"limit {limit!r}, offset {offset!r}: give integers >= 0")
        select = (sa.select(generations).where(*_filters(run, modality, rated, query))
                  .order_by(generations.c.created.desc(), generations.c.id.desc()).limit(limit).offset(offset))
        with self.engine.connect() as connection:
            rows = connection.execute(select).mappings().all()
            rated_rows = self._ratings_of(connection, [r["id"] for r in rows])
        return [{**_plain(r), "ratings": rated_rows[r["id"]]} for r in rows]

    def count_generations(self, *, run: str | None = None, modality: str | None = None, rated: bool | None = None,
                          query: str | None = None) -> int:
        select = sa.select(sa.func.count()).select_from(generations).where(*_filters(run, modality, rated, query))
        with self.engine.connect() as connection:
            return connection.scalar(select)

    def run_counts(self) -> dict[str, dict[str, int]]:
        """Per run name: its `generations` and their ratings by score, `liked` (+1), `neutral` (0) and `disliked`
        (-1); counted by the database (two grouped queries, in one snapshot), not row by row."""
        made = sa.select(generations.c.run, sa.func.count()).group_by(generations.c.run)
        scored = (sa.select(generations.c.run, ratings.c.score, sa.func.count())
                  .join(generations, ratings.c.generation_id == generations.c.id)
                  .group_by(generations.c.run, ratings.c.score))
        verdict = {1: "liked", 0: "neutral", -1: "disliked"}
        with self.engine.connect() as connection:
            out = {run: {"generations": n, "liked": 0, "neutral": 0, "disliked": 0}
                   for run, n in connection.execute(made)}
            for run, score, n in connection.execute(scored):
                out[run][verdict[score]] = n
        return out

    def export_jsonl(self, path, *, run: str | None = None) -> int:
        """Every generation (of `run`, when given), oldest first, one JSON object a line with its "ratings";
        the file is replaced atomically. Returns how many lines it has."""
        path = Path(path)
        if not path.parent.is_dir():
            raise NotFound(f"no such folder: {path.parent}")
        where = _filters(run, None, None, None)
        with self.engine.connect() as connection:  # one transaction: a consistent snapshot
            rows = connection.execute(sa.select(generations).where(*where)
                                      .order_by(generations.c.created, generations.c.id)).mappings().all()
            by_generation: dict[str, list[dict]] = {r["id"]: [] for r in rows}
            select = (sa.select(ratings).join(generations, ratings.c.generation_id == generations.c.id)
                      .where(*where).order_by(ratings.c.created, ratings.c.id))
            for rating in connection.execute(select).mappings():
                by_generation[rating["generation_id"]].append(_plain(rating))
        lines = [dumps({**_plain(r), "ratings": by_generation[r["id"]]}) + "\n" for r in rows]
        atomic_write_text(path, "".join(lines))
        return len(lines)

    # ------------------------------------------------------------------------------
    # ratings and votes

    def add_rating(self, generation_id: str, *, score: int, stars: int | None = None, comment: str | None = None,
                   index: int | None = None, key_id: str | None = None) -> dict:
        if not (_is_int(score) and score in (-1, 0, 1)):
            raise BadRequest(f"score {score!r}: use -1 (bad), 0 (neutral) or 1 (good)")
        if stars is not None and not (_is_int(stars) and 1 <= stars <= 5):
            raise BadRequest(f"stars {stars!r}: use an integer from 1 to 5")
        _text("comment", comment)
        _no_nul(generation_id=generation_id, comment=comment, key_id=key_id)
        if index is not None and not (_is_int(index) and index >= 0):
            raise BadRequest(f"index {index!r}: give the position (0, 1, ...) of the output rated")
        row = {"id": new_id("rating"), "generation_id": generation_id, "created": _now(), "score": score,
               "stars": stars, "comment": comment, "index": index, "key_id": key_id}
        with self._writer.begin() as connection:
            found = connection.execute(sa.select(generations.c.output).where(generations.c.id == generation_id))
            output = found.first()
            if output is None:
                raise NotFound(f"no such generation: {generation_id!r}")
            if index is not None and isinstance(output[0], list) and index >= len(output[0]):
                raise BadRequest(f"index {index}: generation {generation_id!r} has {len(output[0])} outputs")
            self._check_key_id(connection, key_id)
            connection.execute(ratings.insert().values(row))
        return _plain(row)

    def add_vote(self, left_id: str, right_id: str, winner: str, *, prompt: str | None = None,
                 key_id: str | None = None) -> dict:
        """A vote on two generations; its row as list_votes returns it (with both sides' runs)."""
        _one_of("winner", winner, WINNERS)
        if left_id == right_id:
            raise BadRequest(f"a vote compares two different generations; both sides are {left_id!r}")
        _text("prompt", prompt)
        _no_nul(left_id=left_id, right_id=right_id, prompt=prompt, key_id=key_id)
        row = {"id": new_id("vote"), "created": _now(), "left_id": left_id, "right_id": right_id, "winner": winner,
               "prompt": prompt, "key_id": key_id}
        with self._writer.begin() as connection:
            sides = self._sides(connection, left_id, right_id)
            self._check_key_id(connection, key_id)
            connection.execute(votes.insert().values(row))
        return {**_plain(row), "left_run": sides[left_id]["run"], "right_run": sides[right_id]["run"],
                "modality": sides[left_id]["modality"]}

    def list_votes(self, modality: str | None = None) -> list[dict]:
        """Every vote (of `modality`, when given), oldest first (the order a rating system such as Elo replays
        them in), each with `left_run` and `right_run`, the runs of its two sides, and `modality`, its left
        side's (a battle's two sides share one; aigc.evaluate.arena.leaderboard reads these rows)."""
        left, right = generations.alias("left_side"), generations.alias("right_side")
        select = (sa.select(votes, left.c.run.label("left_run"), right.c.run.label("right_run"),
                            left.c.modality.label("modality"))
                  .join(left, votes.c.left_id == left.c.id).join(right, votes.c.right_id == right.c.id)
                  .order_by(votes.c.created, votes.c.id))
        if modality is not None:
            _one_of("modality", modality, MODALITIES)
            select = select.where(left.c.modality == modality)
        with self.engine.connect() as connection:
            rows = connection.execute(select).mappings().all()
        return [_plain(r) for r in rows]

    # ------------------------------------------------------------------------------
    # arena battles

    def add_battle(self, *, modality: str, prompt: str | None, left_id: str, right_id: str,
                   key_id: str | None = None) -> dict:
        """A battle between two generations of `modality` made by two different runs, not yet voted on; its
        row. The web arena shows the two sides without their runs, then records the vote with vote_battle."""
        _one_of("modality", modality, MODALITIES)
        if left_id == right_id:
            raise BadRequest(f"a battle compares two different generations; both sides are {left_id!r}")
        _text("prompt", prompt)
        _no_nul(left_id=left_id, right_id=right_id, prompt=prompt, key_id=key_id)
        row = {"id": new_id("battle"), "created": _now(), "modality": modality, "prompt": prompt,
               "left_id": left_id, "right_id": right_id, "vote_id": None, "key_id": key_id}
        with self._writer.begin() as connection:
            sides = self._sides(connection, left_id, right_id)
            for side in (left_id, right_id):
                if sides[side]["modality"] != modality:
                    raise BadRequest(f"generation {side!r} is of modality {sides[side]['modality']!r}, not the "
                                     f"battle's {modality!r}: both sides must be of the battle's modality")
            if sides[left_id]["run"] == sides[right_id]["run"]:
                raise BadRequest(f"a battle is between two different runs; both sides were made by run "
                                 f"{sides[left_id]['run']!r}")
            self._check_key_id(connection, key_id)
            connection.execute(battles.insert().values(row))
        return _plain(row)

    def get_battle(self, id: str) -> dict:
        """The battle's row, with "left" and "right" (its generations, as get_generation returns them) and
        "vote" (its vote's row, or None before the vote)."""
        _no_nul(id=id)
        with self.engine.connect() as connection:
            return self._battle(connection, id)

    def vote_battle(self, battle_id: str, winner: str, *, key_id: str | None = None) -> dict:
        """Record the one vote on a battle (a votes row with the battle's sides and prompt) and link it to the
        battle, in one transaction; returns the battle as get_battle does. A second vote is a Conflict, however
        close the race."""
        _one_of("winner", winner, WINNERS)
        _no_nul(battle_id=battle_id, key_id=key_id)
        voted = Conflict(f"battle {battle_id!r}: this battle has a vote already")
        with self._writer.begin() as connection:
            battle = connection.execute(sa.select(battles).where(battles.c.id == battle_id)).mappings().first()
            if battle is None:
                raise NotFound(f"no such battle: {battle_id!r}")
            if battle["vote_id"] is not None:
                raise voted
            self._check_key_id(connection, key_id)
            vote = {"id": new_id("vote"), "created": _now(), "left_id": battle["left_id"],
                    "right_id": battle["right_id"], "winner": winner, "prompt": battle["prompt"], "key_id": key_id}
            connection.execute(votes.insert().values(vote))
            # Conditional, because on PostgreSQL two transactions can both have read a null vote_id above: the
            # second UPDATE waits for the first to commit, then finds vote_id set and changes no row, and the
            # Conflict rolls its vote back. (On SQLite, BEGIN IMMEDIATE runs them one after the other, and the
            # second stops at the check above.)
            linked = connection.execute(battles.update()
                                        .where(battles.c.id == battle_id, battles.c.vote_id.is_(None))
                                        .values(vote_id=vote["id"]))
            if linked.rowcount != 1:
                raise voted
            return self._battle(connection, battle_id)

    # ------------------------------------------------------------------------------
    # API keys

    def create_key(self, name: str) -> tuple[dict, str]:
        """A new key: its row and its secret, which is shown this once and never stored (only its sha256)."""
        if not (isinstance(name, str) and valid_name(name)):
            raise BadRequest(f"invalid key name {name!r}: use up to 128 letters, digits, '.', '_' and '-', "
                             f"starting with a letter or digit")
        secret = "aigc-" + secrets.token_urlsafe(32)  # 256 random bits
        row = {"id": new_id("key"), "name": name, "prefix": secret[:12], "sha256": _sha256(secret),
               "created": _now(), "revoked": None}
        taken = Conflict(f"an API key named {name!r} exists already (a revoked key keeps its name): "
                         f"choose another name")
        try:
            with self._writer.begin() as connection:
                if connection.scalar(sa.select(api_keys.c.id).where(api_keys.c.name == name)):
                    raise taken
                connection.execute(api_keys.insert().values(row))
        except sa.exc.IntegrityError as e:
            # PostgreSQL: another transaction made the name between our check and our insert (on SQLite,
            # BEGIN IMMEDIATE makes them wait); the unique index refused ours
            raise taken from e
        return _plain({k: v for k, v in row.items() if k != "sha256"}), secret

    def list_keys(self) -> list[dict]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(*KEY_COLUMNS).order_by(api_keys.c.created, api_keys.c.id))
            return [_plain(r) for r in rows.mappings()]

    def revoke_key(self, name_or_id: str) -> dict:
        """Revoke the key with this id, else this name; revoking a revoked key changes nothing."""
        _no_nul(name_or_id=name_or_id)
        with self._writer.begin() as connection:
            rows = connection.execute(sa.select(*KEY_COLUMNS).where(
                sa.or_(api_keys.c.id == name_or_id, api_keys.c.name == name_or_id))).mappings().all()
            if not rows:
                raise NotFound(f"no API key named {name_or_id!r} or with that id (see: aigc keys list)")
            row = dict(next((r for r in rows if r["id"] == name_or_id), rows[0]))
            if row["revoked"] is None:
                row["revoked"] = _now()
                connection.execute(api_keys.update().where(api_keys.c.id == row["id"]).values(revoked=row["revoked"]))
        return _plain(row)

    def has_keys(self) -> bool:
        with self.engine.connect() as connection:
            return bool(connection.scalar(sa.select(sa.exists().where(api_keys.c.revoked.is_(None)))))

    def check_key(self, secret: str) -> str | None:
        """The id of the active key whose secret this is, else None. Every active key's hash is compared, each
        in constant time, so the time taken tells nothing about how close a guess came."""
        if not isinstance(secret, str):
            return None
        digest = _sha256(secret)
        with self.engine.connect() as connection:
            active = connection.execute(sa.select(api_keys.c.id, api_keys.c.sha256)
                                        .where(api_keys.c.revoked.is_(None))).all()
        match = None
        for key_id, sha256 in active:
            if hmac.compare_digest(digest, sha256):
                match = key_id
        return match

    # ------------------------------------------------------------------------------
    # helpers

    def _generation(self, connection: sa.Connection, id: str) -> dict:
        row = connection.execute(sa.select(generations).where(generations.c.id == id)).mappings().first()
        if row is None:
            raise NotFound(f"no such generation: {id!r}")
        return {**_plain(row), "ratings": self._ratings_of(connection, [id])[id]}

    def _battle(self, connection: sa.Connection, id: str) -> dict:
        row = connection.execute(sa.select(battles).where(battles.c.id == id)).mappings().first()
        if row is None:
            raise NotFound(f"no such battle: {id!r}")
        vote = None
        if row["vote_id"] is not None:
            vote = _plain(connection.execute(sa.select(votes).where(votes.c.id == row["vote_id"])).mappings().one())
        return {**_plain(row), "left": self._generation(connection, row["left_id"]),
                "right": self._generation(connection, row["right_id"]), "vote": vote}

    @staticmethod
    def _sides(connection: sa.Connection, left_id: str, right_id: str) -> dict[str, Mapping]:
        """The run and modality of each side of a vote or a battle, by id; NotFound for a missing one."""
        found = {r["id"]: r for r in connection.execute(
            sa.select(generations.c.id, generations.c.run, generations.c.modality)
            .where(generations.c.id.in_([left_id, right_id]))).mappings()}
        for side in (left_id, right_id):
            if side not in found:
                raise NotFound(f"no such generation: {side!r}")
        return found

    @staticmethod
    def _ratings_of(connection: sa.Connection, ids: list[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {i: [] for i in ids}
        if ids:
            select = (sa.select(ratings).where(ratings.c.generation_id.in_(ids))
                      .order_by(ratings.c.created, ratings.c.id))
            for rating in connection.execute(select).mappings():
                out[rating["generation_id"]].append(_plain(rating))
        return out

    @staticmethod
    def _check_key_id(connection: sa.Connection, key_id: str | None) -> None:
        if key_id is not None and connection.scalar(sa.select(api_keys.c.id).where(api_keys.c.id == key_id)) is None:
            raise NotFound(f"no such API key: {key_id!r}")


def _filters(run: str | None, modality: str | None, rated: bool | None, query: str | None) -> list:
    _no_nul(run=run, query=query)
    where = []
    if run is not None:
        where.append(generations.c.run == run)
    if modality is not None:
        _one_of("modality", modality, MODALITIES)
        where.append(generations.c.modality == modality)
    if rated is not None:
        has_rating = sa.exists().where(ratings.c.generation_id == generations.c.id)
        where.append(has_rating if rated else ~has_rating)
    if query:
        # JSON paths are portable (SQLite json_extract, PostgreSQL ->>); an array comes back as its JSON text
        where.append(sa.or_(*(generations.c.request[field].as_string().icontains(query, autoescape=True)
                              for field in ("prompt", "messages"))))
    return where


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()
