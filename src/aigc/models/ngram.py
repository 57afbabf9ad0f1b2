"""Token n-gram language model with interpolated Kneser-Ney smoothing: the baseline.

Reads top to bottom:

1. ``NGramConfig``: the user-facing settings.
2. Counting: the ids become a Python ``str`` (one character ``chr(id)`` per id), so n-grams are
   substrings, counts are ``collections.Counter`` objects and contexts are string keys.
3. ``KneserNey``: the estimator (fit, scoring, state dict).
4. ``select_order``: choose n on the tail of the training ids, counting only once.
5. ``NGramLM``: a transformers ``PreTrainedModel`` + ``GenerationMixin`` adapter, so every decoding
   strategy of ``generate`` (greedy, sampling, top-k/p, beam search, ...) works unchanged.
6. ``build_from_ids``: select the order, fit, set the generation config.

The model is interpolated Kneser-Ney (Chen & Goodman 1998, "An empirical study of smoothing
techniques for language modeling") with one absolute discount per level. For a k-gram ``h w`` whose
context ``h`` has k - 1 ids, and ``h'`` = ``h`` without its first id::

    P_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k * N1+(h .) * P_{k-1}(w | h')) / sum_v c_k(h v)
    P_0(w)     = 1 / V          (uniform: every id, <unk> included, gets P > 0)

- At the top level c_k are raw counts c(h w); at the levels below it they are continuation counts
  ``N1+(. h w)``, the number of distinct ids seen just before ``h w``.
- ``N1+(h .)`` is the number of distinct w with ``c_k(h w) > 0``.
- A context without counts at level k (``sum_v c_k(h v) = 0``) backs off entirely:
  ``P_k(w | h) = P_{k-1}(w | h')``.
- ``D_k = n1 / (n1 + 2 n2)`` (Ney, Essen & Kneser 1994), where ``n_r`` is the number of k-grams with
  ``c_k = r``, counted on the counts that level uses.

The order-m model is therefore "continuation levels 1..m-1 under the raw level m". A history of
L < n - 1 ids (the start of a text, or a short prompt) is scored by the order-(L+1) model: its top
level holds raw counts, which estimate P(w | h) averaged over whatever came before h, whereas
continuation counts only make sense under a higher level.

The training ids are one continuous stream; document boundaries are ordinary ids (the project's
end-of-text id), so a document start is the history "<eot>" and gets raw bigram counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
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

# Ids become characters with chr(id). 0xD800 starts the UTF-16 surrogates, which the UTF-32 codec
# used to convert ids <-> str rejects.
MAX_VOCAB_SIZE = 0xD800
# Positions scored per vectorised pass (nll, select_order): bounds the temporary lists of n-gram
# strings, roughly 100 bytes per position and level.
CHUNK = 1 << 18
# D_k when a level has no singletons: n1 = 0 would give D_k = 0 and hence P = 0 for unseen ids.
# 0.5 is KenLM's --discount_fallback value for D_1.
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


# --------------------------------------------------------------------------------------------------
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


def count_ngrams(s: str, n: int) -> Counter:
    """c(g) for every n-gram g of s (substrings of length n): the only counts a model stores."""
    starts = range(len(s) - n + 1)
    return Counter(map(s.__getitem__, map(slice, starts, range(n, len(s) + 1))))


def derive_counts(top: dict[str, int], tail: str, n: int) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """All the counts of every level, from the n-gram counts and `tail`, the text's last n - 1 ids.

    Returns raw[k-1][g] = c(g) for k = 1..n and cont[k-1][g] = N1+(. g) for k = 1..n-1, using
      c(g) = sum_w c(g w) + [g ends the text]  (every k-gram occurrence but the text's last one is
                                               the prefix of exactly one (k+1)-gram occurrence)
      N1+(. g) = #{(k+1)-gram types x g}       (each adds one distinct left neighbour x)
    which is far cheaper than rescanning the text once per order.
    """
    raw: list[dict[str, int]] = [top]
    for k in range(n - 1, 0, -1):
        counts = Counter()
        for gram, c in raw[0].items():
            counts[gram[:-1]] += c
        if k <= len(tail):  # the text has at least k ids
            counts[tail[len(tail) - k :]] += 1
        raw.insert(0, counts)
    cont = [Counter(gram[1:] for gram in raw[k]) for k in range(1, n)]
    return raw, cont


def kn_discount(counts: dict[str, int]) -> float:
    """D = n1 / (n1 + 2 n2) from the count-of-counts of one level."""
    n_r = Counter(counts.values())
    if n_r[1] == 0:
        return FALLBACK_DISCOUNT
    return n_r[1] / (n_r[1] + 2 * n_r[2])


@dataclass
class _Level:
    """Lookup tables of one interpolation level: k-grams and their (k-1)-id contexts."""

    k: int  # gram length
    counts: dict[str, int]  # c_k(h w): raw counts, or continuation counts N1+(. h w)
    discount: float  # D_k
    context_index: dict[str, int]  # context h -> its row in totals and n_types
    totals: np.ndarray  # (n_contexts,) float64: sum_v c_k(h v)
    n_types: np.ndarray  # (n_contexts,) float64: N1+(h .)

    @classmethod
    def from_counts(cls, k: int, counts: dict[str, int]) -> _Level:
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
            k=k,
            counts=counts,
            discount=kn_discount(counts),
            context_index=context_index,
            totals=np.asarray(totals, dtype=np.float64),
            n_types=np.asarray(n_types, dtype=np.float64),
        )


def _interpolate(level: _Level, s: str, lo: int, hi: int, p_lower: np.ndarray) -> np.ndarray:
    """P_k(s[i] | s[i-k+1:i]) for the positions i in [lo, hi), shape (hi - lo,).

    `p_lower` holds P_{k-1} at the same positions. Vectorised over positions: the string slices and
    dict look-ups run through map(), the arithmetic in numpy. Positions with fewer than k - 1 ids of
    history keep P_{k-1}; the callers score those separately.
    """
    k = level.k
    p = p_lower.copy()
    first = max(lo, k - 1)
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


# --------------------------------------------------------------------------------------------------
# The estimator


class KneserNey:
    """Interpolated Kneser-Ney n-gram model over the ids 0..vocab_size-1.

    Pure estimator: ``fit(ids)`` returns self. Learned state: ``counts_`` (the n-gram counts) and
    ``tail_`` (the last n - 1 training ids, as a string), from which every lower-order count
    follows; and, derived from them, ``raw_discounts_`` (D_1..D_n of the raw levels) and
    ``cont_discounts_`` (D_1..D_{n-1} of the continuation levels).
    """

    def __init__(self, order: int, vocab_size: int):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must lie in [1, {MAX_VOCAB_SIZE}] (ids become characters), got {vocab_size}")
        self.order = order
        self.vocab_size = vocab_size

    # -- fit -------------------------------------------------------------------------------------

    def fit(self, ids: Sequence[int] | np.ndarray) -> KneserNey:
        """Count the n-grams of `ids` (one stream) and derive every level and discount."""
        s = ids_to_str(ids, self.vocab_size)
        return self._set_counts(count_ngrams(s, self.order), s[max(len(s) - self.order + 1, 0) :])

    def _set_counts(self, counts: dict[str, int], tail: str) -> KneserNey:
        self.counts_ = counts
        self.tail_ = tail
        raw, cont = derive_counts(counts, tail, self.order)
        self._raw = [_Level.from_counts(k, c) for k, c in enumerate(raw, start=1)]  # levels 1..n
        self._cont = [_Level.from_counts(k, c) for k, c in enumerate(cont, start=1)]  # levels 1..n-1
        self.raw_discounts_ = np.array([level.discount for level in self._raw])
        self.cont_discounts_ = np.array([level.discount for level in self._cont])
        self._alphabet = [chr(i) for i in range(self.vocab_size)]  # every id as a one-char string
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "_raw"):
            raise RuntimeError("this KneserNey model is not fitted: call fit(ids) or KneserNey.from_state_dict(state)")

    def _chain(self, history: str) -> list[_Level]:
        """The levels that score the id after `history` (at most n - 1 ids), lowest first: the
        order-(L+1) model for a history of L ids, continuation levels 1..L under raw level L+1."""
        return self._cont[: len(history)] + [self._raw[len(history)]]

    def _history(self, context: Sequence[int] | np.ndarray) -> str:
        """The last n - 1 ids of `context` as a string."""
        return ids_to_str(np.asarray(context)[max(len(context) - self.order + 1, 0) :], self.vocab_size)

    # -- scoring ---------------------------------------------------------------------------------

    def logprob(self, token: int, context: Sequence[int] = ()) -> float:
        """Natural log P(token | the last n - 1 ids of context)."""
        self._check_fitted()
        return self._logprob(self._history(context), ids_to_str([token], self.vocab_size))

    def _logprob(self, history: str, w: str) -> float:
        p = 1.0 / self.vocab_size  # P_0
        for level in self._chain(history):
            h = history[len(history) - level.k + 1 :]
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
        for level in self._chain(history):
            h = history[len(history) - level.k + 1 :]
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

        Fast path: only the observed id's probability, vectorised over positions.
        """
        self._check_fitted()
        history = ids_to_str(context, self.vocab_size)
        s = history + ids_to_str(ids, self.vocab_size)
        total = 0.0
        for lo in range(len(history), len(s), CHUNK):
            hi = min(lo + CHUNK, len(s))
            total -= float(np.log(self._probs(s, lo, hi, [self.order])[self.order]).sum())
        return total

    def _probs(self, s: str, lo: int, hi: int, orders: Collection[int]) -> dict[int, np.ndarray]:
        """{m: P(s[i] | s[:i]) for i in [lo, hi) under the order-m model}, for each m in `orders`.

        1. Walk up the continuation levels once; after level m-1, raw level m on top gives the
           order-m model, so one walk serves every order (select_order scores all of them).
        2. Positions with fewer than m - 1 ids of history (the first ones of s) are scored one by
           one with their own chain (order-(L+1) model), as `logprob` does.
        """
        top = max(orders)
        out = {}
        p = np.full(hi - lo, 1.0 / self.vocab_size)  # P_0
        for m in range(1, top + 1):
            if m in orders:
                out[m] = _interpolate(self._raw[m - 1], s, lo, hi, p)
                for i in range(lo, min(hi, m - 1)):
                    out[m][i - lo] = math.exp(self._logprob(s[:i], s[i]))
            if m < top:
                p = _interpolate(self._cont[m - 1], s, lo, hi, p)
        return out

    # -- state dict ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain contiguous tensors, ready for ``safetensors.torch.save_file``: ``grams`` (n_grams, n)
        int32, the n-grams' ids; ``counts`` (n_grams,) int64; ``tail`` (<= n-1,) int32, the last
        training ids; ``order`` and ``vocab_size``. Lower levels and discounts are re-derived."""
        self._check_fitted()
        grams = str_to_ids("".join(self.counts_)).astype(np.int32).reshape(len(self.counts_), self.order)
        return {
            "order": torch.tensor([self.order], dtype=torch.int64),
            "vocab_size": torch.tensor([self.vocab_size], dtype=torch.int64),
            "grams": torch.from_numpy(grams),
            "counts": torch.from_numpy(np.fromiter(self.counts_.values(), np.int64, len(self.counts_))),
            "tail": torch.from_numpy(str_to_ids(self.tail_).astype(np.int32)),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> KneserNey:
        expected = {"order", "vocab_size", "grams", "counts", "tail"}
        if set(state) != expected:
            raise ValueError(f"not a KneserNey state dict: keys {sorted(state)}, expected {sorted(expected)}")
        model = cls(int(state["order"].item()), int(state["vocab_size"].item()))
        n = model.order
        text = ids_to_str(state["grams"].numpy().reshape(-1), model.vocab_size)
        grams = [text[i : i + n] for i in range(0, len(text), n)]
        counts = dict(zip(grams, state["counts"].tolist(), strict=True))
        return model._set_counts(counts, ids_to_str(state["tail"].numpy(), model.vocab_size))


# --------------------------------------------------------------------------------------------------
# Order selection


def select_order(
    ids: Sequence[int] | np.ndarray,
    vocab_size: int,
    max_order: int,
    tail_fraction: float,
) -> tuple[int, dict[int, float]]:
    """Choose n by the tail score of the KN models of orders 1..max_order.

    1. Fit one order-max_order model on the first (1 - tail_fraction) of `ids`: it holds the
       levels of every lower-order model too, so counting happens once.
    2. Score the tail under every order in one walk (its first ids take their history from the end
       of the fit part).
    3. Return the best order (ties: the smaller) and {order: nats per token on the tail}.
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
    kn = KneserNey(max_order, vocab_size).fit(np.asarray(ids)[:cut])
    orders = range(1, max_order + 1)
    total = dict.fromkeys(orders, 0.0)
    for lo in range(cut, len(s), CHUNK):
        for m, p in kn._probs(s, lo, min(lo + CHUNK, len(s)), orders).items():
            total[m] -= float(np.log(p).sum())
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
