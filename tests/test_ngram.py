"""Oracle tests for aigc.models.ngram: interpolated Kneser-Ney and its transformers adapter.

Data are seeded Markov sources and English prose from the standard library (pydoc's topic
help); only the last test reads the Debian fortune files (to time a realistic fit), and it is
skipped where they are not installed.
"""

import math
from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from aigc.errors import UserError
from aigc.models.ngram import KneserNey, NGramConfig, NGramLM, build_from_ids, select_order

EOT, UNK = 0, 1  # as in the project's char tokenizer


def markov_ids(n: int, vocab_size: int, order: int, seed: int, peak: float = 0.85, used: int | None = None):
    """n ids from a seeded Markov source of the given order over the first `used` ids.

    Each context of order - 1 ids puts probability `peak` on one next id (drawn once) and
    spreads the rest evenly over the other used ids, so the entropy rate is exactly
    -(peak ln peak + (1 - peak) ln((1 - peak) / (used - 1))).
    """
    used = used or vocab_size
    rng = np.random.default_rng(seed)
    favourite = rng.integers(0, used, size=(used,) * (order - 1))
    ids = list(rng.integers(0, used, size=order - 1))
    for _ in range(n - len(ids)):
        fav = favourite[tuple(ids[len(ids) - order + 1 :])]
        if rng.random() < peak:
            ids.append(int(fav))
        else:  # uniform over the other used ids
            other = int(rng.integers(0, used - 1))
            ids.append(other + (other >= fav))
    return np.array(ids, dtype=np.int64)


@pytest.fixture(scope="module")
def english() -> tuple[np.ndarray, int]:
    """About 120k characters of English as char ids (0 = EOT, 1 = <unk>, then the characters)."""
    text = "\n".join(topics[key] for key in sorted(topics))[:120_000]
    index = {c: i + 2 for i, c in enumerate(sorted(set(text)))}
    return np.array([index[c] for c in text], dtype=np.int64), len(index) + 2


@pytest.fixture(scope="module")
def english_model(english) -> NGramLM:
    ids, vocab_size = english
    model, _ = build_from_ids(ids[:100_000], vocab_size, NGramConfig(order=4), eot_id=EOT, unk_id=UNK)
    return model


# --------------------------------------------------------------------------------------
# The estimator


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_next_token_distribution_sums_to_one(order):
    vocab_size = 10
    train = markov_ids(3000, vocab_size, order=3, seed=order, used=8)  # ids 8 and 9 never occur
    kn = KneserNey(order, vocab_size).fit(train)
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, vocab_size, size=int(rng.integers(0, 8))) for _ in range(40)]
    contexts += [train[i : i + order + 2] for i in range(0, 2000, 97)]  # contexts seen in training
    for context in contexts:
        logp = kn.next_logprobs(context)
        assert logp.shape == (vocab_size,)
        assert np.all(np.isfinite(logp)), "every id, unseen ones included, must have P > 0"
        assert math.isclose(np.exp(logp).sum(), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 4, 6])
def test_nll_logprob_and_next_logprobs_agree(order):
    vocab_size = 9
    kn = KneserNey(order, vocab_size).fit(markov_ids(4000, vocab_size, order=3, seed=1, used=7))
    ids = np.concatenate([markov_ids(150, vocab_size, order=3, seed=2), [8, 7, 8, 3]])  # unseen ids 7, 8
    for context in ([], [3, 0, 8]):
        full = list(context) + list(ids)
        start = len(context)
        by_logprob = -sum(kn.logprob(int(full[i]), full[:i]) for i in range(start, len(full)))
        by_distribution = -sum(kn.next_logprobs(full[:i])[full[i]] for i in range(start, len(full)))
        fast = kn.nll(ids, context=context)
        assert math.isclose(fast, by_logprob, rel_tol=1e-12)
        assert math.isclose(fast, by_distribution, rel_tol=1e-12)


def test_hand_worked_abracadabra():
    """Interpolated KN on "abracadabra", worked out by hand from the formula:

        P_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k * N1+(h .) * P_{k-1}(w | h')) / sum_v c_k(h v)
        P_0(w) = 1 / V,   D_k = n1 / (n1 + 2 n2)

    with raw counts c_k at the top order and continuation counts c_k(g) = N1+(. g) below.
    """
    letters = {c: i for i, c in enumerate("abcdr")}
    ids = [letters[c] for c in "abracadabra"]
    a, b, c, r = letters["a"], letters["b"], letters["c"], letters["r"]
    V = 8  # three ids never occur

    # Unigram level (continuation counts). Bigram types: ab br ra ac ca ad da, so the distinct
    # left neighbours are a: {r, c, d} -> 3; b: {a}, r: {b}, c: {a}, d: {a} -> 1 each.
    # Total 7, N1+(.) = 5 types; n1 = 4, n2 = 0 -> D_1 = 1.
    p1_a = (max(3 - 1, 0) + 1 * 5 * (1 / V)) / 7
    p1_b = p1_c = (max(1 - 1, 0) + 1 * 5 * (1 / V)) / 7

    # Order-2 model, top level raw bigram counts: ab 2, br 2, ra 2, ac 1, ca 1, ad 1, da 1
    # -> n1 = 4, n2 = 3, D_2 = 4 / (4 + 6) = 0.4. Context "a": ab 2 + ac 1 + ad 1 = 4 (the
    # final a is followed by nothing), N1+(a .) = 3.
    p_b_given_a = (max(2 - 0.4, 0) + 0.4 * 3 * p1_b) / 4
    bigram = KneserNey(2, V).fit(ids)
    assert bigram.cont_discounts_.tolist() == pytest.approx([1.0])
    assert bigram.raw_discounts_[-1] == pytest.approx(0.4)
    assert math.exp(bigram.logprob(b, [a])) == pytest.approx(p_b_given_a, rel=1e-12)

    # Order-3 model, top level raw trigram counts: abr 2, bra 2, rac 1, aca 1, cad 1, ada 1,
    # dab 1 -> n1 = 5, n2 = 2, D_3 = 5/9. Bigram level (continuation): every bigram type has
    # exactly one left neighbour among the trigram types -> n1 = 7, n2 = 0, D_2 = 1.
    d3 = 5 / 9
    # P(a | b r): c(bra) = 2, context "br" total 2 with 1 type; P_2(a | r) has context "r"
    # with continuation counts {ra: 1}: (max(1 - 1, 0) + 1 * 1 * P_1(a)) / 1.
    p2_a_given_r = (max(1 - 1, 0) + 1 * 1 * p1_a) / 1
    p_a_given_br = (max(2 - d3, 0) + d3 * 1 * p2_a_given_r) / 2
    # P(c | r a): c(rac) = 1, context "ra" total 1 (the final "ra" ends the text), 1 type;
    # P_2(c | a) has context "a" with continuation counts {ab: 1, ac: 1, ad: 1}.
    p2_c_given_a = (max(1 - 1, 0) + 1 * 3 * p1_c) / 3
    p_c_given_ra = (max(1 - d3, 0) + d3 * 1 * p2_c_given_a) / 1
    trigram = KneserNey(3, V).fit(ids)
    assert trigram.cont_discounts_.tolist() == pytest.approx([1.0, 1.0])
    assert trigram.raw_discounts_[-1] == pytest.approx(d3)
    assert math.exp(trigram.logprob(a, [b, r])) == pytest.approx(p_a_given_br, rel=1e-12)
    assert math.exp(trigram.logprob(c, [r, a])) == pytest.approx(p_c_given_ra, rel=1e-12)
    # An id never seen anywhere gets only the uniform share that trickles down.
    assert math.exp(trigram.logprob(7, [b, r])) == pytest.approx(d3 * 1 * (1 * 1 * (5 / V / 7) / 1) / 2)

    # Short histories use the model of the order they allow, whose top level has raw counts:
    # one id of history -> the order-2 model above; none -> raw unigrams a 5, b 2, r 2, c 1, d 1
    # (n1 = 2, n2 = 2, D = 1/3; total 11; 5 types).
    assert trigram.logprob(b, [a]) == pytest.approx(math.log(p_b_given_a), rel=1e-12)
    p_a = (max(5 - 1 / 3, 0) + (1 / 3) * 5 * (1 / V)) / 11
    assert math.exp(trigram.logprob(a, [])) == pytest.approx(p_a, rel=1e-12)


def test_select_order_finds_an_order_3_source():
    vocab_size, peak = 6, 0.85
    ids = markov_ids(30_000, vocab_size, order=3, seed=7, peak=peak)
    best, nats = select_order(ids, vocab_size, max_order=6, tail_fraction=0.2)
    assert best >= 3
    assert nats[1] > nats[2] > nats[3]
    entropy_rate = -(peak * math.log(peak) + (1 - peak) * math.log((1 - peak) / (vocab_size - 1)))
    assert nats[3] == pytest.approx(entropy_rate, abs=0.03)
    # Counting once for all orders must give what a separate fit per order gives.
    cut = round(len(ids) * 0.8)
    for order, value in nats.items():
        refit = KneserNey(order, vocab_size).fit(ids[:cut]).nll(ids[cut:], context=ids[:cut])
        assert value == pytest.approx(refit / (len(ids) - cut), rel=1e-10)


def test_select_order_when_histories_are_shorter_than_the_order():
    ids = np.array([0, 1, 2, 1, 0, 2, 2, 3])
    _, nats = select_order(ids, 4, max_order=7, tail_fraction=0.5)  # fit on 4 ids, score 4
    for order, value in nats.items():
        refit = KneserNey(order, 4).fit(ids[:4]).nll(ids[4:], context=ids[:4])
        assert value == pytest.approx(refit / 4, rel=1e-12)


def test_beats_uniform_and_add_one_on_held_out_text(english):
    ids, vocab_size = english
    train, test = ids[:100_000], ids[100_000:]
    kn_nats = KneserNey(3, vocab_size).fit(train).nll(test, context=train[-2:]) / len(test)

    # Add-one trigram: P(w | u v) = (c(u v w) + 1) / (c(u v .) + V), counted here independently.
    seen = train.tolist()
    trigrams = Counter(zip(seen, seen[1:], seen[2:], strict=False))
    contexts = Counter()
    for (u, v, _), count in trigrams.items():
        contexts[u, v] += count
    text = ids.tolist()
    add_one = 0.0
    for i in range(len(train), len(text)):
        u, v, w = text[i - 2 : i + 1]
        add_one -= math.log((trigrams[u, v, w] + 1) / (contexts[u, v] + vocab_size))
    add_one_nats = add_one / len(test)
    assert kn_nats < add_one_nats < math.log(vocab_size)
    assert kn_nats < 2.0  # about 1.8 nats (2.6 bits) per character here


def test_state_dict_round_trip_through_safetensors(tmp_path, english):
    ids, vocab_size = english
    kn = KneserNey(4, vocab_size).fit(ids[:50_000])
    save_file(kn.state_dict(), tmp_path / "kn.safetensors")
    loaded = KneserNey.from_state_dict(load_file(tmp_path / "kn.safetensors"))
    assert (loaded.order, loaded.vocab_size) == (4, vocab_size)
    assert loaded.counts_ == kn.counts_ and loaded.tail_ == kn.tail_
    np.testing.assert_array_equal(loaded.raw_discounts_, kn.raw_discounts_)
    np.testing.assert_array_equal(loaded.cont_discounts_, kn.cont_discounts_)
    for start in range(50_000, 60_000, 500):
        context = ids[start - 5 : start]
        np.testing.assert_array_equal(loaded.next_logprobs(context), kn.next_logprobs(context))
    assert loaded.nll(ids[60_000:61_000]) == kn.nll(ids[60_000:61_000])


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="token ids must lie in"):
        KneserNey(2, 5).fit([0, 1, 5])
    with pytest.raises(ValueError, match="token ids must lie in"):
        KneserNey(2, 5).fit([0, -1])
    with pytest.raises(ValueError, match="vocab_size"):
        KneserNey(2, 0xD800 + 1)
    with pytest.raises(RuntimeError, match="not fitted"):
        KneserNey(2, 5).next_logprobs([1])
    with pytest.raises(UserError, match="too few"):
        select_order([1, 2], 5, max_order=3, tail_fraction=0.1)


# --------------------------------------------------------------------------------------
# The transformers adapter


def test_build_from_ids_selects_the_order_and_sets_generation():
    vocab_size = 6
    ids = markov_ids(20_000, vocab_size, order=3, seed=3)
    model, info = build_from_ids(ids, vocab_size, NGramConfig(max_order=5), eot_id=EOT, unk_id=UNK)
    assert info["order"] >= 3 and set(info["tail_nats_per_token"]) == {1, 2, 3, 4, 5}
    assert model.config.order == model.kn.order == info["order"]
    gc = model.generation_config
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id, gc.use_cache) == (EOT, EOT, EOT, False)
    # Fitted on all the ids, not only the part before the tail.
    assert model.kn.counts_ == KneserNey(info["order"], vocab_size).fit(ids).counts_


def test_greedy_generate_is_argmax_chaining(english_model, english):
    ids, _ = english
    prompt = ids[100_000:100_012]
    out = english_model.generate(torch.from_numpy(prompt[None]), max_new_tokens=40, do_sample=False)
    expected = list(prompt)
    for _ in range(40):
        # float32, as the logits are: ties and order then match what generate sees
        token = int(np.argmax(english_model.kn.next_logprobs(expected).astype(np.float32)))
        expected.append(token)
        if token == EOT:
            break
    assert out[0].tolist() == expected
    beam1 = english_model.generate(torch.from_numpy(prompt[None]), max_new_tokens=40, do_sample=False, num_beams=1)
    assert beam1[0].tolist() == expected


def test_beam_search_scores_are_the_model_log_likelihood(english_model, english):
    ids, _ = english
    prompt = ids[100_000:100_010].tolist()
    out = english_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=15,
        num_beams=4,
        num_return_sequences=3,
        length_penalty=0.0,  # score = sum of log-probabilities
        output_scores=True,
        return_dict_in_generate=True,
    )
    scores = out.sequences_scores.tolist()
    assert scores == sorted(scores, reverse=True)
    for sequence, score in zip(out.sequences.tolist(), scores, strict=True):
        new = sequence[len(prompt) :]
        if EOT in new:
            new = new[: new.index(EOT) + 1]  # what follows is padding
        assert score == pytest.approx(-english_model.kn.nll(new, context=prompt), abs=1e-3)


def test_no_repeat_ngram_size_2(english_model, english):
    ids, _ = english
    out = english_model.generate(
        torch.from_numpy(ids[None, 100_000:100_003]), max_new_tokens=30, do_sample=False, no_repeat_ngram_size=2
    )
    sequence = out[0].tolist()
    bigrams = list(zip(sequence, sequence[1:], strict=False))
    # every bigram that ends in a generated token is new (the prompt may repeat itself: the prompt
    # text differs between Python versions)
    for i in range(2, len(bigrams)):
        assert bigrams[i] not in bigrams[:i], (i, bigrams[i])


def test_generation_stops_at_eot():
    vocab_size = 5
    ids = np.array(([2, 3, 4, 4, 3] + [EOT]) * 50)  # every trigram context has one continuation
    model, _ = build_from_ids(ids, vocab_size, NGramConfig(order=3), eot_id=EOT, unk_id=UNK)
    prompt = torch.tensor([[EOT, 2, 3]])
    out = model.generate(prompt, max_new_tokens=30, do_sample=False)
    assert out[0].tolist() == [EOT, 2, 3, 4, 4, 3, EOT]
    # A new document: the history is the lone <eot>, scored with raw bigram counts.
    out = model.generate(torch.tensor([[EOT]]), max_new_tokens=30, do_sample=False)
    assert out[0].tolist() == [EOT, 2, 3, 4, 4, 3, EOT]
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=30, do_sample=True, num_return_sequences=4)
    for row in sampled.tolist():
        new = row[3:]
        assert EOT in new, "a sample this long must reach the end of text"
        assert all(token == EOT for token in new[new.index(EOT) :]), "only padding after the end of text"


def test_left_padding_is_not_history(english_model, english):
    ids, _ = english
    short, long = ids[100_000:100_004].tolist(), ids[100_100:100_107].tolist()
    pad = [EOT] * (len(long) - len(short))
    input_ids = torch.tensor([pad + short, long])
    attention_mask = torch.tensor([[0] * len(pad) + [1] * len(short), [1] * len(long)])
    logits = english_model(input_ids, attention_mask=attention_mask).logits  # (2, 7, V)
    assert logits.shape == (2, len(long), english_model.config.vocab_size)
    for t in range(len(short)):
        expected = english_model.kn.next_logprobs(short[: t + 1]).astype(np.float32)
        np.testing.assert_array_equal(logits[0, len(pad) + t].numpy(), expected)
    np.testing.assert_array_equal(logits[1, -1].numpy(), english_model.kn.next_logprobs(long).astype(np.float32))
    last = english_model(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
    np.testing.assert_array_equal(last[:, 0], logits[:, -1])

    batched = english_model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False)
    alone = english_model.generate(torch.tensor([short]), max_new_tokens=10, do_sample=False)
    new_alone = alone[0, len(short) :].tolist()
    assert batched[0, len(long) : len(long) + len(new_alone)].tolist() == new_alone


def test_save_load_round_trip_generates_the_same(tmp_path, english_model, english):
    ids, _ = english
    english_model.save(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"ngram.safetensors", "config.json"}
    loaded = NGramLM.load(tmp_path / "run")
    assert loaded.generation_config.eos_token_id == EOT
    prompt = torch.from_numpy(ids[None, 100_000:100_008])
    for kwargs in ({"do_sample": False}, {"do_sample": True, "top_k": 0, "temperature": 0.9}):
        outputs = []
        for model in (english_model, loaded):
            torch.manual_seed(0)
            outputs.append(model.generate(prompt, max_new_tokens=30, **kwargs)[0].tolist())
        assert outputs[0] == outputs[1]


# --------------------------------------------------------------------------------------
# Timing on real text (prints; no time limit is asserted)

FORTUNES = Path("/usr/share/games/fortunes")


@pytest.mark.slow
@pytest.mark.skipif(not (FORTUNES / "zippy").is_file(), reason="Debian package fortunes not installed")
def test_order_7_on_real_fortunes_reaches_the_published_bar():
    """The research anchor: an interpolated KN 7-gram reaches about 2.28 bits/char on fortunes."""
    from aigc.data.text import load_corpus

    text = load_corpus("fortunes").docs[0]
    index = {c: i + 2 for i, c in enumerate(sorted(set(text)))}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    cut = int(len(ids) * 0.9)
    kn = KneserNey(7, len(index) + 2).fit(ids[:cut])
    bits_per_char = kn.nll(ids[cut:], context=ids[cut - 6:cut]) / (len(ids) - cut) / math.log(2)
    assert 2.0 < bits_per_char < 2.40
