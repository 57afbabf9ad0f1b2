"""Before and after: what an optimized run's report shows beside its regular metric (bits per character, FID on
the same validation split): the share of fresh outputs that people would like, judged by a reward model fitted on
their feedback, for the parent and for the new run. The share is the mean of the judge's probability of "liked"
over the outputs (a logistic fit is calibrated on what it was fitted to, where counting outputs over a threshold
of one half is not: with few liked outputs it counts almost none).

For images, the same fresh images of each side are also scored by FID against the parent's held-out images
(`image_quality`), so a reader sees whether the preference cost quality.

The judge is one reward (aigc.optimize.reward) on the parent's features, so both sides are read by the same eyes:
for a rerank run it is the run's own reward (then "after" is best-of-k by that same reward, and the share says
how often it finds an output it likes; the held-out accuracy says how far to trust it); for sft and dpo it is
fitted on the same feedback and not kept. Fresh outputs: `eval_samples` of each, drawn with seeds no request is
likely to have used (FRESH_SEED + i), for the feedback's prompts (text, the most rated first, at most
MAX_PROMPTS) or classes (images of a conditional run), in equal shares.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aigc.config import build, read_toml
from aigc.data.images import ImageData, to_tensor
from aigc.data.music import bars_of as bars_of_tokens
from aigc.errors import BadRequest
from aigc.evaluate.images import feature_net, score_against_data
from aigc.modalities import image as image_modality
from aigc.modalities.music import DEFAULT_BARS
from aigc.optimize import rerank
from aigc.optimize.feedback import Feedback
from aigc.store import Stage

FRESH_SEED = 1_000_003
CHUNK = 32  # fresh outputs drawn and judged at a time (the progress bar moves once a chunk)
MAX_PROMPTS = 8
Z95 = 1.959964


def expected_share(probabilities: torch.Tensor) -> tuple[float, list[float]]:
    """The expected share of liked outputs, the mean of each output's probability of being liked, and its 95%
    interval over the outputs drawn (mean +- 1.96 standard errors, within [0, 1])."""
    p = probabilities.double()
    mean = float(p.mean())
    half = Z95 * float(p.std(unbiased=True)) / math.sqrt(len(p)) if len(p) > 1 else 1.0
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def prompts_of(feedback: Feedback) -> list[str]:
    """The prompts (text) or classes (images; "" unconditional) fresh outputs are drawn for."""
    counts = Counter(r.prompt for r in feedback.rated) + Counter(p.prompt for p in feedback.pairs)
    return [prompt for prompt, _ in counts.most_common(MAX_PROMPTS)] or [""]


def max_new_tokens_of(feedback: Feedback) -> int:
    """As long as the longest rated continuation (in characters: a bound on its tokens), 8 to 100."""
    lengths = [len(r.output) - len(r.prompt) for r in feedback.rated]
    return min(100, max(8, max(lengths, default=100)))


def bars_of(feedback: Feedback) -> int:
    """Music: as many bars as the rated pieces have most often (pieces of another length read differently)."""
    counts = Counter(bars_of_tokens(r.output.split()) for r in feedback.rated)
    return min(256, max(1, counts.most_common(1)[0][0])) if counts else DEFAULT_BARS


def length_of(modality_name: str, feedback: Feedback) -> dict:
    """The length option fresh outputs are drawn with, as long as the rated ones (images: none)."""
    if modality_name == "text":
        return {"max_new_tokens": max_new_tokens_of(feedback)}
    if modality_name == "music":
        return {"bars": bars_of(feedback)}
    if modality_name == "series":  # as many steps as the rated paths have most often
        counts = Counter(len(json.loads(r.output)) for r in feedback.rated)
        return {"horizon": counts.most_common(1)[0][0] if counts else 12}
    return {}


def draw(modality, loaded, prompt: str, n: int, seed: int, length: dict, reward=None, best_of: int = 1):
    """n fresh outputs of a loaded run for one prompt or class (best-of-k by `reward` when k > 1); `length`: the
    modality's length option (`length_of`)."""
    if modality.NAME == "text":
        options = {"prompt": prompt, "n": n, **length}
    elif modality.NAME == "music":
        options = {"n": n, **length}
    elif modality.NAME == "series":
        options = {"paths": n, **length}
    else:
        options = {"n": n, "class_": prompt or None}
    if best_of > 1:
        outputs = rerank.generate_best_of(modality, loaded, options, seed, best_of, reward).outputs
    else:
        outputs = modality.generate(loaded, options, seed, None).outputs
    return outputs["paths"] if modality.NAME == "series" else outputs


def image_quality(parent, before: list[np.ndarray], after: list[np.ndarray]) -> dict:
    """FID of the parent's and of the new run's fresh images (the same ones judged), each against held-out real
    images of the parent's validation split, in the evaluation's feature space (aigc eval's), with its floor
    (training against held-out images at the same N).

    A taste for some classes moves the class mix, and FID against the held-out split as it is rises with it
    however good each picture is. Where the feature net is a classifier, `fid_matched_*` also compares each side
    with held-out images drawn (seeded, with replacement within a class) to the class mix the net reads in that
    side's images: quality with the mix taken out."""
    configs = build(image_modality.sections(parent.family), read_toml(parent.path / "config.toml"),
                    family=parent.record["family"])
    train, val = image_modality.recorded_split(parent.path, parent.record, configs["data"])
    n = min(len(before), len(after), val.n)
    if n < 3:
        return {}
    out = {"fid_images": n}
    for side, images in (("before", before), ("after", after)):
        fakes = to_tensor(np.stack(images[:n]))
        scored = score_against_data(fakes, train, val)["metrics"]
        out[f"fid_{side}"] = scored["fid"]
        out.setdefault("fid_floor", scored["fid_floor"])
        matched = _class_matched(fakes, train, val)
        if matched is not None:
            out[f"fid_matched_{side}"] = score_against_data(fakes, train, matched)["metrics"]["fid"]
    return out


def _class_matched(fakes: torch.Tensor, train: ImageData, val: ImageData) -> ImageData | None:
    """Held-out images in the class mix the evaluation's classifier reads in `fakes` (None: no classifier)."""
    net, _ = feature_net(train)
    if not net.is_classifier or val.labels is None:
        return None
    with torch.no_grad():
        read = torch.cat([net(fakes[i:i + 500]).argmax(1) for i in range(0, len(fakes), 500)]).numpy()
    generator = np.random.default_rng(0)
    rows = []
    for label in np.unique(read):
        pool = np.flatnonzero(val.labels == label)
        if len(pool) == 0:
            return None
        rows.append(generator.choice(pool, size=int((read == label).sum()), replace=True))
    rows = np.concatenate(rows)
    return ImageData(val.source, val.images[rows], val.labels[rows], val.class_names)


def compare(modality, parent_dir: Path, run_dir: Path, feedback: Feedback, cfg, reward=None) -> dict:
    """The before-and-after metrics of a new run made from `parent_dir` (module docstring); `reward`: the run's
    own (a rerank run), else a judge is fitted on the parent. eval_samples 0: none."""
    if cfg.eval_samples == 0:
        return {}
    with Stage(run_dir, "judging", 2 * cfg.eval_samples, "outputs") as stage:  # the job's view reads its progress
        parent, child = modality.load(str(parent_dir)), modality.load(str(run_dir))
        judge_reward = reward if reward is not None else rerank.fit_for_run(modality.NAME, parent, feedback, cfg)
        return before_after(modality, parent, child, feedback, judge_reward, n_samples=cfg.eval_samples,
                            child_reward=reward, progress=stage.update)


def before_after(modality, parent, child, feedback: Feedback, judge_reward, *, n_samples: int,
                 child_reward=None, progress: Callable[[int], None] | None = None) -> dict:
    """The judged share of liked outputs, parent vs child, with 95% intervals; `parent` and `child` are loaded
    runs; `child_reward` with its best_of: the child generates best-of-k (a rerank run). Outputs are drawn CHUNK
    at a time (each chunk at the seed its first output has in one draw of them all: images come out the same),
    and `progress(n)` is told of every n judged."""
    if n_samples < 1:
        raise BadRequest(f"eval_samples must be >= 1, got {n_samples}")
    prompts = prompts_of(feedback)
    per_prompt = [n_samples // len(prompts) + (i < n_samples % len(prompts)) for i in range(len(prompts))]
    length = length_of(modality.NAME, feedback)
    k = child_reward.info.get("best_of", 1) if child_reward is not None else 1
    out, drawn = {}, {}
    for side, loaded, reward, best_of in (("before", parent, None, 1), ("after", child, child_reward, k)):
        probabilities, drawn[side] = [], []
        for i, (prompt, n) in enumerate(zip(prompts, per_prompt, strict=True)):
            for start in range(0, n, CHUNK):
                m = min(CHUNK, n - start)
                outputs = draw(modality, loaded, prompt, m, FRESH_SEED + 1000 * i + start * best_of, length, reward,
                               best_of)
                scores = judge_reward.score(rerank.features_of(modality.NAME, parent, [prompt] * m, outputs))
                probabilities.append(torch.sigmoid(scores))
                drawn[side] += outputs
                if progress is not None:
                    progress(m)
        share, interval = expected_share(torch.cat(probabilities))
        out[f"liked_share_{side}"], out[f"liked_share_{side}_ci95"] = share, interval
    if modality.NAME == "image":
        out.update(image_quality(parent, drawn["before"], drawn["after"]))
    info = judge_reward.info
    out.update(judged_samples=n_samples, judged_prompts=len(prompts), judge_train_accuracy=info.get("train_accuracy"),
               judge_pair_accuracy=info.get("pair_accuracy"), judge_heldout_accuracy=info.get("heldout_accuracy"),
               judge_heldout_n=info.get("heldout_n"))
    return out
