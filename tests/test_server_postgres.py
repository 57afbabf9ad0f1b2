"""`aigc serve --database postgresql+psycopg://...` for real: two servers on one PostgreSQL database (started at
once, so that both migrate it together), sixteen threads that lose no row, a generation made by one server and
read and rated through the other, and API keys that both honour the moment the shared store changes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tests import postgres
from tests.test_server import start_server, stop_server, train_runs

from aigc.db import Store


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An AIGC_HOME with one run, an n-gram poet (trained in a fraction of a second)."""
    home = tmp_path_factory.mktemp("pg_served")
    train_runs(home, ("poet",))
    return home


@pytest.fixture(scope="module")
def servers(home, postgres_url):
    """Servers A and B on one new PostgreSQL database, started together (each takes ~10 s to import its
    libraries; in parallel that is paid once): {"url": the database, "a": A's address, "b": B's}."""
    database = postgres.create_database(postgres_url)
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start_server, home, "--database", database) for _ in range(2)]
    started = [f.result() for f in starting if f.exception() is None]
    try:
        for f in starting:
            if f.exception() is not None:
                raise f.exception()
        yield {"url": database, "a": started[0][1], "b": started[1][1]}
    finally:
        for proc, _ in started:
            proc.terminate()  # both shut down at once (each takes ~2 s)
        for proc, _ in started:
            stop_server(proc)
        postgres.drop_database(postgres_url, database)


def complete(http: httpx.Client, server: str, seed: int, **headers) -> dict:
    done = http.post(f"{server}/v1/completions", headers=headers,
                     json={"model": "poet", "prompt": "春", "max_tokens": 8, "seed": seed})
    assert done.status_code == 200, done.text
    return done.json()


def test_sixteen_threads_generating_and_rating_lose_no_row(servers):
    url, barrier, errors, made = servers["a"], threading.Barrier(16), [], []
    with Store(servers["url"]) as store:
        before = store.count_generations()

    def worker(i: int) -> None:
        try:
            with httpx.Client(timeout=120) as http:
                barrier.wait()
                for j in range(2):
                    gen = complete(http, url, seed=100 * i + j)["id"]
                    rated = http.post(f"{url}/v1/generations/{gen}/ratings", json={"score": 1 if j else -1})
                    rated.raise_for_status()
                    made.append((gen, rated.json()["id"], 1 if j else -1))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store(servers["url"]) as store:  # counted in the database itself, not through a server
        assert store.count_generations() == before + 32
        for gen, rating, score in made:
            assert [(r["id"], r["score"]) for r in store.get_generation(gen)["ratings"]] == [(rating, score)]


def test_a_generation_made_by_one_server_is_read_and_rated_through_the_other(servers):
    a, b = servers["a"], servers["b"]
    with httpx.Client(timeout=60) as http:
        done = complete(http, a, seed=7)
        row = http.get(f"{b}/v1/generations/{done['id']}").json()
        assert row["run"] == "poet" and row["seed"] == 7
        assert row["output"] == ["春" + done["choices"][0]["text"]]
        rated = http.post(f"{b}/v1/generations/{done['id']}/ratings", json={"score": 1, "stars": 5,
                                                                          "comment": "B 评"})
        assert rated.status_code == 200, rated.text
        listed = http.get(f"{a}/v1/generations", params={"model": "poet", "rated": True, "limit": 1000}).json()
        [seen] = [g for g in listed["data"] if g["id"] == done["id"]]
        assert seen["ratings"] == [{k: v for k, v in rated.json().items() if k != "object"}]
        assert http.get(f"{a}/v1/generations", params={"q": "春", "limit": 1}).json()["total"] >= 1
        # PostgreSQL stores no NUL character: a 400 that says so, from either server, never a 500
        for server in (a, b):
            nul = http.post(f"{server}/v1/generations/{done['id']}/ratings", json={"score": 1, "comment": "a\x00"})
            assert nul.status_code == 400 and "NUL" in nul.json()["error"]["message"], nul.text
            assert http.get(f"{server}/v1/generations", params={"q": "\x00"}).status_code == 400


def aigc_keys(database: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "aigc", "keys", *args], capture_output=True, text=True,
                          env={**os.environ, "AIGC_DATABASE_URL": database}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_keys_made_in_the_shared_store_work_on_both_servers_at_once(servers):
    """`aigc keys create` writes the key into the shared database; both servers check every request against
    it, so the key works on both at once, and once revoked it works on neither (no restart, no cache)."""
    a, b = servers["a"], servers["b"]
    secret = aigc_keys(servers["url"], "create", "shared")
    try:
        bearer = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(timeout=60) as http:
            for server in (a, b):
                assert http.get(f"{server}/v1/models").status_code == 401  # a key exists: none sent
                assert http.get(f"{server}/v1/models", headers=bearer).status_code == 200
            gen = complete(http, b, seed=3, **bearer)["id"]
            assert http.get(f"{a}/v1/generations/{gen}", headers=bearer).json()["key_id"].startswith("key-")
            aigc_keys(servers["url"], "revoke", "shared")
            for server in (a, b):
                assert http.get(f"{server}/v1/models", headers=bearer).status_code == 200  # no key left: open
            other = aigc_keys(servers["url"], "create", "other")
            for server in (a, b):
                assert http.get(f"{server}/v1/models", headers=bearer).status_code == 401  # revoked
                assert http.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {other}"}).status_code \
                    == 200
    finally:
        with Store(servers["url"]) as store:  # the other tests' servers take requests without a key
            for key in store.list_keys():
                store.revoke_key(key["id"])
