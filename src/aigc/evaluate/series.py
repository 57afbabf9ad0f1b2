"""The back-test of a series model: a rolling-origin back-test, its metrics, and a picture (`aigc eval` of a
series run, modalities/series.py).

Rolling origin: with n values and horizon H the test window is the last W = max(H, ceil(n / 10))
values, and the origins are o = T, ..., n - 1 with T = n - W. From origin o a model sees
x_0 .. x_{o-1} only and forecasts x_o .. x_{o+h-1}, h = 1 .. min(H, n - o). The saved model is fitted
on the whole series; the back-test refits:

- AR: at every origin, by statsmodels on x_0 .. x_{o-1}. The order is the run's; with order auto it
  is chosen by BIC once, on x_0 .. x_{T-1}, so nothing from the test window leaks into it.
- rnn: once, on x_0 .. x_{T-1}, with the run's configuration and number of steps (a neural refit per
  origin would cost the training time W times); at each origin it then reads the window before it.
- naive (the reference every metric is read against): x^_{o+h-1} = x_{o-1}, interval
  x_{o-1} -+ z s sqrt(h), s the standard deviation of x_t - x_{t-1} over t < T (a random walk).

Metrics over every (origin, h) pair, e = x - x^:
    mae = mean |e|        rmse = sqrt(mean e^2)
    mase = mae / mean_{1 <= t < T} |x_t - x_{t-1}|          (Hyndman & Koehler 2006: the in-sample MAE
                                                           of the one-step naive forecast)
    mase_seasonal = mae / mean_{m <= t < T} |x_t - x_{t-m}|  (season m; null when none is known)
    coverage = share of the x inside their --level interval
    ljung_box_p = p-value of the Ljung-Box test (statsmodels) of no autocorrelation left in the saved
        model's residuals, at lag K = min(10 or 2m, N/5) raised to p + 1 when it is not above p,
        with K - p degrees of freedom for AR(p) and K for the rnn's standardised residuals
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np

from aigc.data.series import time_axis
from aigc.errors import UserError
from aigc.models.ar import AR, ARConfig, normal_quantile, required_length

TEST_FRACTION = 0.1
PICTURE = "backtest.png"

Forecaster = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]  # (history, h) -> mean, lo, hi


def first_origin(n: int, horizon: int) -> int:
    """T = n - max(H, ceil(n / 10)): the first forecast origin."""
    return n - max(horizon, math.ceil(TEST_FRACTION * n))


def backtest(x: np.ndarray, horizon: int, forecaster: Forecaster, start: int) -> dict[str, np.ndarray]:
    """Forecasts from every origin o = start .. n-1: arrays over the (origin, h) pairs."""
    rows = {"origin": [], "h": [], "actual": [], "forecast": [], "lower": [], "upper": []}
    for o in range(start, len(x)):
        h = min(horizon, len(x) - o)
        mean, lower, upper = forecaster(x[:o], h)
        rows["origin"] += [o] * h
        rows["h"] += list(range(1, h + 1))
        rows["actual"] += list(x[o:o + h])
        rows["forecast"] += list(mean)
        rows["lower"] += list(lower)
        rows["upper"] += list(upper)
    return {k: np.asarray(v) for k, v in rows.items()}


def scores(x: np.ndarray, start: int, season: int, bt: dict[str, np.ndarray]) -> dict:
    """mae, rmse, mase, mase_seasonal and coverage of a back-test (see the module doc)."""
    e = bt["actual"] - bt["forecast"]
    mae = float(np.mean(np.abs(e)))
    train = x[:start]
    scale = float(np.mean(np.abs(np.diff(train))))
    seasonal = float(np.mean(np.abs(train[season:] - train[:-season]))) if 0 < season < len(train) else None
    inside = (bt["lower"] <= bt["actual"]) & (bt["actual"] <= bt["upper"])
    return {"mae": mae, "rmse": float(np.sqrt(np.mean(e ** 2))), "mase": mae / scale if scale > 0 else None,
            "mase_seasonal": mae / seasonal if seasonal else None, "coverage": float(np.mean(inside))}


def ljung_box_p(resid: np.ndarray, season: int, model_df: int) -> tuple[float | None, int]:
    """(p-value, lag) of the Ljung-Box test on residuals (statsmodels)."""
    from statsmodels.stats.diagnostic import acorr_ljungbox

    resid = np.asarray(resid, dtype=np.float64)
    lag = max(min(2 * season if season else 10, len(resid) // 5), model_df + 1)
    if lag >= len(resid) - 1:
        return None, lag
    table = acorr_ljungbox(resid, lags=[lag], model_df=model_df)
    return float(table["lb_pvalue"].iloc[0]), lag


def naive_forecaster(x_train: np.ndarray, level: float) -> Forecaster:
    s = float(np.std(np.diff(x_train)))
    z = normal_quantile(level)

    def forecast(history: np.ndarray, h: int):
        mean = np.full(h, history[-1])
        half = z * s * np.sqrt(np.arange(1, h + 1))
        return mean, mean - half, mean + half

    return forecast


def ar_forecaster(model: AR, x_train: np.ndarray, level: float) -> tuple[Forecaster, int]:
    """A refit at every origin, at the run's order (or the BIC order of x_train for order auto)."""
    p = model.order
    if model.config.order == 0:
        cap = min(model.config.max_order, (len(x_train) - 10) // 2)
        if cap < 1:
            raise UserError(f"{len(x_train)} values before the test window are too few to choose an order")
        p = AR(ARConfig(order=0, max_order=cap)).fit(x_train).order
    if len(x_train) < required_length(p):
        raise UserError(f"{len(x_train)} values before the test window are too few to refit AR({p}) "
                        f"(it needs {required_length(p)})")

    def forecast(history: np.ndarray, h: int):
        return AR(ARConfig(order=p)).fit(history, order=p).predict(h, level)

    return forecast, p


def backtest_png(series, start: int, bt: dict, resid: np.ndarray, by_h: list[float], level: float,
                 p_value: float | None, *, title: str) -> bytes:
    """Three panels: one-step forecasts and intervals over the test window; MAE by horizon; the
    autocorrelation of the saved model's residuals with the +-1.96/sqrt(N) band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(series.values)
    fig = Figure(figsize=(10, 7.5), dpi=100)
    FigureCanvasAgg(fig)
    top = fig.add_subplot(2, 1, 1)
    shown = max(start - 2 * (n - start), 0)
    top.plot(time_axis(series.time[shown:]), series.values[shown:], color="black", lw=1, label="series")
    one = bt["h"] == 1
    t_one = time_axis([series.time[o] for o in bt["origin"][one]])
    top.fill_between(t_one, bt["lower"][one], bt["upper"][one], color="tab:blue", alpha=0.25, lw=0,
                     label=f"{level:.0%} interval")
    top.plot(t_one, bt["forecast"][one], color="tab:blue", lw=1, label="one-step forecast")
    top.axvline(time_axis([series.time[start]])[0], color="gray", ls="--", lw=0.8)
    top.set_title(title)
    top.legend(loc="upper left", fontsize="small")
    top.grid(True, alpha=0.3)

    left = fig.add_subplot(2, 2, 3)
    left.bar(range(1, len(by_h) + 1), by_h, color="tab:blue")
    left.set_xlabel("horizon h")
    left.set_ylabel("MAE")
    left.set_title("error by horizon")
    left.grid(True, alpha=0.3)

    right = fig.add_subplot(2, 2, 4)
    r = np.asarray(resid, dtype=np.float64) - np.mean(resid)
    lags = np.arange(1, min(40, len(r) - 1) + 1)
    acf = np.array([np.dot(r[k:], r[:-k]) for k in lags]) / np.dot(r, r)
    right.bar(lags, acf, color="tab:gray", width=0.6)
    band = 1.96 / math.sqrt(len(r))
    right.axhspan(-band, band, color="tab:blue", alpha=0.15, lw=0)
    right.set_xlabel("lag")
    right.set_title("residual autocorrelation" + (f" (Ljung-Box p = {p_value:.3g})" if p_value is not None else ""))
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
