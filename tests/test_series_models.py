"""The series contract over every family that takes a series (ar, and rnn through its declared
series variant): fit, forecasts with intervals, seeded sample paths, save/load round trip; plus
the recurrent model's Gaussian likelihood, its exact one-step forecast and its Monte Carlo beyond,
and the rolling-origin back-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc.checkpoint import save_model_files, verify_manifest
from aigc.config import build
from aigc.evaluate.series import backtest, first_origin, ljung_box_p, naive_forecaster, scores
from aigc.modalities.series import SeriesBatches, fit_rnn, series_families, series_family
from aigc.models import FAMILIES
from aigc.models.ar import normal_quantile
from aigc.models.rnn_series import SeriesRNN, SeriesRNNConfig, modelled
from aigc.service import sections_for
from aigc.train import Budget
from test_series_ar import simulate

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SERIES = {"rnn": {"n_hidden": "8", "block_size": "8", "batch_size": "8", "warmup_steps": "2",
                       "eval_interval": "10", "eval_batches": "2", "log_interval": "5", "dtype": "fp32"},
               "ar": {"max_order": "6"}}


def test_series_families_are_declared():
    assert series_families() == ["rnn", "ar"]
    assert FAMILIES["rnn"].modality == "text" and FAMILIES["rnn"].series.modality == "series"
    assert set(TINY_SERIES) == set(series_families())
    assert list(sections_for("ar")) == ["model", "data"]  # a closed-form fit: no [train]
    assert list(sections_for("rnn", "series")) == ["model", "data", "train"]


def fitted(family: str, x: np.ndarray, tmp_path):
    configs = build(sections_for(family, "series"), TINY_SERIES[family], family=family)
    fam = series_family(family)
    if fam.trainer == "fit":
        return fam.build(configs["model"]).fit(x)
    model, _ = fit_rnn(fam, configs, x, tmp_path / "fit", Budget(20, None))
    return model


@pytest.mark.parametrize("family", list(TINY_SERIES))
def test_series_contract(family, tmp_path):
    x = simulate(300)
    model = fitted(family, x, tmp_path)

    # 1. forecasts and intervals from the end of the series: finite, ordered, widening with h
    mean, lower, upper = model.predict(6, 0.9)
    assert mean.shape == lower.shape == upper.shape == (6,)
    assert np.isfinite(mean).all() and (lower < mean).all() and (mean < upper).all()
    assert upper[-1] - lower[-1] > upper[0] - lower[0]
    assert np.array_equal(model.forecast(6), model.predict(6)[0])

    # 2. seeded sample paths are reproducible, and the seed matters
    for noise in ("gaussian", "bootstrap"):
        first = model.sample(4, horizon=5, seed=3, noise=noise)
        assert first.shape == (4, 5) and np.isfinite(first).all()
        assert np.array_equal(first, model.sample(4, horizon=5, seed=3, noise=noise))
        assert not np.array_equal(first, model.sample(4, horizon=5, seed=4, noise=noise))

    # 3. save/load round trip: identical forecasts, intervals and paths
    out = tmp_path / "saved"
    out.mkdir()
    save_model_files(model, out)
    verify_manifest(out)
    reloaded = series_family(family).load(out)
    for a, b in zip(reloaded.predict(6, 0.9), (mean, lower, upper), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(reloaded.sample(4, horizon=5, seed=3), model.sample(4, horizon=5, seed=3))

    # 4. a history argument forecasts from elsewhere than the end
    assert not np.array_equal(model.forecast(3, history=x[:200]), model.forecast(3))


def test_gaussian_nll_and_gradients():
    torch.manual_seed(0)
    model = SeriesRNN(SeriesRNNConfig(cell="lstm", n_hidden=8), context=8, loc=0.0, scale=1.0)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    w = torch.zeros(3, 8)
    w[:, -1] = 1
    out = model(x, y, w)
    mu, var = out["mean"][:, -1], out["log_var"][:, -1].exp()
    want = torch.nn.functional.gaussian_nll_loss(mu, y[:, -1], var, full=True)
    torch.testing.assert_close(out["loss"], want)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_rnn_one_step_is_exact_and_beyond_is_the_mean_of_its_paths(tmp_path):
    x = simulate(300)
    model = fitted("rnn", x, tmp_path)
    # one step: x_n + loc + scale mu, +- z scale sigma, from the network's own output
    z = torch.as_tensor(model.standardise(modelled(x, True))[-model.context:], dtype=torch.float32)[None]
    with torch.no_grad():
        out = model(z, z, torch.ones_like(z))
    mu, sigma = out["mean"][0, -1].item(), math.exp(0.5 * out["log_var"][0, -1].item())
    mean, lower, upper = model.predict(1, 0.95)
    assert mean[0] == pytest.approx(x[-1] + model.loc + model.scale * mu, rel=1e-6)
    assert upper[0] - mean[0] == pytest.approx(normal_quantile(0.95) * model.scale * sigma, rel=1e-6)
    # beyond one step: the mean of gaussian paths (here many more, at another seed)
    paths = model.sample(20_000, horizon=4, seed=11)
    mean4 = model.forecast(4)
    assert np.all(np.abs(paths.mean(0) - mean4)[1:] < 5 * paths.std(0)[1:] / math.sqrt(1000))
    assert np.abs(paths[:, 0].mean() - mean4[0]) < 5 * paths[:, 0].std() / math.sqrt(20_000)


def test_series_batches():
    z = np.arange(50, dtype=float)
    batches = SeriesBatches(z[:40], z[40 - 8:], 8)
    x, y, w = batches.sample(torch.Generator().manual_seed(0), 5)
    assert x.shape == y.shape == w.shape == (5, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert y.max() <= 39  # training windows never reach the validation part
    val = batches.val_batches(2, 4)
    targets = torch.cat([b[1][:, -1] for b in val])
    assert len(targets) == 8 and set(targets.tolist()) <= set(range(40, 50))  # evenly spaced held-out values
    assert targets.min() == 40 and targets.max() == 49
    assert all(torch.equal(b[2].sum(1), torch.ones(len(b[2]))) for b in val)  # one scored step per window


def test_backtest_scores_against_hand_computation():
    x = np.array([1.0, 3, 2, 5, 4, 6, 5, 8, 7, 9, 8, 11])
    start = first_origin(len(x), 2)
    assert start == 10  # the last max(2, ceil(1.2)) values
    bt = backtest(x, 2, naive_forecaster(x[:start], 0.95), start)
    assert bt["origin"].tolist() == [10, 10, 11] and bt["h"].tolist() == [1, 2, 1]
    assert bt["forecast"].tolist() == [9.0, 9.0, 8.0]
    s = scores(x, start, 2, bt)
    mae = (1 + 2 + 3) / 3
    assert s["mae"] == pytest.approx(mae)
    assert s["rmse"] == pytest.approx(math.sqrt((1 + 4 + 9) / 3))
    assert s["mase"] == pytest.approx(mae / np.mean(np.abs(np.diff(x[:10]))))
    assert s["mase_seasonal"] == pytest.approx(mae / np.mean(np.abs(x[2:10] - x[:8])))
    assert scores(x, start, 0, bt)["mase_seasonal"] is None


def test_ljung_box_matches_statsmodels():
    from statsmodels.stats.diagnostic import acorr_ljungbox

    r = np.random.default_rng(0).normal(size=200)
    p, lag = ljung_box_p(r, 0, 2)
    assert lag == 10
    assert p == pytest.approx(acorr_ljungbox(r, lags=[10], model_df=2)["lb_pvalue"].iloc[0])
    assert ljung_box_p(r, 12, 0)[1] == 24
