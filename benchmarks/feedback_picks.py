"""Which of best-of-k's candidates an image rerank run keeps, measured offline on benchmarks/feedback.py's quick image
setting: the same parent (a 3000-step VAE on Fashion-MNIST) and the same 200 ratings of the scripted user (likes
sneakers and ankle boots), then, from one pool of 8 x 500 candidates of the parent (seeds 1_000_003 ...), 500 images
kept by each rule: the share the user likes, FID against the parent's first 500 held-out images, and FID against
held-out images in the kept images' own class mix (both in the evaluation's feature space, as the judge reports them).

    python benchmarks/feedback_picks.py [--home DIR] [--out benchmarks/results]

Rules: best (the highest reward of k; also of the reward plus the log of the feature net's top class probability),
first-liked (the first the reward judges liked, else the first), sampling in proportion to the reward's probability
of "liked", or to exp(score / T). Results: results/feedback-picks.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, ROOT, describe_machine, machine, write_results

sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

N, KS = 500, (2, 3, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", help="a directory to keep the parent and its ratings in (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aigc-picks-") as tmp:
        home = Path(args.home or tmp)
        home.mkdir(parents=True, exist_ok=True)
        rows = measure(home)
    result = {"machine": machine(), "seconds": time.perf_counter() - t0, "rows": rows}
    lines = ["# Best of k for images: which candidate to keep", "",
             f"{describe_machine(result['machine'])}; {result['seconds']:.0f} s in all.", "",
             "| rule | k | liked | FID | FID in the kept images' class mix |", "|---|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['k']} | {r['liked']:.3f} | {r['fid']:.3f} | {r['fid_matched']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    write_results(args.out, "feedback-picks", result, text)
    print(text)


def measure(home: Path) -> list[dict]:
    os.environ["AIGC_HOME"] = str(home)
    import feedback as bench

    from aigc.config import build, read_toml
    from aigc.data.images import to_tensor
    from aigc.db import Store
    from aigc.evaluate.images import extract_features, feature_net, fid_from_features
    from aigc.modalities import image as im
    from aigc.optimize import feedback as fbk
    from aigc.optimize import rerank

    bench.image_parent(home)  # the benchmark's parent and ratings, through its own code
    clf, _ = bench.user_classifier()
    parent = im.load(str(home / "runs" / "closet"))
    with Store() as db:
        reward = rerank.fit_from_feedback("image", parent, fbk.collect(db, "closet", "image"), l2=0.01)
    imgs = np.stack(im.generate(parent, {"n": N * max(KS), "class_": None}, 1_000_003, None).outputs)
    configs = build(im.sections(parent.family), read_toml(parent.path / "config.toml"), family=parent.record["family"])
    train, val = im.recorded_split(parent.path, parent.record, configs["data"])
    net, _ = feature_net(train)
    x = to_tensor(imgs)
    feats = extract_features(net, x)
    with torch.no_grad():
        logits = torch.cat([net(x[i:i + 500]) for i in range(0, len(x), 500)])
    read = logits.argmax(1).numpy()
    typical = torch.log_softmax(logits.double(), 1).max(1).values  # log of the feature net's top class probability
    real = extract_features(net, to_tensor(val.images[:N]))
    s = reward.score(rerank.image_features(parent, list(imgs))).double()
    liked = np.isin(clf.predict(imgs.reshape(len(imgs), -1) / 255.0), bench.LIKED_CLASSES)

    def matched(rows: np.ndarray) -> float:
        generator, picked = np.random.default_rng(0), []
        for label in np.unique(read[rows]):
            pool = np.flatnonzero(val.labels == label)
            picked.append(generator.choice(pool, size=int((read[rows] == label).sum()), replace=True))
        return fid_from_features(extract_features(net, to_tensor(val.images[np.concatenate(picked)])), feats[rows])

    out = []

    def row(rule: str, k: int, rows: list[int]) -> None:
        rows = np.asarray(rows)
        out.append({"rule": rule, "k": k, "liked": float(liked[rows].mean()),
                    "fid": fid_from_features(real, feats[rows]), "fid_matched": matched(rows)})
        print(out[-1], file=sys.stderr)

    generator = torch.Generator().manual_seed(0)
    row("parent", 1, list(range(N)))
    for k in KS:
        groups = np.arange(N * k).reshape(N, k)  # as generation: group g holds candidates g * k .. g * k + k - 1
        row("best", k, [g[int(s[g].argmax())] for g in groups])
        row("first-liked", k, [next((i for i in g if s[i] > 0), g[0]) for g in groups])
        row("sample by P(liked)", k, [g[int(torch.multinomial(torch.sigmoid(s[g]), 1, generator=generator))]
                                      for g in groups])
        row("best of score + log top class probability", k, [g[int((s[g] + typical[g]).argmax())] for g in groups])
        for t in (1.0, 3.0):
            row(f"sample by exp(score / {t:g})", k,
                [g[int(torch.multinomial(torch.softmax(s[g] / t, 0), 1, generator=generator))] for g in groups])
    return out


if __name__ == "__main__":
    main()
