"""The main job's entry point on test-made data, and proof that training and generation never
touch the network."""

from __future__ import annotations

import socket

import pytest

from aigc.quickstart import run
from aigc.runs import train
from aigc.sample import GenerateSettings, generate, load_run
from conftest import TINY_SETS, NetworkBlocked


def test_quickstart_runs_end_to_end_on_test_data(poems_file, capsys):
    tiny = {k: v for k, v in TINY_SETS["gpt"].items()}
    result = run(data=str(poems_file), max_steps=6, name="qs", sets=tiny)
    out = capsys.readouterr().out
    assert "1/3" in out and "2/3" in out and "3/3" in out
    assert "--- poem 4" in out
    assert f"report: {result['run']}/report.html" in out
    assert set(result["metrics"]) >= {"val_bpc", "distinct_2", "self_bleu", "novelty_8gram", "tokens_per_s"}


def test_the_network_guard_is_real():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(NetworkBlocked):
        s.connect(("93.184.216.34", 80))
    s.close()


@pytest.mark.parametrize("family", ["ngram", "rnn", "gpt"])
def test_train_and_generate_offline(family, poems_file, monkeypatch):
    calls = []
    real = socket.socket.connect

    def spy(self, address):
        calls.append(address)
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", spy)  # still guarded: `real` is the blocking wrapper
    train(family, str(poems_file), name=family, max_steps=2, sets=TINY_SETS[family])
    generate(load_run(family), GenerateSettings(n=2, seed=0, max_new_tokens=8))
    assert [a for a in calls if isinstance(a, tuple)] == []  # no TCP connection was even attempted
