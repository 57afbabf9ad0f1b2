"""Pictures of a trained VAE: reconstructions, the latent space, and an interpolation animation.

- reconstructions.png: originals (odd rows) above their reconstructions (even rows)
- latent.png: with z_dim = 2, the seeds' manifold plot (decoder outputs over a grid of z at the
  Gaussian quantiles); otherwise a scatter of the validation codes' means projected to 2-D by PCA,
  coloured by class
- interpolation.gif: decoder outputs along a spherical interpolation between two random codes
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aigc.data.images import make_grid, save_png, to_uint8

MANIFOLD_SIDE = 15  # 15 x 15 decoded codes, as in Kingma & Welling's figure 4
GIF_FRAMES = 24


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

    # 3. interpolation between two codes (slerp keeps the interpolants at a typical Gaussian norm)
    g = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(2, model.config.z_dim, generator=g)
    ts = torch.linspace(0, 1, GIF_FRAMES)
    z = torch.stack([_slerp(z0, z1, float(t)) for t in ts])
    y_frames = None if y is None else y[:1].expand(GIF_FRAMES)
    frames = to_uint8(model.sample(GIF_FRAMES, z=z, y=y_frames))
    scale = max(1, 128 // frames.shape[1])  # small images are enlarged so the animation can be seen
    pictures = [Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f).resize(
        (f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    pictures += pictures[::-1]  # there and back
    pictures[0].save(paths[2], save_all=True, append_images=pictures[1:], duration=80, loop=0)
    return paths


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
    cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
