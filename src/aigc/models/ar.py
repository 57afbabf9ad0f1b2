"""Autoregressive model AR(p), the seeds' third family of generative models (with GAN and VAE).

    x_t = c + sum_{i=1..p} phi_i x_{t-i} + e_t,    e_t iid, mean 0, variance sigma^2

Reads top to bottom:

1. ``ARConfig``: the order p (or "auto") and the largest order tried.
2. ``AR.fit``: statsmodels estimates it. ``AutoReg`` is OLS of x_t on (1, x_{t-1}, ..., x_{t-p})
   over t = p..n-1, and sigma^2 = (sum of squared residuals) / (n - p). With order 0 ("auto"),
   ``ar_select_order`` picks the contiguous lags 1..p, p in 0..max_order, with the lowest BIC
   (every candidate fitted on the same sample, after max_order held-back values), and the chosen
   order is then refitted on the whole series.
3. ``AR.forecast``: the point forecast is the recursion with future shocks at their mean 0,
       x^_{n+h} = c + sum_i phi_i x^_{n+h-i},   x^_t = x_t for observed t.
4. ``AR.interval``: the h-step error is sum_{j=0}^{h-1} psi_j e_{n+h-j}, where psi are the
   MA(infinity) weights psi_0 = 1, psi_j = sum_{i=1}^{min(j, p)} phi_i psi_{j-i}, so
       Var(x_{n+h} - x^_{n+h}) = sigma^2 sum_{j<h} psi_j^2
   and the level-q interval is x^ +- z_{(1+q)/2} sqrt(Var), z the standard normal quantile.
   (Parameter uncertainty is left out, as statsmodels does.)
5. ``AR.sample``: generated sequences: the recursion run with shocks drawn from N(0, sigma^2)
   ("gaussian") or with replacement from the fit's residuals ("bootstrap").
6. Files: ``ar.json`` (config, c, sigma^2, fit info) and ``ar.safetensors`` (phi, the residuals
   and the series), no pickles. Forecasts, intervals and paths are computed here from those
   parameters, so a reloaded model needs no refit and ``from_coefficients`` needs no data.

The seeds' worked example: AR(2) with phi = (0.5, 0.3) and history 100 then 110 forecasts 115.
The seed leaves out the constant: 0.5 x 110 + 0.3 x 100 = 85, so 115 needs c = 30:
``AR.from_coefficients([0.5, 0.3], c=30).forecast(1, history=[100, 110])`` -> [115.].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from aigc.config import config_from_record, option
from aigc.models.files import load_config_and_weights, save_config_and_weights

MAX_ORDER = 500
CONFIG_FILE = "ar.json"
WEIGHTS_FILE = "ar.safetensors"
NOISES = ("gaussian", "bootstrap")


@dataclass
class ARConfig:
    order: int = option(0, "p, the lags 1..p (--order P); 0 = auto: the p in 0..max_order with the lowest BIC",
                        min=0, max=MAX_ORDER)
    max_order: int = option(24, "largest p that order=auto tries (--max-order)", min=1, max=MAX_ORDER)


def required_length(p: int) -> int:
    """Values a fit of order p needs: p initial values, then at least p + 10 equations for p + 1
    parameters."""
    return 2 * p + 10


class AR:
    """AR(p) with learned state ``const_`` (c), ``phi_`` (p,), ``sigma2_``, ``resid_`` and ``series_``."""

    def __init__(self, config: ARConfig):
        self.config = config

    # ----------------------------------------------------------------------------------
    # construction

    def fit(self, x, *, order: int | None = None) -> AR:
        """Estimate c, phi and sigma^2 on the series x (n,) with statsmodels; returns self.
        `order` fits exactly that p (0 included) instead of the config's (a back-test's refits)."""
        from statsmodels.tsa.ar_model import AutoReg, ar_select_order

        x = np.asarray(x, dtype=np.float64)
        p = self.config.order if order is None else order
        if order is None and p == 0:  # auto: BIC over the contiguous lags 1..p, p = 0..max_order
            m = self.config.max_order
            if len(x) < required_length(m):
                raise ValueError(f"the series has {len(x)} values; order auto with max_order {m} needs at least "
                                 f"{required_length(m)} (lower --max-order to at most {max(0, (len(x) - 10) // 2)})")
            selected = ar_select_order(x, maxlag=m, ic="bic", glob=False, trend="c")
            p = len(selected.ar_lags or [])
        elif len(x) < required_length(p):
            raise ValueError(f"the series has {len(x)} values; order {p} needs at least {required_length(p)} "
                             f"(lower --order to at most {max(0, (len(x) - 10) // 2)})")
        res = AutoReg(x, lags=p, trend="c").fit()
        params = np.asarray(res.params, dtype=np.float64)  # (c, phi_1, ..., phi_p)
        self.const_, self.phi_ = float(params[0]), params[1:].copy()
        self.sigma2_ = float(res.sigma2)
        self.resid_ = np.asarray(res.resid, dtype=np.float64)
        self.series_ = x.copy()
        self.info_ = {"bic": float(res.bic), "aic": float(res.aic), "nobs": int(res.nobs),
                      "selected_by": "bic" if order is None and self.config.order == 0 else "given"}
        return self

    @classmethod
    def from_coefficients(cls, phi, c: float = 0.0, *, sigma: float | None = None, history=None) -> AR:
        """An AR(p) from its coefficients, no data needed: x_t = c + sum_i phi[i-1] x_{t-i} + e_t,
        e_t ~ N(0, sigma^2). `history` (optional) is the series that forecasts start from."""
        phi = np.atleast_1d(np.asarray(phi, dtype=np.float64))
        if phi.ndim != 1 or not np.isfinite(phi).all() or not math.isfinite(c):
            raise ValueError("phi must be a list of finite numbers and c a finite number")
        if sigma is not None and not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
        model = cls(ARConfig(order=len(phi), max_order=max(1, len(phi))))
        model.const_, model.phi_ = float(c), phi.copy()
        model.sigma2_ = None if sigma is None else float(sigma) ** 2
        model.resid_ = None
        model.series_ = np.asarray([] if history is None else history, dtype=np.float64)
        model.info_ = {"selected_by": "given"}
        return model

    @property
    def order(self) -> int:
        return len(self.phi_)

    @property
    def lags(self) -> list[int]:
        return list(range(1, self.order + 1))

    # ----------------------------------------------------------------------------------
    # forecasts, intervals, sample paths

    def _start(self, history) -> np.ndarray:
        """The last p values the recursion starts from: of `history`, else of the fitted series."""
        x = self.series_ if history is None else np.asarray(history, dtype=np.float64)
        if len(x) < self.order:
            raise ValueError(f"AR({self.order}) needs at least {self.order} past values, got {len(x)}")
        return x[len(x) - self.order:]

    def forecast(self, horizon: int, history=None) -> np.ndarray:
        """Point forecasts x^_{n+1..n+H} (H,) from the end of `history` (default: the fitted series)."""
        _check_horizon(horizon)
        window = list(self._start(history))  # x_{n-p} .. x_{n-1}
        out = np.empty(horizon)
        for h in range(horizon):
            # x^_t = c + sum_i phi_i x^_{t-i}  (step 3 above)
            out[h] = self.const_ + sum(self.phi_[i] * window[-1 - i] for i in range(self.order))
            window.append(out[h])
        return out

    def psi(self, horizon: int) -> np.ndarray:
        """MA(infinity) weights psi_0 .. psi_{H-1}: psi_0 = 1, psi_j = sum_{i=1}^{min(j,p)} phi_i psi_{j-i}."""
        psi = np.zeros(horizon)
        psi[0] = 1.0
        for j in range(1, horizon):
            psi[j] = sum(self.phi_[i - 1] * psi[j - i] for i in range(1, min(j, self.order) + 1))
        return psi

    def forecast_std(self, horizon: int) -> np.ndarray:
        """sqrt(sigma^2 sum_{j<h} psi_j^2) for h = 1..H: the standard deviation of the h-step error."""
        if self.sigma2_ is None:
            raise ValueError("this AR has no noise scale: give sigma to from_coefficients")
        return np.sqrt(self.sigma2_ * np.cumsum(self.psi(horizon) ** 2))

    def interval(self, horizon: int, level: float = 0.95, history=None) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper), each (H,): x^ -+ z_{(1+level)/2} * forecast_std."""
        z = normal_quantile(level)
        mean, std = self.forecast(horizon, history), self.forecast_std(horizon)
        return mean - z * std, mean + z * std

    def predict(self, horizon: int, level: float = 0.95, history=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(forecast, lower, upper), each (H,): what every series family returns for a backtest."""
        return (self.forecast(horizon, history), *self.interval(horizon, level, history))

    def sample(self, n: int, *, horizon: int, seed: int, noise: str = "gaussian", history=None) -> np.ndarray:
        """n generated continuations (n, H) of `history` (default: the fitted series):
        x_t = c + sum_i phi_i x_{t-i} + e_t with e_t ~ N(0, sigma^2) or resampled residuals."""
        _check_horizon(horizon)
        rng = np.random.default_rng(seed)
        if noise == "gaussian":
            shocks = rng.standard_normal((n, horizon)) * self.forecast_std(1)[0]
        elif noise == "bootstrap":
            if self.resid_ is None or len(self.resid_) == 0:
                raise ValueError("bootstrap noise needs the residuals of a fit (this AR was built from coefficients)")
            shocks = rng.choice(self.resid_, size=(n, horizon), replace=True)
        else:
            raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {noise!r}")
        p = self.order
        paths = np.empty((n, p + horizon))
        paths[:, :p] = self._start(history)
        for h in range(horizon):
            window = paths[:, h:h + p]  # (n, p): x_{t-p} .. x_{t-1}
            paths[:, p + h] = self.const_ + window @ self.phi_[::-1] + shocks[:, h]
        return paths[:, p:]

    # ----------------------------------------------------------------------------------
    # files

    def save(self, directory: Path) -> None:
        """Write ar.json (config, c, sigma^2, fit info) and ar.safetensors (phi, residuals, series)."""
        tensors = {"phi": self.phi_, "series": self.series_}
        if self.resid_ is not None:
            tensors["resid"] = self.resid_
        record = {"config": dataclasses.asdict(self.config), "const": self.const_, "sigma2": self.sigma2_,
                  "info": self.info_}
        save_config_and_weights(directory, CONFIG_FILE, record, WEIGHTS_FILE,
                                {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()},
                                framework="np")

    @classmethod
    def load(cls, directory: Path) -> AR:
        record, tensors = load_config_and_weights(directory, CONFIG_FILE, WEIGHTS_FILE, what="AR model",
                                                  framework="np")
        model = cls(config_from_record(ARConfig, record["config"], Path(directory) / CONFIG_FILE))
        model.const_, model.sigma2_, model.info_ = record["const"], record["sigma2"], record["info"]
        model.phi_, model.series_, model.resid_ = tensors["phi"], tensors["series"], tensors.get("resid")
        return model


def build(config: ARConfig) -> AR:
    return AR(config)


def normal_quantile(level: float) -> float:
    """z_{(1+level)/2}: the half-width of a central level interval of N(0, 1)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf((1 + level) / 2)


def _check_horizon(horizon: int) -> None:
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
