"""The main job's entry point on test-made data, and proof that training and generation never
touch the network."""

from __future__ import annotations

import socket

import pytest

from aigc.data.tokenizer import TextTokenizer
from aigc.modalities.text import read_val
from aigc.quickstart import run
from aigc.sample import GenerateSettings, generate, load_run
from aigc.service import train
from aigc.store import list_runs, read_run
from conftest import TINY_SETS, NetworkBlocked, make_poems


def test_quickstart_pretrains_fine_tunes_and_compares_with_the_ngram(poems_file, tmp_path, capsys):
    pretraining = tmp_path / "pretrain.txt"
    pretraining.write_text("\n%\n".join(make_poems(40, seed=7)) + "\n", encoding="utf-8")
    result = run(data=str(poems_file), pretrain_data=str(pretraining), pretrain_steps=4, max_steps=4, name="qs",
                 sets=dict(TINY_SETS["gpt"]))
    out = capsys.readouterr().out
    assert all(f"{i}/4" in out for i in range(1, 5))
    assert "--- poem 4" in out
    assert f"report: {result['run']}/report.html" in out
    assert set(result["metrics"]) >= {"val_bpc", "distinct_2", "self_bleu", "novelty_8gram", "tokens_per_s",
                                      "verse_form", "verse_form_train"}
    baseline = result["baseline"]["metrics"]
    assert f"{baseline['val_bpc']:.3f}" in out and "n-gram baseline" in out
    runs = {r["name"]: r for r in list_runs()}
    assert runs["qs"]["family"] == "gpt" and runs["qs-ngram"]["family"] == "ngram"
    assert read_run(runs["qs"]["path"])["init_from"] == runs["qs-pretrain"]["path"]
    # the same validation split and the same vocabulary as the n-gram: the bits per character compare
    assert read_val(runs["qs"]["path"]) == read_val(runs["qs-ngram"]["path"])
    assert (TextTokenizer.load(runs["qs"]["path"]).tokenizer.get_vocab()
            == TextTokenizer.load(runs["qs-ngram"]["path"]).tokenizer.get_vocab())
    # copying is measured against the pretraining text too
    copied = result["copying_measured_against"]
    assert [source.split(" ")[0] for source in copied["runs"]] == ["qs", "qs-pretrain"]
    assert copied["chars"] > read_run(runs["qs"]["path"])["data"]["train"]["chars"]


def test_quickstart_without_pretraining_trains_the_same_model_from_scratch(poems_file, capsys):
    result = run(data=str(poems_file), pretrain_data=None, max_steps=4, name="qs", sets=dict(TINY_SETS["gpt"]))
    out = capsys.readouterr().out
    assert "1/3 training a small GPT" in out and "3/3" in out
    assert read_run(result["run"])["init_from"] is None
    assert [s.split(" ")[0] for s in result["copying_measured_against"]["runs"]] == ["qs"]


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
    train(family, str(poems_file), name=family, max_steps=None if family == "ngram" else 2, sets=TINY_SETS[family])
    generate(load_run(family), GenerateSettings(n=2, seed=0, max_new_tokens=8))
    assert [a for a in calls if isinstance(a, tuple)] == []  # no TCP connection was even attempted
