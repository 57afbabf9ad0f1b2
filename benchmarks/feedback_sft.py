"""Image sft, measured variant by variant against one parent and one round of ratings: benchmarks/feedback.py's quick
image setting (a 3000-step VAE on Fashion-MNIST, 200 ratings of the scripted user who likes sneakers and ankle
boots), built once and kept in --home, then each variant made from it as `aigc optimize --method sft --set ...` makes
it (or, for the diagnosis, `aigc train --init-from` on the data alone), and judged as feedback.py judges a new run:
the share of 200 fresh images (seeds 50_000 ...) the user likes, with its 95% Wilson interval and the one-sided
z-test against the parent's; FID of 500 fresh images against the parent's held-out images (plain, and in each
side's own class mix), as the optimized run's report measures it. Tolerance: plain FID at most 25% above the
parent's.

    python benchmarks/feedback_sft.py [--home DIR] [--variant NAME ...] [--out benchmarks/results]

Results: results/feedback-sft.{json,md}; every row measured in a --home is kept there (rows.jsonl), so variants run
one at a time add up to one table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, describe_machine, fmt, machine, write_results

sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

FRESH, FRESH_SEED = 200, 50_000  # the user's judgement, as benchmarks/feedback.py draws it
FID_IMAGES = 500
FID_TOLERANCE = 0.25
CONTINUE = {"warmup_steps": "10", "eval_interval": "25", "keep_best": "false", "compile": "false"}  # sft's [train]
# name -> (how it is made: "sft" or "continue" on the data alone, --set keys, steps)
VARIANTS = {
    "sft (the old default: lr 1e-3, 1000 steps)": ("sft", {}, 1000),
    "continue on the data alone (lr 1e-3, 1000 steps)": ("continue", {}, 1000),
    "the data tilted as first-liked of 3, no rated images (tilt 3, feedback_share 0)":
        ("sft", {"tilt": "3", "feedback_share": "0"}, 1000),
    "lr 1e-4, 2000 steps": ("sft", {"lr": "1e-4"}, 2000),
    "anchor 10 (L2 pull to the parent's weights)": ("sft", {"anchor": "10"}, 1000),
    "tilt 4, feedback_share 0": ("sft", {"tilt": "4", "feedback_share": "0"}, 1000),
    "tilt 3, feedback_share 0.1": ("sft", {"tilt": "3", "feedback_share": "0.1"}, 1000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", help="a directory to keep the parent, its ratings and the rows in (default: a "
                                       "temporary one)")
    parser.add_argument("--variant", action="append", help="a name of VARIANTS (a prefix will do); default: all")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    names = list(VARIANTS)
    if args.variant:
        names = [next(n for n in VARIANTS if n.startswith(v)) for v in args.variant]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aigc-sft-") as tmp:
        home = Path(args.home or tmp)
        home.mkdir(parents=True, exist_ok=True)
        rows = measure(home, names)
    result = {"machine": machine(), "seconds": time.perf_counter() - t0, "rows": rows}
    lines = ["# Image sft: variants against one parent and one round of 200 ratings", "",
             f"{describe_machine(result['machine'])}; {result['seconds']:.0f} s for the variants run this time.", "",
             "| variant | steps | liked (200) | p | FID plain | vs parent | FID class mix | vs parent | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["liked_ci95"]
        lines.append(f"| {r['variant']} | {r['steps']} | {r['liked']:.3f} [{lo:.3f}, {hi:.3f}] | {r['p_value']:.2g} | "
                     f"{fmt(r['fid_after'])} | {r['fid_ratio'] - 1:+.0%} | {fmt(r['fid_matched_after'])} | "
                     f"{r['fid_matched_ratio'] - 1:+.0%} | {'yes' if r['met'] else 'no'} |")
    if rows:
        r = rows[0]
        lines += ["", f"The parent: liked {r['parent_liked']:.3f}, FID {fmt(r['fid_before'])} (class mix "
                      f"{fmt(r['fid_matched_before'])}). Met: liked share up with p < 0.01 and plain FID at most "
                      f"{FID_TOLERANCE:.0%} above the parent's."]
    text = "\n".join(lines) + "\n"
    write_results(args.out, "feedback-sft", result, text)
    print(text)


def measure(home: Path, names: list[str]) -> list[dict]:
    os.environ["AIGC_HOME"] = str(home)
    import feedback as bench

    from aigc import service
    from aigc.modalities import image as im
    from aigc.optimize import judge
    from aigc.store import read_run

    bench.image_parent(home)  # the benchmark's parent and ratings, through its own code
    cached = home / "user-classifier.pickle"  # the user's eyes, trained once a home (minutes on a busy machine)
    if cached.is_file():
        clf = pickle.loads(cached.read_bytes())
    else:
        clf, _ = bench.user_classifier()
        cached.write_bytes(pickle.dumps(clf))
    parent = im.load(str(home / "runs" / "closet"))

    def liked(loaded) -> int:
        images = im.generate(loaded, {"n": FRESH, "class_": None}, FRESH_SEED, None).outputs
        return int(np.isin(clf.predict(np.stack(images).reshape(FRESH, -1) / 255.0), bench.LIKED_CLASSES).sum())

    k0 = liked(parent)
    before = im.generate(parent, {"n": FID_IMAGES, "class_": None}, judge.FRESH_SEED, None).outputs
    rows_file = home / "rows.jsonl"
    for name in names:
        how, sets, steps = VARIANTS[name]
        # a variant's run is named by what makes it: one already made in --home (done) is judged, not made again
        run = "v-" + hashlib.sha256(json.dumps([how, sets, steps], sort_keys=True).encode()).hexdigest()[:10]
        t0 = time.perf_counter()
        if (read_run(home / "runs" / run) if (home / "runs" / run).is_dir() else {}).get("status") == "done":
            pass
        elif how == "sft":
            service.optimize("closet", "sft", name=run, overwrite=True, max_steps=steps,
                             sets={"eval_samples": "0", **sets})
        else:
            service.train("vae", "fashion-mnist", name=run, overwrite=True, max_steps=steps,
                          init_from=str(home / "runs" / "closet"), sets={**CONTINUE, **sets})
        seconds = time.perf_counter() - t0
        child = im.load(str(home / "runs" / run))
        after = im.generate(child, {"n": FID_IMAGES, "class_": None}, judge.FRESH_SEED, None).outputs
        fid = judge.image_quality(parent, before, after)
        k1 = liked(child)
        p = bench.z_test(k0, FRESH, k1, FRESH)
        row = {"variant": name, "how": how, "sets": sets, "steps": steps, "seconds": seconds,
               "parent_liked": k0 / FRESH, "liked": k1 / FRESH, "liked_ci95": bench.wilson(k1, FRESH), "p_value": p,
               **fid, "fid_ratio": fid["fid_after"] / fid["fid_before"],
               "fid_matched_ratio": fid["fid_matched_after"] / fid["fid_matched_before"]}
        row["met"] = p < 0.01 and row["fid_ratio"] <= 1 + FID_TOLERANCE
        print(json.dumps(row), file=sys.stderr)
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
    kept = {}
    for line in rows_file.read_text().splitlines() if rows_file.exists() else []:
        row = json.loads(line)
        kept[row["variant"]] = row  # the latest measurement of each
    return [kept[n] for n in VARIANTS if n in kept]


if __name__ == "__main__":
    main()
