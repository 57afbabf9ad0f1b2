"""Series runs: fit AR(p) or train the recurrent series model, then forecast from the end of the
series with prediction intervals and generate sample paths (JSON, CSV and a fan chart).

The run directory follows the other runs (docs/runs.md) with, in addition, `series.json`: the
values and time labels the model was fitted on, after missing values were handled, checked
against the sha256 in run.json. AR runs hold `ar.json` + `ar.safetensors`; rnn runs
`series_rnn.json` + `series_rnn.safetensors`, `metrics.jsonl` and `checkpoints/last/`. See
docs/series.md.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import torch

from aigc import __version__, store
from aigc.checkpoint import find_checkpoint, save_model_files, verify_manifest
from aigc.config import build, read_toml, to_toml
from aigc.data.series import NAMED_SERIES, Series, future_time, is_series_data, load_series
from aigc.distributed import on_main
from aigc.errors import UserError
from aigc.fsutil import atomic_write_bytes, atomic_write_text, read_json, write_json
from aigc.models import FAMILIES, Family
from aigc.models.rnn_series import NOISES, modelled

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
    from aigc.runs import family_of

    fam = family_of(name)
    if fam.modality == "series":
        return fam
    if fam.series is None:
        raise UserError(f"family {name} does not take a numeric series (series families: "
                        f"{', '.join(series_families())})")
    return fam.series


def series_families() -> list[str]:
    return [k for k, f in FAMILIES.items() if f.modality == "series" or f.series is not None]


def series_sets(family: str, data: str, flags: dict) -> dict[str, str]:
    """The `aigc train` series flags given (`--order auto`, `--column x`, ...) as configuration keys;
    a flag that does not apply to the family or the data is an error."""
    from aigc.runs import family_of

    fam = family_of(family)
    sets = {}
    for flag, value in flags.items():
        name = "--" + flag.replace("_", "-")
        if flag in AR_FLAGS and not (fam.modality == "series" and fam.trainer == "fit"):
            raise UserError(f"{name} applies to the ar family, not {family}")
        if not is_series_data(data):
            raise UserError(f"{name} applies to series data (a named series: {', '.join(NAMED_SERIES)}; or a "
                            f".csv file), not {data}")
        if flag == "order":
            if value != "auto" and not value.isdigit():
                raise UserError(f"--order must be a positive integer or auto, got {value!r}")
            if value.isdigit() and int(value) < 1:
                raise UserError("--order must be >= 1 (or auto)")
            value = "0" if value == "auto" else value
        sets[TRAIN_FLAGS[flag]] = str(value)
    if "max_order" in sets and sets.get("order", "0") != "0":
        raise UserError("--max-order applies to --order auto")
    return sets


# ----------------------------------------------------------------------------------
# training


def train_series(family: str, data: str, *, val_data: str | None, name: str | None, overwrite: bool, resume: bool,
                 max_steps: int | None, max_minutes: float | None, config_file: str | None, sets: dict[str, str],
                 header: dict) -> tuple[Path, dict]:
    from aigc import runs

    fam = series_family(family)
    if not is_series_data(data):
        raise UserError(f"the {family} family fits a numeric series: give a named series "
                        f"({', '.join(NAMED_SERIES)}) or a .csv file, not {data}")
    if val_data:
        raise UserError("--val-data does not apply to series: eval back-tests on the end of the series")
    if fam.trainer != "gradient" and (max_steps is not None or max_minutes is not None or resume):
        raise UserError(f"--max-steps, --max-minutes and --resume apply to gradient-trained families; {family} "
                        f"is fitted in closed form")
    budget_minutes = max_minutes if (max_minutes or max_steps) else runs.DEFAULT_MAX_MINUTES
    if resume:
        run_dir = store.runs_dir() / name
        if not (run_dir / "run.json").is_file():
            raise UserError(f"--resume: no run named {name!r} in {store.runs_dir()}")
        if sets or config_file:
            raise UserError("--resume continues with the run's recorded configuration and data; drop --set/--config "
                            "and the series flags (--column, --fill, ...)")
        record = store.read_run(run_dir)
        if record["family"] != family or record.get("modality") != "series":
            raise UserError(f"run {name!r} is a {record['family']} {record.get('modality')} run, not a {family} "
                            f"series run")
        source = data if data in NAMED_SERIES else str(Path(data).expanduser().resolve())
        if record["data"]["train"]["source"] != source:
            raise UserError(f"run {name!r} was trained on {record['data']['train']['source']}, not {data}")
        configs = build(runs.sections_for(family, "series"), read_toml(run_dir / "config.toml"), family=family)
        series = read_series(run_dir, record)
        model = fam.load(on_main(find_checkpoint, run_dir))  # the main process tidies an interrupted save
    else:
        values = dict(read_toml(Path(config_file))) if config_file else {}
        values.update(sets)
        configs = build(runs.sections_for(family, "series"), values, family=family)
        # several processes: one name for all, the main process alone writes the run (docs/runs.md)
        final_dir = on_main(store.claim_run_dir, family, data, name, overwrite)
        series = load_series(data, configs["data"])
        if configs["data"].season and configs["data"].season >= len(series.values):
            raise UserError(f"season {configs['data'].season} is not shorter than the series "
                            f"({len(series.values)} values)")
        # everything that can fail on the user's input happens before the run directory is made
        t0 = time.perf_counter()
        if fam.trainer == "fit":
            try:
                model = fam.build(configs["model"]).fit(series.values)
            except ValueError as e:
                raise UserError(f"{data}: {e}") from None
        else:
            rnn_split(series.values, configs)
            model = None
        fit_time = time.perf_counter() - t0
        record = {"family": family, "modality": "series", "created": store.now(), "aigc_version": __version__,
                  "data": {"train": series.describe()}}

        def write_files(staging: Path) -> None:
            write_json(staging / "run.json", record)
            atomic_write_text(staging / "config.toml", to_toml(configs, header))
            write_series(staging, series)

        run_dir = on_main(store.commit_run_dir, final_dir, write_files)

    record["budget"] = {"max_steps": max_steps, "max_minutes": budget_minutes if fam.trainer == "gradient" else None}
    record["status"] = "running"
    on_main(write_json, run_dir / "run.json", record)
    if fam.trainer == "fit":
        on_main(save_model_files, model, run_dir)
        metrics = {"order": model.order, "lags": model.lags, "const": model.const_, "phi": model.phi_.tolist(),
                   "sigma": float(np.sqrt(model.sigma2_)), "bic": model.info_["bic"], "aic": model.info_["aic"],
                   "n_obs": model.info_["nobs"], "max_order": configs["model"].max_order if configs["model"].order == 0
                   else None, "train_time_s": fit_time}
    else:
        from aigc.train import Budget

        with runs.recording_failure(run_dir, record):
            _, fit = fit_rnn(fam, configs, series.values, run_dir, Budget(max_steps, budget_minutes), model=model,
                             resume=resume)
        record.update(dtype=fit["dtype"], compiled=fit["compiled"])
        metrics = {"val_loss": fit["best_val_loss_periodic"], **{k: fit[k] for k in (
            "steps", "train_time_s", "train_loss", "best_step", "values_per_s", "schedule_steps")}}

    def finish() -> dict:  # the main process records; every process returns the metrics of its run
        record.update(status="done", metrics=metrics, finished=store.now())
        write_json(run_dir / "run.json", record)
        _write_card(run_dir, record, configs)
        return metrics

    return run_dir, on_main(finish)


def rnn_split(x: np.ndarray, configs: dict) -> tuple[np.ndarray, int]:
    """(y, cut): the modelled sequence and where its validation part starts; too short is an error."""
    block = configs["train"].block_size
    y = modelled(x, configs["model"].difference)
    cut = len(y) - max(1, round(VAL_FRACTION * len(y)))
    if cut < block + 2:
        raise UserError(f"the series leaves {cut} values for training (the last {VAL_FRACTION:.0%} validates); "
                        f"block_size {block} needs at least {block + 2} (lower it with --set block_size=N)")
    if np.ptp(y[:cut]) == 0:
        raise UserError("the training part of the modelled series is constant"
                        + (" (its changes are all equal): set difference=false" if configs["model"].difference
                           else ""))
    return y, cut


class SeriesBatches:
    """Training batches for a series: random windows of L standardised values (inputs z_t, targets
    z_{t+1}, every step scored); validation: one window per held-out value, scoring only its last
    step, so the validation loss is the one-step NLL with a full window of context. Follows the
    interface of train.TextBatches."""

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

    def loss(self, model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model(*batch)["loss"]  # forward, not a method: a DDP-wrapped model syncs gradients in forward

    def val_metrics(self, val_loss: float) -> dict:
        return {}


def fit_rnn(fam: Family, configs: dict, x: np.ndarray, work_dir: Path, budget, *, model=None,
            resume: bool = False):
    """Train the recurrent series model on x with the shared loop (best weights end in work_dir),
    store the standardised one-step residuals of the training part in it; (model, loop metrics)."""
    from aigc.train import train_loop

    y, cut = rnn_split(x, configs)
    block = configs["train"].block_size
    if model is None:
        torch.manual_seed(configs["train"].seed)  # the initial weights depend on the seed alone
        model = fam.build(configs["model"], context=block, loc=float(y[:cut].mean()), scale=float(y[:cut].std()),
                          history=x)
    z = model.standardise(y)
    batches = SeriesBatches(z[:cut], z[cut - block:], block)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    fit = train_loop(model, batches, configs["train"], work_dir, budget, resume=resume, cpu_bf16=fam.cpu_bf16,
                     compile_gain=fam.compile_gain)

    def keep_best():  # several processes: the main process writes, every process returns the model
        best = fam.load(work_dir)
        best.resid = best.residuals(z[:cut])
        save_model_files(best, work_dir)
        return best

    return on_main(keep_best), fit


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


def load_series_run(spec: str):
    """(run_dir, record, model, series) of a finished series run, its files verified."""
    from aigc.store import find_run, read_run

    run_dir = find_run(spec)
    record = read_run(run_dir)
    if record.get("modality") != "series":
        raise UserError(f"run {run_dir.name!r} is not a series run")
    if not (run_dir / "manifest.json").is_file():
        raise UserError(f"run {run_dir.name!r} has no saved model yet (status: {record.get('status')})")
    verify_manifest(run_dir)
    model = series_family(record["family"]).load(run_dir)
    return run_dir, record, model, read_series(run_dir, record)


# ----------------------------------------------------------------------------------
# generation


def check_generate(horizon: int, paths: int, level: float, noise: str, seed: int) -> None:
    if not 1 <= horizon <= MAX_HORIZON:
        raise UserError(f"--horizon must be in 1..{MAX_HORIZON}, got {horizon}")
    if not 0 <= paths <= MAX_PATHS:
        raise UserError(f"--paths must be in 0..{MAX_PATHS}, got {paths}")
    if not 0 < level < 1:
        raise UserError(f"--level must be in (0, 1), e.g. 0.95; got {level}")
    if noise not in NOISES:
        raise UserError(f"--noise must be one of {', '.join(NOISES)}, got {noise!r}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")


def generate_series(run: str, *, horizon: int, paths: int = 0, level: float = 0.95, noise: str = "gaussian",
                    seed: int = 0, out: str | None = None) -> dict:
    """The point forecast from the end of the series, its level interval, and `paths` generated
    continuations; also written as forecast.csv and fan_chart.png into `out`."""
    check_generate(horizon, paths, level, noise, seed)
    run_dir, record, model, series = load_series_run(run)
    t0 = time.perf_counter()
    mean, lower, upper = model.predict(horizon, level)
    sampled = None
    if paths:
        try:
            sampled = model.sample(paths, horizon=horizon, seed=seed, noise=noise)
        except ValueError as e:
            raise UserError(str(e)) from None
    seconds = time.perf_counter() - t0
    future = future_time(series.time[-1], series.freq, horizon)
    out_dir = Path(out) if out else run_dir / "generated" / f"horizon-{horizon}-seed-{seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "forecast.csv", out_dir / "fan_chart.png"
    _write_csv(csv_path, future, mean, lower, upper, sampled)
    bands = {q: model.predict(horizon, q)[1:] for q in FAN_LEVELS if q < level}
    bands[level] = (lower, upper)
    atomic_write_bytes(png_path, fan_chart_png(series, future, mean, bands, sampled,
                                               title=f"{run_dir.name}: {record['family']} on {series.source}"))
    result = {"run": str(run_dir), "time": future, "forecast": mean.tolist(), "lower": lower.tolist(),
              "upper": upper.tolist(), "level": level}
    if sampled is not None:
        result["paths"] = sampled.tolist()
    result.update(files=[str(csv_path), str(png_path)], seconds=seconds,
                  settings={"horizon": horizon, "paths": paths, "level": level, "noise": noise, "seed": seed,
                            "family": record["family"]})
    return result


def _write_csv(path: Path, future: list, mean, lower, upper, sampled) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    n_paths = 0 if sampled is None else len(sampled)
    writer.writerow(["time", "forecast", "lower", "upper", *[f"path_{k + 1}" for k in range(n_paths)]])
    for h, t in enumerate(future):
        row = [t, repr(float(mean[h])), repr(float(lower[h])), repr(float(upper[h]))]
        writer.writerow(row + ([] if sampled is None else [repr(float(v)) for v in sampled[:, h]]))
    atomic_write_text(path, buf.getvalue())


def time_axis(labels: list) -> list:
    """Time labels as matplotlib x values: dates for ISO strings, the positions themselves otherwise."""
    if labels and isinstance(labels[0], str):
        import pandas as pd

        return list(pd.to_datetime(labels))
    return list(labels)


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


def _write_card(run_dir: Path, record: dict, configs: dict) -> None:
    from aigc.store import card_header

    m, d = record["metrics"], record["data"]["train"]
    if record["family"] == "ar":
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
    atomic_write_text(Path(run_dir) / "README.md", "\n".join(lines))

