"""`aigc eval`: score a run on its recorded validation split and sample from it; write eval.json
and report.html. `aigc eval --images FOLDER --data D` scores a folder of images as an image run on
D is scored (`evaluate_image_folder`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from aigc.errors import UserError
from aigc.fsutil import write_json

DIVERSITY_SAMPLES = 16  # N samples ...
DIVERSITY_TOKENS = 64  # ... of up to L new tokens each, at seed 0, for diversity and novelty
MIN_VERSE_LINES = 20  # the verse form is reported for runs whose training text has at least this many verse lines


def evaluate_run(spec: str, n: int | None = None) -> dict:
    """Score a run and write eval.json (and, for text, report.html) into it. `n`: image runs only,
    the number of generated images scored (default EVAL_IMAGES, at most the held-out images)."""
    from aigc.data.text import join_docs
    from aigc.evaluate.text import text_sample_metrics, verse_form, verse_lines, write_report
    from aigc.runs import LN2, n_scored_chars, read_val, trained_on
    from aigc.sample import GenerateSettings, generate, load_run
    from aigc.store import find_run, read_run

    run_dir = find_run(spec)
    record = read_run(run_dir)
    if record.get("modality") == "series":
        if n is not None:
            raise UserError("-n does not apply to series runs")
        from aigc.evaluate.series import evaluate_series_run

        return evaluate_series_run(str(run_dir))
    if record.get("modality") == "image":
        if n is not None and n < 3:
            raise UserError(f"-n must be at least 3, got {n}")
        return evaluate_image_run(run_dir, record, EVAL_IMAGES if n is None else n)
    if n is not None:
        raise UserError("-n applies to image runs: a text run is scored on its whole validation split")
    loaded = load_run(str(run_dir))
    val_docs = read_val(run_dir)
    texts, unknown = trained_on(run_dir)  # the run's training split, and its --init-from ancestors'
    own_train = texts[0][1]
    train_docs = [doc for _, docs in texts for doc in docs]

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

    # 3. diversity and novelty of the samples against all the text the weights were trained on
    train_text = join_docs(train_docs)
    if all(not s for s in samples):
        raise UserError(f"run {run_dir.name}: every sample was empty (the model ends every text at once)")
    sample_metrics = text_sample_metrics(samples, train_text)
    # 4. verse form (Chinese verse: lines of 5 or 7 characters), of the samples and of the run's own training text
    if len(verse_lines(own_train)) >= MIN_VERSE_LINES:
        sample_metrics.update(verse_form=verse_form(samples), verse_form_train=verse_form(own_train))
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
        "copying_measured_against": {"runs": [source for source, _ in texts], "chars": sum(len(d) for d in train_docs),
                                     "unknown_checkpoint": unknown},
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
    validation objective and the sampling speed. Writes eval.json into the run."""
    import time

    import torch

    from aigc.config import build, read_toml
    from aigc.data.images import to_tensor
    from aigc.evaluate.images import score_against_data
    from aigc.image_runs import labels_of, recorded_split, score_images
    from aigc.runs import family_of, sections_for
    from aigc.train import ImageBatches

    family = record["family"]
    configs = build(sections_for(family), read_toml(run_dir / "config.toml"), family=family)
    train_set, val_set = recorded_split(run_dir, record, configs["data"])
    conditional = configs["data"].conditional
    model = family_of(family).load(run_dir).eval()
    metrics = {}
    if family == "vae":
        x_train, x_val = to_tensor(train_set.images[:1]), to_tensor(val_set.images)
        metrics.update(score_images(model, ImageBatches(x_train, None, x_val, labels_of(val_set, conditional))))

    # 1. N generated images (class-balanced for conditional runs), timed
    n = min(n, val_set.n)
    if n < 3:
        raise UserError(f"{run_dir.name}: {n} held-out images are too few to score; give --val-data when training")
    num_classes = record.get("num_classes") or 0
    fake_labels = torch.arange(n) % num_classes if num_classes else None
    fakes = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, 250):
            y = None if fake_labels is None else fake_labels[i:i + 250]
            fakes.append(model.sample(min(250, n - i), generator=torch.Generator().manual_seed(i), y=y))
    images_per_s = n / (time.perf_counter() - t0)

    # 2. against N held-out real images, in the feature space of the training split's net
    scored = score_against_data(torch.cat(fakes), train_set, val_set, fake_labels=fake_labels)
    metrics.update(scored["metrics"])
    metrics["images_per_s"] = images_per_s
    result = {"run": str(run_dir), "metrics": metrics, "n": n, "feature_net": scored["feature_net"]}
    write_json(run_dir / "eval.json", result)
    return result


def evaluate_image_folder(folder: str, data: str, n: int = EVAL_IMAGES, *, out: str | None = None) -> dict:
    """Score a folder of images against data set `data` as a run trained on it is scored.

    The data set (a named set, a folder or an array file, split as `aigc train` splits it) sets
    the image size and channels: the folder's images are converted to its channels and resized
    to its size (when it is square; else they must have its size already). N = min(n, images in
    the folder, held-out images); a larger folder gives N images drawn at random (seed 0), so that
    every class sub-folder is represented. When the folder's class sub-folders are all class
    names of the data set, FID is also reported per class. The grid.png that `aigc generate`
    writes beside 000.png ... is not a sample, and is left out. Nothing is written into the
    folder; `out` names a JSON file for the result.

    Returns {"images", "data", "metrics", "n", "feature_net"}: the metrics of `evaluate_image_run`
    less the family's own (val_nelbo) and the sampling speed.
    """
    import torch

    from aigc.config import ImageDataConfig
    from aigc.data.images import load_images, to_tensor
    from aigc.evaluate.images import score_against_data
    from aigc.image_runs import load_image_split

    path = Path(folder).expanduser()
    if not path.exists():
        raise UserError(f"--images: no such folder: {folder}")
    if n < 3:
        raise UserError(f"-n must be at least 3, got {n}")
    train_set, val_set = load_image_split(data, None, ImageDataConfig())
    square = train_set.height == train_set.width
    grids = sorted(path.rglob("grid.png")) if path.is_dir() else []  # `aigc generate --out path[/class]`'s
    skip = tuple(g.relative_to(path).as_posix() for g in grids if (g.parent / "000.png").is_file())
    images = load_images(str(path), channels=train_set.channels, image_size=train_set.height if square else None,
                         skip=skip)
    if images.images.shape[1:] != train_set.images.shape[1:]:
        h, w = images.images.shape[1:3]
        raise UserError(f"{path}: images are {w}x{h}, {data}'s are {train_set.width}x{train_set.height}: "
                        f"resize them to {train_set.width}x{train_set.height}")
    n = min(n, images.n, val_set.n)
    if n < 3:
        raise UserError(f"{n} images are too few to score (at least 3: {images.n} in {path}, "
                        f"{val_set.n} held out in {data})")
    chosen = torch.randperm(images.n, generator=torch.Generator().manual_seed(0))[:n].sort().values
    fake_labels = None
    if images.class_names is not None and train_set.class_names is not None and \
            set(images.class_names) <= set(train_set.class_names):
        to_data = torch.tensor([train_set.class_names.index(name) for name in images.class_names])
        fake_labels = to_data[torch.from_numpy(images.labels)[chosen]]  # the folder's label -> the data set's
    scored = score_against_data(to_tensor(images.images[chosen.numpy()]), train_set, val_set, fake_labels=fake_labels)
    result = {"images": str(path.resolve()), "data": data, **scored}
    if out is not None:
        write_json(Path(out).expanduser(), result)
    return result
