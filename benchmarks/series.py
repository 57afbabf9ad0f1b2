"""Benchmark: AR (order auto) vs a GRU vs the naive forecast on three of statsmodels' bundled series.

Every model is scored by the rolling-origin back-test of `aigc eval` (src/aigc/evaluate/series.py)
on the same origins: the last max(H, 10%) values of each series, forecasts of 1..H steps from each.
AR chooses its order by BIC on the values before the first origin and is refitted at every origin;
the GRU is trained once on the values before the first origin; the naive forecast repeats the last
value. MASE is the MAE divided by the in-sample MAE of the one-step naive forecast. The GRU's row
also gives its training rate (values/s) and model FLOP utilisation: 6 x parameters FLOPs per value
(every parameter is in a matrix product) x values/s over the fp32 matmul peak measured in this run
with the same one thread.

    python benchmarks/series.py            # about 2 minutes on 2 CPU cores
    python benchmarks/series.py --quick    # under a minute: 300 GRU steps instead of 2000

Writes benchmarks/results/series.json and benchmarks/results/series.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, fmt, machine, matmul_peak, write_results

from aigc.config import build
from aigc.data.series import SeriesDataConfig, load_series
from aigc.evaluate.series import ar_forecaster, backtest, first_origin, naive_forecaster, scores
from aigc.modalities.series import fit_rnn, series_family
from aigc.models.ar import AR, ARConfig
from aigc.service import sections_for
from aigc.train import Budget

SERIES = {  # name -> data options
    "sunspots": {},
    "co2": {"fill": "interpolate"},
    "macrodata": {"column": "realgdp"},
}
HORIZON = 8
LEVEL = 0.95
GRU = {"cell": "gru", "n_layer": "1", "n_hidden": "64", "block_size": "32", "batch_size": "32", "lr": "0.003",
       "warmup_steps": "20", "eval_interval": "100", "eval_batches": "8", "log_interval": "50", "dtype": "fp32"}


def score_rows(name: str, model: str, x: np.ndarray, start: int, season: int, bt: dict, fit_s: float,
               backtest_s: float) -> dict:
    s = scores(x, start, season, bt)
    one = bt["h"] == 1
    s_one = scores(x, start, season, {k: v[one] for k, v in bt.items()})
    return {"series": name, "model": model, "mase_h1": s_one["mase"], f"mase_h1_{HORIZON}": s["mase"],
            "mase_seasonal": s["mase_seasonal"], "coverage": s["coverage"], "fit_s": fit_s, "backtest_s": backtest_s}


def run(quick: bool) -> dict:
    torch.set_num_threads(1)  # tiny recurrent nets: one thread is as fast, and immune to oversubscription
    steps = 300 if quick else 2000
    peak = matmul_peak(torch.float32)[0]  # GFLOP/s, one thread like the GRU's training
    rows = []
    for name, options in SERIES.items():
        series = load_series(name, SeriesDataConfig(**options))
        x, season = series.values, series.season
        start = first_origin(len(x), HORIZON)
        print(f"{name}: {len(x)} values, {len(x) - start} origins, horizon {HORIZON}", flush=True)

        # naive: nothing to fit
        t0 = time.perf_counter()
        bt = backtest(x, HORIZON, naive_forecaster(x[:start], LEVEL), start)
        rows.append(score_rows(name, "naive", x, start, season, bt, 0.0, time.perf_counter() - t0))

        # AR, order by BIC on the values before the first origin, refitted at every origin
        t0 = time.perf_counter()
        chosen = AR(ARConfig(order=0, max_order=min(24, (start - 10) // 2))).fit(x[:start])
        fit_s = time.perf_counter() - t0
        forecaster, order = ar_forecaster(chosen, x[:start], LEVEL)
        t0 = time.perf_counter()
        bt = backtest(x, HORIZON, forecaster, start)
        rows.append(score_rows(name, f"AR({order})", x, start, season, bt, fit_s, time.perf_counter() - t0))

        # GRU, trained once on the values before the first origin
        configs = build(sections_for("rnn", "series"), GRU, family="rnn")
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            model, fit = fit_rnn(series_family("rnn"), configs, x[:start], Path(work), Budget(steps, None))
            fit_s = time.perf_counter() - t0
        flops_per_value = 6.0 * sum(p.numel() for p in model.parameters())

        def gru(history: np.ndarray, h: int, model=model):
            return model.predict(h, LEVEL, history=history)

        t0 = time.perf_counter()
        bt = backtest(x, HORIZON, gru, start)
        rows.append(score_rows(name, f"GRU ({steps} steps)", x, start, season, bt, fit_s, time.perf_counter() - t0))
        rows[-1].update(values_per_s=fit["values_per_s"], mfu=flops_per_value * fit["values_per_s"] / (peak * 1e9))
        for row in rows[-3:]:
            print(f"  {row['model']:<18} MASE h=1 {row['mase_h1']:.3f}  h=1..{HORIZON} "
                  f"{row[f'mase_h1_{HORIZON}']:.3f}  coverage {row['coverage']:.2f}  fit {row['fit_s']:.1f} s",
                  flush=True)
    return {"quick": quick, "horizon": HORIZON, "level": LEVEL, "gru": {**GRU, "steps": steps},
            "machine": {**machine(), "threads": torch.get_num_threads(),  # "threads": the key series.json had
                        "matmul_gflops_fp32": peak},
            "rows": rows}


def markdown(result: dict) -> str:
    h = result["horizon"]
    lines = [f"# Series benchmark{' (--quick)' if result['quick'] else ''}", "",
             f"Rolling-origin back-test over the last max({h}, 10%) values of each series, forecasts of 1..{h} "
             f"steps from every origin; MASE against the in-sample one-step naive forecast (lower is better; "
             f"the naive forecast itself scores about 1 at h = 1); coverage of the {result['level']:.0%} "
             f"intervals. Fit time: the model fitted once on the values before the first origin "
             f"(AR: BIC order selection and fit; GRU: {result['gru']['steps']} steps, 1 CPU thread).", "",
             f"| series | model | MASE h=1 | MASE h=1..{h} | seasonal MASE | coverage | fit (s) | back-test (s) | "
             "train values/s | MFU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        seasonal = "-" if r["mase_seasonal"] is None else f"{r['mase_seasonal']:.3f}"
        lines.append(f"| {r['series']} | {r['model']} | {r['mase_h1']:.3f} | {r[f'mase_h1_{h}']:.3f} | {seasonal} | "
                     f"{r['coverage']:.2f} | {r['fit_s']:.2f} | {r['backtest_s']:.1f} | "
                     f"{fmt(r.get('values_per_s'), 0)} | {fmt(r.get('mfu'), 4)} |")
    lines += ["", f"Machine: {result['machine']['platform']}, torch {result['machine']['torch']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 GRU steps instead of 2000 (under a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.quick)
    write_results(args.out, "series", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
