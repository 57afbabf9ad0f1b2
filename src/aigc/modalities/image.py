"""The image modality: a named image set, a folder or an array file in; vae, dcgan or diffusion out; images
generated one seed each (any one can be made alone) as uint8 arrays with their generation records, which
PNGs carry (`save`); scored by FID, KID, precision/recall and their floors.

The run directory follows the text runs (docs/runs.md): run.json, config.toml, the best weights with a
manifest, metrics.jsonl, checkpoints/last/, `samples/step-NNNNNN.png` (a grid saved at every evaluation, so
a user sees the model improve) and `pictures/` (the family's own pictures, docs/images.md).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aigc import __version__
from aigc.checkpoint import find_checkpoint, verify_manifest
from aigc.config import ImageDataConfig, build, read_toml, to_toml
from aigc.data.images import (
    NAMED_IMAGES,
    ImageData,
    load_images,
    make_grid,
    read_png_record,
    save_png,
    to_tensor,
    to_uint8,
)
from aigc.distributed import on_main
from aigc.errors import BadRequest, Cancelled, NotFound, UserError
from aigc.evaluate.images import score_against_data
from aigc.evaluate.pictures import write_pictures
from aigc.fsutil import write_json
from aigc.modalities.base import Generation, Prepared, finished_run, init_changes
from aigc.models import FAMILIES, Family
from aigc.store import card_header, card_lineage, continued_from, find_run, read_run
from aigc.train import ImageBatches, train_loop

NAME = "image"
BATCHES = False
GENERATE_OPTIONS = ("n", "class_", "sampler", "steps", "eta", "guidance_scale", "truncation")
EVALUATE_OPTIONS = ("n",)  # `aigc eval` options beyond the run
GRID_SEED = 0  # training grids use fixed latents, so consecutive grids show the same samples improving
GRID_SIZE = 64
MAX_IMAGES = 10_000  # `aigc generate -n` cap
EVAL_IMAGES = 2000  # N generated images scored against N real ones (fewer when the data has fewer)
HELD_OUT = ("held out", "test split")  # how run.json records a validation split made from --data itself
RECORD_OPTIONS = {"sampler": "sampler", "steps": "steps", "eta": "eta", "guidance": "guidance_scale",
                  "truncation": "truncation", "temperature": "temperature"}  # PNG record key -> sample() keyword


# ----------------------------------------------------------------------------------
# training


def sections(fam: Family) -> dict[str, type]:
    return {"model": fam.config, "data": ImageDataConfig, "train": fam.train_config}


def source_of(data: str) -> str:
    return data if data in NAMED_IMAGES else str(Path(data).expanduser().resolve())


def check_request(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None) -> None:
    """Nothing an image request can get wrong before its data is read (--init-from is checked by the service)."""


def prepare(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None, configs: dict,
            values: dict) -> Prepared:
    """Load and split the images and make the model; with `init_from` (a run of the family) the model is that run's,
    weights and EMA weights, and the data must have its image shape and classes."""
    parent = continued_model(fam, Path(init_from), configs, values) if init_from else None
    train_set, val_set = load_image_split(data, val_data, configs["data"])
    if parent is not None:
        check_continues(Path(init_from), parent, train_set, data)
    if configs["data"].conditional and train_set.labels is None:
        raise BadRequest(f"--conditional needs class labels, and {data} has none (use class sub-folders)")
    num_classes = train_set.num_classes if configs["data"].conditional else 0
    image_shape = (train_set.channels, train_set.height, train_set.width)
    if parent is not None:
        model = parent
    else:
        model = build_model(family, fam, configs, image_shape, num_classes)
    record = {
        "image_shape": list(image_shape), "num_classes": num_classes,
        "class_names": list(train_set.class_names) if train_set.class_names else None,
        "data": {"train": _describe(train_set, train_set.source),
                 "val": _describe(val_set, val_data or ("held out" if Path(data).exists() else "test split"))},
    }
    return Prepared(model, record, _batches(train_set, val_set, configs["data"]))


def continued_model(fam: Family, parent_dir: Path, configs: dict, values: dict):
    """The model of the run `parent_dir` (--init-from) to train on: its weights, and its EMA weights with their
    update count, as `load` restores them (the EMA goes on averaging where the run left it), rebuilt with the
    regularisation keys given (`fam.init_keys`). The run's [model] keys and whether it is conditional become the
    new run's (`configs`); another value given for either is an error."""
    changes = init_changes(fam, configs, values)
    verify_manifest(parent_dir)
    model = fam.load(parent_dir)
    if changes:
        rebuilt = fam.build(dataclasses.replace(model.config, **changes), model.image_shape, model.num_classes)
        rebuilt.load_state_dict(model.state_dict())
        if model.ema is not None:
            rebuilt.ema.load(model.ema.tensors(), model.ema.updates, parent_dir)
        model = rebuilt
    conditional = model.num_classes > 0
    if "conditional" in values and configs["data"].conditional != conditional:
        raise BadRequest(f"conditional comes from the --init-from checkpoint: run {parent_dir.name!r} is "
                         f"{'conditional' if conditional else 'unconditional'}")
    configs["model"] = model.config
    configs["data"] = dataclasses.replace(configs["data"], conditional=conditional)
    return model


def check_continues(parent_dir: Path, model, train_set: ImageData, data: str) -> None:
    """The data of a run continued from `parent_dir` has that run's image shape and, for a conditional run, its
    number of classes (and their names in the same order, where both have names)."""
    shape = (train_set.channels, train_set.height, train_set.width)
    if shape != model.image_shape:
        channels, height, width = model.image_shape
        fix = [f"--image-size {height}"] if height == width and shape[1:] != (height, width) else []
        fix += [f"--set channels={channels}"] if shape[0] != channels else []
        raise BadRequest(f"--init-from: run {parent_dir.name!r} was trained on images of "
                         f"{' x '.join(map(str, model.image_shape))} (C x H x W), {data}'s are "
                         f"{' x '.join(map(str, shape))}" + (f": use {' and '.join(fix)}" if fix else ""))
    if not model.num_classes:
        return
    if train_set.labels is None:
        raise BadRequest(f"--init-from: run {parent_dir.name!r} is conditional ({model.num_classes} classes), and "
                         f"{data} has no class labels (use class sub-folders)")
    names = read_run(parent_dir).get("class_names")
    if train_set.num_classes != model.num_classes or (names and list(train_set.class_names) != names):
        theirs = ", ".join(names) if names else f"{model.num_classes} classes"
        raise BadRequest(f"--init-from: run {parent_dir.name!r} was trained on the classes {theirs}; {data} has "
                         f"{', '.join(train_set.class_names)}: a continued run needs the same classes in the same "
                         f"order")


def reload(family: str, fam: Family, run_dir: Path, record: dict, configs: dict) -> Prepared:
    train_set, val_set = recorded_split(run_dir, record, configs["data"])
    model = fam.load(on_main(find_checkpoint, run_dir))  # the main process tidies an interrupted save
    return Prepared(model, record, _batches(train_set, val_set, configs["data"]))


def _batches(train_set: ImageData, val_set: ImageData, cfg: ImageDataConfig) -> ImageBatches:
    return ImageBatches(to_tensor(train_set.images), labels_of(train_set, cfg.conditional), to_tensor(val_set.images),
                        labels_of(val_set, cfg.conditional), hflip=cfg.hflip)


def fit(fam: Family, prepared: Prepared, configs: dict, run_dir: Path, budget, resume: bool) -> dict:
    grid_classes = _grid_classes(prepared.record["num_classes"])

    def save_grid(model, step: int) -> None:
        model.eval()
        with torch.no_grad():
            x = model.sample(GRID_SIZE, generator=torch.Generator().manual_seed(GRID_SEED), y=grid_classes)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_png(run_dir / "samples" / f"step-{step:06d}.png", make_grid(to_uint8(x)))

    return train_loop(prepared.model, prepared.state, configs["train"], run_dir, budget, resume=resume,
                      cpu_bf16=fam.cpu_bf16, compile_gain=fam.compile_gain, on_eval=save_grid,
                      after_step=fam.after_step, phases=fam.phases)


def finish(family: str, fam: Family, prepared: Prepared, configs: dict, run_dir: Path, fit: dict) -> dict:
    best = fam.load(run_dir)
    batches = prepared.state
    write_pictures(family, best, batches.x_val, batches.y_val, run_dir / "pictures")
    # a family whose loss is a bound is scored by it on the whole validation set (the VAE's -ELBO, nats per
    # image); the others report their periodic validation objective
    scores = score_bound(best, batches) if fam.bound_score else {"val_loss": fit["best_val_loss_periodic"]}
    return {**scores, **{k: fit[k] for k in ("steps", "train_time_s", "train_loss", "best_step", "images_per_s",
                                             "schedule_steps")}}


@torch.no_grad()
def score_bound(model, batches: ImageBatches) -> dict:
    """The family's bound over the whole validation set (VAE: -ELBO, nats per image)."""
    model.eval()
    total, n = 0.0, 0
    for batch in batches.val_batches(math.ceil(len(batches.x_val) / 256), 256):
        terms = model.loss_terms(*batch, generator=torch.Generator().manual_seed(0))
        total += terms["nelbo"].item() * len(batch[0])
        n += len(batch[0])
    nelbo = total / n
    return {"val_nelbo": nelbo, "val_bits_per_dim": nelbo / math.log(2) / math.prod(model.image_shape),
            "val_images": n}


def card(run_dir: Path, record: dict, configs: dict) -> str:
    m = record["metrics"]
    if "val_nelbo" in m:
        score = f"- negative ELBO: {m['val_nelbo']:.2f} nats per image ({m['val_bits_per_dim']:.4f} bits per dimension)"
    else:
        score = f"- validation loss: {m['val_loss']:.4f}"
    lines = [*card_header(record, "image-generation"), f"# {run_dir.name}", "",
             f"A `{record['family']}` image model trained by AIGC Studio {__version__} on "
             f"`{record['data']['train']['source']}` ({record['data']['train']['images']:,} images of "
             f"{' x '.join(map(str, record['image_shape']))})." + continued_from(record), "",
             "## Validation", "", score, f"- steps: {m['steps']}", *card_lineage(record), "",
             "## Configuration", "", "```toml", to_toml(configs).strip(), "```", "",
             "## Use", "", "```", f"aigc generate {run_dir} -n 64", "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# the images a run was trained and is scored on


def labels_of(data: ImageData, conditional: bool) -> torch.Tensor | None:
    return torch.as_tensor(data.labels) if conditional else None


def recorded_split(run_dir: Path, record: dict, cfg) -> tuple[ImageData, ImageData]:
    """A run's training and validation images, as recorded in run.json, checked by sha256."""
    val_source = record["data"]["val"]["source"]
    train, val = load_image_split(record["data"]["train"]["source"], None if val_source in HELD_OUT else val_source,
                                  cfg)
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
            raise BadRequest(f"{data}: {len(train.images)} images are too few to hold some out; give --val-data")
        labels = train.labels
        val = ImageData(train.source, train.images[cut:], None if labels is None else labels[cut:], train.class_names)
        train = ImageData(train.source, train.images[:cut], None if labels is None else labels[:cut],
                          train.class_names)
    if val.images.shape[1:] != train.images.shape[1:]:
        raise BadRequest(f"validation images are {val.images.shape[1:3]} x {val.images.shape[3]}, training images "
                         f"{train.images.shape[1:3]} x {train.images.shape[3]}: use --image-size")
    return train, val


def _describe(data: ImageData, source: str) -> dict:
    return {"source": source, "sha256": data.sha256, "images": len(data.images), "shape": list(data.images.shape[1:])}


def build_model(family: str, fam: Family, configs: dict, image_shape: tuple[int, int, int],
                num_classes: int) -> torch.nn.Module:
    """A new model of `fam` for pictures of `image_shape` (C, H, W), its initial weights drawn from the training seed
    alone; a shape the family cannot take is a BadRequest naming the family."""
    torch.manual_seed(configs["train"].seed)
    try:
        return fam.build(configs["model"], image_shape, num_classes)
    except ValueError as e:
        raise BadRequest(f"{family}: {e}") from None


def _grid_classes(num_classes: int) -> torch.Tensor | None:
    return torch.arange(GRID_SIZE) % num_classes if num_classes else None


# ----------------------------------------------------------------------------------
# generation


class LoadedImages:
    """A finished run of an image family, its weights verified, and its configuration. Sound and video runs are
    drawn by the same families: they load as this, with their modality's name and configuration sections."""

    def __init__(self, run_dir: Path, modality: str = NAME,
                 sections_of: Callable[[Family], dict[str, type]] = sections):
        self.path = Path(run_dir)
        self.modality = modality
        self.record = finished_run(self.path, modality)
        self.family = FAMILIES[self.record["family"]]
        self.model = self.family.load(self.path).eval()
        self.configs = build(sections_of(self.family), read_toml(self.path / "config.toml"),
                             family=self.record["family"])


def load(spec: str) -> LoadedImages:
    return LoadedImages(find_run(spec))


def generate(loaded: LoadedImages, options: dict, seed: int, stream: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None, *, batched: bool = False) -> Generation:
    """n images; image i uses seed + i. `options`: n, class_ (a class name or index of a conditional run) and
    the family's declared sampling options (diffusion: sampler, steps, eta, guidance_scale; dcgan:
    truncation); an option the family does not declare is an error."""
    options = {k: v for k, v in options.items() if v is not None}
    n = options.pop("n", 64)
    if not 1 <= n <= MAX_IMAGES:
        raise BadRequest(f"-n must be in 1..{MAX_IMAGES}, got {n}")
    if seed < 0:
        raise BadRequest(f"--seed must be >= 0, got {seed}")
    record = loaded.record
    label = class_index(record, options.pop("class_", None))
    unknown = sorted(set(options) - set(loaded.family.sampler_options))
    if unknown:
        raise BadRequest(f"--{unknown[0].replace('_', '-')} does not apply to {record['family']} runs")
    images, records = [], []
    t0 = time.perf_counter()
    for i in range(n):
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        image_record = {"run": str(loaded.path), "family": record["family"], "seed": seed + i,
                        "sampler": options.get("sampler"), "steps": options.get("steps"), "eta": options.get("eta"),
                        "class": label, "guidance": options.get("guidance_scale"),
                        "truncation": options.get("truncation")}
        images.append(sample_one(loaded.model, image_record))
        records.append(image_record)
    seconds = time.perf_counter() - t0
    settings = {"n": n, "seed": seed, "class": label, "family": record["family"], **options}
    return Generation(NAME, images, {"run": str(loaded.path), "settings": settings, "images": records,
                                     "images_per_s": n / seconds})


def regenerate(image: str) -> Generation:
    """The image again, from the generation record stored in its PNG (`--from-image`)."""
    path = Path(image)
    if not path.is_file():
        raise NotFound(f"no such file: {image}")
    rec = read_png_record(path)
    loaded = load(rec["run"])
    pixels = sample_one(loaded.model, rec)
    return Generation(NAME, [pixels], {"run": str(loaded.path), "settings": rec, "images": [rec]},
                      extra={"names": [path.name], "source": str(path)})


def save(generation: Generation, out_dir: Path) -> list[str]:
    """000.png, 001.png ... (each carrying its generation record) and, for several, grid.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = generation.extra.get("names") or [f"{i:03d}.png" for i in range(len(generation.outputs))]
    files = []
    for name, pixels, rec in zip(names, generation.outputs, generation.record["images"], strict=True):
        save_png(out_dir / name, pixels, rec)
        files.append(str(out_dir / name))
    if "names" not in generation.extra:
        save_png(out_dir / "grid.png", make_grid(np.stack(generation.outputs)))
        generation.extra["grid"] = str(out_dir / "grid.png")
    return files


def sample_one(model, rec: dict) -> np.ndarray:
    """One image from a generation record (seed, class, sampling options), with its own generator."""
    generator = torch.Generator().manual_seed(rec["seed"])
    y = None if rec["class"] is None else torch.tensor([rec["class"]])
    options = {kw: rec[key] for key, kw in RECORD_OPTIONS.items() if rec.get(key) is not None}
    try:
        with torch.no_grad():
            x = model.sample(1, generator=generator, y=y, **options)
    except ValueError as e:  # out-of-range sampling options, reported by the family
        raise BadRequest(str(e)) from None
    return to_uint8(x)[0]


def class_index(record: dict, class_: str | None) -> int | None:
    names = record.get("class_names") or []
    if record.get("num_classes", 0) == 0:
        if class_ is not None:
            raise BadRequest("--class applies to conditional runs (trained with --conditional)")
        return None
    if class_ is None:
        raise BadRequest(f"this run is conditional: give --class (one of: {', '.join(names)}, or "
                         f"0..{len(names) - 1})")
    class_ = str(class_)
    if class_ in names:
        return names.index(class_)
    if class_.isdigit() and int(class_) < record["num_classes"]:
        return int(class_)
    raise BadRequest(f"unknown class {class_!r} (one of: {', '.join(names)}, or 0..{record['num_classes'] - 1})")


# ----------------------------------------------------------------------------------
# evaluation


def evaluate(run_dir: Path, record: dict, options: dict) -> dict:
    """Score an image run in the feature space of the project's own classifier (or, for unlabelled
    data, autoencoder), trained once on the run's training split and cached: FID, KID, precision,
    recall, classifier score, per-class FID (conditional runs), a memorisation check, and every
    metric's floor (real training images vs held-out ones at the same N); plus the family's
    validation objective and the sampling speed. Writes eval.json into the run."""
    n = options.get("n")
    n = EVAL_IMAGES if n is None else n
    if n < 3:
        raise BadRequest(f"-n must be at least 3, got {n}")
    family = record["family"]
    fam = FAMILIES[family]
    configs = build(sections(fam), read_toml(run_dir / "config.toml"), family=family)
    train_set, val_set = recorded_split(run_dir, record, configs["data"])
    conditional = configs["data"].conditional
    model = fam.load(run_dir).eval()
    metrics = {}
    if fam.bound_score:
        x_train, x_val = to_tensor(train_set.images[:1]), to_tensor(val_set.images)
        metrics.update(score_bound(model, ImageBatches(x_train, None, x_val, labels_of(val_set, conditional))))

    # 1. N generated images (class-balanced for conditional runs), timed
    n = min(n, val_set.n)
    if n < 3:
        raise BadRequest(f"{run_dir.name}: {n} held-out images are too few to score; give --val-data when training")
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


def evaluate_folder(folder: str, data: str, n: int = EVAL_IMAGES, *, out: str | None = None) -> dict:
    """Score a folder of images against data set `data` as a run trained on it is scored.

    The data set (a named set, a folder or an array file, split as `aigc train` splits it) sets
    the image size and channels: the folder's images are converted to its channels and resized
    to its size (when it is square; else they must have its size already). N = min(n, images in
    the folder, held-out images); a larger folder gives N images drawn at random (seed 0), so that
    every class sub-folder is represented. When the folder's class sub-folders are all class
    names of the data set, FID is also reported per class. The grid.png that `aigc generate`
    writes beside 000.png ... is not a sample, and is left out. Nothing is written into the
    folder; `out` names a JSON file for the result.

    Returns {"images", "data", "metrics", "n", "feature_net"}: the metrics of `evaluate` less the
    family's own (val_nelbo) and the sampling speed.
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise NotFound(f"--images: no such folder: {folder}")
    if n < 3:
        raise BadRequest(f"-n must be at least 3, got {n}")
    train_set, val_set = load_image_split(data, None, ImageDataConfig())
    square = train_set.height == train_set.width
    grids = sorted(path.rglob("grid.png")) if path.is_dir() else []  # `aigc generate --out path[/class]`'s
    skip = tuple(g.relative_to(path).as_posix() for g in grids if (g.parent / "000.png").is_file())
    images = load_images(str(path), channels=train_set.channels, image_size=train_set.height if square else None,
                         skip=skip)
    if images.images.shape[1:] != train_set.images.shape[1:]:
        h, w = images.images.shape[1:3]
        raise BadRequest(f"{path}: images are {w}x{h}, {data}'s are {train_set.width}x{train_set.height}: "
                         f"resize them to {train_set.width}x{train_set.height}")
    n = min(n, images.n, val_set.n)
    if n < 3:
        raise BadRequest(f"{n} images are too few to score (at least 3: {images.n} in {path}, "
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
