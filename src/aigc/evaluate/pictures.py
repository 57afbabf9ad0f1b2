"""Pictures of a trained model, written into <run>/pictures/ when training ends (`write_pictures`).

VAE (`write_vae_pictures`):
- reconstructions.png: originals (odd rows) above their reconstructions (even rows)
- latent.png: with z_dim = 2, the seeds' manifold plot (decoder outputs over a grid of z at the
  Gaussian quantiles); otherwise a scatter of the validation codes' means projected to 2-D by PCA,
  coloured by class
- interpolation.gif: decoder outputs along a spherical interpolation between two random codes

Diffusion (`write_diffusion_pictures`):
- trajectory.gif: 8 samples on their way from x_T ~ N(0, I) to x_0, one frame per sampler step
  (DPM-Solver++, 20 steps: what `aigc generate` does by default); the last frame is held
- interpolation.gif: the samples of a spherical interpolation between two starting noises x_T,
  each denoised by DDIM with eta = 0, a deterministic map x_T -> x_0, so that neighbouring noises
  give neighbouring images (Song et al. 2021, §5.4, interpolate x_T the same way)

Any generator with a latent code (`write_latent_pictures`, for GANs): interpolation.gif through
`model.sample(n, z=z, y=y)`, z (n, model.config.z_dim) ~ N(0, I), as for the VAE.

Spherical interpolation (Shoemake 1985; White 2016 for generative models), with cos(omega) = <a, b> / (|a| |b|):

    slerp(a, b; t) = sin((1 - t) omega) / sin(omega) a + sin(t omega) / sin(omega) b

keeps the interpolants at the norm typical of N(0, I) in D dimensions (about sqrt(D)), where the
straight line between two nearly orthogonal draws passes through norms down to sqrt(D / 2), codes
the model has never seen.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aigc.data.images import make_grid, save_png, to_uint8
from aigc.fsutil import atomic_write_bytes

MANIFOLD_SIDE = 15  # 15 x 15 decoded codes, as in Kingma & Welling's figure 4
GIF_FRAMES = 24  # interpolation frames, played there and back
FRAME_MS = 80  # how long a GIF frame shows
HOLD_MS = 1500  # the trajectory's last frame (the samples) shows this long before the loop restarts
INTERPOLATION_SIDE = 128  # GIFs of small images are enlarged (nearest neighbour), up to this many pixels ...
TRAJECTORY_SIDE = 64  # ... per image; the trajectory shows 8 images side by side, so less
TRAJECTORY_SAMPLES = 8
TRAJECTORY_SAMPLER = {"sampler": "dpm-solver", "steps": 20}  # `aigc generate`'s default
INTERPOLATION_SAMPLER = {"sampler": "ddim", "steps": 50, "eta": 0.0}  # deterministic: x_T -> x_0 is a function


def write_pictures(family: str, model, x: torch.Tensor, y: torch.Tensor | None, out: Path) -> list[Path]:
    """Write the pictures of a trained model of `family` into `out` and return their paths.

    x: validation images (N, C, H, W) in [-1, 1]; y: their labels (N,) for a conditional model,
    else None. A family without an entry in PICTURES gets no pictures ([]).
    """
    writer = PICTURES.get(family)
    return [] if writer is None else writer(model, x, y, out)


@torch.no_grad()
def write_vae_pictures(model, x: torch.Tensor, y: torch.Tensor | None, out: Path, *, seed: int = 0) -> list[Path]:
    """Write the three pictures for validation images x (N, C, H, W) in [-1, 1]; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    paths = [out / "reconstructions.png", out / "latent.png", out / "interpolation.gif"]

    # 1. reconstructions: 32 originals and their decoder means at z = mu
    originals = x[:32]
    labels = None if y is None else y[:32]
    recon = model.reconstruct(originals, labels)
    rows = [t for i in range(0, len(originals), 8) for t in (originals[i:i + 8], recon[i:i + 8])]
    save_png(paths[0], make_grid(to_uint8(torch.cat(rows)), nrow=8))

    # 2. the latent space
    if model.config.z_dim == 2:
        save_png(paths[1], _manifold(model, y))
    else:
        _pca_scatter(model, x[:2000], None if y is None else y[:2000], paths[1])

    # 3. interpolation between two codes
    _write_interpolation(model, (model.config.z_dim,), y, paths[2], seed)
    return paths


@torch.no_grad()
def write_diffusion_pictures(model, x: torch.Tensor, y: torch.Tensor | None, out: Path, *, seed: int = 0
                             ) -> list[Path]:
    """Write trajectory.gif and interpolation.gif of a Diffusion model; x is not used (both start
    from noise), y only says whether the model is conditional (then the trajectory shows classes
    0, 1, ..., 7 and the interpolation the class of y[0]). Returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    paths = [out / "trajectory.gif", out / "interpolation.gif"]

    # 1. the denoising trajectory [x_T, ..., x_0] of 8 samples, one grid per step
    labels = None if y is None else torch.arange(TRAJECTORY_SAMPLES) % model.num_classes
    _, xs = model.sample(TRAJECTORY_SAMPLES, generator=torch.Generator().manual_seed(seed), y=labels,
                         return_trajectory=True, **TRAJECTORY_SAMPLER)
    frames = np.stack([make_grid(to_uint8(x_t), nrow=TRAJECTORY_SAMPLES) for x_t in xs])  # (steps + 1, H', W', C)
    save_gif(paths[0], frames, scale=_enlargement(model.image_shape[1], TRAJECTORY_SIDE), hold_ms=HOLD_MS)

    # 2. interpolation between two starting noises, through the deterministic sampler
    _write_interpolation(model, model.image_shape, y, paths[1], seed, **INTERPOLATION_SAMPLER)
    return paths


@torch.no_grad()
def write_latent_pictures(model, x: torch.Tensor, y: torch.Tensor | None, out: Path, *, seed: int = 0
                          ) -> list[Path]:
    """Write interpolation.gif of a generator with a latent code: `model.config.z_dim` and
    `model.sample(n, z=z, y=y)` with z (n, z_dim) ~ N(0, I) (a GAN's generator, or the VAE's
    decoder). x is not used; a conditional model (y given) interpolates within the class of y[0]."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    path = out / "interpolation.gif"
    _write_interpolation(model, (model.config.z_dim,), y, path, seed)
    return [path]


def save_gif(path: Path, frames: np.ndarray, *, scale: int = 1, bounce: bool = False, hold_ms: int = FRAME_MS
             ) -> None:
    """Write uint8 frames (F, H, W, C) as a looping GIF, atomically, each enlarged `scale` times
    (nearest neighbour). `bounce` plays them there and back (f_0 .. f_{F-1} .. f_1, then the
    loop: no frame twice in a row); the last frame shows for `hold_ms`. As GIF writers do, PIL
    merges identical consecutive frames into one longer frame."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] not in (1, 3) or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (F, H, W, 1|3), F >= 1, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    pictures = [Image.fromarray(f[:, :, 0] if f.shape[2] == 1 else f).resize(
        (width * scale, height * scale), Image.Resampling.NEAREST) for f in frames]
    durations = [FRAME_MS] * (len(pictures) - 1) + [hold_ms]
    if bounce:
        pictures += pictures[-2:0:-1]
        durations += [FRAME_MS] * (len(frames) - 2)
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    atomic_write_bytes(path, buffer.getvalue())


def _write_interpolation(model, z_shape: tuple[int, ...], y: torch.Tensor | None, path: Path, seed: int,
                         **sample_options) -> None:
    """GIF_FRAMES samples from the slerp between two N(0, I) draws of shape z_shape (seeded), there and back."""
    g = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(2, *z_shape, generator=g)
    z = torch.stack([_slerp(z0, z1, float(t)) for t in torch.linspace(0, 1, GIF_FRAMES)])  # (GIF_FRAMES, *z_shape)
    y_frames = None if y is None else y[:1].expand(GIF_FRAMES)
    frames = to_uint8(model.sample(GIF_FRAMES, z=z, y=y_frames, **sample_options))  # (GIF_FRAMES, H, W, C)
    save_gif(path, frames, scale=_enlargement(frames.shape[1], INTERPOLATION_SIDE), bounce=True)


def _enlargement(side: int, target: int) -> int:
    """The largest whole factor that keeps an image side within `target` pixels (1 for larger images)."""
    return max(1, target // side)


def _manifold(model, y: torch.Tensor | None) -> np.ndarray:
    # codes at the Gaussian quantiles of a regular grid in (0, 1): equal probability mass per cell
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, MANIFOLD_SIDE))
    z = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
    labels = None if y is None else y[:1].expand(len(z))
    return make_grid(to_uint8(model.sample(len(z), z=z, y=labels)), nrow=MANIFOLD_SIDE, pad=0)


def _pca_scatter(model, x: torch.Tensor, y: torch.Tensor | None, path: Path) -> None:
    from matplotlib.figure import Figure

    mu, _ = model.encode(x, y)
    centred = mu - mu.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    points = (centred @ v[:2].T).numpy() if mu.shape[1] > 1 else np.c_[mu.numpy(), np.zeros(len(mu))]
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    if y is None:
        ax.scatter(points[:, 0], points[:, 1], s=4)
    else:
        scatter = ax.scatter(points[:, 0], points[:, 1], s=4, c=y.numpy(), cmap="tab10")
        fig.colorbar(scatter, ax=ax, label="class")
    ax.set_title(f"validation codes: the 2 principal components of {mu.shape[1]}-D mu")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """slerp(a, b; t) of two tensors of one shape, taken as vectors (see the module docstring)."""
    cos = torch.dot(a.flatten() / a.norm(), b.flatten() / b.norm()).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


# family -> its pictures' writer(model, x_val, y_val, out); a family without an entry gets none. A
# GAN's generator has the VAE decoder's latent contract (config.z_dim, sample(n, z=, y=)).
PICTURES = {
    "vae": write_vae_pictures,
    "diffusion": write_diffusion_pictures,
    "dcgan": write_latent_pictures,
}
