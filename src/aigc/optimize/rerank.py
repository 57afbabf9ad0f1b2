"""Best-of-n reranking with a reward model learned from people's ratings: `aigc optimize --method rerank` fits
it, `aigc generate --best-of N` (the API's `best_of`, the studio's switch) uses it.

A reward reads features that the run itself, or its evaluation, computes (`features_of`):
- text: the run's own embeddings and last hidden layer over the completion (aigc.optimize.reward.features);
- music: the same, over a piece's event tokens (a music run is a text family on token ids);
- series: summary statistics of a sample path in the units of the run's own series (`path_features`);
- images: the penultimate layer of the evaluation's feature net, the classifier (or autoencoder) that `aigc eval`
  trains once on the run's training split and caches (aigc.evaluate.images.feature_net, seed 0);
- sounds: the same, the net trained on the sound run's training spectrograms (the one its KID reads);
- clips: summary statistics of a clip (`clip_statistics`: its coarse mean frame, brightness, where the object is
  and how it moves), and for a named one-object clip set also the clip net's features (aigc.evaluate.clipnet: the
  net the clip-level Fréchet distance reads, which knows the object's class and the clip's motion).

Best of k: a request for n outputs draws n * k candidates with its seed (text: one request of n * k samples;
images, clips and sounds: seeds seed .. seed + n * k - 1), scores each, and keeps one of each consecutive group of
k: the highest (`pick` "best", text's default) or the first the reward judges liked, else the first (`pick`
"first-liked", rejection sampling: images' default, measured in docs/optimize.md). The same request and seed give
the same outputs; an image, a clip or a sound kept carries its own seed, so its file makes it again alone. Rated
clips and sounds are read as their records (aigc.optimize.feedback) and made again from them.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aigc.checkpoint import MANIFEST
from aigc.data.images import read_png, to_tensor
from aigc.errors import BadRequest, UserError
from aigc.evaluate import clipnet
from aigc.evaluate.images import feature_net
from aigc.fsutil import read_json
from aigc.modalities import image as image_modality
from aigc.modalities import sound as sound_modality
from aigc.modalities import video as video_modality
from aigc.modalities.base import Generation
from aigc.optimize import reward as rewards
from aigc.optimize.feedback import Feedback

REWARD_FILES = ("reward.safetensors", "reward.json")
MAX_BEST_OF = 64
HELD_OUT_SHARE = 0.2  # of the rated outputs, to measure the reward's accuracy on outputs it never saw
MIN_HELD_OUT = 10  # rated outputs needed before a held-out accuracy is measured


# ----------------------------------------------------------------------------------
# features


def features_of(modality: str, loaded, prompts: list[str], outputs: list) -> torch.Tensor:
    """(N, D) float32 features of N outputs of a loaded run: texts (each starting with its prompt), pieces of music
    (their token strings, or the outputs of a generation, whole: prompts are ignored), uint8 (H, W, C) images,
    uint8 (T, H, W, C) clips, or sounds (a generation's outputs, or their (H, W, 1) spectrograms) (prompts are
    ignored)."""
    if modality == "text":
        return rewards.features(loaded, prompts, outputs)
    if modality == "music":
        pieces = [o["tokens"] if isinstance(o, dict) else o for o in outputs]
        return rewards.features(loaded, [""] * len(pieces), pieces)
    if modality == "series":
        return path_features(loaded.series.values, outputs)
    if modality == "image":
        return image_features(loaded, outputs)
    if modality == "sound":
        return image_features(loaded, [o["spectrogram"] if isinstance(o, dict) else o for o in outputs])
    if modality == "video":
        return video_features(loaded, outputs)
    raise BadRequest(f"best-of-n reranking takes text, image, music, series, video and sound runs, not {modality} "
                     f"runs")


PATH_FEATURES = ("end", "start", "mean", "end_minus_start", "slope", "std", "max", "min", "mean_abs_step",
                 "step_autocorrelation")


def path_features(series_values: np.ndarray, paths: list) -> torch.Tensor:
    """(N, len(PATH_FEATURES)) float32 features of N sample paths (each H >= 1 values continuing the series, or
    their JSON as feedback keeps them): levels relative to the series' last value, every quantity divided by the
    series' standard deviation, so one reward reads any horizon."""
    last, scale = float(series_values[-1]), float(np.std(series_values)) or 1.0
    rows = []
    for path in paths:
        y = (np.asarray(json.loads(path) if isinstance(path, str) else path, dtype=np.float64) - last) / scale
        if y.ndim != 1 or len(y) == 0 or not np.isfinite(y).all():
            raise BadRequest(f"a sample path must be a list of finite numbers, got {str(path)[:40]!r}")
        steps = np.diff(np.concatenate([[0.0], y]))  # the first step is from the series' last value
        slope = float(np.polyfit(np.arange(len(y), dtype=np.float64), y, 1)[0]) if len(y) > 1 else float(y[0])
        corr = 0.0
        if len(steps) > 2 and np.std(steps[1:]) > 0 and np.std(steps[:-1]) > 0:
            corr = float(np.corrcoef(steps[1:], steps[:-1])[0, 1])
        rows.append([y[-1], y[0], y.mean(), y[-1] - y[0], slope, y.std(), y.max(), y.min(), np.abs(steps).mean(),
                     corr])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(PATH_FEATURES))


_NETS: dict[tuple[str, str], torch.nn.Module] = {}
_NETS_LOCK = threading.Lock()


SPLITS = {"image": image_modality.recorded_split, "sound": sound_modality.recorded_split}


def image_features(loaded, images: list[np.ndarray]) -> torch.Tensor:
    """The evaluation feature net's features (N, F) of an image (or sound) run's images (spectrograms), the net
    trained on (or loaded from the cache for) the run's training split."""
    return pixel_features(loaded, to_tensor(np.stack(images)))


def pixel_features(loaded, x: torch.Tensor) -> torch.Tensor:
    """`image_features` of images already as pixels (N, C, H, W) in [-1, 1]."""
    key = (str(loaded.path), loaded.record["data"]["train"]["sha256"])
    with _NETS_LOCK:
        net = _NETS.get(key)
    if net is None:
        train, _ = SPLITS[loaded.modality](loaded.path, loaded.record, loaded.configs["data"])
        net, _ = feature_net(train, seed=0)
        with _NETS_LOCK:
            _NETS[key] = net
    with torch.no_grad():
        return torch.cat([net.features(x[i:i + 500]) for i in range(0, len(x), 500)]).float()


CLIP_STATISTICS = 16 + 3 + 6 + 2  # see clip_statistics


def clip_statistics(clips: np.ndarray) -> torch.Tensor:
    """(N, CLIP_STATISTICS) float32 summary statistics of uint8 clips (N, T, H, W, C), pixels in [0, 1] averaged over
    the channels: the mean frame pooled to 4 x 4; the mean brightness of the first and the last frame and of all;
    the brightness centre (as a fraction of the frame) at the first and the last frame and its mean speed and
    spread; the mean absolute change of a pixel from one frame to the next and the pixels' standard deviation."""
    x = torch.from_numpy(np.ascontiguousarray(clips)).double().mean(dim=4) / 255.0  # (N, T, H, W)
    n, t, h, w = x.shape
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).reshape(n, 16)
    brightness = x.mean(dim=(2, 3))  # (N, T)
    mass = x.sum(dim=(2, 3)).clamp_min(1e-9)
    cy = (x.sum(3) * torch.arange(h, dtype=torch.float64)).sum(2) / mass / max(h - 1, 1)
    cx = (x.sum(2) * torch.arange(w, dtype=torch.float64)).sum(2) / mass / max(w - 1, 1)
    speed = torch.hypot(cy.diff(dim=1), cx.diff(dim=1)).mean(1) if t > 1 else torch.zeros(n, dtype=torch.float64)
    spread = (cy.std(1, unbiased=False) + cx.std(1, unbiased=False))
    change = x.diff(dim=1).abs().mean(dim=(1, 2, 3)) if t > 1 else torch.zeros(n, dtype=torch.float64)
    rows = [pooled, brightness[:, :1], brightness[:, -1:], brightness.mean(1, keepdim=True), cy[:, :1], cx[:, :1],
            cy[:, -1:], cx[:, -1:], speed[:, None], spread[:, None], change[:, None], x.std(dim=(1, 2, 3))[:, None]]
    return torch.cat(rows, dim=1).float()


def _reads_clip_net(loaded) -> bool:
    return loaded.record["data"]["train"]["source"] in video_modality.v.NAMED_VIDEOS and \
        loaded.configs["data"].objects == 1


def _clip_kind(loaded) -> str:
    return "clip-statistics+clip-net" if _reads_clip_net(loaded) else "clip-statistics"


def video_features(loaded, clips: list[np.ndarray]) -> torch.Tensor:
    """Clips' features (module docstring): their statistics, and the clip net's features for a named one-object
    clip set."""
    stacked = np.stack(clips)
    features = [clip_statistics(stacked)]
    if _reads_clip_net(loaded):
        net, _ = clipnet.clip_net(loaded.record["data"]["train"]["source"], loaded.configs["data"])
        features.append(clipnet.clip_features(net, stacked).float())
    return torch.cat(features, dim=1)


# ----------------------------------------------------------------------------------
# fitting a reward on a run's feedback


def fit_from_feedback(modality: str, loaded, feedback: Feedback, *, l2: float) -> rewards.Reward:
    """A reward fitted to every rated output and preference pair of `feedback`, on features of `loaded` (the
    run the feedback is about). Its info also holds the accuracy on held-out rated outputs (a fit on the others)
    where there are enough of them."""
    outputs, prompts, row_of = [], [], {}
    for prompt, output in [(r.prompt, r.output) for r in feedback.rated] + \
            [(p.prompt, side) for p in feedback.pairs for side in (p.chosen, p.rejected)]:
        if (prompt, output) not in row_of:
            row_of[prompt, output] = len(outputs)
            prompts.append(prompt)
            outputs.append(output)
    X = features_of(modality, loaded, prompts, _contents(modality, loaded, outputs))
    labels = torch.full((len(outputs),), float("nan"), dtype=torch.float64)
    rated = [r for r in feedback.rated if r.score != 0]
    for r in rated:
        labels[row_of[r.prompt, r.output]] = 1.0 if r.score > 0 else 0.0
    pairs = [(row_of[p.prompt, p.chosen], row_of[p.prompt, p.rejected]) for p in feedback.pairs]
    kind = rewards.feature_kind(loaded) if modality in ("text", "music") else \
        "path-statistics" if modality == "series" else _clip_kind(loaded) if modality == "video" else \
        "evaluation-features"
    reward = rewards.fit(X, labels, pairs, l2=l2, kind=kind)

    # accuracy on rated outputs the reward did not see: a fit on the others (each output held out or not by a hash of
    # its generation and index, so the same feedback holds out the same outputs)
    held = [r for r in rated if zlib.crc32(f"{r.generation_id}:{r.index}".encode()) % 100 < HELD_OUT_SHARE * 100]
    reward.info["heldout_accuracy"] = reward.info["heldout_n"] = None
    if len(held) >= MIN_HELD_OUT:
        held_rows = {row_of[r.prompt, r.output] for r in held}
        train_labels = labels.clone()
        train_labels[list(held_rows)] = float("nan")
        train_pairs = [(c, r) for c, r in pairs if c not in held_rows and r not in held_rows]
        try:
            partial = rewards.fit(X, train_labels, train_pairs, l2=l2, kind=kind)
        except BadRequest:  # the rest is all liked or all disliked: no accuracy to measure
            return reward
        rows = sorted(held_rows)
        right = (partial.score(X[rows]) > 0).double() == labels[rows]
        reward.info.update(heldout_accuracy=float(right.double().mean()), heldout_n=len(rows))
    return reward


def fit_for_run(modality: str, loaded, feedback: Feedback, cfg) -> rewards.Reward:
    """The reward of a new rerank run: fitted on `loaded` (the parent) with the [optimize] keys of `cfg` (l2, and
    best_of, the k its generations use unless a request says otherwise)."""
    t0 = time.perf_counter()
    reward = fit_from_feedback(modality, loaded, feedback, l2=cfg.l2)
    reward.info.update(best_of=cfg.best_of, pick=cfg.pick, fit_seconds=time.perf_counter() - t0)
    return reward


def reward_run_files(parent_dir: Path, reward: rewards.Reward) -> Callable[[Path], None]:
    """What a rerank run holds beside its record: the parent's model files, unchanged, and the reward."""

    def write(staging: Path) -> None:
        manifest = Path(parent_dir) / MANIFEST
        for name in [*read_json(manifest)["files"], MANIFEST]:
            shutil.copy2(Path(parent_dir) / name, staging / name)
        reward.save(staging)

    return write


def fitted(reward: rewards.Reward) -> dict:
    """A rerank run's "training": the reward's fit."""
    return {"steps": 0, "train_time_s": reward.info["fit_seconds"]}


def _contents(modality: str, loaded, outputs: list[str]) -> list:
    """What features read: texts and pieces' tokens as they are; images' PNG files as (H, W, C) uint8 arrays of the
    run's shape; clips and sounds made again from their records (the run's weights, the record's seed, class and
    sampling options: the same bytes that were rated)."""
    if modality in ("text", "music", "series"):  # series: paths as JSON, read by path_features
        return outputs
    if modality in ("video", "sound"):
        return [_remade(modality, loaded, json.loads(output)) for output in outputs]
    channels, height, width = loaded.record["image_shape"]
    images = []
    for path in outputs:
        if not Path(path).is_file():
            raise UserError(f"a rated image is missing: {path} (the store keeps the path of each generated PNG)")
        image = read_png(Path(path), channels)
        if image.shape != (height, width, channels):
            raise UserError(f"{path}: a {image.shape[1]}x{image.shape[0]} image, and run {loaded.path.name} makes "
                            f"{width}x{height}")
        images.append(image)
    return images


def _remade(modality: str, loaded, rec: dict) -> np.ndarray:
    """A rated clip (T, H, W, C) or sound's spectrogram (H, W, 1), made again from its record by `loaded`."""
    if not isinstance(rec, dict) or not isinstance(rec.get("seed"), int) or "class" not in rec:
        raise UserError(f"a rated {modality} output's record has no seed and class: {str(rec)[:80]}")
    if modality == "video":
        if loaded.record.get("job") == "predict":
            raise BadRequest(f"run {loaded.path.name} predicts clips: there is nothing to choose among")
        return video_modality.sample_clip(loaded.model, rec, loaded.record["clip_shape"])
    return image_modality.sample_one(loaded.model, rec)


# ----------------------------------------------------------------------------------
# the reward of a run, and generation with it

_REWARDS: dict[str, tuple[tuple, rewards.Reward]] = {}
_REWARDS_LOCK = threading.Lock()


def reward_of(run_dir: Path) -> rewards.Reward | None:
    """The reward model a run holds (a run made by `aigc optimize --method rerank`), None for a run without one;
    loaded once and again when its file changes."""
    path = Path(run_dir) / REWARD_FILES[0]
    if not path.is_file():
        return None
    stat = path.stat()
    signature = (stat.st_mtime_ns, stat.st_size)
    with _REWARDS_LOCK:
        hit = _REWARDS.get(str(path))
    if hit is not None and hit[0] == signature:
        return hit[1]
    loaded = rewards.Reward.load(run_dir)
    with _REWARDS_LOCK:
        _REWARDS[str(path)] = (signature, loaded)
    return loaded


def check_best_of(best_of: int) -> None:
    if not (isinstance(best_of, int) and 1 <= best_of <= MAX_BEST_OF):
        raise BadRequest(f"--best-of must be in 1..{MAX_BEST_OF}, got {best_of}")


def generate_best_of(modality, loaded, options: dict, seed: int, k: int, reward: rewards.Reward,
                     stream: Callable[[str], None] | None = None, cancel: threading.Event | None = None, *,
                     batched: bool = False) -> Generation:
    """n outputs, each the best by `reward` of k candidates (module docstring). A text stream gets the chosen
    continuation in one piece once the candidates are scored."""
    name = modality.NAME
    if name == "series":
        return _best_paths(modality, loaded, options, seed, k, reward)
    n = options.get("n") or (64 if name == "image" else 1)
    if name == "text" and (options.get("num_beams") or 1) > 1:
        raise BadRequest(f"--best-of {k} draws candidates by sampling: it does not apply to beam search "
                         f"(--num-beams); pass --best-of 1 to search the beams of this run")
    if name in ("text", "music") and options.get("temperature") == 0:
        raise BadRequest(f"--best-of {k} with --temperature 0 would score {k} identical candidates: sample with a "
                         f"temperature > 0, or pass --best-of 1")
    candidates = _candidates(modality, loaded, options, seed, n * k, cancel, batched)
    prompt = options.get("prompt") or ""
    X = features_of(name, loaded, [prompt] * (n * k), candidates.outputs)
    scores = reward.score(X)
    pick = reward.info.get("pick", "best")  # a reward fitted before `pick` existed keeps the best
    chosen = rewards.best_of(scores, n, k, pick)
    outputs = [candidates.outputs[i] for i in chosen]
    record = dict(candidates.record)
    record["settings"] = {**record["settings"], "n": n, "best_of": k}
    record["rerank"] = {"candidates": n * k, "pick": pick, "chosen": chosen,
                        "scores": [float(scores[i]) for i in chosen],
                        "features": reward.info.get("features")}
    if name in ("text", "music"):
        stats = dict(record["stats"])
        stats["finish_reasons"] = [stats["finish_reasons"][i] for i in chosen]
        record["stats"] = stats  # generated_tokens stays every candidate's: what was computed
        if stream is not None:
            stream(outputs[0][len(prompt):])
    else:  # each image, clip or sound carries its own record
        key = PER_ITEM[name]
        record[key] = [{**record[key][i], "best_of": k} for i in chosen]
    return Generation(name, outputs, record, dict(candidates.extra))


PER_ITEM = {"image": "images", "video": "clips", "sound": "sounds"}  # the record's list of each output's own record
CANDIDATE_CHUNK = 64  # images, clips or sounds drawn at a time (output i uses seed + i: chunks change nothing)


def _candidates(modality, loaded, options: dict, seed: int, total: int, cancel: threading.Event | None,
                batched: bool) -> Generation:
    """`total` candidates; images, clips and sounds CANDIDATE_CHUNK at a time (a request's own cap on n bounds what
    a person asks for, not the candidates of a best of k), as one generation."""
    key = PER_ITEM.get(modality.NAME)
    if key is None or total <= CANDIDATE_CHUNK:
        return modality.generate(loaded, {**options, "n": total}, seed, None, cancel, batched=batched)
    parts = [modality.generate(loaded, {**options, "n": min(CANDIDATE_CHUNK, total - start)}, seed + start, None,
                               cancel, batched=batched) for start in range(0, total, CANDIDATE_CHUNK)]
    record = {**parts[0].record, key: [r for part in parts for r in part.record[key]]}
    record["settings"] = {**record["settings"], "n": total, "seed": seed}
    return Generation(modality.NAME, [o for part in parts for o in part.outputs], record, dict(parts[0].extra))


def _best_paths(modality, loaded, options: dict, seed: int, k: int, reward: rewards.Reward) -> Generation:
    """A forecast whose N sample paths are each the best by `reward` of k: N x k paths drawn with the seed, the
    best of each consecutive group of k kept; the point forecast and its intervals are the model's."""
    n = options.get("paths") or 0
    if n < 1:
        raise BadRequest(f"--best-of {k} chooses among sample paths: ask for some (--paths N), or pass --best-of 1")
    candidates = modality.generate(loaded, {**options, "paths": n * k}, seed, None)
    paths = candidates.outputs["paths"]
    scores = reward.score(path_features(loaded.series.values, paths))
    pick = reward.info.get("pick", "best")  # a reward fitted before `pick` existed keeps the best
    chosen = rewards.best_of(scores, n, k, pick)
    record = dict(candidates.record)
    record["settings"] = {**record["settings"], "paths": n, "best_of": k}
    record["rerank"] = {"candidates": n * k, "pick": pick, "chosen": chosen,
                        "scores": [float(scores[i]) for i in chosen],
                        "features": reward.info.get("features")}
    extra = dict(candidates.extra)
    extra["sampled"] = candidates.extra["sampled"][chosen]
    return Generation(modality.NAME, {**candidates.outputs, "paths": [paths[i] for i in chosen]}, record, extra)
