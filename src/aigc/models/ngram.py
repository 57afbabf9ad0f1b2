"""Token n-gram language model with interpolated Kneser-Ney smoothing: the baseline.

Reads top to bottom:

1. ``NGramConfig``: the user-facing settings.
2. Counting: the ids become a Python ``str`` (one character ``chr(id)`` per id), so
   n-grams are substrings, counts are ``collections.Counter`` objects and contexts are
   string keys.
3. ``KneserNey``: the estimator (fit, scoring, state dict).
4. ``select_order``: choose n on the tail of the training ids, counting only once.
5. ``NGramLM``: a transformers ``PreTrainedModel`` + ``GenerationMixin`` adapter, so
   every decoding strategy of ``generate`` (greedy, sampling, top-k/p, beam search, ...)
   works unchanged.
6. ``build_from_ids``: select the order, fit, set the generation config.

The model is interpolated Kneser-Ney (Chen & Goodman 1998, "An empirical study of
smoothing techniques for language modeling") with one absolute discount per order. For a
k-gram ``h w`` whose context ``h`` has k - 1 tokens, and ``h'`` = ``h`` without its first
token::

    P_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k * N1+(h .) * P_{k-1}(w | h'))
                 / sum_v c_k(h v)
    P_0(w)     = 1 / V          (uniform: every id, <unk> included, gets P > 0)

- ``c_n`` (top order n) are raw counts; below it, ``c_k(g) = N1+(. g)`` is the
  continuation count: the number of distinct tokens seen just before ``g``.
- ``N1+(h .)`` is the number of distinct w with ``c_k(h w) > 0``.
- A context without counts at level k (``sum_v c_k(h v) = 0``), or a history shorter
  than k - 1 tokens, backs off entirely: ``P_k(w | h) = P_{k-1}(w | h')``.
- ``D_k = n1 / (n1 + 2 n2)`` (Ney, Essen & Kneser 1994), where ``n_r`` is the number of
  k-grams with ``c_k = r`` (count-of-counts of the counts that level uses).

The training ids are one continuous stream; document boundaries are ordinary tokens
(the project's end-of-text id).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from aigc.config import option
from aigc.errors import UserError

# Ids become characters with chr(id). 0xD800 starts the UTF-16 surrogates, which the
# UTF-32 codec used to convert ids <-> str rejects.
MAX_VOCAB_SIZE = 0xD800
# Positions scored per vectorised pass (nll, select_order): bounds the temporary lists
# of n-gram strings, roughly 100 bytes per position and order.
CHUNK = 1 << 18
# D_k when a level has no singletons: n1 = 0 would give D_k = 0 and hence P = 0 for
# unseen tokens. 0.5 is KenLM's --discount_fallback value for D_1.
FALLBACK_DISCOUNT = 0.5


@dataclass
class NGramConfig:
    """User-facing settings of the n-gram family (`--set key=value`)."""

    order: int = option(
        0, "n-gram order n (context of n-1 tokens); 0 = choose it on the tail of the training split", min=0, max=32
    )
    max_order: int = option(8, "largest order tried when order = 0 (orders 1..max_order)", min=1, max=32)
    tail_fraction: float = option(
        0.1,
        "share of the training ids (their end) held out to choose the order; never the validation split",
        min=0.0,
        max=0.5,
        min_exclusive=True,
    )


# --------------------------------------------------------------------------------------
# Counting


def ids_to_str(ids: Sequence[int] | np.ndarray | torch.Tensor, vocab_size: int) -> str:
    """One character ``chr(id)`` per id; loud error on ids outside [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return ""
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"ids must be a 1-D sequence of integers, got shape {arr.shape} and dtype {arr.dtype}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got values in [{low}, {high}]")
    return arr.astype("<u4").tobytes().decode("utf-32-le")


def str_to_ids(s: str) -> np.ndarray:
    """Inverse of ``ids_to_str``: shape (len(s),), int64."""
    return np.frombuffer(s.encode("utf-32-le"), dtype="<u4").astype(np.int64)


def count_ngrams(s: str, max_order: int) -> tuple[list[Counter], list[Counter]]:
    """Raw counts ``raw[k-1][g] = c(g)`` for k = 1..max_order and continuation counts
    ``cont[k-1][g] = N1+(. g)`` for k = 1..max_order-1.

    Only the top order is counted by slicing the text; each lower order is aggregated
    from the types one order above, which is far cheaper than rescanning the text.
    """
    n_tokens = len(s)
    raw = [Counter() for _ in range(max_order)]
    top = min(max_order, n_tokens)
    if top > 0:
        starts = range(n_tokens - top + 1)
        raw[top - 1] = Counter(map(s.__getitem__, map(slice, starts, range(top, n_tokens + 1))))
    for k in range(top - 1, 0, -1):
        # Every k-gram occurrence but the text's last one is the prefix of exactly one
        # (k+1)-gram occurrence.
        counts = Counter()
        for gram, c in raw[k].items():
            counts[gram[:-1]] += c
        counts[s[n_tokens - k :]] += 1
        raw[k - 1] = counts
    # N1+(. g): each (k+1)-gram type "x g" adds one distinct left neighbour x to g.
    cont = [Counter(gram[1:] for gram in raw[k]) for k in range(1, max_order)]
    return raw, cont


def kn_discount(counts: dict[str, int]) -> float:
    """D = n1 / (n1 + 2 n2) from the count-of-counts of one level."""
    n_r = Counter(counts.values())
    n1, n2 = n_r[1], n_r[2]
    if n1 == 0:
        return FALLBACK_DISCOUNT
    return n1 / (n1 + 2 * n2)


@dataclass
class _Level:
    """Lookup tables of interpolation level k: k-grams and their (k-1)-token contexts."""

    counts: dict[str, int]  # c_k(h w): raw counts at the top order, N1+(. h w) below
    discount: float  # D_k
    context_index: dict[str, int]  # context h -> its row in totals and n_types
    totals: np.ndarray  # (n_contexts,) float64: sum_v c_k(h v)
    n_types: np.ndarray  # (n_contexts,) float64: N1+(h .)

    @classmethod
    def from_counts(cls, counts: dict[str, int], discount: float) -> _Level:
        context_index: dict[str, int] = {}
        totals: list[int] = []
        n_types: list[int] = []
        for gram, c in counts.items():
            row = context_index.setdefault(gram[:-1], len(totals))
            if row == len(totals):
                totals.append(0)
                n_types.append(0)
            totals[row] += c
            n_types[row] += 1
        return cls(
            counts=counts,
            discount=discount,
            context_index=context_index,
            totals=np.asarray(totals, dtype=np.float64),
            n_types=np.asarray(n_types, dtype=np.float64),
        )


def _interpolate(level: _Level, k: int, s: str, lo: int, hi: int, p_lower: np.ndarray) -> np.ndarray:
    """P_k(s[i] | s[i-k+1:i]) for the positions i in [lo, hi), shape (hi - lo,).

    `p_lower` holds P_{k-1} at the same positions. Vectorised over positions: the
    string slices and dict look-ups run through map(), the arithmetic in numpy.
    """
    p = p_lower.copy()
    first = max(lo, k - 1)  # earlier positions lack k - 1 tokens of history
    if first >= hi:
        return p
    starts = range(first - k + 1, hi - k + 1)
    contexts = map(s.__getitem__, map(slice, starts, range(first, hi)))
    grams = map(s.__getitem__, map(slice, starts, range(first + 1, hi + 1)))
    rows = np.fromiter(map(level.context_index.get, contexts, repeat(-1)), np.int64, hi - first)
    counts = np.fromiter(map(level.counts.get, grams, repeat(0)), np.float64, hi - first)
    seen = rows >= 0  # unseen contexts keep P_{k-1}
    rows = rows[seen]
    at = np.flatnonzero(seen) + (first - lo)
    d = level.discount
    # The interpolated KN equation of the module docstring.
    p[at] = (np.maximum(counts[seen] - d, 0.0) + d * level.n_types[rows] * p_lower[at]) / level.totals[rows]
    return p


# --------------------------------------------------------------------------------------
# The estimator


class KneserNey:
    """Interpolated Kneser-Ney n-gram model over the ids 0..vocab_size-1.

    Pure estimator: ``fit(ids)`` returns self. Learned state: ``counts_``, one dict per
    order k = 1..n (continuation counts below n, raw counts at n), and ``discounts_``,
    D_1..D_n.
    """

    def __init__(self, order: int, vocab_size: int):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must lie in [1, {MAX_VOCAB_SIZE}] (ids become characters), got {vocab_size}")
        self.order = order
        self.vocab_size = vocab_size

    # -- fit ---------------------------------------------------------------------------

    def fit(self, ids: Sequence[int] | np.ndarray) -> KneserNey:
        """Count the n-grams of `ids` (one stream) and estimate a discount per order."""
        raw, cont = count_ngrams(ids_to_str(ids, self.vocab_size), self.order)
        counts = cont + [raw[-1]]
        return self._set_counts(counts, [kn_discount(c) for c in counts])

    def _set_counts(self, counts: list[dict[str, int]], discounts: list[float]) -> KneserNey:
        self.counts_ = counts
        self.discounts_ = np.asarray(discounts, dtype=np.float64)
        self._levels = [_Level.from_counts(c, d) for c, d in zip(counts, discounts, strict=True)]
        self._alphabet = [chr(i) for i in range(self.vocab_size)]  # every id as a one-char string
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "_levels"):
            raise RuntimeError(
                "this KneserNey model is not fitted: call fit(ids) or KneserNey.from_state_dict(state) first"
            )

    def _history(self, context: Sequence[int] | np.ndarray) -> str:
        """The last order - 1 ids of `context` as a string."""
        keep = self.order - 1
        return ids_to_str(np.asarray(context)[max(len(context) - keep, 0) :], self.vocab_size)

    # -- scoring -----------------------------------------------------------------------

    def logprob(self, token: int, context: Sequence[int] = ()) -> float:
        """Natural log P(token | the last order - 1 ids of context)."""
        self._check_fitted()
        history = self._history(context)
        w = ids_to_str([token], self.vocab_size)
        p = 1.0 / self.vocab_size  # P_0
        for k, level in enumerate(self._levels, start=1):
            if len(history) < k - 1:
                break
            h = history[len(history) - k + 1 :]
            row = level.context_index.get(h)
            if row is None:
                continue
            c = level.counts.get(h + w, 0)
            d = level.discount
            p = (max(c - d, 0.0) + d * level.n_types[row] * p) / level.totals[row]
        return math.log(p)

    def next_logprobs(self, context: Sequence[int] = ()) -> np.ndarray:
        """Log-probabilities of every next id, shape (vocab_size,), float64."""
        self._check_fitted()
        history = self._history(context)
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)  # P_0
        for k, level in enumerate(self._levels, start=1):
            if len(history) < k - 1:
                break
            h = history[len(history) - k + 1 :]
            row = level.context_index.get(h)
            if row is None:
                continue
            grams = [h + w for w in self._alphabet]
            counts = np.fromiter(map(level.counts.get, grams, repeat(0)), np.float64, self.vocab_size)
            d = level.discount
            p = (np.maximum(counts - d, 0.0) + d * level.n_types[row] * p) / level.totals[row]
        return np.log(p)

    def nll(self, ids: Sequence[int] | np.ndarray, context: Sequence[int] | np.ndarray = ()) -> float:
        """Total negative log-likelihood in nats: -sum_i log P(ids[i] | context + ids[:i]).

        Fast path: only the observed token's probability, vectorised over positions.
        """
        self._check_fitted()
        history = ids_to_str(context, self.vocab_size)
        s = history + ids_to_str(ids, self.vocab_size)
        total = 0.0
        for lo in range(len(history), len(s), CHUNK):
            hi = min(lo + CHUNK, len(s))
            p = np.full(hi - lo, 1.0 / self.vocab_size)  # P_0
            for k, level in enumerate(self._levels, start=1):
                p = _interpolate(level, k, s, lo, hi, p)
            total -= float(np.log(p).sum())
        return total

    # -- state dict --------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain contiguous tensors, ready for ``safetensors.torch.save_file``.

        Per order k: ``grams.k`` (n_grams, k) int32, the k-grams' ids, and ``counts.k``
        (n_grams,) int64. Plus ``discounts`` (order,) float64, ``order`` and
        ``vocab_size``.
        """
        self._check_fitted()
        state = {
            "order": torch.tensor([self.order], dtype=torch.int64),
            "vocab_size": torch.tensor([self.vocab_size], dtype=torch.int64),
            "discounts": torch.from_numpy(self.discounts_.copy()),
        }
        for k, counts in enumerate(self.counts_, start=1):
            grams = str_to_ids("".join(counts)).astype(np.int32).reshape(-1, k)
            state[f"grams.{k}"] = torch.from_numpy(grams)
            state[f"counts.{k}"] = torch.from_numpy(np.fromiter(counts.values(), np.int64, len(counts)))
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> KneserNey:
        if not {"order", "vocab_size", "discounts"} <= set(state):
            raise ValueError(f"not a KneserNey state dict: keys are {sorted(state)}")
        model = cls(int(state["order"].item()), int(state["vocab_size"].item()))
        missing = [f"{name}.{k}" for k in range(1, model.order + 1) for name in ("grams", "counts")]
        missing = [key for key in missing if key not in state]
        if missing:
            raise ValueError(f"KneserNey state dict of order {model.order} lacks {', '.join(missing)}")
        counts = []
        for k in range(1, model.order + 1):
            text = ids_to_str(state[f"grams.{k}"].numpy().reshape(-1), model.vocab_size)
            grams = [text[i : i + k] for i in range(0, len(text), k)]
            counts.append(dict(zip(grams, state[f"counts.{k}"].tolist(), strict=True)))
        return model._set_counts(counts, state["discounts"].tolist())


# --------------------------------------------------------------------------------------
# Order selection


def select_order(
    ids: Sequence[int] | np.ndarray,
    vocab_size: int,
    max_order: int,
    tail_fraction: float,
) -> tuple[int, dict[int, float]]:
    """Choose n by the tail score of KN models of orders 1..max_order.

    1. Count once, up to max_order, on the first (1 - tail_fraction) of `ids`.
    2. Score the tail (its first ids take their history from the end of the fit part).
       The order-m model is the continuation levels 1..m-1, shared by every m, under
       the raw level m: one pass along the chain scores every order.
    3. Return the best order (ties: the smaller) and {order: nats per token on tail}.
    """
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order}")
    if not 0.0 < tail_fraction < 1.0:
        raise ValueError(f"tail_fraction must lie in (0, 1), got {tail_fraction}")
    s = ids_to_str(ids, vocab_size)
    cut = round(len(s) * (1.0 - tail_fraction))
    if cut < 1 or cut >= len(s):
        raise UserError(
            f"{len(s)} training tokens are too few to hold out a tail of {tail_fraction:.0%} for choosing "
            "the n-gram order (set the order with --set order=N)"
        )
    raw, cont = count_ngrams(s[:cut], max_order)
    raw_levels = [_Level.from_counts(c, kn_discount(c)) for c in raw]
    cont_levels = [_Level.from_counts(c, kn_discount(c)) for c in cont]

    total = dict.fromkeys(range(1, max_order + 1), 0.0)
    for lo in range(cut, len(s), CHUNK):
        hi = min(lo + CHUNK, len(s))
        p_cont = np.full(hi - lo, 1.0 / vocab_size)  # continuation chain, from P_0
        for m in range(1, max_order + 1):
            p_m = _interpolate(raw_levels[m - 1], m, s, lo, hi, p_cont)
            total[m] -= float(np.log(p_m).sum())
            if m < max_order:
                p_cont = _interpolate(cont_levels[m - 1], m, s, lo, hi, p_cont)
    nats = {m: t / (len(s) - cut) for m, t in total.items()}
    best = min(nats, key=nats.get)  # the first minimum: ties go to the smaller order
    return best, nats


# --------------------------------------------------------------------------------------
# transformers adapter


class NGramHFConfig(PretrainedConfig):
    model_type = "aigc_ngram"

    def __init__(self, vocab_size: int = 2, order: int = 3, **kwargs):
        self.vocab_size = vocab_size  # number of token ids
        self.order = order  # n-gram order n
        super().__init__(**kwargs)


class NGramLM(PreTrainedModel, GenerationMixin):
    """A ``KneserNey`` model behind the causal-LM interface that ``generate`` decodes.

    Its logits are the KN log-probabilities: log_softmax leaves them unchanged, so every
    logits processor (temperature, top-k/p, repetition penalty, ...) and beam scores
    act on the model's true distribution.
    """

    config_class = NGramHFConfig
    main_input_name = "input_ids"

    def __init__(self, config: NGramHFConfig):
        super().__init__(config)
        self.kn = KneserNey(config.order, config.vocab_size)
        # PreTrainedModel reads .device and .dtype off the parameters: one empty one.
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to initialise: the model is the counts in ``self.kn``."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutput:
        """Logits (B, T', V) float32: log P(next id | unmasked ids up to each position).

        T' = T; or the last `logits_to_keep` positions when it is an int > 0 (generation
        passes 1); or the listed positions when it is a 1-D tensor. Positions with
        attention_mask 0 (left padding) are not history.
        """
        batch, length = input_ids.shape
        if isinstance(logits_to_keep, int):
            positions = range(length - logits_to_keep if logits_to_keep > 0 else 0, length)
        else:
            positions = [t % length for t in logits_to_keep.tolist()]
        ids = input_ids.tolist()
        mask = [[1] * length] * batch if attention_mask is None else attention_mask.tolist()
        logits = np.empty((batch, len(positions), self.config.vocab_size), np.float32)
        for b in range(batch):
            kept = [token for token, keep in zip(ids[b], mask[b], strict=True) if keep]
            n_kept = np.cumsum(mask[b])  # (T,) unmasked ids up to and including t
            for j, t in enumerate(positions):
                logits[b, j] = self.kn.next_logprobs(kept[: n_kept[t]])
        return CausalLMOutput(logits=torch.from_numpy(logits).to(input_ids.device))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: every step reads the whole sequence and keeps the last position.
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "logits_to_keep": 1,
        }

    def save(self, directory: str | Path) -> None:
        """Write ngram.safetensors, config.json and generation_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.kn.state_dict(), directory / "ngram.safetensors")
        self.config.save_pretrained(directory)
        self.generation_config.save_pretrained(directory)

    @classmethod
    def load(cls, directory: str | Path) -> NGramLM:
        directory = Path(directory)
        weights = directory / "ngram.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no n-gram checkpoint at {weights}")
        model = cls(NGramHFConfig.from_pretrained(directory))
        kn = KneserNey.from_state_dict(load_file(weights))
        if (kn.order, kn.vocab_size) != (model.config.order, model.config.vocab_size):
            raise ValueError(
                f"{weights} holds order {kn.order} and vocab_size {kn.vocab_size}, but "
                f"its config.json says {model.config.order} and {model.config.vocab_size}"
            )
        model.kn = kn
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        return model.eval()


def build_from_ids(
    train_ids: Sequence[int] | np.ndarray,
    vocab_size: int,
    config: NGramConfig,
    eot_id: int,
    unk_id: int | None,
) -> tuple[NGramLM, dict]:
    """Select the order on the tail of train_ids (when config.order == 0), then fit on
    all of them. Returns the model and {"order": n, "tail_nats_per_token": {...}}.

    unk_id is only checked: the uniform P_0 gives it, like every id, P > 0.
    """
    for name, token in (("eot_id", eot_id), ("unk_id", unk_id)):
        if token is not None and not 0 <= token < vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size}), got {token}")
    if config.order < 0:
        raise ValueError(f"order must be >= 0 (0 = select it), got {config.order}")
    order, tail_nats = config.order, {}
    if order == 0:
        order, tail_nats = select_order(train_ids, vocab_size, config.max_order, config.tail_fraction)
    model = NGramLM(NGramHFConfig(vocab_size=vocab_size, order=order))
    model.kn.fit(train_ids)
    model.generation_config = GenerationConfig(
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, use_cache=False
    )
    return model.eval(), {"order": order, "tail_nats_per_token": tail_nats}
