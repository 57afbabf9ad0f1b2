"""A small clip classifier trained here, and the clip-level Fréchet distance in its features.

FVD (Unterthiner et al. 2018) is the Fréchet distance between real and generated clips in the features of an I3D
network trained on Kinetics; those weights cannot be downloaded here. This is the same measure in the features of a
tiny 3D-conv net trained on the clip set's own training clips (fresh clips of the training images only):

    net        (N, C, T, H, W) in [-1, 1] -> averaged over size // 32 pixels square (64x64 frames: 2x2)
               -> 3 x [3x3x3 conv, GroupNorm, SiLU] (strides (1,2,2), 2, 2)
               -> the maximum over each frame's positions, averaged over time -> features (N, 64)
    heads      the object's class (cross-entropy), and the clip's time order: as made, frozen (its first frame
               repeated) or its frames shuffled (cross-entropy). The class alone would let a still picture of the
               right object look real; the order head makes the features see motion, as I3D's do.

`clip_fd` is torchmetrics' Fréchet distance on these features (aigc.evaluate.images.fid_from_features); its floor
is the distance between fresh training clips and the validation clips (real against real). The net is trained for
a fixed number of steps from a seed (a time cap stops it early, with a warning) and cached under
$AIGC_HOME/cache/clip-features/, keyed by the clip set, its shape and the seed, as the image metrics' net is.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.data import video as v
from aigc.fsutil import atomic_write_bytes, read_json, write_json
from aigc.store import cache_dir

FORMAT_VERSION = 1  # bump when the architecture or the recipe changes: old caches are retrained
ORDERS = ("as_made", "frozen", "shuffled")  # the time-order head's classes
BATCH = 500  # clips per forward pass when extracting features


@dataclass
class ClipNetConfig:
    channels: int  # of a frame
    frames: int
    size: int  # frames are size x size
    num_classes: int
    width: int = 16  # channels of the first conv; the next are 2x and 4x (the features: 4 * width)


@dataclass
class ClipNetTraining:
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    test_clips: int = 500  # validation clips scored for the reported accuracies


class ClipNet(nn.Module):
    def __init__(self, config: ClipNetConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.pool = max(1, config.size // 32)
        layers, c_in = [], config.channels
        for c_out, stride in ((w, (1, 2, 2)), (2 * w, 2), (4 * w, 2)):
            layers += [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.num_features = 4 * w
        self.classes = nn.Linear(self.num_features, config.num_classes)
        self.order = nn.Linear(self.num_features, len(ORDERS))

    def features(self, x: Tensor) -> Tensor:
        """Clips (N, T * C, H, W) in [-1, 1] (the video modality's tensors) -> features (N, 4 * width)."""
        c = self.config.channels
        n, tc, h, w = x.shape
        clips = x.reshape(n, tc // c, c, h, w).transpose(1, 2)  # (N, C, T, H, W)
        if self.pool > 1:  # frames over 32 pixels are seen at about 32 (a 64x64 clip costs as a 32x32 one)
            clips = F.avg_pool3d(clips, (1, self.pool, self.pool), ceil_mode=True)
        # the strongest response anywhere in a frame (the object fills little of it), averaged over time
        return self.body(clips).amax(dim=(3, 4)).mean(dim=2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.classes(f), self.order(f)


def reorder(clips: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each clip (N, T, H, W, C) kept as made, frozen (its first frame repeated) or its frames shuffled, in equal
    shares at random; returns the clips and each one's ORDERS index."""
    order = rng.integers(0, len(ORDERS), len(clips))
    out = clips.copy()
    for i in np.flatnonzero(order == 1):
        out[i] = clips[i, :1]
    for i in np.flatnonzero(order == 2):
        out[i] = clips[i, rng.permutation(clips.shape[1])]
    return out, order


def clip_net(name: str, cfg: v.VideoDataConfig, *, seed: int = 0, max_seconds: float = 180.0,
             progress: bool = False) -> tuple[ClipNet, dict]:
    """The clip net of a named one-object clip set at the clip shape of `cfg` (frames, size): loaded from the cache,
    or trained on fresh training clips and cached. info: steps, train_seconds, stopped_early, class_accuracy and
    order_accuracy on validation clips of the test images, cached, path."""
    if cfg.objects != 1:
        raise ValueError("the clip net learns the class of one-object clips: objects must be 1")
    maker = v.ClipMaker(name, cfg)
    shape = {"name": name, "frames": cfg.frames, "size": maker.size, "format": FORMAT_VERSION, "seed": seed}
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir() / "clip-features"
    weights_path, info_path = directory / f"{key}.safetensors", directory / f"{key}.json"
    net, info = _load_cached(weights_path, info_path)
    if net is None:
        config = ClipNetConfig(maker.images.shape[-1], cfg.frames, maker.size, len(maker.class_names))
        net, info = _train(config, maker, ClipNetTraining(), seed, max_seconds, progress)
        test = v.named_clips(name, "test", ClipNetTraining.test_clips, cfg.split_seed + 7, cfg)
        info.update(shape=shape, **accuracies(net, test, np.random.default_rng(seed)))
        _save(net, info, weights_path, info_path)
        info["cached"] = False
    info["path"] = str(weights_path)
    return net.eval(), info


def _train(config: ClipNetConfig, maker: v.ClipMaker, settings: ClipNetTraining, seed: int, max_seconds: float,
           progress: bool) -> tuple[ClipNet, dict]:
    """AdamW with a one-cycle learning rate over fresh training clips; the loss: class + time-order cross-entropy."""
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)  # initial weights depend on the seed alone
        net = ClipNet(config)
        generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
        optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.steps)
        net.train()
        t0, steps, stopped_early = time.perf_counter(), settings.steps, False
        bar = tqdm(range(settings.steps), desc="clip net", disable=not progress, file=sys.stderr)
        for step in bar:
            clips, labels = maker.make(generator, settings.batch_size)
            clips, order = reorder(clips, rng)
            logits, order_logits = net(v.to_tensor(clips))
            loss = F.cross_entropy(logits, torch.from_numpy(labels).long()) + \
                F.cross_entropy(order_logits, torch.from_numpy(order))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if time.perf_counter() - t0 > max_seconds and step + 1 < settings.steps:
                stopped_early, steps = True, step + 1
                warnings.warn(f"clip net training stopped at the time cap ({max_seconds:g} s) after {steps} steps: "
                              f"the net is undertrained", stacklevel=3)
                break
        bar.close()
    net.eval()
    return net, {"format": FORMAT_VERSION, "config": asdict(config), "train": asdict(settings), "seed": seed,
                 "steps": steps, "train_seconds": round(time.perf_counter() - t0, 3), "stopped_early": stopped_early}


@torch.no_grad()
def accuracies(net: ClipNet, test: v.Clips, rng: np.random.Generator) -> dict:
    """The share of validation clips whose class the net names, and of their reordered copies whose time order it
    names."""
    net.eval()
    shuffled, order = reorder(test.clips, rng)
    logits = torch.cat([net(v.to_tensor(test.clips[i:i + BATCH]))[0] for i in range(0, test.n, BATCH)])
    order_logits = torch.cat([net(v.to_tensor(shuffled[i:i + BATCH]))[1] for i in range(0, test.n, BATCH)])
    return {"class_accuracy": float((logits.argmax(1).numpy() == test.labels).mean()),
            "order_accuracy": float((order_logits.argmax(1).numpy() == order).mean())}


@torch.no_grad()
def clip_features(net: ClipNet, clips: np.ndarray) -> Tensor:
    """Clips (N, T, H, W, C) uint8 -> features (N, D), float64."""
    c = net.config
    if clips.ndim != 5 or clips.shape[1:] != (c.frames, c.size, c.size, c.channels):
        raise ValueError(f"clips must be (N, {c.frames}, {c.size}, {c.size}, {c.channels}) like the clip net's "
                         f"training clips, got {tuple(clips.shape)}")
    net.eval()
    return torch.cat([net.features(v.to_tensor(clips[i:i + BATCH])) for i in range(0, len(clips), BATCH)]).double()


def _save(net: ClipNet, info: dict, weights_path: Path, info_path: Path) -> None:
    """Weights (safetensors) first, then the JSON: the JSON's presence marks a complete entry."""
    from safetensors.torch import save

    weights_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights_path, save({k: t.detach().contiguous() for k, t in net.state_dict().items()}))
    write_json(info_path, info)


def _load_cached(weights_path: Path, info_path: Path) -> tuple[ClipNet | None, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (info_path.is_file() and weights_path.is_file()):
        return None, {}
    try:
        info = read_json(info_path)
        if info.get("format") != FORMAT_VERSION:
            return None, {}
        net = ClipNet(ClipNetConfig(**info["config"]))
        net.load_state_dict(load_file(weights_path))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, json.JSONDecodeError) as err:
        warnings.warn(f"ignoring the unreadable clip-net cache {weights_path} ({err}): retraining", stacklevel=3)
        return None, {}
    info["cached"] = True
    return net.eval(), info
