"""The best-of-n reward model (aigc.optimize.reward): its fit against a float64 gradient-descent oracle,
Bradley-Terry on pairs alone, save/load, best_of, and features read from tiny real runs (padding does not
leak, the rnn's hidden states match its core, the prompt shapes but does not enter the mean)."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from aigc.data.tokenizer import train_char
from aigc.errors import BadRequest, UserError
from aigc.optimize.reward import NGRAM_DIM, Reward, best_of, features, fit
from aigc.sample import LoadedModel
from conftest import make_model, make_poems

pytestmark = pytest.mark.usefixtures("one_thread")


def separable(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows on either side of a random hyperplane, a margin of at least 0.5 apart from it."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g)
    direction = torch.tensor([1.0, -2.0, 0.5])
    margin = X @ direction
    X = X + (0.5 * torch.sign(margin))[:, None] * direction / direction.norm()
    return X, (margin > 0).float()


def gradient_descent_oracle(X: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 3000):
    """The same objective (standardised features, mean BCE + l2 ||w||^2) minimised by plain gradient descent
    in float64: (w, b)."""
    X = X.double()
    Z = (X - X.mean(0)) / X.std(0, unbiased=False).clamp_min(1e-6)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(Z @ w + b, y.double()) + l2 * w.dot(w)
        gw, gb = torch.autograd.grad(loss, [w, b])
        with torch.no_grad():
            w -= 0.5 * gw
            b -= 0.5 * gb
    return w.detach(), float(b.detach())


def test_fit_matches_gradient_descent_oracle_and_separates():
    X, y = separable()
    reward = fit(X, y, l2=1e-2)
    w, b = gradient_descent_oracle(X, y, l2=1e-2)
    torch.testing.assert_close(reward.weight.double(), w, atol=1e-5, rtol=0)  # float32 storage
    assert reward.bias == pytest.approx(b, abs=1e-5)
    assert ((reward.score(X) > 0).float() == y).all()
    assert reward.info["train_accuracy"] == 1.0
    assert (reward.info["n_liked"], reward.info["n_disliked"], reward.info["n_pairs"]) == (int(y.sum()),
                                                                                          int((1 - y).sum()), 0)


def test_pairs_alone_learn_the_preferred_direction():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 3, generator=g)
    pairs = [(i, j) if X[i, 0] > X[j, 0] else (j, i) for i in range(30) for j in range(i + 1, 30)]
    reward = fit(X, None, pairs)
    assert reward.weight[0] > 0
    assert reward.weight[0] > 5 * reward.weight[1:].abs().max()
    assert reward.info["pair_accuracy"] == 1.0
    held_out = torch.randn(20, 3, generator=g)
    by_score = reward.score(held_out).argsort()
    by_feature = held_out[:, 0].argsort()
    assert torch.equal(by_score, by_feature)


def test_fit_refuses_nothing_to_learn():
    X = torch.randn(4, 2)
    with pytest.raises(BadRequest, match="nothing to learn"):
        fit(X, None, [])
    with pytest.raises(BadRequest, match="all liked"):
        fit(X, torch.ones(4))
    with pytest.raises(BadRequest, match="all disliked"):
        fit(X, torch.zeros(4))
    fit(X, torch.ones(4), [(0, 1)])  # one class with a pair is enough


def test_save_load_round_trip_and_bad_files(tmp_path):
    X, y = separable()
    reward = fit(X, y, [(0, 1)], kind="hidden:gpt")
    reward.save(tmp_path / "r")
    loaded = Reward.load(tmp_path / "r")
    assert torch.equal(loaded.score(X), reward.score(X))
    assert loaded.info == reward.info and loaded.info["dim"] == 3 and loaded.info["features"] == "hidden:gpt"

    with pytest.raises(UserError, match="no reward.safetensors"):
        Reward.load(tmp_path / "empty")
    weights = tmp_path / "r" / "reward.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(UserError, match="malformed"):
        Reward.load(tmp_path / "r")
    reward.save(tmp_path / "r")
    (tmp_path / "r" / "reward.json").write_text('{"n_liked": ', encoding="utf-8")
    with pytest.raises(UserError, match="malformed"):
        Reward.load(tmp_path / "r")


def test_best_of_per_group_first_on_ties():
    scores = torch.tensor([1.0, 3.0, 3.0, 5.0, 2.0, 5.0, -1.0, -2.0, -3.0])
    assert best_of(scores, 3, 3) == [1, 3, 6]
    assert best_of(scores, 9, 1) == list(range(9))
    with pytest.raises(BadRequest):
        best_of(scores, 2, 3)


def test_first_liked_keeps_the_first_candidate_judged_liked_else_the_first():
    scores = torch.tensor([-1.0, 0.5, 3.0, -5.0, -2.0, -0.1, 2.0, 0.0, 1.0])
    # by hand: group 0 -> its first score > 0 (0.5, not the best 3.0); group 1 none > 0 -> its first; group 2 -> 2.0
    assert best_of(scores, 3, 3, "first-liked") == [1, 3, 6]
    assert best_of(scores, 3, 3, "best") == [2, 5, 6]
    # with random scores, against a loop written from the definition
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(400, generator=generator) - 1.0
    expected = [next((g * 4 + i for i in range(4) if scores[g * 4 + i] > 0), g * 4) for g in range(100)]
    assert best_of(scores, 100, 4, "first-liked") == expected
    with pytest.raises(BadRequest, match="pick must be one of best, first-liked"):
        best_of(scores, 100, 4, "softmax")


@pytest.fixture(scope="module")
def vocab():
    docs = make_poems(20)
    tok = train_char(docs)
    return tok, tok.encode_docs(docs)


def tiny(family: str, vocab) -> LoadedModel:
    tok, ids = vocab
    return LoadedModel(make_model(family, ids, tok).eval(), tok, family, None, 16)


PROMPTS = ["春江", "山", "《诗1》\n白云", "月"]
TEXTS = ["春江花月夜", "山水风云雨雪天地人心日长秋", "《诗1》\n白云明光，", "月"]  # the last: an empty completion


@pytest.mark.parametrize("family,dim", [("gpt", 16 + 16), ("rnn", 16 + 32), ("ngram", NGRAM_DIM)])
def test_features_shape_and_padding_does_not_leak(vocab, family, dim):
    loaded = tiny(family, vocab)
    batch = features(loaded, PROMPTS, TEXTS)
    assert batch.shape == (4, dim) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    for i in range(4):
        alone = features(loaded, PROMPTS[i:i + 1], TEXTS[i:i + 1])
        torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)


def test_rnn_features_are_the_means_of_its_embeddings_and_core_outputs_over_the_completion(vocab):
    loaded = tiny("rnn", vocab)
    tok = loaded.tokenizer
    prompts = ["春", "山", "月"]
    texts = ["春江花月", "山" + "水风云雨雪天地人心日长秋白明光" * 2, "月"]  # the second: cut to 16 tokens on the left
    got = features(loaded, prompts, texts)
    for row, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        head = [tok.eot_id, *tok.encode(prompt)]
        tail = tok.encode(text[len(prompt):])
        ids = (head + tail)[-16:]
        start = max(0, len(head) - (len(head) + len(tail) - len(ids))) if tail else 0
        with torch.no_grad():
            x = loaded.model.wte(torch.tensor([ids]))  # (1, T, n_embd)
            h, _ = loaded.model.core(x)  # (1, T, n_hidden)
        torch.testing.assert_close(got[row], torch.cat([x[0, start:].mean(0), h[0, start:].mean(0)]), atol=1e-6,
                                   rtol=0)


def test_gpt_features_read_the_prompt_but_average_the_completion(vocab):
    loaded = tiny("gpt", vocab)
    a, b = features(loaded, ["春江", "山水"], ["春江花月夜", "山水花月夜"])
    assert not torch.allclose(a, b, atol=1e-4)  # the context shapes the completion's states
    tok = loaded.tokenizer
    ids = torch.tensor([[tok.eot_id, *tok.encode("春江花月夜")]])
    with torch.no_grad():
        states = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    first, last = states[0][0], states[-1][0]  # (T, n_embd): the embeddings and the last layer
    # EOT, 春, 江 left out of the means
    torch.testing.assert_close(a, torch.cat([first[3:].mean(0), last[3:].mean(0)]), atol=1e-6, rtol=0)


def test_ngram_features_are_hashed_character_counts(vocab):
    loaded = tiny("ngram", vocab)
    [bag] = features(loaded, ["山"], ["山春春"])
    expected = torch.zeros(NGRAM_DIM)
    for gram in ["春", "春", "春春"]:
        expected[zlib.crc32(gram.encode("utf-8")) % NGRAM_DIM] += 1 / 3
    torch.testing.assert_close(bag, expected)


def test_features_refuse_a_text_without_its_prompt(vocab):
    with pytest.raises(BadRequest, match="does not start with its prompt"):
        features(tiny("ngram", vocab), ["山"], ["春江"])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_output_hidden_states_leave_logits_unchanged(vocab, cell):
    from aigc.models import rnn

    tok, _ = vocab
    torch.manual_seed(0)
    model = rnn.build(rnn.RNNConfig(cell=cell, n_layer=2, n_hidden=8, n_embd=4, dropout=0.0),
                      tok.vocab_size, tok.eot_id).eval()
    ids = torch.randint(0, tok.vocab_size, (3, 7))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=True)
        with_h = model(input_ids=ids, use_cache=True, output_hidden_states=True)
        h, _ = model.core(model.wte(ids))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # a left-padded row
        padded = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        padded_h = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True)
        alone = model(input_ids=ids[1:2, 3:], output_hidden_states=True)
    assert plain.hidden_states is None and padded.hidden_states is None
    assert torch.equal(plain.logits, with_h.logits)
    assert all(torch.equal(s, t) for s, t in zip(plain.state, with_h.state, strict=True))
    assert torch.equal(with_h.hidden_states[0], model.wte(ids)) and torch.equal(with_h.hidden_states[-1], h)
    assert torch.equal(padded.logits, padded_h.logits)
    assert [t.shape for t in padded_h.hidden_states] == [(3, 7, 4), (3, 7, 8)]
    for mine, its in zip(padded_h.hidden_states, alone.hidden_states, strict=True):
        torch.testing.assert_close(mine[1, 3:], its[0])
        assert torch.equal(mine[1, :3], torch.zeros_like(mine[1, :3]))
