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


@dataclass
class VAERNNConfig(vae.VAEConfig):
    """The VAE's keys (models/vae.py) with a latent for a frame, then the recurrent net's and the budget split."""

    z_dim: int = option(32, "latent dimensions of a frame (a 64x64 frame holds one object: where it is and "
                            "what it looks like)", min=1, max=1024)
    cell: str = option("gru", "recurrent core over the latents: gru or lstm", choices=RECURRENT_CELLS)
    n_layer: int = option(1, "stacked recurrent layers", min=1, max=8)
    n_hidden: int = option(256, "hidden state size of the recurrent net", min=8, max=8192)
    temperature: float = option(1.0, "generation: scale of the next latent's standard deviation (0: its mean)",
                                min=0.0, max=4.0)
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
        self.vae = vae.VAE(vae_config(config), self.frame_shape, num_classes)
        z, hidden = config.z_dim, config.n_hidden
        self.core = CELLS[config.cell](z, hidden, config.n_layer, batch_first=True)
        self.start = nn.Parameter(torch.zeros(z))  # the input before the first latent
        if num_classes:  # the class sets the initial state: identity for the whole clip
            self.label_emb = nn.Embedding(num_classes, config.label_dim)
            self.to_state = nn.Linear(config.label_dim, config.n_layer * hidden)
        else:
            self.h0 = nn.Parameter(torch.zeros(config.n_layer, 1, hidden))
        self.head = nn.Linear(hidden, 2 * z)  # -> (mu, log var) of the next latent

    # ----------------------------------------------------------------------------------
    # the latent sequence

    def latents(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Frames (N, F * C, H, W) in [-1, 1] -> their latent means under the VAE (N, F, z_dim)."""
        c, h, w = self.frame_shape
        n, f = x.shape[0], x.shape[1] // c
        frames = x.reshape(n * f, c, h, w)
        labels = None if y is None else y.repeat_interleave(f)
        mu, _ = self.vae.encode(frames, labels)
        return mu.reshape(n, f, -1)

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

    def _inputs(self, m: Tensor) -> Tensor:
        """Latents (N, L, z) -> the inputs that predict them: the start vector, then each but the last."""
        start = self.start.to(m.dtype).expand(m.shape[0], 1, -1)
        return torch.cat([start, m[:, :-1]], dim=1)

    def forward(self, x: Tensor, y: Tensor | None = None, *, noise: dict | None = None) -> dict[str, Tensor]:
        """Stage 2: whole clips (N, T * C, H, W) -> {"loss": the Gaussian NLL of each frame's latent mean given the
        ones before (nats per frame, summed over the latent's dimensions), "mse": of the predicted means}."""
        with torch.no_grad():  # the VAE is trained (stage 1) and frozen
            m = self.latents(x, y).float()  # (N, T, z)
        mu, log_var, _ = self.step(self._inputs(m), self.initial_state(y, x.shape[0]))
        nll = 0.5 * (math.log(2 * math.pi) + log_var + (m - mu) ** 2 * torch.exp(-log_var))  # (N, T, z)
        return {"loss": nll.sum(-1).mean(), "mse": ((m - mu) ** 2).mean()}

    def loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self(x, y)["loss"]

    def draw_noise(self, n: int, *, generator: torch.Generator | None = None, device=None) -> dict:
        return {}  # stage 2's loss draws no noise (stage 1 is the VAE's own, which does)

    def decode(self, z: Tensor, y: Tensor | None) -> Tensor:
        """Latents (N, F, z_dim) -> frames (N, F * C, H, W) in [-1, 1]: the VAE decoder's pixel mean."""
        n, f = z.shape[:2]
        labels = None if y is None else y.repeat_interleave(f)
        frames = self.vae.sample(n * f, z=z.reshape(n * f, -1), y=labels)  # (N * F, C, H, W)
        return frames.reshape(n, f * self.frame_shape[0], *self.frame_shape[1:])

    # ----------------------------------------------------------------------------------
    # the two jobs

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None) -> Tensor:
        """n clips (N, T * C, H, W) in [-1, 1], the latents drawn step by step (ancestral sampling)."""
        if generator is None:
            raise ValueError("pass generator= (sampling randomness is explicit)")
        device = next(self.parameters()).device
        eps = torch.randn((n, self.frames, self.config.z_dim), generator=generator, device=generator.device)
        eps = eps.to(device)
        y = None if y is None else y.to(device)
        state, z = self.initial_state(y, n), self.start.expand(n, 1, -1)
        out = []
        for t in range(self.frames):
            mu, log_var, state = self.step(z, state)  # (N, 1, z)
            z = mu + self.config.temperature * torch.exp(0.5 * log_var) * eps[:, t:t + 1]
            out.append(z)
        return self.decode(torch.cat(out, dim=1), y)

    @torch.no_grad()
    def predict(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Context frames (N, context * C, H, W) in [-1, 1] -> the next T - context frames (N, future * C, H, W):
        the context's latent means read, then the net's own means rolled forward and decoded."""
        c, h, w = self.frame_shape
        if tuple(x.shape[1:]) != (self.context * c, h, w):
            raise ValueError(f"expected context clips (N, {self.context * c}, {h}, {w}), got {tuple(x.shape)}")
        m = self.latents(x, y).float()  # (N, context, z)
        inputs = torch.cat([self.start.expand(x.shape[0], 1, -1), m], dim=1)  # the last output predicts m_{k+1}
        mu, _, state = self.step(inputs, self.initial_state(y, x.shape[0]))
        z, out = mu[:, -1:], [mu[:, -1:]]
        for _ in range(self.frames - self.context - 1):
            z, _, state = self.step(z, state)
            out.append(z)
        return self.decode(torch.cat(out, dim=1), y)

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


def build(config: VAERNNConfig, frame_shape: tuple[int, int, int], frames: int, context: int,
          num_classes: int = 0) -> VAERNN:
    return VAERNN(config, frame_shape, frames, context, num_classes)
