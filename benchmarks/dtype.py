"""bf16 autocast against fp32 for every gradient-trained family, at equal training time.

    python benchmarks/dtype.py                  # 2 min per run, 7 families x 2 dtypes (about 35 minutes)
    python benchmarks/dtype.py --quick          # 20 s per run on digits and fortunes: about 6 minutes
    python benchmarks/dtype.py --rows gpt,vae --minutes 1

Every row trains twice through the product path (`aigc train`, the family's defaults) for the same
training-time budget, once with `--set dtype=fp32` and once with `--set dtype=bf16`, and records the
training rate (tokens, images or values per second) and the score the run reached in that time:
validation bits per character for text, FID against held-out images (`aigc eval`, `--n` images) for
images, the validation Gaussian NLL for a series. The last columns say which dtype reached the
better score and which one `dtype=auto` picks on this machine (the family's `cpu_bf16` in the
registry decides on a CPU): the default is right where they agree.

Writes benchmarks/results/dtype.json and dtype.md; runs live in a private AIGC home (default
benchmarks/.work).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
ROWS = {  # row -> (family, data, quick data, --set values, score name)
    "rnn-gru": ("rnn", "fortunes", "fortunes", {"cell": "gru"}, "val_bpc"),
    "rnn-lstm": ("rnn", "fortunes", "fortunes", {"cell": "lstm"}, "val_bpc"),
    "gpt": ("gpt", "fortunes", "fortunes", {}, "val_bpc"),
    "vae": ("vae", "fashion-mnist", "digits", {}, "fid"),
    "dcgan": ("dcgan", "fashion-mnist", "digits", {}, "fid"),
    "diffusion": ("diffusion", "fashion-mnist", "digits", {}, "fid"),
    "rnn-series": ("rnn", "sunspots", "sunspots", {}, "val_loss"),
}
RATE_KEYS = ("tokens_per_s", "images_per_s", "values_per_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s per run, digits for the image families")
    parser.add_argument("--minutes", type=float, default=None, help="training budget per run (default 2)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument("--n", type=int, default=None, help="images scored per image run (default 500; quick 297)")
    parser.add_argument("--home", default=str(ROOT / ".work"), help="private AIGC home for the runs")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    minutes = args.minutes or (1 / 3 if args.quick else 2.0)
    n_eval = args.n or (297 if args.quick else 500)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: use {', '.join(ROWS)}")
    os.environ["AIGC_HOME"] = str(Path(args.home).resolve())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from aigc.evaluate import evaluate_image_run
    from aigc.models import FAMILIES
    from aigc.runs import read_run
    from aigc.runs import train as run_train
    from aigc.train import bf16_available, resolve_dtype

    started = time.time()
    result = {"benchmark": "dtype", "minutes_per_run": minutes, "quick": args.quick, "n_eval": n_eval,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "bf16_hardware": bf16_available(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "rows": []}

    def save() -> None:
        result["wall_s"] = time.time() - started
        tmp = out_dir / "dtype.json.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / "dtype.json")
        (out_dir / "dtype.md").write_text(markdown(result), encoding="utf-8")

    for row in rows:
        family, data, quick_data, sets, score_name = ROWS[row]
        data = quick_data if args.quick else data
        fam = FAMILIES[family]
        if row == "rnn-series":
            fam = fam.series
        entry = {"row": row, "family": family, "data": data, "score": score_name,
                 "auto": resolve_dtype("auto", fam.cpu_bf16)}
        for dtype in ("fp32", "bf16"):
            print(f"\n== {row} on {data}, {dtype}: {minutes:g} min", file=sys.stderr)
            run_dir, metrics = run_train(family, data, name=f"dtype-{row}-{dtype}", overwrite=True,
                                         max_minutes=minutes, sets={**sets, "dtype": dtype})
            rate = next(metrics[k] for k in RATE_KEYS if k in metrics)
            if score_name == "fid":
                score = evaluate_image_run(run_dir, read_run(run_dir), n=n_eval)["metrics"]["fid"]
            else:
                score = metrics[score_name]
            entry[dtype] = {"rate": rate, "unit": next(k for k in RATE_KEYS if k in metrics).removesuffix("_per_s"),
                            "score": score, "steps": metrics.get("steps")}
        entry["speedup"] = entry["bf16"]["rate"] / entry["fp32"]["rate"]
        entry["better"] = "bf16" if entry["bf16"]["score"] < entry["fp32"]["score"] else "fp32"
        result["rows"].append(entry)
        save()
    save()
    print((out_dir / "dtype.md").read_text(encoding="utf-8"))


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# bf16 autocast vs fp32: {r['minutes_per_run']:g} min per run", "",
             f"Machine: {m['cpus']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, "
             + (m["cuda"] or "no GPU") + f"; bf16 in hardware: {'yes' if m['bf16_hardware'] else 'no'}. "
             "Score at equal training time, lower is better: bits/char (text), FID on "
             f"{r['n_eval']} images (images), Gaussian NLL (series).", "",
             "| family | data | score | fp32 score | bf16 score | fp32 rate | bf16 rate | bf16 speed-up | "
             "better at equal time | auto picks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["rows"]:
        unit = e["fp32"]["unit"]
        agree = "" if e["auto"] == e["better"] else " (differs)"
        lines.append(f"| {e['row']} | {e['data']} | {e['score']} | {_f(e['fp32']['score'])} | "
                     f"{_f(e['bf16']['score'])} | {_f(e['fp32']['rate'], 0)} {unit}/s | "
                     f"{_f(e['bf16']['rate'], 0)} {unit}/s | {e['speedup']:.2f}x | **{e['better']}** | "
                     f"{e['auto']}{agree} |")
    lines += ["", f"Wall time {r.get('wall_s', 0) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
