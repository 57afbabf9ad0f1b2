"""What kill -9 of a server leaves in its store, on SQLite and on PostgreSQL: a database that opens and takes
writes, and every row the server answered 200 for before it died. SQLite's write-ahead log is left behind
un-checkpointed, and the next connection recovers it (PRAGMA integrity_check says "ok")."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from tests.test_server import start_server, stop_server, train_runs

from aigc.db import Store

N_GENERATORS, N_RATERS = 4, 4  # client threads: generating at max_tokens 4096, and rating what was answered
KILL_AFTER_GENERATIONS, KILL_AFTER_RATINGS = 8, 24  # answered before the kill


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder with one n-gram poet."""
    home = tmp_path_factory.mktemp("fault_runs")
    train_runs(home, ("poet",))
    return home / "runs"


class Load:
    """Client threads that keep a server busy until it dies: generators ask for long completions one after
    another (several in flight or queued at any moment), raters rate each generation answered. What was
    answered 200 is kept; so is every request that the kill cut off."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.generations: list[str] = []  # ids answered 200
        self.ratings: list[tuple[str, str]] = []  # (generation id, rating id) answered 200
        self.cut: list[str] = []  # requests in flight when the server died
        self.errors: list[str] = []  # any other answer than 200 (the test asserts there is none)
        self.threads = [threading.Thread(target=self._generate, args=(i,)) for i in range(N_GENERATORS)]
        self.threads += [threading.Thread(target=self._rate, args=(i,)) for i in range(N_RATERS)]

    def ready(self) -> bool:
        return len(self.generations) >= KILL_AFTER_GENERATIONS and len(self.ratings) >= KILL_AFTER_RATINGS

    def _generate(self, worker: int) -> None:
        with httpx.Client(timeout=60) as http:
            for i in range(10**6):
                if self.stop.is_set():
                    return
                try:
                    done = http.post(f"{self.url}/v1/completions", json={
                        "model": "poet", "prompt": "", "max_tokens": 4096, "temperature": 2.0,
                        "seed": 1000 * worker + i})
                except httpx.TransportError as e:
                    self.cut.append(f"completion: {e!r}")
                    return
                if done.status_code != 200:
                    self.errors.append(done.text)
                    return
                self.generations.append(done.json()["id"])

    def _rate(self, worker: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                if not self.generations:
                    time.sleep(0.01)
                    continue
                gen = self.generations[-1 - worker % len(self.generations)]
                try:
                    rated = http.post(f"{self.url}/v1/generations/{gen}/ratings", json={"score": 1,
                                                                                        "comment": "好" * 500})
                except httpx.TransportError as e:
                    self.cut.append(f"rating: {e!r}")
                    return
                if rated.status_code != 200:
                    self.errors.append(rated.text)
                    return
                self.ratings.append((gen, rated.json()["id"]))


def sqlite_files(url: str) -> tuple[Path, Path]:
    database = Path(sa.make_url(url).database)
    return database, database.with_name(database.name + "-wal")


def test_kill_9_mid_generation_loses_no_answered_row_and_the_database_opens(db_url, runs, tmp_path):
    proc, url = start_server(tmp_path, "--runs", str(runs), "--database", db_url, "--rate-limit", "0")
    load = Load(url)
    try:
        for t in load.threads:
            t.start()
        deadline = time.monotonic() + 60
        while not load.ready() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        assert load.ready(), f"{len(load.generations)} generations and {len(load.ratings)} ratings in 60 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = time.monotonic()
        load.stop.set()
        for t in load.threads:
            t.join(timeout=60)
    finally:
        load.stop.set()
        stop_server(proc)
    assert proc.returncode == -signal.SIGKILL and load.errors == []
    assert load.cut, "no request was in flight at the kill"  # it died mid-way, not idle

    if db_url.startswith("sqlite"):
        database, wal = sqlite_files(db_url)
        assert wal.stat().st_size > 0  # the log was never checkpointed into the database: recovery is needed
        with closing(sqlite3.connect(database)) as c:  # the first connection recovers the log
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Store(db_url) as store:
        for gen in load.generations:  # every generation answered 200 before the kill
            assert store.get_generation(gen)["run"] == "poet"
        rows = {r["id"] for g in set(load.generations) for r in store.get_generation(g)["ratings"]}
        assert {rating for _, rating in load.ratings} <= rows  # and every rating
        fresh = store.add_generation(run="poet", modality="text", request={"prompt": "after"}, output=["x"])
        store.add_rating(load.generations[0], score=-1)
        store.add_rating(fresh, score=1)
        assert store.get_generation(fresh)["ratings"][0]["score"] == 1
        if store.engine.dialect.name == "postgresql":
            left = leftover_connections(store, killed_at)
            assert left == 0, f"{left} connections of the killed server still open"
    if db_url.startswith("sqlite"):
        assert not wal.exists()  # the last connection closed checkpointed the recovered log into the database
        with closing(sqlite3.connect(database)) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def leftover_connections(store: Store, since: float, timeout: float = 10) -> int:
    """How many connections to the store's database, other than this store's, are still open `timeout` s
    after `since` (PostgreSQL ends a killed client's sessions, rolling back its open transactions, when it sees
    the socket closed)."""
    count = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    with store.engine.connect() as c:
        while True:
            left = c.exec_driver_sql(count).scalar()
            c.rollback()  # pg_stat_activity is a snapshot per transaction
            if left == 0 or time.monotonic() > since + timeout:
                return left
            time.sleep(0.05)
