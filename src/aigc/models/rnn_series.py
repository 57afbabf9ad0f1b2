"""The `rnn` family on a numeric series: a GRU/LSTM over windows that predicts, at every step,
the mean and the variance of the next value, trained by the Gaussian negative log-likelihood.

    y_t = x_t - x_{t-1}  (difference = true)  or  y_t = x_t     the modelled sequence
    z_t = (y_t - loc) / scale                                  loc, scale: mean, std of the training part
    h_t = RNN(z_{t-L+1} .. z_t)                                (B, T, n_hidden), zero initial state
    (mu_t, log var_t) = Linear(h_t)                            the prediction of z_{t+1}
    loss = mean over scored steps of 0.5 (log 2 pi + log var_t + (z_{t+1} - mu_t)^2 / var_t)

L is the window (`block_size`): training windows are L values long, and a forecast reads the
last L values of the series before it steps on.

Generated sequences are ancestral samples: z_{t+1} = mu_t + sqrt(var_t) eps, fed back as the next
input (the recurrent state carries on), with eps ~ N(0, 1) ("gaussian") or drawn from the
standardised one-step residuals of the training part ("bootstrap"); then y = loc + scale z and,
with differencing, x_{n+h} = x_n + y_{n+1} + ... + y_{n+h}.

Forecasts: one step ahead is exact, mean x^ = x_n + loc + scale mu (or loc + scale mu) and interval
x^ -+ z_{(1+q)/2} scale sigma. Beyond one step the predictive distribution has no closed form: the
point forecast is the mean, and the interval the central quantiles, of FORECAST_PATHS gaussian
paths drawn at FORECAST_SEED, so forecasts do not depend on the user's seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aigc.config import config_from_record, option
from aigc.models.ar import NOISES, normal_quantile
from aigc.models.files import load_config_and_weights, save_config_and_weights
from aigc.models.rnn import CELLS

CONFIG_FILE = "series_rnn.json"
WEIGHTS_FILE = "series_rnn.safetensors"
FORECAST_PATHS = 1000  # Monte Carlo paths behind forecasts and intervals beyond one step
FORECAST_SEED = 0


@dataclass
class SeriesRNNConfig:
    cell: str = option("gru", "recurrent core: rnn (tanh), gru or lstm", choices=tuple(CELLS))
    n_layer: int = option(1, "stacked recurrent layers", min=1, max=16)
    n_hidden: int = option(64, "hidden state size", min=1, max=8192)
    dropout: float = option(0.0, "dropout between layers and before the output layer", min=0.0, max=0.9)
    difference: bool = option(True, "model the changes x_t - x_{t-1} (true: trending series extrapolate) "
                                     "rather than the levels")


def modelled(x: np.ndarray, difference: bool) -> np.ndarray:
    """The sequence the network sees, before standardising: the changes or the levels."""
    x = np.asarray(x, dtype=np.float64)
    return np.diff(x) if difference else x


class SeriesRNN(nn.Module):
    """Learned state: the weights; `history` (n,) the series forecasts start from and `resid` the
    standardised one-step residuals of the training part (both float64, saved with the weights)."""

    def __init__(self, config: SeriesRNNConfig, *, context: int, loc: float, scale: float):
        super().__init__()
        self.config = config
        self.context = context  # L: the window the net was trained on, and reads before forecasting
        self.loc, self.scale = float(loc), float(scale)
        self.core = CELLS[config.cell](1, config.n_hidden, config.n_layer, batch_first=True,
                                       dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.n_hidden, 2)  # (mu, log var)
        self.history = np.zeros(0)
        self.resid = np.zeros(0)

    def standardise(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float64) - self.loc) / self.scale

    def _step(self, z: torch.Tensor, state=None):
        """z (B, T) -> mu (B, T), log var (B, T), new recurrent state."""
        h, state = self.core(z.unsqueeze(-1), state)  # (B, T, n_hidden)
        out = self.head(self.drop(h)).float()  # (B, T, 2)
        return out[..., 0], out[..., 1].clamp(-20, 20), state

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> dict:
        """x, y, w (B, T): inputs z_t, targets z_{t+1}, weights of the scored steps (0 or 1)."""
        mu, log_var, _ = self._step(x)
        nll = 0.5 * (math.log(2 * math.pi) + log_var + (y.float() - mu) ** 2 * torch.exp(-log_var))  # (B, T)
        return {"loss": (nll * w).sum() / w.sum(), "mean": mu, "log_var": log_var}

    # ----------------------------------------------------------------------------------
    # one-step residuals, forecasts and sample paths

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def residuals(self, z: np.ndarray, batch: int = 1024) -> np.ndarray:
        """(z_{t+1} - mu_t) / sigma_t for every t >= L - 1 of z, each with the L values up to t as context."""
        was_training = self.training
        self.eval()
        L = self.context
        zt = torch.as_tensor(np.asarray(z), dtype=torch.float32)
        windows = zt.unfold(0, L + 1, 1)  # (N, L + 1)
        out = []
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch].to(self._device())
            mu, log_var, _ = self._step(w[:, :-1])
            out.append(((w[:, -1] - mu[:, -1]) * torch.exp(-0.5 * log_var[:, -1])).cpu())
        self.train(was_training)
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def _start(self, history):
        """The last L standardised values of `history` (default: the stored series) and the last level."""
        x = self.history if history is None else np.asarray(history, dtype=np.float64)
        need = 2 if self.config.difference else 1
        if len(x) < need:
            raise ValueError(f"this model needs at least {need} past values, got {len(x)}")
        z = self.standardise(modelled(x, self.config.difference))[-self.context:]
        return torch.as_tensor(z, dtype=torch.float32).view(1, -1), float(x[-1])

    @torch.no_grad()
    def sample(self, n: int, *, horizon: int, seed: int, noise: str = "gaussian", history=None) -> np.ndarray:
        """n generated continuations (n, H) of `history` (default: the stored series)."""
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {noise!r}")
        if noise == "bootstrap" and len(self.resid) == 0:
            raise ValueError("bootstrap noise needs the training residuals, and this model has none")
        was_training = self.training
        self.eval()
        device = self._device()
        z0, last = self._start(history)
        mu, log_var, state = self._step(z0.to(device))  # read the context once ...
        mu, log_var = mu[:, -1].expand(n), log_var[:, -1].expand(n)
        state = tuple(s.repeat(1, n, 1) for s in state) if isinstance(state, tuple) else state.repeat(1, n, 1)
        generator = torch.Generator().manual_seed(seed)  # ... then step all n paths together
        resid = torch.as_tensor(self.resid, dtype=torch.float32)
        zs = torch.empty(n, horizon)
        for h in range(horizon):
            if noise == "gaussian":
                eps = torch.randn(n, generator=generator)
            else:
                eps = resid[torch.randint(0, len(resid), (n,), generator=generator)]
            z_next = mu.cpu() + torch.exp(0.5 * log_var.cpu()) * eps  # (n,)
            zs[:, h] = z_next
            if h + 1 < horizon:
                mu, log_var, state = self._step(z_next.view(n, 1).to(device), state)
                mu, log_var = mu[:, -1], log_var[:, -1]
        self.train(was_training)
        y = self.loc + self.scale * zs.double().numpy()  # (n, H)
        return last + np.cumsum(y, axis=1) if self.config.difference else y

    @torch.no_grad()
    def predict(self, horizon: int, level: float = 0.95, history=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(forecast, lower, upper), each (H,): exact at h = 1, Monte Carlo beyond (see the module doc)."""
        z_q = normal_quantile(level)
        mean, lower, upper = np.empty(horizon), np.empty(horizon), np.empty(horizon)
        if horizon > 1:
            paths = self.sample(FORECAST_PATHS, horizon=horizon, seed=FORECAST_SEED, history=history)
            mean[:] = paths.mean(0)
            lower[:], upper[:] = np.quantile(paths, [(1 - level) / 2, (1 + level) / 2], axis=0)
        was_training = self.training
        self.eval()
        z0, last = self._start(history)
        mu, log_var, _ = self._step(z0.to(self._device()))
        self.train(was_training)
        m = self.loc + self.scale * float(mu[0, -1]) + (last if self.config.difference else 0.0)
        s = self.scale * math.exp(0.5 * float(log_var[0, -1]))
        mean[0], lower[0], upper[0] = m, m - z_q * s, m + z_q * s
        return mean, lower, upper

    def forecast(self, horizon: int, history=None) -> np.ndarray:
        return self.predict(horizon, history=history)[0]

    def interval(self, horizon: int, level: float = 0.95, history=None) -> tuple[np.ndarray, np.ndarray]:
        return self.predict(horizon, level, history)[1:]

    # ----------------------------------------------------------------------------------
    # files

    def save(self, directory: Path) -> None:
        """Write series_rnn.safetensors (weights, history, residuals) and series_rnn.json (config,
        window, standardisation)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        state["history"] = torch.as_tensor(np.ascontiguousarray(self.history, dtype=np.float64))
        state["resid"] = torch.as_tensor(np.ascontiguousarray(self.resid, dtype=np.float64))
        record = {"config": dataclasses.asdict(self.config), "context": self.context, "loc": self.loc,
                  "scale": self.scale}
        save_config_and_weights(directory, CONFIG_FILE, record, WEIGHTS_FILE, state)

    @classmethod
    def load(cls, directory: Path) -> SeriesRNN:
        record, state = load_config_and_weights(directory, CONFIG_FILE, WEIGHTS_FILE, what="series RNN")
        config = config_from_record(SeriesRNNConfig, record["config"], Path(directory) / CONFIG_FILE)
        model = cls(config, context=record["context"], loc=record["loc"], scale=record["scale"])
        model.history, model.resid = state.pop("history").numpy(), state.pop("resid").numpy()
        model.load_state_dict(state)  # strict: a missing or extra tensor is an error
        return model.eval()


def build(config: SeriesRNNConfig, *, context: int, loc: float, scale: float, history) -> SeriesRNN:
    model = SeriesRNN(config, context=context, loc=loc, scale=scale)
    model.history = np.asarray(history, dtype=np.float64)
    return model


def load(directory: Path) -> SeriesRNN:
    return SeriesRNN.load(directory)
