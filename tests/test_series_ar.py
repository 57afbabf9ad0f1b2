"""AR(p) against statsmodels: coefficients of a simulated AR(2), our forecast recursion and our
psi-weight intervals against statsmodels' own predictions (before and after a save/load round
trip), sample paths against the forecast and the interval, and the seeds' worked example."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.tsa.ar_model import AutoReg
from statsmodels.tsa.arima_process import arma2ma

from aigc.checkpoint import save_model_files, verify_manifest
from aigc.models.ar import AR, ARConfig, normal_quantile, required_length

PHI = (0.6, -0.3)
C = 2.0
SIGMA = 1.5


def simulate(n: int, phi=PHI, c=C, sigma=SIGMA, seed: int = 0, burn: int = 200) -> np.ndarray:
    """x_t = c + sum_i phi_i x_{t-i} + e_t, e_t ~ N(0, sigma^2), after a burn-in."""
    rng = np.random.default_rng(seed)
    x = np.zeros(n + burn)
    e = rng.normal(0.0, sigma, n + burn)
    for t in range(len(phi), n + burn):
        x[t] = c + sum(p * x[t - 1 - i] for i, p in enumerate(phi)) + e[t]
    return x[burn:]


@pytest.fixture(scope="module")
def series():
    return simulate(2000)


def test_the_seeds_worked_example():
    # AR(2), phi = (0.5, 0.3), history 100 then 110: 0.5 x 110 + 0.3 x 100 = 85, so 115 needs c = 30
    model = AR.from_coefficients([0.5, 0.3], c=30)
    assert model.forecast(1, history=[100, 110]).tolist() == [115.0]
    assert AR.from_coefficients([0.5, 0.3]).forecast(1, history=[100, 110]).tolist() == [85.0]
    # two steps: 30 + 0.5 x 115 + 0.3 x 110 = 120.5
    assert model.forecast(2, history=[100, 110]) == pytest.approx([115.0, 120.5])


def test_recovers_simulated_coefficients(series):
    model = AR(ARConfig(order=2)).fit(series)
    se = SIGMA / np.sqrt(len(series))  # rough standard error of each phi
    assert model.phi_ == pytest.approx(PHI, abs=5 * se)
    mean = C / (1 - sum(PHI))
    assert model.const_ / (1 - model.phi_.sum()) == pytest.approx(mean, abs=0.15)
    assert np.sqrt(model.sigma2_) == pytest.approx(SIGMA, rel=0.05)
    assert model.order == 2 and model.lags == [1, 2]


def test_order_auto_is_bic_over_contiguous_lags(series):
    model = AR(ARConfig(order=0, max_order=8)).fit(series)
    assert model.order == 2
    assert model.info_["selected_by"] == "bic"
    white = np.random.default_rng(0).normal(size=300)
    assert AR(ARConfig(order=0, max_order=5)).fit(white).order == 0  # nothing to model: the mean


@pytest.mark.parametrize("order", [1, 2, 5])
@pytest.mark.parametrize("level", [0.8, 0.95])
def test_forecasts_and_intervals_equal_statsmodels(series, order, level, tmp_path):
    x = series[:500]
    ours = AR(ARConfig(order=order)).fit(x)
    res = AutoReg(x, lags=order, trend="c").fit()
    prediction = res.get_prediction(start=len(x), end=len(x) + 29)
    want_mean = np.asarray(prediction.predicted_mean)
    want = np.asarray(prediction.conf_int(alpha=1 - level))
    np.testing.assert_allclose(ours.forecast(30), want_mean, rtol=1e-10, atol=1e-10)
    lower, upper = ours.interval(30, level)
    np.testing.assert_allclose(lower, want[:, 0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(upper, want[:, 1], rtol=1e-10, atol=1e-10)

    # a reloaded model needs no refit and gives the same numbers, bit for bit
    save_model_files(ours, tmp_path)
    verify_manifest(tmp_path)
    reloaded = AR.load(tmp_path)
    assert np.array_equal(reloaded.forecast(30), ours.forecast(30))
    assert all(np.array_equal(a, b) for a, b in zip(reloaded.interval(30, level), (lower, upper), strict=True))
    assert np.array_equal(reloaded.sample(5, horizon=7, seed=3), ours.sample(5, horizon=7, seed=3))
    assert np.array_equal(reloaded.sample(5, horizon=7, seed=3, noise="bootstrap"),
                          ours.sample(5, horizon=7, seed=3, noise="bootstrap"))


def test_psi_weights_are_statsmodels_ma_representation():
    phi = [0.5, 0.3, -0.2]
    model = AR.from_coefficients(phi, sigma=1.0)
    want = arma2ma(np.r_[1, -np.asarray(phi)], np.array([1.0]), lags=25)
    np.testing.assert_allclose(model.psi(25), want, rtol=1e-12, atol=1e-12)


def test_from_coefficients_forecasts_from_a_given_history():
    model = AR.from_coefficients([0.5, 0.3], c=30, sigma=2.0, history=[100, 110])
    assert model.forecast(1).tolist() == [115.0]
    lower, upper = model.interval(1, 0.95)
    assert upper[0] - 115 == pytest.approx(normal_quantile(0.95) * 2.0)
    with pytest.raises(ValueError, match="sigma"):
        AR.from_coefficients([0.5]).interval(3, history=[1.0])
    with pytest.raises(ValueError, match="bootstrap"):
        model.sample(2, horizon=2, seed=0, noise="bootstrap")
    with pytest.raises(ValueError, match="past values"):
        model.forecast(2, history=[1.0])


@pytest.mark.parametrize("noise", ["gaussian", "bootstrap"])
def test_sample_paths_have_the_forecasts_mean_and_the_intervals_spread(series, noise):
    model = AR(ARConfig(order=2)).fit(series[:1000])
    horizon, k = 12, 20_000
    paths = model.sample(k, horizon=horizon, seed=0, noise=noise)
    assert paths.shape == (k, horizon)
    std = model.forecast_std(horizon)
    # the mean of k paths is within 4 standard errors of the point forecast
    assert np.all(np.abs(paths.mean(0) - model.forecast(horizon)) < 4 * std / np.sqrt(k))
    # the spread is the psi-weight standard deviation, and 90% of the paths fall in the 90% interval
    np.testing.assert_allclose(paths.std(0), std, rtol=0.03)
    lower, upper = model.interval(horizon, 0.9)
    inside = ((paths >= lower) & (paths <= upper)).mean(0)
    assert np.all(np.abs(inside - 0.9) < 4 * np.sqrt(0.9 * 0.1 / k))


def test_sampling_is_seeded():
    model = AR.from_coefficients([0.9], c=1.0, sigma=1.0, history=[10.0])
    first = model.sample(3, horizon=5, seed=7)
    assert np.array_equal(first, model.sample(3, horizon=5, seed=7))
    assert not np.array_equal(first, model.sample(3, horizon=5, seed=8))
    with pytest.raises(ValueError, match="noise"):
        model.sample(3, horizon=5, seed=7, noise="laplace")
    with pytest.raises(ValueError, match="horizon"):
        model.forecast(0)


def test_too_short_for_the_order_is_a_clear_error():
    x = simulate(25)
    assert required_length(8) == 26
    with pytest.raises(ValueError, match="order 8 needs at least 26"):
        AR(ARConfig(order=8)).fit(x)
    with pytest.raises(ValueError, match="max_order 24 needs at least 58"):
        AR(ARConfig(order=0)).fit(x)
