"""What `aigc optimize` makes of a clip-generating video run or a sound run and people's ratings of its clips or
sounds: rerank only (aigc.optimize.rerank: a reward on the features of the clips or the sounds' spectrograms, used
as best-of-n at generation time). sft would continue the run's training on its liked outputs, which needs
"continue from a run" (--init-from) for video and sound runs: not built yet (docs/optimize.md).

A rated clip or sound is its generation record (aigc.optimize.feedback), made again from it by the parent's weights:
the same bytes that were rated. A video run that predicts frames has nothing to choose among and is refused. The new
run holds the parent's model files unchanged and reward.safetensors + reward.json; its metrics are the parent's
(the same weights), and before and after is the judged share of liked fresh outputs.
"""

from __future__ import annotations

from pathlib import Path

from aigc.modalities import sound as sound_modality
from aigc.modalities import video as video_modality
from aigc.modalities.base import Prepared
from aigc.optimize import rerank
from aigc.optimize.feedback import Feedback

METHODS = ("rerank",)
TRAIN_DEFAULTS: dict[str, object] = {}
# rejection sampling, as images (a clip generator and the sound families are image families): the first of 3 the
# reward judges liked, else the first
OPTIMIZE_DEFAULTS = {"best_of": 3, "pick": "first-liked"}
STEPS = None  # nothing is trained
LOADERS = {"video": video_modality.load, "sound": sound_modality.load}
KEPT_METRICS = ("val_nelbo", "val_bits_per_dim", "val_loss")  # the parent's, for the same weights


def prepare(fam, parent_dir: Path, parent: dict, configs: dict, feedback: Feedback, method: str,
            sets: dict) -> Prepared:
    """The reward fitted on the parent's rated outputs (a predictor is refused before: service.check_optimizable)."""
    reward = rerank.fit_for_run(feedback.modality, LOADERS[feedback.modality](str(parent_dir)), feedback,
                                configs["optimize"])
    return Prepared(None, {}, {"reward": reward, "parent_metrics": parent.get("metrics", {})},
                    rerank.reward_run_files(parent_dir, reward))


def fit(fam, prepared: Prepared, configs: dict, run_dir: Path, budget, method: str) -> dict:
    return rerank.fitted(prepared.state["reward"])


def finish(family: str, fam, prepared: Prepared, configs: dict, run_dir: Path, fitted: dict, method: str) -> dict:
    """The parent's validation metrics (the same weights, byte for byte) and the reward's fit."""
    return {**{k: v for k, v in prepared.state["parent_metrics"].items() if k in KEPT_METRICS}, **fitted}
