"""Image runs: train an image family, generate PNGs that carry their generation record, score a run.

The run directory follows the text runs (docs/runs.md): run.json, config.toml, the best weights
with a manifest, metrics.jsonl, checkpoints/last/, and `samples/step-NNNNNN.png`, a grid saved at
every evaluation so a user sees the model improve.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from aigc import __version__, store
from aigc.checkpoint import find_checkpoint, verify_manifest
from aigc.config import build, read_toml, to_toml
from aigc.data.images import ImageData, load_images, make_grid, read_png_record, save_png, to_tensor, to_uint8
from aigc.distributed import on_main
from aigc.errors import UserError
from aigc.fsutil import atomic_write_text, write_json
from aigc.models import Family

GRID_SEED = 0  # training grids use fixed latents, so consecutive grids show the same samples improving
GRID_SIZE = 64
MAX_IMAGES = 10_000  # `aigc generate -n` cap


def train_images(fam: Family, family: str, data: str, *, val_data: str | None, name: str | None, overwrite: bool,
                 resume: bool, budget: tuple[int | None, float | None], config_file: str | None,
                 sets: dict[str, str], header: dict) -> tuple[Path, dict]:
    from aigc import runs
    from aigc.train import Budget, ImageBatches, train_loop

    if resume:
        run_dir = store.runs_dir() / name
        if not (run_dir / "run.json").is_file():
            raise UserError(f"--resume: no run named {name!r} in {store.runs_dir()}")
        if sets or config_file or val_data:
            raise UserError("--resume continues with the run's recorded configuration and data; "
                            "drop --set/--config/--val-data")
        record = store.read_run(run_dir)
        if record["family"] != family:
            raise UserError(f"run {name!r} is a {record['family']} run, not {family}")
        configs = build(runs.sections_for(family), read_toml(run_dir / "config.toml"), family=family)
        train_set, val_set = recorded_split(run_dir, record, configs["data"])
        model = fam.load(on_main(find_checkpoint, run_dir))  # the main process tidies an interrupted save
    else:
        values = dict(read_toml(Path(config_file))) if config_file else {}
        values.update(sets)
        configs = build(runs.sections_for(family), values, family=family)
        # several processes: one name for all, the main process alone writes the run (docs/runs.md)
        final_dir = on_main(store.claim_run_dir, family, data, name, overwrite)
        train_set, val_set = load_image_split(data, val_data, configs["data"])
        if configs["data"].conditional and train_set.labels is None:
            raise UserError(f"--conditional needs class labels, and {data} has none (use class sub-folders)")
        num_classes = train_set.num_classes if configs["data"].conditional else 0
        image_shape = (train_set.channels, train_set.height, train_set.width)
        torch.manual_seed(configs["train"].seed)  # the initial weights depend on the seed alone
        try:
            model = fam.build(configs["model"], image_shape, num_classes)
        except ValueError as e:
            raise UserError(f"{family}: {e}") from None
        record = {
            "family": family, "modality": "image", "created": store.now(), "aigc_version": __version__,
            "image_shape": list(image_shape), "num_classes": num_classes,
            "class_names": list(train_set.class_names) if train_set.class_names else None,
            "data": {"train": _describe(train_set, train_set.source),
                     "val": _describe(val_set, val_data or ("held out" if Path(data).exists() else "test split"))},
        }

        def write_files(staging: Path) -> None:
            write_json(staging / "run.json", record)
            atomic_write_text(staging / "config.toml", to_toml(configs, header))

        run_dir = on_main(store.commit_run_dir, final_dir, write_files)

    max_steps, max_minutes = budget
    record["budget"] = {"max_steps": max_steps, "max_minutes": max_minutes}
    record["status"] = "running"
    on_main(write_json, run_dir / "run.json", record)
    cfg = configs["data"]
    labels = cfg.conditional
    batches = ImageBatches(to_tensor(train_set.images), labels_of(train_set, labels), to_tensor(val_set.images),
                           labels_of(val_set, labels), hflip=cfg.hflip)
    grid_classes = _grid_classes(record["num_classes"])

    def save_grid(model, step: int) -> None:
        model.eval()
        with torch.no_grad():
            x = model.sample(GRID_SIZE, generator=torch.Generator().manual_seed(GRID_SEED), y=grid_classes)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_png(run_dir / "samples" / f"step-{step:06d}.png", make_grid(to_uint8(x)))

    with runs.recording_failure(run_dir, record):
        fit = train_loop(model, batches, configs["train"], run_dir, Budget(max_steps, max_minutes),
                         resume=resume, cpu_bf16=fam.cpu_bf16, compile_gain=fam.compile_gain, on_eval=save_grid,
                         after_step=fam.after_step, phases=fam.phases)

    def finish() -> dict:  # the main process scores and records; every process returns its metrics
        best = fam.load(run_dir)
        from aigc.evaluate.pictures import write_pictures  # pictures, not only numbers (per family: docs/images.md)

        write_pictures(family, best, batches.x_val, batches.y_val, run_dir / "pictures")
        # the VAE's bound in nats per image; other families report their periodic validation objective
        scores = score_images(best, batches) if family == "vae" else {"val_loss": fit["best_val_loss_periodic"]}
        metrics = {**scores, **{k: fit[k] for k in ("steps", "train_time_s", "train_loss",
                                                    "best_step", "images_per_s", "schedule_steps")}}
        record.update(status="done", metrics=metrics, finished=store.now(), dtype=fit["dtype"],
                      compiled=fit["compiled"])
        write_json(run_dir / "run.json", record)
        _write_card(run_dir, record, configs)
        return metrics

    return run_dir, on_main(finish)


@torch.no_grad()
def score_images(model, batches) -> dict:
    """The family's validation objective over the whole validation set (VAE: -ELBO, nats per image)."""
    model.eval()
    total, n = 0.0, 0
    for batch in batches.val_batches(math.ceil(len(batches.x_val) / 256), 256):
        terms = model.loss_terms(*batch, generator=torch.Generator().manual_seed(0))
        total += terms["nelbo"].item() * len(batch[0])
        n += len(batch[0])
    nelbo = total / n
    pixels = math.prod(model.image_shape) if hasattr(model, "image_shape") else batches.x_val[0].numel()
    return {"val_nelbo": nelbo, "val_bits_per_dim": nelbo / math.log(2) / pixels, "val_images": n}


def generate_images(run: str, *, n: int = 64, seed: int = 0, class_: str | None = None,
                    out: str | None = None, options: dict | None = None) -> dict:
    """Write `out/000.png ...` and `out/grid.png`; image i uses seed + i, so any one image can be made alone.

    `options` are the family's sampling options (diffusion: sampler, steps, eta, guidance); an
    option the family does not declare is an error.
    """
    from aigc import runs

    if not 1 <= n <= MAX_IMAGES:
        raise UserError(f"-n must be in 1..{MAX_IMAGES}, got {n}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    run_dir = store.find_run(run)
    record = store.read_run(run_dir)
    if record.get("modality") != "image":
        raise UserError(f"run {run_dir.name!r} is not an image run")
    label = _class_index(record, class_)
    fam = runs.family_of(record["family"])
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(fam.sampler_options))
    if unknown:
        raise UserError(f"--{unknown[0].replace('_', '-')} does not apply to {record['family']} runs")
    verify_manifest(run_dir)
    model = fam.load(run_dir).eval()
    out_dir = Path(out) if out else run_dir / "generated" / f"seed-{seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files, images = [], []
    t0 = time.perf_counter()
    for i in range(n):
        image_record = {"run": str(run_dir), "family": record["family"], "seed": seed + i,
                        "sampler": options.get("sampler"), "steps": options.get("steps"), "eta": options.get("eta"),
                        "class": label, "guidance": options.get("guidance_scale"),
                        "truncation": options.get("truncation")}
        pixels = _sample_one(model, image_record)
        path = out_dir / f"{i:03d}.png"
        save_png(path, pixels, image_record)
        files.append(str(path))
        images.append(pixels)
    seconds = time.perf_counter() - t0
    grid = out_dir / "grid.png"
    save_png(grid, make_grid(np.stack(images)))
    settings = {"n": n, "seed": seed, "class": label, "family": record["family"], **options}
    return {"files": files, "grid": str(grid), "settings": settings, "images_per_s": n / seconds}


def regenerate(image: str, out: str | None = None) -> dict:
    """Make the image again from the generation record stored in its PNG (`--from-image`)."""
    from aigc import runs

    path = Path(image)
    if not path.is_file():
        raise UserError(f"no such file: {image}")
    rec = read_png_record(path)
    run_dir = store.find_run(rec["run"])
    record = store.read_run(run_dir)
    verify_manifest(run_dir)
    model = runs.family_of(record["family"]).load(run_dir).eval()
    pixels = _sample_one(model, rec)
    out_dir = Path(out) if out else path.parent / "regenerated"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    save_png(target, pixels, rec)
    return {"files": [str(target)], "grid": None, "settings": rec}


RECORD_OPTIONS = {"sampler": "sampler", "steps": "steps", "eta": "eta", "guidance": "guidance_scale",
                  "truncation": "truncation"}  # PNG record key -> sample() keyword


def _sample_one(model, rec: dict) -> np.ndarray:
    generator = torch.Generator().manual_seed(rec["seed"])
    y = None if rec["class"] is None else torch.tensor([rec["class"]])
    options = {kw: rec[key] for key, kw in RECORD_OPTIONS.items() if rec.get(key) is not None}
    try:
        with torch.no_grad():
            x = model.sample(1, generator=generator, y=y, **options)
    except ValueError as e:  # out-of-range sampling options, reported by the family
        raise UserError(str(e)) from None
    return to_uint8(x)[0]


def _class_index(record: dict, class_: str | None) -> int | None:
    names = record.get("class_names") or []
    if record.get("num_classes", 0) == 0:
        if class_ is not None:
            raise UserError("--class applies to conditional runs (trained with --conditional)")
        return None
    if class_ is None:
        raise UserError(f"this run is conditional: give --class (one of: {', '.join(names)}, or 0..{len(names) - 1})")
    if class_ in names:
        return names.index(class_)
    if class_.isdigit() and int(class_) < record["num_classes"]:
        return int(class_)
    raise UserError(f"unknown class {class_!r} (one of: {', '.join(names)}, or 0..{record['num_classes'] - 1})")


def _grid_classes(num_classes: int) -> torch.Tensor | None:
    return torch.arange(GRID_SIZE) % num_classes if num_classes else None


def labels_of(data: ImageData, conditional: bool) -> torch.Tensor | None:
    return torch.as_tensor(data.labels) if conditional else None


def recorded_split(run_dir: Path, record: dict, cfg) -> tuple[ImageData, ImageData]:
    """A run's training and validation images, as recorded in run.json, checked by sha256."""
    val_source = record["data"]["val"]["source"]
    train, val = load_image_split(record["data"]["train"]["source"],
                                  None if val_source in ("held out", "test split") else val_source, cfg)
    if train.sha256 != record["data"]["train"]["sha256"]:
        raise UserError(f"the training data of {Path(run_dir).name} changed since the run was made (sha256 differs)")
    return train, val


def load_image_split(data: str, val_data: str | None, cfg) -> tuple[ImageData, ImageData]:
    """Training and validation images: --val-data, else a named set's test split, else the held-out tail."""
    size = cfg.image_size or None
    channels = cfg.channels or None
    train = load_images(data, image_size=size, channels=channels)
    if val_data:
        val = load_images(val_data, image_size=size, channels=channels)
    elif not Path(data).exists():  # a named data set: its own test split
        val = load_images(data, split="test", image_size=size, channels=channels)
    else:
        cut = len(train.images) - max(1, int(round(len(train.images) * cfg.val_fraction)))
        if cut < 1:
            raise UserError(f"{data}: {len(train.images)} images are too few to hold some out; give --val-data")
        labels = train.labels
        val = ImageData(train.source, train.images[cut:], None if labels is None else labels[cut:], train.class_names)
        train = ImageData(train.source, train.images[:cut], None if labels is None else labels[:cut],
                          train.class_names)
    if val.images.shape[1:] != train.images.shape[1:]:
        raise UserError(f"validation images are {val.images.shape[1:3]} x {val.images.shape[3]}, training images "
                        f"{train.images.shape[1:3]} x {train.images.shape[3]}: use --image-size")
    return train, val


def _describe(data: ImageData, source: str) -> dict:
    return {"source": source, "sha256": data.sha256, "images": len(data.images), "shape": list(data.images.shape[1:])}


def _write_card(run_dir: Path, record: dict, configs: dict) -> None:
    from aigc.store import card_header

    m = record["metrics"]
    lines = [*card_header(record, "image-generation"), f"# {run_dir.name}", "",
             f"A `{record['family']}` image model trained by AIGC Studio {__version__} on "
             f"`{record['data']['train']['source']}` ({record['data']['train']['images']:,} images of "
             f"{' x '.join(map(str, record['image_shape']))}).", "",
             "## Validation", "", _card_score(m), f"- steps: {m['steps']}", "",
             "## Configuration", "", "```toml", to_toml(configs).strip(), "```", "",
             "## Use", "", "```", f"aigc generate {run_dir} -n 64", "```", ""]
    atomic_write_text(run_dir / "README.md", "\n".join(lines))


def _card_score(m: dict) -> str:
    if "val_nelbo" in m:
        return f"- negative ELBO: {m['val_nelbo']:.2f} nats per image ({m['val_bits_per_dim']:.4f} bits per dimension)"
    return f"- validation loss: {m['val_loss']:.4f}"
