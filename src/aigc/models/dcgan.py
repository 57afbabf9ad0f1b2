"""DCGAN (Radford et al. 2016), optionally class-conditional: a generator G and a discriminator D
trained against each other with two optimizers, one phase each per training step.

    G  z ~ N(0, I) [+ label embedding] -> linear -> 2 stride-2 transposed convs (BatchNorm, ReLU) -> tanh
    D  x (N, C, H, W) -> 2 stride-2 convs (LeakyReLU 0.2, BatchNorm on the second) -> flatten -> score

The two phases of a step (declared in the registry as `phases`; the training loop gives each its
own AdamW and calls `forward(x, y, phase=...)`):
- "discriminator": fakes G(z) without gradients; D learns to score real images high, fakes low.
- "generator": fresh fakes; G learns to make D score them high (D's gradients are discarded).

Losses on the raw scores s = D(x) (logits), per image, batch-averaged:
- nonsaturating (the seeds' loss; Goodfellow et al. 2014, §3): binary cross-entropy,
    L_D = softplus(-s_real) + softplus(s_fake)      = -log sigmoid(s_real) - log(1 - sigmoid(s_fake))
    L_G = softplus(-s_fake)                         = -log sigmoid(s_fake)   (not log(1 - D): it saturates)
- hinge (Lim & Ye 2017; Miyato et al. 2018):
    L_D = relu(1 - s_real) + relu(1 + s_fake),      L_G = -s_fake

Conditional runs (Mirza & Osindero 2014): G reads a class embedding next to z; D is a projection
discriminator (Miyato & Koyama 2018): s = w . h + <embed(y), h> over its flattened features h.
Fakes in a training step carry the labels of the real batch, so both see the data's class mix.

Sampling uses the EMA of G's parameters when `ema_decay > 0` (Yazici et al. 2019; models/ema.py)
and G's BatchNorm running statistics (eval mode), so each image depends on its own seed alone.
The truncation trick (Brock et al. 2019) draws z from N(0, I) truncated to [-T, T] in every
coordinate, by inverting the normal CDF: z = Phi^-1(U(Phi(-T), Phi(T))); smaller T trades variety
for fidelity. Sides follow the VAE's rule (kernel 4, stride 2, padding 1; output_padding = side mod 2
restores odd sides), so 8x8, 28x28 and 32x32 come out exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from aigc.config import TrainConfig, option
from aigc.models.ema import EMA
from aigc.models.image_files import check_image_args, load_image_model, save_image_model

CONFIG_FILE = "dcgan_config.json"
MIN_SIDE = 4  # two halvings must leave at least one pixel
PHASES = ("discriminator", "generator")  # the order of the two optimizer steps in one training step
MAX_TRUNCATION = 10.0  # beyond this the truncated normal is N(0, I) to float precision


@dataclass
class DCGANConfig:
    z_dim: int = option(64, "latent dimensions of the generator's input z", min=1, max=1024)
    base_channels: int = option(64, "channels at half resolution (twice that at quarter resolution), G and D",
                                min=4, max=1024)
    loss: str = option("nonsaturating", "nonsaturating (the seeds' binary cross-entropy) or hinge",
                       choices=("nonsaturating", "hinge"))
    ema_decay: float = option(0.999, "EMA of the generator's weights used for sampling (0 = off)", min=0.0, max=1.0)
    label_dim: int = option(32, "conditional runs: size of the generator's class embedding", min=1, max=1024)


@dataclass
class GANTrainConfig(TrainConfig):
    """TrainConfig with DCGAN's settings as defaults: Adam at 2e-4 with beta1 0.5 (Radford et al.
    2016, §4), a constant rate, no weight decay, no clipping; the last weights are kept (a GAN has no
    validation loss to pick the best by: the logged val_loss is D's loss on held-out images and fresh
    fakes, a sign of D over-fitting, not of sample quality)."""

    lr: float = option(2e-4, "learning rate of both optimizers (Adam)", min=0.0, max=1.0, min_exclusive=True)
    min_lr_ratio: float = option(1.0, "final learning rate as a share of lr (1 = constant)", min=0.0, max=1.0)
    batch_size: int = option(64, "global batch: real images per step (and as many fakes)", min=1)
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay on matrices", min=0.0)
    beta1: float = option(0.5, "Adam beta1 (DCGAN: 0.5)", min=0.0, max=1.0)
    beta2: float = option(0.999, "Adam beta2", min=0.0, max=1.0)
    grad_clip: float = option(0.0, "clip each phase's gradient norm to this (0 = no clipping)", min=0.0)
    eval_interval: int = option(200, "save a sample grid and log D's held-out loss every N steps", min=1)
    keep_best: bool = option(False, "keep the weights with the lowest val_loss (D's loss: not a quality "
                                    "measure; false keeps the last weights)")


def _init_weights(module: nn.Module) -> None:
    """DCGAN's initialisation (§4): conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, config: DCGANConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        channels, height, width = image_shape
        c1, c2 = config.base_channels, 2 * config.base_channels
        h1, w1 = height // 2, width // 2
        self.hidden = (c2, h1 // 2, w1 // 2)
        self.label_emb = nn.Embedding(num_classes, config.label_dim) if num_classes else None
        z_in = config.z_dim + (config.label_dim if num_classes else 0)
        self.project = nn.Sequential(nn.Linear(z_in, math.prod(self.hidden), bias=False),
                                     nn.BatchNorm1d(math.prod(self.hidden)), nn.ReLU())
        self.net = nn.Sequential(
            nn.Unflatten(1, self.hidden),  # (N, c2, h2, w2)
            nn.ConvTranspose2d(c2, c1, 4, 2, 1, output_padding=(h1 % 2, w1 % 2), bias=False),
            nn.BatchNorm2d(c1), nn.ReLU(),  # (N, c1, h1, w1)
            nn.ConvTranspose2d(c1, channels, 4, 2, 1, output_padding=(height % 2, width % 2)),
            nn.Tanh(),  # (N, C, H, W) in [-1, 1]
        )

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.label_emb is not None:
            z = torch.cat([z, self.label_emb(y)], dim=1)
        return self.net(self.project(z))


class Discriminator(nn.Module):
    def __init__(self, config: DCGANConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        channels, height, width = image_shape
        c1, c2 = config.base_channels, 2 * config.base_channels
        flat = c2 * (height // 2 // 2) * (width // 2 // 2)
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 4, 2, 1), nn.LeakyReLU(0.2),  # no BatchNorm on the input layer (DCGAN §3)
            nn.Conv2d(c1, c2, 4, 2, 1, bias=False), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2),
            nn.Flatten(),  # (N, flat)
        )
        self.score = nn.Linear(flat, 1)
        self.projection = nn.Embedding(num_classes, flat) if num_classes else None

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Raw scores (logits), (N,)."""
        h = self.features(x)
        s = self.score(h).squeeze(1)
        if self.projection is not None:
            s = s + (self.projection(y) * h).sum(1)  # projection discriminator
        return s


def discriminator_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(kind: str, fake: Tensor) -> Tensor:
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def truncated_normal(shape: tuple[int, ...], truncation: float, generator: torch.Generator) -> Tensor:
    """N(0, I) truncated to [-T, T] per coordinate: Phi^-1(u), u ~ U(Phi(-T), Phi(T)); one uniform per value."""
    lo = 0.5 * math.erfc(truncation / math.sqrt(2))  # Phi(-T)
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return torch.special.ndtri(lo + (1 - 2 * lo) * u).float()


class DCGAN(nn.Module):
    def __init__(self, config: DCGANConfig, image_shape: tuple[int, int, int], num_classes: int = 0):
        super().__init__()
        channels, height, width = check_image_args("DCGAN", image_shape, num_classes, MIN_SIDE)
        self.config = config
        self.image_shape = (channels, height, width)
        self.num_classes = num_classes
        self.generator = Generator(config, self.image_shape, num_classes)
        self.discriminator = Discriminator(config, self.image_shape, num_classes)
        self.apply(_init_weights)
        self.ema = EMA(self.generator, config.ema_decay) if config.ema_decay > 0 else None

    # ----------------------------------------------------------------------------------
    # checks

    def _check(self, x: Tensor, y: Tensor | None) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        self._check_labels(y, x.shape[0])

    def _check_labels(self, y: Tensor | None, n: int) -> None:
        if not self.num_classes:
            if y is not None:
                raise ValueError("this DCGAN is unconditional (num_classes=0): do not pass labels y")
            return
        if y is None:
            raise ValueError(f"this DCGAN is conditional ({self.num_classes} classes): pass labels y, int64 (N,)")
        if y.shape != (n,) or y.dtype != torch.long:
            raise ValueError(f"labels y must be int64 of shape ({n},), got {y.dtype} {tuple(y.shape)}")

    # ----------------------------------------------------------------------------------
    # training

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        """The parameters the optimizer of `phase` steps (the registry declares the phases)."""
        if phase == "discriminator":
            return list(self.discriminator.parameters())
        if phase == "generator":
            return list(self.generator.parameters())
        raise ValueError(f"unknown phase {phase!r}: one of {', '.join(PHASES)}")

    def draw_noise(self, n: int, *, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """{"z": (n, z_dim)}: the latents of one phase's fakes, from `generator` (on its device) or the
        global RNG (on `device`), returned on `device`."""
        where = generator.device if generator is not None else device
        return {"z": torch.randn((n, self.config.z_dim), generator=generator, device=where).to(device)}

    def forward(self, x: Tensor, y: Tensor | None = None, *, phase: str = "discriminator",
                noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The loss of one phase on a batch of real images x (N, C, H, W) [and labels y (N,)].

        Fakes use N latents, `noise["z"]` (the training loop draws them for the global batch) or else
        from the global RNG, labelled like the real batch. The discriminator phase
        makes them without gradients; the generator phase backpropagates through D into G (the
        training loop steps only G's optimizer then and clears D's gradients before D's next phase).
        Returns {"loss", "d_real", "d_fake"}: the phase's loss and D's mean scores.
        """
        self._check(x, y)
        if noise is None:
            noise = self.draw_noise(x.shape[0], device=x.device)
        z = noise["z"]
        if phase == "discriminator":
            with torch.no_grad():
                fake = self.generator(z, y)
            real_s, fake_s = self.discriminator(x, y), self.discriminator(fake, y)
            loss = discriminator_loss(self.config.loss, real_s.float(), fake_s.float())
            return {"loss": loss, "d_real": real_s.detach().mean(), "d_fake": fake_s.detach().mean()}
        if phase == "generator":
            fake_s = self.discriminator(self.generator(z, y), y)
            loss = generator_loss(self.config.loss, fake_s.float())
            return {"loss": loss, "d_fake": fake_s.detach().mean()}
        raise ValueError(f"unknown phase {phase!r}: one of {', '.join(PHASES)}")

    def after_step(self) -> None:
        """Update the EMA of G (models/ema.py); the training loop calls this after every step."""
        if self.ema is not None:
            self.ema.update(self.generator)

    # ----------------------------------------------------------------------------------
    # sampling

    def latents(self, n: int, generator: torch.Generator, truncation: float | None = None) -> Tensor:
        """z (n, z_dim): N(0, I), or truncated to [-T, T], drawn from `generator` on its device."""
        if truncation is None:
            return torch.randn((n, self.config.z_dim), generator=generator, device=generator.device)
        if isinstance(truncation, bool) or not isinstance(truncation, int | float) or not (
                0 < truncation <= MAX_TRUNCATION):
            raise ValueError(f"truncation must be in (0, {MAX_TRUNCATION:g}] (smaller: less variety), "
                             f"got {truncation!r}")
        return truncated_normal((n, self.config.z_dim), float(truncation), generator)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None,
               z: Tensor | None = None, truncation: float | None = None) -> Tensor:
        """n images (N, C, H, W) in [-1, 1] from G (its EMA weights when kept) in eval mode.

        z is drawn from `generator` on the generator's device (so a seed gives the same latents on
        any device), or given (N, z_dim). A conditional model needs y (N,).
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if z is None:
            if generator is None:
                raise ValueError("pass generator= (sampling randomness is explicit) or the latents z")
            z = self.latents(n, generator, truncation)
        elif tuple(z.shape) != (n, self.config.z_dim):
            raise ValueError(f"z must have shape ({n}, {self.config.z_dim}), got {tuple(z.shape)}")
        self._check_labels(y, n)
        if y is not None and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels y must be in 0..{self.num_classes - 1}, got {y.min().item()}..{y.max().item()}")
        device = next(self.generator.parameters()).device
        z = z.to(device=device, dtype=torch.float32)
        y = None if y is None else y.to(device)
        was_training = self.generator.training
        self.generator.eval()  # BatchNorm running statistics: each image depends on its own latent only
        try:
            if self.ema is None:
                x = self.generator(z, y)
            else:
                x = functional_call(self.generator, self.ema.on(self.generator), (z, y))
        finally:
            self.generator.train(was_training)
        return x.float().clamp(-1.0, 1.0)

    # ----------------------------------------------------------------------------------
    # files

    def save(self, directory: Path) -> None:
        """Write model.safetensors (G, D, and G's EMA weights as ema.<name>) and dcgan_config.json."""
        save_image_model(self, directory, CONFIG_FILE)

    @classmethod
    def load(cls, directory: Path) -> DCGAN:
        return load_image_model(cls, DCGANConfig, directory, CONFIG_FILE)


def build(config: DCGANConfig, image_shape: tuple[int, int, int], num_classes: int = 0) -> DCGAN:
    return DCGAN(config, image_shape, num_classes)
