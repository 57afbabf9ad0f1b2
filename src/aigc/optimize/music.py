"""What `aigc optimize` makes of a music run and people's ratings of its pieces. A music run is a text family (ngram,
rnn, gpt) on the event tokens of the REMI-like encoding (aigc.modalities.music), so every method is the text
optimizer's on token ids (aigc.optimize.text.prepare_tokens): a rated piece is its token string, learned or scored
whole (its "prompt" is empty: a piece continued from a MIDI prompt is learned with its prompt bars).

- sft: next-token cross-entropy on the liked pieces (the n-gram: their n-grams added to its counts);
- dpo: on pairs of a liked and a disliked piece, and arena votes, against the frozen parent;
- rerank: a reward model on the run's own hidden states of a piece (the n-gram: a hashed bag of its tokens).

Before and after: the held-out NLL per token on the parent's validation pieces (`val_loss` beside
`parent_val_loss`), and the judged share of liked fresh pieces (aigc.optimize.judge).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from aigc.data.music import music_tokenizer
from aigc.modalities import music as music_modality
from aigc.modalities.base import Prepared
from aigc.optimize import text as optimize_text
from aigc.optimize.feedback import Feedback

METHODS = optimize_text.METHODS
TRAIN_DEFAULTS = optimize_text.TRAIN_DEFAULTS
# sft on an n-gram counts each liked piece 5 times per unit of its rating, not text's 20: measured (tests/
# test_optimize_music.py's setting: 8 chorales, 100 liked pieces of 2 bars), 20 moved the liked share 0.50 -> 0.85
# at +17% NLL per token, 5 -> 0.73 at +6% (a piece is many tokens, and a small corpus few)
OPTIMIZE_DEFAULTS = {**optimize_text.OPTIMIZE_DEFAULTS, "count_weight": 5.0}
STEPS = optimize_text.STEPS


def prepare(fam, parent_dir: Path, parent: dict, configs: dict, feedback: Feedback, method: str,
            sets: dict) -> Prepared:
    """The parent's validation pieces as its token stream (EOT piece EOT piece ...), and what `method` learns."""
    tokenizer = music_tokenizer()
    _, val = music_modality.read_split(parent_dir, parent)
    val_ids = music_modality.ids_of(tokenizer, val)
    state = {"notes": parent["data"]["val"]["notes"], "parent_val_loss": parent.get("metrics", {}).get("val_loss")}

    def copy_split(staging: Path) -> None:
        for part in ("train", "val"):  # checked against the sha256 in run.json, as the parent's
            name = parent["data"][part]["file"]
            shutil.copy2(parent_dir / name, staging / name)
        if (parent_dir / music_modality.SAMPLING_FILE).is_file():  # it samples as its parent, calibrated or not
            shutil.copy2(parent_dir / music_modality.SAMPLING_FILE, staging / music_modality.SAMPLING_FILE)

    return optimize_text.prepare_tokens("music", fam, parent_dir, configs, feedback, method, tokenizer, val_ids,
                                        None, state, copy_split)


def fit(fam, prepared: Prepared, configs: dict, run_dir: Path, budget, method: str) -> dict:
    return optimize_text.fit(fam, prepared, configs, run_dir, budget, method)


def finish(family: str, fam, prepared: Prepared, configs: dict, run_dir: Path, fitted: dict, method: str) -> dict:
    """The new run's NLL on the parent's validation pieces, as any music run's, the parent's beside it. Not
    calibrated again: calibrating would pull the pieces back to the training chorales' statistics, away from what
    people liked; it keeps its parent's sampling (copied with the split)."""
    metrics = music_modality.scores(prepared, run_dir, fitted)
    return {**metrics, "parent_val_loss": prepared.state["parent_val_loss"],
            **{k: fitted[k] for k in ("ngrams_added", "counts_added") if k in fitted}}
