"""A per-frame VAE whose latent sequence a recurrent net models (`vae-rnn`): a clip generator and a predictor.

Issue 18: "a per-frame VAE whose latent sequence the rnn models". Frames stacked as channels ask one VAE to draw a
whole clip from one latent; here the VAE draws single frames (what it does at FID ~10 on Fashion-MNIST) and the
recurrent net learns only how the latents move and what stays the same:

    stage 1 (vae)  the image family's VAE (models/vae.py, reused: its model and loss) on single frames of the clips,
                   conditional on the clip's class where the run is: q(z|x[, y]), p(x|z[, y])
    stage 2 (rnn)  the VAE frozen; each frame of a clip -> its latent mean m_t = E[z|x_t] (N, T, z_dim);
                   a GRU (or LSTM: models/rnn.py's CELLS) reads  s, m_1, ..., m_{T-1}  (s: a learned start vector)
                   from the initial state h_0 (a learned vector, or Linear(embedding(y)) for a conditional run)
                   and gives at every step the mean and log-variance of the next latent:
                       (mu_t, log var_t) = Linear(h_t),   p(m_t | m_<t, y) = N(mu_t, diag exp(log var_t))
                   loss = mean over clips and steps of  0.5 * sum_d (log 2 pi + log var + (m - mu)^2 / var)
                   (nats per frame's latent; the first step is the learned start distribution p(m_1 | y))

Split latents (`content_dim` k > 0): a clip's object does not change, only where it is. The first k dimensions of a
frame's latent are the clip's content, the other z_dim - k its motion:

    stage 1  trained on pairs of frames (a, b) of one clip (`FramePairs`), each decoded from the OTHER frame's
             content and its own motion:  x_a ~ p(x | [z_b[:k], z_a[k:]], y), and b likewise (as DRNet, Denton &
             Birodkar 2017, separates content from pose): the content can carry only what the two frames share,
             and the KL term leaves the motion no room for more than it must (where the object is)
    stage 2  c = the mean of the clip's frames' content means (N, k), drawn once per clip from a Gaussian p(c | y)
             read from the initial state; the GRU reads [c, motion_{t-1}] and gives the next motion's Gaussian
                 loss = (-log p(c | y) - sum_t log p(motion_t | motion_<t, c, y)) / T        (nats per frame)
             every frame of a clip decodes from the same c, so the object keeps what it is (issue 18's class
             consistency) while the GRU moves it; k = 0 is the plain model above.

A window (`window` N > 0), for clips of one object on a dark ground: each frame's object is cut out in the N x N
window around its brightness centre (the frame's centre of mass, as MNIST's digits were centred; the evaluation
finds the object the same way, evaluate/video.py), the VAE draws the window, and a frame's latent is the window's
latent followed by where the window sits (its corner, scaled to [-1, 1]): the recurrent net moves the window, and
decoding pastes the drawn window at its place on a black frame. With `content_dim` = z_dim every dimension of
the window's latent is the clip's content: the object is drawn once and only moved.

Generation (`sample`): h_0 from the label, then for t = 1..T: z_t = mu_t + temperature * exp(log var_t / 2) * eps_t
(eps drawn up front from the caller's generator: one seed, one clip), fed back as the next input; every z_t is
decoded by the VAE decoder (its pixel mean, as the vae family samples). Prediction (`predict`): the context frames'
latent means are read, then the net rolls on from its own means (no noise: the expected latent), decoded.

The two stages train one after the other in one run (the video modality's `fit`: one training loop each, the
budget split by `vae_share`); `forward` is stage 2's loss, and stage 1 trains `model.vae` itself. Clips arrive as
the video modality's tensors (N, T * C, H, W) in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from aigc.config import config_from_record, option
from aigc.models import vae
from aigc.models.files import load_config_and_weights, save_config_and_weights
from aigc.models.rnn import CELLS

CONFIG_FILE = "vae_rnn_config.json"
WEIGHTS_FILE = "model.safetensors"
STAGES = ("vae", "rnn")  # trained in this order, one training loop each (modalities/video.py)
RECURRENT_CELLS = ("gru", "lstm")
MAX_TEMPERATURE = 4.0


@dataclass
class VAERNNConfig(vae.VAEConfig):
    """The VAE's keys (models/vae.py) with a latent for a frame, then the recurrent net's and the budget split."""

    z_dim: int = option(32, "latent dimensions of a frame (a 64x64 frame holds one object: where it is and "
                            "what it looks like)", min=1, max=1024)
    cell: str = option("gru", "recurrent core over the latents: gru or lstm", choices=RECURRENT_CELLS)
    n_layer: int = option(1, "stacked recurrent layers", min=1, max=8)
    n_hidden: int = option(256, "hidden state size of the recurrent net", min=8, max=8192)
    temperature: float = option(1.0, "generation's default: scale of the next latent's standard deviation (0: its "
                                     "mean); `aigc generate --temperature` overrides it", min=0.0, max=MAX_TEMPERATURE)
    content_dim: int = option(0, "latent dimensions fixed for a whole clip (what the object is; drawn once, and "
                                 "stage 1 learns them from pairs of frames); the other z_dim - content_dim move "
                                 "from frame to frame. 0: no split", min=0, max=1023)
    window: int = option(0, "0: the VAE draws whole frames; N: it draws the N x N window around each frame's "
                            "brightness centre (one object on a dark ground) and the recurrent net moves the window",
                         min=0, max=4096)
    vae_share: float = option(0.5, "share of the training budget (minutes and steps) spent on stage 1, the "
                                   "per-frame VAE; the rest trains the recurrent net", min=0.05, max=0.95)


def vae_config(config: VAERNNConfig) -> vae.VAEConfig:
    """The VAE's own config (its keys only): stage 1 saves and loads it as a vae model folder."""
    return vae.VAEConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(vae.VAEConfig)})


class VAERNN(nn.Module):
    def __init__(self, config: VAERNNConfig, frame_shape: tuple[int, int, int], frames: int, context: int,
                 num_classes: int = 0):
        super().__init__()
        if not 1 <= context < frames:
            raise ValueError(f"a clip of {frames} frames needs 1 <= context < {frames}, got context {context}")
        self.config, self.frames, self.context, self.num_classes = config, frames, context, num_classes
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.ema = None
        z, hidden, k, window = config.z_dim, config.n_hidden, config.content_dim, config.window
        if window and not window <= min(self.frame_shape[1:]):
            raise ValueError(f"window must fit in a frame ({self.frame_shape[1]}x{self.frame_shape[2]}), got {window}")
        if not 0 <= k < z + (1 if window else 0):
            raise ValueError(f"content_dim must be below z_dim ({z}): some of a frame's latent has to move (with a "
                             f"window: at most z_dim, the window itself moves), got {k}")
        self.vae = vae.VAE(vae_config(config), (self.frame_shape[0], window, window) if window else self.frame_shape,
                           num_classes)
        self.latent_dim = z + (2 if window else 0)  # a frame's latent: the VAE's, then where its window sits
        motion = self.latent_dim - k
        self.core = CELLS[config.cell](self.latent_dim, hidden, config.n_layer, batch_first=True)  # [content, motion]
        self.start = nn.Parameter(torch.zeros(motion))  # the motion before the first frame
        if num_classes:  # the class sets the initial state: identity for the whole clip
            self.label_emb = nn.Embedding(num_classes, config.label_dim)
            self.to_state = nn.Linear(config.label_dim, config.n_layer * hidden)
        else:
            self.h0 = nn.Parameter(torch.zeros(config.n_layer, 1, hidden))
        self.head = nn.Linear(hidden, 2 * motion)  # -> (mu, log var) of the next motion
        if k:  # the initial state -> (mu, log var) of the clip's content
            self.content_head = nn.Linear(hidden, 2 * k)

    # ----------------------------------------------------------------------------------
    # the latent sequence

    def latents(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Frames (N, F * C, H, W) in [-1, 1] -> their latents (N, F, latent_dim): the VAE's means (of the frame, or
        of its window followed by the window's place)."""
        c, h, w = self.frame_shape
        n, f = x.shape[0], x.shape[1] // c
        frames = x.reshape(n * f, c, h, w)
        labels = None if y is None else y.repeat_interleave(f)
        window = self.config.window
        if not window:
            return self.vae.encode(frames, labels)[0].reshape(n, f, -1)
        corners = window_corners(frames, window)
        mu, _ = self.vae.encode(cut_windows(frames, corners, window), labels)
        spans = torch.tensor([h - window, w - window], dtype=mu.dtype).clamp(min=1)
        return torch.cat([mu, corners.to(mu.dtype) / spans * 2 - 1], dim=1).reshape(n, f, -1)

    def split(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """Latent means (N, F, z_dim) -> the clip's content (N, k: the mean over its frames) and the motion
        (N, F, z_dim - k)."""
        k = self.config.content_dim
        return m[:, :, :k].mean(1), m[:, :, k:]

    def content_prior(self, state) -> tuple[Tensor, Tensor]:
        """The initial state -> mean and log variance of the clip's content, each (N, k)."""
        h = state[0] if self.config.cell == "lstm" else state
        mu, log_var = self.content_head(h[-1]).float().chunk(2, dim=-1)
        return mu, log_var.clamp(-12.0, 8.0)

    def initial_state(self, y: Tensor | None, n: int):
        """The recurrent state before the first latent: (n_layer, n, n_hidden), and a zero cell for an LSTM."""
        if self.num_classes:
            if y is None or y.shape != (n,):
                raise ValueError(f"this model is conditional ({self.num_classes} classes): pass labels y of shape "
                                 f"({n},)")
            h = torch.tanh(self.to_state(self.label_emb(y)))  # (n, n_layer * n_hidden)
            h = h.reshape(n, self.config.n_layer, -1).transpose(0, 1).contiguous()
        else:
            if y is not None:
                raise ValueError("this model is unconditional: do not pass labels y")
            h = self.h0.expand(-1, n, -1).contiguous()
        return (h, torch.zeros_like(h)) if self.config.cell == "lstm" else h

    def step(self, z: Tensor, state) -> tuple[Tensor, Tensor, object]:
        """Inputs (N, L, z_dim) -> mean, log var of the next latent at each (N, L, z_dim), the new state."""
        out, state = self.core(z, state)  # (N, L, n_hidden)
        mu, log_var = self.head(out).float().chunk(2, dim=-1)
        return mu, log_var.clamp(-12.0, 8.0), state

    def _with_content(self, c: Tensor, p: Tensor) -> Tensor:
        """Content (N, k) and motions (N, L, z - k) -> the latents (N, L, z): the same content in every frame."""
        return torch.cat([c[:, None].expand(-1, p.shape[1], -1).to(p.dtype), p], dim=-1)

    def _inputs(self, c: Tensor, p: Tensor) -> Tensor:
        """Content (N, k), motions (N, L, z - k) -> the inputs that predict the motions: the start vector, then each
        but the last, beside the content."""
        start = self.start.to(p.dtype).expand(p.shape[0], 1, -1)
        return self._with_content(c, torch.cat([start, p[:, :-1]], dim=1))

    def forward(self, x: Tensor, y: Tensor | None = None, *, noise: dict | None = None) -> dict[str, Tensor]:
        """Stage 2: whole clips (N, T * C, H, W) -> {"loss": the Gaussian NLL of each frame's latent mean given the
        ones before (a split run: of the clip's content once, and of each frame's motion; nats per frame, summed
        over the latent's dimensions), "mse": of the predicted motions}."""
        with torch.no_grad():  # the VAE is trained (stage 1) and frozen
            c, p = self.split(self.latents(x, y).float())  # (N, k), (N, T, z - k)
        state = self.initial_state(y, x.shape[0])
        mu, log_var, _ = self.step(self._inputs(c, p), state)
        nll = gaussian_nll(p, mu, log_var).sum(-1).sum(1)  # (N,)
        if self.config.content_dim:
            nll = nll + gaussian_nll(c, *self.content_prior(state)).sum(-1)
        return {"loss": (nll / p.shape[1]).mean(), "mse": ((p - mu) ** 2).mean()}

    def loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self(x, y)["loss"]

    def draw_noise(self, n: int, *, generator: torch.Generator | None = None, device=None) -> dict:
        return {}  # stage 2's loss draws no noise (stage 1 is the VAE's own, which does)

    def decode(self, z: Tensor, y: Tensor | None) -> Tensor:
        """Latents (N, F, latent_dim) -> frames (N, F * C, H, W) in [-1, 1]: the VAE decoder's pixel mean (a
        window's: pasted at its place on a black frame)."""
        n, f = z.shape[:2]
        c, h, w = self.frame_shape
        labels = None if y is None else y.repeat_interleave(f)
        z = z.reshape(n * f, -1)
        frames = self.vae.sample(n * f, z=z[:, :self.config.z_dim].contiguous(), y=labels)  # (N * F, C, H, W)
        if self.config.window:
            window = self.config.window
            spans = torch.tensor([h - window, w - window], dtype=z.dtype, device=z.device)
            corners = torch.minimum(torch.round((z[:, -2:].float() + 1) / 2 * spans).clamp(min=0), spans).long()
            frames = paste_windows(frames, corners, (h, w))
        return frames.reshape(n, f * c, h, w)

    # ----------------------------------------------------------------------------------
    # the two jobs

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None,
               temperature: float | None = None) -> Tensor:
        """n clips (N, T * C, H, W) in [-1, 1], the latents drawn step by step (ancestral sampling), decoded
        (`temperature`: the run's own when None)."""
        return self.decode(self.sample_latents(n, generator=generator, y=y, temperature=temperature), y)

    @torch.no_grad()
    def sample_latents(self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None,
                       temperature: float | None = None) -> Tensor:
        """The latents (N, T, z_dim) of n clips: a split run's content once, then every frame's motion."""
        if generator is None:
            raise ValueError("pass generator= (sampling randomness is explicit)")
        temperature = self.config.temperature if temperature is None else float(temperature)
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"--temperature must be in 0..{MAX_TEMPERATURE:g} (0: the means), got {temperature:g}")
        device, k = next(self.parameters()).device, self.config.content_dim
        eps = torch.randn((n, self.frames, self.latent_dim - k), generator=generator, device=generator.device)
        eps_c = torch.randn((n, k), generator=generator, device=generator.device)
        eps, eps_c = eps.to(device), eps_c.to(device)
        y = None if y is None else y.to(device)
        state, p = self.initial_state(y, n), self.start.expand(n, 1, -1)
        c = eps_c  # (N, 0) without a split
        if k:
            mu_c, log_var_c = self.content_prior(state)
            c = mu_c + temperature * torch.exp(0.5 * log_var_c) * eps_c
        out = []
        for t in range(self.frames):
            mu, log_var, state = self.step(self._with_content(c, p), state)  # (N, 1, z - k)
            p = mu + temperature * torch.exp(0.5 * log_var) * eps[:, t:t + 1]
            out.append(p)
        return self._with_content(c, torch.cat(out, dim=1))

    @torch.no_grad()
    def predict(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Context frames (N, context * C, H, W) in [-1, 1] -> the next T - context frames (N, future * C, H, W):
        the context's latent means read, then the net's own means rolled forward and decoded."""
        c, h, w = self.frame_shape
        if tuple(x.shape[1:]) != (self.context * c, h, w):
            raise ValueError(f"expected context clips (N, {self.context * c}, {h}, {w}), got {tuple(x.shape)}")
        c, p = self.split(self.latents(x, y).float())  # the content of the context frames, their motions
        inputs = torch.cat([self.start.expand(x.shape[0], 1, -1), p], dim=1)  # the last output predicts p_{k+1}
        mu, _, state = self.step(self._with_content(c, inputs), self.initial_state(y, x.shape[0]))
        p, out = mu[:, -1:], [mu[:, -1:]]
        for _ in range(self.frames - self.context - 1):
            p, _, state = self.step(self._with_content(c, p), state)
            out.append(p)
        return self.decode(self._with_content(c, torch.cat(out, dim=1)), y)

    # ----------------------------------------------------------------------------------
    # files

    def save(self, directory: Path) -> None:
        record = {**dataclasses.asdict(self.config), "frame_shape": list(self.frame_shape), "frames": self.frames,
                  "context": self.context, "num_classes": self.num_classes}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_config_and_weights(directory, CONFIG_FILE, record, WEIGHTS_FILE, state)

    @classmethod
    def load(cls, directory: Path) -> VAERNN:
        record, state = load_config_and_weights(directory, CONFIG_FILE, WEIGHTS_FILE, what="vae-rnn checkpoint")
        shape, frames = tuple(record.pop("frame_shape")), record.pop("frames")
        context, num_classes = record.pop("context"), record.pop("num_classes")
        model = cls(config_from_record(VAERNNConfig, record, Path(directory) / CONFIG_FILE), shape, frames, context,
                    num_classes)
        model.load_state_dict(state)
        return model.eval()


def gaussian_nll(x: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """-log N(x; mu, diag exp(log_var)) per dimension (nats), elementwise."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mu) ** 2 * torch.exp(-log_var))


def window_corners(frames: Tensor, side: int) -> Tensor:
    """Frames (N, C, H, W) in [-1, 1] -> the top-left corner (N, 2: row, column) of the side x side window around
    each frame's brightness centre (the mean position weighted by (x + 1) / 2 summed over channels; a black
    frame's: its middle), inside the frame: evaluate/video.py's `object_windows`, on tensors."""
    _, _, h, w = frames.shape
    mass = ((frames.float() + 1) / 2).clamp(min=0).sum(1)  # (N, H, W)
    total = mass.sum((1, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    rows = torch.arange(h, dtype=mass.dtype, device=mass.device)
    cols = torch.arange(w, dtype=mass.dtype, device=mass.device)
    cy = torch.where(total > 0, (mass.sum(2) * rows).sum(1) / safe, torch.full_like(total, (h - 1) / 2))
    cx = torch.where(total > 0, (mass.sum(1) * cols).sum(1) / safe, torch.full_like(total, (w - 1) / 2))
    top = torch.round(cy - (side - 1) / 2).clamp(0, h - side)
    left = torch.round(cx - (side - 1) / 2).clamp(0, w - side)
    return torch.stack([top, left], dim=1).long()


def _window_index(corners: Tensor, side: int) -> tuple[Tensor, Tensor, Tensor]:
    n = corners.shape[0]
    steps = torch.arange(side, device=corners.device)
    rows, cols = corners[:, 0, None] + steps, corners[:, 1, None] + steps  # (N, side) each
    return torch.arange(n, device=corners.device)[:, None, None], rows[:, :, None], cols[:, None, :]


def cut_windows(frames: Tensor, corners: Tensor, side: int) -> Tensor:
    """Frames (N, C, H, W), corners (N, 2) -> the windows (N, C, side, side)."""
    i, rows, cols = _window_index(corners, side)
    return frames.permute(0, 2, 3, 1)[i, rows, cols].permute(0, 3, 1, 2)


def paste_windows(windows: Tensor, corners: Tensor, size: tuple[int, int]) -> Tensor:
    """Windows (N, C, side, side) pasted at their corners (N, 2) on black frames (N, C, H, W) in [-1, 1]."""
    n, c, side, _ = windows.shape
    canvas = windows.new_full((n, *size, c), -1.0)
    i, rows, cols = _window_index(corners, side)
    canvas[i, rows, cols] = windows.permute(0, 2, 3, 1)
    return canvas.permute(0, 3, 1, 2)


class FrameStage(nn.Module):
    """Stage 1 (models/video.py's `fit_stages`) where it is more than the VAE on whole frames: with a `window`, the
    VAE on each frame's window (`window_corners`); with `content_dim` k > 0, on pairs of frames of one clip
    (N, 2 * C, H, W), each decoded from the other's content (the first k latent dimensions) and its own motion.
    Its loss, like the VAE's, is in nats per frame (per window); it saves the VAE's files."""

    def __init__(self, frame_vae: vae.VAE, content_dim: int = 0, window: int = 0):
        super().__init__()
        self.vae, self.content_dim, self.window, self.ema = frame_vae, content_dim, window, None
        self.image_shape = frame_vae.image_shape
        self.per_row = 2 if content_dim else 1  # frames a batch row holds

    def draw_noise(self, n: int, *, generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
        where = generator.device if generator is not None else device
        eps = torch.randn((n, self.per_row, self.vae.config.z_dim), generator=generator, device=where)
        return {"eps": eps.to(device)}

    def forward(self, x: Tensor, y: Tensor | None = None, *, noise: dict[str, Tensor] | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        c, per, k = self.vae.image_shape[0], self.per_row, self.content_dim
        n = x.shape[0]
        if x.dim() != 4 or x.shape[1] != per * c:
            raise ValueError(f"expected {'pairs of frames' if per == 2 else 'frames'} (N, {per * c}, H, W), got "
                             f"{tuple(x.shape)}")
        if noise is None:
            noise = self.draw_noise(n, generator=generator, device=x.device)
        frames = x.reshape(per * n, c, *x.shape[2:])  # a0, b0, a1, b1, ... for pairs
        if self.window:
            frames = cut_windows(frames, window_corners(frames, self.window), self.window)
        labels = None if y is None else y.repeat_interleave(per)
        mu, log_var = self.vae.encode(frames, labels)
        z = mu + torch.exp(0.5 * log_var) * noise["eps"].to(mu).reshape(per * n, -1)
        if k:
            z = z.reshape(n, 2, -1)
            z = torch.cat([z.flip(1)[..., :k], z[..., k:]], dim=-1).reshape(2 * n, -1)  # the other's content
        recon = self.vae.recon_nll(self.vae.decode(z, labels), frames).mean()
        kl = vae.kl_normal(mu, log_var).mean()
        return {"recon": recon, "kl": kl, "nelbo": recon + kl, "loss": recon + self.vae.config.beta * kl}

    def loss_terms(self, x: Tensor, y: Tensor | None = None, *, generator: torch.Generator | None = None,
                   noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return self(x, y, noise=noise, generator=generator)

    def save(self, directory: Path) -> None:
        self.vae.save(directory)


def build(config: VAERNNConfig, frame_shape: tuple[int, int, int], frames: int, context: int,
          num_classes: int = 0) -> VAERNN:
    return VAERNN(config, frame_shape, frames, context, num_classes)
