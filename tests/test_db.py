"""aigc.db, the store of generations, ratings, votes and API keys: migrations (and that they match schema.py),
SQLite's settings and PostgreSQL's, every API call and its errors, keys that are never stored, and concurrent
writers. Every test that takes `store` or `db_url` runs twice, on SQLite and on PostgreSQL (conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from tests import postgres

import aigc.db
from aigc.db import Store, alembic_config, default_url, new_id
from aigc.db.schema import VERSION_TABLE, battles, metadata, votes
from aigc.errors import BadRequest, Conflict, NotFound, UserError

TABLES = {"api_keys", "battles", "generations", "ratings", "votes"}


@pytest.fixture
def store(db_url):
    with Store(db_url) as s:
        yield s


@pytest.fixture
def path(tmp_path):
    return tmp_path / "db" / "aigc.db"  # the folder does not exist yet: Store makes it


@pytest.fixture
def sqlite_store(path):
    with Store(f"sqlite:///{path}") as s:
        yield s


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def add(store: Store, prompt: str = "春江", **fields) -> str:
    return store.add_generation(**{"run": "gpt-tang", "modality": "text", "request": {"prompt": prompt},
                                   "output": ["one", "two"], **fields})


# ----------------------------------------------------------------------------------
# migrations


def test_a_new_database_is_at_head_in_its_own_version_table(store):
    assert tables(store.engine) == TABLES | {VERSION_TABLE}  # and no `alembic_version`: Optuna's to make
    with store.engine.connect() as c:
        assert MigrationContext.configure(c, opts={"version_table": VERSION_TABLE}).get_current_heads() == (head(),)


def test_downgrade_to_base_and_upgrade_again(store):
    add(store)
    with store.engine.begin() as c:
        command.downgrade(alembic_config(c), "base")
    assert tables(store.engine) == {VERSION_TABLE}
    with store.engine.begin() as c:
        command.upgrade(alembic_config(c), "head")
    assert tables(store.engine) == TABLES | {VERSION_TABLE}
    assert store.count_generations() == 0
    assert store.get_generation(add(store))["run"] == "gpt-tang"


def check_constraints(engine: sa.Engine, schema: str | None = None) -> dict[str, dict[str, str]]:
    inspector = sa.inspect(engine)
    return {t.name: {c["name"]: c["sqltext"] for c in inspector.get_check_constraints(t.name, schema=schema)}
            for t in metadata.sorted_tables}


def test_the_migrations_build_exactly_the_tables_of_schema_py(store):
    with store.engine.connect() as c:
        context = MigrationContext.configure(c, opts={"version_table": VERSION_TABLE, "compare_type": True})
        assert compare_metadata(context, metadata) == []
    # autogenerate does not compare CHECK constraints: compare their names and texts here. SQLite keeps a
    # constraint's text as written; PostgreSQL rewrites it (score = ANY (ARRAY[-1, 0, 1])), so there the oracle
    # is what metadata.create_all builds in a schema of its own
    if store.engine.dialect.name == "sqlite":
        wanted = {t.name: {c.name: str(c.sqltext) for c in t.constraints if isinstance(c, sa.CheckConstraint)}
                  for t in metadata.sorted_tables}
    else:
        with store.engine.begin() as c:
            c.exec_driver_sql("CREATE SCHEMA expected")
            metadata.create_all(c.execution_options(schema_translate_map={None: "expected"}))
        wanted = check_constraints(store.engine, "expected")
    assert sum(map(len, wanted.values())) == 6  # ratings' three, votes' two, battles' one: the oracle is not empty
    assert check_constraints(store.engine) == wanted


def test_opening_an_up_to_date_database_runs_no_migration(store, db_url, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("migrated an up-to-date database")

    monkeypatch.setattr(aigc.db.command, "upgrade", fail)
    with Store(db_url) as again:
        assert again.get_generation(add(store))["run"] == "gpt-tang"


def test_stores_opening_a_new_database_at_once_migrate_it_once(db_url):
    """Servers started together on a new database: one builds the tables, the others wait and find them built
    (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock; without it they deadlocked in one process)."""
    barrier, errors = threading.Barrier(8), []

    def open_store() -> None:
        try:
            barrier.wait()
            Store(db_url).close()
        except Exception as e:  # collected: the test asserts there is none
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    with Store(db_url) as store:
        assert tables(store.engine) == TABLES | {VERSION_TABLE} and add(store)


def test_a_database_from_a_newer_aigc_is_a_conflict(store, db_url):
    with store.engine.begin() as c:
        c.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(Conflict, match="'9999', which this version of aigc does not know.*upgrade aigc"):
        Store(db_url)


def test_the_default_database_is_in_aigc_home_unless_aigc_database_url_says(aigc_home, tmp_path, monkeypatch):
    assert default_url() == f"sqlite:///{aigc_home / 'aigc.db'}"
    with Store() as s:
        assert s.url == default_url() and (aigc_home / "aigc.db").is_file()
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}"
    monkeypatch.setenv("AIGC_DATABASE_URL", other)
    assert default_url() == other
    with pytest.raises(BadRequest, match="give SQLite a file"):
        Store("sqlite://")


def test_a_database_that_cannot_be_opened_is_one_clear_error():
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=rf"cannot open the database 'postgresql\+psycopg://aigc:\*\*\*@127.0.0.1:"
                                        rf"{port}/aigc': connection failed.*refused"):
        Store(f"postgresql+psycopg://aigc:secret@127.0.0.1:{port}/aigc")  # the password is never shown
    with pytest.raises(UserError, match="driver 'pg8000' is not installed.*pip install 'aigc\\[postgres\\]'"):
        Store("postgresql+pg8000://aigc@127.0.0.1/aigc")
    with pytest.raises(BadRequest, match="knows no database 'postgres'.*postgresql\\+psycopg://"):
        Store("postgres://aigc@127.0.0.1/aigc")


def test_aigc_db_imports_no_torch_numpy_or_pandas():
    script = ("import sys, aigc.db\n"
              "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'numpy', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------
# SQLite's settings, and PostgreSQL's


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(sqlite_store, path):
    assert path.is_file()  # its folder did not exist: Store made it
    with sqlite_store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL: no fsync per commit (docs/store.md)
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_writes_take_the_write_lock_at_begin_and_reads_do_not(sqlite_store, path):
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with sqlite_store._writer.begin():  # BEGIN IMMEDIATE: the lock is taken before any statement
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    with sqlite_store.engine.connect() as c:  # a reader, mid-transaction, leaves writers free
        c.exec_driver_sql("SELECT count(*) FROM generations").scalar()
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    other.close()


def test_postgresql_connections_that_died_are_replaced_before_use(postgres_database):
    """A database restart or an idle timeout closes the pool's connections: pool_pre_ping finds the dead one
    and opens another, instead of failing the next request."""
    with Store(postgres_database) as store:
        gen = add(store)
        with store.engine.connect() as c:  # the pool's one connection (the calls so far ran one at a time)
            mine = c.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        killer = sa.create_engine(postgres_database, poolclass=sa.NullPool)
        with killer.connect() as c:
            assert c.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": mine}).scalar()
        killer.dispose()
        assert store.get_generation(gen)["id"] == gen
        assert store.add_rating(gen, score=1)["generation_id"] == gen


def test_times_come_back_in_utc_whatever_the_servers_time_zone(postgres_database):
    with Store(postgres_database) as store:
        with store.engine.connect() as c:
            zone = c.exec_driver_sql("SHOW TimeZone").scalar()
        gen = add(store)
        created = datetime.fromisoformat(store.get_generation(gen)["created"])
        assert created.utcoffset().total_seconds() == 0
        assert abs((datetime.now(UTC) - created).total_seconds()) < 60
    if not os.environ.get(postgres.ENV):
        assert zone == postgres.TIMEZONE  # the throwaway cluster's zone (UTC+8): a real conversion was made


CHECKS = [  # (table, a row that breaks a CHECK constraint: "GEN" and "OTHER" are two generations, its name)
    ("ratings", {"generation_id": "GEN", "score": 2}, "ck_ratings_score"),
    ("ratings", {"generation_id": "GEN", "score": 1, "stars": 6}, "ck_ratings_stars"),
    ("ratings", {"generation_id": "GEN", "score": 1, "index": -1}, "ck_ratings_index"),
    ("votes", {"left_id": "GEN", "right_id": "OTHER", "winner": "draw"}, "ck_votes_winner"),
    ("votes", {"left_id": "GEN", "right_id": "GEN", "winner": "tie"}, "ck_votes_sides"),
    ("battles", {"modality": "text", "left_id": "GEN", "right_id": "GEN"}, "ck_battles_sides"),
]


def test_the_foreign_keys_and_checks_hold_even_for_sql_that_skips_the_store(store):
    with pytest.raises(NotFound, match="no such generation: 'gen-missing'"):
        store.add_rating("gen-missing", score=1)
    gens = {"GEN": add(store), "OTHER": add(store)}
    ratings = metadata.tables["ratings"]
    with pytest.raises(sa.exc.IntegrityError, match="(?i)foreign key"), store.engine.begin() as c:
        c.execute(ratings.insert().values(id="r1", generation_id="gen-missing", created=datetime.now(UTC), score=1))
    for table, row, constraint in CHECKS:
        values = {"id": "x1", "created": datetime.now(UTC), **{k: gens.get(v, v) for k, v in row.items()}}
        with pytest.raises(sa.exc.IntegrityError, match=f"(?i)check constraint.*{constraint}"), \
                store.engine.begin() as c:
            c.execute(metadata.tables[table].insert().values(values))
    left = gens["GEN"]
    store.add_rating(left, score=1)
    with store.engine.begin() as c:  # a generation's ratings go with it
        c.execute(sa.text("DELETE FROM generations WHERE id = :g"), {"g": left})
        assert c.execute(sa.text("SELECT count(*) FROM ratings")).scalar() == 0


# ----------------------------------------------------------------------------------
# generations, ratings, votes


def test_a_generation_and_its_ratings_round_trip(store):
    key, _ = store.create_key("studio")
    fields = {"run": "gpt-tang", "modality": "text", "request": {"prompt": "床前", "n": 2, "seed": 7},
              "output": ["明月光", "疑是地上霜"], "file": None, "seed": 2**40, "family": "gpt",
              "run_path": "/runs/gpt-tang", "run_sha256": "ab" * 32, "latency_s": 0.25, "prompt_tokens": 2,
              "completion_tokens": 8, "key_id": key["id"], "source": "cli",
              "rerank": {"best_of": 2, "candidates": 4, "chosen": [1, 2], "scores": [0.5, -0.25], "features": "x"}}
    gen = store.add_generation(**fields)
    assert gen.startswith("gen-") and len(gen) == 28
    first = store.add_rating(gen, score=1, stars=5, comment="好", index=1, key_id=key["id"])
    second = store.add_rating(gen, score=-1)
    row = store.get_generation(gen)
    assert {k: row[k] for k in fields} == fields
    assert datetime.fromisoformat(row["created"]).utcoffset().total_seconds() == 0
    assert row["ratings"] == [first, second]
    assert first == {**first, "generation_id": gen, "score": 1, "stars": 5, "comment": "好", "index": 1,
                     "key_id": key["id"]}
    json.dumps(row)  # plain, JSON-serialisable
    fixed = store.add_generation(id="gen-fixed", run="dcgan-digits", modality="image", request={"class": 3},
                                 output={"class": 3}, file="generations/gen-fixed.png", source="studio")
    assert store.get_generation(fixed)["file"] == "generations/gen-fixed.png"
    for seed in (-2**63, 2**63 - 1):  # BIGINT at both ends
        assert store.get_generation(add(store, seed=seed))["seed"] == seed
    with pytest.raises(Conflict, match="exists already"):
        store.add_generation(id="gen-fixed", run="r", modality="image", request={})


def test_list_generations_filters_pages_and_puts_the_newest_first(store):
    a = add(store, "春眠不觉晓")
    b = add(store, "Hello World", run="gpt-fortunes")
    c = store.add_generation(run="ar-airline", modality="series", request={"horizon": 12}, output={"mean": [1.0]})
    d = store.add_generation(run="gpt-tang", modality="text", request={"messages": [{"role": "user",
                                                                                       "content": "夜来风雨声"}]})
    store.add_rating(b, score=0)
    store.add_rating(c, score=1)
    ids = [g["id"] for g in store.list_generations()]
    assert ids == [d, c, b, a]
    assert [g["id"] for g in store.list_generations(run="gpt-tang")] == [d, a]
    assert [g["id"] for g in store.list_generations(modality="series")] == [c]
    assert [g["id"] for g in store.list_generations(rated=True)] == [c, b]
    assert [g["id"] for g in store.list_generations(rated=False)] == [d, a]
    assert [g["id"] for g in store.list_generations(query="hello world")] == [b]  # case-insensitive
    assert [g["id"] for g in store.list_generations(query="不觉")] == [a]
    assert [g["id"] for g in store.list_generations(query="风雨")] == [d]  # a chat request's messages
    assert store.list_generations(query="%") == []  # LIKE's wildcards are plain characters
    assert [g["id"] for g in store.list_generations(limit=2, offset=1)] == [c, b]
    assert store.list_generations(run="gpt-tang", rated=True) == []
    assert store.list_generations(rated=True)[1]["ratings"][0]["score"] == 0
    assert store.count_generations() == 4
    assert store.count_generations(run="gpt-tang", rated=False) == 2
    assert store.count_generations(query="HELLO") == 1
    with pytest.raises(BadRequest, match="modality 'audio'"):
        store.list_generations(modality="audio")
    with pytest.raises(BadRequest, match="limit -1"):
        store.list_generations(limit=-1)


def test_export_jsonl_writes_every_generation_oldest_first_with_its_ratings(store, tmp_path):
    a, b = add(store, "一"), add(store, "二", run="other")
    rating = store.add_rating(a, score=1, comment="ok")
    out = tmp_path / "export.jsonl"
    assert store.export_jsonl(out) == 2
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["id"] for g in lines] == [a, b]
    assert lines[0] == store.get_generation(a) and lines[0]["ratings"] == [rating]
    assert "一" in out.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert store.export_jsonl(out, run="other") == 1
    assert json.loads(out.read_text(encoding="utf-8"))["id"] == b
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    with pytest.raises(NotFound, match="no such folder"):
        store.export_jsonl(tmp_path / "missing" / "x.jsonl")


def test_an_output_with_a_nul_character_round_trips_and_search_still_works(store):
    gen = add(store, "春江", output=["a\x00b"])
    assert store.get_generation(gen)["output"] == ["a\x00b"]
    assert [g["id"] for g in store.list_generations(query="春")] == [gen]


def test_run_counts_count_each_runs_generations_and_its_ratings_by_score(store):
    assert store.run_counts() == {}
    a, b, c = add(store), add(store), add(store, run="gpt-fortunes")
    for gen, score in ((a, 1), (a, 1), (a, -1), (b, 0), (b, 1)):
        store.add_rating(gen, score=score)
    store.add_generation(run="vae-digits", modality="image", request={"class": 3})
    store.add_rating(c, score=-1, stars=1)
    assert store.run_counts() == {"gpt-tang": {"generations": 2, "liked": 3, "neutral": 1, "disliked": 1},
                                  "gpt-fortunes": {"generations": 1, "liked": 0, "neutral": 0, "disliked": 1},
                                  "vae-digits": {"generations": 1, "liked": 0, "neutral": 0, "disliked": 0}}


def test_votes_round_trip(store):
    a, b = add(store), add(store)
    first = store.add_vote(a, b, "left", prompt="春江")
    second = store.add_vote(b, a, "both_bad")
    assert store.list_votes() == [first, second]
    assert first == {**first, "left_id": a, "right_id": b, "winner": "left", "prompt": "春江", "key_id": None}
    assert first["id"].startswith("vote-")


def test_votes_carry_their_runs_and_modality_and_filter_by_modality(store):
    a, b = add(store), add(store, run="gpt-fortunes")
    x = store.add_generation(run="dcgan-digits", modality="image", request={"class": 3})
    y = store.add_generation(run="vae-digits", modality="image", request={"class": 3})
    first = store.add_vote(a, b, "right")
    battle = store.add_battle(modality="image", prompt="3", left_id=x, right_id=y)
    second = store.vote_battle(battle["id"], "tie")["vote"]
    rows = store.list_votes()
    assert rows[0] == first == {**first, "left_run": "gpt-tang", "right_run": "gpt-fortunes", "modality": "text"}
    assert rows[1] == {**second, "left_run": "dcgan-digits", "right_run": "vae-digits", "modality": "image"}
    assert store.list_votes(modality="image") == rows[1:] and store.list_votes(modality="series") == []
    with pytest.raises(BadRequest, match="modality 'audio'"):
        store.list_votes(modality="audio")


# ----------------------------------------------------------------------------------
# arena battles


def battle_sides(store: Store) -> tuple[str, str]:
    return add(store, "春江"), add(store, "春江", run="gpt-fortunes")


def new_battle(store: Store) -> dict:
    left, right = battle_sides(store)
    return store.add_battle(modality="text", prompt="春江", left_id=left, right_id=right)


def count(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as c:
        return c.scalar(sa.select(sa.func.count()).select_from(table))


def test_a_battle_and_its_vote_round_trip(store):
    key, _ = store.create_key("arena")
    left, right = battle_sides(store)
    row = store.add_battle(modality="text", prompt="春江", left_id=left, right_id=right, key_id=key["id"])
    assert row["id"].startswith("battle-") and len(row["id"]) == 31
    assert row == {"id": row["id"], "created": row["created"], "modality": "text", "prompt": "春江",
                   "left_id": left, "right_id": right, "vote_id": None, "key_id": key["id"]}
    battle = store.get_battle(row["id"])
    assert battle == {**row, "left": store.get_generation(left), "right": store.get_generation(right), "vote": None}
    assert battle["left"]["run"] == "gpt-tang" and battle["right"]["run"] == "gpt-fortunes"

    voted = store.vote_battle(row["id"], "both_bad", key_id=key["id"])
    vote = voted["vote"]
    assert voted == {**battle, "vote_id": vote["id"], "vote": vote} == store.get_battle(row["id"])
    assert vote == {"id": vote["id"], "created": vote["created"], "left_id": left, "right_id": right,
                    "winner": "both_bad", "prompt": "春江", "key_id": key["id"]}
    assert [v["id"] for v in store.list_votes()] == [vote["id"]]
    json.dumps(voted)
    untitled = store.add_battle(modality="text", prompt=None, left_id=right, right_id=left)  # no prompt, sides swapped
    assert store.vote_battle(untitled["id"], "left")["vote"]["prompt"] is None


def test_a_battle_refuses_unknown_ids_and_sides_that_do_not_match(store):
    left, right = battle_sides(store)
    same_run = add(store)
    image = store.add_generation(run="dcgan-digits", modality="image", request={"class": 3})
    refused = [
        ({"left_id": left, "right_id": "gen-nope"}, NotFound, "no such generation: 'gen-nope'"),
        ({"left_id": "gen-nope", "right_id": right}, NotFound, "no such generation: 'gen-nope'"),
        ({"left_id": left, "right_id": right, "key_id": "key-nope"}, NotFound, "no such API key: 'key-nope'"),
        ({"left_id": left, "right_id": left}, BadRequest, "two different generations"),
        ({"left_id": left, "right_id": same_run}, BadRequest, "two different runs; both sides were made by run "
                                                              "'gpt-tang'"),
        ({"left_id": left, "right_id": image}, BadRequest, f"generation '{image}' is of modality 'image', not the "
                                                           f"battle's 'text'"),
        ({"left_id": left, "right_id": right, "modality": "audio"}, BadRequest, "modality 'audio'"),
        ({"left_id": left, "right_id": right, "prompt": "x" * 10_001}, BadRequest, "at most 10,000"),
        ({"left_id": left, "right_id": right, "prompt": "a\x00"}, BadRequest, "prompt: remove the NUL"),
    ]
    for fields, error, match in refused:
        with pytest.raises(error, match=match):
            store.add_battle(**{"modality": "text", "prompt": "春江", **fields})
    battle = store.add_battle(modality="text", prompt="春江", left_id=left, right_id=right)
    for call, error, match in [
        (lambda: store.get_battle("battle-nope"), NotFound, "no such battle: 'battle-nope'"),
        (lambda: store.vote_battle("battle-nope", "left"), NotFound, "no such battle: 'battle-nope'"),
        (lambda: store.vote_battle(battle["id"], "draw"), BadRequest, "winner 'draw': use one of left, right"),
        (lambda: store.vote_battle(battle["id"], "left", key_id="key-nope"), NotFound, "no such API key"),
        (lambda: store.get_battle("battle-\x00"), BadRequest, "id: remove the NUL"),
    ]:
        with pytest.raises(error, match=match):
            call()
    assert count(store, battles) == 1 and store.list_votes() == []
    assert store.get_battle(battle["id"])["vote"] is None


def test_a_battle_takes_one_vote(store):
    battle = new_battle(store)
    first = store.vote_battle(battle["id"], "left")
    with pytest.raises(Conflict, match=f"battle '{battle['id']}': this battle has a vote already"):
        store.vote_battle(battle["id"], "right")
    assert store.get_battle(battle["id"]) == first and count(store, votes) == 1


def test_eight_voters_racing_on_one_battle_make_one_vote(store):
    battle = new_battle(store)
    barrier, outcomes = threading.Barrier(8), []

    def vote(winner: str) -> None:
        barrier.wait()
        try:
            outcomes.append(store.vote_battle(battle["id"], winner)["vote"]["id"])
        except Conflict as e:
            outcomes.append(str(e))
        except Exception as e:  # collected: the test asserts there is none
            outcomes.append(repr(e))

    threads = [threading.Thread(target=vote, args=(("left", "right")[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [o for o in outcomes if o.startswith("vote-")]
    assert len(winners) == 1 and len(outcomes) == 8
    assert sorted(set(outcomes) - set(winners)) == [f"battle '{battle['id']}': this battle has a vote already"]
    assert [v["id"] for v in store.list_votes()] == winners == [store.get_battle(battle["id"])["vote_id"]]


def test_a_vote_that_loses_the_race_after_its_check_is_rolled_back(store):
    """Another voter links its vote while this one is between its check (vote_id null) and its UPDATE: the
    conditional UPDATE changes no row, and this vote's row goes with the Conflict. On PostgreSQL the UPDATE
    waits for the other's row lock; on SQLite, BEGIN IMMEDIATE waits for the other's transaction instead."""
    battle = new_battle(store)
    left, right = battle["left_id"], battle["right_id"]
    outcome = []

    def vote() -> None:
        try:
            outcome.append(store.vote_battle(battle["id"], "left"))
        except Exception as e:  # collected: the test asserts what it is
            outcome.append(e)

    with store._writer.begin() as c:  # the other voter, mid-transaction
        c.execute(votes.insert().values(id="vote-first", created=datetime.now(UTC), left_id=left, right_id=right,
                                        winner="tie"))
        c.execute(battles.update().where(battles.c.id == battle["id"]).values(vote_id="vote-first"))
        thread = threading.Thread(target=vote)
        thread.start()
        deadline = time.monotonic() + 30
        if store.engine.dialect.name == "postgresql":  # until its UPDATE waits for our row lock
            with store.engine.connect() as watcher:
                while not watcher.scalar(sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted")):
                    assert time.monotonic() < deadline and thread.is_alive(), outcome
                    time.sleep(0.01)
        else:
            time.sleep(0.2)
    thread.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert [v["id"] for v in store.list_votes()] == ["vote-first"]
    assert store.get_battle(battle["id"])["vote"]["winner"] == "tie"


ERRORS = [  # (method, arguments: "GEN" and "OTHER" are two generations, keywords, error, message)
    ("add_rating", ["GEN"], {"score": 2}, BadRequest, "score 2"),
    ("add_rating", ["GEN"], {"score": True}, BadRequest, "score True"),
    ("add_rating", ["GEN"], {"score": 1, "stars": 0}, BadRequest, "stars 0"),
    ("add_rating", ["GEN"], {"score": 1, "stars": 6}, BadRequest, "stars 6"),
    ("add_rating", ["GEN"], {"score": 1, "comment": "x" * 10_001}, BadRequest, "at most 10,000"),
    ("add_rating", ["GEN"], {"score": 1, "index": -1}, BadRequest, "index -1"),
    ("add_rating", ["GEN"], {"score": 1, "index": 2}, BadRequest, "has 2 outputs"),
    ("add_rating", ["GEN"], {"score": 1, "key_id": "key-nope"}, NotFound, "no such API key"),
    ("add_vote", ["GEN", "GEN", "left"], {}, BadRequest, "two different generations"),
    ("add_vote", ["GEN", "gen-nope", "tie"], {}, NotFound, "'gen-nope'"),
    ("add_vote", ["GEN", "OTHER", "draw"], {}, BadRequest, "winner 'draw': use one of left, right, tie"),
    ("add_vote", ["GEN", "OTHER", "tie"], {"prompt": "x" * 10_001}, BadRequest, "at most 10,000"),
    ("get_generation", ["gen-nope"], {}, NotFound, "no such generation: 'gen-nope'"),
    ("add_generation", [], {"run": "r", "modality": "audio", "request": {}}, BadRequest, "modality 'audio'"),
    ("add_generation", [], {"run": "r", "modality": "text", "request": {}, "source": "web"}, BadRequest,
     "source 'web'"),
    ("add_generation", [], {"run": "r", "modality": "text", "request": {}, "seed": 2**64}, BadRequest, "64 bits"),
    ("add_generation", [], {"run": "r", "modality": "text", "request": "hi"}, BadRequest, "request"),
    ("add_generation", [], {"run": "", "modality": "text", "request": {}}, BadRequest, "run"),
    # PostgreSQL stores no NUL character: refused on both databases alike
    ("add_generation", [], {"run": "r", "modality": "text", "request": {"messages": [{"content": "a\x00"}]}},
     BadRequest, r"request: remove the NUL character \(\\x00\)"),
    ("add_generation", [], {"run": "r\x00", "modality": "text", "request": {}}, BadRequest, "run: remove the NUL"),
    ("add_rating", ["GEN"], {"score": 1, "comment": "a\x00b"}, BadRequest, "comment: remove the NUL"),
    ("add_vote", ["GEN", "OTHER", "tie"], {"prompt": "\x00"}, BadRequest, "prompt: remove the NUL"),
    ("get_generation", ["gen-\x00"], {}, BadRequest, "id: remove the NUL"),
    ("list_generations", [], {"query": "\x00"}, BadRequest, "query: remove the NUL"),
    ("revoke_key", ["\x00"], {}, BadRequest, "name_or_id: remove the NUL"),
]


@pytest.mark.parametrize(("method", "args", "kwargs", "error", "match"), ERRORS)
def test_user_errors_are_typed_with_one_clear_sentence(store, method, args, kwargs, error, match):
    gens = {"GEN": add(store), "OTHER": add(store)}
    with pytest.raises(error, match=match):
        getattr(store, method)(*[gens.get(a, a) for a in args], **kwargs)
    assert store.count_generations() == 2 and store.count_generations(rated=True) == 0
    assert store.list_votes() == []


# ----------------------------------------------------------------------------------
# API keys


def test_keys_are_checked_by_hash_and_never_stored(store):
    assert not store.has_keys()
    row, secret = store.create_key("alice")
    assert secret.startswith("aigc-") and len(secret) == 5 + 43  # token_urlsafe(32): 256 bits
    assert row == {"id": row["id"], "name": "alice", "prefix": secret[:12], "created": row["created"],
                   "revoked": None}
    other, other_secret = store.create_key("bob")
    assert store.has_keys()
    assert store.check_key(secret) == row["id"] and store.check_key(other_secret) == other["id"]
    assert store.check_key(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.check_key("") is None
    assert [k["name"] for k in store.list_keys()] == ["alice", "bob"]
    assert all("sha256" not in k for k in store.list_keys())
    assert secret[8:] not in every_value(store)

    revoked = store.revoke_key("alice")
    assert revoked["revoked"] is not None and store.check_key(secret) is None
    assert store.revoke_key(row["id"]) == revoked  # by id as well; a second revoke changes nothing
    assert store.has_keys()
    store.revoke_key(other["id"])
    assert not store.has_keys() and store.check_key(other_secret) is None
    with pytest.raises(Conflict, match="'alice' exists already"):
        store.create_key("alice")
    with pytest.raises(NotFound, match="no API key named 'carol'"):
        store.revoke_key("carol")
    for bad in ("", "two words", "../x", "-x", "x" * 129):
        with pytest.raises(BadRequest, match="invalid key name"):
            store.create_key(bad)


def every_value(store: Store) -> str:
    """Every value in every table, as one text (what a dump of the database would hold)."""
    with store.engine.connect() as c:
        return repr([c.execute(sa.select(t)).all() for t in metadata.sorted_tables])


def test_a_keys_secret_is_in_no_byte_of_the_sqlite_files(sqlite_store, path):
    _, secret = sqlite_store.create_key("alice")
    everything = b"".join(p.read_bytes() for p in path.parent.iterdir())  # the database, its WAL and shm
    assert secret.encode() not in everything and secret[8:].encode() not in everything



# ----------------------------------------------------------------------------------
# concurrency


def write_all_at_once(stores: list[Store], n_threads: int = 16, n_each: int = 25) -> list[Exception]:
    """n_threads threads, released together, each adding n_each generations and rating each one (a read, then a
    write, in one transaction): the pattern that fails with a deferred BEGIN."""
    barrier = threading.Barrier(n_threads)
    errors: list[Exception] = []

    def work(store: Store, worker: int) -> None:
        try:
            barrier.wait()
            for i in range(n_each):
                gen = store.add_generation(run=f"run-{worker}", modality="text", request={"prompt": f"{worker}-{i}"},
                                           output=["x"], id=new_id("gen"))
                store.add_rating(gen, score=1, index=0)
        except Exception as e:  # collected: the test asserts there is none
            errors.append(e)

    threads = [threading.Thread(target=work, args=(stores[i % len(stores)], i)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def sqlite_integrity(store: Store) -> str:
    """PRAGMA integrity_check of a SQLite store ("ok"); PostgreSQL has no such check, nor any need of one."""
    if store.engine.dialect.name != "sqlite":
        return "ok"
    with closing(sqlite3.connect(store.engine.url.database)) as c:
        return c.execute("PRAGMA integrity_check").fetchone()[0]


def test_sixteen_threads_on_one_store_lose_nothing(store):
    assert write_all_at_once([store]) == []
    assert store.count_generations() == 400
    assert store.count_generations(rated=True) == 400
    with store.engine.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM ratings").scalar() == 400
    assert sqlite_integrity(store) == "ok"


def test_two_stores_on_one_database_lose_nothing(store, db_url):
    with Store(db_url) as second:
        assert write_all_at_once([store, second]) == []
        assert second.count_generations(rated=True) == 400
    assert sqlite_integrity(store) == "ok"


def test_sixteen_threads_creating_one_key_name_make_one_key(store):
    """Each checks that the name is free, then inserts: on PostgreSQL two can pass the check at once, and the
    unique index refuses the second, which must then be the same Conflict as a plain second create."""
    barrier, outcomes = threading.Barrier(16), []

    def create() -> None:
        barrier.wait()
        try:
            outcomes.append(store.create_key("shared")[0]["name"])
        except Conflict as e:
            outcomes.append(str(e))
        except Exception as e:  # collected: the test asserts there is none
            outcomes.append(repr(e))

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes)[-1] == "shared"
    assert sorted(outcomes)[:-1] == ["an API key named 'shared' exists already (a revoked key keeps its name): "
                                     "choose another name"] * 15
    assert [k["name"] for k in store.list_keys()] == ["shared"]
