"""Load a run (or any Hugging Face causal-LM folder) and generate text with transformers' `generate`.

Every text family is a `PreTrainedModel` + `GenerationMixin`, so the decoding controls (greedy,
temperature, top-k, top-p, min-p, repetition penalty, no_repeat_ngram_size, beam search) mean
the same for all of them. Stop strings are our own rule on the decoded text: transformers'
`stop_strings` fails on vocabularies without the letters a-f, as every Chinese char vocabulary is.

Sampling draws from a per-request `torch.Generator`, never the global RNG, so concurrent requests
cannot race: transformers' sampling mode takes no generator, so we run its greedy mode with the
sampling warpers and the draw as our own logits processors (see `sampling_processors`).
"""

from __future__ import annotations

import math
import sys
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
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from aigc.checkpoint import verify_manifest
from aigc.config import read_toml
from aigc.data.tokenizer import TextTokenizer
from aigc.errors import UserError
from aigc.models import FAMILIES
from aigc.store import find_run, read_run
from aigc.train import stream_nll

MAX_NEW_TOKENS_CAP = 4096


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

    def validate(self) -> GenerateSettings:
        checks = [
            (self.n >= 1, f"-n must be >= 1, got {self.n}"),
            (1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP,
             f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"--temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"--min-p must be in [0, 1), got {self.min_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"--repetition-penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"--num-beams must be >= 1, got {self.num_beams}"),
            (self.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must be >= 0, got {self.no_repeat_ngram_size}"),
            (all(self.stop), "--stop strings must not be empty"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
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
        raise UserError(f"run {run_dir.name!r} has no saved weights yet (status: {record.get('status')})")
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
    """A transformers streamer that writes text as it is generated, holding back what could still
    turn out to be the start of a stop string, and nothing after a stop string."""

    def __init__(self, tokenizer: TextTokenizer, stops: list[str], write: Callable[[str], None]):
        self.tokenizer, self.stops, self.write = tokenizer, stops, write
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        text = self.tokenizer.decode_text(self.ids)
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


def cut_at_stop(text: str, stops: list[str]) -> int:
    """Index of the first occurrence of any stop string, or len(text)."""
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else len(text)


class DrawToken(LogitsProcessor):
    """transformers' multinomial sampling step, on the request's own generator.

    The same call as `GenerationMixin._sample` makes in sampling mode, `multinomial(softmax(scores), 1)`,
    so a generator seeded with s draws the tokens the global RNG draws after `torch.manual_seed(s)`.
    Every score but the drawn token's becomes -inf: greedy decoding then picks the drawn token.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.nn.functional.softmax(scores, dim=-1)  # (B, V)
        drawn = torch.multinomial(probs, num_samples=1, generator=self.generator)  # (B, 1)
        return torch.full_like(scores, -math.inf).scatter_(1, drawn, 0.0)


# Options of the model's generation config that `sampling_processors` applies itself. Unset for
# greedy mode, which would warn about the warpers and apply watermarking and renormalisation again.
_APPLIED_BY_US = {"top_h": None, "typical_p": None, "epsilon_cutoff": None, "eta_cutoff": None,
                  "watermarking_config": None, "renormalize_logits": False}


def sampling_processors(s: GenerateSettings, model: GenerationMixin, generator: torch.Generator,
                        ) -> LogitsProcessorList:
    """The processors transformers' `_get_logits_processor` appends in sampling mode with one beam, in its
    order, then the draw.

    The settings give temperature, top-k, top-p and min-p; the model's generation config may add the
    rest, as it did when transformers sampled. Repetition penalty and no_repeat_ngram_size are not
    here: transformers builds them the same in greedy mode, ahead of these processors, as when sampling.
    One beam keeps min_tokens_to_keep at transformers' 1.
    """
    config, device = model.generation_config, generator.device
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
    processors.append(DrawToken(generator))
    return processors


def generate(loaded: LoadedModel, settings: GenerateSettings, *, stream: Callable[[str], None] | None = None,
             ) -> tuple[list[str], dict]:
    """Generate `settings.n` samples. Each sample is the prompt followed by its continuation.

    Returns the samples and a stats dict (generated tokens, seconds, tokens/s). Leaves the global RNG alone.
    """
    s = settings.validate()
    tok = loaded.tokenizer
    prompt_ids = [tok.eot_id] + tok.encode(s.prompt)
    context = loaded.max_context
    if context is not None and len(prompt_ids) + s.max_new_tokens > context:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {s.max_new_tokens} exceeds the "
                        f"model's context of {context} tokens")
    if stream is not None and (s.n > 1 or s.num_beams > 1):
        raise UserError("--stream works with one sample and no beam search (-n 1, --num-beams 1)")
    beams = s.num_beams > 1
    sampling = s.temperature > 0 and not beams
    device = _device(loaded.model)
    kwargs = {
        "max_new_tokens": s.max_new_tokens,
        "num_beams": s.num_beams,
        # greedy mode refuses num_return_sequences > 1, so sampling passes the prompt n times instead:
        # the same rows transformers' own expansion makes
        "num_return_sequences": s.n if beams else 1,
        "repetition_penalty": s.repetition_penalty,
        "no_repeat_ngram_size": s.no_repeat_ngram_size,
        "do_sample": False,  # sampling is our last logits processor, see `DrawToken`
        "eos_token_id": tok.eot_id,
        "pad_token_id": tok.eot_id,
        # the sampling knobs go to `sampling_processors`, greedy and beam search ignore them: say so to transformers
        "temperature": None, "top_k": None, "top_p": None, "min_p": None,
    }
    if sampling:
        kwargs.update(_APPLIED_BY_US)
        generator = torch.Generator(device=device).manual_seed(s.seed)
        kwargs["logits_processor"] = sampling_processors(s, loaded.model, generator)
    if beams:
        kwargs["early_stopping"] = True
    if s.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tok, s.stop, len(prompt_ids))])
    if stream is not None:
        kwargs["streamer"] = TextStream(tok, s.stop, stream)
    input_ids = torch.tensor([prompt_ids] * (s.n if sampling else 1), device=device)  # (n or 1, T)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    seconds = time.perf_counter() - t0
    samples, n_tokens = [], 0
    for row in out[:, len(prompt_ids):].tolist():
        if tok.eot_id in row:  # generation stopped here; the rest is padding
            row = row[: row.index(tok.eot_id)]
        n_tokens += len(row)
        text = tok.decode_text(row)
        samples.append(s.prompt + text[: cut_at_stop(text, s.stop)])
    return samples, {"generated_tokens": n_tokens, "seconds": seconds,
                     "tokens_per_s": n_tokens / seconds if seconds > 0 else math.nan}


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
