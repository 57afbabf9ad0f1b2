"""The series modality: fit AR(p) or train the recurrent series model, then forecast from the end of the
series with prediction intervals and generate sample paths (`save`: forecast.csv and a fan chart); scored
by a rolling-origin back-test against the naive forecast.

The run directory follows the other runs (docs/runs.md) with, in addition, `series.json`: the values and
time labels the model was fitted on, after missing values were handled, checked against the sha256 in
run.json. AR runs hold `ar.json` + `ar.safetensors`; rnn runs `series_rnn.json` + `series_rnn.safetensors`,
`metrics.jsonl` and `checkpoints/last/`. See docs/series.md.
"""

from __future__ import annotations

import csv
import io
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aigc import __version__
from aigc.checkpoint import find_checkpoint, save_model_files
from aigc.config import build, read_toml, to_toml
from aigc.data.series import NAMED_SERIES, Series, SeriesDataConfig, future_time, is_series_data, load_series, time_axis
from aigc.distributed import on_main
from aigc.errors import BadRequest, UserError
from aigc.evaluate.series import (
    PICTURE,
    ar_forecaster,
    backtest,
    backtest_png,
    first_origin,
    ljung_box_p,
    naive_forecaster,
    scores,
)
from aigc.fsutil import atomic_write_bytes, atomic_write_text, read_json, write_json
from aigc.modalities.base import Generation, Prepared, finished_run
from aigc.models import FAMILIES, Family
from aigc.models.rnn_series import NOISES, modelled
from aigc.store import card_header, find_run
from aigc.train import Budget, train_loop

NAME = "series"
BATCHES = False
GENERATE_OPTIONS = ("horizon", "paths", "level", "noise")
EVALUATE_OPTIONS = ("horizon", "level")  # `aigc eval` options beyond the run
GENERATE_DEFAULTS = {"paths": 0, "level": 0.95, "noise": "gaussian"}
MAX_HORIZON = 1000  # `--horizon` cap
MAX_PATHS = 1000  # `--paths` cap
VAL_FRACTION = 0.1  # rnn: the end of the modelled sequence, held out to keep the best weights
FAN_LEVELS = (0.5, 0.8)  # bands drawn inside the --level band of the fan chart
SERIES_FILE = "series.json"

# CLI flag -> config key, and which flags need which family
TRAIN_FLAGS = {"order": "order", "max_order": "max_order", "column": "column", "time_column": "time_column",
               "freq": "freq", "fill": "fill"}
AR_FLAGS = ("order", "max_order")


def series_family(name: str) -> Family:
    """The family as it takes a numeric series: a series family, or a family's declared series variant."""
    fam = FAMILIES[name]
    if fam.modality == NAME:
        return fam
    if fam.series is None:
        raise BadRequest(f"family {name} does not take a numeric series (series families: "
                         f"{', '.join(series_families())})")
    return fam.series


def series_families() -> list[str]:
    return [k for k, f in FAMILIES.items() if f.modality == NAME or f.series is not None]


def series_sets(family: str, data: str, flags: dict) -> dict[str, str]:
    """The `aigc train` series flags given (`--order auto`, `--column x`, ...) as configuration keys;
    a flag that does not apply to the family or the data is an error."""
    fam = FAMILIES[family]
    sets = {}
    for flag, value in flags.items():
        name = "--" + flag.replace("_", "-")
        if flag in AR_FLAGS and not (fam.modality == NAME and fam.trainer == "fit"):
            raise BadRequest(f"{name} applies to the ar family, not {family}")
        if not is_series_data(data):
            raise BadRequest(f"{name} applies to series data (a named series: {', '.join(NAMED_SERIES)}; or a "
                             f".csv file), not {data}")
        if flag == "order":
            if value != "auto" and not value.isdigit():
                raise BadRequest(f"--order must be a positive integer or auto, got {value!r}")
            if value.isdigit() and int(value) < 1:
                raise BadRequest("--order must be >= 1 (or auto)")
            value = "0" if value == "auto" else value
        sets[TRAIN_FLAGS[flag]] = str(value)
    if "max_order" in sets and sets.get("order", "0") != "0":
        raise BadRequest("--max-order applies to --order auto")
    return sets


# ----------------------------------------------------------------------------------
# training


def sections(fam: Family) -> dict[str, type]:
    out = {"model": fam.config, "data": SeriesDataConfig}
    if fam.trainer == "gradient":
        out["train"] = fam.train_config
    return out


def source_of(data: str) -> str:
    return data if data in NAMED_SERIES else str(Path(data).expanduser().resolve())


def check_request(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None) -> None:
    if not is_series_data(data):
        raise BadRequest(f"the {family} family fits a numeric series: give a named series "
                         f"({', '.join(NAMED_SERIES)}) or a .csv file, not {data}")
    if val_data:
        raise BadRequest("--val-data does not apply to series: eval back-tests on the end of the series")


def prepare(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None, configs: dict,
            values: dict) -> Prepared:
    series = load_series(data, configs["data"])
    if configs["data"].season and configs["data"].season >= len(series.values):
        raise BadRequest(f"season {configs['data'].season} is not shorter than the series "
                         f"({len(series.values)} values)")
    t0 = time.perf_counter()
    model = None
    if fam.trainer == "fit":
        try:
            model = fam.build(configs["model"]).fit(series.values)
        except ValueError as e:
            raise BadRequest(f"{data}: {e}") from None
    else:
        rnn_split(series.values, configs)
    fit_time = time.perf_counter() - t0

    def write_files(staging: Path) -> None:
        write_series(staging, series)

    return Prepared(model, {"data": {"train": series.describe()}}, {"series": series, "fit_time": fit_time},
                    write_files)


def reload(family: str, fam: Family, run_dir: Path, record: dict, configs: dict) -> Prepared:
    series = read_series(run_dir, record)
    model = fam.load(on_main(find_checkpoint, run_dir))  # the main process tidies an interrupted save
    return Prepared(model, record, {"series": series, "fit_time": 0.0})


def fit(fam: Family, prepared: Prepared, configs: dict, run_dir: Path, budget, resume: bool) -> dict:
    model = prepared.model
    if fam.trainer == "fit":
        on_main(save_model_files, model, run_dir)
        return {"order": model.order, "lags": model.lags, "const": model.const_, "phi": model.phi_.tolist(),
                "sigma": float(np.sqrt(model.sigma2_)), "bic": model.info_["bic"], "aic": model.info_["aic"],
                "n_obs": model.info_["nobs"],
                "max_order": configs["model"].max_order if configs["model"].order == 0 else None,
                "train_time_s": prepared.state["fit_time"]}
    _, result = fit_rnn(fam, configs, prepared.state["series"].values, run_dir, budget, model=model, resume=resume)
    return result


def finish(family: str, fam: Family, prepared: Prepared, configs: dict, run_dir: Path, fit: dict) -> dict:
    if fam.trainer == "fit":
        return fit
    return {"val_loss": fit["best_val_loss_periodic"], **{k: fit[k] for k in (
        "steps", "train_time_s", "train_loss", "best_step", "values_per_s", "schedule_steps")}}


def rnn_split(x: np.ndarray, configs: dict) -> tuple[np.ndarray, int]:
    """(y, cut): the modelled sequence and where its validation part starts; too short is an error."""
    block = configs["train"].block_size
    y = modelled(x, configs["model"].difference)
    cut = len(y) - max(1, round(VAL_FRACTION * len(y)))
    if cut < block + 2:
        raise BadRequest(f"the series leaves {cut} values for training (the last {VAL_FRACTION:.0%} validates); "
                         f"block_size {block} needs at least {block + 2} (lower it with --set block_size=N)")
    if np.ptp(y[:cut]) == 0:
        raise BadRequest("the training part of the modelled series is constant"
                         + (" (its changes are all equal): set difference=false" if configs["model"].difference
                            else ""))
    return y, cut


class SeriesBatches:
    """Training batches for a series: random windows of L standardised values (inputs z_t, targets
    z_{t+1}, every step scored); validation: one window per held-out value, scoring only its last
    step, so the validation loss is the one-step NLL with a full window of context (train.Batches)."""

    unit = "values"

    def __init__(self, z_train: np.ndarray, z_val: np.ndarray, block_size: int):
        self.train = torch.as_tensor(np.asarray(z_train), dtype=torch.float32)
        self.val = torch.as_tensor(np.asarray(z_val), dtype=torch.float32)  # L values of context, then targets
        self.block_size = self.items_per_sample = block_size

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        L = self.block_size
        starts = torch.randint(0, len(self.train) - L, (n,), generator=generator)
        chunk = self.train[starts[:, None] + torch.arange(L + 1)[None, :]]  # (B, L + 1)
        return chunk[:, :-1], chunk[:, 1:], torch.ones(n, L)

    def val_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        windows = self.val.unfold(0, self.block_size + 1, 1)  # (n_val, L + 1)
        pick = torch.linspace(0, len(windows) - 1, min(len(windows), n_batches * batch)).round().long().unique()
        windows = windows[pick]
        weights = torch.zeros(len(windows), self.block_size)
        weights[:, -1] = 1.0
        return [(windows[i:i + batch, :-1], windows[i:i + batch, 1:], weights[i:i + batch])
                for i in range(0, len(windows), batch)]

    def noise(self, model, n: int, device: torch.device) -> None:
        return None  # the loss draws no noise

    def loss(self, model, batch: tuple[torch.Tensor, ...], *, phase: str | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return model(*batch)["loss"]  # forward, not a method: a DDP-wrapped model syncs gradients in forward

    def val_metrics(self, val_loss: float) -> dict:
        return {}


def fit_rnn(fam: Family, configs: dict, x: np.ndarray, work_dir: Path, budget, *, model=None,
            resume: bool = False):
    """Train the recurrent series model on x with the shared loop (best weights end in work_dir),
    store the standardised one-step residuals of the training part in it; (model, loop metrics)."""
    y, cut = rnn_split(x, configs)
    block = configs["train"].block_size
    if model is None:
        torch.manual_seed(configs["train"].seed)  # the initial weights depend on the seed alone
        model = fam.build(configs["model"], context=block, loc=float(y[:cut].mean()), scale=float(y[:cut].std()),
                          history=x)
    z = model.standardise(y)
    batches = SeriesBatches(z[:cut], z[cut - block:], block)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    result = train_loop(model, batches, configs["train"], work_dir, budget, resume=resume, cpu_bf16=fam.cpu_bf16,
                        compile_gain=fam.compile_gain)

    def keep_best():  # several processes: the main process writes, every process returns the model
        best = fam.load(work_dir)
        best.resid = best.residuals(z[:cut])
        save_model_files(best, work_dir)
        return best

    return on_main(keep_best), result


def card(run_dir: Path, record: dict, configs: dict) -> str:
    m, d = record["metrics"], record["data"]["train"]
    if series_family(record["family"]).trainer == "fit":
        result = [f"- order p = {m['order']} (lags {m['lags']}), c = {m['const']:.6g}, sigma = {m['sigma']:.6g}",
                  f"- phi = {[round(v, 6) for v in m['phi']]}", f"- BIC {m['bic']:.2f} on {m['n_obs']} equations"]
    else:
        result = [f"- one-step validation NLL: {m['val_loss']:.4f} nats per standardised value",
                  f"- steps: {m['steps']}, training time: {m['train_time_s']:.0f} s"]
    lines = [*card_header(record, "time-series-forecasting"), f"# {Path(run_dir).name}", "",
             f"A `{record['family']}` series model fitted by AIGC Studio {__version__} on `{d['source']}` "
             f"(column `{d['column']}`, {d['values']} values from {d['start']} to {d['end']}, frequency "
             f"{d['freq'] or 'none: consecutive rows'}, missing values: {d['missing']}, fill: {d['fill']}).", "",
             "## Fit", "", *result, "", "## Configuration", "", "```toml", to_toml(configs).strip(), "```", "",
             "## Use", "", "```", f"aigc generate {run_dir} --horizon 12 --paths 5", f"aigc eval {run_dir}", "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# the series a run was fitted on


def write_series(run_dir: Path, series: Series) -> None:
    write_json(Path(run_dir) / SERIES_FILE, {**series.describe(), "time": series.time,
                                             "values": series.values.tolist()})


def read_series(run_dir: Path, record: dict) -> Series:
    """The series stored in the run, checked against the sha256 in run.json."""
    path = Path(run_dir) / SERIES_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: {SERIES_FILE} is missing")
    d = read_json(path)
    series = Series(d["source"], d["column"], np.asarray(d["values"], dtype=np.float64), d["time"], d["freq"],
                    d["season"], d["fill"], d["missing"], d["dropped"])
    if series.sha256 != record["data"]["train"]["sha256"]:
        raise UserError(f"{run_dir}: {SERIES_FILE} does not match the sha256 recorded in run.json")
    return series


class LoadedSeries:
    """A finished series run: its model and the series it was fitted on, its files verified."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir)
        self.record = finished_run(self.path, NAME)
        self.model = series_family(self.record["family"]).load(self.path)
        self.series = read_series(self.path, self.record)


def load(spec: str) -> LoadedSeries:
    return LoadedSeries(find_run(spec))


# ----------------------------------------------------------------------------------
# generation


def check_generate(horizon: int, paths: int, level: float, noise: str, seed: int) -> None:
    if not 1 <= horizon <= MAX_HORIZON:
        raise BadRequest(f"--horizon must be in 1..{MAX_HORIZON}, got {horizon}")
    if not 0 <= paths <= MAX_PATHS:
        raise BadRequest(f"--paths must be in 0..{MAX_PATHS}, got {paths}")
    if not 0 < level < 1:
        raise BadRequest(f"--level must be in (0, 1), e.g. 0.95; got {level}")
    if noise not in NOISES:
        raise BadRequest(f"--noise must be one of {', '.join(NOISES)}, got {noise!r}")
    if seed < 0:
        raise BadRequest(f"--seed must be >= 0, got {seed}")


def generate(loaded: LoadedSeries, options: dict, seed: int, stream: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None, *, batched: bool = False) -> Generation:
    """The point forecast from the end of the series, its level interval, nested bands for the fan chart, and
    `paths` generated continuations (their own seeded generator)."""
    options = {**GENERATE_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if "horizon" not in options:
        raise BadRequest(f"series runs need --horizon H (1..{MAX_HORIZON}), the number of steps to forecast")
    horizon, paths, level, noise = options["horizon"], options["paths"], options["level"], options["noise"]
    check_generate(horizon, paths, level, noise, seed)
    model, series, record = loaded.model, loaded.series, loaded.record
    t0 = time.perf_counter()
    mean, lower, upper = model.predict(horizon, level)
    sampled = None
    if paths:
        try:
            sampled = model.sample(paths, horizon=horizon, seed=seed, noise=noise)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    seconds = time.perf_counter() - t0
    future = future_time(series.time[-1], series.freq, horizon)
    result = {"run": str(loaded.path), "time": future, "forecast": mean.tolist(), "lower": lower.tolist(),
              "upper": upper.tolist(), "level": level}
    if sampled is not None:
        result["paths"] = sampled.tolist()
    bands = {q: model.predict(horizon, q)[1:] for q in FAN_LEVELS if q < level}
    bands[level] = (lower, upper)
    settings = {"horizon": horizon, "paths": paths, "level": level, "noise": noise, "seed": seed,
                "family": record["family"]}
    return Generation(NAME, result, {"run": str(loaded.path), "settings": settings, "seconds": seconds},
                      extra={"bands": bands, "sampled": sampled, "mean": mean, "series": series,
                             "title": f"{loaded.path.name}: {record['family']} on {series.source}"})


def save(generation: Generation, out_dir: Path) -> list[str]:
    """forecast.csv (time, forecast, interval, one column per path) and fan_chart.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result, extra = generation.outputs, generation.extra
    csv_path, png_path = out_dir / "forecast.csv", out_dir / "fan_chart.png"
    _write_csv(csv_path, result["time"], extra["mean"], result["lower"], result["upper"], extra["sampled"])
    atomic_write_bytes(png_path, fan_chart_png(extra["series"], result["time"], extra["mean"], extra["bands"],
                                               extra["sampled"], title=extra["title"]))
    return [str(csv_path), str(png_path)]


def _write_csv(path: Path, future: list, mean, lower, upper, sampled) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    n_paths = 0 if sampled is None else len(sampled)
    writer.writerow(["time", "forecast", "lower", "upper", *[f"path_{k + 1}" for k in range(n_paths)]])
    for h, t in enumerate(future):
        row = [t, repr(float(mean[h])), repr(float(lower[h])), repr(float(upper[h]))]
        writer.writerow(row + ([] if sampled is None else [repr(float(v)) for v in sampled[:, h]]))
    atomic_write_text(path, buf.getvalue())


def fan_chart_png(series: Series, future: list, mean: np.ndarray, bands: dict, sampled: np.ndarray | None, *,
                  title: str) -> bytes:
    """The end of the history, the forecast, nested interval bands (widest palest) and up to ten paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    horizon = len(future)
    shown = min(len(series.values), max(4 * horizon, 120))
    fig = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x_hist, x_future = time_axis(series.time[-shown:]), time_axis(future)
    ax.plot(x_hist, series.values[-shown:], color="black", lw=1, label="history")
    for q in sorted(bands, reverse=True):
        lo, hi = bands[q]
        ax.fill_between(x_future, lo, hi, color="tab:blue", alpha=0.15 + 0.2 * (1 - q), lw=0,
                        label=f"{q:.0%} interval")
    if sampled is not None:
        for k, path in enumerate(sampled[:10]):
            ax.plot(x_future, path, color="tab:orange", lw=0.6, alpha=0.7,
                    label="sample paths" if k == 0 else None)
    # the forecast line starts at the last observation, so it visibly continues the history
    ax.plot([x_hist[-1], *x_future], [series.values[-1], *mean], color="tab:blue", lw=1.5, label="forecast")
    ax.set_title(title)
    ax.set_ylabel(series.column)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------------
# evaluation


def evaluate(run_dir: Path, record: dict, options: dict) -> dict:
    """Back-test the run (evaluate/series.py has the method), score it and the naive reference, write
    eval.json and backtest.png."""
    if options.get("n") is not None:
        raise BadRequest("-n does not apply to series runs")
    horizon = 1 if options.get("horizon") is None else options["horizon"]
    level = 0.95 if options.get("level") is None else options["level"]
    if not 1 <= horizon <= MAX_HORIZON:
        raise BadRequest(f"--horizon must be in 1..{MAX_HORIZON}, got {horizon}")
    if not 0 < level < 1:
        raise BadRequest(f"--level must be in (0, 1), e.g. 0.95; got {level}")
    loaded = LoadedSeries(run_dir)
    model, series = loaded.model, loaded.series
    x, family = series.values, record["family"]
    fam = series_family(family)
    start = first_origin(len(x), horizon)
    if start < 10:
        raise BadRequest(f"{len(x)} values are too few to back-test at horizon {horizon}")

    # 1. the forecasters, fitted on what precedes the first origin
    if fam.trainer == "fit":
        forecaster, order = ar_forecaster(model, x[:start], level)
        refit, model_df, resid = f"at every origin, AR({order})", model.order, model.resid_
    else:
        configs = build(sections(fam), read_toml(run_dir / "config.toml"), family=family)
        steps = record.get("metrics", {}).get("steps")
        if not steps:
            raise BadRequest(f"run {run_dir.name!r} records no training steps to repeat")
        with tempfile.TemporaryDirectory(prefix=".backtest-", dir=run_dir) as work:
            refitted, _ = fit_rnn(fam, configs, x[:start], Path(work), Budget(steps, None))

        def forecaster(history: np.ndarray, h: int):
            return refitted.predict(h, level, history=history)

        refit, model_df, resid = f"once, on the values before the first origin ({steps} steps)", 0, model.resid

    # 2. back-tests of the model and of the naive reference on the same origins
    bt = backtest(x, horizon, forecaster, start)
    naive_bt = backtest(x, horizon, naive_forecaster(x[:start], level), start)
    metrics = scores(x, start, series.season, bt)
    p_value, lag = ljung_box_p(resid, series.season, model_df)
    metrics["ljung_box_p"] = p_value
    by_h = [float(np.mean(np.abs(bt["actual"][bt["h"] == h] - bt["forecast"][bt["h"] == h])))
            for h in range(1, horizon + 1)]
    result = {
        "run": str(run_dir), "metrics": metrics,
        "naive": scores(x, start, series.season, naive_bt),
        "backtest": {"horizon": horizon, "level": level, "first_origin": series.time[start], "origins": len(x) - start,
                     "forecasts": len(bt["h"]), "season": series.season, "refit": refit, "ljung_box_lag": lag},
        "mae_by_horizon": by_h,
        "picture": str(run_dir / PICTURE),
    }
    atomic_write_bytes(run_dir / PICTURE, backtest_png(series, start, bt, resid, by_h, level, p_value,
                                                      title=f"{run_dir.name}: {family} on {series.source}"))
    write_json(run_dir / "eval.json", result)
    return result
