"""One training setting against another for every gradient-trained family, at equal training time.

    python benchmarks/settings.py                       # dtype: fp32 vs bf16, 2 min per run (about 35 minutes)
    python benchmarks/settings.py --setting compile     # eager vs torch.compile
    python benchmarks/settings.py --quick               # 20 s per run on digits and fortunes: about 6 minutes
    python benchmarks/settings.py --rows gpt,vae --minutes 1

Settings: `dtype` (`--set dtype=fp32` vs `bf16`: bf16 autocast) and `compile` (`--set compile=false`
vs `true`: torch.compile, each run in the family's default dtype). Every row trains twice through
the product path (`aigc train`, the family's defaults) for the same training-time budget and records
the training rate (tokens, images or values per second: the run's mean, which includes warm-up and
compiling, and the steady rate, the median logged in its second half) and the score the run reached
in that time: validation bits per character for text, FID against held-out images (`aigc eval`,
`--n` images) for images, the validation Gaussian NLL for a series. For dtype the last column says
which dtype `dtype=auto` picks on this machine (the family's `cpu_bf16` in the registry decides on a
CPU): the default is right where it agrees with the better one.

Writes benchmarks/results/SETTING.json and SETTING.md; runs live in a private AIGC home (default
benchmarks/.work).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common import RATE_KEYS, RESULTS, ROOT, describe_machine, fmt, machine, steady_rate, write_results

ROWS = {  # row -> (family, data, quick data, --set values, score name)
    "rnn-gru": ("rnn", "fortunes", "fortunes", {"cell": "gru"}, "val_bpc"),
    "rnn-lstm": ("rnn", "fortunes", "fortunes", {"cell": "lstm"}, "val_bpc"),
    "gpt": ("gpt", "fortunes", "fortunes", {}, "val_bpc"),
    "vae": ("vae", "fashion-mnist", "digits", {}, "fid"),
    "dcgan": ("dcgan", "fashion-mnist", "digits", {}, "fid"),
    "diffusion": ("diffusion", "fashion-mnist", "digits", {}, "fid"),
    "rnn-series": ("rnn", "sunspots", "sunspots", {}, "val_loss"),
}
SETTINGS = {  # setting -> (the two values compared, what the table calls them)
    "dtype": (("fp32", "bf16"), ("fp32", "bf16")),
    "compile": (("false", "true"), ("eager", "compiled")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="dtype")
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
    values, labels = SETTINGS[args.setting]

    from aigc.models import FAMILIES
    from aigc.service import evaluate
    from aigc.service import train as run_train
    from aigc.store import read_run
    from aigc.train import resolve_dtype

    started = time.time()
    result = {"benchmark": "settings", "setting": args.setting, "values": list(values), "labels": list(labels),
              "minutes_per_run": minutes, "quick": args.quick, "n_eval": n_eval, "machine": machine(), "rows": []}

    def save() -> None:
        result["wall_s"] = time.time() - started
        write_results(args.out, args.setting, result, markdown(result))

    for row in rows:
        family, data, quick_data, sets, score_name = ROWS[row]
        data = quick_data if args.quick else data
        fam = FAMILIES[family]
        if row == "rnn-series":
            fam = fam.series
        entry = {"row": row, "family": family, "data": data, "score": score_name,
                 "auto": resolve_dtype("auto", fam.cpu_bf16)}
        for value, label in zip(values, labels, strict=True):
            print(f"\n== {row} on {data}, {args.setting}={value}: {minutes:g} min", file=sys.stderr)
            run_dir, metrics = run_train(family, data, name=f"{args.setting}-{row}-{value}", overwrite=True,
                                         max_minutes=minutes, sets={**sets, args.setting: value})
            rate_key = next(k for k in RATE_KEYS if k in metrics)
            record = read_run(run_dir)
            if score_name == "fid":
                score = evaluate(str(run_dir), {"n": n_eval})["metrics"]["fid"]
            else:
                score = metrics[score_name]
            entry[label] = {"rate": metrics[rate_key], "steady_rate": steady_rate(run_dir),
                            "unit": rate_key.removesuffix("_per_s"), "score": score, "steps": metrics.get("steps"),
                            "dtype": record.get("dtype"), "compiled": record.get("compiled")}
        a, b = (entry[label] for label in labels)
        entry["speedup"] = b["rate"] / a["rate"]
        entry["steady_speedup"] = b["steady_rate"] / a["steady_rate"] if a["steady_rate"] and b["steady_rate"] \
            else None
        entry["better"] = labels[1] if b["score"] < a["score"] else labels[0]
        result["rows"].append(entry)
        save()
    save()
    print((Path(args.out) / f"{args.setting}.md").read_text(encoding="utf-8"))


def markdown(r: dict) -> str:
    a, b = r["labels"]
    title = {"dtype": "bf16 autocast vs fp32", "compile": "torch.compile vs eager"}[r["setting"]]
    lines = [f"# {title}: {r['minutes_per_run']:g} min per run", "",
             f"Machine: {describe_machine(r['machine'])}. Score at equal training time, lower is better: "
             f"bits/char (text), FID on {r['n_eval']} images (images), Gaussian NLL (series). Rates: the run's "
             "mean (warm-up and compiling included) and, in the speed-up columns, also the steady rate "
             "(median of the second half).", ""]
    head = (f"| family | data | score | {a} score | {b} score | {a} rate | {b} rate | {b} speed-up (mean) | "
            f"{b} speed-up (steady) | better at equal time |")
    if r["setting"] == "dtype":
        head += " auto picks |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for e in r["rows"]:
        unit = e[a]["unit"]
        line = (f"| {e['row']} | {e['data']} | {e['score']} | {fmt(e[a]['score'])} | {fmt(e[b]['score'])} | "
                f"{fmt(e[a]['rate'], 0)} {unit}/s | {fmt(e[b]['rate'], 0)} {unit}/s | {e['speedup']:.2f}x | "
                f"{fmt(e.get('steady_speedup'), 2)}x | **{e['better']}** |")
        if r["setting"] == "dtype":
            line += f" {e['auto']}{'' if e['auto'] == e['better'] else ' (differs)'} |"
        lines.append(line)
    lines += ["", f"Wall time {r.get('wall_s', 0) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
