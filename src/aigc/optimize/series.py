"""What `aigc optimize` makes of a series run and people's ratings of its sample paths: rerank only (a forecaster's
ratings say which continuations a person finds plausible or wanted, not a training target), for every series family
(ar, rnn).

- The rated outputs are a forecast's sample paths (`--paths N`): a rating with `index` rates that path, one
  without rates every path of the forecast.
- The reward reads `aigc.optimize.rerank.path_features`: summary statistics of a path in the units of the run's own
  series (its last value and its standard deviation), so one reward fits any horizon: where the path ends, starts,
  lies on average, its least-squares slope, its spread and range, its mean absolute step and how its steps
  correlate.
- Best of k at generation: a forecast of N paths draws N x k paths with its seed and keeps the best of each group of
  k; the point forecast and its intervals stay the model's (only the paths are chosen).

The run holds the parent's model files and series.json unchanged, and reward.safetensors + reward.json; its
metrics are the parent's (the same weights), and before and after is the judged share of liked fresh paths.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from aigc.modalities import series as series_modality
from aigc.modalities.base import Prepared
from aigc.optimize import rerank
from aigc.optimize.feedback import Feedback

METHODS = ("rerank",)
TRAIN_DEFAULTS: dict[str, object] = {}
OPTIMIZE_DEFAULTS = {"best_of": 4}
STEPS = None  # nothing is trained
def prepare(fam, parent_dir: Path, parent: dict, configs: dict, feedback: Feedback, method: str,
            sets: dict) -> Prepared:
    reward = rerank.fit_for_run("series", series_modality.load(str(parent_dir)), feedback, configs["optimize"])
    files = rerank.reward_run_files(parent_dir, reward)

    def write_files(staging: Path) -> None:
        files(staging)
        shutil.copy2(parent_dir / series_modality.SERIES_FILE, staging / series_modality.SERIES_FILE)

    return Prepared(None, {}, {"reward": reward, "parent_metrics": parent.get("metrics", {})}, write_files)


def fit(fam, prepared: Prepared, configs: dict, run_dir: Path, budget, method: str) -> dict:
    return rerank.fitted(prepared.state["reward"])


def finish(family: str, fam, prepared: Prepared, configs: dict, run_dir: Path, fitted: dict, method: str) -> dict:
    """The parent's metrics (the same model, byte for byte) and the reward's fit."""
    return {**prepared.state["parent_metrics"], **fitted}
