"""Sampling draws from a per-request generator: the samples of the old global-RNG path, bit for bit,
the global RNG left alone, and concurrent requests that cannot disturb each other."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import StoppingCriteriaList, WatermarkingConfig

from aigc.data.tokenizer import train_char
from aigc.sample import GenerateSettings, LoadedModel, StopOnStrings, TextStream, cut_at_stop, generate
from conftest import make_model, make_poems

FAMILIES = ["ngram", "rnn", "gpt"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vocab():
    docs = make_poems(20)
    tok = train_char(docs)
    return tok, tok.encode_docs(docs)


# The untrained rnn and gpt predict nearly uniform distributions (logit std ~0.1), which top-p,
# min-p and the penalties barely touch; scaled logits give them something to cut.
LOGIT_SCALE = {"ngram": 1.0, "rnn": 10.0, "gpt": 10.0}


def sharpened(family: str, vocab) -> LoadedModel:
    tok, ids = vocab
    model = make_model(family, ids, tok).eval()
    scale = LOGIT_SCALE[family]

    def scale_logits(module, args, kwargs, output):
        output.logits = output.logits * scale
        return output

    model.register_forward_hook(scale_logits, with_kwargs=True)
    return LoadedModel(model, tok, family, None, 16)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, vocab):
    return sharpened(request.param, vocab)


def global_rng_generate(loaded: LoadedModel, s: GenerateSettings, stream=None) -> tuple[list[str], int]:
    """The oracle: how `generate` sampled before, with transformers' sampling mode on the global RNG
    seeded by `torch.manual_seed`. Returns the samples and the generated token count."""
    tok = loaded.tokenizer
    prompt_ids = [tok.eot_id] + tok.encode(s.prompt)
    kwargs = {"max_new_tokens": s.max_new_tokens, "num_beams": 1, "num_return_sequences": s.n,
              "repetition_penalty": s.repetition_penalty, "no_repeat_ngram_size": s.no_repeat_ngram_size,
              "do_sample": True, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id,
              "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p or None}
    if s.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tok, s.stop, len(prompt_ids))])
    if stream is not None:
        kwargs["streamer"] = TextStream(tok, s.stop, stream)
    input_ids = torch.tensor([prompt_ids])
    torch.manual_seed(s.seed)
    with torch.no_grad():
        out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    samples, n_tokens = [], 0
    for row in out[:, len(prompt_ids):].tolist():
        if tok.eot_id in row:
            row = row[: row.index(tok.eot_id)]
        n_tokens += len(row)
        text = tok.decode_text(row)
        samples.append(s.prompt + text[: cut_at_stop(text, s.stop)])
    return samples, n_tokens


KNOBS = {
    "plain": {"temperature": 1.0},
    "temperature": {"temperature": 1.7},
    "top_k": {"temperature": 0.9, "top_k": 4},
    "top_p": {"temperature": 1.2, "top_p": 0.7},
    "min_p": {"temperature": 1.1, "min_p": 0.15},
    "repetition_penalty": {"temperature": 1.0, "repetition_penalty": 1.4},
    "no_repeat_ngram": {"temperature": 1.0, "no_repeat_ngram_size": 2},
    "stop": {"temperature": 1.0, "stop": ["。", "，"]},
    "all": {"temperature": 0.8, "top_k": 8, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.2,
            "no_repeat_ngram_size": 3, "stop": ["。"], "prompt": "春风"},
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
def test_samples_equal_the_global_rng_path(loaded, knobs, n):
    for seed in (0, 7):
        s = GenerateSettings(n=n, seed=seed, max_new_tokens=20, window=0, **knobs)  # the oracle reads every position
        samples, stats = generate(loaded, s)
        assert (samples, stats["generated_tokens"]) == global_rng_generate(loaded, s)


@pytest.mark.parametrize("knobs", [KNOBS["plain"], KNOBS["all"]], ids=["plain", "all"])
def test_streamed_samples_equal_the_global_rng_path(loaded, knobs):
    s = GenerateSettings(seed=3, max_new_tokens=20, window=0, **knobs)  # the oracle reads every position
    pieces, old_pieces = [], []
    samples, _ = generate(loaded, s, stream=pieces.append)
    old, _ = global_rng_generate(loaded, s, stream=old_pieces.append)
    assert samples == old and pieces == old_pieces


GENERATION_CONFIG_EXTRAS = {
    "top_h": {"top_h": 0.6},
    "typical_p": {"typical_p": 0.8},
    "epsilon_cutoff": {"epsilon_cutoff": 0.02},
    "eta_cutoff": {"eta_cutoff": 0.2},
    "watermarking": {"watermarking_config": WatermarkingConfig(greenlist_ratio=0.5, bias=3.0)},
    "renormalize": {"renormalize_logits": True},
}


@pytest.mark.parametrize("extra", GENERATION_CONFIG_EXTRAS.values(), ids=GENERATION_CONFIG_EXTRAS.keys())
def test_generation_config_warpers_apply_as_before(vocab, extra):
    """A Hugging Face folder's generation config may ask for warpers the settings do not expose."""
    loaded = sharpened("gpt", vocab)
    for key, value in extra.items():
        setattr(loaded.model.generation_config, key, value)
    s = GenerateSettings(n=3, seed=1, temperature=1.0, max_new_tokens=20, window=0)  # the oracle reads every position
    samples, stats = generate(loaded, s)
    assert (samples, stats["generated_tokens"]) == global_rng_generate(loaded, s)


@pytest.mark.parametrize("knobs", [{"temperature": 1.0, "n": 2}, {"temperature": 0}, {"num_beams": 2}],
                         ids=["sampling", "greedy", "beams"])
def test_generate_leaves_the_global_rng_alone(loaded, knobs):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate(loaded, GenerateSettings(seed=5, max_new_tokens=10, **knobs))
    assert torch.equal(torch.get_rng_state(), before)


def test_concurrent_requests_get_their_solo_samples(loaded):
    settings = [GenerateSettings(n=2, seed=seed, temperature=1.0, max_new_tokens=24) for seed in (1, 2)]
    alone = [generate(loaded, s)[0] for s in settings]
    assert alone[0] != alone[1]  # different seeds: a mix-up would show
    rounds = 4
    barrier = threading.Barrier(len(settings))
    got: list[list[list[str]]] = [[] for _ in settings]
    errors: list[BaseException] = []

    def request(i: int) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()  # start both requests together, every round
                got[i].append(generate(loaded, settings[i])[0])
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert got == [[alone[i]] * rounds for i in range(len(settings))]

