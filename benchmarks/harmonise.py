"""Harmonisation benchmark (issue 17's stretch goal): each of the first N validation chorales gives its soprano, a
music run writes the voices below it (`aigc generate RUN --harmonise-piece NAME`), and the harmonisations are
compared with the real chorales and with a floor (docs/audio.md, "Harmonisation").

    python benchmarks/harmonise.py --runs benchmarks/.work/runs/bench-ngram-10min-t5,\
benchmarks/.work/runs/bench-gpt-10min-t5
    python benchmarks/harmonise.py --quick      # 8 chorales, the n-gram only (trained here in seconds if needed)

Without --runs: the audio benchmark's runs where they are (benchmarks/.work/runs, `python benchmarks/audio.py`),
else an n-gram counted here on bach-chorales (split seed 0, as the audio benchmark's). Every run must have the same
validation split (bach-chorales, split seed 0: the same 33 chorales).

Per model and number of candidates per melody note (--candidates: 1, one left-to-right draw of the whole piece;
4, the default: four chords drawn before each melody note, the one under which the model finds the note most
probable kept), over the N chorales (one harmonisation each, seed 0, the music sampling defaults):
1. the soprano kept exactly: every soprano note in the piece (must be 100%), and the share of the other notes that
   sound at or above the soprano note sounding then (must be 0; a real chorale's alto sometimes crosses above its
   soprano, whose top-voice line `soprano_line` then cuts the soprano's note short: the real rows are below 100%);
2. notes per onset (the real chorales: close to 4 at a chord change, less under moving voices), polyphony (muspy);
3. pitch-class entropy and scale consistency (muspy), mean and standard error, beside the real chorales';
4. the share of vertical sonorities (the notes sounding at each onset) that are consonant (aigc.evaluate.music.
   is_consonant: thirds, fifths, sixths, octaves over the bass, fourths between upper voices);
and the floor "random in key": the real chorale's rhythm with every lower note's pitch replaced by a seeded random
pitch of the chorale's best-fitting major or minor scale below the soprano (in the lower voices' real range).

Writes benchmarks/results/harmonise.json and .md (--quick: harmonise-quick.*).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, describe_machine, fmt, machine, write_results

sys.path.insert(0, str(ROOT.parent / "src"))

AUDIO_RUNS = ("bench-ngram-10min-t5", "bench-gpt-10min-t5")  # what benchmarks/audio.py leaves in its home
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)


def key_scale(notes) -> set[int]:
    """The pitch classes of the major or natural-minor scale (of 24) holding the most of the notes."""
    classes = np.bincount([p % 12 for _, _, p in notes], minlength=12)
    scales = [{(root + step) % 12 for step in steps} for root in range(12) for steps in (MAJOR, MINOR)]
    return max(scales, key=lambda s: sum(classes[c] for c in s))


def random_in_key(piece, soprano, rng: np.random.Generator):
    """The chorale's notes with each lower note's pitch drawn in its key below the soprano sounding at its onset (the
    lower voices' rhythm and range kept; one note per pitch at a time, as the encoding has them)."""
    from aigc.data import music as m

    scale = key_scale(piece.notes)
    lower = [n for n in piece.notes if n not in set(soprano)]
    low = min((p for _, _, p in lower), default=36)
    top = {}
    for onset, dur, pitch in soprano:
        for t in range(onset, onset + dur):
            top[t] = pitch
    out = list(soprano)
    for onset, dur, _ in lower:
        ceiling = top.get(onset, max(top.values()))
        choices = [p for p in range(low, ceiling) if p % 12 in scale]
        if choices:
            out.append((onset, dur, int(rng.choice(choices))))
    return m.one_voice_per_pitch(out)


def summary(values: list[float]) -> dict:
    kept = [v for v in values if not math.isnan(v)]
    return {"mean": float(np.mean(kept)), "se": float(np.std(kept, ddof=1) / math.sqrt(len(kept))) if len(kept) > 1
            else math.nan, "n": len(kept)}


def measure(pieces: list, sopranos: list) -> dict:
    from aigc.evaluate.music import (
        consonant_share,
        notes_above,
        notes_per_onset,
        pitch_class_entropy,
        polyphony,
        scale_consistency,
    )

    kept = [set(s) <= set(p) for p, s in zip(pieces, sopranos, strict=True)]
    above = [len(notes_above(s, p)) / max(1, len(p) - len(s)) for p, s in zip(pieces, sopranos, strict=True)]
    return {"soprano_kept": sum(kept) / len(kept), "notes_above": float(np.mean(above)),
            "notes_per_onset": summary([notes_per_onset(p) for p in pieces]),
            "polyphony": summary([polyphony(p) for p in pieces]),
            "pitch_class_entropy": summary([pitch_class_entropy(p) for p in pieces]),
            "scale_consistency": summary([scale_consistency(p) for p in pieces]),
            "consonant_share": summary([consonant_share(p) for p in pieces])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 chorales (unless --chorales)")
    parser.add_argument("--chorales", type=int, default=None, help="the first N validation chorales (default: all)")
    parser.add_argument("--runs", default=None, help="comma-separated music runs (directories)")
    parser.add_argument("--candidates", default="1,4", help="comma-separated candidates per melody note to measure "
                                                                "(1: one left-to-right draw; the default of a "
                                                                "harmonisation: 4)")
    parser.add_argument("--home", default=str(ROOT / ".work"), help="private AIGC home")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    os.environ["AIGC_HOME"] = args.home
    from aigc import service
    from aigc.data import music as m
    from aigc.modalities import music

    load_start = os.getloadavg()
    t_start = time.time()
    if args.runs:
        runs = [Path(r).resolve() for r in args.runs.split(",")]
    else:
        runs = [Path(args.home) / "runs" / name for name in AUDIO_RUNS if (Path(args.home) / "runs" / name).is_dir()]
        if args.quick or not runs:
            runs = runs[:1] or [service.train("ngram", "bach-chorales", name="harmonise-ngram")[0]]
    _, val = music.read_split(runs[0])
    n = args.chorales or (8 if args.quick else len(val))
    chorales = val[:n]
    sopranos = [m.soprano_line(p.notes) for p in chorales]
    rng = np.random.default_rng(0)
    rows = {"real chorales": measure([p.notes for p in chorales], sopranos),
            "random in key (floor)": measure([random_in_key(p, s, rng) for p, s in zip(chorales, sopranos,
                                                                                        strict=True)], sopranos)}
    models = {}
    for run in runs:
        names = [p.name for p in music.read_split(run)[1][:n]]
        if names != [p.name for p in chorales]:
            raise SystemExit(f"{run}: another validation split than {runs[0]}'s: compare runs of one split")
        for k in [int(c) for c in args.candidates.split(",")]:
            pieces, seconds = [], 0.0
            for name in names:
                t0 = time.perf_counter()
                made = service.generate(str(run), {"harmonise_piece": name, "candidates": k}, seed=0)
                seconds += time.perf_counter() - t0
                pieces.append(m.decode(made.outputs[0]["tokens"].split()).notes)
            family = made.record["family"]
            row = f"{family}, {k} candidate{'s' if k > 1 else ''} per note ({run.name})"
            rows[row] = measure(pieces, sopranos)
            models[row] = {"family": family, "run": str(run), "candidates": k, "seconds_per_chorale": seconds / n,
                           "settings": {k: v for k, v in made.record["settings"].items()
                                        if k in ("temperature", "top_k", "top_p", "constrained", "grammar")}}
            print(row, rows[row]["consonant_share"], f"{seconds / n:.1f} s per chorale", file=sys.stderr, flush=True)
    result = {"machine": machine(), "load_start": load_start, "load_end": os.getloadavg(),
              "minutes": (time.time() - t_start) / 60, "chorales": [p.name for p in chorales], "models": models,
              "rows": rows, "command": "python benchmarks/harmonise.py " + " ".join(sys.argv[1:])}
    write_results(args.out, "harmonise-quick" if args.quick else "harmonise", result, markdown(result))


def markdown(result: dict) -> str:
    def cell(stat: dict) -> str:
        return f"{fmt(stat['mean'])} ± {fmt(stat['se'])}"

    lines = [f"# Harmonisation benchmark: the soprano of {len(result['chorales'])} validation chorales", "",
             f"Machine: {describe_machine(result['machine'])}; load average {result['load_start'][0]:.1f} at the "
             f"start, {result['load_end'][0]:.1f} at the end; {result['minutes']:.1f} min in all. "
             f"Command: `{result['command']}`.", "",
             "| harmonisation | soprano kept | lower notes above it | notes per onset | polyphony | "
             "pitch-class entropy | scale consistency | consonant sonorities |", "|---|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['soprano_kept']:.0%} | {row['notes_above']:.1%} | "
                     f"{cell(row['notes_per_onset'])} | {cell(row['polyphony'])} | "
                     f"{cell(row['pitch_class_entropy'])} | {cell(row['scale_consistency'])} | "
                     f"{cell(row['consonant_share'])} |")
    lines += ["", "Each cell: mean ± standard error over the chorales (one harmonisation each, seed 0, sampled at "
              "the music defaults). Seconds per harmonisation: " +
              ", ".join(f"{name} {info['seconds_per_chorale']:.1f}" for name, info in result["models"].items()) +
              ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
