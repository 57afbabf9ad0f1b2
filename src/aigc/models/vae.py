"""Convolutional variational autoencoder (Kingma & Welling 2014), optionally class-conditional.

    encoder  x (N, C, H, W) -> 2 stride-2 convs -> flatten [+ label embedding] -> linear -> mu, logvar
    z        = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)                    (reparameterisation, K&W §2.4)
    decoder  z [+ label embedding] -> linear -> 2 stride-2 transposed convs -> (N, C, H, W)

Training minimises the negative ELBO, reported in nats per image (not per pixel):

    nelbo = E_q[-log p(x|z)] + KL(q(z|x) || N(0, I))          (K&W eq. 10, one sample of eps)
    loss  = E_q[-log p(x|z)] + beta * KL                        (beta-VAE, Higgins et al. 2017)

Two likelihoods p(x|z) for pixels x in [-1, 1]:
- bernoulli: the decoder gives one logit per pixel; the target is the intensity (x + 1) / 2 in
  [0, 1], used as a probability (the usual practice on MNIST-like data). For grey values this is
  not a normalised density (Loaiza-Ganem & Cunningham 2019), so its nats compare bernoulli runs
  with each other; they are a true bound only on binary images.
- gaussian: the decoder gives the mean, squashed into [-1, 1] by tanh; the standard deviation is
  fixed at `config.sigma` on the [-1, 1] scale, and -log p(x|z) keeps the constant
  0.5 * log(2 pi sigma^2) per pixel, so it is a true density in [-1, 1] pixel units.

The decoder reproduces the exact input size by `output_padding`: every conv has kernel 4, stride 2
and padding 1, so it maps a side of length L to floor(L / 2), and the matching transposed conv
maps it back to 2 * floor(L / 2) + output_padding; output_padding = L mod 2 restores odd sides
(28 -> 14 -> 7 -> 14 -> 28, 7 -> 3 -> 1 -> 3 -> 7). Kernel 4 (divisible by the stride) avoids the
checkerboard pattern a kernel-3 transposed conv leaves (Odena et al. 2016), and no crop or
interpolation is needed, so no output pixel is computed and thrown away or resampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.config import option
from aigc.models.image_files import check_image_args, load_image_model, save_image_model

CONFIG_FILE = "vae_config.json"
MIN_SIDE = 4  # two halvings must leave at least one pixel: 4 -> 2 -> 1


@dataclass
class VAEConfig:
    z_dim: int = option(16, "latent dimensions (2 gives the 2-D latent manifold plot)", min=1, max=1024)
    base_channels: int = option(32, "channels of the first conv layer (doubled in the second)", min=4, max=1024)
    likelihood: str = option("bernoulli", "bernoulli: pixel intensities as probabilities; gaussian: fixed-variance",
                             choices=("bernoulli", "gaussian"))
    beta: float = option(1.0, "weight of the KL term (beta-VAE)", min=0.0)
    sigma: float = option(0.1, "gaussian likelihood only: fixed std of p(x|z) on the [-1, 1] pixel scale",
                          min=0.0, max=10.0, min_exclusive=True)
    label_dim: int = option(16, "conditional VAE only: size of the class embedding fed to encoder and decoder",
                            min=1, max=1024)


# --------------------------------------------------------------------------------------
# maths


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, summed over the last dim: (N, D) -> (N,).

    Closed form (Kingma & Welling 2014, appendix B): 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _down(side: int) -> int:
    """Side length after a kernel-4, stride-2, padding-1 conv: floor((L + 2 - 4) / 2) + 1."""
    return side // 2


# --------------------------------------------------------------------------------------
# model


class VAE(nn.Module):
    def __init__(self, config: VAEConfig, image_shape: tuple[int, int, int], num_classes: int = 0):
        super().__init__()
        channels, height, width = check_image_args("VAE", image_shape, num_classes, MIN_SIDE)
        self.config = config
        self.image_shape = (channels, height, width)
        self.num_classes = num_classes
        self.ema = None  # a VAE samples with its live weights (models/image_files.py reads this)

        c1, c2 = config.base_channels, 2 * config.base_channels
        h1, w1 = _down(height), _down(width)  # after the first conv
        h2, w2 = _down(h1), _down(w1)  # after the second conv
        self._hidden_shape = (c2, h2, w2)
        flat = c2 * h2 * w2
        label_dim = config.label_dim if num_classes else 0

        # one class embedding, read by both the encoder q(z|x, y) and the decoder p(x|z, y)
        self.label_emb = nn.Embedding(num_classes, config.label_dim) if num_classes else None

        self.encoder = nn.Sequential(
            nn.Conv2d(channels, c1, 4, stride=2, padding=1), nn.SiLU(),  # (N, c1, h1, w1)
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.SiLU(),  # (N, c2, h2, w2)
            nn.Flatten(),  # (N, flat)
        )
        self.to_moments = nn.Linear(flat + label_dim, 2 * config.z_dim)  # -> (mu, logvar)

        self.from_latent = nn.Linear(config.z_dim + label_dim, flat)
        # output_padding = side mod 2 brings each side back to exactly what the encoder halved
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.Unflatten(1, self._hidden_shape),  # (N, c2, h2, w2)
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1, output_padding=(h1 % 2, w1 % 2)), nn.SiLU(),
            nn.ConvTranspose2d(c1, channels, 4, stride=2, padding=1, output_padding=(height % 2, width % 2)),
        )  # (N, C, H, W)

    def _labels(self, y: Tensor | None, n: int) -> Tensor | None:
        """The class embedding (n, label_dim) for a conditional model, None for an unconditional one."""
        if self.label_emb is None:
            if y is not None:
                raise ValueError("this VAE is unconditional (num_classes=0): do not pass labels y")
            return None
        if y is None:
            raise ValueError(f"this VAE is conditional ({self.num_classes} classes): pass labels y, int64 (N,)")
        if y.shape != (n,):
            raise ValueError(f"labels y must have shape ({n},), got {tuple(y.shape)}")
        return self.label_emb(y)

    def _check_images(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W) in [-1, 1] -> mu, logvar of q(z|x[, y]), each (N, z_dim)."""
        self._check_images(x)
        h = self.encoder(x)  # (N, flat)
        emb = self._labels(y, x.shape[0])
        if emb is not None:
            h = torch.cat([h, emb], dim=1)  # (N, flat + label_dim)
        mu, logvar = self.to_moments(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """z (N, z_dim) -> (N, C, H, W): logits (bernoulli) or the mean in [-1, 1] (gaussian)."""
        emb = self._labels(y, z.shape[0])
        if emb is not None:
            z = torch.cat([z, emb], dim=1)  # (N, z_dim + label_dim)
        out = self.decoder(self.from_latent(z))
        return out if self.config.likelihood == "bernoulli" else torch.tanh(out)

    def _pixel_mean(self, out: Tensor) -> Tensor:
        """Decoder output -> E[x|z] on the [-1, 1] scale."""
        return 2.0 * torch.sigmoid(out) - 1.0 if self.config.likelihood == "bernoulli" else out

    def recon_nll(self, out: Tensor, x: Tensor) -> Tensor:
        """-log p(x|z) in nats, summed over pixels: decoder output and x (N, C, H, W) -> (N,)."""
        if self.config.likelihood == "bernoulli":
            target = (x + 1.0) / 2.0  # intensities in [0, 1] as Bernoulli probabilities
            nll = F.binary_cross_entropy_with_logits(out, target, reduction="none")
        else:
            # -log N(x; mean, sigma^2) = (x - mean)^2 / (2 sigma^2) + log sigma + 0.5 log(2 pi)
            sigma = self.config.sigma
            nll = (x - out).pow(2) / (2.0 * sigma**2) + math.log(sigma) + 0.5 * math.log(2.0 * math.pi)
        return nll.flatten(1).sum(1)

    def draw_noise(self, n: int, *, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """{"eps": (n, z_dim)}: the noise of the loss, from `generator` (on its device) or the global RNG
        (on `device`), returned on `device`."""
        where = generator.device if generator is not None else device
        eps = torch.randn((n, self.config.z_dim), generator=generator, device=where)
        return {"eps": eps.to(device)}

    def loss_terms(self, x: Tensor, y: Tensor | None = None, *, generator: torch.Generator | None = None,
                   noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Batch means in nats per image: recon, kl, nelbo (= recon + kl) and loss (= recon + beta * kl).

        eps is `noise["eps"]` when given (the training loop draws it for the global batch), else drawn
        by draw_noise from `generator`, which makes the terms reproducible, or the global RNG.
        """
        if noise is None:
            noise = self.draw_noise(x.shape[0], generator=generator, device=x.device)
        mu, logvar = self.encode(x, y)  # (N, z_dim) each
        eps = noise["eps"].to(mu)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation: gradients flow through mu, logvar
        recon = self.recon_nll(self.decode(z, y), x).mean()
        kl = kl_normal(mu, logvar).mean()
        return {"recon": recon, "kl": kl, "nelbo": recon + kl, "loss": recon + self.config.beta * kl}

    def forward(self, x: Tensor, y: Tensor | None = None, *, generator: torch.Generator | None = None,
                noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        # forward is loss_terms so that a wrapped model (DDP via accelerate) syncs gradients
        return self.loss_terms(x, y, generator=generator, noise=noise)

    def loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The scalar the training loop backpropagates: recon + beta * kl, nats per image."""
        return self(x, y)["loss"]

    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Decoder mean at z = mu (no sampling noise): (N, C, H, W) in [-1, 1]."""
        mu, _ = self.encode(x, y)
        return self._pixel_mean(self.decode(mu, y))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None,
               z: Tensor | None = None) -> Tensor:
        """n images (N, C, H, W) in [-1, 1]: the decoder mean E[x|z] at z ~ N(0, I) (or the given z).

        z is drawn from `generator` on the generator's device, so a seed gives the same images on
        any device the model sits on. Pixels are the mean, not a draw from p(x|z): a Bernoulli draw
        would be binary noise, a Gaussian one salt at sigma.
        """
        device = next(self.parameters()).device
        if z is None:
            if generator is None:
                raise ValueError("pass generator= (sampling randomness is explicit) or the latents z")
            z = torch.randn((n, self.config.z_dim), generator=generator, device=generator.device)
        elif tuple(z.shape) != (n, self.config.z_dim):
            raise ValueError(f"z must have shape ({n}, {self.config.z_dim}), got {tuple(z.shape)}")
        z = z.to(device=device, dtype=next(self.parameters()).dtype)
        if y is not None:
            y = y.to(device)
        return self._pixel_mean(self.decode(z, y)).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------------------
    # files

    def save(self, directory: Path) -> None:
        """Write model.safetensors and vae_config.json (config fields, image_shape, num_classes)."""
        save_image_model(self, directory, CONFIG_FILE)

    @classmethod
    def load(cls, directory: Path) -> VAE:
        return load_image_model(cls, VAEConfig, directory, CONFIG_FILE)


def build(config: VAEConfig, image_shape: tuple[int, int, int], num_classes: int = 0) -> VAE:
    return VAE(config, image_shape, num_classes)
