"""The video modality: clips in (moving objects made by seeded code, the real set vtest, or the user's GIF and MP4
files), two jobs out.

- predict: a predictor family (`simvp`, modality "video") learns the next frames of a clip from its first
  `context` frames; scored by MSE, MAE, PSNR and SSIM per frame beside three floors (the last frame copied, black
  frames, the mean frame).
- generate: an image family (vae, diffusion) trained on clips with the frames stacked as channels (a clip of T
  frames of C x H x W is an image of T * C x H x W), so the families are reused, not copied; conditional on the
  clip's class where the clips have one object of a labelled set.
- both: a video family trained in stages (`vae-rnn`: a per-frame VAE, then a GRU on its latent sequence; one
  training loop a stage, the budget split by the family's `vae_share`) makes clips and predicts them: its run's job
  is "generate" (`aigc generate` samples clips) and it is scored on both jobs.

A generation is clips as uint8 arrays (T, H, W, C) with one record each; `save` writes a GIF and an MP4 per clip
(its record as the GIF comment and the MP4 comment tag) and a PNG frame sheet (the generation's record as its text
chunk). The same run, seed and
options make the same bytes. See docs/video.md.
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
from aigc.config import to_toml
from aigc.data import video as v
from aigc.data.images import load_images, save_png
from aigc.data.images import to_tensor as to_image_tensor
from aigc.distributed import is_main_process, on_main
from aigc.errors import BadRequest, Cancelled, NotFound, UserError
from aigc.evaluate import clipnet
from aigc.evaluate import video as metrics_of
from aigc.evaluate.images import extract_features, feature_net, fid_from_features
from aigc.fsutil import read_json, write_json
from aigc.modalities import image
from aigc.modalities.base import Generation, Prepared, init_changes
from aigc.models import Family
from aigc.models.vae import VAE
from aigc.models.vae_rnn import FrameStage
from aigc.store import card_header, card_lineage, continued_from, find_run, read_run
from aigc.train import Budget, train_loop

NAME = "video"
BATCHES = False
GENERATE_OPTIONS = ("n", "class_", "sampler", "steps", "eta", "guidance_scale", "temperature")
EVALUATE_OPTIONS = ("n",)
MAX_CLIPS = 256  # `aigc generate -n` cap
SHEET_CLIPS = 4  # clips in the frame sheet saved at every evaluation in training
EVAL_BATCH = 100  # clips per forward pass when scoring
EVAL_CLIPS = 200  # a generator's clips scored by `aigc eval` (at most the validation clips)
FINISH_CLIPS = 200  # a predictor's validation clips scored when training ends (`aigc eval` scores them all)


def predicts(fam: Family) -> bool:
    """Whether the family only predicts (a video family in one stage, simvp); else it makes clips (an image family,
    frames as channels, or a staged video family, which also predicts: `scores_prediction`)."""
    return fam.modality == NAME and not fam.stages


def scores_prediction(fam: Family) -> bool:
    """Whether the family's runs predict the frames after `context` and are scored on that job."""
    return fam.modality == NAME


# ----------------------------------------------------------------------------------
# training


def sections(fam: Family) -> dict[str, type]:
    return {"model": fam.config, "data": v.VideoDataConfig, "train": fam.train_config}


def source_of(data: str) -> str:
    return data if v.is_named(data) else str(Path(data).expanduser().resolve())


def check_request(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None) -> None:
    """Video runs hold out their own clips (a run continued with --init-from: `continued_model` checks it)."""
    if val_data is not None:
        raise BadRequest("--val-data does not apply to video runs yet: a named clip set makes its validation clips "
                         "from the test images, a folder holds out --set val_fraction=F of its clips")
    if fam.phases:
        raise BadRequest(f"{family} does not make clips yet: use vae or diffusion (frames as channels), vae-rnn (a "
                         f"per-frame VAE and a GRU), or simvp to predict")


class VideoBatches:
    """Training batches of clips (N, T * C, H, W) in [-1, 1], with labels for a conditional generator: fresh clips
    every batch from a named set's training images, or random draws from a folder's clips; the validation clips
    in fixed order. The family's forward returns {"loss": ...}."""

    unit = "clips"
    items_per_sample = 1

    def __init__(self, train: v.Clips | v.ClipMaker, val: v.Clips, conditional: bool):
        self.train, self.val, self.conditional = train, val, conditional

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        if isinstance(self.train, v.ClipMaker):
            clips, labels = self.train.make(generator, n)
        else:
            idx = torch.randint(0, self.train.n, (n,), generator=generator).numpy()
            clips, labels = self.train.clips[idx], None if self.train.labels is None else self.train.labels[idx]
        x = v.to_tensor(clips)
        return (x, torch.from_numpy(labels)) if self.conditional else (x,)

    def val_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        out = []
        for i in range(0, min(self.val.n, n_batches * batch), batch):
            x = v.to_tensor(self.val.clips[i:i + batch])
            out.append((x, torch.from_numpy(self.val.labels[i:i + batch])) if self.conditional else (x,))
        return out

    def noise(self, model, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        return model.draw_noise(n, device=device)

    def loss(self, model, batch: tuple[torch.Tensor, ...], *, phase: str | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return model(*batch, noise=noise)["loss"]

    def val_metrics(self, val_loss: float) -> dict:
        return {}


class FrameBatches(VideoBatches):
    """Single frames (N, C, H, W) of the clips, for a staged family's per-frame VAE: FRAMES_PER_CLIP distinct frames
    of each fresh clip (making a clip costs about as much as a VAE step on one frame), the validation clips' frames
    in order."""

    unit = "frames"
    FRAMES_PER_CLIP = 4

    def __init__(self, train: v.Clips | v.ClipMaker, val: v.Clips, conditional: bool, channels: int):
        super().__init__(train, val, conditional)
        self.channels = channels

    def _frames(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = batch[0]  # (N, T * C, H, W) -> (N, T, C, H, W)
        return (x.reshape(x.shape[0], -1, self.channels, *x.shape[2:]), *batch[1:])

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        k = min(self.FRAMES_PER_CLIP, self.val.shape[0])
        x, *y = self._frames(super().sample(generator, math.ceil(n / k)))
        pick = torch.rand(x.shape[:2], generator=generator).argsort(dim=1)[:, :k]  # (M, k) distinct frames a clip
        frames = x[torch.arange(len(x))[:, None], pick].flatten(0, 1)[:n]  # (n, C, H, W)
        return (frames, *(labels.repeat_interleave(k)[:n] for labels in y))

    def val_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        clips = super().val_batches(math.ceil(n_batches * batch / self.val.shape[0]), batch)
        frames = [self._frames(b) for b in clips]
        x = torch.cat([f[0].flatten(0, 1) for f in frames])[:n_batches * batch]
        y = torch.cat([f[1].repeat_interleave(f[0].shape[1]) for f in frames])[:len(x)] if self.conditional else None
        return [(x[i:i + batch],) if y is None else (x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


class FramePairs(FrameBatches):
    """Pairs of frames of one clip (N, 2 * C, H, W), for a split run's first stage (models/vae_rnn.py's
    `FrameStage`): two pairs of distinct frames from each fresh clip; of each validation clip, the frames half a
    clip apart (t, t + T // 2) in order."""

    unit = "pairs"

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        per = 2 if self.val.shape[0] >= 4 else 1  # pairs a clip (of distinct frames)
        x, *y = self._frames(VideoBatches.sample(self, generator, math.ceil(n / per)))  # (M, T, C, H, W)
        pick = torch.rand(x.shape[:2], generator=generator).argsort(dim=1)[:, :2 * per]
        pairs = x[torch.arange(len(x))[:, None], pick].reshape(len(x) * per, 2 * x.shape[2], *x.shape[3:])[:n]
        return (pairs, *(labels.repeat_interleave(per)[:n] for labels in y))

    def val_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        t, half = self.val.shape[0], self.val.shape[0] // 2
        clips = VideoBatches.val_batches(self, math.ceil(n_batches * batch / half), batch)
        x = torch.cat([b[0] for b in clips])
        x = x.reshape(x.shape[0], t, self.channels, *x.shape[2:])
        pairs = torch.stack([x[:, :half], x[:, half:2 * half]], dim=2)  # (M, half, 2, C, H, W)
        pairs = pairs.flatten(0, 1).flatten(1, 2)[:n_batches * batch]  # (M * half, 2 * C, H, W)
        y = torch.cat([b[1] for b in clips]).repeat_interleave(half)[:len(pairs)] if self.conditional else None
        return [(pairs[i:i + batch],) if y is None else (pairs[i:i + batch], y[i:i + batch])
                for i in range(0, len(pairs), batch)]


def prepare(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None, configs: dict,
            values: dict) -> Prepared:
    """Make or read the clips, split them, build the model: a predictor of the frames after `context`, or an image
    family on T * C channels."""
    cfg = configs["data"]
    train, val = v.load_split(data, cfg)
    t, h, w, c = val.shape
    torch.manual_seed(configs["train"].seed)  # the initial weights depend on the seed alone
    if scores_prediction(fam) and min(h, w) <= metrics_of.SSIM_MIN_SIDE:
        raise BadRequest(f"{family}: frames of {h}x{w} are too small to score: SSIM (the evaluation's, and the "
                         f"loss's) needs more than {metrics_of.SSIM_MIN_SIDE} pixels a side; give --set size=N")
    if init_from:
        model, num_classes = continued_model(fam, Path(init_from), configs, values, val, data)
        cfg = configs["data"]
    elif fam.stages:
        num_classes = len(val.class_names) if cfg.conditional else 0
        model = _build_staged(family, fam, configs, val.shape, num_classes)
    elif predicts(fam):
        if cfg.conditional:
            raise BadRequest(f"--conditional applies to clip generators (vae, diffusion, vae-rnn), not the predictor "
                             f"{family}")
        try:
            model = fam.build(configs["model"], (c, h, w), cfg.context, t - cfg.context)
        except ValueError as e:
            raise BadRequest(f"{family}: {e}") from None
        num_classes = 0
    else:
        num_classes = len(val.class_names) if cfg.conditional else 0
        try:
            model = fam.build(configs["model"], (t * c, h, w), num_classes)
        except ValueError as e:
            raise BadRequest(f"{family}: {e}") from None
    record = {
        "job": "predict" if predicts(fam) else "generate", "clip_shape": [t, h, w, c],
        "context": cfg.context if scores_prediction(fam) else None, "num_classes": num_classes,
        "class_names": list(val.class_names) if num_classes else None,
        "data": {"train": v.describe(train, source_of(data)), "val": v.describe(val, held_out(data))},
    }
    return Prepared(model, record, VideoBatches(train, val, cfg.conditional))


def continued_model(fam: Family, parent_dir: Path, configs: dict, values: dict, val: v.Clips, data: str):
    """The model of the video run `parent_dir` (--init-from) and its number of classes: its weights (an image
    family's with its EMA, as image.continued_model restores them), its [model] keys (the family's `init_keys` may
    still be set) and whether it is conditional become the new run's. The new clips must have the parent's shape
    (frames, size, channels), a predictor its context, a conditional run its classes in the same order."""
    parent = read_run(parent_dir)
    t, h, w, c = val.shape
    frames, side, channels = parent["clip_shape"][0], parent["clip_shape"][1], parent["clip_shape"][3]
    if parent["clip_shape"] != [t, h, w, c]:
        fix = [f"--set frames={frames}"] if frames != t else []
        fix += [f"--set size={side}"] if parent["clip_shape"][1:3] != [h, w] else []
        raise BadRequest(f"--init-from: run {parent_dir.name!r} was trained on clips of {frames} x {side} x "
                         f"{parent['clip_shape'][2]} x {channels} (T x H x W x C), {data}'s are {t} x {h} x {w} x {c}"
                         + (f": use {' and '.join(fix)}" if fix else ""))
    if parent.get("context") is not None and parent["context"] != configs["data"].context:
        raise BadRequest(f"--init-from: run {parent_dir.name!r} predicts from {parent['context']} frames: use --set "
                         f"context={parent['context']}")
    if not fam.stages and not predicts(fam):  # an image family on T * C channels
        model = image.continued_model(fam, parent_dir, configs, values)
    else:
        changes = init_changes(fam, configs, values)
        verify_manifest(parent_dir)
        model = fam.load(parent_dir)
        if changes:  # e.g. a vae-rnn's temperature or vae_share: the weights stay
            config = dataclasses.replace(model.config, **changes)
            rebuilt = _build_staged("", fam, {**configs, "model": config}, val.shape, model.num_classes) \
                if fam.stages else fam.build(config, model.frame_shape, model.context, model.future)
            rebuilt.load_state_dict(model.state_dict())
            model = rebuilt
        conditional = bool(getattr(model, "num_classes", 0))
        if "conditional" in values and configs["data"].conditional != conditional:
            raise BadRequest(f"conditional comes from the --init-from checkpoint: run {parent_dir.name!r} is "
                             f"{'conditional' if conditional else 'unconditional'}")
        configs["model"] = model.config
        configs["data"] = dataclasses.replace(configs["data"], conditional=conditional)
    num_classes = parent["num_classes"]
    if num_classes and list(val.class_names) != parent.get("class_names"):
        raise BadRequest(f"--init-from: run {parent_dir.name!r} was trained on the classes "
                         f"{', '.join(parent.get('class_names') or [])}; {data} has {', '.join(val.class_names)}: a "
                         f"continued run needs the same classes in the same order")
    return model.train(), num_classes


def _build_staged(family: str, fam: Family, configs: dict, clip_shape, num_classes: int):
    t, h, w, c = clip_shape
    try:
        return fam.build(configs["model"], (c, h, w), t, configs["data"].context, num_classes)
    except ValueError as e:
        raise BadRequest(f"{family}: {e}") from None


def held_out(data: str) -> str:
    """Where a set's validation clips come from, as run.json says."""
    if data in v.NAMED_VIDEOS:
        return "test images"
    return "the last clips in time" if data in v.REAL_VIDEOS else "held out"


def recorded_split(run_dir: Path, record: dict, cfg: v.VideoDataConfig) -> tuple[v.Clips | v.ClipMaker, v.Clips]:
    """A run's clips made or read again, checked against run.json's sha256 of the validation clips."""
    train, val = v.load_split(record["data"]["train"]["source"], cfg)
    if val.sha256 != record["data"]["val"]["sha256"]:
        raise UserError(f"the clips of {Path(run_dir).name} changed since the run was made (sha256 differs)")
    return train, val


def reload(family: str, fam: Family, run_dir: Path, record: dict, configs: dict) -> Prepared:
    train, val = recorded_split(run_dir, record, configs["data"])
    if fam.stages:  # fit finds the stage to go on with and loads its checkpoint
        torch.manual_seed(configs["train"].seed)  # the initial weights of a stage not begun yet, as prepare made them
        model = _build_staged(family, fam, configs, record["clip_shape"], record["num_classes"])
    else:
        model = fam.load(on_main(find_checkpoint, run_dir))  # the main process tidies an interrupted save
    return Prepared(model, record, VideoBatches(train, val, configs["data"].conditional))


def fit(fam: Family, prepared: Prepared, configs: dict, run_dir: Path, budget, resume: bool) -> dict:
    batches, record = prepared.state, prepared.record

    def save_sheet(model, step: int) -> None:  # what the model makes of the first validation clips, as it learns
        model.eval()
        with torch.no_grad():
            clips = _sheet_clips(model, record, batches.val)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_png(run_dir / "samples" / f"step-{step:06d}.png", v.frame_sheet(clips))

    if fam.stages:
        return fit_stages(fam, prepared, configs, run_dir, budget, resume, save_sheet)
    return train_loop(prepared.model, batches, configs["train"], run_dir, budget, resume=resume,
                      cpu_bf16=fam.cpu_bf16, compile_gain=fam.compile_gain, on_eval=save_sheet,
                      after_step=fam.after_step, phases=fam.phases)


STAGE_DIR = "stage-vae"  # a staged run's first stage: its own checkpoints, metrics.jsonl and best VAE weights
STAGE_DONE = "done.json"  # written when the first stage has spent its budget: resume goes on with the second


def stage_budgets(budget: Budget, share: float) -> tuple[Budget, Budget]:
    """The run's budget split: `share` of the minutes and of the steps for the first stage, the rest for the
    second (each stage at least one step)."""
    steps, minutes = budget.max_steps, budget.max_minutes
    first = None if steps is None else max(1, min(steps - 1, round(steps * share)))
    return (Budget(first, None if minutes is None else minutes * share),
            Budget(None if steps is None else steps - first, None if minutes is None else minutes * (1 - share)))


def fit_stages(fam: Family, prepared: Prepared, configs: dict, run_dir: Path, budget: Budget, resume: bool,
               save_sheet: Callable) -> dict:
    """vae-rnn: stage 1 trains the per-frame VAE (`model.vae`) on single frames in `run_dir/stage-vae`; stage 2
    freezes it and trains the recurrent net on the clips' latent means in the run root (whose best weights are the
    whole model). Each stage is one training loop with its own schedule and checkpoints, so a resumed run goes on
    in the stage it stopped in, exactly (a finished stage 1 is not trained again)."""
    model, batches, cfg = prepared.model, prepared.state, configs["train"]
    first_budget, second_budget = stage_budgets(budget, configs["model"].vae_share)
    stage_dir = run_dir / STAGE_DIR
    if (stage_dir / STAGE_DONE).is_file():
        first = read_json(stage_dir / STAGE_DONE)
    else:
        go_on = resume and (stage_dir / "checkpoints").is_dir()
        if go_on:  # the VAE as its last checkpoint left it
            model.vae.load_state_dict(VAE.load(on_main(find_checkpoint, stage_dir)).state_dict())
        stage_dir.mkdir(exist_ok=True)
        k, window, channels = configs["model"].content_dim, configs["model"].window, prepared.record["clip_shape"][3]
        # a split latent: the VAE learns from pairs of frames which dimensions stay the same; a window: it draws
        # the window around each frame's object
        net = FrameStage(model.vae, k, window) if k or window else model.vae
        frames = (FramePairs if k else FrameBatches)(batches.train, batches.val, batches.conditional, channels)
        first = train_loop(net, frames, cfg, stage_dir, first_budget, resume=go_on, cpu_bf16=fam.cpu_bf16,
                           compile_gain=fam.compile_gain)
        if is_main_process():
            write_json(stage_dir / STAGE_DONE, first)
    go_on = resume and (run_dir / "checkpoints").is_dir()
    if go_on:  # the whole model as stage 2's last checkpoint left it
        model.load_state_dict(fam.load(on_main(find_checkpoint, run_dir)).state_dict())
    else:
        model.vae.load_state_dict(VAE.load(stage_dir).state_dict())  # stage 1's best weights
    model.vae.requires_grad_(False)
    second = train_loop(model, batches, cfg, run_dir, second_budget, resume=go_on, cpu_bf16=fam.cpu_bf16,
                        compile_gain=fam.compile_gain, on_eval=save_sheet)
    return {**second, "steps": first["steps"] + second["steps"],
            "train_time_s": first["train_time_s"] + second["train_time_s"],
            "vae_steps": first["steps"], "vae_time_s": first["train_time_s"],
            "vae_frames_per_s": first.get("frames_per_s"), "vae_val_loss": first["best_val_loss_periodic"],
            "rnn_steps": second["steps"], "rnn_time_s": second["train_time_s"],
            "rnn_val_loss": second["best_val_loss_periodic"]}


def _sheet_clips(model, record: dict, val: v.Clips) -> np.ndarray:
    """A predictor: the first validation clips above their predictions; a generator: clips at seeds 0, 1, ..."""
    channels = record["clip_shape"][3]
    if record["job"] == "predict":
        truth = val.clips[:SHEET_CLIPS]
        made = predict_clips(model, truth, record["context"], None)
        return np.stack([clip for pair in zip(truth, made, strict=True) for clip in pair])
    y = torch.arange(SHEET_CLIPS) % record["num_classes"] if record["num_classes"] else None
    x = model.sample(SHEET_CLIPS, generator=torch.Generator().manual_seed(0), y=y)
    return v.to_uint8(x, channels)


@torch.no_grad()
def predict_clips(model, clips: np.ndarray, context: int, labels: np.ndarray | None) -> np.ndarray:
    """Clips (N, T, H, W, C) uint8 -> the same clips with frames context.. predicted from the first `context`
    (a conditional model is given each clip's class, `labels`)."""
    channels = clips.shape[4]
    out = []
    for i in range(0, len(clips), EVAL_BATCH):
        x = v.to_tensor(clips[i:i + EVAL_BATCH])
        y = {} if labels is None else {"y": torch.from_numpy(labels[i:i + EVAL_BATCH]).long()}
        future = model.predict(x[:, :context * channels], **y).clamp(-1, 1)
        out.append(v.to_uint8(torch.cat([x[:, :context * channels], future], dim=1), channels))
    return np.concatenate(out)


def finish(family: str, fam: Family, prepared: Prepared, configs: dict, run_dir: Path, fit: dict) -> dict:
    best = fam.load(run_dir)
    batches = prepared.state
    kept = {k: fit[k] for k in ("steps", "train_time_s", "train_loss", "best_step", "clips_per_s", "schedule_steps",
                                *(f"{s}_{k}" for s in fam.stages for k in ("steps", "time_s", "val_loss")))}
    if scores_prediction(fam):
        labels = batches.val.labels if prepared.record["num_classes"] else None
        scores = score_prediction(best, batches.train, batches.val, prepared.record["context"], labels, FINISH_CLIPS)
        floors = {f"{k}_{f}": scores["floors"][f][k] for f in metrics_of.FLOORS for k in metrics_of.METRICS}
        bound = {}
        if fam.stages:  # the per-frame VAE's bound (a window's: on the windows)
            frame_net = FrameStage(best.vae, 0, best.config.window) if best.config.window else best.vae
            bound = score_bound(frame_net, FrameBatches(batches.train, batches.val, batches.conditional,
                                                        prepared.record["clip_shape"][3]))
        return {**scores["metrics"], **floors, "beats_floors": scores["beats_floors"], "scored_clips": scores["clips"],
                **bound, **kept}
    if fam.bound_score:
        return {**score_bound(best, batches), **kept}
    return {"val_loss": fit["best_val_loss_periodic"], **kept}


@torch.no_grad()
def score_bound(model, batches: VideoBatches) -> dict:
    """The VAE's negative ELBO over every validation clip (nats per clip; a staged family's VAE: every validation
    clip's every frame, nats per frame)."""
    model.eval()
    total, count = 0.0, 0
    per_clip = batches.val.shape[0] if isinstance(batches, FrameBatches) else 1
    for batch in batches.val_batches(math.ceil(batches.val.n * per_clip / EVAL_BATCH), EVAL_BATCH):
        terms = model.loss_terms(*batch, generator=torch.Generator().manual_seed(0))
        total, count = total + terms["nelbo"].item() * len(batch[0]), count + len(batch[0])
    nelbo = total / count
    return {"val_nelbo": nelbo, "val_bits_per_dim": nelbo / math.log(2) / math.prod(model.image_shape)}


def score_prediction(model, train: v.Clips | v.ClipMaker, val: v.Clips, context: int, labels: np.ndarray | None,
                     n: int | None = None) -> dict:
    """MSE, MAE, PSNR and SSIM of the predicted frames of the (first n) validation clips, each floor's beside
    (`labels`: the clips' classes, for a conditional model)."""
    model.eval()
    clips = val.clips[:n]
    made = predict_clips(model, clips, context, None if labels is None else labels[:n])

    def unit(a: np.ndarray) -> torch.Tensor:  # (N, T, H, W, C) uint8 -> (N, T, C, H, W) in [0, 1]
        return torch.from_numpy(a).permute(0, 1, 4, 2, 3).double() / 255.0

    truth, pred = unit(clips[:, context:]), unit(made[:, context:])
    mean = torch.from_numpy(v.mean_frame(train)).permute(2, 0, 1)
    result = metrics_of.prediction_metrics(pred, truth)
    floor = metrics_of.floors(unit(clips[:, :context]), truth, mean)
    return {"metrics": result, "floors": floor, "beats_floors": metrics_of.beats_floors(result, floor),
            "clips": len(clips)}


def card(run_dir: Path, record: dict, configs: dict) -> str:
    m = record["metrics"]
    t, h, w, c = record["clip_shape"]
    score, jobs = [], []
    if record["context"] is not None:  # the run predicts
        rows = [f"| {k} | {m[k]:.4f} | " + " | ".join(f"{m[f'{k}_{f}']:.4f}" for f in metrics_of.FLOORS) + " |"
                for k in metrics_of.METRICS]
        score += ["| metric | model | copy last frame | black frames | mean frame |", "|---|---|---|---|---|", *rows,
                  "", f"Beats every floor on every metric: {'yes' if m['beats_floors'] else 'no'}.", ""]
        jobs.append(f"predicts frames {record['context'] + 1}..{t} from the first {record['context']}")
    if record["job"] == "generate":
        staged = "rnn_val_loss" in m
        score += [f"- negative ELBO: {m['val_nelbo']:.2f} nats per {'frame' if staged else 'clip'}"
                  if "val_nelbo" in m else f"- validation loss: {m['val_loss']:.4f}"]
        if staged:
            score += [f"- the recurrent net's validation loss: {m['rnn_val_loss']:.2f} nats per frame's latent",
                      f"- stage 1 (the per-frame VAE): {m['vae_steps']} steps; stage 2 (the recurrent net): "
                      f"{m['rnn_steps']} steps"]
        jobs.insert(0, "makes clips (a per-frame VAE, a recurrent net over its latents)" if staged
                    else "makes clips (frames stacked as channels)")
    what = " and ".join(jobs)
    lines = [*card_header(record, "video-generation" if record["job"] == "generate" else "video-prediction"),
             f"# {run_dir.name}", "",
             f"A `{record['family']}` video model trained by AIGC Studio {__version__} on "
             f"`{record['data']['train']['source']}` (clips of {t} frames of {w}x{h}, {c} channel(s)): it {what}."
             + continued_from(record), "", "## Validation", "", *score, f"- steps: {m['steps']}", *card_lineage(record),
             "",
             "## Configuration", "", "```toml", to_toml(configs).strip(), "```", "",
             "## Use", "", "```", f"aigc generate {run_dir} -n 4 --seed 0 --out clips/", "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# generation


class LoadedVideo(image.LoadedImages):
    """A finished video run, its weights verified, and its configuration."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, NAME, sections)
        self._val: v.Clips | None = None

    def val(self) -> v.Clips:
        """The run's validation clips (a folder's are read on first use)."""
        if self._val is None:
            self._val = recorded_split(self.path, self.record, self.configs["data"])[1]
        return self._val


def load(spec: str) -> LoadedVideo:
    return LoadedVideo(find_run(spec))


def generate(loaded: LoadedVideo, options: dict, seed: int, stream: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None, *, batched: bool = False) -> Generation:
    """n clips; clip i uses seed + i. A generator samples it (options: class_ for a conditional run and the
    family's sampling options); a predictor takes a validation clip chosen by the seed and predicts its frames
    after the context (a named set: a fresh clip of the test images made at the seed)."""
    options = {k: v_ for k, v_ in options.items() if v_ is not None}
    n = options.pop("n", 1)
    if not 1 <= n <= MAX_CLIPS:
        raise BadRequest(f"-n must be in 1..{MAX_CLIPS}, got {n}")
    if seed < 0:
        raise BadRequest(f"--seed must be >= 0, got {seed}")
    record = loaded.record
    predictor = record["job"] == "predict"
    label = image.class_index(record, options.pop("class_", None))
    unknown = sorted(set(options) - (set() if predictor else set(loaded.family.sampler_options)))
    if unknown:
        raise BadRequest(f"--{unknown[0].replace('_', '-')} does not apply to {record['family']} video runs")
    clips, truths, records = [], [], []
    t0 = time.perf_counter()
    for i in range(n):
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        clip_record = {"run": str(loaded.path), "family": record["family"], "seed": seed + i, "class": label,
                       **{key: options.get(kw) for key, kw in image.RECORD_OPTIONS.items() if kw in options}}
        if predictor:
            truth = _context_clip(loaded, seed + i)
            clips.append(predict_clips(loaded.model, truth[None], record["context"], None)[0])
            truths.append(truth)
            clip_record["context"] = record["context"]
        else:
            clips.append(sample_clip(loaded.model, clip_record, record["clip_shape"]))
        records.append(clip_record)
    seconds = time.perf_counter() - t0
    settings = {"n": n, "seed": seed, "class": label, "family": record["family"], "job": record["job"], **options}
    extra = {"truth": truths} if predictor else {}
    return Generation(NAME, clips, {"run": str(loaded.path), "settings": settings, "clips": records,
                                    "clips_per_s": n / seconds}, extra=extra)


def _context_clip(loaded: LoadedVideo, seed: int) -> np.ndarray:
    """The clip a predictor continues at `seed`: a named set's clip of the test images made at the seed, or the
    folder's validation clip number seed mod N."""
    source = loaded.record["data"]["train"]["source"]
    if source in v.NAMED_VIDEOS:
        return v.named_clips(source, "test", 1, seed, loaded.configs["data"]).clips[0]
    val = loaded.val()
    return val.clips[seed % val.n]


def sample_clip(model, rec: dict, clip_shape: list[int]) -> np.ndarray:
    """One clip (T, H, W, C) from a generation record, through the image families' sampling of one image."""
    t, h, w, c = clip_shape
    pixels = image.sample_one(model, rec)  # (H, W, T * C)
    return np.ascontiguousarray(pixels.reshape(h, w, t, c).transpose(2, 0, 1, 3))


def regenerate(path: str) -> Generation:
    """A clip again, from the generation record its GIF or MP4 carries (`--from-image`)."""
    file = Path(path)
    if not file.is_file():
        raise NotFound(f"no such file: {path}")
    rec = v.read_record(file)
    loaded = load(rec["run"])
    if loaded.record["job"] == "predict":
        clip = predict_clips(loaded.model, _context_clip(loaded, rec["seed"])[None], loaded.record["context"],
                             None)[0]
    else:
        clip = sample_clip(loaded.model, rec, loaded.record["clip_shape"])
    return Generation(NAME, [clip], {"run": str(loaded.path), "settings": rec, "clips": [rec]},
                      extra={"names": [file.name], "source": str(file)})


def save(generation: Generation, out_dir: Path) -> list[str]:
    """000.gif, 001.gif ..., then 000.mp4, 001.mp4 ... (each carrying its clip's record: the GIF comment, the MP4
    comment tag) and sheet.png (a row per clip, a column per frame; a predictor's rows alternate the true clip and
    the prediction; the generation's record as its text chunk). A clip made again from its file (`regenerate`) is
    written under that file's name, as GIF and MP4."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [Path(name).stem for name in generation.extra.get("names") or
             [f"{i:03d}" for i in range(len(generation.outputs))]]
    gifs, mp4s = [out_dir / f"{stem}.gif" for stem in stems], [out_dir / f"{stem}.mp4" for stem in stems]
    for gif, mp4, clip, rec in zip(gifs, mp4s, generation.outputs, generation.record["clips"], strict=True):
        v.save_gif(gif, clip, rec)
        v.save_mp4(mp4, clip, rec)
    files = [str(f) for f in gifs + mp4s]
    if "names" not in generation.extra:
        truths = generation.extra.get("truth") or []
        rows = [c for pair in zip(truths, generation.outputs, strict=True) for c in pair] if truths \
            else list(generation.outputs)
        sheet = out_dir / "sheet.png"
        save_png(sheet, v.frame_sheet(np.stack(rows)), {"run": generation.record["run"],
                                                        "settings": generation.record["settings"],
                                                        "clips": generation.record["clips"]})
        files.append(str(sheet))
        generation.extra["sheet"] = str(sheet)
    return files


# ----------------------------------------------------------------------------------
# evaluation


def evaluate(run_dir: Path, record: dict, options: dict) -> dict:
    """A predictor: MSE, MAE, PSNR and SSIM per frame on the validation clips (the first n), each beside the three
    floors. A generator: its validation objective and the motion statistics of n clips against as many
    validation clips. A staged family (vae-rnn) both: the generator's metrics, and the predictor's beside them
    (`predicted_clips` of them). Writes eval.json."""
    n = options.get("n")
    if n is not None and n < 1:
        raise BadRequest(f"-n must be at least 1, got {n}")
    loaded = load(str(run_dir))
    val = loaded.val()
    result: dict = {"run": str(run_dir)}
    if record["context"] is not None:  # the run predicts
        t0 = time.perf_counter()
        train = v.load_split(record["data"]["train"]["source"], loaded.configs["data"])[0]
        scores = score_prediction(loaded.model, train, val, record["context"],
                                  val.labels if record["num_classes"] else None, n)
        rate = "clips_per_s" if record["job"] == "predict" else "predicted_clips_per_s"
        result.update(metrics={**scores["metrics"], "beats_floors": scores["beats_floors"],
                               rate: scores["clips"] / (time.perf_counter() - t0)},
                      floors=scores["floors"], clips=scores["clips"])
    if record["job"] == "generate":
        n = min(n or EVAL_CLIPS, val.n)
        made, labels, clips_per_s = sample_clips(loaded, n)
        if "floors" in result:
            result["predicted_clips"] = result["clips"]
        result["clips"] = n
        result["metrics"] = {**result.get("metrics", {}),
                             **{k: record["metrics"][k] for k in ("val_nelbo", "val_loss") if k in record["metrics"]},
                             **metrics_of.motion(made),
                             **{f"{k}_real": x for k, x in metrics_of.motion(val.clips[:n]).items()},
                             "clips_per_s": clips_per_s}
        source = record["data"]["train"]["source"]
        cfg = loaded.configs["data"]
        if source in v.NAMED_VIDEOS and cfg.objects == 1:
            real_train = v.named_clips(source, "train", n, cfg.split_seed + 1, cfg).clips  # the floors' real clips
            windows = window_scores(source, made, labels, val, real_train)
            clips = clip_scores(source, made, val.clips[:n], real_train, cfg)
            result["metrics"].update({**windows["metrics"], **clips["metrics"]})
            result["feature_net"], result["clip_net"] = windows["feature_net"], clips["clip_net"]
    write_json(Path(run_dir) / "eval.json", result)
    return result


@torch.no_grad()
def sample_clips(loaded: LoadedVideo, n: int) -> tuple[np.ndarray, np.ndarray | None, float]:
    """n clips of a generator at seeds 0..n-1 (a conditional run: classes 0, 1, ... in turn), their classes, and
    the clips made per second."""
    record = loaded.record
    labels = np.arange(n) % record["num_classes"] if record["num_classes"] else None
    t0 = time.perf_counter()
    made = [sample_clip(loaded.model, {"seed": i, "class": None if labels is None else int(labels[i])},
                        record["clip_shape"]) for i in range(n)]
    return np.stack(made), labels, n / (time.perf_counter() - t0)


def window_scores(source: str, made: np.ndarray, labels: np.ndarray | None, val: v.Clips,
                  real_train: np.ndarray) -> dict:
    """Per-frame FID and class consistency of one-object clips, on the window of the object's size around each
    frame's brightness centre (made and real clips cut the same way), in the features of the image metrics' net
    trained on the image set's training split (aigc.evaluate.images, cached). The floors: fresh training clips
    (`real_train`, as many) against the validation clips, cut and scored the same way."""
    named = v.NAMED_VIDEOS[source]
    train_images = load_images(named.images, split="train")
    side = train_images.height * named.scale
    n = len(made)

    def frames(clips: np.ndarray) -> torch.Tensor:  # (N, T, ...) -> windows (N * T, 1, h, w) at the set's size
        w = metrics_of.object_windows(clips, side)
        w = w.reshape(-1, side // named.scale, named.scale, side // named.scale, named.scale, w.shape[-1])
        w = np.rint(w.mean(axis=(2, 4))).astype(np.uint8)  # block mean: back to the image set's resolution
        return to_image_tensor(w)

    net, info = feature_net(train_images, test=load_images(named.images, split="test"))
    fake, real, floor = frames(made), frames(val.clips[:n]), frames(real_train)
    f_fake, f_real, f_floor = (extract_features(net, x) for x in (fake, real, floor))

    def classes(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([net(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]).numpy().reshape(n, -1)

    fake_classes, floor_classes = classes(fake), classes(floor)
    metrics = {"frame_fid": fid_from_features(f_real, f_fake), "frame_fid_floor": fid_from_features(f_real, f_floor),
               **metrics_of.class_consistency(fake_classes),
               "class_consistency_floor": metrics_of.class_consistency(floor_classes)["class_consistency"]}
    if labels is not None:
        metrics["class_accuracy"] = float((fake_classes == labels[:, None]).mean())  # the frames of the asked class
    return {"metrics": metrics, "feature_net": {k: info.get(k) for k in ("kind", "test_accuracy", "cached")}}


def clip_scores(source: str, made: np.ndarray, real: np.ndarray, real_train: np.ndarray,
                cfg: v.VideoDataConfig) -> dict:
    """The clip-level Fréchet distance (an FVD made here): made clips against as many validation clips, in the
    features of the clip net of the set (aigc.evaluate.clipnet: a tiny 3D-conv net trained here on the object's
    class and the clip's time order, cached); its floor: fresh training clips against the same validation clips."""
    net, info = clipnet.clip_net(source, cfg, progress=True)
    f_real, f_made, f_floor = (clipnet.clip_features(net, x) for x in (real, made, real_train))
    return {"metrics": {"clip_fd": fid_from_features(f_real, f_made), "clip_fd_floor": fid_from_features(f_real,
                                                                                                          f_floor)},
            "clip_net": {k: info.get(k) for k in ("class_accuracy", "order_accuracy", "steps", "stopped_early",
                                                  "cached")}}
