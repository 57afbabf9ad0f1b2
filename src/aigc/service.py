"""The application service: what the CLI, the API and the studio call, so none of them holds logic the
others lack.

- `train`: the run lifecycle, written once for every modality: check the request, claim the run
  directory, let the modality prepare data and model, commit the directory with the record and the
  resolved configuration, train (or fit), mark a failure or an interruption, score, record, write the
  model card. Everything that can fail on the user's input happens before the directory is touched: a
  failed request leaves no half-made run and never destroys an existing one. Under torchrun the main
  process alone writes (aigc.distributed).
- `generate`: dispatch on the run's modality, with a fresh seed drawn when none is given; models are
  loaded and verified once and kept (`ModelCache`), reloaded when the run's files change.
- `optimize`, `feedback_summary`: a new run from a run and people's feedback on it (aigc.optimize), and what
  that feedback allows (the counts, and which methods can start or why not).
- `evaluate`: the modality's evaluation of a run (`evaluate_image_folder` for a folder of images).
- `sweeps`, `sweep`: the studies of `aigc sweep` as the store's database holds them (aigc.studies).

Errors are typed (aigc.errors): BadRequest, NotFound, Conflict, all UserErrors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aigc import __version__, store, studies, uploads
from aigc.config import OptimizeConfig, build, fields_of, read_toml, to_toml
from aigc.data.images import NAMED_IMAGES, named_installed, read_png_record, save_png
from aigc.data.music import MUSIC_CORPORA, is_music_data
from aigc.data.series import NAMED_SERIES, is_series_data
from aigc.data.sounds import NAMED_SOUNDS, is_sound_data
from aigc.data.sounds import named_installed as sound_installed
from aigc.data.text import CORPORA, corpus_installed
from aigc.data.video import NAMED_VIDEOS, REAL_VIDEOS, is_video_data, real_installed
from aigc.db import Store, default_url, new_id
from aigc.distributed import is_main_process, on_main
from aigc.errors import BadRequest, Conflict, Interrupted, NotFound, UserError
from aigc.fsutil import atomic_write_text, json_safe
from aigc.modalities import MODALITIES, Generation, Modality, image, music, series, sound, video
from aigc.models import FAMILIES, Family
from aigc.optimize import feedback as fb
from aigc.optimize import image as optimize_image
from aigc.optimize import judge, rerank, rerank_only
from aigc.optimize import music as optimize_music
from aigc.optimize import series as optimize_series
from aigc.optimize import text as optimize_text
from aigc.sample import BATCHER, GenerateSettings, window_of
from aigc.train import Budget

DEFAULT_MAX_MINUTES = 10.0  # the budget of a gradient-trained family when neither --max-steps nor --max-minutes


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise NotFound(f"unknown family {name!r} (choose from: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def modality_for(family: str, data: str | None = None) -> tuple[str, Family]:
    """The modality a family trains in on `data`, and the family as that modality takes it: the data decides
    for a family that also takes a numeric series (rnn on a .csv or a named series is a series model)."""
    fam = family_of(family)
    if fam.modality == "series" or (data is not None and is_series_data(data)):
        return "series", series.series_family(family)  # an error for a family that takes no series
    if data is not None and fam.modality == "text" and is_music_data(data):  # MIDI or a named music corpus
        return "music", fam
    if data is not None and fam.modality == "image" and is_video_data(data):  # clips: frames as channels
        return "video", fam
    if data is not None and fam.modality == "image" and is_sound_data(data):  # log-mel spectrograms
        return "sound", fam
    return fam.modality, fam


def sections_for(family: str, modality: str | None = None) -> dict[str, type]:
    """The configuration sections of a family; modality="series": those of its series variant; "music": those of a
    text family on music."""
    name, fam = modality_for(family)
    if modality == "series" and name != "series":
        name, fam = "series", series.series_family(family)
    elif modality == "music" and name == "text":
        name = "music"
    return MODALITIES[name].sections(fam)


def series_flag_sets(family: str, data: str, flags: dict) -> dict[str, str]:
    """`aigc train`'s series flags (--order, --column, ...) as configuration keys (an error where they do not apply)."""
    return series.series_sets(family, data, flags)


def image_flag_sets(family: str, image_size: int | None, conditional: bool) -> dict[str, str]:
    """`aigc train --image-size N --conditional` as configuration keys (an error for a family that is not an image
    family)."""
    if image_size is None and not conditional:
        return {}
    image_family = modality_for(family)[0] == "image"
    if image_size is not None and not image_family:
        raise BadRequest(f"--image-size applies to image families, not {family}")
    if conditional and not (image_family or FAMILIES[family].stages):  # vae-rnn makes clips of a class too
        raise BadRequest(f"--conditional applies to image families and vae-rnn, not {family}")
    return {**({"image_size": str(image_size)} if image_size is not None else {}),
            **({"conditional": "true"} if conditional else {})}


def draw_seed(seed: int | None) -> int:
    """The seed of a request: the one given, else a fresh one (reported back, so the result can be made again)."""
    return secrets.randbelow(2**31) if seed is None else seed


# ----------------------------------------------------------------------------------
# training


def train(family: str, data: str, *, val_data: str | None = None, name: str | None = None,
          overwrite: bool = False, resume: bool = False, max_minutes: float | None = None,
          max_steps: int | None = None, init_from: str | None = None, config_file: str | None = None,
          sets: dict[str, str] | None = None) -> tuple[Path, dict]:
    """Train (or fit) a new run, or resume one; returns the run directory and its final metrics. `data` may be an
    upload's id (training_data)."""
    data, sets = training_data(data, sets)
    modality_name, fam = modality_for(family, data)
    modality = MODALITIES[modality_name]
    if overwrite and resume:
        raise BadRequest("--overwrite and --resume exclude each other")
    if resume and not name:
        raise BadRequest("--resume needs --name NAME of the run to continue")
    if max_steps is not None and max_steps < 1:
        raise BadRequest(f"--max-steps must be >= 1, got {max_steps}")
    if max_minutes is not None and not (max_minutes > 0 and math.isfinite(max_minutes)):
        raise BadRequest(f"--max-minutes must be > 0, got {max_minutes}")
    store.check_name(name)
    if init_from and not fam.init_from:
        if fam is not FAMILIES[family]:  # the family's series variant
            raise BadRequest(f"--init-from does not apply to {family} on a series: a series run starts from scratch")
        raise BadRequest(f"--init-from does not apply to family {family} (only: "
                         f"{', '.join(k for k, f in FAMILIES.items() if f.init_from)})")
    if init_from and not resume:
        init_from = str(init_source(family, modality_name, init_from))
    modality.check_request(family, fam, data, val_data, init_from)
    gradient = fam.trainer == "gradient"
    if not gradient and (max_steps is not None or max_minutes is not None or resume):
        raise BadRequest(f"--max-steps, --max-minutes and --resume apply to gradient-trained families; {family} "
                         f"is fitted in closed form")
    if max_steps is not None and max_steps < len(fam.stages):
        raise BadRequest(f"{family} trains in {len(fam.stages)} stages ({', '.join(fam.stages)}), a step each at "
                         f"least: give --max-steps {len(fam.stages)} or more")
    budget = Budget(max_steps, max_minutes if (max_minutes or max_steps) else DEFAULT_MAX_MINUTES) if gradient \
        else None
    if resume:
        run_dir, record, configs, prepared = _resume(modality, family, fam, data, name, val_data, init_from,
                                                     config_file, sets)
    else:
        values = dict(read_toml(Path(config_file))) if config_file else {}
        values.update(sets)
        configs = build(modality.sections(fam), values, family=family)
        # several processes (torchrun): one name for all (the default has a timestamp); only the main process
        # writes the run, the others compute the same data and model (docs/runs.md)
        final_dir = on_main(store.claim_run_dir, family, data, name, overwrite)
        if init_from and Path(init_from) == final_dir.resolve():
            raise BadRequest(f"--init-from: run {final_dir.name!r} is the run --overwrite would replace; give the "
                             f"new run another --name")
        prepared = modality.prepare(family, fam, data, val_data, init_from, configs, values)
        record = {"family": family, "modality": modality_name, "created": store.now(), "aigc_version": __version__,
                  "init_from": init_from, **prepared.record}
        header = {"family": family, "data": data, "aigc_version": __version__}

        def write_files(staging: Path) -> None:
            if prepared.write_files is not None:
                prepared.write_files(staging)
            store.write_record(staging, record)
            atomic_write_text(staging / "config.toml", to_toml(configs, header))

        run_dir = on_main(store.commit_run_dir, final_dir, write_files)
    return run_dir, _fit_and_finish(modality, run_dir, record, configs, budget,
                                    lambda: modality.fit(fam, prepared, configs, run_dir, budget, resume),
                                    lambda fitted: modality.finish(family, fam, prepared, configs, run_dir, fitted))


def init_source(family: str, modality: str, spec: str) -> Path:
    """The checkpoint `--init-from spec` names, checked before anything is read or written: a run (a directory or
    a run name) of the same family and modality that has saved its weights; for a text family also a model folder
    that is not a run (gpt: any local Hugging Face GPT-2 folder; the modality checks what it holds)."""
    path = Path(spec).expanduser()
    if store.is_run(path) or (store.valid_name(spec) and store.is_run(store.runs_dir() / spec)):
        run_dir = store.find_run(spec)
        record = store.read_run(run_dir)
        theirs, ours = _kind(record["family"], store.modality_of(record)), _kind(family, modality)
        if theirs != ours:
            raise BadRequest(f"--init-from: run {run_dir.name!r} is {theirs} run; {ours} run continues only from "
                             f"{ours} run")
        if not (run_dir / "manifest.json").is_file():
            raise Conflict(f"--init-from: run {run_dir.name!r} has no saved weights yet "
                           f"(status: {record.get('status')})")
        return run_dir.resolve()
    if modality == "text" and path.is_dir():
        return path.resolve()
    folder = ", nor a model folder" if modality == "text" else ""
    raise NotFound(f"--init-from: no such run: {spec!r} (not a run directory, and not a run name in "
                   f"{store.runs_dir()}{folder}; see: aigc runs)")


def _kind(family: str, modality: str) -> str:
    """'a vae', 'an rnn', 'an rnn series': a family (and its modality where it is not the family's own), with its
    article (said as letters, r and n begin with a vowel: an rnn, an ngram, an ar)."""
    fam = FAMILIES.get(family)
    kind = family if fam is not None and fam.modality == modality else f"{family} {modality}"
    return ("an " if kind[0] in "aeinor" else "a ") + kind


def _fit_and_finish(modality: Modality, run_dir: Path, record: dict, configs: dict, budget: Budget | None,
                    fit: Callable[[], dict], score: Callable[[dict], dict]) -> dict:
    """The second half of a run's life, the same for `train` and `optimize`: mark it running, `fit()`, mark a
    failure or an interruption, `score(fitted)` (the metrics of the final weights), record, write the model
    card."""
    record["budget"] = {"max_steps": budget.max_steps if budget else None,
                        "max_minutes": budget.max_minutes if budget else None}
    record["status"] = "running"
    on_main(store.write_record, run_dir, record)
    with recording_failure(run_dir, record):
        fitted = fit()
    if "dtype" in fitted:
        record.update(dtype=fitted["dtype"], compiled=fitted["compiled"])

    def finish() -> dict:  # the main process scores and records; every process returns its metrics
        metrics = score(fitted)
        record.update(status="done", metrics=metrics, finished=store.now())
        store.write_record(run_dir, record)
        atomic_write_text(run_dir / "README.md", modality.card(run_dir, record, configs))
        return metrics

    return on_main(finish)


def _resume(modality: Modality, family: str, fam: Family, data: str, name: str, val_data: str | None,
            init_from: str | None, config_file: str | None, sets: dict):
    run_dir = store.runs_dir() / name
    if not store.is_run(run_dir):
        raise NotFound(f"--resume: no run named {name!r} in {store.runs_dir()}")
    if sets or config_file or init_from or val_data:
        raise BadRequest("--resume continues with the run's recorded configuration and data; "
                         "drop --set/--config/--init-from/--val-data and the series flags (--column, --fill, ...)")
    record = store.read_run(run_dir)
    if "optimize" in record:
        raise Conflict(f"run {name!r} was made by aigc optimize from {record['optimize']['parent']}: make it "
                       f"again with aigc optimize (--resume continues runs of aigc train)")
    if store.modality_of(record) != modality.NAME:
        raise Conflict(f"run {name!r} is a {record['family']} {store.modality_of(record)} run, not a {family} "
                       f"{modality.NAME} run")
    if record["family"] != family:
        raise Conflict(f"run {name!r} is a {record['family']} run, not {family}")
    if record["data"]["train"]["source"] != modality.source_of(data):
        raise Conflict(f"run {name!r} was trained on {record['data']['train']['source']}, not {data}")
    configs = build(modality.sections(fam), read_toml(run_dir / "config.toml"), family=family)
    return run_dir, record, configs, modality.reload(family, fam, run_dir, record, configs)


@contextlib.contextmanager
def recording_failure(run_dir: Path, record: dict):
    """Around training: an exception marks the run `interrupted` (Ctrl-C) or `failed` in run.json
    (written by the main process), then goes on."""
    try:
        yield
    except BaseException as e:
        record["status"] = "interrupted" if isinstance(e, Interrupted | KeyboardInterrupt) else "failed"
        if is_main_process():
            store.write_record(run_dir, record)
        raise


# ----------------------------------------------------------------------------------
# optimization: from people's feedback to a new run (docs/optimize.md)

OPTIMIZE_METHODS = ("sft", "dpo", "rerank")
# each optimizer: METHODS, TRAIN_DEFAULTS, OPTIMIZE_DEFAULTS, STEPS (the budget of sft and dpo when neither
# --max-steps nor --max-minutes is given), prepare, fit, finish
OPTIMIZERS = {"text": optimize_text, "image": optimize_image, "music": optimize_music, "series": optimize_series,
              "video": rerank_only, "sound": rerank_only}


def optimize(run: str, method: str, *, name: str | None = None, overwrite: bool = False,
             max_steps: int | None = None, max_minutes: float | None = None, sets: dict[str, str] | None = None,
             db: Store | None = None) -> tuple[Path, dict]:
    """A new run made from `run` and the ratings and arena votes stored for it (`method`: sft, dpo or rerank).
    It records its parent, the method and the exact feedback used (ids and a sha256), and its metrics show before
    and after (aigc.optimize.judge); returns its directory and metrics. Everything that can fail on the request
    (an unknown method, no feedback to learn from, a bad key) fails before the new run's directory is touched."""
    if method not in OPTIMIZE_METHODS:
        raise BadRequest(f"unknown --method {method!r} (choose from: {', '.join(OPTIMIZE_METHODS)})")
    if max_steps is not None and max_steps < 1:
        raise BadRequest(f"--max-steps must be >= 1, got {max_steps}")
    if max_minutes is not None and not (max_minutes > 0 and math.isfinite(max_minutes)):
        raise BadRequest(f"--max-minutes must be > 0, got {max_minutes}")
    if method == "rerank" and (max_steps is not None or max_minutes is not None):
        raise BadRequest("--max-steps and --max-minutes apply to sft and dpo (rerank trains no weights)")
    store.check_name(name)
    parent_dir = store.find_run(run)
    parent = store.read_run(parent_dir)
    family, modality_name = parent["family"], store.modality_of(parent)
    check_optimizable(parent_dir, parent, method)
    optimizer = OPTIMIZERS[modality_name]
    fam = series.series_family(family) if modality_name == "series" else FAMILIES[family]
    if fam.trainer == "counts" and (max_steps is not None or max_minutes is not None):
        raise BadRequest(f"--max-steps and --max-minutes apply to trained families; sft on {family} adds counts")
    with contextlib.ExitStack() as stack:
        if db is None:
            db = stack.enter_context(Store())
        feedback = fb.collect(db, parent_dir.name, modality_name)
    fb.require(feedback, method)
    modality = MODALITIES[modality_name]
    sections = {**modality.sections(fam), "optimize": OptimizeConfig}
    values = {**read_toml(parent_dir / "config.toml"), **(optimizer.TRAIN_DEFAULTS if "train" in sections else {}),
              **optimizer.OPTIMIZE_DEFAULTS, **(sets or {})}
    configs = build(sections, values, family=family)
    final_dir = store.claim_run_dir(family, parent_dir.name, name or f"{parent_dir.name}-{method}", overwrite)
    prepared = optimizer.prepare(fam, parent_dir, parent, configs, feedback, method, sets or {})
    record = {"family": family, "modality": modality_name, "created": store.now(), "aigc_version": __version__,
              **{k: v for k, v in parent.items() if k in ("data", "image_shape", "num_classes", "class_names",
                                                          "encoding", "job", "clip_shape", "context")},
              "init_from": str(parent_dir.resolve()),
              "optimize": {"parent": parent_dir.name, "parent_path": str(parent_dir.resolve()),
                           "parent_sha256": weights_sha256(parent_dir), "method": method,
                           "feedback": feedback.snapshot()}}
    header = {"family": family, "data": parent["data"]["train"]["source"], "aigc_version": __version__,
              "optimized_from": parent_dir.name, "method": method}

    def write_files(staging: Path) -> None:
        prepared.write_files(staging)
        store.write_record(staging, record)
        atomic_write_text(staging / "config.toml", to_toml(configs, header))

    run_dir = store.commit_run_dir(final_dir, write_files)
    budget = None
    if method != "rerank":
        budget = Budget(max_steps or (None if max_minutes else optimizer.STEPS), max_minutes)
    _fit_and_finish(modality, run_dir, record, configs, budget,
                    lambda: _staged(run_dir, None if method == "rerank" or fam.trainer == "gradient" else "counting",
                                    optimizer.fit, fam, prepared, configs, run_dir, budget, method),
                    lambda fitted: _staged(run_dir, "scoring", optimizer.finish, family, fam, prepared, configs,
                                           run_dir, fitted, method))

    # before and after: the judged share of liked fresh outputs (the regular metric is in the metrics already)
    with recording_failure(run_dir, record):
        judged = judge.compare(modality, parent_dir, run_dir, feedback, configs["optimize"],
                               prepared.state["reward"] if method == "rerank" else None)
    record["metrics"].update(judged)
    store.write_record(run_dir, record)
    atomic_write_text(run_dir / "README.md", modality.card(run_dir, record, configs))
    return run_dir, record["metrics"]


def _staged(run_dir: Path, stage: str | None, work: Callable, *args):
    """work(*args) as one stage of the run's progress (store.Stage: what a job's view shows between and after the
    training steps); stage None: as it is (training steps show their own progress)."""
    if stage is None:
        return work(*args)
    with store.Stage(run_dir, stage, 1) as progress:
        out = work(*args)
        progress.update()
    return out


def check_optimizable(run_dir: Path, record: dict, method: str) -> None:
    """A clear error when `method` cannot make a new run from this run, whatever its feedback: the run is not
    finished, aigc optimize does not take its modality, the method does not take it, or the method fine-tunes
    weights and the family is counted (an n-gram)."""
    family, modality_name = record["family"], store.modality_of(record)
    if record.get("status") != "done":
        raise Conflict(f"run {run_dir.name!r} is {record.get('status')}: optimize a finished run")
    if modality_name not in OPTIMIZERS:
        raise BadRequest(f"aigc optimize takes {_listed(list(OPTIMIZERS))} runs; {run_dir.name!r} is a "
                         f"{modality_name} run")
    optimizer = OPTIMIZERS[modality_name]
    if method not in optimizer.METHODS:
        takes = _listed([m for m, o in OPTIMIZERS.items() if method in o.METHODS])
        article = "an" if modality_name == "image" else "a"
        raise BadRequest(f"--method {method} takes {takes} runs; {run_dir.name!r} is {article} {modality_name} "
                         f"run (use: {', '.join(optimizer.METHODS)})")
    if modality_name == "video" and record.get("job") == "predict":
        raise BadRequest(f"run {run_dir.name!r} predicts the frames of a given clip: there is nothing to choose "
                         f"among or to prefer (aigc optimize takes clip generators: vae, diffusion)")
    if method == "dpo" and FAMILIES[family].trainer != "gradient":
        raise BadRequest(f"--method dpo fine-tunes a gradient-trained family; {family} is counted: use "
                         f"--method sft (its counts) or rerank")


def _listed(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 2 else words)


def feedback_summary(run: str, db: Store | None = None) -> dict:
    """What the feedback stored for a run allows (the studio's *Improve from feedback*): the counts that
    `aigc optimize` would learn from (those of the feedback snapshot: liked and disliked outputs, preference
    pairs, the ratings and the arena votes read) and, for each method, whether it can start and, where not, why
    (the error `optimize` would answer: `check_optimizable`, then `feedback.require`)."""
    run_dir = store.find_run(run)
    record = store.read_run(run_dir)
    modality_name = store.modality_of(record)
    feedback = fb.Feedback(run_dir.name, modality_name)  # a modality optimize does not take: nothing is read
    if modality_name in OPTIMIZERS:
        with contextlib.ExitStack() as stack:
            if db is None:
                db = stack.enter_context(Store())
            feedback = fb.collect(db, run_dir.name, modality_name)
    methods = []
    for method in OPTIMIZE_METHODS:
        try:
            check_optimizable(run_dir, record, method)
            fb.require(feedback, method)
        except UserError as e:
            methods.append({"method": method, "available": False, "reason": str(e)})
        else:
            methods.append({"method": method, "available": True, "reason": None})
    snapshot = feedback.snapshot()
    return {"run": run_dir.name, "modality": modality_name, "liked": snapshot["liked"],
            "disliked": snapshot["disliked"], "pairs": snapshot["pairs"], "ratings": len(snapshot["rating_ids"]),
            "votes": len(snapshot["vote_ids"]), "methods": methods}


# ----------------------------------------------------------------------------------
# generation


class ModelCache:
    """Loaded models by run directory, each loaded and verified once; a run whose files changed since (a new
    training, an overwrite) is loaded again. Thread-safe: a server's requests share it."""

    def __init__(self):
        self._models: dict[str, tuple[tuple, object]] = {}
        self._lock = threading.Lock()

    def get(self, modality: Modality, path: Path) -> object:
        key, signature = str(Path(path).resolve()), _signature(path)
        with self._lock:
            hit = self._models.get(key)
            if hit is not None and hit[0] == signature:
                return hit[1]
        loaded = modality.load(str(path))  # outside the lock: a slow load does not hold up other runs
        with self._lock:
            self._models[key] = (signature, loaded)
        return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


def weights_file(path: Path) -> Path | None:
    """The file that names a model's weights: a run's manifest, or a Hugging Face folder's config.json."""
    return next((f for f in (Path(path) / "manifest.json", Path(path) / "config.json") if f.is_file()), None)


def _signature(path: Path) -> tuple:
    """What changes when a run's weights change (their file's name, time and size)."""
    f = weights_file(path)
    if f is None:
        return ()
    stat = f.stat()
    return f.name, stat.st_mtime_ns, stat.st_size


MODELS = ModelCache()


def resolve(run: str) -> tuple[Path, Modality]:
    """The directory of a run (or of a Hugging Face causal-LM folder, a text model) and its modality."""
    path = Path(run).expanduser()
    if not store.is_run(path) and (path / "config.json").is_file():
        return path, MODALITIES["text"]
    run_dir = store.find_run(run)
    return run_dir, MODALITIES[store.modality_of(store.read_run(run_dir))]


def load(run: str) -> object:
    """The loaded model of a run, from the cache."""
    run_dir, modality = resolve(run)
    return MODELS.get(modality, run_dir)


def generate(run: str, options: dict | None = None, *, seed: int | None = None,
             stream: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
             batch: bool = False) -> Generation:
    """Generate from a run: options are the modality's (`Modality.GENERATE_OPTIONS`; None means the default);
    one that belongs to another modality is an error that says which. `best_of` k (every modality's sampled
    outputs: texts, images, pieces, sample paths, clips, sounds): each output is the best of k candidates by the
    run's reward model (aigc.optimize.rerank); a run made by `aigc optimize --method rerank` uses its own k unless
    asked otherwise, best_of 1 turns it off. `cancel` set while it works: it stops and raises errors.Cancelled.
    `batch`: share a decoding batch with the requests other threads make at the same time, where the modality can
    (`Modality.BATCHES`); the outputs are the same. The time it took (model loading and waiting for the batch
    included) is `extra["latency_s"]`."""
    t0 = time.perf_counter()
    run_dir, modality = resolve(run)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    best_of = options.pop("best_of", None)
    check_options(modality, options, "GENERATE_OPTIONS")
    if stream is not None and modality.NAME != "text":
        raise BadRequest("--stream applies to text runs")
    reward = rerank.reward_of(run_dir) if store.is_run(run_dir) else None
    if best_of is not None:
        rerank.check_best_of(best_of)
        if reward is None and best_of > 1:
            raise BadRequest(f"--best-of needs a reward model, and {run_dir.name} has none: make a run with one by "
                             f"aigc optimize {run_dir.name} --from-feedback --method rerank")
    k = best_of if best_of is not None else reward.info.get("best_of", 1) if reward is not None else 1
    if best_of is None and modality.NAME == "series" and not options.get("paths"):
        k = 1  # a forecast without sample paths has nothing to choose between
    loaded = MODELS.get(modality, run_dir)
    if k > 1:
        generation = rerank.generate_best_of(modality, loaded, options, draw_seed(seed), k, reward, stream, cancel,
                                             batched=batch and modality.BATCHES)
    else:
        generation = modality.generate(loaded, options, draw_seed(seed), stream, cancel,
                                       batched=batch and modality.BATCHES)
    generation.extra["latency_s"] = time.perf_counter() - t0
    return generation


def configure_batching(window_s: float, max_rows: int) -> None:
    """How long a decoding batch waits at most for more requests after its first, and how many samples it takes."""
    BATCHER.window_s, BATCHER.max_rows = window_s, max_rows


def chat_prompt(messages: list[dict]) -> str:
    """What a chat request asks of a model trained on plain text (it has no chat template): the last user
    message is the prompt, and the reply is its continuation; system and earlier messages are not read."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise BadRequest("messages: give at least one message with role 'user' (its text is the prompt)")
    return users[-1]["content"]


def record(generation: Generation, db: Store, *, source: str, request: dict, files: list[str] | None = None,
           key_id: str | None = None, ids: list[str] | None = None) -> list[str]:
    """Store a generation (aigc.db): one row for text, series and music, one row per image (its PNG is written into
    $AIGC_HOME/generations/ when `files` does not say where it already is; music and video: their files, into
    generations/<id>/), with what best-of-n reranking chose
    (`rerank`: best_of, candidates, chosen, scores; an image's row: its own). Returns the generation ids (`ids`:
    drawn beforehand, e.g. for a stream whose chunks carry the id)."""
    run_dir = Path(generation.record["run"])
    common = {"run": run_dir.name, "run_path": str(run_dir), "run_sha256": weights_sha256(run_dir),
              "modality": generation.modality, "latency_s": generation.extra.get("latency_s", 0.0),
              "key_id": key_id, "source": source}
    settings = generation.record["settings"]
    if generation.modality == "music":  # what remakes it, whatever the default is by then (older rows: without)
        request = {**request, "constrained": settings.get("constrained", False),
                   "grammar_version": (settings.get("grammar") or {}).get("version", 1),
                   **{k: settings[k] for k in ("temperature", "top_k", "top_p") if k in settings}}
    if generation.modality in ("text", "music"):  # the window it was read with (older rows: all positions, 0)
        request = {**request, "window": settings.get("window", 0)}
    reranked = generation.record.get("rerank")
    rerank_of = None if reranked is None else json_safe({"best_of": settings.get("best_of"), **reranked})
    if generation.modality == "image":
        made = []
        for i, (pixels, rec) in enumerate(zip(generation.outputs, generation.record["images"], strict=True)):
            gen_id = ids[i] if ids else new_id("gen")
            if files is None:
                path = store.generations_dir() / f"{gen_id}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(path, pixels, rec)
            else:
                path = Path(files[i])
            one = None if rerank_of is None else {**rerank_of, "chosen": rerank_of["chosen"][i:i + 1],
                                                  "scores": rerank_of["scores"][i:i + 1]}
            made.append(db.add_generation(id=gen_id, request={**request, "index": i}, seed=rec["seed"],
                                          family=rec["family"], file=str(path), output={"class": rec["class"]},
                                          rerank=one, **common))
        return made
    gen_id = ids[0] if ids else new_id("gen")
    if generation.modality in ("music", "video", "sound") and files is None:  # its files, as an image's PNG
        files = save(generation, store.generations_dir() / gen_id)
    stats = generation.record.get("stats", {})
    output = generation.outputs if generation.modality == "text" else \
        json_safe(generation.record["clips"] if generation.modality == "video" else
                  generation.record["sounds"] if generation.modality == "sound" else generation.outputs)
    family = generation.record.get("family") or settings.get("family")
    return [db.add_generation(id=gen_id, request=request, seed=settings.get("seed"), family=family,
                              output=output, file=files[0] if files else None,
                              prompt_tokens=stats.get("prompt_tokens"),
                              completion_tokens=stats.get("generated_tokens"), rerank=rerank_of, **common)]


def weights_sha256(path: Path) -> str | None:
    """The sha256 of the file that names a model's weights (`weights_file`): what a generation was made with."""
    f = weights_file(path)
    return None if f is None else hashlib.sha256(f.read_bytes()).hexdigest()


def check_options(modality: Modality, options: dict, kind: str) -> None:
    """Every option given is one the modality takes (`kind`: GENERATE_OPTIONS or EVALUATE_OPTIONS); the error for
    one that is not says which modality it belongs to."""
    for key in options:
        if key in getattr(modality, kind):
            continue
        flag = ("-" if len(key) == 1 else "--") + key.rstrip("_").replace("_", "-")
        if modality.NAME == "series" and key == "n" and kind == "GENERATE_OPTIONS":
            flag = "-n (use --paths K)"
        owners = [name for name, m in MODALITIES.items() if key in getattr(m, kind)]
        if not owners:
            raise BadRequest(f"unknown option {key!r}")
        raise BadRequest(f"{flag} does not apply to {modality.NAME} runs ({flag.split(' ')[0]} applies to "
                         f"{' and '.join([', '.join(owners[:-1]), owners[-1]] if len(owners) > 2 else owners)} runs)")


def generation_defaults(run: str) -> dict:
    """The value each generation option of a run takes when a request leaves it out (what an interface shows
    as the default): text from GenerateSettings, an image family's from its `sample` keywords, a series' from
    the series modality; and `best_of`, the run's own k, for a run with a reward model (none without: a request
    for best_of > 1 is refused there)."""
    run_dir, modality = resolve(run)
    reward = rerank.reward_of(run_dir) if store.is_run(run_dir) else None
    own = {} if reward is None else {"best_of": reward.info.get("best_of", 1)}
    # a model with positions reads at most its training block unless asked (`window_of`): shown as that number
    window = {}
    if modality.NAME in ("text", "music"):
        loaded = MODELS.get(modality, run_dir)
        window = {"window": window_of(loaded, None)} if loaded.max_context is not None else {}
    if modality.NAME == "text":
        fields = dataclasses.fields(GenerateSettings)
        return {**{f.name: f.default for f in fields if f.name in modality.GENERATE_OPTIONS and f.name != "stop"},
                **window, **own}
    if modality.NAME == "series":
        return {**series.GENERATE_DEFAULTS, **own}
    if modality.NAME == "music":
        return {**music.GENERATE_DEFAULTS, **music.sampling_of(run_dir), **window, **own}
    fam = FAMILIES[store.read_run(run_dir)["family"]]
    model_class = getattr(fam.load, "__self__", None)  # e.g. Diffusion.load: a classmethod
    keywords = inspect.signature(model_class.sample).parameters if model_class is not None and fam.sampler_options \
        else {}  # a video predictor has no sampler
    settings = read_toml(run_dir / "config.toml")  # a keyword whose default is None takes the run's own setting
    return {"n": 1, **{name: settings.get(name) if keywords[name].default is None else keywords[name].default
                       for name in fam.sampler_options
                       if name in keywords and keywords[name].default is not inspect.Parameter.empty}, **own}


def openings(run: str) -> list[str]:
    """The pieces whose opening a music run continues (`prompt_piece`): its validation pieces, by name; none for a
    run of another modality."""
    run_dir, modality = resolve(run)
    return music.openings(run_dir) if modality.NAME == "music" and store.is_run(run_dir) else []


def keep_midi(data: bytes, what: str) -> str:
    """A MIDI file a request carried (the API's prompt_midi_b64, harmonise_midi_b64), checked and kept by its content
    (aigc.uploads.keep_midi): the path to generate with as `prompt_midi` or `harmonise_midi`, as the CLI's file."""
    return str(uploads.keep_midi(data, what))


def training_data(data: str, sets: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The data a training reads and the configuration keys it takes. An upload's id (`upl-...`, POST /v1/uploads)
    is the upload's files, with the keys its check found those files need (the upload's `summary.train_sets`: clips
    shorter than a clip's default length say the clip length and the predictor's context) under `sets`: the
    caller's own keys win. Anything else is returned as given. The CLI, the API and the studio train through here,
    so an upload trains the same from each (NotFound for an upload id that is not one)."""
    if not (isinstance(data, str) and data.startswith("upl-")):
        return data, dict(sets or {})
    upload = uploads.get_upload(data)
    return upload["data"], {**upload["summary"].get("train_sets", {}), **(sets or {})}


def datasets() -> list[dict]:
    """The named data sets, each with its modality, a description and whether it is installed here (a missing
    one says which package provides it)."""
    rows = [{"name": name, "modality": "text", "description": c.description, "package": c.package,
             "installed": corpus_installed(name)} for name, c in CORPORA.items()]
    rows += [{"name": name, "modality": "image", "description": d.description, "package": d.package,
              "installed": named_installed(name)} for name, d in NAMED_IMAGES.items()]
    rows += [{"name": name, "modality": "series", "description": d.description, "package": "statsmodels",
              "installed": True} for name, d in NAMED_SERIES.items()]
    rows += [{"name": name, "modality": "music", "description": f"{d.description} ({d.licence})",
              "package": d.package, "installed": True} for name, d in MUSIC_CORPORA.items()]
    rows += [{"name": name, "modality": "video", "description": d.description, "package": d.package,
              "installed": named_installed(d.images)} for name, d in NAMED_VIDEOS.items()]
    rows += [{"name": name, "modality": "video", "description": f"{d.description} ({d.licence})",
              "package": d.package, "installed": real_installed(name)} for name, d in REAL_VIDEOS.items()]
    rows += [{"name": name, "modality": "sound", "description": d.description, "package": d.package,
              "installed": sound_installed(name)} for name, d in NAMED_SOUNDS.items()]
    return rows


def regenerate_image(path: str) -> Generation:
    """An image again, from the generation record its PNG carries (a clip, from its GIF's or MP4's; a sound, from
    its spectrogram PNG's or its JSON)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".gif", ".mp4"):
        return video.regenerate(path)
    if suffix == ".json" or (Path(path).is_file() and _made_by_sound_run(Path(path))):
        return sound.regenerate(path)
    return image.regenerate(path)


def _made_by_sound_run(png: Path) -> bool:
    """Whether the run a PNG's record names is a sound run (a spectrogram), by that run's record."""
    try:
        run = read_png_record(png).get("run")
        return store.modality_of(store.read_run(store.find_run(run))) == "sound"
    except (UserError, NotFound, OSError, ValueError, AttributeError):
        return False  # image.regenerate says what is wrong with it


def default_out_dir(generation: Generation) -> Path:
    """Where `aigc generate` writes files when it is given no --out: inside the run."""
    run_dir, settings = Path(generation.record["run"]), generation.record["settings"]
    if generation.modality == "series":
        return run_dir / "generated" / f"horizon-{settings['horizon']}-seed-{settings['seed']}"
    if generation.modality in ("image", "video", "sound") and "source" in generation.extra:  # --from-image
        return Path(generation.extra["source"]).parent / "regenerated"
    return run_dir / "generated" / f"seed-{settings['seed']}"


def save(generation: Generation, out_dir: Path | None = None) -> list[str]:
    """Write a generation's files (PNGs with their records, forecast CSV and fan chart, samples.jsonl)."""
    return MODALITIES[generation.modality].save(generation, Path(out_dir) if out_dir else default_out_dir(generation))


# ----------------------------------------------------------------------------------
# evaluation


def evaluate(run: str, options: dict | None = None) -> dict:
    """Evaluate a run (its modality's metrics) and write eval.json into it."""
    run_dir = store.find_run(run)
    record = store.read_run(run_dir)
    modality = MODALITIES[store.modality_of(record)]
    options = {k: v for k, v in (options or {}).items() if v is not None}
    check_options(modality, options, "EVALUATE_OPTIONS")
    return modality.evaluate(run_dir, record, options)


def calibrate(run: str, pieces: int | None = None) -> dict:
    """Fit a music run's sampling temperature on its training pieces (aigc.modalities.music.calibrate; runs of rnn
    and gpt do it when training ends): what it samples at from then on unless asked otherwise."""
    run_dir = store.find_run(run)
    record = store.read_run(run_dir)
    if store.modality_of(record) != "music":
        raise BadRequest(f"calibrate applies to music runs; {run_dir.name} is a {store.modality_of(record)} run")
    if record.get("status") != "done":
        raise Conflict(f"run {run_dir.name!r} has not finished training (status: {record.get('status')})")
    field = fields_of(music.MusicSamplingConfig)["calibration_pieces"]  # its default and range: the option's own
    pieces = field.default if pieces is None else pieces
    if not field.metadata["min"] <= pieces <= field.metadata["max"]:
        raise BadRequest(f"--pieces must be in {field.metadata['min']}..{field.metadata['max']}, got {pieces}")
    return music.calibrate(run_dir, pieces)


def evaluate_image_folder(folder: str, data: str, n: int | None = None, *, out: str | None = None) -> dict:
    """Score a folder of images against a data set's held-out images, as an image run is scored."""
    return image.evaluate_folder(folder, data, image.EVAL_IMAGES if n is None else n, out=out)


# ----------------------------------------------------------------------------------
# sweeps (aigc.sweep runs them; aigc.studies reads them)


def sweeps(url: str | None = None, runs: Path | None = None) -> list[dict]:
    """Every sweep in the database `url` (default: the store's), the newest first: {name, family, data, objective,
    budget_minutes, trials, states (trial counts by state), best ({number, value, params, run, here}), started,
    last}. `here`: whether the run is in `runs` (default: $AIGC_HOME/runs)."""
    return studies.list_sweeps(url or default_url(), store.runs_dir() if runs is None else Path(runs))


def sweep(name: str, url: str | None = None, runs: Path | None = None) -> dict:
    """One sweep (NotFound for a name no `aigc sweep` made): as in `sweeps`, and every trial ({number, state, value,
    params, run, here, status, error, best, duration_s, started}), the search space, the parameters' importances
    and the `aigc sweep` command that adds trials to it."""
    return studies.describe_sweep(name, url or default_url(), store.runs_dir() if runs is None else Path(runs))
