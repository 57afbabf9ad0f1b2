"""A SimVP-style video predictor (Gao et al. 2022, "SimVP: Simpler yet Better Video Prediction"): ours, small.

Given the first `context` frames of a clip it predicts the next `future` ones in one pass, no recurrence:

    patches     each frame (C, H, W) -> p x p squares stacked as channels (p*p*C, H/p, W/p) (space to depth)
    encoder     each context frame's patches -> 2 conv blocks (3x3 conv, GroupNorm, SiLU) -> (hid_s, H/p, W/p)
    translator  the context's codes stacked as channels (context * hid_s, H/p, W/p) -> conv -> n_t residual
                conv blocks (GroupNorm, SiLU, 3x3 conv) at hid_t channels -> conv -> (future * hid_s, H/p, W/p)
    decoder     each future code -> 2 conv blocks, joined by the last context frame's patches (a skip: the model
                can copy what does not move) -> 1x1 conv -> (p*p*C, H/p, W/p) -> depth to space ->
                hardtanh -> (C, H, W) in [-1, 1] (the pixel range, reached exactly: black stays black)

SimVP codes frames with strided convs and its translator is a stack of Inception blocks, with a skip from each
frame's own encoder features (so it needs as many future as context frames); here space to depth (cheaper on a
CPU: 64x64 frames are coded at 16x16), plain residual blocks and the last context frame as the skip, so any
context and future lengths work. The loss is the squared error of the future frames in [-1, 1] (SimVP trains
on MSE). Clips arrive as the video modality's tensors: (N, T * C, H, W), frames stacked as
channels; sides are padded to a multiple of p and cropped back. The loss adds `l1` times the mean absolute
error to the squared error (a probe at 100 steps: on MSE alone the empty background stays a faint grey, and
black frames keep the better SSIM and MAE), and `ssim` times 1 - SSIM of the predicted frames (the evaluation's SSIM,
computed with a separable window: see `frame_ssim`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.config import config_from_record, option
from aigc.models.files import load_config_and_weights, save_config_and_weights

CONFIG_FILE = "simvp_config.json"
WEIGHTS_FILE = "model.safetensors"
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # the evaluation's SSIM (torchmetrics' defaults)


@dataclass
class SimVPConfig:
    patch: int = option(4, "frames are cut into patch x patch squares stacked as channels (space to depth) before "
                           "the encoder, as OpenSTL's ConvLSTM does: 64x64 frames are coded at 16x16", min=1, max=16)
    hid_s: int = option(16, "channels of a frame's code (encoder and decoder width)", min=4, max=256)
    hid_t: int = option(96, "channels of the translator, which sees every context frame at once", min=8,
                        max=2048)
    n_t: int = option(3, "residual conv blocks of the translator", min=1, max=32)
    l1: float = option(1.0, "weight of the mean absolute error added to the squared error in the loss: it drives "
                            "the empty background to exactly black, where SSIM and MAE are lost", min=0.0)
    ssim: float = option(1.0, "weight of 1 - SSIM of the predicted frames added to the loss (the SSIM the "
                              "evaluation reports: torchmetrics', 11x11 Gaussian window, sigma 1.5, on [0, 1])",
                         min=0.0)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvBlock(nn.Module):
    """3x3 conv, GroupNorm, SiLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(_groups(c_out), c_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class SimVP(nn.Module):
    def __init__(self, config: SimVPConfig, frame_shape: tuple[int, int, int], context: int, future: int):
        super().__init__()
        channels, height, width = (int(s) for s in frame_shape)
        if context < 1 or future < 1:
            raise ValueError(f"a predictor needs context >= 1 and future >= 1 frames, got {context} and {future}")
        if config.ssim > 0 and min(height, width) <= SSIM_WINDOW // 2:
            raise ValueError(f"the SSIM term needs frames over {SSIM_WINDOW // 2} pixels a side, got {height}x{width}: "
                             f"give --set ssim=0 or a larger --set size=N")
        self.config, self.frame_shape, self.context, self.future = config, (channels, height, width), context, future
        self.ema = None
        s, t, p = config.hid_s, config.hid_t, config.patch
        patched = channels * p * p  # channels of a frame cut into patches
        self.encoder = nn.Sequential(ConvBlock(patched, s), ConvBlock(s, s))  # (pC, H/p, W/p) -> (s, H/p, W/p)
        self.translator = nn.Sequential(
            nn.Conv2d(context * s, t, 3, padding=1), *(ResBlock(t) for _ in range(config.n_t)),
            nn.GroupNorm(_groups(t), t), nn.SiLU(), nn.Conv2d(t, future * s, 3, padding=1))
        self.decoder = nn.Sequential(ConvBlock(s, s), ConvBlock(s, s))
        # the decoded code and the last context frame's patches -> the frame's patches (the skip lets it copy)
        self.readout = nn.Conv2d(s + patched, patched, 1)

    def predict(self, x: Tensor) -> Tensor:
        """Context frames (N, context * C, H, W) in [-1, 1] -> the future frames (N, future * C, H, W)."""
        c, h, w = self.frame_shape
        p, n = self.config.patch, x.shape[0]
        if tuple(x.shape[1:]) != (self.context * c, h, w):
            raise ValueError(f"expected context clips (N, {self.context * c}, {h}, {w}), got {tuple(x.shape)}")
        frames = F.pad(x.reshape(n * self.context, c, h, w), (0, -w % p, 0, -h % p))  # sides a multiple of p
        patches = F.pixel_unshuffle(frames, p)  # (N * context, p*p*C, H'/p, W'/p)
        code = self.encoder(patches)  # (N * context, s, H'/p, W'/p)
        s, hp, wp = code.shape[1:]
        future = self.translator(code.reshape(n, self.context * s, hp, wp))  # (N, future * s, H'/p, W'/p)
        decoded = self.decoder(future.reshape(n * self.future, s, hp, wp))  # (N * future, s, H'/p, W'/p)
        last = patches.reshape(n, self.context, -1, hp, wp)[:, -1:]  # (N, 1, p*p*C, H'/p, W'/p)
        last = last.expand(n, self.future, *last.shape[2:]).reshape(n * self.future, -1, hp, wp)
        out = F.pixel_shuffle(self.readout(torch.cat([decoded, last], dim=1)), p)  # (N * future, C, H', W')
        # hardtanh: the pixel range, reached exactly (an empty background is black, not a faint grey)
        return F.hardtanh(out[:, :, :h, :w]).reshape(n, self.future * c, h, w)

    def forward(self, x: Tensor, y: Tensor | None = None, *, noise: dict | None = None) -> dict[str, Tensor]:
        """x: whole clips (N, (context + future) * C, H, W) -> {"loss": MSE + l1 * MAE of the predicted future frames,
        "mse", "mae"}."""
        c = self.frame_shape[0]
        split = self.context * c
        prediction = self.predict(x[:, :split])
        truth = x[:, split:split + self.future * c]
        mse, mae = F.mse_loss(prediction, truth), F.l1_loss(prediction, truth)
        loss = mse + self.config.l1 * mae
        out = {"mse": mse, "mae": mae}
        if self.config.ssim > 0:
            out["ssim"] = frame_ssim(prediction, truth, c)
            loss = loss + self.config.ssim * (1 - out["ssim"])
        return {"loss": loss, **out}

    def loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self(x, y)["loss"]

    def draw_noise(self, n: int, *, generator: torch.Generator | None = None, device=None) -> dict:
        return {}  # the loss draws no noise

    # ----------------------------------------------------------------------------------
    # files

    def save(self, directory: Path) -> None:
        record = {**asdict(self.config), "frame_shape": list(self.frame_shape), "context": self.context,
                  "future": self.future}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_config_and_weights(directory, CONFIG_FILE, record, WEIGHTS_FILE, state)

    @classmethod
    def load(cls, directory: Path) -> SimVP:
        record, state = load_config_and_weights(directory, CONFIG_FILE, WEIGHTS_FILE, what="simvp checkpoint")
        shape, context, future = tuple(record.pop("frame_shape")), record.pop("context"), record.pop("future")
        model = cls(config_from_record(SimVPConfig, record, Path(directory) / CONFIG_FILE), shape, context, future)
        model.load_state_dict(state)
        return model.eval()


def frame_ssim(prediction: Tensor, truth: Tensor, channels: int) -> Tensor:
    """The mean SSIM of the frames of two clip tensors (N, F * C, H, W) in [-1, 1], as the evaluation measures it
    (aigc.evaluate.video: torchmetrics' SSIM of each frame on [0, 1]), in float32 and differentiable.

    Wang et al. 2004 as torchmetrics computes it (11x11 Gaussian window, sigma 1.5, reflection padding of 5,
    K1 = 0.01, K2 = 0.03). The Gaussian is separable, so the padded window is two matrix products, B_h X B_w^T
    (`_blur_matrix`): torchmetrics' own function (a grouped 11x11 conv) made a training step 14x slower here
    (2.85 s against 0.20 s for 16 clips of 20 x 64 x 64, one thread), and two 11-tap convs still 7x (oneDNN is
    slow on one-channel convs); tests/test_video.py checks it against torchmetrics."""
    n, fc, h, w = prediction.shape
    if min(h, w) <= SSIM_WINDOW // 2:
        raise ValueError(f"SSIM needs frames over {SSIM_WINDOW // 2} pixels a side, got {h}x{w}")
    x = ((prediction.float() + 1) / 2).reshape(n * fc, h, w)  # every frame's every channel alone, in [0, 1]
    y = ((truth.float() + 1) / 2).reshape(n * fc, h, w)
    stack = torch.cat([x, y, x * x, y * y, x * y])  # (5 * N * F * C, H, W)
    blurred = _blur_matrix(h, x.device) @ stack @ _blur_matrix(w, x.device).T
    mu_x, mu_y, xx, yy, xy = blurred.split(n * fc)
    var_x, var_y = (xx - mu_x ** 2).clamp(min=0), (yy - mu_y ** 2).clamp(min=0)
    cov = xy - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K1 L)^2, (K2 L)^2 with L = 1
    ssim = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim.reshape(n * fc // channels, -1).mean(dim=1).mean()


@functools.lru_cache(maxsize=8)
def _blur_matrix(size: int, device=None) -> Tensor:
    """(size, size): row i holds the 1-D Gaussian window (SSIM_WINDOW taps, SSIM_SIGMA) centred on i over a side
    reflected at its ends (F.pad's "reflect": index -j is j, index size - 1 + j is size - 1 - j)."""
    half = SSIM_WINDOW // 2
    taps = torch.arange(SSIM_WINDOW, dtype=torch.float64) - half
    g = torch.exp(-(taps / SSIM_SIGMA) ** 2 / 2)
    g = g / g.sum()
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        for k in range(SSIM_WINDOW):
            j = i + k - half
            j = -j if j < 0 else 2 * (size - 1) - j if j >= size else j
            matrix[i, j] += g[k]
    return matrix.float().to(device)


def build(config: SimVPConfig, frame_shape: tuple[int, int, int], context: int, future: int) -> SimVP:
    return SimVP(config, frame_shape, context, future)
