"""Load a run (or any Hugging Face causal-LM folder) and generate text.

Every text family is a `PreTrainedModel` + `GenerationMixin`, so the decoding controls (greedy,
temperature, top-k, top-p, min-p, repetition penalty, no_repeat_ngram_size, beam search) mean
the same for all of them: they are transformers' own logits processors. Stop strings are our own rule
on the decoded text: transformers' `stop_strings` fails on vocabularies without the letters a-f, as
every Chinese char vocabulary is.

Sampling and greedy decoding run in our own decode step (`Decoder`), which transformers' `generate`
cannot be: it takes one length and one stop list per batch, samples on the global RNG, and keeps a
batch's rows until the longest ends. Each request draws from its own `torch.Generator` (the same draw
as transformers' sampling after `torch.manual_seed`, see `DrawToken`), stops on its own, and leaves
the batch when done while new requests join (continuous batching). Beam search is transformers' own.
"""

from __future__ import annotations

import inspect
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerationMixin,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.cache_utils import DynamicCache, DynamicLayer

from aigc.checkpoint import verify_manifest
from aigc.config import read_toml
from aigc.data.tokenizer import TextTokenizer
from aigc.errors import Cancelled, Conflict, UserError
from aigc.models import FAMILIES
from aigc.store import find_run, read_run
from aigc.train import stream_nll

MAX_NEW_TOKENS_CAP = 4096
MIN_TEMPERATURE = 1e-6


@dataclass
class GenerateSettings:
    prompt: str = ""  # text the samples continue; empty = start of a new document
    n: int = 1  # samples to return (with beams: the top n beams, n <= num_beams)
    seed: int = 0  # same run, prompt, settings and seed give the same samples
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 = greedy decoding
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    num_beams: int = 1  # > 1: beam search (deterministic)
    no_repeat_ngram_size: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)  # cut each sample before the first of these strings
    window: int | None = None  # the most tokens the model reads (`window_of`): None = its training block, 0 = all

    def validate(self) -> GenerateSettings:
        checks = [
            (self.n >= 1, f"-n must be >= 1, got {self.n}"),
            (1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP,
             f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"--temperature must be >= 0, got {self.temperature}"),
            # below it logits / temperature overflow float32 and the probabilities are NaN
            (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
             f"--temperature {self.temperature:g}: use 0 for greedy decoding, or at least {MIN_TEMPERATURE:g}"),
            (self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"--min-p must be in [0, 1), got {self.min_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"--repetition-penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"--num-beams must be >= 1, got {self.num_beams}"),
            (self.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must be >= 0, got {self.no_repeat_ngram_size}"),
            (all(self.stop), "--stop strings must not be empty"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.window is None or self.window == 0 or self.window >= 2,
             f"--window must be 0 (all the model's positions) or at least 2, got {self.window}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.temperature == 0 and self.num_beams == 1 and self.n > 1:
            raise UserError(f"-n {self.n} with --temperature 0 would give {self.n} identical samples: sample "
                            f"with a temperature > 0, or use --num-beams for several distinct best sequences")
        if self.num_beams > 1 and self.n > self.num_beams:
            raise UserError(f"-n {self.n} is more than --num-beams {self.num_beams}: beam search returns "
                            f"at most num_beams sequences")
        return self


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: TextTokenizer
    family: str  # "gpt", "rnn", "ngram", or "hf" for a plain Hugging Face folder
    path: Path
    block_size: int  # context used for scoring

    def nll(self, ids: np.ndarray) -> tuple[float, int]:
        """Total NLL in nats of ids[1:] given what precedes, and the number of scored tokens."""
        if self.family == "ngram":
            return self.model.kn.nll(ids[1:], context=ids[:1]), len(ids) - 1
        return stream_nll(self.model, ids, self.block_size)

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "n_positions", None)


def load_run(spec: str) -> LoadedModel:
    """A run name, a run directory, or a Hugging Face causal-LM folder."""
    path = Path(spec).expanduser()
    if not (path / "run.json").is_file() and (path / "config.json").is_file():
        return _load_hf_folder(path)
    run_dir = find_run(spec)
    record = read_run(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise Conflict(f"run {run_dir.name!r} has no saved weights yet (status: {record.get('status')})")
    verify_manifest(run_dir)
    family = FAMILIES[record["family"]]
    model = family.load(run_dir).eval()
    block_size = int(read_toml(run_dir / "config.toml").get("block_size", 0)) or 128
    return LoadedModel(model, TextTokenizer.load(run_dir), record["family"], run_dir, block_size)


def _load_hf_folder(path: Path) -> LoadedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load as a Hugging Face causal LM: {e}") from None
    eot = hf_tok.bos_token or hf_tok.eos_token
    if eot is None or not hf_tok.is_fast:
        raise UserError(f"{path}: its tokenizer needs a fast tokenizer with a bos or eos token")
    tokenizer = TextTokenizer(hf_tok.backend_tokenizer, "hf", eot_token=eot)
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    return LoadedModel(model, tokenizer, "hf", path, min(context, 1024))


class StopOnStrings(StoppingCriteria):
    """Stop a row once its decoded continuation contains one of the stop strings."""

    def __init__(self, tokenizer: TextTokenizer, stops: list[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [any(s in self.tokenizer.decode_text(row[self.prompt_len:].tolist()) for s in self.stops)
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class TextStream:
    """Writes text as it is generated, holding back what could still turn out to be the start of a stop
    string, and nothing after a stop string. `add` takes a token from our decoder; `put` and `end` are
    transformers' streamer interface (the first `put` carries the prompt)."""

    def __init__(self, tokenizer: TextTokenizer, stops: list[str], write: Callable[[str], None]):
        self.tokenizer, self.stops, self.write = tokenizer, stops, write
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False
        self.pieces = tokenizer.pieces()  # a char tokenizer's: the text grows a piece a token (`add`)
        self.text = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        if self.pieces is not None:
            self.text += self.pieces[token]
        self._flush(final=False)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        if self.pieces is not None:
            self.text = self.tokenizer.decode_text(self.ids)
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        text = self.text if self.pieces is not None else self.tokenizer.decode_text(self.ids)
        cut = cut_at_stop(text, self.stops)
        if cut != len(text):
            self.stopped, final = True, True
        text = text[:cut]
        if not final:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            # an incomplete multi-byte character decodes to U+FFFD until its last byte arrives
            safe = len(text.rstrip("\ufffd")) - hold
        else:
            safe = len(text)
        if safe > self.sent:
            self.write(text[self.sent:safe])
            self.sent = safe


class StopOnEvent(StoppingCriteria):
    """Stop every row once `event` is set (a server's client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stops: list[str]) -> int:
    """Index of the first occurrence of any stop string, or len(text)."""
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else len(text)


class DrawToken:
    """transformers' multinomial sampling step, on the request's own generator.

    The same call as `GenerationMixin._sample` makes in sampling mode, `multinomial(softmax(scores), 1)`,
    so a generator seeded with s draws the tokens the global RNG draws after `torch.manual_seed(s)`.
    `noise` + `exponential` + `pick` are the same draw split in three, as PyTorch computes a one-sample
    multinomial (argmax of probs / Exponential(1) noise), so that the rows of many requests are picked in one call
    (checked against `multinomial` by tests/test_batching.py). On the CPU, `exponential_` turns one uniform double
    per element into float(-log1p(-u)), element by element, at about 20 ns an element; `noise` draws the same
    uniforms (`uniform_` in float64 advances the generator as `exponential_` does) and `exponential` transforms
    every request's rows in one vectorised call: the same numbers, bit for bit, about 3x faster (16 rows of a
    6,000-token vocabulary: 0.67 ms instead of 1.9 ms a step; docs/serve.md).
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) processed scores -> (B,) drawn tokens."""
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator)[:, 0]

    @staticmethod
    def noise_dtype(device: torch.device) -> torch.dtype:
        """What `noise` fills: the uniforms in float64 on the CPU, elsewhere the noise itself."""
        return torch.float64 if device.type == "cpu" else torch.float32

    def noise(self, out: torch.Tensor) -> None:
        """Fill `out` ((rows, V), `noise_dtype`) with this request's draw, which `exponential` makes its noise."""
        if out.dtype == torch.float64:
            out.uniform_(generator=self.generator)
        else:
            out.exponential_(1, generator=self.generator)

    @staticmethod
    def exponential(drawn: torch.Tensor) -> torch.Tensor:
        """`noise`'s draw (overwritten) -> Exponential(1) noise in float32, as `exponential_` makes it."""
        return drawn.neg_().log1p_().neg_().float() if drawn.dtype == torch.float64 else drawn

    @staticmethod
    def pick(scores: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.softmax(scores, dim=-1) / noise).argmax(-1)


def sampling_processors(s: GenerateSettings, model: GenerationMixin, device: torch.device) -> LogitsProcessorList:
    """The warpers transformers' `_get_logits_processor` appends in sampling mode with one beam, in its order
    (the draw, `DrawToken`, comes after them).

    The settings give temperature, top-k, top-p and min-p; the model's generation config may add the
    rest, as it did when transformers sampled. Repetition penalty and no_repeat_ngram_size are not
    here: transformers builds them the same in greedy mode, ahead of these processors, as when sampling.
    One beam keeps min_tokens_to_keep at transformers' 1.
    """
    config = model.generation_config
    processors = LogitsProcessorList()
    if s.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(s.temperature))
    if config.top_h is not None:
        processors.append(TopHLogitsWarper(top_h=config.top_h))
    if s.top_k != 0:
        processors.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=1))
    if s.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=1))
    if s.min_p > 0:  # transformers skips only min_p=None; 0 has always meant off here
        processors.append(MinPLogitsWarper(min_p=s.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        processors.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        processors.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        processors.append(EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1, device=device))
    if config.watermarking_config is not None:
        processors.append(config.watermarking_config.construct_processor(model.config.get_text_config().vocab_size,
                                                                      device))
    if config.renormalize_logits is True:
        processors.append(LogitNormalization())
    return processors


def generate(loaded: LoadedModel, settings: GenerateSettings, *, stream: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None, batched: bool = False,
             processors: list[LogitsProcessor] | None = None) -> tuple[list[str], dict]:
    """Generate `settings.n` samples. Each sample is the prompt followed by its continuation.

    Returns the samples and a stats dict (prompt and generated tokens, why each sample ended: "stop" or
    "length", seconds, tokens/s). Leaves the global RNG alone. `cancel` set: generation stops at the next
    token and raises `Cancelled`. Sampling and greedy decoding are `generate_many` with one request (so a
    request decodes the same alone or batched with others); beam search is transformers' own. `batched`:
    decode together with the requests that other threads make at the same time (`BATCHER`). `processors`: logits
    processors of this request alone, applied first (before the penalties and the sampling warpers), e.g. a
    grammar's mask (aigc.data.music_grammar); one instance per request, since they may hold each row's state.
    """
    s = settings.validate()
    s.window = window_of(loaded, s.window)  # the record says which window made it
    processors = list(processors or [])
    if processors and s.num_beams > 1:
        raise UserError("beam search does not take a request's own logits processors (a grammar): sample instead")
    if stream is not None and (s.n > 1 or s.num_beams > 1):
        raise UserError("--stream works with one sample and no beam search (-n 1, --num-beams 1)")
    if s.num_beams > 1:
        return _beam_search(loaded, s, cancel)
    if batched:
        return BATCHER.generate(loaded, Ask(s, stream, cancel, processors))
    [result] = generate_many(loaded, [Ask(s, stream, cancel, processors)])
    if isinstance(result, BaseException):
        raise result
    return result


@dataclass
class Ask:
    """One request in a batch: its settings (validated), where its text streams to, its cancel event."""

    settings: GenerateSettings
    stream: Callable[[str], None] | None = None
    cancel: threading.Event | None = None
    processors: list[LogitsProcessor] = field(default_factory=list)  # its own, applied before the others


def window_of(loaded: LoadedModel, window: int | None) -> int:
    """How many tokens a model with positions reads at most while decoding (0: no window). A row whose context
    would pass it reads again only its last `window // 2` tokens and goes on from there, as `stream_nll` scores a
    long text, so the model never reads a position it did not train on and a sample may be longer than its
    positions. None: the run's training block (a gpt trained on blocks of 256 with 1024 positions writes worse
    past position 255: docs/audio.md); 0: all its positions, no sliding (how rows made before the window were
    made: their replay asks for 0). A model without positions (rnn, n-gram) has no window: 0."""
    context = loaded.max_context
    if context is None:
        return 0
    return min(loaded.block_size if window is None else window, context)


def context_limit(loaded: LoadedModel, window: int | None) -> int | None:
    """The most tokens a row may hold, prompt and sample (None: no limit): the model's positions unless a window
    slides."""
    return None if window_of(loaded, window) else loaded.max_context


def prompt_ids_of(loaded: LoadedModel, s: GenerateSettings) -> list[int]:
    """The prompt as the model reads it (start-of-document first); an error if it leaves no room in the context."""
    ids = [loaded.tokenizer.eot_id] + loaded.tokenizer.encode(s.prompt)
    context = context_limit(loaded, s.window)
    if context is not None and len(ids) + s.max_new_tokens > context:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens {s.max_new_tokens} exceeds the "
                        f"model's context of {context} tokens")
    return ids


def generate_many(loaded: LoadedModel, asks: list[Ask]) -> list[tuple[list[str], dict] | BaseException]:
    """Decode several sampling or greedy requests together, one row per sample, each request with its own
    generator, processors, stop strings, length and stream (a `Decoder` with every request admitted at once).
    Returns, per request, its (samples, stats) or the exception it alone failed with (a bad prompt, its cancel
    event); a request's results do not depend on what else shares its batch, up to the float rounding of a
    padded forward.
    """
    decoder = Decoder(loaded)
    results: list = [None] * len(asks)
    finished = decoder.admit(list(enumerate(asks)))
    while not decoder.idle:
        finished += decoder.step()
    for i, outcome in finished:
        results[i] = outcome
    return results


class _Memory:
    """What the model remembers of the batch's rows, all but each row's newest token, in one of three kinds:
    "kv" (transformers' key/value cache, rows right-aligned, left padding masked), "state" (the rnn's recurrent
    state: no positions, so rows of any length sit side by side) or "none" (a model without a cache, as the
    n-gram, re-reads every row's whole sequence each step). Rows join (`join`) and leave (`keep`) between steps:
    continuous batching."""

    def __init__(self, model: torch.nn.Module, family: str, device: torch.device):
        self.model, self.device = model, device
        self.kind = "state" if family == "rnn" else "none" if family == "ngram" else "kv"
        self.cache: DynamicCache | tuple[torch.Tensor, ...] | None = None
        self.mask: torch.Tensor | None = None  # kv: (B, L) 1 where a cached position is a real token
        self.positions: torch.Tensor | None = None  # kv: (B,) the position of each row's next token
        # transformers 5.24 renamed the cache argument and output `past_key_values` to `cache`
        parameters = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        # the prompt's last position is the only one whose logits a prefill needs (the lm head over a 6-token prompt
        # costs six rows' worth); a model whose forward lacks the argument computes them all
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, dict]:
        """The next-token logits (B, V) of new rows, and their memory, to `join`."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        if self.kind == "kv":
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self.cache_name: DynamicCache(config=self.model.config)}, **self.last_only)
            cache = out[self.cache_name]
            if all(type(layer) is DynamicLayer for layer in cache.layers):
                return out.logits[:, -1].float(), {"cache": cache, "mask": mask, "positions": mask.sum(-1)}
            self.kind = "none"  # sliding windows and other caches: re-read instead (slower, the same tokens)
        if self.kind == "state":
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float(), {"cache": out.state}
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float(), {}

    def join(self, part: dict) -> None:
        if self.kind == "state":
            self.cache = part["cache"] if self.cache is None else \
                tuple(torch.cat([a, b], dim=1) for a, b in zip(self.cache, part["cache"], strict=True))
        elif self.kind == "kv" and self.cache is None:
            self.cache, self.mask, self.positions = part["cache"], part["mask"], part["positions"]
        elif self.kind == "kv":
            width = max(self.mask.shape[1], part["mask"].shape[1])
            for mine, theirs in zip(self.cache.layers, part["cache"].layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
                mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(part["mask"], width, 1)])
            self.positions = torch.cat([self.positions, part["positions"]])

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows stay (indices, in order, at least one); positions no row still reads are dropped."""
        if self.kind == "state":
            self.cache = tuple(s.index_select(1, rows) for s in self.cache)
        elif self.kind == "kv":
            self.mask, self.positions = self.mask[rows], self.positions[rows]
            start = int(self.mask.any(0).int().argmax())  # the first position some row still reads
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[rows, :, start:], layer.values[rows, :, start:]
            self.mask = self.mask[:, start:]

    def step(self, tokens: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        """Each row's newest token (B,) in; the next-token logits (B, V) out. `rows`: the rows' whole
        sequences, for a model without a cache."""
        if self.kind == "kv":
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
            out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                             use_cache=True, **{self.cache_name: self.cache})
            self.cache, self.positions = out[self.cache_name], self.positions + 1
        elif self.kind == "state":
            out = self.model(input_ids=tokens[:, None], state=self.cache, use_cache=True, logits_to_keep=1)
            self.cache = out.state
        else:
            width = max(len(r) for r in rows)
            ids = torch.stack([_pad_left(r, width, 0) for r in rows])
            mask = torch.stack([_pad_left(torch.ones_like(r), width, 0) for r in rows])
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float()


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """x with zeros before it along `dim`, to `width`."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@dataclass
class _Request:
    """A request being decoded: its rows' sequences (prompt + generated, no padding), its logits processors
    (repetition penalty, no-repeat n-grams, then the sampling warpers, in the order transformers applies them),
    its draw on its own generator (None: greedy), its stream, which rows have ended, and when it started.
    `temperature`: set when a temperature is all it applies before the draw (the common case), which the
    decoder then applies to many requests' rows at once."""

    tag: object
    ask: Ask
    prompt: list[int]
    buffer: torch.Tensor  # (n, prompt + max_new_tokens): the rows' tokens so far, then room for the rest
    processors: list
    draw: DrawToken | None
    temperature: float | None
    stream: TextStream | None
    ended: list[bool]
    lengths: list[int]  # tokens each row generated before its end (an end of document not counted)
    started: float
    width: int = 0  # tokens in the buffer so far
    most_rows: int = 0
    window: int = 0  # the most tokens the model reads (`window_of`; 0: no window)
    start: int = 0  # the first token it reads: a window slides by moving it

    def slides(self) -> bool:
        """Whether the rows' context (all but the newest token are in memory) has passed the window: if so, they
        read only the last half of it from now on (`start` moves there) and their memory is made again."""
        if not self.window or self.width - self.start <= self.window:
            return False
        self.start = self.width - self.window // 2
        return True

    @property
    def ids(self) -> torch.Tensor:
        return self.buffer[:, : self.width]

    @property
    def generated(self) -> int:
        return self.width - len(self.prompt)


class Decoder:
    """Our own decode step around the model, for sampling and greedy decoding: a batch of rows that requests
    join (`admit`) and leave when they finish, each step (`step`) one token per row. Each request draws on its
    own generator and stops on its own (end of document, its length, its stop strings, its cancel event); a
    finished request's rows leave at once and a new request's rows join at the next step, so no row rides along
    to the longest, and a request decodes what it decodes alone (its rows see only their own tokens; a padded
    forward differs in float rounding only). A row of a request that ended before its request's other rows gets
    end-of-document tokens, as transformers pads it, so the request draws as it would alone."""

    def __init__(self, loaded: LoadedModel):
        self.loaded, self.tok = loaded, loaded.tokenizer
        self.device = _device(loaded.model)
        self.memory = _Memory(loaded.model, loaded.family, self.device)
        self.requests: list[_Request] = []
        self.logits: torch.Tensor | None = None  # (rows, V): the next-token logits of every row, in request order

    @property
    def rows(self) -> int:
        return sum(r.buffer.shape[0] for r in self.requests)

    @property
    def idle(self) -> bool:
        return not self.requests

    def admit(self, tagged: list[tuple[object, Ask]]) -> list[tuple[object, BaseException]]:
        """Start these requests (prefill their prompts; they decode from the next step). Returns those that
        failed at once (a bad prompt), with their error."""
        failed, new = [], []
        for tag, ask in tagged:
            try:
                if ask.settings.num_beams > 1:
                    raise UserError("beam search does not share a batch")
                new.append(self._request(tag, ask, prompt_ids_of(self.loaded, ask.settings)))
            except UserError as e:
                failed.append((tag, e))
        if not new:
            return failed
        prompts = [r.prompt[r.start:] for r in new for _ in range(r.buffer.shape[0])]
        try:
            with torch.no_grad():
                logits, part = self.memory.prefill(prompts)
            self.memory.join(part)
        except BaseException as e:  # noqa: BLE001 - the new requests fail; the running ones go on
            return failed + [(r.tag, e) for r in new]
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.requests += new
        return failed

    def _request(self, tag: object, ask: Ask, prompt: list[int]) -> _Request:
        s, procs, draw = ask.settings, list(ask.processors), None
        if s.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        if s.no_repeat_ngram_size > 0:
            procs.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
        if s.temperature > 0:
            procs.extend(sampling_processors(s, self.loaded.model, self.device))
            draw = DrawToken(torch.Generator(device=self.device).manual_seed(s.seed))
        temperature = None
        if draw is not None and all(isinstance(p, TemperatureLogitsWarper) for p in procs):
            temperature, procs = s.temperature, []  # applied by `step` (x / 1.0 is x: the same as none)
        stream = TextStream(self.tok, s.stop, ask.stream) if ask.stream is not None else None
        buffer = torch.full((s.n, len(prompt) + s.max_new_tokens), self.tok.eot_id, device=self.device)
        buffer[:, : len(prompt)] = torch.tensor(prompt, device=self.device)
        window = window_of(self.loaded, s.window)
        return _Request(tag, ask, prompt, buffer, procs, draw, temperature, stream, [False] * s.n, [0] * s.n,
                        time.perf_counter(), width=len(prompt), window=window,
                        start=max(0, len(prompt) - window) if window else 0)

    def _choose(self) -> torch.Tensor:
        """(rows,) each row's next token. The requests that only apply a temperature before the draw are drawn
        together: one division, one softmax and one pick over all their rows, with each request's own noise."""
        logits, vocab = self.logits, self.logits.shape[1]
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=self.device)
        together, temperatures, drawing = [], [], []
        start = 0
        for r in self.requests:
            n = r.buffer.shape[0]
            if r.temperature is not None:
                together.extend(range(start, start + n))
                temperatures.extend([r.temperature] * n)
                drawing.append(r)
            else:
                scores, ids = logits[start:start + n], r.ids
                for processor in r.processors:  # as LogitsProcessorList calls them, without its per-call inspect
                    scores = processor(ids, scores)
                tokens[start:start + n] = scores.argmax(-1) if r.draw is None else r.draw(scores)
            start += n
        if together:
            rows = torch.tensor(together, device=self.device)
            scaled = logits[rows] / torch.tensor(temperatures, device=self.device)[:, None]
            drawn = torch.empty((len(together), vocab), dtype=DrawToken.noise_dtype(self.device), device=self.device)
            at = 0
            for r in drawing:
                r.draw.noise(drawn[at:at + r.buffer.shape[0]])
                at += r.buffer.shape[0]
            tokens[rows] = DrawToken.pick(scaled, DrawToken.exponential(drawn))
        return tokens

    def step(self) -> list[tuple[object, tuple[list[str], dict] | BaseException]]:
        """One token for every row; returns the requests that finished, with their outcome."""
        rows, eot = self.rows, self.tok.eot_id
        tokens = self._choose()
        chosen, finished, staying, spans = tokens.tolist(), [], [], {}
        start = 0
        for r in self.requests:
            n = r.buffer.shape[0]
            mine = chosen[start:start + n]
            if any(r.ended):
                mine = [eot if ended else token for token, ended in zip(mine, r.ended, strict=True)]
                tokens[start:start + n] = torch.tensor(mine, device=self.device)
            r.buffer[:, r.width] = tokens[start:start + n]
            r.width += 1
            r.most_rows = max(r.most_rows, rows)
            outcome = self._advance(r, mine)
            if outcome is None:
                staying.append(r)
                spans[id(r)] = range(start, start + n)
            else:
                finished.append((r.tag, outcome))
            start += n
        sliding = [r for r in staying if r.slides()]  # their memory is made again from their window's new start
        going = [r for r in staying if r not in sliding]
        self.requests, self.logits = going + sliding, None
        logits = []
        with torch.no_grad():
            if not going:
                self.memory = _Memory(self.loaded.model, self.loaded.family, self.device)
            else:
                if finished or sliding:
                    kept = torch.tensor([i for r in going for i in spans[id(r)]], dtype=torch.long, device=self.device)
                    self.memory.keep(kept)
                    tokens = tokens[kept]
                logits.append(self.memory.step(tokens, [row[r.start:] for r in going for row in r.ids]))
            if sliding:
                part_logits, part = self.memory.prefill([row[r.start:].tolist() for r in sliding for row in r.ids])
                self.memory.join(part)
                logits.append(part_logits)
        if logits:
            self.logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        return finished

    def _advance(self, r: _Request, tokens: list[int]) -> tuple[list[str], dict] | BaseException | None:
        """Note a step's tokens for a request: its outcome when it has finished, else None."""
        s, eot = r.ask.settings, self.tok.eot_id
        if r.ask.cancel is not None and r.ask.cancel.is_set():
            return Cancelled("generation cancelled")
        for b, token in enumerate(tokens):
            if r.ended[b]:
                continue
            if token == eot:
                r.ended[b] = True
                continue
            r.lengths[b] += 1
            if r.lengths[b] >= s.max_new_tokens or (s.stop and any(
                    stop in self.tok.decode_text(r.buffer[b, len(r.prompt):r.width].tolist()) for stop in s.stop)):
                r.ended[b] = True
        try:
            if r.stream is not None and tokens[0] != eot:
                r.stream.add(tokens[0])
            if not all(r.ended) and r.generated < s.max_new_tokens:
                return None
            if r.stream is not None:
                r.stream.end()
        except BaseException as e:  # noqa: BLE001 - a stream's failure (its client left) ends its request only
            return e if isinstance(e, Cancelled) else Cancelled(f"stream failed: {e}")
        samples, reasons = [], []
        for row in r.buffer[:, len(r.prompt):r.width].tolist():
            sample, reason, _ = _finish_row(self.tok, s, row)
            samples.append(sample)
            reasons.append(reason)
        seconds = time.perf_counter() - r.started
        n_tokens = sum(r.lengths)
        return samples, {"prompt_tokens": len(r.prompt), "generated_tokens": n_tokens, "finish_reasons": reasons,
                         "batch_rows": r.most_rows, "seconds": seconds,
                         "tokens_per_s": n_tokens / seconds if seconds > 0 else math.nan}


class Batcher:
    """Requests from several threads to one model, decoded together with continuous batching: while a `Decoder`
    runs, every request waiting for its model joins at the next step, up to `max_rows` rows (samples); a
    finished request leaves at once. When the decoder is idle, the decoding thread collects after the first
    request until `QUIET_S` pass without a new one (a lone request waits only that), or `window_s` in all, or
    `max_rows` rows wait. Requests for another model wait their turn: once the oldest waiting request is for
    another model, the running batch takes no more and drains. One batch at a time per process (a batch already
    uses every core)."""

    QUIET_S = 0.005

    def __init__(self, window_s: float = 0.05, max_rows: int = 16):
        self.window_s, self.max_rows = window_s, max_rows
        self._cond = threading.Condition()
        self._waiting: list[tuple[LoadedModel, Ask, threading.Event, list]] = []
        self._arrived = 0
        self._thread: threading.Thread | None = None

    def generate(self, loaded: LoadedModel, ask: Ask) -> tuple[list[str], dict]:
        done, result = threading.Event(), []
        with self._cond:
            self._waiting.append((loaded, ask, done, result))
            self._arrived += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._decode_forever, name="aigc-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()
        done.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def _decode_forever(self) -> None:
        while True:
            self._collect()
            decoder = Decoder(self._waiting[0][0])
            while True:
                try:
                    outcomes = decoder.admit(self._take(decoder))
                    if not decoder.idle:
                        outcomes += decoder.step()
                except BaseException as e:  # noqa: BLE001 - every request of the batch gets the failure
                    outcomes = [(r.tag, e) for r in decoder.requests]
                    decoder = Decoder(decoder.loaded)  # a fresh memory: the failed step may have left it half-done
                for (done, result), outcome in outcomes:
                    result.append(outcome)
                    done.set()
                if decoder.idle and not self._waiting_for(decoder.loaded):
                    break

    def _collect(self) -> None:
        """Wait for a request, then let the others that come with it in."""
        with self._cond:
            while not self._waiting:
                self._cond.wait()
            deadline = time.monotonic() + self.window_s
            while sum(item[1].settings.n for item in self._waiting) < self.max_rows:
                seen, left = self._arrived, deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(self.QUIET_S, left))
                if self._arrived == seen:
                    break

    def _take(self, decoder: Decoder) -> list[tuple[tuple[threading.Event, list], Ask]]:
        """The waiting requests for the decoder's model that fit, oldest first, stopping at one for another model
        (a lone request over the cap starts an idle decoder)."""
        taken, rows = [], decoder.rows
        with self._cond:
            while self._waiting and self._waiting[0][0] is decoder.loaded:
                loaded, ask, done, result = self._waiting[0]
                if rows and rows + ask.settings.n > self.max_rows:
                    break
                taken.append(((done, result), ask))
                rows += ask.settings.n
                self._waiting.pop(0)
        return taken

    def _waiting_for(self, loaded: LoadedModel) -> bool:
        with self._cond:
            return bool(self._waiting) and self._waiting[0][0] is loaded


BATCHER = Batcher()  # `aigc serve` sets its window and row cap


def _finish_row(tok: TextTokenizer, s: GenerateSettings, row: list[int]) -> tuple[str, str, int]:
    """A row's sample (prompt + continuation cut at the end of document and the first stop string), why it
    ended, and its generated tokens."""
    ended = tok.eot_id in row
    if ended:  # generation stopped here; the rest is padding
        row = row[: row.index(tok.eot_id)]
    text = tok.decode_text(row)
    cut = cut_at_stop(text, s.stop)
    reason = "stop" if ended or cut < len(text) or len(row) < s.max_new_tokens else "length"
    return s.prompt + text[:cut], reason, len(row)


def _beam_search(loaded: LoadedModel, s: GenerateSettings, cancel: threading.Event | None) -> tuple[list[str], dict]:
    """Beam search (deterministic), transformers' own: one request alone."""
    tok = loaded.tokenizer
    prompt_ids = prompt_ids_of(loaded, s)
    if s.window and len(prompt_ids) + s.max_new_tokens > s.window:  # transformers' beams read every position
        raise UserError(f"beam search reads the whole sequence, and this model reads at most {s.window} tokens "
                        f"(--window): prompt ({len(prompt_ids)} tokens) + --max-new-tokens {s.max_new_tokens} is "
                        f"more; lower --max-new-tokens, sample instead, or read all {loaded.max_context} "
                        f"positions (--window 0, past those it trained on)")
    kwargs = {
        "max_new_tokens": s.max_new_tokens, "num_beams": s.num_beams, "num_return_sequences": s.n,
        "repetition_penalty": s.repetition_penalty, "no_repeat_ngram_size": s.no_repeat_ngram_size,
        "do_sample": False, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id, "early_stopping": True,
        "temperature": None, "top_k": None, "top_p": None, "min_p": None,
    }
    criteria = [StopOnStrings(tok, s.stop, len(prompt_ids))] if s.stop else []
    if cancel is not None:
        criteria.append(StopOnEvent(cancel))
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    input_ids = torch.tensor([prompt_ids], device=_device(loaded.model))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    seconds = time.perf_counter() - t0
    if cancel is not None and cancel.is_set():
        raise Cancelled("generation cancelled")
    finished = [_finish_row(tok, s, row) for row in out[:, len(prompt_ids):].tolist()]
    n_tokens = sum(used for _, _, used in finished)
    return [sample for sample, _, _ in finished], {
        "prompt_tokens": len(prompt_ids), "generated_tokens": n_tokens, "finish_reasons": [r for _, r, _ in finished],
        "seconds": seconds, "tokens_per_s": n_tokens / seconds if seconds > 0 else math.nan}


def settings_dict(settings: GenerateSettings) -> dict:
    return asdict(settings)


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
