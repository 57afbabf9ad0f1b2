"""What `aigc optimize` makes of an image run and people's ratings of its pictures:

- rerank: a reward model on the evaluation feature net's features of the rated images (aigc.optimize.rerank), used
  as best-of-n at generation time; the run holds the parent's weights unchanged.
- sft: the parent continues training (its weights and EMA weights, as `aigc train --init-from` continues a run) on
  its liked images mixed with its own training data: each batch is `feedback_share` liked images, drawn in
  proportion to their ratings' sum, and the rest training images; validated on the parent's validation split. The
  families that sample with an EMA of their weights (dcgan, diffusion) show the change slowly, as the average
  catches up (its decay, 0.999 by default, spans about a thousand steps). Two keys hold the new run nearer the
  parent's quality: `tilt` k draws the training data as rerank's rule would keep it (of k images, the first a
  reward fitted on the ratings judges liked, else the first: `tilted_weights`; a VAE's images each judged by its
  reconstruction, which is drawn as the samples the reward was fitted on are: `as_the_parent_draws`), so the
  preference moves the class mix with real pictures rather than with the parent's own; `anchor` pulls the weights
  towards the parent's (an L2 term on their distance). Measured in docs/optimize.md (benchmarks/feedback_sft.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aigc.data.images import read_png, to_tensor, to_uint8
from aigc.errors import BadRequest, UserError
from aigc.modalities import image as image_modality
from aigc.modalities.base import Prepared
from aigc.optimize import rerank
from aigc.optimize.feedback import Feedback
from aigc.train import ImageBatches

METHODS = ("sft", "rerank")
TRAIN_DEFAULTS = {"warmup_steps": 10, "eval_interval": 25, "keep_best": False, "compile": "false"}
# sft's steps by default. Measured (benchmarks/feedback.py --quick, a 3000-step vae, 200 ratings, sneakers and boots
# liked): 100 steps moved the liked share 0.21 -> 0.25 (p 0.17), 400 -> 0.29, 1000 -> 0.36 (p 0.0005) with FID in
# the judged images' own class mix 12.3 -> 14.8 (+20%)
STEPS = 1000
# rerank keeps, of 3 candidates, the first the reward judges liked, else the first (rejection sampling), not the best
# of 2 by score. Measured (benchmarks/feedback_picks.py: the benchmark's parent and 200 ratings, 500 kept images each,
# FID against the parent's first 500 held-out images): best of 2 liked 0.196 -> 0.334 at FID +17% (class-mix FID
# +25%), first-liked of 3 0.368 at +7.5% (+4.7%). A linear reward on the features, asked for the highest of several,
# picks the most extreme pictures of each kind; the first one judged liked is as typical as the model's own
OPTIMIZE_DEFAULTS = {"best_of": 3, "pick": "first-liked"}
POOL_SEED = 2_000_003  # the pool's seeds, apart from requests' and the judge's
POOL_CHUNK = 500  # pool images drawn and judged at a time
# the parent's other [train] keys are kept (its learning rate among them); the last weights, not those of the best
# validation loss (the validation split measures the data, which the preference is allowed to move a little)


class LikedImageBatches(ImageBatches):
    """sft: each training batch is round(share * n) liked images (at least one where share > 0), drawn with
    replacement in proportion to their weights, then n minus that many images of the training data, as ImageBatches
    draws them or, with `data_weights`, drawn with replacement in proportion to those (`tilted_weights`). With
    `anchor` > 0 the training loss
    also pulls the weights towards `parent` (the parent's, in the order of model.parameters()):

        loss = loss_data + anchor / 2 * sum_i (w_i - w_parent_i)^2          (an L2 anchor, as in L2-SP)
    """

    def __init__(self, data: ImageBatches, x_liked: torch.Tensor, y_liked: torch.Tensor | None,
                 weights: list[float], share: float, *, data_weights: torch.Tensor | None = None,
                 anchor: float = 0.0, parent: list[torch.Tensor] | None = None, tilt: dict | None = None):
        super().__init__(data.x_train, data.y_train, data.x_val, data.y_val, hflip=data.hflip)
        self.x_liked, self.y_liked = x_liked, y_liked
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.share = share
        self.data_weights = data_weights
        if anchor and parent is None:
            raise ValueError("anchor > 0 needs the parent's weights")
        self.anchor, self.parent = anchor, parent
        self.tilt = tilt or {}  # tilt_liked_share: the share of the training images judged liked, for the metrics

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        m = min(n, max(1, round(self.share * n))) if self.share > 0 and len(self.x_liked) else 0
        parts = []
        if m:
            rows = torch.multinomial(self.weights, m, replacement=True, generator=generator)
            parts.append((self.x_liked[rows],) if self.y_liked is None else (self.x_liked[rows], self.y_liked[rows]))
        if m < n and self.data_weights is None:
            parts.append(super().sample(generator, n - m))
        elif m < n:
            idx = torch.multinomial(self.data_weights, n - m, replacement=True, generator=generator)
            x = self.x_train[idx]
            if self.hflip:
                flip = torch.rand(n - m, generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            parts.append((x,) if self.y_train is None else (x, self.y_train[idx]))
        return parts[0] if len(parts) == 1 else tuple(torch.cat(t) for t in zip(*parts, strict=True))

    def loss(self, model, batch: tuple[torch.Tensor, ...], *, phase: str | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        loss = super().loss(model, batch, phase=phase, noise=noise)
        if not self.anchor or not model.training:  # the validation loss (eval mode) is the data's alone
            return loss
        return loss + self.anchor / 2 * anchor_distance(model.parameters(), self.parent)


def anchor_distance(params, parent: list[torch.Tensor]) -> torch.Tensor:
    """sum_i (w_i - w_parent_i)^2 over every parameter (the parent's moved to each parameter's device once)."""
    total = None
    for i, (p, p0) in enumerate(zip(params, parent, strict=True)):
        if p0.device != p.device or p0.dtype != p.dtype:
            parent[i] = p0 = p0.to(device=p.device, dtype=p.dtype)
        term = (p - p0).pow(2).sum()
        total = term if total is None else total + term
    return total


def tilted_weights(liked: torch.Tensor, k: float) -> torch.Tensor:
    """Weights (N,) that make a draw from N images distributed as rerank's first-liked of k makes it from draws of
    them: of k draws, the first the reward judges liked (`liked`, bool (N,)), else the first. With q the share
    liked, the kept image is a liked one with probability 1 - (1 - q)^k, then uniform among them, else uniform
    among the others: weights (1 - (1 - q)^k) / q for a liked image and (1 - q)^(k - 1) for another (N times the
    probability of each). A k between two counts (k >= 1) gives the liked share 1 - (1 - q)^k between theirs, each
    side still uniform within: a strength between first-liked of 2 and of 3, say."""
    q = float(liked.double().mean())
    if q in (0.0, 1.0):
        return torch.ones(len(liked), dtype=torch.float64)
    one = torch.ones(len(liked), dtype=torch.float64)  # in float64 throughout (a float32 where loses the sum's 1e-7)
    return torch.where(liked, one * ((1 - (1 - q) ** k) / q), one * (1 - q) ** (k - 1))


def reconstruction(model, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """A VAE's picture of each real image: its decoder mean at z = mu (`VAE.reconstruct`), rounded to 8 bits as a
    generated PNG is: (N, C, H, W) in [-1, 1], in batches of RECON_BATCH."""
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), RECON_BATCH):
            part = model.reconstruct(x[i:i + RECON_BATCH], None if y is None else y[i:i + RECON_BATCH])
            parts.append(to_tensor(to_uint8(part)))
    return torch.cat(parts)


# How `tilt`'s reward sees a real training image, by family: as the parent would draw it, where the family can say.
# The reward is fitted on the parent's own samples, and a real image is not one: a VAE's reconstruction (its decoder
# mean at z = mu) is drawn as its samples are (measured on a 3000-step VAE of the tests' digits: the brightness of
# its reconstructions spreads as its samples' do, standard deviation 1.6 and 1.8 of 255, the real digits' 8.5).
# dcgan has no encoder, and a diffusion model's noised-and-denoised copy costs a sampling run per training image:
# both are judged on the images themselves (not measured).
PARENT_VIEWS = {"vae": reconstruction}
# sft's default (neither `tilt` nor `feedback_share` given): tilt 2.5 with no liked pictures in the batches where a
# reward fitted on the ratings judges at least this share of the training images liked (Fashion-MNIST, the taste for
# footwear: liked 0.210 -> 0.325 over 400 fresh images, p 0.00012, plain FID +20%), else the liked pictures in half
# of each batch (a taste the real images do not show, as the tests' bright digits: none of them is judged liked)
DEFAULT_TILT, DEFAULT_TILT_MIN_SHARE = 2.5, 0.05
RECON_BATCH = 512


def as_the_parent_draws(loaded, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Real images x (N, C, H, W) in [-1, 1] (y: their labels for a conditional run, else None) as `tilt`'s reward
    judges them: the family's PARENT_VIEWS entry, else the images themselves."""
    view = PARENT_VIEWS.get(loaded.record["family"])
    return x if view is None else view(loaded.model, x, y)


def prepare(fam, parent_dir: Path, parent: dict, configs: dict, feedback: Feedback, method: str,
            sets: dict) -> Prepared:
    if method == "rerank":
        reward = rerank.fit_for_run("image", image_modality.load(str(parent_dir)), feedback, configs["optimize"])
        return Prepared(None, {}, {"reward": reward, "parent_metrics": parent.get("metrics", {})},
                        rerank.reward_run_files(parent_dir, reward))
    # sft: the parent's data and split, its model continued (aigc train --init-from)
    val_source = parent["data"]["val"]["source"]
    prepared = image_modality.prepare(parent["family"], fam, parent["data"]["train"]["source"],
                                      None if val_source in image_modality.HELD_OUT else val_source,
                                      str(parent_dir), configs, sets)
    if prepared.record["data"]["train"]["sha256"] != parent["data"]["train"]["sha256"]:
        raise UserError(f"the training data of {parent_dir.name} changed since the run was made (sha256 differs)")
    channels = parent["image_shape"][0]
    liked = feedback.liked
    missing = [r.output for r in liked if not Path(r.output).is_file()]
    if missing:
        raise UserError(f"{len(missing)} liked images are missing, e.g. {missing[0]} (the store keeps the path of "
                        f"each generated PNG)")
    pixels = np.stack([read_png(Path(r.output), channels) for r in liked])
    if list(pixels.shape[1:]) != [parent["image_shape"][1], parent["image_shape"][2], channels]:
        raise BadRequest(f"the liked images are {pixels.shape[2]}x{pixels.shape[1]}, run {parent_dir.name} makes "
                         f"{parent['image_shape'][2]}x{parent['image_shape'][1]}")
    labels = [int(r.prompt) for r in liked] if parent.get("num_classes") else None
    weights = [float(r.score) for r in liked]
    cfg = configs["optimize"]
    if cfg.pool and feedback.disliked:  # a reward needs both verdicts: with liked images alone, no pool
        more, more_labels, more_weights = reward_liked_pool(parent_dir, feedback, cfg, labels)
        pixels = np.concatenate([pixels, more]) if len(more) else pixels
        labels = None if labels is None else labels + more_labels
        weights += more_weights
    data_weights, tilt = None, {}
    judged = None
    if "tilt" not in sets and "feedback_share" not in sets and feedback.disliked:
        # the default: tilt where a reward fitted on the ratings finds the taste in the training images, else the
        # liked pictures in each batch (measured both ways in docs/optimize.md, "The default")
        judged = _liked_share_of_data(parent_dir, prepared, feedback, cfg)
        if DEFAULT_TILT_MIN_SHARE <= judged[1] < 1:
            cfg.tilt, cfg.feedback_share = DEFAULT_TILT, 0.0
        else:
            tilt = {"tilt_liked_share": judged[1]}  # why the default did not tilt
    if 0 < cfg.tilt < 1:  # fewer than one draw would tilt the data away from what is liked
        raise BadRequest(f"tilt must be 0 (the data as it is) or at least 1 (first-liked of that many), "
                         f"got {cfg.tilt:g}")
    if cfg.tilt and not feedback.disliked:
        raise BadRequest(f"tilt needs a reward, and a reward needs disliked images as well as liked ones: rate some "
                         f"images of {parent_dir.name} bad, or leave tilt at 0")
    if cfg.tilt:
        liked_data, share = judged or _liked_share_of_data(parent_dir, prepared, feedback, cfg)
        view = "reconstruction" if parent["family"] in PARENT_VIEWS else "image"
        if share in (0.0, 1.0):  # tilted_weights would be uniform: sft on the data alone, which was not asked for
            raise BadRequest(f"tilt: a reward fitted on the ratings judges {'none' if share == 0 else 'all'} of the "
                             f"{len(liked_data)} training images of {parent_dir.name} liked (each judged by its "
                             f"{view}), so tilting would change nothing; rate more images, or leave tilt at 0")
        data_weights = tilted_weights(liked_data, cfg.tilt)
        tilt = {"tilt_liked_share": share}
    parent_weights = [p.detach().clone() for p in prepared.model.parameters()] if cfg.anchor else None
    prepared.state = LikedImageBatches(prepared.state, to_tensor(pixels),
                                       None if labels is None else torch.tensor(labels), weights,
                                       cfg.feedback_share, data_weights=data_weights, anchor=cfg.anchor,
                                       parent=parent_weights, tilt=tilt)

    def write_files(staging: Path) -> None:
        if prepared.write_files is not None:
            prepared.write_files(staging)

    return Prepared(prepared.model, prepared.record, prepared.state, write_files)


def _liked_share_of_data(parent_dir: Path, prepared: Prepared, feedback: Feedback, cfg) -> tuple[torch.Tensor, float]:
    """Which training images a reward fitted on the ratings judges liked (each as the parent draws it), and their
    share."""
    loaded = image_modality.load(str(parent_dir))
    reward = rerank.fit_from_feedback("image", loaded, feedback, l2=cfg.l2)
    judged = as_the_parent_draws(loaded, prepared.state.x_train, prepared.state.y_train)
    liked_data = reward.score(rerank.pixel_features(loaded, judged)) > 0
    return liked_data, float(liked_data.double().mean())


def reward_liked_pool(parent_dir: Path, feedback: Feedback, cfg, labels: list[int] | None
                      ) -> tuple[np.ndarray, list[int], list[float]]:
    """sft's pool: `cfg.pool` fresh images of the parent (seeds POOL_SEED ..., a conditional run's spread over the
    liked images' classes) and, of them, those a reward fitted on the ratings (as rerank fits it) judges liked, each
    weighted by its probability of "liked": (pixels (M, H, W, C) uint8, their classes, weights)."""
    loaded = image_modality.load(str(parent_dir))
    reward = rerank.fit_from_feedback("image", loaded, feedback, l2=cfg.l2)
    classes = sorted(set(labels)) if labels is not None else [None]
    kept, kept_labels, kept_weights = [], [], []
    for i, label in enumerate(classes):
        n = cfg.pool // len(classes) + (i < cfg.pool % len(classes))
        for start in range(0, n, POOL_CHUNK):
            m = min(POOL_CHUNK, n - start)
            images = image_modality.generate(loaded, {"n": m, "class_": label}, POOL_SEED + 1_000_000 * i + start,
                                             None).outputs
            liked = torch.sigmoid(reward.score(rerank.image_features(loaded, images)))
            for image, p in zip(images, liked.tolist(), strict=True):
                if p > 0.5:
                    kept.append(image)
                    kept_labels.append(label)
                    kept_weights.append(p)
    shape = (0, *loaded.record["image_shape"][1:], loaded.record["image_shape"][0])
    return (np.stack(kept) if kept else np.zeros(shape, np.uint8)), kept_labels, kept_weights


def fit(fam, prepared: Prepared, configs: dict, run_dir: Path, budget, method: str) -> dict:
    if method == "rerank":
        return rerank.fitted(prepared.state["reward"])
    return image_modality.fit(fam, prepared, configs, run_dir, budget, False)


def finish(family: str, fam, prepared: Prepared, configs: dict, run_dir: Path, fitted: dict, method: str) -> dict:
    """rerank: the parent's validation metrics (the same weights, byte for byte); sft: the new weights' own, and with
    `tilt` the share of the training images the reward judged liked (tilt_liked_share)."""
    if method == "rerank":
        kept = ("val_nelbo", "val_bits_per_dim", "val_images", "val_loss")
        return {**{k: v for k, v in prepared.state["parent_metrics"].items() if k in kept}, **fitted}
    return {**image_modality.finish(family, fam, prepared, configs, run_dir, fitted), **prepared.state.tilt}
