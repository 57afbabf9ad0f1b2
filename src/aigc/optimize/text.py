"""What `aigc optimize` trains a text run on: its liked outputs (sft) or preference pairs (dpo), as `Batches` for
the one training loop (aigc.train), so an optimized run has the same format, seeding, checkpoints and progress
as any other.

Every example is a token sequence EOT + prompt + completion, as generation reads it (a prompt starts after the
end-of-text token); only the completion's tokens are learned from or scored, never the prompt's. Validation is
the parent's validation split (bits per character), so the log shows whether the language itself degrades.

- sft (rejection-sampling fine-tuning): next-token cross-entropy on liked completions, each drawn with a
  probability proportional to its weight (the sum of its ratings).
- sft on an n-gram (a counted family): the liked completions' n-grams are added to the parent's counts, each
  completion `count_weight` times per unit of its weight, and every level and discount is derived again; the
  n-grams that end on a prompt token are not counted. No training loop, so no steps.
- dpo (Direct Preference Optimization, Rafailov et al. 2023): -log sigmoid(beta * ((log pi(chosen) -
  log ref(chosen)) - (log pi(rejected) - log ref(rejected)))), the log-probabilities summed over each
  completion's tokens, the reference being the frozen parent; its log-probabilities are computed once, before
  training, in eval mode and fp32 (the parent never changes), so no second model is held in memory.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aigc.checkpoint import save_model_files, verify_manifest
from aigc.data.tokenizer import TextTokenizer
from aigc.errors import BadRequest
from aigc.modalities import text as text_modality
from aigc.modalities.base import Prepared
from aigc.modalities.text import n_scored_chars, read_val
from aigc.models import ngram
from aigc.optimize import rerank
from aigc.optimize.feedback import Feedback
from aigc.sample import load_run
from aigc.train import LN2, lm_loss, train_loop, val_windows


def encode_example(tokenizer: TextTokenizer, prompt: str, text: str, max_len: int) -> tuple[list[int], int]:
    """ids = EOT + prompt + completion (text is the full text, prompt first), cut to max_len tokens, and the index
    of the first completion token."""
    head = [tokenizer.eot_id, *tokenizer.encode(prompt)]
    ids = head + tokenizer.encode(text[len(prompt):])
    return ids[:max_len], len(head)


def padded(examples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (B, T) and targets y (B, T), right-padded: y is -100 on the prompt and the padding, so only the
    completion's tokens count (a causal model reads no padding before a real token)."""
    width = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros(len(examples), width, dtype=torch.long)
    y = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, start) in enumerate(examples):
        t = torch.as_tensor(ids, dtype=torch.long)
        x[row, : len(ids) - 1] = t[:-1]
        y[row, start - 1: len(ids) - 1] = t[start:]
    return x, y


def sequence_logp(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(y_t | x_<=t) over the positions where y is not -100 (nats), in fp32."""
    logp = F.log_softmax(model(input_ids=x).logits.float(), dim=-1)
    mask = y != -100
    picked = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The mean DPO loss of a batch of pairs, from sequence log-probabilities (nats)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


class _Validation:
    """The parent's validation windows, scored by next-token loss (val_loss, val_bpc) like any text run."""

    def __init__(self, val_ids: np.ndarray, block_size: int, chars_per_val_token: float | None):
        self.val = torch.as_tensor(np.asarray(val_ids).astype(np.int64))
        self.block_size, self.chars_per_val_token = block_size, chars_per_val_token

    def val_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        return val_windows(self.val, self.block_size, n_batches, batch)

    def noise(self, model, n: int, device: torch.device) -> None:
        return None

    def val_metrics(self, val_loss: float) -> dict:
        if self.chars_per_val_token is None:  # music: the loss per token is the metric
            return {}
        return {"val_bpc": val_loss / LN2 / self.chars_per_val_token}


class LikedBatches(_Validation):
    """sft: liked completions, drawn in proportion to their weights."""

    unit = "tokens"

    def __init__(self, examples: list[tuple[list[int], int]], weights: list[float], val_ids: np.ndarray,
                 block_size: int, chars_per_val_token: float | None):
        super().__init__(val_ids, block_size, chars_per_val_token)
        self.examples = [e for e in examples if len(e[0]) > e[1]]  # an empty completion teaches nothing
        self.weights = torch.tensor([w for e, w in zip(examples, weights, strict=True) if len(e[0]) > e[1]],
                                    dtype=torch.float64)
        if not self.examples:
            raise ValueError("every liked output is its prompt alone: nothing to learn from")
        self.items_per_sample = max(len(ids) - start for ids, start in self.examples)

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        rows = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return padded([self.examples[i] for i in rows.tolist()])

    def loss(self, model, batch: tuple[torch.Tensor, ...], *, phase: str | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return lm_loss(model, *batch)  # mean over the completions' tokens (-100 is ignored)


class PairBatches(_Validation):
    """dpo: (chosen, rejected) pairs with the parent's log-probabilities of both."""

    unit = "pairs"
    items_per_sample = 1

    def __init__(self, pairs: list[tuple[tuple[list[int], int], tuple[list[int], int]]], reference,
                 val_ids: np.ndarray, block_size: int, chars_per_val_token: float | None, beta: float):
        super().__init__(val_ids, block_size, chars_per_val_token)
        self.pairs = [p for p in pairs if all(len(ids) > start for ids, start in p)]
        if not self.pairs:
            raise ValueError("every pair has an empty completion: nothing to learn from")
        self.beta = beta
        self.ref = self._reference(reference)  # (P, 2): the parent's log-probabilities of chosen, rejected

    @torch.no_grad()
    def _reference(self, model, batch: int = 32) -> torch.Tensor:
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(self.pairs), batch):
            group = self.pairs[i:i + batch]
            x, y = padded([side for pair in group for side in pair])  # chosen, rejected, chosen, ...
            out.append(sequence_logp(model, x, y).view(-1, 2))
        model.train(was_training)
        return torch.cat(out)

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        rows = torch.randint(0, len(self.pairs), (n,), generator=generator)
        x, y = padded([side for i in rows.tolist() for side in self.pairs[i]])
        return x.view(n, 2, -1), y.view(n, 2, -1), self.ref[rows]

    def loss(self, model, batch: tuple[torch.Tensor, ...], *, phase: str | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if len(batch) == 2:  # a validation window
            return lm_loss(model, *batch)
        x, y, ref = batch
        logp = sequence_logp(model, x.flatten(0, 1), y.flatten(0, 1)).view(-1, 2)
        return dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], self.beta)


# ----------------------------------------------------------------------------------
# a new run from a parent and its feedback

METHODS = ("sft", "dpo", "rerank")
TRAIN_DEFAULTS = {"lr": 1e-4, "warmup_steps": 10, "eval_interval": 25, "keep_best": False, "compile": "false"}
OPTIMIZE_DEFAULTS: dict[str, object] = {}  # [optimize] keys as config.OptimizeConfig has them
STEPS = 100  # sft's and dpo's steps by default (benchmarks/feedback.py: enough to move the moon taste 0.30 -> 0.85)
# what an optimized run trains with unless --set says otherwise (the parent's other [train] keys are kept):
# a small learning rate for a short fine-tune, and the last weights, not those of the best validation loss
# (the validation split measures the language, which the preference is allowed to move a little)


def prepare(fam, parent_dir: Path, parent: dict, configs: dict, feedback: Feedback, method: str,
            sets: dict) -> Prepared:
    """The parent's model and tokenizer, its validation split (bits per character), and what `method` learns
    (`prepare_tokens`)."""
    tokenizer = TextTokenizer.load(parent_dir)
    val_docs = read_val(parent_dir)
    val_ids = tokenizer.encode_docs(val_docs)
    chars = n_scored_chars(val_docs)
    state = {"chars": chars, "parent_val_bpc": parent.get("metrics", {}).get("val_bpc")}

    def copy_split(staging: Path) -> None:
        shutil.copy2(parent_dir / "val.jsonl", staging / "val.jsonl")

    return prepare_tokens("text", fam, parent_dir, configs, feedback, method, tokenizer, val_ids,
                          chars / max(1, len(val_ids) - 1), state, copy_split)


def prepare_tokens(modality: str, fam, parent_dir: Path, configs: dict, feedback: Feedback, method: str,
                   tokenizer: TextTokenizer, val_ids: np.ndarray, chars_per_val_token: float | None, state: dict,
                   copy_split: Callable[[Path], None]) -> Prepared:
    """What `method` learns from a run of the text families on token ids (text, and music's event tokens): the
    batches of sft or dpo, the n-gram's added counts, or (rerank) a reward model fitted on the parent's features
    of the rated outputs. `val_ids`: the parent's validation stream; `chars_per_val_token`: what turns a loss per
    token into bits per character (None: no such metric, music); `state`: the modality's own keys for `finish`;
    `copy_split`: writes the parent's split files into the new run."""
    block = configs["train"].block_size if "train" in configs else 0
    verify_manifest(parent_dir)
    state = {**state, "tokenizer": tokenizer, "val_ids": val_ids}
    if method == "rerank":
        state["reward"] = rerank.fit_for_run(modality, load_run(str(parent_dir)), feedback, configs["optimize"])
        model, extra_files = None, rerank.reward_run_files(parent_dir, state["reward"])
    elif fam.trainer == "counts":  # sft on an n-gram: counts added, no training loop
        model, extra_files = fam.load(parent_dir), None
        examples = [encode_example(tokenizer, r.prompt, r.output, len(r.output) + 2) for r in feedback.liked]
        state["added"] = liked_counts(examples, [float(r.score) for r in feedback.liked], model.kn.order,
                                      model.kn.vocab_size, configs["optimize"].count_weight)
        if not state["added"]:
            raise BadRequest("every liked output is its prompt alone: nothing to learn from")
    else:
        model = fam.load(parent_dir)
        extra_files = None
        if method == "sft":
            liked = feedback.liked
            examples = [encode_example(tokenizer, r.prompt, r.output, block + 1) for r in liked]
            state["batches"] = _checked(LikedBatches, examples, [float(r.score) for r in liked], val_ids, block,
                                        chars_per_val_token)
        else:
            pairs = [(encode_example(tokenizer, p.prompt, p.chosen, block + 1),
                      encode_example(tokenizer, p.prompt, p.rejected, block + 1)) for p in feedback.pairs]
            state["batches"] = _checked(PairBatches, pairs, model, val_ids, block, chars_per_val_token,
                                        configs["optimize"].beta)

    def write_files(staging: Path) -> None:
        tokenizer.save(staging)
        copy_split(staging)
        if extra_files is not None:
            extra_files(staging)

    return Prepared(model, {}, state, write_files)


def _checked(batches_type, *args):
    try:
        return batches_type(*args)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def finish(family: str, fam, prepared: Prepared, configs: dict, run_dir: Path, fitted: dict, method: str) -> dict:
    """The new run's metrics on the parent's validation split, as any text run's (the parent's beside them)."""
    metrics = text_modality.finish(family, fam, prepared, configs, run_dir, fitted)
    return {**metrics, **{k: fitted[k] for k in ("ngrams_added", "counts_added") if k in fitted}}


def liked_counts(examples: list[tuple[list[int], int]], weights: list[float], order: int, vocab_size: int,
                 count_weight: float) -> Counter:
    """The n-grams (as the n-gram model keys them) of the liked examples that end on a completion token, each
    counted round(count_weight * weight) times (at least once for a positive weight)."""
    added: Counter = Counter()
    for (ids, start), weight in zip(examples, weights, strict=True):
        if weight <= 0:
            continue
        times = max(1, round(count_weight * weight))
        s = ngram.ids_to_str(ids, vocab_size)
        for end in range(max(start, order), len(s) + 1):
            if end > start:  # the gram's last id is a completion token
                added[s[end - order:end]] += times
    return added


def fit(fam, prepared: Prepared, configs: dict, run_dir: Path, budget, method: str) -> dict:
    if method == "rerank":
        return rerank.fitted(prepared.state["reward"])
    if "added" in prepared.state:
        kn = prepared.model.kn
        kn._set_counts(Counter(kn.counts_) + prepared.state["added"], kn.tail_)
        save_model_files(prepared.model, run_dir)
        return {"steps": 0, "order": kn.order, "ngrams_added": len(prepared.state["added"]),
                "counts_added": sum(prepared.state["added"].values())}
    return train_loop(prepared.model, prepared.state["batches"], configs["train"], run_dir, budget,
                      cpu_bf16=fam.cpu_bf16, compile_gain=False)
