"""Audio benchmark (issue 17): symbolic music on bach-chorales, the n-gram against rnn and gpt trained for the same
budget, on the same split and the same encoding (docs/audio.md).

    python benchmarks/audio.py            # rnn and gpt 10 minutes each (about 30 minutes in all)
    python benchmarks/audio.py --quick    # 2 minutes each (about 12 minutes)
    python benchmarks/audio.py --models ngram,gpt --temperatures 1,0.9,0.8,0.7   # + the statistics by temperature
    python benchmarks/audio.py --constrained both     # + the statistics without grammar-constrained sampling
    python benchmarks/audio.py --data folk-abc --models ngram,rnn,gpt   # the Essen folk tunes instead

Writes benchmarks/results/audio.json and audio.md (--quick: audio-quick.json and .md). Runs live in a private AIGC
home (default benchmarks/.work), away from a user's own runs.

The sounds part (`--part sounds`): drum hits (`--data drums`, 56 training and 14 validation hits, split by file)
as log-mel spectrograms through vae, dcgan and diffusion, each conditional on the instrument class and trained the
same budget; `aigc eval` of each: KID in the features of the classifier trained on the training hits, beside its
floor (the training hits against the validation hits: what a perfect generator scores) with N, and the class
accuracy of conditional samples beside the classifier's accuracy on the real validation hits. With --listening DIR,
one snare per family at seed 0 (WAV + spectrogram PNG) is written there.

    python benchmarks/audio.py --part sounds           # 10 minutes per family (about 35 minutes in all)
    python benchmarks/audio.py --part sounds --quick   # 1 minute per family, then the evaluations: the diffusion's
                                                       # (114 samples x 20 steps of a 64 x 64 UNet) takes longest

Writes benchmarks/results/audio-sounds.json and .md (--quick: audio-sounds-quick.*).

1. Every model trains through `aigc train --data bach-chorales` (split seed 0: 297 training and 33 validation
   chorales, copies removed before the split), the training split augmented by every transposition within
   --transpose semitones (the validation split never is); the n-gram is counted (order chosen on the training
   tail), the others train for the budget.
2. `aigc eval RUN -n N` on each: held-out NLL per token and per note (nats), beside the n-gram's fitted on the same
   (augmented) training split; target: the best neural family at least 10% below the n-gram per token.
3. The statistics of N samples (seed 0, 8 bars, sampled as each run samples unless asked: rnn and gpt at the
   temperature their training fitted to the training chorales, `aigc calibrate`, the n-gram at the music defaults,
   aigc.modalities.music.SAMPLING_DEFAULTS) against the validation chorales' first 8 bars:
   pitch-class entropy, scale consistency and polyphony (muspy), groove consistency (ours, muspy's definition
   without its extra empty bar); the floor is the training chorales' distance from the validation chorales; target:
   3 of 4 within the floor or 2 standard errors.
4. Novelty: the longest run of notes a sample shares with a training chorale and the share of its 8-note runs found
   in them, beside the same for the validation chorales.
5. Timings as ratios (this machine is shared): training tokens/s of each family over the gpt's, and sampling
   tokens/s over the n-gram's, with the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, describe_machine, fmt, machine, write_results

sys.path.insert(0, str(ROOT.parent / "src"))

MODELS = {  # row -> (family, --set values)
    "ngram": ("ngram", {}),
    "rnn": ("rnn", {"cell": "lstm", "block_size": "128"}),
    "gpt": ("gpt", {"n_layer": "4", "n_head": "4", "n_embd": "128", "block_size": "256", "batch_size": "16"}),
}  # gpt at the family's dropout (0) and compile=auto (torch.compile for budgets over 2 minutes: 3,030 steps in 10
#    minutes where dropout 0.1 without compile made 2,108, and a lower NLL; docs/audio.md, "The benchmark's gpt");
#    --quick turns compile off: on a shared machine the first --quick run spent the gpt's whole 2 minutes compiling
QUICK_SETS = {"gpt": {"compile": "false"}}
SOUND_MODELS = {  # family -> --set values (conditional on the drum class; the families' defaults otherwise)
    "vae": {"conditional": "true"},
    "dcgan": {"conditional": "true"},
    "diffusion": {"conditional": "true", "compile": "false"},
}
STATS = ("pitch_class_entropy", "scale_consistency", "polyphony", "groove_consistency")
TARGET_GAIN = 0.10  # the best neural family's NLL per token at least 10% below the n-gram's
TARGET_STATS = 3  # of the four statistics within the floor or 2 standard errors


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 minutes per trained model")
    parser.add_argument("--minutes", type=float, default=None, help="training budget per model (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the sampled pieces (another seed: fresh "
                                                               "pieces to confirm a result on; written to a -seedN "
                                                               "result)")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the runs of the same names already in --home (trained by an earlier run of "
                             "this benchmark; their training figures are their run.json's) instead of training "
                             "again: new sampling code measured on the same weights")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--transpose", type=int, default=5, help="training-split augmentation, semitones")
    parser.add_argument("--samples", type=int, default=32, help="pieces sampled per model for the statistics")
    parser.add_argument("--temperatures", default="", help="also the statistics of each trained model's samples at "
                                                           "these samplings, each a temperature T or T:P with top-p "
                                                           "P (e.g. 1,0.8:0.95,0.7): how the music default is "
                                                           "chosen")
    parser.add_argument("--constrained", choices=("on", "off", "both"), default="on",
                        help="grammar-constrained sampling of the samples (docs/audio.md): on (the music default), "
                             "off, or both side by side (each temperature of --temperatures with and without)")
    parser.add_argument("--data", choices=("bach-chorales", "folk-abc"), default="bach-chorales",
                        help="the music data (folk-abc: the Essen tunes, 8,306 melodies; its cold parse takes minutes, "
                             "then it is cached in the home)")
    parser.add_argument("--gpt-block", type=int, default=int(MODELS["gpt"][1]["block_size"]),
                        help="the gpt's training block in tokens (eight bars of chorale take about 300: a block of "
                             "256 leaves the last bars to positions it never trained on, docs/audio.md)")
    parser.add_argument("--home", default=str(ROOT / ".work"), help="private AIGC home for the runs")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--part", choices=("music", "sounds"), default="music",
                        help="music: bach-chorales (ngram, rnn, gpt); sounds: drum hits (vae, dcgan, diffusion)")
    parser.add_argument("--listening", default=None, help="write one piece per model at seed 0 (music: "
                                                          "DIR/MODEL/000.{wav,png,mid,json}, as the run samples "
                                                          "unless asked) or one snare per family (sounds: "
                                                          "DIR/FAMILY-snare.{wav,png}) here")
    args = parser.parse_args()
    if args.part == "sounds":
        sounds(args)
        return
    minutes = args.minutes or (2.0 if args.quick else 10.0)
    default_block = int(MODELS["gpt"][1]["block_size"])
    stem = ("audio-quick" if args.quick else "audio" if minutes == 10.0 else f"audio-{minutes:g}min") \
        + ("" if args.data == "bach-chorales" else f"-{args.data}") \
        + ("" if args.gpt_block == default_block else f"-block{args.gpt_block}") \
        + ("" if args.seed == 0 else f"-seed{args.seed}")
    if args.gpt_block != default_block:
        MODELS["gpt"][1].update(block_size=str(args.gpt_block), n_positions=str(max(1024, args.gpt_block)))
    models = [m for m in args.models.split(",") if m]
    if sorted(set(models) - set(MODELS)):
        raise SystemExit(f"unknown models: use {', '.join(MODELS)}")
    os.environ["AIGC_HOME"] = str(Path(args.home).resolve())

    from aigc import service
    from aigc.data import music as m
    from aigc.modalities.music import SAMPLING_DEFAULTS, SAMPLING_FILE

    started = time.time()
    result = {"benchmark": stem, "data": args.data, "minutes_per_model": minutes, "quick": args.quick,
              "reused_runs": args.reuse, "seed": args.seed,
              "transpose": args.transpose, "samples": args.samples, "machine": machine(), "load_average_start": load(),
              "rows": []}
    # the main table samples as each run does unless asked (its calibrated temperature, else the music defaults);
    # each other (temperature, top-p, constrained) asked for is a row of the sampling table (the NLL does not depend
    # on it); without --temperatures the music defaults are that row for a calibrated run
    grammar = {"on": [True], "off": [False], "both": [True, False]}[args.constrained]
    default = (SAMPLING_DEFAULTS["temperature"], SAMPLING_DEFAULTS["top_p"])
    variants = [(t, p, c) for t, p in [_sampling(x) for x in args.temperatures.split(",") if x] or [default]
                for c in grammar]  # less each row's own sampling, below

    def save() -> None:
        result["wall_s"] = time.time() - started
        result["load_average_end"] = load()
        write_results(args.out, stem, result, markdown(result))

    t0 = time.perf_counter()
    result["chorales"] = len(m.load_music(args.data)[0])  # parsed once (minutes cold), then cached in the home
    result["parse_s"] = time.perf_counter() - t0
    for row in models:
        family, sets = MODELS[row]
        sets = {**sets, **(QUICK_SETS.get(row, {}) if args.quick else {})}
        print(f"\n== {row}: {'counted' if family == 'ngram' else f'{minutes:g} min'}", file=sys.stderr)
        name = f"bench-{row}-{minutes:g}min-t{args.transpose}" + ("" if args.data == "bach-chorales" else
                                                                  f"-{args.data}") \
            + (f"-block{args.gpt_block}" if row == "gpt" and args.gpt_block != default_block else "")
        if args.reuse:
            run_dir = Path(args.home).resolve() / "runs" / name
            if not (run_dir / "run.json").is_file():
                raise SystemExit(f"--reuse: no run {name} in {args.home}: train it first (without --reuse)")
            metrics = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["metrics"]
            if family != "ngram" and not (run_dir / SAMPLING_FILE).is_file():  # trained before calibration
                print(f"   {row}: calibrating its sampling (aigc calibrate)", file=sys.stderr)
                service.calibrate(str(run_dir))
        else:
            run_dir, metrics = service.train(family, args.data, name=name, overwrite=True,
                                             max_minutes=None if family == "ngram" else minutes,
                                             sets={**sets, "transpose": str(args.transpose)})
        t0 = time.perf_counter()
        evaluation = service.evaluate(str(run_dir), {"n": args.samples, "seed": args.seed})
        result["rows"].append({"model": row, "family": family, "run": str(run_dir), "sets": sets,
                               "steps": metrics.get("steps"), "train_time_s": metrics.get("train_time_s"),
                               "train_tokens_per_s": metrics.get("tokens_per_s"), "order": metrics.get("order"),
                               "eval_s": time.perf_counter() - t0, **{k: evaluation[k] for k in (
                                   "metrics", "statistics", "within_floor", "validation")},
                               "sampling": {k: v for k, v in evaluation["samples"].items() if k != "tokens"},
                               "calibration": _calibration(run_dir / SAMPLING_FILE), "by_sampling": []})
        if args.listening:
            result["rows"][-1]["listening"] = music_listening(service, run_dir, Path(args.listening) / row)
        own = evaluation["samples"]
        for temperature, top_p, constrained in variants:
            if (temperature, top_p, constrained) == (own["temperature"], own["top_p"], own["constrained"]):
                continue  # the main table's
            print(f"   {row} at temperature {temperature:g}, top-p {top_p:g}, constrained {constrained}",
                  file=sys.stderr)
            other = service.evaluate(str(run_dir), {"n": args.samples, "temperature": temperature, "top_p": top_p,
                                                    "constrained": constrained, "seed": args.seed})
            result["rows"][-1]["by_sampling"].append({
                "sampling": {k: v for k, v in other["samples"].items() if k != "tokens"},
                "statistics": other["statistics"]["samples"], "within_floor": other["within_floor"]})
            save()
        save()
    save()
    print((Path(args.out) / f"{stem}.md").read_text(encoding="utf-8"))


def sounds(args) -> None:
    """The sounds part: each family trained on the drum hits for the budget, then evaluated (KID and its floor, class
    accuracy)."""
    minutes = args.minutes or (1.0 if args.quick else 10.0)
    stem = "audio-sounds-quick" if args.quick else "audio-sounds"
    families = [f for f in args.models.split(",") if f in SOUND_MODELS] or list(SOUND_MODELS)
    os.environ["AIGC_HOME"] = str(Path(args.home).resolve())

    from aigc import service

    started = time.time()
    result = {"benchmark": stem, "minutes_per_model": minutes, "quick": args.quick, "machine": machine(),
              "load_average_start": load(), "rows": []}
    if args.listening:
        result["listening_real"] = real_listening(Path(args.listening))
    for family in families:
        print(f"\n== {family}: {minutes:g} min on drums", file=sys.stderr)
        run_dir, metrics = service.train(family, "drums", name=f"bench-drums-{family}-{minutes:g}min", overwrite=True,
                                         max_minutes=minutes, sets=SOUND_MODELS[family])
        t0 = time.perf_counter()
        evaluation = service.evaluate(str(run_dir), {})
        row = {"family": family, "run": str(run_dir), "steps": metrics.get("steps"),
               "train_time_s": metrics.get("train_time_s"), "images_per_s": metrics.get("images_per_s"),
               "eval_s": time.perf_counter() - t0, "n": evaluation["n"], "n_train": evaluation["n_train"],
               "metrics": evaluation["metrics"], "feature_net": evaluation["feature_net"]}
        if args.listening:
            row["listening"] = listening(service, run_dir, family, Path(args.listening))
        result["rows"].append(row)
        result["wall_s"] = time.time() - started
        result["load_average_end"] = load()
        write_results(args.out, stem, result, sounds_markdown(result))
    print((Path(args.out) / f"{stem}.md").read_text(encoding="utf-8"))


def music_listening(service, run_dir: Path, out: Path) -> list[str]:
    """One piece at seed 0 as `aigc generate RUN -n 1 --seed 0 --out DIR` writes it (the run's own sampling, 8 bars):
    its WAV, piano roll, MIDI and record, replacing what DIR held."""
    for old in out.glob("000.*"):
        old.unlink()
    return [str(Path(f).resolve()) for f in service.save(service.generate(str(run_dir), {"n": 1}, seed=0), out)]


LISTENING_CLASS = "snare"  # the class of the listening page's sound (the first class where a run has no snare)


def listening(service, run_dir: Path, family: str, out: Path) -> list[str]:
    """One sound at seed 0 (a snare): DIR/<family>-<class>.wav and .png (the spectrogram, with its record)."""
    import shutil

    names = service.store.read_run(run_dir)["class_names"]
    files = []
    for name in [LISTENING_CLASS if LISTENING_CLASS in names else names[0]]:
        generation = service.generate(str(run_dir), {"n": 1, "class_": name}, seed=0)
        made = service.save(generation, out / ".tmp")
        for suffix in (".wav", ".png"):
            target = out / f"{family}-{name}{suffix}"
            shutil.move(next(f for f in made if f.endswith(suffix)), target)
            files.append(str(target))
    shutil.rmtree(out / ".tmp", ignore_errors=True)
    return files


def real_listening(out: Path) -> list[str]:
    """The first validation snare, as the pipeline makes it audible (spectrogram -> Griffin-Lim at seed 0): the best
    a generated one can sound. DIR/real-snare.wav and .png."""
    from aigc.data import sounds as s
    from aigc.data.music import wav_bytes
    from aigc.modalities.sound import spectrogram_png

    cfg = s.SoundDataConfig()
    _, val, files = s.load_split("drums", cfg)
    i = list(val.labels).index(val.class_names.index(LISTENING_CLASS))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"real-{LISTENING_CLASS}.wav").write_bytes(wav_bytes(s.to_audio(val.images[i], cfg, 0), cfg.sample_rate))
    spectrogram_png(out / f"real-{LISTENING_CLASS}.png", val.images[i], {"file": files["val"][i], "seed": 0})
    return [str(out / f"real-{LISTENING_CLASS}{x}") for x in (".wav", ".png")]


def sounds_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# Audio benchmark, sounds: drum hits, {result['minutes_per_model']:g} min per family"
             + (" (--quick)" if result["quick"] else ""), "",
             f"Machine: {describe_machine(result['machine'])}; load average (1/5/15 min) {result['load_average_start']}"
             f" at the start, {result.get('load_average_end', '-')} at the end (a shared machine: steps vary with the "
             f"load). Conditional on the class (kick, snare, cymbal, tom, tabla); {result.get('wall_s', 0) / 60:.0f} "
             "min in all.", "",
             "KID (x 1000, lower is better) in the features of the classifier trained on the training hits, N "
             "generated spectrograms (classes in turn) against the N validation hits; floor: N training hits against "
             "the same validation hits. Class accuracy: that classifier's verdict on 20 samples per class, beside its "
             "accuracy on the real validation hits.", "",
             "| family | steps | KID x1000 | KID floor x1000 | N (train) | class accuracy | on real hits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['family']} | {r['steps']} | {fmt(1000 * m['kid'], 1)} ± {fmt(1000 * m['kid_std'], 1)} | "
                     f"{fmt(1000 * m['kid_floor'], 1)} | {r['n']} ({r['n_train']}) | {fmt(m['class_accuracy'], 2)} | "
                     f"{fmt(m['class_accuracy_real'], 2)} |")
    return "\n".join(lines) + "\n"


def _calibration(path: Path) -> dict | None:
    """What the run's calibration chose and measured (aigc.modalities.music.calibrate), None without one."""
    if not path.is_file():
        return None
    own = json.loads(path.read_text(encoding="utf-8"))
    return {"temperature": own["temperature"], "top_p": own["top_p"], **own["calibration"]}


def _sampling(item: str) -> tuple[float, float]:
    """`--temperatures` item: T or T:P (top-p P; default 1, off)."""
    temperature, _, top_p = item.partition(":")
    return float(temperature), float(top_p or 1.0)


def sampling(row: dict) -> str:
    """How a row's pieces were sampled, as eval.json recorded it: the run's calibrated temperature where it has one,
    else the music defaults (aigc.modalities.music.SAMPLING_DEFAULTS)."""
    how = row.get("sampling") or {"seed": 0, "temperature": 1.0}  # rows of results written before it was recorded
    own = (", its calibrated temperature" if row.get("calibration") else ", the music defaults") if "top_p" in how \
        else ""
    return (f"seed {how['seed']}, temperature {how['temperature']:g}"
            + (f", top-p {how['top_p']:g}" if how.get("top_p", 1.0) < 1 else "")
            + (", grammar-constrained" if how.get("constrained") else ", not constrained" if "constrained" in how
               else "") + own)


def markdown(result: dict) -> str:
    rows = result["rows"]
    if not rows:
        return "# Audio benchmark\n\nNo rows yet.\n"
    by = {r["model"]: r for r in rows}
    first = rows[0]
    data = result.get("data", "bach-chorales")
    lines = [f"# Audio benchmark: {data}, {result['minutes_per_model']:g} min per trained model"
             + (" (--quick)" if result["quick"] else ""), "",
             f"Machine: {describe_machine(result['machine'])}; load average (1/5/15 min) {result['load_average_start']}"
             f" at the start, {result.get('load_average_end', '-')} at the end (the machine was shared: timings are "
             f"ratios). {first['validation']['pieces']} validation pieces ({first['validation']['notes']:,} notes, "
             f"{first['validation']['tokens']:,} tokens); training split augmented by transpositions within "
             f"±{result['transpose']} semitones; {result['samples']} samples per model, 8 bars; "
             f"{result.get('wall_s', 0) / 60:.0f} min in all."
             + (" **The runs were not trained again** (`--reuse`): they are the ones an earlier run of this benchmark "
                "trained, on an idle machine (their steps and NLL are theirs); the pieces are sampled by today's code."
                if result.get("reused_runs") else ""), "",
             "## Held-out likelihood (nats, lower is better)", "",
             "| model | training | NLL/token | NLL/note | n-gram NLL/token (same split) | below the n-gram |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        met = r["metrics"]
        gain = 1 - met["val_nll_per_token"] / met["ngram_nll_per_token"]
        training = (f"counted (order {r['order']})" if r["family"] == "ngram"
                    else f"{result['minutes_per_model']:g} min, {r['steps']} steps")
        lines.append(f"| {r['model']} | {training} | {fmt(met['val_nll_per_token'])} | {fmt(met['val_nll_per_note'])} "
                     f"| {fmt(met['ngram_nll_per_token'])} | {100 * gain:.1f}% |")
    neural = [r for r in rows if r["family"] != "ngram"]
    if neural:
        best = min(neural, key=lambda r: r["metrics"]["val_nll_per_token"])
        gain = 1 - best["metrics"]["val_nll_per_token"] / best["metrics"]["ngram_nll_per_token"]
        lines += ["", f"Target: the best neural family at least {100 * TARGET_GAIN:.0f}% below the n-gram per token. "
                      f"Best: {best['model']}, {100 * gain:.1f}% below: **{'met' if gain >= TARGET_GAIN else 'missed'}"
                      "**."]
    val, train = first["statistics"]["val"], first["statistics"]["train"]
    lines += ["", "## Musical statistics of the samples (first 8 bars of the pieces for val and train)", "",
              "How each model's samples were drawn (as `aigc generate` draws them unless asked otherwise):", "",
              *[f"- {r['model']}: {sampling(r)}" + (
                  f" (fitted when training ended on {r['calibration']['pieces_per_temperature']} pieces at each of "
                  f"{', '.join(f'{t:g}' for t in r['calibration']['temperatures'])} at seed "
                  f"{r['calibration']['seed']}, {r['calibration']['seconds']:.0f} s: training pieces only)"
                  if r.get("calibration") else "") for r in rows], "",
              "Each cell: the samples' mean ± its standard error; ✓ where it lies no farther from the validation "
              "chorales' mean than the training chorales' mean does (the floor) or within 2 standard errors of it.", "",
              "| statistic | validation | training (floor) | " + " | ".join(r["model"] for r in rows) + " |",
              "|---|---|---|" + "---|" * len(rows)]
    for key in STATS:
        cells = []
        for r in rows:
            s, ok = r["statistics"]["samples"][key], r["within_floor"][key]["met"]
            cells.append(f"{fmt(s['mean'])} ± {fmt(s['se'])} {'✓' if ok else '✗'}")
        lines.append(f"| {key} | {fmt(val[key]['mean'])} ± {fmt(val[key]['se'])} | {fmt(train[key]['mean'])} "
                     f"(floor {fmt(abs(train[key]['mean'] - val[key]['mean']))}) | " + " | ".join(cells) + " |")
    verdicts = []
    for r in rows:
        within = sum(f["met"] for f in r["within_floor"].values())
        verdicts.append(f"{r['model']} {within}/4 **{'met' if within >= TARGET_STATS else 'missed'}**")
    lines += ["", f"Target: {TARGET_STATS} of 4 within the floor or 2 standard errors: {', '.join(verdicts)}."]
    swept = [(r, t) for r in rows for t in r.get("by_sampling", r.get("by_temperature", []))]
    if swept:
        lines += ["", "## The statistics against the sampling (temperature, top-p, grammar)", "",
                  "The same runs, the same seed and number of samples, sampled otherwise (the NLL does not depend on "
                  "it); constrained: grammar-constrained sampling (docs/audio.md); ✓ as above.", "",
                  "| model | temperature | top-p | constrained | " + " | ".join(STATS) + " | within |",
                  "|---|---|---|---|" + "---|" * len(STATS) + "---|"]
        for r, t in swept:
            cells = [f"{fmt(t['statistics'][k]['mean'])} ± {fmt(t['statistics'][k]['se'])} "
                     f"{'✓' if t['within_floor'][k]['met'] else '✗'}" for k in STATS]
            within = sum(f["met"] for f in t["within_floor"].values())
            grammar = {True: "yes", False: "no"}.get(t["sampling"].get("constrained"), "-")
            lines.append(f"| {r['model']} | {t['sampling']['temperature']:g} | {t['sampling'].get('top_p', 1.0):g} "
                         f"| {grammar} | " + " | ".join(cells)
                         + f" | {within}/4 |")
    lines += ["", "## Novelty", "",
              "| model | longest copy (notes, mean / max) | 8-note runs found in training |", "|---|---|---|"]
    for r in rows:
        met = r["metrics"]
        lines.append(f"| {r['model']} | {fmt(met['longest_copy_notes'], 1)} / {met['longest_copy_notes_max']} | "
                     f"{fmt(met['copied_8gram_share'])} |")
    met = first["metrics"]
    lines.append(f"| validation chorales | {fmt(met['val_longest_copy_notes'], 1)} | "
                 f"{fmt(met['val_copied_8gram_share'])} |")
    lines += ["", "## Timings, as ratios", ""]
    gpt = by.get("gpt", {}).get("train_tokens_per_s")
    ngram = by.get("ngram", {}).get("metrics", {}).get("tokens_per_s")
    lines += ["| model | training tokens/s over the gpt's | sampling tokens/s over the n-gram's |", "|---|---|---|"]
    for r in rows:
        train_ratio = r["train_tokens_per_s"] / gpt if gpt and r["train_tokens_per_s"] else None
        sample_ratio = r["metrics"]["tokens_per_s"] / ngram if ngram else None
        lines.append(f"| {r['model']} | {fmt(train_ratio, 2)} | {fmt(sample_ratio, 2)} |")
    lines += ["", f"Corpus parse: {result['chorales']} pieces in {result['parse_s']:.0f} s (0 when cached)."]
    heard = [r for r in rows if r.get("listening")]
    if heard:
        lines += ["", "## Listening: one piece per model at seed 0, sampled as above", "",
                  "| model | files |", "|---|---|"]
        lines += [f"| {r['model']} | {', '.join(os.path.relpath(f, RESULTS) for f in r['listening'])} |"
                  for r in heard]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
