"""The sound modality: short recorded sounds (drum hits, or the user's WAV/FLAC folders) through the image families.

A hit is a log-mel spectrogram scaled like a grayscale image (aigc.data.sounds), so vae, dcgan and diffusion train on
it unchanged, through the image modality's training, finishing and sampling (`image.fit`, `image.finish`,
`image.sample_one`): nothing of theirs is copied. Conditional on the instrument class with --conditional.

A generation is sounds, each a spectrogram (uint8 n_mels x frames x 1) and its audio (Griffin-Lim from the
spectrogram, seeded by the sound's seed) with one record each; `save` writes per sound NNN.wav (16-bit PCM mono,
normalised), NNN.png (the spectrogram, the record as its text chunk, as image runs write theirs) and NNN.json (the
record). The same run, seed and options make the same bytes. Scored by KID in the features of a classifier trained
here on the hits' classes, beside its real-vs-real floor, and by the class accuracy of conditional samples. See
docs/audio.md, "Sounds".
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aigc import __version__
from aigc.checkpoint import find_checkpoint
from aigc.config import read_toml, to_toml
from aigc.data import sounds as s
from aigc.data.images import ImageData, make_grid, read_png_record, save_png, to_tensor, to_uint8
from aigc.data.music import wav_bytes
from aigc.distributed import on_main
from aigc.errors import BadRequest, Cancelled, NotFound, UserError
from aigc.evaluate.images import feature_net, score_against_data
from aigc.fsutil import atomic_write_bytes, read_json, write_json
from aigc.modalities import image
from aigc.modalities.base import Generation, Prepared
from aigc.models import Family
from aigc.store import card_header, find_run
from aigc.train import ImageBatches

NAME = "sound"
BATCHES = False
GENERATE_OPTIONS = ("n", "class_", "sampler", "steps", "eta", "guidance_scale", "truncation")
EVALUATE_OPTIONS = ("n",)
MAX_SOUNDS = 64  # `aigc generate -n` cap: each sound costs a Griffin-Lim
EVAL_CLASS_SAMPLES = 20  # samples per class for the class accuracy of a conditional run


# ----------------------------------------------------------------------------------
# training


def sections(fam: Family) -> dict[str, type]:
    return {"model": fam.config, "data": s.SoundDataConfig, "train": fam.train_config}


def source_of(data: str) -> str:
    return data if data in s.NAMED_SOUNDS else str(Path(data).expanduser().resolve())


# the [data] keys that make a spectrogram what it is: a run continued from another (--init-from) takes that run's
SPECTROGRAM_KEYS = ("sample_rate", "seconds", "n_mels", "n_fft", "hop_length")


def check_request(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None) -> None:
    """Sound runs hold out their own files."""
    if val_data is not None:
        raise BadRequest("--val-data does not apply to sound runs: they hold out --set val_fraction=F of each "
                         "class's files")


def prepare(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None, configs: dict,
            values: dict) -> Prepared:
    """Read, split and turn the hits into spectrograms; build the image family on (1, n_mels, frames). With
    `init_from` (a sound run of the family) the model is that run's, as an image run continues (`image.
    continued_model`), and the sounds become spectrograms as that run's did (its SPECTROGRAM_KEYS); the new sounds
    must have its classes."""
    parent = None
    if init_from is not None:
        parent_dir = Path(init_from)
        theirs = read_toml(parent_dir / "config.toml")
        given = [k for k in SPECTROGRAM_KEYS if k in values and getattr(configs["data"], k) != theirs.get(k)]
        if given:
            raise BadRequest(f"{given[0]} comes from the --init-from checkpoint ({theirs.get(given[0])} in run "
                             f"{parent_dir.name!r}) and cannot be set: the spectrograms must be made as its were")
        made_as = {k: theirs[k] for k in SPECTROGRAM_KEYS if k in theirs}
        configs["data"] = dataclasses.replace(configs["data"], **made_as)
        parent = image.continued_model(fam, parent_dir, configs, values)
    cfg = configs["data"]
    train, val, files = s.load_split(data, cfg)
    if cfg.conditional and train.labels is None:
        raise BadRequest(f"--conditional needs classes, and {data} has none (put the files in class sub-folders)")
    num_classes = train.num_classes if cfg.conditional else 0
    image_shape = (1, train.height, train.width)
    if parent is not None:
        image.check_continues(Path(init_from), parent, train, data)
        model = parent
    else:
        model = image.build_model(family, fam, configs, image_shape, num_classes)
    record = {
        "image_shape": list(image_shape), "num_classes": num_classes,
        "class_names": list(train.class_names) if train.class_names else None,
        "data": {"train": _describe(train, source_of(data), files["train"]),
                 "val": _describe(val, "held out", files["val"])},
    }
    return Prepared(model, record, _batches(train, val, cfg.conditional))


def _describe(data: ImageData, source: str, files: list[str]) -> dict:
    return {"source": source, "sha256": data.sha256, "sounds": data.n, "shape": list(data.images.shape[1:]),
            "files": files}


def _batches(train: ImageData, val: ImageData, conditional: bool) -> ImageBatches:
    return ImageBatches(to_tensor(train.images), image.labels_of(train, conditional), to_tensor(val.images),
                        image.labels_of(val, conditional))


def recorded_split(run_dir: Path, record: dict, cfg: s.SoundDataConfig) -> tuple[ImageData, ImageData]:
    """A run's training and validation spectrograms made again, checked against run.json's sha256."""
    train, val, _ = s.load_split(record["data"]["train"]["source"], cfg)
    if train.sha256 != record["data"]["train"]["sha256"] or val.sha256 != record["data"]["val"]["sha256"]:
        raise UserError(f"the sounds of {Path(run_dir).name} changed since the run was made (sha256 differs)")
    return train, val


def reload(family: str, fam: Family, run_dir: Path, record: dict, configs: dict) -> Prepared:
    train, val = recorded_split(run_dir, record, configs["data"])
    model = fam.load(on_main(find_checkpoint, run_dir))  # the main process tidies an interrupted save
    return Prepared(model, record, _batches(train, val, configs["data"].conditional))


def fit(fam: Family, prepared: Prepared, configs: dict, run_dir: Path, budget, resume: bool) -> dict:
    return image.fit(fam, prepared, configs, run_dir, budget, resume)  # a grid of spectrograms at every evaluation


def finish(family: str, fam: Family, prepared: Prepared, configs: dict, run_dir: Path, fit: dict) -> dict:
    return image.finish(family, fam, prepared, configs, run_dir, fit)


def card(run_dir: Path, record: dict, configs: dict) -> str:
    m, cfg = record["metrics"], configs["data"]
    score = f"- negative ELBO: {m['val_nelbo']:.2f} nats per spectrogram" if "val_nelbo" in m \
        else f"- validation loss: {m['val_loss']:.4f}"
    classes = f", classes {', '.join(record['class_names'])}" if record.get("class_names") else ""
    lines = [*card_header(record, "audio-generation"), f"# {run_dir.name}", "",
             f"A `{record['family']}` sound model trained by AIGC Studio {__version__} on "
             f"`{record['data']['train']['source']}` ({record['data']['train']['sounds']} sounds of {cfg.seconds:g} s "
             f"at {cfg.sample_rate} Hz as {cfg.n_mels}-band log-mel spectrograms of {cfg.frames} frames{classes}); "
             f"sounds are made audible by Griffin-Lim.", "",
             "## Validation", "", score, f"- steps: {m['steps']}", "",
             "## Configuration", "", "```toml", to_toml(configs).strip(), "```", "",
             "## Use", "", "```", f"aigc generate {run_dir} -n 4 --seed 0 --out sounds/"
             + (" --class 0" if record.get("num_classes") else ""), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# generation


class LoadedSounds(image.LoadedImages):
    """A finished sound run, its weights verified, and its configuration."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, NAME, sections)


def load(spec: str) -> LoadedSounds:
    return LoadedSounds(find_run(spec))


def generate(loaded: LoadedSounds, options: dict, seed: int, stream: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None, *, batched: bool = False) -> Generation:
    """n sounds; sound i uses seed + i for its spectrogram and its Griffin-Lim. Options: class_ (a class name or
    index of a conditional run) and the family's sampling options."""
    options = {k: v for k, v in options.items() if v is not None}
    n = options.pop("n", 1)
    if not 1 <= n <= MAX_SOUNDS:
        raise BadRequest(f"-n must be in 1..{MAX_SOUNDS}, got {n}")
    if seed < 0:
        raise BadRequest(f"--seed must be >= 0, got {seed}")
    record = loaded.record
    label = image.class_index(record, options.pop("class_", None))
    unknown = sorted(set(options) - set(loaded.family.sampler_options))
    if unknown:
        raise BadRequest(f"--{unknown[0].replace('_', '-')} does not apply to {record['family']} sound runs")
    cfg = loaded.configs["data"]
    outputs, records = [], []
    t0 = time.perf_counter()
    for i in range(n):
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        rec = {"run": str(loaded.path), "family": record["family"], "seed": seed + i, "class": label,
               "class_name": None if label is None else record["class_names"][label],
               **{key: options.get(kw) for key, kw in image.RECORD_OPTIONS.items() if kw in options}}
        spectrogram = image.sample_one(loaded.model, rec)  # (n_mels, frames, 1) uint8
        outputs.append({"spectrogram": spectrogram, "audio": s.to_audio(spectrogram, cfg, seed + i)})
        records.append(rec)
    seconds = time.perf_counter() - t0
    settings = {"n": n, "seed": seed, "class": label, "family": record["family"], **options}
    return Generation(NAME, outputs, {"run": str(loaded.path), "family": record["family"], "settings": settings,
                                      "sounds": records, "sample_rate": cfg.sample_rate, "sounds_per_s": n / seconds},
                      extra={"rendered_with": f"Griffin-Lim, {cfg.griffin_lim_iters} iterations (librosa)"})


def regenerate(path: str) -> Generation:
    """A sound again, from the record its spectrogram PNG carries or its JSON holds (`--from-image`): the same
    spectrogram and the same Griffin-Lim start, so the same WAV bytes."""
    file = Path(path)
    if not file.is_file():
        raise NotFound(f"no such file: {path}")
    rec = read_json(file) if file.suffix.lower() == ".json" else read_png_record(file)
    if not isinstance(rec, dict) or not {"run", "seed", "class"} <= set(rec):
        raise UserError(f"{file.name} holds no sound's generation record (run, seed, class)")
    rec = {k: v for k, v in rec.items() if k not in ("index", "sample_rate", "settings")}  # the JSON's extras
    loaded = load(rec["run"])
    spectrogram = image.sample_one(loaded.model, rec)
    cfg = loaded.configs["data"]
    return Generation(NAME, [{"spectrogram": spectrogram, "audio": s.to_audio(spectrogram, cfg, rec["seed"])}],
                      {"run": str(loaded.path), "family": loaded.record["family"], "settings": rec, "sounds": [rec],
                       "sample_rate": cfg.sample_rate},
                      extra={"names": [file.stem], "source": str(file)})


def spectrogram_png(path: Path, spectrogram: np.ndarray, record: dict | None = None, scale: int = 4) -> None:
    """The spectrogram enlarged `scale` times (nearest neighbour), the highest band on top, `record` as its text
    chunk."""
    big = np.repeat(np.repeat(spectrogram, scale, axis=0), scale, axis=1)
    save_png(path, big, record)


def save(generation: Generation, out_dir: Path) -> list[str]:
    """Per sound: NNN.wav (16-bit PCM mono, peak 0.9), NNN.png (its spectrogram, the record as the PNG text chunk)
    and NNN.json (the record, the sample rate and the settings: no timing, so the same seed writes the same bytes);
    for several, grid.png. A sound made again from its file (`regenerate`) is written under that file's stem."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = generation.record["sample_rate"]
    stems = generation.extra.get("names") or [f"{i:03d}" for i in range(len(generation.outputs))]
    files = []
    for i, (name, output, rec) in enumerate(zip(stems, generation.outputs, generation.record["sounds"],
                                                strict=True)):
        stem = out_dir / name
        atomic_write_bytes(stem.with_suffix(".wav"), wav_bytes(output["audio"], rate))
        spectrogram_png(stem.with_suffix(".png"), output["spectrogram"], rec)
        write_json(stem.with_suffix(".json"), {**rec, "index": i, "sample_rate": rate,
                                               "settings": generation.record["settings"]})
        files += [str(stem.with_suffix(x)) for x in (".wav", ".png", ".json")]
    if len(generation.outputs) > 1:
        grid = out_dir / "grid.png"
        save_png(grid, make_grid(np.stack([o["spectrogram"] for o in generation.outputs])))
        generation.extra["grid"] = str(grid)
    return files


# ----------------------------------------------------------------------------------
# evaluation


def evaluate(run_dir: Path, record: dict, options: dict) -> dict:
    """KID of N generated spectrograms against the N held-out real ones, in the features of a classifier trained
    here on the run's training hits (cached, as image runs' is), beside its floor (N real training hits against the
    same held-out ones: what a perfect generator scores); N = the held-out hits (or -n, fewer). A conditional run:
    the classifier's accuracy on EVAL_CLASS_SAMPLES samples of each class, beside its accuracy on the real
    held-out hits. Writes eval.json."""
    n = options.get("n")
    if n is not None and n < 3:
        raise BadRequest(f"-n must be at least 3, got {n}")
    loaded = load(str(run_dir))
    train, val = recorded_split(run_dir, record, loaded.configs["data"])
    n = min(n or val.n, val.n, train.n)
    if n < 3:
        raise BadRequest(f"{run_dir.name}: {n} held-out sounds are too few to score (at least 3)")
    num_classes = record.get("num_classes") or 0
    labels = torch.arange(n) % num_classes if num_classes else None
    t0 = time.perf_counter()
    fakes = _samples(loaded.model, labels, n)
    sounds_per_s = n / (time.perf_counter() - t0)
    scored = score_against_data(fakes, train, val, fake_labels=labels)
    m = scored["metrics"]
    metrics = {"kid": m["kid"], "kid_std": m["kid_std"], "kid_floor": m["kid_floor"], "fid": m["fid"],
               "fid_floor": m["fid_floor"], "precision": m["precision"], "recall": m["recall"],
               "spectrograms_per_s": sounds_per_s,
               **{k: record["metrics"][k] for k in ("val_nelbo", "val_loss") if k in record["metrics"]}}
    if num_classes:
        net, _ = feature_net(train, test=val)
        per_class = torch.arange(num_classes).repeat_interleave(EVAL_CLASS_SAMPLES)
        with torch.no_grad():
            made = net(_samples(loaded.model, per_class, len(per_class), first_seed=n)).argmax(1)
        metrics["class_accuracy"] = float((made == per_class).float().mean())
        metrics["class_accuracy_real"] = scored["feature_net"]["test_accuracy"]
    result = {"run": str(run_dir), "n": n, "n_train": train.n, "metrics": metrics, "feature_net": scored["feature_net"],
              "note": "KID, not FID: a few dozen hits are too few for FID's covariance (reported for reference)"}
    write_json(Path(run_dir) / "eval.json", result)
    return result


@torch.no_grad()
def _samples(model, labels: torch.Tensor | None, n: int, first_seed: int = 0, batch: int = 50) -> torch.Tensor:
    """n spectrograms (n, 1, H, W) in [-1, 1] with the family's default sampling, drawn in batches (batch b from
    seed first_seed + b * batch, as image runs are scored), through uint8 as `aigc generate` makes them."""
    out = []
    for i in range(0, n, batch):
        y = None if labels is None else labels[i:i + batch]
        x = model.sample(min(batch, n - i), generator=torch.Generator().manual_seed(first_seed + i), y=y)
        out.append(to_tensor(to_uint8(x)))
    return torch.cat(out)
