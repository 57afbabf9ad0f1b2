"""`aigc eval`: score a run on its recorded validation split and sample from it; write eval.json
and report.html."""

from __future__ import annotations

import json
import math
from pathlib import Path

from aigc.errors import UserError
from aigc.fsutil import write_json

DIVERSITY_SAMPLES = 16  # N samples ...
DIVERSITY_TOKENS = 64  # ... of up to L new tokens each, at seed 0, for diversity and novelty


def evaluate_run(spec: str) -> dict:
    from aigc.data.text import join_docs
    from aigc.evaluate.text import text_sample_metrics, write_report
    from aigc.runs import LN2, find_run, load_split, n_scored_chars, read_run
    from aigc.sample import GenerateSettings, generate, load_run

    run_dir = find_run(spec)
    record = read_run(run_dir)
    if record.get("modality") == "image":
        return evaluate_image_run(run_dir, record)
    loaded = load_run(str(run_dir))
    train_docs, val_docs = load_split(run_dir)

    # 1. likelihood of the validation split recorded in the run
    val_ids = loaded.tokenizer.encode_docs(val_docs)
    nll, n_tokens = loaded.nll(val_ids)
    chars = n_scored_chars(val_docs)
    val_loss = nll / max(1, n_tokens)

    # 2. samples at seed 0 with the default decoding settings (temperature 1: the model as it is)
    settings = GenerateSettings(n=DIVERSITY_SAMPLES, seed=0, max_new_tokens=DIVERSITY_TOKENS, temperature=1.0)
    context = loaded.max_context
    if context is not None:
        settings.max_new_tokens = min(settings.max_new_tokens, context - 1)
    samples, stats = generate(loaded, settings)

    # 3. diversity and novelty of the samples against the training text
    train_text = join_docs(train_docs)
    if all(not s for s in samples):
        raise UserError(f"run {run_dir.name}: every sample was empty (the model ends every text at once)")
    sample_metrics = text_sample_metrics(samples, train_text)
    metrics = {
        "val_bpc": nll / LN2 / chars,
        "val_loss": val_loss,
        "perplexity": math.exp(min(val_loss, 700)),
        **sample_metrics,
        "tokens_per_s": stats["tokens_per_s"],
    }
    result = {
        "run": str(run_dir),
        "metrics": metrics,
        "samples": {"n": settings.n, "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
                    "temperature": settings.temperature, "generated_tokens": stats["generated_tokens"]},
        "validation": {"tokens": n_tokens, "chars": chars, "docs": len(val_docs)},
    }
    write_json(run_dir / "eval.json", result)
    curves = _read_curves(run_dir / "metrics.jsonl")
    write_report(run_dir / "report.html", title=f"{run_dir.name}: {record['family']} on "
                 f"{record['data']['train']['source']}", metrics=metrics, samples=samples[:8],
                 curves=curves, settings={**result["samples"], "family": record["family"],
                                          "dtype": record.get("dtype", "fp32")})
    return result


def _read_curves(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r or "val_loss" in r]


EVAL_IMAGES = 2000  # N generated images scored against N real ones (fewer when the data has fewer)


def evaluate_image_run(run_dir: Path, record: dict, n: int = EVAL_IMAGES) -> dict:
    """Score an image run in the feature space of the project's own classifier (or, for unlabelled
    data, autoencoder), trained once on the run's training split and cached: FID, KID, precision,
    recall, classifier score, per-class FID (conditional runs), a memorisation check, and every
    metric's floor (real training images vs held-out ones at the same N); plus the family's
    validation objective and the sampling speed."""
    import time

    import torch

    from aigc.config import build, read_toml
    from aigc.data.images import to_tensor
    from aigc.evaluate.images import feature_net, floors, image_metrics
    from aigc.image_runs import labels_of, recorded_split, score_images
    from aigc.runs import family_of, sections_for
    from aigc.train import ImageBatches

    family = record["family"]
    configs = build(sections_for(family), read_toml(run_dir / "config.toml"), family=family)
    train_set, val_set = recorded_split(run_dir, record, configs["data"])
    conditional = configs["data"].conditional
    x_train, x_val = to_tensor(train_set.images), to_tensor(val_set.images)
    model = family_of(family).load(run_dir).eval()
    metrics = {}
    if family == "vae":
        metrics.update(score_images(model, ImageBatches(x_train[:1], None, x_val, labels_of(val_set, conditional))))

    # 1. the feature net of the training split (cached under $AIGC_HOME/cache/features/)
    net, net_info = feature_net(train_set, test=val_set)

    # 2. N generated images (class-balanced for conditional runs), timed, against N held-out real ones
    n = min(n, len(x_val))
    if n < 3:
        raise UserError(f"{run_dir.name}: {n} held-out images are too few to score; give --val-data when training")
    k = min(3, n - 1)  # k-NN radii of precision/recall need k < N
    num_classes = record.get("num_classes") or 0
    fake_labels = torch.arange(n) % num_classes if num_classes else None
    fakes = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, 250):
            y = None if fake_labels is None else fake_labels[i:i + 250]
            fakes.append(model.sample(min(250, n - i), generator=torch.Generator().manual_seed(i), y=y))
    images_per_s = n / (time.perf_counter() - t0)
    real_labels = None if val_set.labels is None else torch.as_tensor(val_set.labels[:n])
    scores = image_metrics(x_val[:n], torch.cat(fakes), net, real_labels=real_labels if num_classes else None,
                           fake_labels=fake_labels, train_for_memorization=x_train, heldout=x_val[:n], k=k)
    floor = floors(x_train, x_val, net, n, k=k)
    metrics.update(scores)
    metrics.update({f"{k}_floor": v for k, v in floor.items() if isinstance(v, float)})
    metrics["images_per_s"] = images_per_s
    result = {"run": str(run_dir), "metrics": metrics, "n": n,
              "feature_net": {k: net_info.get(k) for k in ("kind", "num_features", "test_accuracy", "test_mse",
                                                           "cached", "path")}}
    write_json(run_dir / "eval.json", result)
    return result
