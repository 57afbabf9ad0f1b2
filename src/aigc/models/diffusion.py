"""Denoising diffusion (Ho et al. 2020, "DDPM"), optionally class-conditional with classifier-free
guidance (Ho & Salimans 2022); sampled with diffusers' schedulers.

    forward process  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)          (DDPM eq. 4)
    denoiser         eps_theta(x_t, t[, y]): diffusers' UNet2DModel predicting the added noise eps
    loss             E_{t, x_0, eps} || eps - eps_theta(x_t, t[, y]) ||^2                  (DDPM eq. 14)

Timesteps follow diffusers: t in {0, ..., T-1}, alpha_bar[t] = prod_{s <= t} (1 - beta_s), so t = 0 is
the first (least noisy) step. Two beta schedules:
- linear: DDPM's beta from 1e-4 to 0.02 over T = 1000 steps; for another T both ends are scaled by
  1000 / T (Nichol & Dhariwal 2021, improved-diffusion), so alpha_bar[T-1] stays near 0 for any T.
  Betas are capped at 0.999, which only bites for T <= 20.
- cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2, s = 0.008,
  betas capped at 0.999 (Nichol & Dhariwal 2021, eq. 17); diffusers' "squaredcos_cap_v2".
The same betas feed training and every sampler (passed to diffusers as `trained_betas`).

Conditional models learn a "null" class too (index num_classes): during training each label is
replaced by it with probability `cond_drop`, so one network gives eps(x_t, t, y) and eps(x_t, t).
Guidance at sampling time follows diffusers' convention (Ho & Salimans 2022, eq. 6 with w = g - 1):

    eps = eps_uncond + g * (eps_cond - eps_uncond)            g = 1: no guidance, one forward pass

Samplers are diffusers' schedulers configured with the model's betas; the loop is unrolled in `sample`:
- ddpm: ancestral sampling, DDPM eq. 11 with sigma_t^2 = beta tilde_t (DDPMScheduler, fixed_small)
- ddim: DDIM eq. 12 with eta (Song et al. 2021): eta = 0 deterministic, eta = 1 DDPM-like
- dpm-solver: DPM-Solver++(2M), multistep 2nd order (Lu et al. 2022), deterministic
ddpm and ddim take evenly spaced timesteps, "trailing" so the first step starts at t = T - 1 where
x_T ~ N(0, I) holds (Lin et al. 2024), and clip the predicted x_0 to [-1, 1] (diffusers'
default, DDPM's `clip_denoised`). dpm-solver takes timesteps evenly spaced in log-SNR, the spacing
DPM-Solver recommends for pixel-space models: on Gaussian toy data with 20 steps it keeps the data's
std within 3% where even spacing loses 25% (linear schedule), and few-step runs spend their steps
where fine detail is made. diffusers' own option for it (use_lu_lambdas) repeats timesteps from 39
steps on and fails on the cosine schedule (0.42.1), hence `log_snr_timesteps` here.

The EMA weights (models/ema.py: an exponential moving average of the UNet's parameters, updated by
`after_step()`) are what `sample` uses; `save` writes them beside the weights as `ema.<name>`.
THE TRAINING LOOP MUST CALL `model.after_step()` AFTER EVERY OPTIMIZER STEP (declared in the registry).

Image sides that are not a multiple of 2^depth are zero-padded on the right and bottom to the next
multiple around the UNet and cropped back; at the default depth 2, 8x8, 28x28 (28 -> 14 -> 7) and
32x32 need no padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from safetensors import safe_open
from torch import Tensor, nn
from torch.func import functional_call

from aigc.config import option
from aigc.models.ema import EMA
from aigc.models.image_files import WEIGHTS_FILE, check_image_args, load_image_model, save_image_model

CONFIG_FILE = "diffusion_config.json"
SAMPLERS = ("ddpm", "ddim", "dpm-solver")
MAX_BETA = 0.999  # cap on beta_t (Nichol & Dhariwal 2021, §3.2): keeps 1 - beta_t away from 0


@dataclass
class DiffusionConfig:
    base_channels: int = option(32, "UNet width: channels at full resolution (twice that at lower ones)",
                                min=4, max=1024)
    depth: int = option(2, "UNet downsamplings (each halves the side; sides are padded to a multiple of 2^depth)",
                        min=1, max=6)
    res_blocks: int = option(2, "residual blocks per resolution on the way down (one more on the way up)",
                             min=1, max=8)
    attention: bool = option(True, "self-attention block at the lowest resolution")
    dropout: float = option(0.0, "dropout inside the residual blocks", min=0.0, max=0.9)
    timesteps: int = option(1000, "training noise levels T", min=2, max=10000)
    schedule: str = option("linear", "beta schedule: linear (DDPM) or cosine (Nichol & Dhariwal 2021)",
                           choices=("linear", "cosine"))
    ema_decay: float = option(0.999, "EMA of the weights used for sampling (0 = off)", min=0.0, max=1.0)
    cond_drop: float = option(0.1, "conditional runs: share of labels dropped in training "
                                   "(classifier-free guidance)", min=0.0, max=1.0)


# --------------------------------------------------------------------------------------
# maths


def make_betas(schedule: str, timesteps: int) -> Tensor:
    """beta_0 .. beta_{T-1} (float64, (T,)) of the linear or cosine schedule (see the module docstring)."""
    if schedule == "linear":
        scale = 1000.0 / timesteps  # DDPM's 1e-4 .. 0.02 were chosen for T = 1000
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # Nichol & Dhariwal 2021, eq. 17
        betas = 1 - f[1:] / f[:-1]  # alpha_bar(t+1) / alpha_bar(t) = 1 - beta_t
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use linear or cosine")
    return betas.clamp(max=MAX_BETA)


def log_snr_timesteps(alpha_bar: Tensor, steps: int) -> list[int]:
    """`steps` distinct timesteps, descending from T - 1, evenly spaced in lambda_t = log(alpha_t / sigma_t)
    (DPM-Solver's "logSNR" skip type, Lu et al. 2022; alpha_t^2 = alpha_bar_t, sigma_t^2 = 1 - alpha_bar_t).

    Each target lambda goes to the nearest integer t; where rounding would repeat a timestep (the
    schedule's ends, or steps close to T) the next one is pushed down by one, so there are always
    exactly `steps` of them and steps = T gives every timestep.
    """
    alpha_bar = alpha_bar.double()
    lam = 0.5 * torch.log(alpha_bar / (1 - alpha_bar))  # (T,), decreasing in t
    targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
    nearest = torch.searchsorted(-lam, -targets).clamp(max=len(lam) - 1)  # first t with lam_t <= target
    # the neighbour just before may be nearer
    earlier = (nearest - 1).clamp(min=0)
    closer = (lam[earlier] - targets).abs() < (lam[nearest] - targets).abs()
    nearest = torch.where(closer, earlier, nearest)
    timesteps: list[int] = []
    for i, t in enumerate(nearest.tolist()):
        if timesteps:
            t = min(t, timesteps[-1] - 1)  # strictly descending
        timesteps.append(max(t, steps - 1 - i))  # leave room for the remaining steps
    return timesteps


def norm_groups(base_channels: int) -> int:
    """GroupNorm groups of the UNet: 8 (DDPM used 32 at wider widths), or fewer when 8 does not divide
    the base width (every width is base or 2 * base, so one count fits all)."""
    return math.gcd(base_channels, 8)


class Denoiser(nn.Module):
    """eps_theta(x_t, t[, y]): (N, C, H, W), (N,), (N,) -> (N, C, H, W), diffusers' UNet2DModel inside.

    Channels: base at full resolution, 2 * base below. Per level `res_blocks` ResNet blocks on the way
    down (DownBlock2D) then a stride-2 conv; the attention mid-block (ResNet, single-head self-attention,
    ResNet); per level `res_blocks + 1` ResNet blocks on the way up (UpBlock2D), each reading a skip
    connection, then nearest 2x upsampling and a conv. Sinusoidal time embedding (sin first, no shift,
    DDPM's), an MLP to 4 * base, and for conditional models a class embedding with num_classes + 1 rows
    (the last is the null class) added to it.

    We kept UNet2DModel after measuring it against a hand-written UNet of exactly this layout (the
    same 1,539,329 parameters at the defaults, benchmarks/compact_unet.py) at equal training time on
    fashion-mnist: the hand-written one trains 1-7% more images/s, and the FIDs tie within seed noise
    (four paired runs, UNet2DModel lower by 0.25 on average, the spread 0.9; docs/images.md). At a
    tie the maintained library wins, and its weights load in diffusers' own pipelines.

    UNet2DModel needs sides divisible by 2^depth: other sizes are zero-padded on the right and bottom
    to the next multiple and the prediction is cropped back.
    """

    def __init__(self, config: DiffusionConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        channels, height, width = image_shape
        base, depth = config.base_channels, config.depth
        self.multiple = 2**depth
        widths = (base,) + (2 * base,) * depth  # channels at level 0 .. depth
        self.net = UNet2DModel(
            sample_size=(height + -height % self.multiple, width + -width % self.multiple),
            in_channels=channels, out_channels=channels, layers_per_block=config.res_blocks,
            block_out_channels=widths, down_block_types=("DownBlock2D",) * len(widths),
            up_block_types=("UpBlock2D",) * len(widths), norm_num_groups=norm_groups(base),
            attention_head_dim=2 * base,  # one head over the 2 * base channels of the lowest level
            add_attention=config.attention, dropout=config.dropout, time_embedding_type="positional",
            flip_sin_to_cos=False, freq_shift=0, downsample_padding=1,
            num_class_embeds=num_classes + 1 if num_classes else None,  # + the null class
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % self.multiple, 0, -height % self.multiple))  # zeros right and bottom
        out = self.net(x, t, class_labels=y).sample
        return out[..., :height, :width]  # crop the padding back off


# --------------------------------------------------------------------------------------
# model


class Diffusion(nn.Module):
    def __init__(self, config: DiffusionConfig, image_shape: tuple[int, int, int], num_classes: int = 0):
        super().__init__()
        channels, height, width = check_image_args("diffusion", image_shape, num_classes, 1)
        self.config = config
        self.image_shape = (channels, height, width)
        self.num_classes = num_classes
        self.null_class = num_classes  # the label eps(x_t, t) is trained and sampled with

        self.unet = Denoiser(config, self.image_shape, num_classes)
        betas = make_betas(config.schedule, config.timesteps)
        # alpha_bar_t = prod_{s <= t} (1 - beta_s); not persistent: recomputed from the config on load
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, dim=0).float(), persistent=False)
        self.betas = betas  # float64 (T,), handed to the schedulers

        # EMA of the UNet's parameters, None when ema_decay = 0
        self.ema = EMA(self.unet, config.ema_decay) if config.ema_decay > 0 else None

    # ----------------------------------------------------------------------------------
    # checks

    def _check_images(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")

    def _check_labels(self, y: Tensor | None, n: int, *, required: bool) -> None:
        if not self.num_classes:
            if y is not None:
                raise ValueError("this diffusion model is unconditional (num_classes=0): do not pass labels y")
            return
        if y is None:
            if required:
                raise ValueError(f"this diffusion model is conditional ({self.num_classes} classes): "
                                 "pass labels y, int64 (N,)")
            return
        if y.shape != (n,):
            raise ValueError(f"labels y must have shape ({n},), got {tuple(y.shape)}")
        if y.dtype != torch.long:
            raise ValueError(f"labels y must be int64, got {y.dtype}")

    # ----------------------------------------------------------------------------------
    # forward process and loss

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: (N, C, H, W), (N,), (N, C, H, W)."""
        a = self.alpha_bar[t].to(x0.dtype)[:, None, None, None]  # (N, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps  # DDPM eq. 4

    def draw_noise(self, n: int, *, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        """The randomness of the loss for n images, in this order: t ~ U{0..T-1} (n,), eps ~ N(0, I)
        (n, C, H, W), then (training mode, conditional) u ~ U[0, 1) (n,), the label drop mask's draw;
        from `generator` (on its device) or the global RNG (on `device`), returned on `device`."""
        where = generator.device if generator is not None else device
        noise = {"t": torch.randint(0, self.config.timesteps, (n,), generator=generator, device=where),
                 "eps": torch.randn((n, *self.image_shape), generator=generator, device=where)}
        if self.num_classes and self.training and self.config.cond_drop > 0:
            noise["u"] = torch.rand(n, generator=generator, device=where)
        return {name: value.to(device) for name, value in noise.items()}

    def loss_terms(self, x: Tensor, y: Tensor | None = None, *, generator: torch.Generator | None = None,
                   noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """{"loss", "nelbo"}: both the mean squared error of the predicted noise (DDPM eq. 14, L_simple).

        "nelbo" is the same MSE, NOT a bound in nats: it is there so that evaluation code reading
        "nelbo" runs; it is comparable between diffusion runs only. The randomness (t, eps and the
        label drop draw u) is `noise` when given (the training loop draws it for the global batch),
        else drawn by draw_noise from `generator` when one is given, else from the global RNG.
        """
        self._check_images(x)
        n = x.shape[0]
        self._check_labels(y, n, required=True)
        if noise is None:
            noise = self.draw_noise(n, generator=generator, device=x.device)
        t, eps = noise["t"], noise["eps"].to(x)
        if y is not None and "u" in noise:
            drop = noise["u"] < self.config.cond_drop
            y = torch.where(drop, torch.full_like(y, self.null_class), y)  # classifier-free guidance training
        eps_pred = self.unet(self.q_sample(x, t, eps), t, y)
        mse = F.mse_loss(eps_pred.float(), eps.float())  # DDPM eq. 14
        return {"loss": mse, "nelbo": mse}

    def forward(self, x: Tensor, y: Tensor | None = None, *, generator: torch.Generator | None = None,
                noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        # forward is loss_terms so that a wrapped model (DDP via accelerate) syncs gradients
        return self.loss_terms(x, y, generator=generator, noise=noise)

    def loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The scalar the training loop backpropagates: the noise-prediction MSE."""
        return self(x, y)["loss"]

    # ----------------------------------------------------------------------------------
    # EMA

    def after_step(self) -> None:
        """Update the EMA weights (models/ema.py); the training loop calls this after every optimizer step."""
        if self.ema is not None:
            self.ema.update(self.unet)

    # ----------------------------------------------------------------------------------
    # sampling

    def predict_eps(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """eps_theta(x_t, t[, y]) with the sampling weights (EMA when kept): (N, C, H, W), (N,), (N,).

        y may hold the null class (num_classes) for the unconditional prediction.
        """
        if self.ema is None:
            eps = self.unet(x_t, t, y)
        else:
            eps = functional_call(self.unet, self.ema.on(self.unet), (x_t, t, y))
        return eps.to(x_t.dtype)

    def guided_eps(self, x_t: Tensor, t: Tensor, y: Tensor | None, guidance_scale: float) -> Tensor:
        """Classifier-free guidance: eps_u + g (eps_c - eps_u) (Ho & Salimans 2022, eq. 6, w = g - 1)."""
        if guidance_scale == 1.0:
            return self.predict_eps(x_t, t, y)  # one forward pass, no unconditional branch
        null = torch.full_like(y, self.null_class)
        eps_c, eps_u = self.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    def make_scheduler(self, sampler: str, steps: int, device: torch.device | str | None = None):
        """A fresh diffusers scheduler for `sampler`, configured with this model's betas, `steps` timesteps set."""
        common = {"num_train_timesteps": self.config.timesteps, "trained_betas": self.betas.numpy(),
                  "prediction_type": "epsilon", "timestep_spacing": "trailing"}
        if sampler == "ddpm":
            scheduler = DDPMScheduler(**common, variance_type="fixed_small", clip_sample=True)
            scheduler.set_timesteps(steps, device=device)
        elif sampler == "ddim":
            scheduler = DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True)
            scheduler.set_timesteps(steps, device=device)
        elif sampler == "dpm-solver":
            scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
            alpha_bar = torch.cumprod(1 - self.betas, dim=0)
            scheduler.set_timesteps(timesteps=log_snr_timesteps(alpha_bar, steps), device=device)
        else:
            raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        return scheduler

    def _check_sampling(self, n: int, sampler: str, steps: int, eta: float, guidance_scale: float,
                        y: Tensor | None) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.config.timesteps:
            raise ValueError(f"steps must be an int in 1..{self.config.timesteps} (the training timesteps), "
                             f"got {steps!r}")
        if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        if eta != 0.0 and sampler != "ddim":
            raise ValueError(f"eta applies to the ddim sampler only (got sampler {sampler!r}, eta {eta})")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")
        self._check_labels(y, n, required=False)
        if y is not None and (y.min() < 0 or y.max() >= self.num_classes):  # not in training: no GPU sync there
            raise ValueError(f"labels y must be in 0..{self.num_classes - 1}, got {y.min().item()}..{y.max().item()}")
        if self.num_classes and y is None and self.config.cond_drop == 0:
            raise ValueError("this model was trained with cond_drop=0, so it has no unconditional mode: pass labels y")
        if guidance_scale != 1.0:
            if not self.num_classes:
                raise ValueError("guidance_scale needs a conditional model; this one is unconditional (use 1)")
            if y is None:
                raise ValueError("guidance_scale != 1 needs the class labels y to guide towards")
            if self.config.cond_drop == 0:
                raise ValueError("this model was trained with cond_drop=0: its unconditional branch is untrained, "
                                 "so guidance_scale must be 1")

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None,
               sampler: str = "dpm-solver", steps: int = 20, eta: float = 0.0, guidance_scale: float = 1.0,
               z: Tensor | None = None, return_trajectory: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """n images (N, C, H, W) in [-1, 1], denoised from x_T ~ N(0, I) in `steps` scheduler steps.

        x_T is drawn from `generator` on the generator's device unless `z` (N, C, H, W) gives it; ddpm
        and ddim with eta > 0 also draw fresh noise from `generator` at every step. A seed gives the same
        pixels on a given device; a CPU generator gives the same noise on any device, the pixels then
        agreeing up to the devices' floating-point differences (up to ~1e-2 after 20 dpm-solver steps,
        CPU vs H100). A conditional model samples class y
        (N,), or the null class when y is None. With return_trajectory it returns (images, xs),
        xs = [x_T, ..., x_0]: the state after every step (not clipped), the last being the images.
        """
        self._check_sampling(n, sampler, steps, eta, guidance_scale, y)
        stochastic = sampler == "ddpm" or (sampler == "ddim" and eta > 0)
        if generator is None and (z is None or stochastic):
            raise ValueError("pass generator= (sampling randomness is explicit)"
                             + ("" if stochastic else " or the starting noise z"))
        device = self.alpha_bar.device
        shape = (n, *self.image_shape)
        if z is None:
            z = torch.randn(shape, generator=generator, device=generator.device)
        elif tuple(z.shape) != shape:
            raise ValueError(f"z must have shape {shape}, got {tuple(z.shape)}")
        if self.num_classes:
            y = torch.full((n,), self.null_class, dtype=torch.long) if y is None else y
            y = y.to(device)

        scheduler = self.make_scheduler(sampler, steps, device)
        step_kwargs = {"eta": float(eta)} if sampler == "ddim" else {}
        x = z.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
        xs = [x]
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            # the sampling loop, unrolled: each step maps x_t to x_{t'} (t' < t) with the scheduler's rule
            for t in scheduler.timesteps:
                t_batch = t.to(device=device, dtype=torch.long).expand(n)  # (N,)
                eps = self.guided_eps(scheduler.scale_model_input(x, t), t_batch, y, float(guidance_scale))
                x = scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
                if return_trajectory:
                    xs.append(x)
        finally:
            self.train(was_training)
        images = x.clamp(-1.0, 1.0)
        if return_trajectory:
            return images, [*xs[:-1], images]
        return images

    # ----------------------------------------------------------------------------------
    # files

    def save(self, directory: Path) -> None:
        """Write model.safetensors (weights, and EMA weights as ema.<name>) and diffusion_config.json
        (config fields, image_shape, num_classes, ema_updates)."""
        save_image_model(self, directory, CONFIG_FILE)

    @classmethod
    def load(cls, directory: Path) -> Diffusion:
        weights = Path(directory) / WEIGHTS_FILE
        if weights.is_file():
            with safe_open(weights, "pt") as f:
                if "unet.conv_in.weight" in f.keys():  # the hand-written UNet's names, not UNet2DModel's
                    raise ValueError(f"{weights}: this diffusion model was trained with the hand-written UNet "
                                     "that AIGC Studio replaced by diffusers' UNet2DModel; its weights do not "
                                     "load into the new denoiser: train it again with `aigc train`")
        return load_image_model(cls, DiffusionConfig, directory, CONFIG_FILE)


def build(config: DiffusionConfig, image_shape: tuple[int, int, int], num_classes: int = 0) -> Diffusion:
    return Diffusion(config, image_shape, num_classes)
