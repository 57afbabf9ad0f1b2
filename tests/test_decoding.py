"""Decoding means the same for every text family: oracle tests against hand-written loops."""

from __future__ import annotations

import pytest
import torch

from aigc.data.tokenizer import train_char
from aigc.errors import UserError
from aigc.sample import GenerateSettings, LoadedModel, TextStream, generate
from conftest import make_model, make_poems

FAMILIES = ["ngram", "rnn", "gpt"]


@pytest.fixture(scope="module")
def vocab():
    docs = make_poems(20)
    tok = train_char(docs)
    return tok, tok.encode_docs(docs)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, vocab, tmp_path_factory):
    tok, ids = vocab
    model = make_model(request.param, ids, tok).eval()
    return LoadedModel(model, tok, request.param, tmp_path_factory.mktemp("m"), 16)


def argmax_loop(loaded: LoadedModel, prompt: str, steps: int, window: int = 0) -> str:
    """Greedy decoding written out by hand, re-reading the whole context every step: the oracle for `generate`. With a
    `window`, the model reads at most that many tokens; once a token would pass it, it reads the last `window // 2`
    again."""
    tok = loaded.tokenizer
    ids = [tok.eot_id] + tok.encode(prompt)
    start, out = max(0, len(ids) - window) if window else 0, []
    with torch.no_grad():
        for _ in range(steps):
            if window and len(ids) - start > window:
                start = len(ids) - window // 2
            logits = loaded.model(input_ids=torch.tensor([ids[start:]])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eot_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return prompt + tok.decode_text(out)


def test_greedy_equals_hand_written_argmax(loaded):
    got, _ = generate(loaded, GenerateSettings(prompt="春", temperature=0, max_new_tokens=12))
    assert got == [argmax_loop(loaded, "春", 12)]


def test_beam_search_with_one_beam_and_top_k_1_equal_greedy(loaded):
    greedy, _ = generate(loaded, GenerateSettings(prompt="月", temperature=0, max_new_tokens=12))
    one_beam, _ = generate(loaded, GenerateSettings(prompt="月", temperature=0, num_beams=1, max_new_tokens=12))
    top1, _ = generate(loaded, GenerateSettings(prompt="月", temperature=1.0, top_k=1, seed=5, max_new_tokens=12))
    tiny_p, _ = generate(loaded, GenerateSettings(prompt="月", temperature=1.0, top_p=1e-6, seed=9, max_new_tokens=12))
    assert one_beam == greedy == top1 == tiny_p


def test_temperature_zero_ignores_the_seed(loaded):
    a, _ = generate(loaded, GenerateSettings(temperature=0, seed=1, max_new_tokens=10))
    b, _ = generate(loaded, GenerateSettings(temperature=0, seed=2, max_new_tokens=10))
    assert a == b


def test_beam_search_returns_the_top_beams(loaded):
    samples, _ = generate(loaded, GenerateSettings(prompt="山", num_beams=3, n=2, max_new_tokens=8))
    assert len(samples) == 2 and samples[0] != samples[1]
    assert all(s.startswith("山") for s in samples)


def _bigrams(ids: list[int]) -> list[tuple[int, int]]:
    return list(zip(ids, ids[1:], strict=False))


def test_no_repeat_ngram_size_forbids_repeats(vocab):
    # A bigram model trained on a cycle wants to repeat it forever: the constraint must stop that.
    tok = train_char(["春江花月夜"])
    ids = tok.encode_docs(["春江花月夜" * 30])
    model = make_model("ngram", ids, tok).eval()
    loaded = LoadedModel(model, tok, "ngram", None, 16)
    free, _ = generate(loaded, GenerateSettings(prompt="春", temperature=0, max_new_tokens=15))
    free_ids = tok.encode(free[0])
    assert len(set(_bigrams(free_ids))) < len(_bigrams(free_ids))  # it does repeat without the rule
    constrained, _ = generate(loaded, GenerateSettings(prompt="春", temperature=0, max_new_tokens=15,
                                                       no_repeat_ngram_size=2))
    c_ids = tok.encode(constrained[0])
    assert len(set(_bigrams(c_ids))) == len(_bigrams(c_ids))


def test_repetition_penalty_pushes_towards_unseen_tokens(loaded):
    samples, _ = generate(loaded, GenerateSettings(temperature=0, repetition_penalty=1e6, max_new_tokens=8))
    ids = loaded.tokenizer.encode(samples[0])
    assert len(ids) == len(set(ids))  # no token repeats while unseen ones remain (vocabulary > 9)


def test_stop_strings_on_a_chinese_only_vocabulary():
    # no a-f letters in the vocabulary: transformers' own stop_strings cannot handle it
    docs = ["春江潮水连海平，海上明月共潮生。"] * 20
    tok = train_char(docs)
    assert not set("abcdef") & set(tok.tokenizer.get_vocab())
    model = make_model("ngram", tok.encode_docs(docs), tok).eval()
    loaded = LoadedModel(model, tok, "ngram", None, 16)
    full, stats_full = generate(loaded, GenerateSettings(temperature=0, max_new_tokens=30))
    assert "，" in full[0]
    cut, stats_cut = generate(loaded, GenerateSettings(temperature=0, max_new_tokens=30, stop=["，"]))
    assert cut == [full[0][: full[0].index("，")]]
    assert stats_cut["generated_tokens"] < stats_full["generated_tokens"]  # generation stopped early


def test_streaming_prints_the_same_text(loaded):
    pieces: list[str] = []
    settings = GenerateSettings(prompt="春", seed=3, temperature=1.0, max_new_tokens=20, stop=["。"])
    samples, _ = generate(loaded, settings, stream=pieces.append)
    assert "春" + "".join(pieces) == samples[0]
    assert "。" not in "".join(pieces)


def test_seed_reproduces_each_sampler(loaded):
    for knobs in ({"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}, {"repetition_penalty": 1.3}):
        settings = GenerateSettings(n=2, seed=11, temperature=0.9, max_new_tokens=10, **knobs)
        assert generate(loaded, settings)[0] == generate(loaded, settings)[0]


@pytest.mark.parametrize("options", [{"do_sample": True, "top_k": 0},
                                     {"num_beams": 3, "do_sample": False, "num_return_sequences": 2}],
                         ids=["sampling", "beams"])
def test_the_cache_changes_no_token(loaded, options):
    """gpt's key/value cache and rnn's recurrent state give the tokens of re-reading the whole sequence."""
    if loaded.family == "ngram":
        pytest.skip("the n-gram reads a fixed window: it has no cache")
    ids = torch.tensor([[loaded.tokenizer.eot_id] + loaded.tokenizer.encode("春")])
    outs = []
    for cache in (True, False):
        torch.manual_seed(3)
        outs.append(loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                          min_new_tokens=12, use_cache=cache, **options))
    assert outs[0].shape[1] == ids.shape[1] + 12
    assert torch.equal(outs[0], outs[1])


def _input_lengths(model) -> list[int]:
    """Record the sequence length of every forward call of a text model (its `input_ids`)."""
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    return lengths


@pytest.mark.parametrize("family", ["rnn", "gpt"])
@pytest.mark.parametrize("settings", [
    {"seed": 7, "temperature": 1.0},
    {"temperature": 0},
    {"num_beams": 3, "n": 2},
    {"seed": 2, "temperature": 1.0, "stop": ["。"]},
    {"seed": 4, "temperature": 1.0, "stream": True},
], ids=["sampling", "greedy", "beams", "stop", "stream"])
def test_generation_reads_one_token_per_step(vocab, family, settings):
    """The cache is used: the prompt is read once, then each step reads only the newest token (gpt's
    key/value cache, the rnn's recurrent state). Fails if transformers stops carrying the cache."""
    tok, ids = vocab
    model = make_model(family, ids, tok).eval()
    loaded = LoadedModel(model, tok, family, None, 16)
    lengths = _input_lengths(model)
    settings = dict(settings)
    stream = [] if settings.pop("stream", False) else None
    samples, stats = generate(loaded, GenerateSettings(prompt="春风", max_new_tokens=6, **settings),
                              stream=None if stream is None else stream.append)
    assert lengths[0] == 3  # EOT + the two prompt characters
    assert len(lengths) >= 3, "too few steps to see the cache: pick another seed"
    assert set(lengths[1:]) == {1}
    assert len(lengths) <= 6


def test_a_char_tokenizers_pieces_concatenate_to_its_decoding():
    """The oracle: the tokenizers library's own decode of the whole sequence, special and unknown tokens among it
    (a stream grows its text a piece a token on this)."""
    tok = train_char(["春江潮水连海平，\n海上明月共潮生。", "abc def"])
    pieces = tok.pieces()
    assert pieces is not None and len(pieces) == tok.vocab_size
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, tok.vocab_size, (int(torch.randint(1, 40, (1,), generator=rng)),), generator=rng)
        ids = ids.tolist()
        assert "".join(pieces[i] for i in ids) == tok.decode_text(ids)
    assert tok.decode_text([tok.eot_id]) == "" == pieces[tok.eot_id]


def test_a_stream_grown_a_piece_a_token_writes_what_decoding_the_whole_writes():
    """The same tokens through a char tokenizer's stream (pieces) and through one that decodes the whole sequence
    each time (pieces switched off), with stop strings that cut it: the same text is written."""
    tok = train_char(["春江潮水连海平，海上明月共潮生。滟滟随波千万里"])
    ids = tok.encode("春江潮水连海平，海上明月共潮生。滟滟随波千万里")
    for stops in ([], ["明月"], ["。滟", "波"], ["不在"]):
        written = []
        for pieces in (True, False):
            out: list[str] = []
            stream = TextStream(tok, stops, out.append)
            if not pieces:
                stream.pieces = None
            for i in ids:
                stream.add(i)
            stream.end()
            written.append(out)
        assert "".join(written[0]) == "".join(written[1]), stops
        assert written[0] == written[1], stops


@pytest.fixture(scope="module")
def long_gpt(vocab):
    """A tiny gpt (64 positions) whose greedy decoding runs past its window of 16 without ending."""
    tok, ids = vocab
    return LoadedModel(make_model("gpt", ids, tok).eval(), tok, "gpt", None, 16)


@pytest.mark.parametrize("prompt", ["春", "春江潮水连海平海上明月共潮生滟滟随波千万里"],
                         ids=["short", "longer-than-window"])
@pytest.mark.parametrize("window", [None, 6, 0])
def test_a_window_slides_as_the_hand_written_loop_does(long_gpt, prompt, window):
    """The decoder's sliding window (key/value cache made again from the window's last half) picks the tokens of
    re-reading the window every step; None is the training block (16 here), 0 all the positions."""
    steps = 40 if window != 0 else 64 - 2 - len(prompt)
    got, stats = generate(long_gpt, GenerateSettings(prompt=prompt, temperature=0, max_new_tokens=steps, window=window))
    expected = argmax_loop(long_gpt, prompt, steps, {None: 16, 0: 64}.get(window, window))
    assert got == [expected]
    assert stats["generated_tokens"] > 20, "greedy decoding ended before the window slid: pick another prompt"


def test_a_window_lets_a_sample_pass_the_models_positions(long_gpt):
    """64 positions: with a window the sample may be longer; reading all the positions it may not."""
    settings = GenerateSettings(prompt="月", temperature=0, max_new_tokens=150)
    [sample], _ = generate(long_gpt, settings)
    assert settings.window == 16  # the record says which window made it
    assert len(sample) > 64, "greedy decoding ended before position 64: pick another prompt"
    assert sample == argmax_loop(long_gpt, "月", 150, 16)
    with pytest.raises(UserError, match="context of 64 tokens"):
        generate(long_gpt, GenerateSettings(prompt="月", temperature=0, max_new_tokens=150, window=0))
    with pytest.raises(UserError, match="--window must be 0"):
        generate(long_gpt, GenerateSettings(max_new_tokens=5, window=1))
    with pytest.raises(UserError, match="beam search reads the whole sequence"):
        generate(long_gpt, GenerateSettings(max_new_tokens=20, num_beams=2))
    assert len(generate(long_gpt, GenerateSettings(max_new_tokens=20, num_beams=2, window=0))[0]) == 1


def test_a_model_without_positions_has_no_window(vocab):
    tok, ids = vocab
    for family in ("rnn", "ngram"):
        settings = GenerateSettings(seed=3, temperature=1.0, max_new_tokens=40, window=6)
        loaded = LoadedModel(make_model(family, ids, tok).eval(), tok, family, None, 16)
        assert generate(loaded, settings)[0] == generate(loaded, GenerateSettings(seed=3, temperature=1.0,
                                                                                  max_new_tokens=40))[0]
        assert settings.window == 0
