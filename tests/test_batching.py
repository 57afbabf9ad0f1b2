"""Batched decoding: requests with different prompts (lengths), settings, seeds, stops and lengths decoded
together return what each returns alone; the rnn reads left-padded prompts as it reads them alone."""

from __future__ import annotations

import threading

import pytest
import torch

from aigc.config import build
from aigc.data.tokenizer import train_char
from aigc.errors import Cancelled, UserError
from aigc.models import FAMILIES
from aigc.sample import Ask, Decoder, DrawToken, GenerateSettings, LoadedModel, generate_many
from aigc.service import sections_for
from conftest import TINY_SETS, make_model, make_poems


@pytest.fixture(scope="module")
def vocab():
    docs = make_poems(30)
    tok = train_char(docs)
    return tok, tok.encode_docs(docs)


def tiny(family: str, vocab, **sets) -> LoadedModel:
    tok, ids = vocab
    if sets:
        torch.manual_seed(0)
        configs = build(sections_for(family), {**TINY_SETS[family], **sets}, family=family)
        model = FAMILIES[family].build(configs["model"], tok.vocab_size, tok.eot_id)
    else:
        model = make_model(family, ids, tok)
    return LoadedModel(model.eval(), tok, family, None, 16)


@pytest.fixture(scope="module", params=["gpt", "rnn-gru", "rnn-lstm", "ngram"])
def loaded(request, vocab):
    if request.param == "rnn-lstm":
        return tiny("rnn", vocab, cell="lstm", n_layer="2")
    return tiny(request.param.split("-")[0], vocab)


ASKS = [
    GenerateSettings(prompt="春江花月夜", seed=1, temperature=1.0, max_new_tokens=12),
    GenerateSettings(prompt="", seed=2, temperature=0.7, top_k=5, n=3, max_new_tokens=20),
    GenerateSettings(prompt="山", temperature=0, max_new_tokens=8),
    GenerateSettings(prompt="风云", seed=4, temperature=1.3, top_p=0.9, min_p=0.02, stop=["。", "，"],
                     max_new_tokens=30),
    GenerateSettings(prompt="明月光光", seed=5, temperature=1.0, repetition_penalty=1.5, no_repeat_ngram_size=2,
                     max_new_tokens=16),
]


def test_a_request_decodes_the_same_alone_or_batched(loaded):
    alone = [generate_many(loaded, [Ask(s)])[0] for s in ASKS]
    together = generate_many(loaded, [Ask(s) for s in ASKS])
    for one, batched, s in zip(alone, together, ASKS, strict=True):
        assert batched[0] == one[0], s
        assert batched[1]["finish_reasons"] == one[1]["finish_reasons"]
        assert batched[1]["generated_tokens"] == one[1]["generated_tokens"]
    assert together[0][1]["batch_rows"] == sum(s.n for s in ASKS)
    assert all(len(t[0][0]) <= len(s.prompt) + s.max_new_tokens for t, s in zip(together, ASKS, strict=True))
    assert "。" not in together[3][0][0][2:] and "，" not in together[3][0][0][2:]


def test_each_request_streams_its_own_text(loaded):
    pieces: dict[int, list[str]] = {0: [], 3: []}
    asks = [Ask(s, stream=pieces[i].append if i in pieces else None) for i, s in enumerate(ASKS) if s.n == 1]
    results = generate_many(loaded, asks)
    assert ASKS[0].prompt + "".join(pieces[0]) == results[0][0][0]
    assert ASKS[3].prompt + "".join(pieces[3]) == results[2][0][0]


def test_one_bad_or_cancelled_request_fails_alone(loaded):
    gone = threading.Event()
    gone.set()
    bad = GenerateSettings(prompt="x", num_beams=2, max_new_tokens=4)
    results = generate_many(loaded, [Ask(ASKS[0]), Ask(ASKS[1], cancel=gone), Ask(bad.validate())])
    assert isinstance(results[1], Cancelled) and isinstance(results[2], UserError)
    assert results[0][0] == generate_many(loaded, [Ask(ASKS[0])])[0][0]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_the_rnn_reads_a_left_padded_prompt_as_it_reads_it_alone(vocab, cell):
    loaded = tiny("rnn", vocab, cell=cell, n_layer="2")
    short, long_ = torch.tensor([[0, 5, 6]]), torch.tensor([[0, 7, 8, 9, 10, 11]])
    padded = torch.tensor([[0, 0, 0, 0, 5, 6], [0, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        both = loaded.model(padded, attention_mask=mask, use_cache=True)
        alone = [loaded.model(x, use_cache=True) for x in (short, long_)]
    torch.testing.assert_close(both.logits[0, -3:], alone[0].logits[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(both.logits[1], alone[1].logits[0], rtol=0, atol=1e-6)
    for layer, (s_batched, s_short, s_long) in enumerate(zip(both.state, alone[0].state, alone[1].state,
                                                             strict=True)):
        torch.testing.assert_close(s_batched[:, 0], s_short[:, 0], rtol=0, atol=1e-6, msg=f"state {layer}")
        torch.testing.assert_close(s_batched[:, 1], s_long[:, 0], rtol=0, atol=1e-6, msg=f"state {layer}")


@pytest.mark.parametrize("shape", [(1, 6000), (3, 517), (16, 6000)])
def test_our_noise_is_exponential_bit_for_bit_and_leaves_the_generator_where_it_does(shape):
    """The oracle: `Tensor.exponential_` on a generator seeded the same; the generator's next draws agree too."""
    for seed in range(20):
        theirs_gen, ours_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        theirs = torch.empty(shape).exponential_(1, generator=theirs_gen)
        drawn = torch.empty(shape, dtype=DrawToken.noise_dtype(torch.device("cpu")))
        DrawToken(ours_gen).noise(drawn)
        ours = DrawToken.exponential(drawn)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), seed
        assert torch.equal(torch.rand(4, generator=ours_gen), torch.rand(4, generator=theirs_gen)), seed


@pytest.mark.parametrize("knobs", [{"temperature": 0.8}, {"temperature": 0.9, "top_k": 5},
                                   {"temperature": 1.2, "top_p": 0.9}, {"temperature": 0.0, "repetition_penalty": 1.3}],
                         ids=["temperature", "top-k", "top-p", "greedy"])
def test_our_decode_step_draws_what_transformers_generate_draws(loaded, knobs):
    """The oracle: transformers' own sampling (global RNG after `torch.manual_seed(seed)`), or its greedy search."""
    s = GenerateSettings(prompt="春江", seed=7, n=2 if knobs["temperature"] else 1, max_new_tokens=15, window=0,
                         **knobs)  # transformers reads every position
    ours = generate_many(loaded, [Ask(s.validate())])[0][0]
    tok = loaded.tokenizer
    ids = torch.tensor([[tok.eot_id] + tok.encode(s.prompt)] * s.n)
    torch.manual_seed(s.seed)
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=s.temperature > 0,
                                    temperature=s.temperature or None, top_k=s.top_k, top_p=s.top_p,
                                    repetition_penalty=s.repetition_penalty, max_new_tokens=s.max_new_tokens,
                                    eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)
    theirs = []
    for row in out[:, ids.shape[1]:].tolist():
        row = row[: row.index(tok.eot_id)] if tok.eot_id in row else row
        theirs.append(s.prompt + tok.decode_text(row))
    assert ours == theirs


def _decode(decoder: Decoder) -> tuple[dict, list[int]]:
    """Step a decoder until it is idle: each tag's outcome, and the rows of every step."""
    outcomes, rows = {}, []
    while not decoder.idle:
        rows.append(decoder.rows)
        outcomes.update(decoder.step())
    return outcomes, rows


def test_a_request_that_joins_a_running_batch_decodes_as_it_does_alone(loaded):
    """Continuous batching: requests join between steps and leave when done, and each still decodes alone's text."""
    alone = [generate_many(loaded, [Ask(s)])[0] for s in ASKS]
    decoder = Decoder(loaded)
    assert decoder.admit([(0, Ask(ASKS[0])), (1, Ask(ASKS[1]))]) == []
    outcomes = {}
    for _ in range(3):
        outcomes.update(decoder.step())
    running = [r.tag for r in decoder.requests]
    assert running, "both first requests ended within 3 tokens: pick other seeds"
    decoder.admit([(k, Ask(ASKS[k])) for k in (2, 3, 4)])
    later, rows = _decode(decoder)
    outcomes.update(later)
    assert rows[0] == sum(ASKS[k].n for k in [*running, 2, 3, 4])
    assert rows == sorted(rows, reverse=True) and rows[-1] < rows[0]  # finished requests left at once
    for k, s in enumerate(ASKS):
        assert outcomes[k][0] == alone[k][0], s
        assert outcomes[k][1]["finish_reasons"] == alone[k][1]["finish_reasons"]


def test_a_finished_request_takes_its_cached_positions_with_it(vocab):
    """gpt's key/value cache keeps only the positions some row still reads: a long prompt that finished leaves
    the cache as wide as the rows that remain."""
    loaded = tiny("gpt", vocab)
    decoder = Decoder(loaded)
    long_prompt = GenerateSettings(prompt="春江潮水连海平海上", temperature=0, max_new_tokens=2)
    short_prompt = GenerateSettings(prompt="月", seed=1, temperature=1.0, max_new_tokens=12)
    decoder.admit([("long", Ask(long_prompt)), ("short", Ask(short_prompt))])
    finished = {}
    while "long" not in finished:
        finished.update(decoder.step())
    if "short" in finished:
        pytest.skip("the short request ended first: pick another seed")
    [short] = decoder.requests
    assert decoder.memory.mask.shape[1] == short.ids.shape[1] < len(long_prompt.prompt) + 1
    assert bool(decoder.memory.mask.all())


def test_requests_with_their_own_windows_decode_together_as_alone(loaded):
    """A window slides a request's rows at their own step (gpt: their memory is made again and joins the batch at
    its end); the others go on, and each request decodes what it decodes alone."""
    asks = [GenerateSettings(prompt="春江花月夜", seed=1, temperature=1.0, max_new_tokens=40, window=6),
            GenerateSettings(prompt="", seed=2, temperature=0.9, n=2, max_new_tokens=45, window=0),
            GenerateSettings(prompt="山", seed=3, temperature=1.0, n=2, max_new_tokens=50),
            GenerateSettings(prompt="明", temperature=0, max_new_tokens=44, window=10)]
    alone = [generate_many(loaded, [Ask(s.validate())])[0] for s in asks]
    together = generate_many(loaded, [Ask(s) for s in asks])
    for (mine, _), (theirs, _) in zip(together, alone, strict=True):
        assert mine == theirs
    assert max(len(t) for samples, _ in alone for t in samples) > 12, "every request ended before its window slid"
