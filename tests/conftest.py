"""Shared fixtures: a private AIGC_HOME per test, no network, and small corpora the tests make."""

from __future__ import annotations

import ipaddress
import random
import socket

import numpy as np
import pytest
import torch
from tests.browser import CHROMIUM

from aigc import service
from aigc.config import build
from aigc.data import music
from aigc.models import FAMILIES
from aigc.service import sections_for

TINY_SETS = {
    "ngram": {"max_order": "4"},
    "rnn": {"cell": "gru", "n_layer": "1", "n_hidden": "32", "n_embd": "16", "dropout": "0.0",
            "block_size": "16", "batch_size": "4", "warmup_steps": "2", "eval_interval": "4",
            "eval_batches": "2", "log_interval": "2", "dtype": "fp32"},
    "gpt": {"n_layer": "1", "n_head": "2", "n_embd": "16", "n_positions": "64", "embd_pdrop": "0.0",
            "attn_pdrop": "0.0", "resid_pdrop": "0.0", "block_size": "16", "batch_size": "4",
            "warmup_steps": "2", "eval_interval": "4", "eval_batches": "2", "log_interval": "2",
            "dtype": "fp32"},
}


class NetworkBlocked(RuntimeError):
    pass


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(address, (str, bytes)) and not isinstance(address, tuple):
        return True  # AF_UNIX path
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with non-loopback connections refused: nothing may phone home."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise NetworkBlocked(f"network access in a test: {address}")
        return real_connect(self, address)

    def guarded_connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise NetworkBlocked(f"network access in a test: {address}")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny nets: one thread is as fast as several, and immune to the OpenMP
    oversubscription that makes multi-threaded CPU training crawl on a busy shared runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def aigc_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("aigc_home")
    monkeypatch.setenv("AIGC_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a PostgreSQL database for the session: $AIGC_TEST_POSTGRES_URL, else a throwaway cluster
    (tests/postgres.py) started here and deleted at the end. Skips, saying why, where none can start."""
    from tests import postgres

    try:
        with postgres.server_url() as url:
            yield url
    except postgres.Unavailable as e:
        pytest.skip(f"PostgreSQL unavailable: {e}")


@pytest.fixture
def postgres_database(postgres_url):
    """A new, empty PostgreSQL database for one test (dropped after it): its URL."""
    from tests import postgres

    url = postgres.create_database(postgres_url)
    yield url
    postgres.drop_database(postgres_url, url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The URL of an empty store database, once on SQLite (a file whose folder does not exist yet) and once on
    PostgreSQL: the same test, the same migrations, on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'aigc.db'}"
    return request.getfixturevalue("postgres_database")


def make_poems(n_poems: int = 40, seed: int = 0) -> list[str]:
    """Five-character quatrains over a small Chinese alphabet, with a title line: a corpus whose
    shape (line length, punctuation) a tiny model can learn in a few steps."""
    rng = random.Random(seed)
    alphabet = "春江花月夜山水风云雨雪天地人心日长秋白明光"
    poems = []
    for i in range(n_poems):
        lines = ["".join(rng.choice(alphabet) for _ in range(5)) + ("，" if j % 2 == 0 else "。")
                 for j in range(4)]
        poems.append(f"《诗{i}》\n" + "\n".join(lines))
    return poems


@pytest.fixture
def poems_file(tmp_path):
    """A fortune-format file (entries split by '%' lines) of small poems, plus some ASCII."""
    path = tmp_path / "poems.txt"
    docs = make_poems()
    docs[3] += "\nHello, world!"
    path.write_text("\n%\n".join(docs) + "\n", encoding="utf-8")
    return path


def make_model(family: str, ids: np.ndarray, tokenizer):
    fam = FAMILIES[family]
    configs = build(sections_for(family), TINY_SETS[family], family=family)
    if fam.trainer == "counts":
        from aigc.models import ngram

        model, _ = ngram.build_from_ids(ids, tokenizer.vocab_size, configs["model"], tokenizer.eot_id,
                                        tokenizer.unk_id)
        return model
    torch.manual_seed(0)
    return fam.build(configs["model"], tokenizer.vocab_size, tokenizer.eot_id)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium under Playwright, one per studio test module (those modules skip, saying why, without
    Playwright or Chromium)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium-headless-shell fonts-wqy-microhei")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def chorales() -> list[music.Piece]:
    """Five Bach chorales, parsed from the music21 wheel (about a second) once for the music tests."""
    return music.bach_chorales(limit=5)


@pytest.fixture
def midi_folder(tmp_path, chorales):
    """The first four chorales as MIDI files in a folder: a user's own music."""
    folder = tmp_path / "midi"
    folder.mkdir()
    for piece in chorales[:4]:
        (folder / f"{piece.name}.mid").write_bytes(music.midi_bytes(piece))
    return folder


def tiny_music_run(family: str, folder, name: str, *, n_positions: int, steps: int):
    """A tiny music run of `family` on a folder of MIDI files (a quarter of its pieces held out): the n-gram counted,
    the rnn and gpt trained `steps` steps (gpt with room for `n_positions` tokens). Returns (run_dir, metrics)."""
    sets = {**TINY_SETS[family], "val_fraction": "0.25"}
    if family == "gpt":
        sets["n_positions"] = str(n_positions)
    return service.train(family, str(folder), name=name, sets=sets, max_steps=None if family == "ngram" else steps)
