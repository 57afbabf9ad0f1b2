"""What `aigc optimize` makes of an image run and people's ratings of its pictures:

- rerank: a reward model on the evaluation feature net's features of the rated images (aigc.optimize.rerank), used
  as best-of-n at generation time; the run holds the parent's weights unchanged.
- sft: the parent continues training on its liked images mixed with its training data (each batch
  `feedback_share` liked images, drawn in proportion to their ratings' sum, the rest training images), in the one
  training loop, validated on the parent's validation split.
"""

from __future__ import annotations

from pathlib import Path

from aigc.modalities import image as image_modality
from aigc.modalities.base import Prepared
from aigc.optimize import rerank
from aigc.optimize.feedback import Feedback

METHODS = ("sft", "rerank")
TRAIN_DEFAULTS = {"warmup_steps": 10, "eval_interval": 25, "keep_best": False, "compile": "false"}


def prepare(fam, parent_dir: Path, parent: dict, configs: dict, feedback: Feedback, method: str) -> Prepared:
    if method == "rerank":
        reward = rerank.fit_for_run("image", image_modality.load(str(parent_dir)), feedback, configs["optimize"])
        return Prepared(None, {}, {"reward": reward, "parent_metrics": parent.get("metrics", {})},
                        rerank.reward_run_files(parent_dir, reward))
    raise NotImplementedError


def fit(fam, prepared: Prepared, configs: dict, run_dir: Path, budget, method: str) -> dict:
    if method == "rerank":
        return rerank.fitted(prepared.state["reward"])
    raise NotImplementedError


def finish(family: str, fam, prepared: Prepared, configs: dict, run_dir: Path, fitted: dict, method: str) -> dict:
    """rerank: the parent's validation metrics (the same weights, byte for byte); sft: the new weights' own."""
    if method == "rerank":
        kept = ("val_nelbo", "val_bits_per_dim", "val_images", "val_loss")
        return {**{k: v for k, v in prepared.state["parent_metrics"].items() if k in kept}, **fitted}
    raise NotImplementedError
