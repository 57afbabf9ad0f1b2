"""Image-quality metrics in the feature space of a small network the project trains itself, offline.

Inception-v3 weights cannot be downloaded here, and 8x8 digits or 28x28 clothes are far from
ImageNet anyway, so the feature extractor is trained on the data set's own training split:

    FeatureNet     a small conv net. With class labels it is a classifier (cross-entropy); its
                   penultimate layer is the feature space and its softmax the classifier score.
                   Without labels it is a conv autoencoder whose bottleneck is the feature space.
                   Trained once per training set (and seed), cached under
                   $AIGC_HOME/cache/features/<sha256[:16]>/ as safetensors + JSON.

Metrics of N generated images against N real ones (``image_metrics``):
    FID            Frechet distance between Gaussians fitted to the two feature sets (Heusel et
                   al. 2017), torchmetrics' FrechetInceptionDistance.
    KID            squared MMD with the cubic polynomial kernel, mean and std over random subsets
                   (Binkowski et al. 2018), torchmetrics' KernelInceptionDistance.
    precision      share of fakes inside the real manifold, recall the share of reals inside the
                   fake manifold; a manifold is the union of k-NN balls (Kynkaanniemi et al. 2019).
    classifier     exp(E_x KL(p(y|x) || p(y))), the Inception Score (Salimans et al. 2016) with
    score          the feature classifier's softmax: 1 (useless) .. K (confident and balanced).
    fid_per_class  FID within each class, for conditional generators.
    memorization   distance of each fake to its nearest training image, and how often a fake is
                   nearer to the training set than nearly all held-out real images are.

``floors`` scores real training images against held-out real images with the same N: the value
each metric would have for a perfect generator, reported beside it. ``score_against_data`` puts
the three together for `aigc eval`, which scores a run's samples or any folder of images with it.

torchmetrics is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.data.images import ImageData, to_tensor
from aigc.fsutil import atomic_write_bytes, read_json, write_json
from aigc.store import cache_dir

FORMAT_VERSION = 2  # bump when the architecture or the training recipe changes: old caches are retrained
BATCH_SIZE = 500  # images per forward pass when extracting features: bounds memory for any N
DISTANCE_ELEMENTS = 1 << 24  # pairwise distances held at once (64 MiB of float32)
KID_SUBSETS = 100  # torchmetrics' default
KID_SUBSET_SIZE = 1000  # torchmetrics' default, lowered to the sample count when that is smaller
MEMORIZATION_PERCENTILE = 5.0  # a fake is "memorized" if nearer to the training set than 95% of held-out images


# ---- the feature network ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureNetConfig:
    """Shape of a FeatureNet; saved beside its weights so the net can be rebuilt."""

    in_channels: int  # 1 (grayscale) or 3 (RGB)
    height: int  # image height in pixels
    width: int  # image width in pixels
    num_classes: int  # K >= 2 for a classifier; 0 for an autoencoder (data without labels)
    num_features: int = 64  # dimension of the feature space (the penultimate layer / the bottleneck)
    channels: tuple[int, int, int] = (16, 32, 64)  # conv widths; the 2nd and 3rd convs halve the resolution


@dataclass(frozen=True)
class TrainSettings:
    """How a FeatureNet is trained: a fixed number of steps, so training is deterministic for a seed."""

    batch_size: int = 128
    lr: float = 2e-3  # AdamW peak learning rate, one-cycle schedule
    weight_decay: float = 1e-4
    max_epochs: float = 30.0  # small sets: at most this many passes over the data
    pixel_budget: float = 3 * 60_000 * 784  # large sets: at most this many pixels seen (3 epochs of fashion-mnist)
    min_steps: int = 200  # but at least this many steps


class FeatureNet(nn.Module):
    """A small conv net trained by the project on a data set's training split.

    Encoder: three 3x3 convs (stride 1, 2, 2) with batch norm and ReLU, a 2x2 average pool, a
    linear layer to ``num_features`` and a batch norm without affine parameters, so that each
    feature has mean 0 and variance 1 over the training data: the feature space of
    FID/KID/precision/recall, on the same scale for every data set. A classifier
    puts ReLU + linear on top (its softmax is the classifier score); an autoencoder decodes the
    features back to the image with two transposed convs.
    """

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        self.num_features = config.num_features  # torchmetrics reads this name
        self.num_classes = config.num_classes
        c1, c2, c3 = config.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # (N, 4 * c3) whatever the image size
            nn.Linear(4 * c3, config.num_features), nn.BatchNorm1d(config.num_features, affine=False),
        )  # fmt: skip
        if self.is_classifier:
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(config.num_features, config.num_classes))
        else:
            self.h4, self.w4 = math.ceil(config.height / 4), math.ceil(config.width / 4)
            self.decoder_in = nn.Linear(config.num_features, c3 * self.h4 * self.w4)
            self.decoder = nn.Sequential(  # light on purpose: the decoder costs CPU time and is thrown away
                nn.ReLU(),
                nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1), nn.ReLU(),
                nn.ConvTranspose2d(c2, config.in_channels, 4, stride=2, padding=1),
            )  # fmt: skip

    @property
    def is_classifier(self) -> bool:
        return self.num_classes > 0

    @property
    def kind(self) -> str:
        return "classifier" if self.is_classifier else "autoencoder"

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, num_features)."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> logits (N, num_classes). Classifiers only."""
        if not self.is_classifier:
            raise TypeError("this feature net is an autoencoder (its data had no labels): it has no class logits")
        return self.head(self.features(x))

    def reconstruct(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> its reconstruction through the feature bottleneck. Autoencoders only."""
        if self.is_classifier:
            raise TypeError("this feature net is a classifier: it has no decoder")
        z = self.decoder_in(self.features(x)).view(x.shape[0], -1, self.h4, self.w4)  # (N, c3, H/4, W/4)
        h = self.decoder(z)[..., : x.shape[-2], : x.shape[-1]]  # (N, C, 4 ceil(H/4), 4 ceil(W/4)) cropped to H, W
        return torch.tanh(h)


def feature_net(
    train: ImageData,
    *,
    seed: int = 0,
    max_seconds: float = 120.0,
    test: ImageData | None = None,
    progress: bool = False,
) -> tuple[FeatureNet, dict]:
    """The feature net of a training set: loaded from the cache, or trained and cached.

    Labels with at least two classes give a classifier (cross-entropy), anything else an
    autoencoder (mean squared reconstruction error); ``info["kind"]`` says which. Training runs a
    fixed number of steps set by the data size (deterministic for a seed on one machine and thread
    count: CPU kernels reduce in a thread-dependent order); ``max_seconds`` is a safety cap that
    stops it early, with a warning, recorded as ``info["stopped_early"]`` (a capped net is cached
    too, so later calls do not pay the time again). With ``test``, info also
    holds the test accuracy (classifier) or the test reconstruction MSE (autoencoder).

    Returns (net in eval mode, info): info has kind, num_features, num_classes, seed, steps,
    train_seconds, stopped_early, train_sha256, cached (True when loaded), path, and test_accuracy
    or test_mse (None without ``test``).
    """

    if train.n < 2:
        raise ValueError(f"a feature net needs at least 2 training images, got {train.n}")
    directory = cache_dir() / "features" / train.sha256[:16]
    weights_path, info_path = directory / f"seed{seed}.safetensors", directory / f"seed{seed}.json"
    net, info = _load_cached(weights_path, info_path, train, seed)
    if net is None:
        num_classes = train.num_classes if train.labels is not None and train.num_classes >= 2 else 0
        config = FeatureNetConfig(train.channels, train.height, train.width, num_classes)
        net, info = _train(config, train, TrainSettings(), seed, max_seconds, progress)
        _save(net, info, weights_path, info_path)
        info["cached"] = False
    info["path"] = str(weights_path)
    info["test_accuracy"] = info["test_mse"] = None
    if test is not None:
        _check_images(to_tensor(test.images[:1]), net, "test")
        if net.is_classifier and test.labels is not None:
            info["test_accuracy"] = _accuracy(net, to_tensor(test.images), torch.from_numpy(test.labels))
        elif not net.is_classifier:
            info["test_mse"] = _reconstruction_mse(net, to_tensor(test.images))
    return net.eval(), info


def _train(
    config: FeatureNetConfig, train: ImageData, settings: TrainSettings, seed: int, max_seconds: float, progress: bool
) -> tuple[FeatureNet, dict]:
    """Train a FeatureNet: AdamW with a one-cycle learning rate over a fixed number of steps."""
    from tqdm.auto import tqdm

    x = to_tensor(train.images)  # (N, C, H, W) in [-1, 1]
    y = torch.from_numpy(train.labels) if config.num_classes else None
    pixels = x[0].numel()
    images_seen = min(settings.max_epochs * train.n, settings.pixel_budget / pixels)
    steps = max(settings.min_steps, math.ceil(images_seen / settings.batch_size))
    batch_size = min(settings.batch_size, train.n)

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)  # initial weights depend on the seed alone
        net = FeatureNet(config)
        generator = torch.Generator().manual_seed(seed)  # batch order
        optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps)
        net.train()
        order, pos = torch.randperm(train.n, generator=generator), 0
        t0 = time.perf_counter()
        stopped_early = False
        bar = tqdm(range(steps), desc=f"feature net ({net.kind})", disable=not progress, file=sys.stderr)
        for step in bar:
            if pos + batch_size > train.n:  # a new epoch: reshuffle; the last partial batch is dropped
                order, pos = torch.randperm(train.n, generator=generator), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            if net.is_classifier:
                loss = F.cross_entropy(net(x[idx]), y[idx])
            else:
                loss = F.mse_loss(net.reconstruct(x[idx]), x[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if time.perf_counter() - t0 > max_seconds and step + 1 < steps:
                stopped_early, steps = True, step + 1
                warnings.warn(
                    f"feature net training stopped at the time cap ({max_seconds:g} s) after {steps} "
                    f"steps: the net is undertrained and not reproducible",
                    stacklevel=3,
                )
                break
        bar.close()
    net.eval()
    info = {
        "format": FORMAT_VERSION, "kind": net.kind, "num_features": config.num_features,
        "num_classes": config.num_classes, "config": asdict(config), "train": asdict(settings), "seed": seed,
        "steps": steps, "train_seconds": round(time.perf_counter() - t0, 3), "stopped_early": stopped_early,
        "train_sha256": train.sha256, "train_images": train.n, "train_source": train.source,
    }  # fmt: skip
    return net, info


def _save(net: FeatureNet, info: dict, weights_path: Path, info_path: Path) -> None:
    """Weights (safetensors, never pickle) first, then the JSON: the JSON's presence marks a complete entry."""
    from safetensors.torch import save

    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in net.state_dict().items()}
    atomic_write_bytes(weights_path, save(state))
    write_json(info_path, info)


def _load_cached(weights_path: Path, info_path: Path, train: ImageData, seed: int) -> tuple[FeatureNet | None, dict]:
    """The cached net and its info, or (None, {}) when there is none, or it is stale or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (info_path.is_file() and weights_path.is_file()):
        return None, {}
    try:
        info = read_json(info_path)
        if (info.get("format"), info.get("train_sha256"), info.get("seed")) != (FORMAT_VERSION, train.sha256, seed):
            return None, {}
        config = info["config"]
        net = FeatureNet(FeatureNetConfig(**{**config, "channels": tuple(config["channels"])}))
        net.load_state_dict(load_file(weights_path))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, json.JSONDecodeError) as err:
        warnings.warn(f"ignoring the unreadable feature-net cache {weights_path} ({err}): retraining", stacklevel=3)
        return None, {}
    info["cached"] = True
    return net.eval(), info


@torch.no_grad()
def _accuracy(net: FeatureNet, x: Tensor, y: Tensor) -> float:
    correct = sum(
        (net(x[i : i + BATCH_SIZE]).argmax(1) == y[i : i + BATCH_SIZE]).sum().item()
        for i in range(0, len(x), BATCH_SIZE)
    )
    return correct / len(x)


@torch.no_grad()
def _reconstruction_mse(net: FeatureNet, x: Tensor) -> float:
    total = sum(
        F.mse_loss(net.reconstruct(x[i : i + BATCH_SIZE]), x[i : i + BATCH_SIZE], reduction="sum").item()
        for i in range(0, len(x), BATCH_SIZE)
    )
    return total / x.numel()


# ---- features and the metrics on them -------------------------------------------------------------


def _check_images(x: Tensor, net: FeatureNet, name: str) -> None:
    c = net.config
    if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.height, c.width):
        raise ValueError(
            f"{name} images must be (N, {c.in_channels}, {c.height}, {c.width}) like the feature "
            f"net's training data, got {tuple(x.shape)}"
        )


@torch.no_grad()
def extract_features(net: FeatureNet, x: Tensor, batch_size: int = BATCH_SIZE) -> Tensor:
    """Features (N, num_features) of images (N, C, H, W) in [-1, 1], ``batch_size`` at a time, on the net's device."""
    device = next(net.parameters()).device
    net.eval()
    return torch.cat([net.features(x[i : i + batch_size].to(device, torch.float32)).float().cpu()
                      for i in range(0, len(x), batch_size)])  # fmt: skip


@torch.no_grad()
def _probabilities(net: FeatureNet, x: Tensor, batch_size: int = BATCH_SIZE) -> Tensor:
    device = next(net.parameters()).device
    return torch.cat([net(x[i : i + batch_size].to(device, torch.float32)).softmax(-1).double().cpu()
                      for i in range(0, len(x), batch_size)])  # fmt: skip


class GivenFeatures(nn.Module):
    """torchmetrics' custom feature extractor for features computed already: the identity, with
    ``num_features`` declared (so torchmetrics does not probe it with a 299x299 dummy image).

    The features of each image set are extracted once (``extract_features``) and shared by FID,
    KID, per-class FID, precision/recall and memorization, instead of each metric re-running the net.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """FID between two feature sets (N, D), by torchmetrics' FrechetInceptionDistance."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 real and 2 fake images, got {len(real)} and {len(fake)}")
    fid = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]), reset_real_features=True)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kid_from_features(
    real: Tensor, fake: Tensor, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float]:
    """(KID mean, KID std) over ``subsets`` random subsets of min(subset_size, N_real, N_fake) pairs,
    by torchmetrics' KernelInceptionDistance; the subsets are drawn from ``seed``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake images, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():  # "KID keeps all features in memory": intended, they are (N, D) floats
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        kid = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def _chunks(n_query: int, n_ref: int):
    rows = max(1, DISTANCE_ELEMENTS // max(1, n_ref))
    return (slice(i, i + rows) for i in range(0, n_query, rows))


def _nearest(query: Tensor, ref: Tensor, k: int = 1) -> Tensor:
    """Distance (N_query,) from each query to its k-th nearest point of ``ref`` (k=1: the nearest)."""
    return torch.cat([torch.cdist(query[s], ref).topk(k, dim=1, largest=False).values[:, k - 1]
                      for s in _chunks(len(query), len(ref))])  # fmt: skip


def _inside(query: Tensor, ref: Tensor, radii: Tensor) -> Tensor:
    """Bool (N_query,): is the query inside some ball (ref_j, radii_j)?"""
    return torch.cat([(torch.cdist(query[s], ref) <= radii[None, :]).any(dim=1)
                      for s in _chunks(len(query), len(ref))])  # fmt: skip


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of feature sets (N, D).

    1. Each set's manifold is the union of balls around its points, the radius of a ball being
       the distance to the point's k-th nearest neighbour within the set (itself excluded).
    2. precision = share of fakes inside the real manifold; recall = share of reals inside the
       fake manifold.
    """
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(
            f"k must be in 1..{min(len(real), len(fake)) - 1} for {len(real)} real and {len(fake)} fake images, got {k}"
        )
    real, fake = real.float(), fake.float()
    real_radii = _nearest(real, real, k + 1)  # k + 1: the nearest point of a set to itself is itself
    fake_radii = _nearest(fake, fake, k + 1)
    precision = _inside(fake, real, real_radii).float().mean().item()
    recall = _inside(real, fake, fake_radii).float().mean().item()
    return precision, recall


def classifier_score(probs: Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) of class probabilities (N, K), p(y) the mean of p(y|x) over x.

    The Inception Score (Salimans et al. 2016) over one split: 1 when every prediction is the
    same, K when every prediction is certain and the classes are balanced.
    """
    probs = probs.double()
    marginal = probs.mean(dim=0, keepdim=True)  # p(y), (1, K)
    kl = (torch.special.xlogy(probs, probs) - torch.special.xlogy(probs, marginal)).sum(dim=1)  # 0 log 0 = 0
    return math.exp(kl.mean().item())


def memorization(fake: Tensor, train: Tensor, heldout: Tensor, percentile: float = MEMORIZATION_PERCENTILE) -> dict:
    """Nearest-training-neighbour distances of fakes, judged against held-out real images.

    Rule: with d(x) the feature distance from x to its nearest training image, a fake is memorized
    when d(fake) < t, t the ``percentile``-th percentile (default 5th) of d over held-out real images.
    A generator that samples fresh images from the data distribution scores ~percentile/100
    (0.05); one that copies training images scores ~1.
    """
    fake, train, heldout = fake.float(), train.float(), heldout.float()
    d_fake = _nearest(fake, train)
    d_heldout = _nearest(heldout, train)
    threshold = float(np.percentile(d_heldout.numpy(), percentile))
    return {
        "nn_distance_mean": d_fake.mean().item(),
        "heldout_nn_distance_mean": d_heldout.mean().item(),
        "memorization_threshold": threshold,
        "memorization_rate": (d_fake < threshold).float().mean().item(),
    }


def image_metrics(
    real: Tensor,
    fake: Tensor,
    net: FeatureNet,
    *,
    real_labels: Tensor | np.ndarray | None = None,
    fake_labels: Tensor | np.ndarray | None = None,
    train_for_memorization: Tensor | None = None,
    heldout: Tensor | None = None,
    k: int = 3,
    seed: int = 0,
) -> dict:
    """Score fake images against real ones in the feature space of ``net``.

    real, fake: float (N, C, H, W) in [-1, 1] shaped like the net's training images. Features are
    extracted once per set, BATCH_SIZE images at a time. ``seed`` draws KID's subsets.

    Returns a dict with every key below; a metric that does not apply is None:
        fid, kid, kid_std       FID and KID (KID's subset size is min(1000, N_real, N_fake))
        precision, recall       improved precision/recall with k-NN radii
        classifier_score        Inception-Score style, with the net's softmax (classifier nets only)
        fid_per_class           {class index: FID} when both label arrays are given; a class with
                                fewer than 2 real or 2 fake images gets None
        nn_distance_mean, heldout_nn_distance_mean, memorization_threshold, memorization_rate
                                when train_for_memorization and heldout are given: a fake is
                                memorized when it is nearer (in feature space) to its nearest
                                training image than the 5th percentile of the held-out images'
                                nearest-training distances (see ``memorization``)
        n_real, n_fake, k, num_features, feature_net
    """
    for name, x in (("real", real), ("fake", fake)):
        _check_images(x, net, name)
    if (train_for_memorization is None) != (heldout is None):
        raise ValueError("memorization needs both train_for_memorization and heldout images (or neither)")
    f_real, f_fake = extract_features(net, real), extract_features(net, fake)
    kid, kid_std = kid_from_features(f_real, f_fake, seed=seed)
    precision, recall = precision_recall(f_real, f_fake, k)
    metrics = {
        "fid": fid_from_features(f_real, f_fake), "kid": kid, "kid_std": kid_std,
        "precision": precision, "recall": recall,
        "classifier_score": classifier_score(_probabilities(net, fake)) if net.is_classifier else None,
        "fid_per_class": None,
        "nn_distance_mean": None, "heldout_nn_distance_mean": None,
        "memorization_threshold": None, "memorization_rate": None,
        "n_real": len(real), "n_fake": len(fake), "k": k, "num_features": net.num_features, "feature_net": net.kind,
    }  # fmt: skip
    if real_labels is not None and fake_labels is not None:
        metrics["fid_per_class"] = _fid_per_class(
            f_real, f_fake, _as_labels(real_labels, len(real), "real"), _as_labels(fake_labels, len(fake), "fake")
        )
    if train_for_memorization is not None:
        _check_images(train_for_memorization, net, "train_for_memorization")
        _check_images(heldout, net, "heldout")
        metrics.update(
            memorization(f_fake, extract_features(net, train_for_memorization), extract_features(net, heldout))
        )
    return metrics


def _as_labels(labels: Tensor | np.ndarray, n: int, name: str) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"{name}_labels must be {n} integers, got {labels.dtype} {tuple(labels.shape)}")
    return labels.long()


def _fid_per_class(f_real: Tensor, f_fake: Tensor, y_real: Tensor, y_fake: Tensor) -> dict[int, float | None]:
    result = {}
    for c in sorted(set(y_real.tolist()) | set(y_fake.tolist())):
        r, f = f_real[y_real == c], f_fake[y_fake == c]
        result[c] = fid_from_features(r, f) if len(r) >= 2 and len(f) >= 2 else None
    return result


def floors(
    train: Tensor,
    heldout: Tensor,
    net: FeatureNet,
    n: int,
    *,
    train_labels: Tensor | np.ndarray | None = None,
    heldout_labels: Tensor | np.ndarray | None = None,
    k: int = 3,
    seed: int = 0,
) -> dict:
    """The metrics of a perfect generator: n random real training images vs n random held-out images.

    n is lowered to the smaller set's size when needed (the result's "n" says what was used). The
    subsets are drawn from ``seed`` (data sorted by class would otherwise give one class). The
    memorization check compares those held-out images with the whole training set, so its floor
    is memorization_rate ~0.05 by construction and nn_distance_mean is the held-out distance.
    """
    n = min(n, len(train), len(heldout))
    generator = torch.Generator().manual_seed(seed)
    i_train = torch.randperm(len(train), generator=generator)[:n]
    i_heldout = torch.randperm(len(heldout), generator=generator)[:n]
    labelled = train_labels is not None and heldout_labels is not None
    result = image_metrics(
        train[i_train], heldout[i_heldout], net,
        real_labels=torch.as_tensor(train_labels)[i_train] if labelled else None,
        fake_labels=torch.as_tensor(heldout_labels)[i_heldout] if labelled else None,
        train_for_memorization=train, heldout=heldout, k=k, seed=seed,
    )  # fmt: skip
    return {**result, "n": n}


# ---- one scoring for runs and folders -------------------------------------------------------------

FEATURE_NET_KEYS = ("kind", "num_features", "test_accuracy", "test_mse", "cached", "path")  # reported with scores


def score_against_data(
    fakes: Tensor, train: ImageData, heldout: ImageData, *, fake_labels: Tensor | None = None, seed: int = 0
) -> dict:
    """Score N generated images against the first N held-out real images of a data set, as `aigc eval` does.

    fakes: float (N, C, H, W) in [-1, 1] shaped like the data, 3 <= N <= heldout.n. The feature net
    is the training split's (``feature_net``, cached); its test accuracy (or MSE) is measured on
    the held-out split. With ``fake_labels`` (N,) and a labelled held-out split, FID is also
    reported per class. The memorization check compares the fakes with the whole training split.
    Every metric's ``_floor`` is the same metric for N real training images against N held-out
    ones (``floors``); k = min(3, N - 1) for the k-NN radii of precision and recall.

    Returns {"metrics": image_metrics' dict plus the floors, "n": N, "feature_net": FEATURE_NET_KEYS of its info}.
    """
    n = len(fakes)
    if not 3 <= n <= heldout.n:
        raise ValueError(f"need 3 to {heldout.n} (the held-out images) fake images, got {n}")
    net, net_info = feature_net(train, seed=seed, test=heldout)
    x_train, x_heldout = to_tensor(train.images), to_tensor(heldout.images)
    k = min(3, n - 1)  # k-NN radii need k < N
    labelled = fake_labels is not None and heldout.labels is not None
    metrics = image_metrics(
        x_heldout[:n], fakes, net,
        real_labels=torch.from_numpy(heldout.labels[:n]) if labelled else None,
        fake_labels=fake_labels if labelled else None,
        train_for_memorization=x_train, heldout=x_heldout[:n], k=k, seed=seed,
    )  # fmt: skip
    floor = floors(x_train, x_heldout, net, n, k=k, seed=seed)
    metrics.update({f"{key}_floor": value for key, value in floor.items() if isinstance(value, float)})
    return {"metrics": metrics, "n": n, "feature_net": {key: net_info.get(key) for key in FEATURE_NET_KEYS}}
