"""A small reward model learned from people's ratings of a text run, for best-of-n reranking: draw n * k
candidates, score them, keep the best of each group of k.

The reward is a logistic model on features the run itself computes (`features`): the means of its embeddings
(what was written) and of its last hidden layer (how the model read it) over the completion's positions (gpt,
rnn, hf), or, for the n-gram (which has no hidden states), a hashed bag of the completion's characters. It is
fitted (`fit`) to liked / disliked outputs (logistic loss) and to preference pairs (Bradley-Terry loss), so a
run's own reading of a text is what separates the liked from the disliked; there is no second model to train or
to load.

    score(x) = w . (x - mean) / std + b        # the logit of "liked"
    loss = mean_labelled BCE(score, y) + mean_pairs -log sigmoid(score(chosen) - score(rejected)) + l2 ||w||^2
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from aigc.errors import BadRequest, UserError
from aigc.fsutil import atomic_write_bytes, atomic_write_text

NGRAM_DIM = 512  # hashed buckets of the n-gram family's character features
BATCH_SIZE = 32  # texts per forward pass in `features`


def feature_kind(loaded) -> str:
    """What `features` computes for this run, as recorded in reward.json: "hidden:<family>", "chars:512" or (an
    n-gram of music, whose texts are event tokens separated by spaces) "tokens:512"."""
    if loaded.family != "ngram":
        return f"hidden:{loaded.family}"
    return f"tokens:{NGRAM_DIM}" if loaded.tokenizer.kind == "music" else f"chars:{NGRAM_DIM}"


def features(loaded, prompts: list[str], texts: list[str]) -> torch.Tensor:
    """(N, D) float32 features of N generated texts (each the full text: its prompt, then the completion), as
    the run itself reads them.

    gpt, rnn, hf: the means of the model's first and last hidden states, its embeddings and its last layer's
    outputs (D = 2 n_embd for gpt, n_embd + n_hidden for the rnn), over the completion's positions (over all
    positions when the completion is empty; measured: the embeddings' mean, a bag of the tokens written that the
    last layer alone blurs, lifted a tiny rnn's best-of-4 from no gain to a clear one), the ids being EOT +
    prompt + completion cut on the left to the model's context, as generation reads them; the prompt's positions
    are left out of the mean, but they still shape the completion's states. Eval mode, no grad, in the model's own
    dtype and returned as fp32, batched with right padding (causal models: padding after a row never reaches its
    earlier positions). n-gram: an L1-normalised bag (D = 512) of the completion's (or, when empty, the whole text's)
    character unigrams and bigrams hashed with crc32 (music: its event tokens and token pairs).
    """
    if len(prompts) != len(texts) or not texts:
        raise BadRequest(f"{len(prompts)} prompts for {len(texts)} texts: give one prompt per text, at least one")
    for prompt, text in zip(prompts, texts, strict=True):
        if not text.startswith(prompt):
            raise BadRequest(f"text {text[:40]!r} does not start with its prompt {prompt[:40]!r}")
    if loaded.family == "ngram":
        split = loaded.tokenizer.kind == "music"  # event tokens, not characters
        return torch.stack([_char_bag(text[len(prompt):] or text, split)
                            for prompt, text in zip(prompts, texts, strict=True)])
    rows = [_encode(loaded, prompt, text) for prompt, text in zip(prompts, texts, strict=True)]
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([_hidden_means(loaded, rows[i:i + BATCH_SIZE]) for i in range(0, len(rows), BATCH_SIZE)])
    finally:
        model.train(was_training)


def _encode(loaded, prompt: str, text: str) -> tuple[list[int], int]:
    """ids = EOT + prompt + completion, cut on the left to the context, and the first position of the mean."""
    tokenizer = loaded.tokenizer
    head = [tokenizer.eot_id, *tokenizer.encode(prompt)]
    tail = tokenizer.encode(text[len(prompt):])
    context = loaded.max_context or loaded.block_size
    cut = max(0, len(head) + len(tail) - context)
    start = max(0, len(head) - cut) if tail else 0
    return (head + tail)[cut:], start


def _hidden_means(loaded, rows: list[tuple[list[int], int]]) -> torch.Tensor:
    """(B, D) masked means of the embeddings and of the last hidden layer for one batch of (ids, start) rows, right
    padded."""
    device = next(loaded.model.parameters()).device
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), loaded.tokenizer.eot_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    in_mean = torch.zeros((len(rows), length))  # 1 at the positions the mean runs over
    for b, (ids, start) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
        in_mean[b, start:len(ids)] = 1.0
    if loaded.family == "rnn":
        # No mask: the rnn reads a mask with zeros as left padding; right padding never reaches earlier states.
        out = loaded.model(input_ids=input_ids.to(device), output_hidden_states=True)
    else:
        out = loaded.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           output_hidden_states=True)
    means = []
    for h in (out.hidden_states[0], out.hidden_states[-1]):  # the embeddings and the last layer, (B, T, D_i)
        h = h.float().cpu()
        means.append((h * in_mean[..., None]).sum(1) / in_mean.sum(1, keepdim=True))
    return torch.cat(means, dim=1)  # (B, D_0 + D_last)


def _char_bag(text: str, split: bool = False) -> torch.Tensor:
    """(NGRAM_DIM,) counts of the text's characters and character pairs (split: its space-separated tokens and
    token pairs) in crc32 buckets, divided by their sum."""
    units, sep = (text.split(), " ") if split else (list(text), "")
    bag = torch.zeros(NGRAM_DIM)
    for gram in [*units, *(sep.join(units[i:i + 2]) for i in range(len(units) - 1))]:
        bag[zlib.crc32(gram.encode("utf-8")) % NGRAM_DIM] += 1.0
    return bag / bag.sum().clamp_min(1.0)


@dataclass
class Reward:
    """A fitted reward: the logit of "liked" is weight . (x - mean) / std + bias."""

    weight: torch.Tensor  # (D,) float32, on standardised features
    bias: float
    mean: torch.Tensor  # (D,) float32, of the features it was fitted on
    std: torch.Tensor  # (D,) float32, of the same, clamped to >= 1e-6
    info: dict  # n_liked, n_disliked, n_pairs, l2, train_accuracy, pair_accuracy, features, dim

    def score(self, X: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N,) logits of "liked"."""
        if X.ndim != 2 or X.shape[1] != len(self.weight):
            raise BadRequest(f"features of shape {tuple(X.shape)}: this reward reads (N, {len(self.weight)})")
        return ((X.float() - self.mean) / self.std) @ self.weight + self.bias

    def save(self, directory: Path) -> None:
        """reward.safetensors (weight, bias, mean, std) and reward.json (info), each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias], dtype=torch.float64),
                   "mean": self.mean.contiguous(), "std": self.std.contiguous()}
        atomic_write_bytes(directory / "reward.safetensors", safetensors_bytes(tensors))
        atomic_write_text(directory / "reward.json", json.dumps(self.info, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Reward:
        directory = Path(directory)
        for name in ("reward.safetensors", "reward.json"):
            if not (directory / name).is_file():
                raise UserError(f"{directory}: no {name}; fit a reward model there first")
        try:
            tensors = load_file(directory / "reward.safetensors")
            info = json.loads((directory / "reward.json").read_text(encoding="utf-8"))
            weight, bias, mean, std = (tensors[k] for k in ("weight", "bias", "mean", "std"))
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise UserError(f"{directory}: malformed reward model ({e}); fit it again") from None
        dim = len(weight) if weight.ndim == 1 else -1
        if not isinstance(info, dict) or bias.numel() != 1 or dim < 0 or mean.shape != (dim,) or std.shape != (dim,):
            raise UserError(f"{directory}: malformed reward model (inconsistent shapes or info); fit it again")
        return cls(weight=weight, bias=float(bias.item()), mean=mean, std=std, info=info)


def fit(X: torch.Tensor, labels: torch.Tensor | None, pairs: list[tuple[int, int]] | None = None, *,
        l2: float = 1e-2, steps: int = 300, seed: int = 0, kind: str | None = None) -> Reward:
    """Fit a reward to rows of X: labels (N,) 1.0 liked / 0.0 disliked / NaN unrated (or None), pairs
    (chosen_row, rejected_row). The objective (module docstring) is convex; L-BFGS minimises it full batch, in float64,
    from zero weights, so the fit is deterministic (`seed` is accepted for the common signature: nothing is
    drawn). kind: what the features are (`feature_kind`), recorded in info.
    """
    if X.ndim != 2 or len(X) == 0:
        raise BadRequest(f"features of shape {tuple(X.shape)}: need (N, D) with N >= 1")
    pairs = list(pairs or [])
    n = len(X)
    labelled = None
    if labels is not None:
        labels = labels.to(torch.float64).flatten()
        labelled = ~torch.isnan(labels)  # NaN: a row that only a pair speaks of
        if len(labels) != n or not bool(((labels == 0) | (labels == 1) | ~labelled).all()):
            raise BadRequest(f"labels must be {n} values of 1.0 (liked), 0.0 (disliked) or NaN (unrated), one "
                             f"per row")
    for chosen, rejected in pairs:
        if not (0 <= chosen < n and 0 <= rejected < n):
            raise BadRequest(f"pair ({chosen}, {rejected}) indexes outside the {n} rows")
    n_liked = int((labels[labelled] == 1).sum()) if labels is not None else 0
    n_disliked = int((labels[labelled] == 0).sum()) if labels is not None else 0
    if not pairs and n_liked + n_disliked == 0:
        raise BadRequest("nothing to learn from: no ratings and no preference pairs; rate at least one output "
                         "liked and one disliked, or give one preference pair")
    if not pairs and (n_liked == 0 or n_disliked == 0):
        which = "liked" if n_disliked == 0 else "disliked"
        raise BadRequest(f"the ratings are all {which} and there are no preference pairs: a reward needs at "
                         "least one liked and one disliked output, or one preference pair")

    # 1. Standardise with the training rows' statistics.
    X64 = X.to(torch.float64)
    mean = X64.mean(0)
    std = X64.std(0, unbiased=False).clamp_min(1e-6)
    Z = (X64 - mean) / std  # (N, D)
    chosen = torch.tensor([c for c, _ in pairs], dtype=torch.long)
    rejected = torch.tensor([r for _, r in pairs], dtype=torch.long)

    # 2. Minimise the objective with L-BFGS (strong Wolfe line search), full batch.
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        s = Z @ w + b  # (N,)
        loss = l2 * w.dot(w)
        if n_liked + n_disliked:
            loss = loss + F.binary_cross_entropy_with_logits(s[labelled], labels[labelled])
        if pairs:
            loss = loss - F.logsigmoid(s[chosen] - s[rejected]).mean()
        loss.backward()
        return loss

    optimizer.step(closure)

    # 3. Keep float32 weights and record how well they separate what they were fitted on.
    reward = Reward(weight=w.detach().float(), bias=float(b.detach()), mean=mean.float(), std=std.float(),
                    info={})
    s = reward.score(X)
    train_accuracy = None
    if n_liked + n_disliked:
        train_accuracy = float(((s[labelled] > 0).double() == labels[labelled]).double().mean())
    pair_accuracy = float((s[chosen] > s[rejected]).double().mean()) if pairs else None
    reward.info = {"n_liked": n_liked, "n_disliked": n_disliked, "n_pairs": len(pairs), "l2": l2,
                   "train_accuracy": train_accuracy, "pair_accuracy": pair_accuracy, "features": kind,
                   "dim": X.shape[1]}
    return reward


PICKS = ("best", "first-liked")


def best_of(scores: torch.Tensor, n: int, k: int, pick: str = "best") -> list[int]:
    """Scores of n * k candidates, n groups of k consecutive ones -> per group, the index (into the n * k) of the one
    kept. pick "best": its highest score, the first of equal ones; "first-liked": its first candidate the reward
    judges liked (score > 0, a probability of "liked" over one half), else its first candidate. The second is
    rejection sampling with at most k tries: within what the reward judges liked, and within what it does not, the
    kept outputs are distributed as the model's own, where the highest score is the most extreme of them."""
    if n < 1 or k < 1 or scores.ndim != 1 or len(scores) != n * k:
        raise BadRequest(f"{tuple(scores.shape)} scores for {n} groups of {k}: need a 1-D tensor of n * k = {n * k}")
    if pick not in PICKS:
        raise BadRequest(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
    if not bool(torch.isfinite(scores).all()):
        raise BadRequest("scores must be finite to rank candidates")
    groups = scores.reshape(n, k)
    if pick == "best":
        chosen = groups.argmax(dim=1)  # torch: the first maximal index on ties
    else:
        liked = groups > 0
        chosen = torch.where(liked.any(dim=1), liked.int().argmax(dim=1), 0)  # argmax: the first True
    return [g * k + int(i) for g, i in enumerate(chosen)]
