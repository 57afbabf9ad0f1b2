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
             cancel: threading.Event | None = None, batched: bool = False) -> tuple[list[str], dict]:
    """Generate `settings.n` samples. Each sample is the prompt followed by its continuation.

    Returns the samples and a stats dict (prompt and generated tokens, why each sample ended: "stop" or
    "length", seconds, tokens/s). Leaves the global RNG alone. `cancel` set: generation stops at the next
    token and raises `Cancelled`. Sampling and greedy decoding are `generate_many` with one request (so a
    request decodes the same alone or batched with others); beam search is transformers' own. `batched`:
    decode together with the requests that other threads make at the same time (`BATCHER`).
    """
    s = settings.validate()
    if stream is not None and (s.n > 1 or s.num_beams > 1):
        raise UserError("--stream works with one sample and no beam search (-n 1, --num-beams 1)")
    if s.num_beams > 1:
        return _beam_search(loaded, s, cancel)
    if batched:
        return BATCHER.generate(loaded, Ask(s, stream, cancel))
    [result] = generate_many(loaded, [Ask(s, stream, cancel)])
    if isinstance(result, BaseException):
        raise result
    return result


@dataclass
class Ask:
    """One request in a batch: its settings (validated), where its text streams to, its cancel event."""

    settings: GenerateSettings
    stream: Callable[[str], None] | None = None
    cancel: threading.Event | None = None


def prompt_ids_of(loaded: LoadedModel, s: GenerateSettings) -> list[int]:
    """The prompt as the model reads it (start-of-document first); an error if it leaves no room in the context."""
    ids = [loaded.tokenizer.eot_id] + loaded.tokenizer.encode(s.prompt)
    context = loaded.max_context
    if context is not None and len(ids) + s.max_new_tokens > context:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens {s.max_new_tokens} exceeds the "
                        f"model's context of {context} tokens")
    return ids


def generate_many(loaded: LoadedModel, asks: list[Ask]) -> list[tuple[list[str], dict] | BaseException]:
    """Decode several sampling or greedy requests together, one row per sample, each request with its own
    generator, processors, stop strings, length and stream, in one `generate` call. Prompts of different
    lengths are left-padded (the mask keeps the pads out of every model's history). Returns, per request,
    its (samples, stats) or the exception it alone failed with (a bad prompt, its cancel event); a request's
    results do not depend on what else shares its batch, up to the float rounding of a padded forward.
    """
    results: list = [None] * len(asks)
    live, prompts = [], []
    for i, ask in enumerate(asks):
        try:
            if ask.settings.num_beams > 1:
                raise UserError("beam search does not share a batch")
            prompts.append(prompt_ids_of(loaded, ask.settings))
            live.append(i)
        except UserError as e:
            results[i] = e
    if not live:
        return results
    tok, device = loaded.tokenizer, _device(loaded.model)
    width = max(len(p) for p in prompts)
    rows = Rows(loaded, [asks[i] for i in live], prompts, width, device)
    input_ids = torch.tensor([[tok.eot_id] * (width - len(p)) + p for p, n in zip(prompts, rows.counts, strict=True)
                              for _ in range(n)], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, n in zip(prompts, rows.counts, strict=True)
                         for _ in range(n)], device=device)
    kwargs = {"max_new_tokens": max(asks[i].settings.max_new_tokens for i in live), "num_beams": 1,
              "do_sample": False, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id,
              "repetition_penalty": None, "no_repeat_ngram_size": None,
              "temperature": None, "top_k": None, "top_p": None, "min_p": None, **_APPLIED_BY_US,
              "logits_processor": LogitsProcessorList([_Process(rows)]),
              "stopping_criteria": StoppingCriteriaList([_Stop(rows)])}
    if any(asks[i].stream is not None for i in live):
        kwargs["streamer"] = rows
    t0 = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(input_ids, attention_mask=mask, **kwargs)
    seconds = time.perf_counter() - t0
    for k, i in enumerate(live):
        if rows.failed[k] is not None:
            results[i] = rows.failed[k]
            continue
        s = asks[i].settings
        samples, reasons, n_tokens = [], [], 0
        for row in out[rows.slices[k], width:].tolist():
            sample, reason, used = _finish_row(tok, s, row[: s.max_new_tokens])
            samples.append(sample)
            reasons.append(reason)
            n_tokens += used
        results[i] = (samples, {"prompt_tokens": len(prompts[k]), "generated_tokens": n_tokens,
                                "finish_reasons": reasons, "batch_rows": int(input_ids.shape[0]), "seconds": seconds,
                                "tokens_per_s": n_tokens / seconds if seconds > 0 else math.nan})
    return results


class Batcher:
    """Requests from several threads to one model, decoded together: after the first request arrives the
    decoding thread collects until `QUIET_S` pass without a new one (a lone request waits only that), or
    `window_s` in all, or `max_rows` rows are waiting; then it takes every waiting request for the same model,
    oldest first, up to `max_rows` rows (samples), into one `generate_many` call; requests for other models
    wait their turn. One batch at a time per process (a batch already uses every core)."""

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
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                deadline = time.monotonic() + self.window_s
                while sum(item[1].settings.n for item in self._waiting) < self.max_rows:  # let the others come in
                    seen, left = self._arrived, deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(self.QUIET_S, left))
                    if self._arrived == seen:
                        break
            with self._cond:
                model, batch, rows = self._waiting[0][0], [], 0
                for item in list(self._waiting):
                    n = item[1].settings.n
                    if item[0] is model and (not batch or rows + n <= self.max_rows):
                        batch.append(item)
                        rows += n
                        self._waiting.remove(item)
            try:
                results = generate_many(model, [ask for _, ask, _, _ in batch])
            except BaseException as e:  # noqa: BLE001 - every request of the batch gets the failure
                results = [e] * len(batch)
            for (_, _, done, result), outcome in zip(batch, results, strict=True):
                result.append(outcome)
                done.set()


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


class Rows:
    """The per-request parts of a batched `generate`: each request's rows get its own logits processors
    (repetition penalty, no-repeat n-grams, then the sampling warpers and the draw on its own generator, in
    the order transformers applies them alone), its own stops (length, stop strings, cancel) and its own
    stream. Each request sees its rows without its left padding, as it would alone."""

    def __init__(self, loaded: LoadedModel, asks: list[Ask], prompts: list[list[int]], width: int,
                 device: torch.device):
        self.tok, self.asks, self.width = loaded.tokenizer, asks, width
        self.counts = [ask.settings.n for ask in asks]
        starts = np.cumsum([0, *self.counts])
        self.slices = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        self.pads = [width - len(p) for p in prompts]
        self.failed: list[BaseException | None] = [None] * len(asks)
        self.processors = []
        for ask in asks:
            s, procs = ask.settings, LogitsProcessorList()
            if s.repetition_penalty != 1.0:
                procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
            if s.no_repeat_ngram_size > 0:
                procs.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
            if s.temperature > 0:
                procs.extend(sampling_processors(s, loaded.model, torch.Generator(device=device).manual_seed(s.seed)))
            self.processors.append(procs)
        self.streams = [TextStream(self.tok, ask.settings.stop, ask.stream) if ask.stream else None for ask in asks]

    def process(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) scores of the next token, each request's rows through its own processors."""
        for k, procs in enumerate(self.processors):
            if procs:
                sl = self.slices[k]
                ids, part = input_ids[sl, self.pads[k]:], scores[sl]
                # each processor called as LogitsProcessorList would call it, without the list's per-call
                # inspect.signature of every processor (a third of a 16-row step's time, measured)
                for processor in procs:
                    part = processor(ids, part)
                scores[sl] = part
        return scores

    def done(self, input_ids: torch.Tensor) -> torch.Tensor:
        """As a stopping criterion: per row, whether its request is finished with it."""
        generated = input_ids.shape[1] - self.width
        flags = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for k, ask in enumerate(self.asks):
            s, sl = ask.settings, self.slices[k]
            if generated >= s.max_new_tokens or self.failed[k] is not None \
                    or (ask.cancel is not None and ask.cancel.is_set()):
                if ask.cancel is not None and ask.cancel.is_set() and self.failed[k] is None:
                    self.failed[k] = Cancelled("generation cancelled")
                flags[sl] = True
            elif s.stop:
                flags[sl] = torch.tensor([any(stop in self.tok.decode_text(row[self.width:].tolist())
                                              for stop in s.stop) for row in input_ids[sl]], device=input_ids.device)
        return flags

    # as a streamer: the first call carries the prompts (each TextStream skips it), then a token per row and step
    def put(self, value: torch.Tensor) -> None:
        for k, stream in enumerate(self.streams):
            if stream is None or self.failed[k] is not None:
                continue
            try:
                stream.put(value[self.slices[k]])
            except BaseException as e:  # noqa: BLE001 - a stream's failure (its client left) ends its rows only
                self.failed[k] = e if isinstance(e, Cancelled) else Cancelled(f"stream failed: {e}")

    def end(self) -> None:
        for k, stream in enumerate(self.streams):
            if stream is not None and self.failed[k] is None:
                try:
                    stream.end()
                except BaseException as e:  # noqa: BLE001
                    self.failed[k] = e if isinstance(e, Cancelled) else Cancelled(f"stream failed: {e}")


class _Process(LogitsProcessor):
    def __init__(self, rows: Rows):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.rows.process(input_ids, scores)


class _Stop(StoppingCriteria):
    def __init__(self, rows: Rows):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.rows.done(input_ids)


def _beam_search(loaded: LoadedModel, s: GenerateSettings, cancel: threading.Event | None) -> tuple[list[str], dict]:
    """Beam search (deterministic), transformers' own: one request alone."""
    tok = loaded.tokenizer
    prompt_ids = prompt_ids_of(loaded, s)
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
