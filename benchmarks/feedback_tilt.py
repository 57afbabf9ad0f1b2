"""Does `tilt`'s reward, fitted on the parent's own rated samples, judge real training images as the scripted user
would? Two checks that read no scripted user's rule inside `aigc optimize`, only here, to score it:

    python benchmarks/feedback_tilt.py [--home DIR] [--skip-digits] [--skip-fashion] [--digit-parents 400,3000]

- digits (tests/test_optimize.py's setting): a VAE on scikit-learn's digits (400 steps, the tests' parent, and 3000
  steps), 160 of its images rated by a user who likes digits brighter than the median of the parent's images. For
  each parent: how the brightness of real digits, of their reconstructions and of the parent's samples spreads; then
  300 sft steps on the data alone (`feedback_share` 0) against the same with `tilt` 3 (judged through the
  reconstructions, as `aigc optimize` does), the bright share of 200 fresh images of each.
- fashion (benchmarks/feedback.py's quick image parent and its 200 ratings, made once in DIR by feedback.py's own
  code): the reward fitted on the ratings judges the 60,000 real training images, each by itself and by the parent's
  reconstruction; their true labels (sneaker, ankle boot) score it: precision and recall of "liked", and the
  footwear share of the data as tilt 2 and tilt 3 draw it (the data's own: 0.200).
Results: results/feedback-tilt.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, describe_machine, machine, write_results

sys.path.insert(0, str(ROOT.parent / "src"))

DIGIT_SETS = {"z_dim": "4", "base_channels": "8", "batch_size": "32", "eval_interval": "200", "warmup_steps": "2",
              "dtype": "fp32"}  # the tests' parent (tests/test_optimize.py, rated_pictures)
DIGIT_PARENTS = (400, 3000)  # steps
SFT_STEPS = 300
FOOTWEAR = (7, 9)  # Fashion-MNIST's sneaker and ankle boot: benchmarks/feedback.py's LIKED_CLASSES


def brightness(image: np.ndarray) -> float:
    return float(image.mean())


def digits(home: Path, steps: int) -> dict:
    """One digits parent of `steps` steps, rated; the spreads and the two sft runs (module docstring)."""
    from aigc import service
    from aigc.data.images import to_tensor, to_uint8
    from aigc.db import Store
    from aigc.errors import BadRequest
    from aigc.modalities import image as image_modality
    from aigc.optimize.image import as_the_parent_draws

    os.environ["AIGC_HOME"] = str(home)
    service.train("vae", "digits", name="pics", max_steps=steps, sets=DIGIT_SETS)
    made = service.generate("pics", {"n": 160}, seed=0)
    cut = float(np.median([brightness(p) for p in made.outputs]))
    with Store() as db:
        ids = service.record(made, db, source="api", request={"endpoint": "images", "n": 160})
        for gen_id, pixels in zip(ids, made.outputs, strict=True):
            db.add_rating(gen_id, score=1 if brightness(pixels) > cut else -1)
    loaded = image_modality.load("pics")
    train, _ = image_modality.recorded_split(loaded.path, loaded.record, loaded.configs["data"])
    recon = to_uint8(as_the_parent_draws(loaded, to_tensor(train.images), None))
    spreads = {name: float(np.std([brightness(p) for p in images]))
               for name, images in (("real", train.images), ("reconstructions", recon), ("samples", made.outputs))}

    def bright_share(run: str) -> float:
        images = service.generate(run, {"n": 200}, seed=50_000).outputs
        return sum(brightness(p) > cut for p in images) / len(images)

    row = {"parent_steps": steps, "cut": cut, "brightness_std": spreads,
           "reconstructions_above_cut": float(np.mean([brightness(p) > cut for p in recon])),
           "real_above_cut": float(np.mean([brightness(p) > cut for p in train.images])),
           "parent": bright_share("pics")}
    for name, sets in (("data_alone", {"feedback_share": "0"}), ("tilt3", {"feedback_share": "0", "tilt": "3"})):
        try:
            run_dir, metrics = service.optimize("pics", "sft", name=f"pics-{name}", max_steps=SFT_STEPS,
                                                sets={**sets, "eval_samples": "0"})
            row[name] = bright_share(run_dir.name)
            row[f"{name}_tilt_liked_share"] = metrics.get("tilt_liked_share")
        except BadRequest as e:  # tilt refused: the reward likes none (or all) of the training images
            row[name] = None
            row[f"{name}_refused"] = str(e)
    return row


def fashion(home: Path) -> dict:
    """The reward of benchmarks/feedback.py's quick image parent judging the real training images (module
    docstring)."""
    import feedback
    import torch

    from aigc.data.images import to_tensor
    from aigc.db import Store
    from aigc.modalities import image as image_modality
    from aigc.optimize import feedback as fb
    from aigc.optimize import rerank
    from aigc.optimize.image import as_the_parent_draws, tilted_weights

    os.environ["AIGC_HOME"] = str(home)
    feedback.image_parent(home)
    loaded = image_modality.load("closet")
    with Store() as db:
        ratings = fb.collect(db, "closet", "image")
    reward = rerank.fit_from_feedback("image", loaded, ratings, l2=0.01)
    train, _ = image_modality.recorded_split(loaded.path, loaded.record, loaded.configs["data"])
    x = to_tensor(train.images)
    truth = torch.from_numpy(np.isin(train.labels, FOOTWEAR))
    out = {"n": len(x), "footwear_share": float(truth.double().mean()), "rated_liked": len(ratings.liked),
           "rated_disliked": len(ratings.disliked)}
    for view, images in (("image", x), ("reconstruction", None)):
        t0 = time.perf_counter()
        judged = as_the_parent_draws(loaded, x, None) if images is None else images
        liked = reward.score(rerank.pixel_features(loaded, judged)) > 0
        hits = int((liked & truth).sum())
        out[view] = {"judged_liked": float(liked.double().mean()), "precision": hits / max(1, int(liked.sum())),
                     "recall": hits / int(truth.sum()), "seconds": time.perf_counter() - t0,
                     **{f"tilt{k}_footwear": float((tilted_weights(liked, k) * truth).sum()
                                                    / tilted_weights(liked, k).sum()) for k in (2, 3)}}
    return out


def table(result: dict) -> str:
    lines = ["# tilt's reward on real training images", "", f"{describe_machine(result['machine'])}; "
             f"{result['seconds']:.0f} s in all.", ""]
    if result.get("digits"):
        lines += ["Digits (the tests' user likes digits brighter than the parent's median image). Bright share of "
                  f"200 fresh images; sft runs {SFT_STEPS} steps from the parent.", "",
                  "| parent steps | brightness std: real / reconstructions / samples | reconstructions above the cut "
                  "| parent | data alone | tilt 3 (judged by reconstructions) |", "|---|---|---|---|---|---|"]
        for r in result["digits"]:
            s = r["brightness_std"]
            tilt = f"{r['tilt3']:.3f}" if r["tilt3"] is not None else "refused (none judged liked)"
            lines.append(f"| {r['parent_steps']} | {s['real']:.2f} / {s['reconstructions']:.2f} / {s['samples']:.2f} "
                         f"| {r['reconstructions_above_cut']:.3f} | {r['parent']:.3f} | {r['data_alone']:.3f} "
                         f"| {tilt} |")
    if result.get("fashion"):
        f = result["fashion"]
        lines += ["", f"Fashion-MNIST (benchmarks/feedback.py's quick parent, {f['rated_liked']} of "
                      f"{f['rated_liked'] + f['rated_disliked']} rated images liked): the reward judging the "
                      f"{f['n']} real training images, scored by their labels (footwear share "
                      f"{f['footwear_share']:.3f}).", "",
                  "| judged by | judged liked | precision | recall | footwear drawn by tilt 2 | by tilt 3 | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for view in ("image", "reconstruction"):
            v = f[view]
            lines.append(f"| {view} | {v['judged_liked']:.3f} | {v['precision']:.3f} | {v['recall']:.3f} "
                         f"| {v['tilt2_footwear']:.3f} | {v['tilt3_footwear']:.3f} | {v['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", help="where the fashion parent is made once and reused (default: a temp dir)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-fashion", action="store_true")
    parser.add_argument("--digit-parents", default=",".join(map(str, DIGIT_PARENTS)), help="the digits parents' steps")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = {"machine": machine()}
    if not args.skip_digits:
        result["digits"] = []
        for steps in [int(v) for v in args.digit_parents.split(",")]:
            with tempfile.TemporaryDirectory(prefix="aigc-tilt-") as tmp:
                result["digits"].append(digits(Path(tmp), steps))
                print(json.dumps(result["digits"][-1]), file=sys.stderr)
    if not args.skip_fashion:
        with tempfile.TemporaryDirectory(prefix="aigc-tilt-") as tmp:
            result["fashion"] = fashion(Path(args.home) if args.home else Path(tmp))
    result["seconds"] = time.perf_counter() - t0
    write_results(args.out, "feedback-tilt", result, table(result))
    print(table(result))


if __name__ == "__main__":
    main()
