"""The `aigc` command line (Typer). It only parses arguments, calls the service (aigc.service) and prints.

The service (and with it torch, transformers and diffusers: seconds to import) is imported inside the
commands that need it (`_service`), so that `aigc runs`, `aigc data list` and `--help` start at once.

User errors print one line, `error: ...`, on stderr and exit 1 (usage errors exit 2, Ctrl-C 130),
without a traceback; AIGC_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from aigc.errors import Interrupted, UserError
from aigc.fsutil import json_safe

app = typer.Typer(help="AIGC Studio: train, sample and evaluate generative models on your own data.\n\n"
                       "Examples:\n\n  aigc quickstart\n\n  aigc train --family gpt --data tang300 --name poet\n\n"
                       "  aigc generate poet --prompt 春 -n 3\n\n  aigc eval poet",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
data_app = typer.Typer(help="Named corpora and your own data files.\n\nExamples:\n\n  aigc data list\n\n"
                            "  aigc data show tang300", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub: everything is local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def user_errors(fn):
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _fail(str(e), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as e:
            if os.environ.get("AIGC_DEBUG"):
                raise
            if isinstance(e, Interrupted):
                _fail(str(e), 130)
            if isinstance(e, (ValueError, FloatingPointError, OSError)):
                _fail(f"{type(e).__name__}: {e}", 1)
            raise

    return wrapper


def _fail(message: str, code: int):
    from aigc.distributed import is_main_process

    if is_main_process():  # under torchrun every process fails alike: one message
        print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _service():
    """aigc.service, imported when a command needs it (it imports torch: see the module docstring)."""
    from aigc import service

    return service


def _emit_json(obj: dict) -> None:
    print(json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False, default=str))


class TrainCommand(TyperCommand):
    """`aigc train --family F --help` also lists every configuration key of F with its default."""

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        family = ctx.params.get("family")
        if family:
            from aigc.config import describe

            service = _service()
            try:
                text = describe(service.sections_for(family))
            except UserError as e:
                text = str(e)
            with formatter.section(f"Configuration keys of {family} (--set key=value)"):
                formatter.write_text("")
                for line in text.splitlines():
                    formatter.write(f"  {line}\n")
                fam = service.FAMILIES.get(family)
                if fam is not None and fam.init_from:
                    may = f", except {', '.join(fam.init_keys)}" if fam.init_keys else ""
                    formatter.write_text("")
                    formatter.write_text(f"With --init-from the [model] keys come from the checkpoint{may}.")
            if family in service.FAMILIES and service.FAMILIES[family].series is not None:  # e.g. rnn on a series
                with formatter.section(f"Configuration keys of {family} on a series (a named series or a .csv)"):
                    formatter.write_text("")
                    for line in describe(service.sections_for(family, "series")).splitlines():
                        formatter.write(f"  {line}\n")
            if family in service.FAMILIES and service.FAMILIES[family].modality == "text":  # e.g. gpt on chorales
                music_only = {k: v for k, v in service.sections_for(family, "music").items()
                              if k in ("data", "sampling")}
                with formatter.section(f"Configuration keys of {family} on music (bach-chorales, folk-abc, MIDI or ABC "
                                       "files): [model] and [train] as above, and"):
                    formatter.write_text("")
                    for line in describe(music_only).splitlines():
                        formatter.write(f"  {line}\n")


@app.command(cls=TrainCommand)
@user_errors
def train(
    family: Annotated[str, typer.Option(help="ngram | rnn | gpt (text); vae | dcgan | diffusion (images)"
                                             "; ar | rnn (series); simvp (video prediction; vae and diffusion "
                                             "make clips; vae-rnn both)", is_eager=True)],
    data: Annotated[str, typer.Option(help="tang300, song100, fortunes-zh, fortunes, or a .txt/.jsonl/"
                                           "fortune file or a folder; series: sunspots, co2, macrodata, nile, "
                                           "elnino, or a .csv file; video: moving-fashion-mnist, "
                                           "moving-digits, vtest, or GIF/MP4 files; or an upload's id "
                                           "(upl-..., from the studio's Train page or POST /v1/uploads)")],
    val_data: Annotated[str | None, typer.Option(help="validation data (default: the last 10% of --data)")] = None,
    name: Annotated[str | None, typer.Option(help="run name (default: FAMILY-DATA-TIMESTAMP)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run of this name")] = False,
    resume: Annotated[bool, typer.Option(help="continue the run --name from its last checkpoint")] = False,
    max_minutes: Annotated[float | None, typer.Option(help="training-time budget (default 10 when "
                                                          "--max-steps is not given either)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimizer-step budget")] = None,
    init_from: Annotated[str | None, typer.Option(help="continue from the weights of a run (name or directory) of "
                                                       "the same family, with a fresh optimizer and schedule; gpt: "
                                                       "also a local Hugging Face GPT-2 folder")] = None,
    config: Annotated[str | None, typer.Option(help="a TOML file of configuration keys")] = None,
    image_size: Annotated[int | None, typer.Option(help="image families: resize images to N x N")] = None,
    conditional: Annotated[bool, typer.Option(help="image families: the class-conditional variant")] = False,
    order: Annotated[str | None, typer.Option(help="ar: the order p, or auto = BIC over p = 0..--max-order "
                                                   "(default auto)")] = None,
    max_order: Annotated[int | None, typer.Option(help="ar, --order auto: the largest p tried (default 24)")] = None,
    column: Annotated[str | None, typer.Option(help="series: the column of values")] = None,
    time_column: Annotated[str | None, typer.Option(help="series, CSV: the column of dates")] = None,
    freq: Annotated[str | None, typer.Option(help="series, CSV: pandas frequency of the dates (D, W-SUN, MS, "
                                                  "QS, YS; default: inferred)")] = None,
    fill: Annotated[str | None, typer.Option(help="series: missing values are an error, unless interpolate "
                                                  "or drop")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value, repeatable")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Train a model; the last line printed is the run directory.

    Examples:

      aigc train --family gpt --data tang300 --max-minutes 3

      aigc train --family rnn --data poems.txt --set cell=gru --set n_layer=2

      aigc train --family ngram --data fortunes

      aigc train --family gpt --data my.jsonl --init-from ./gpt2-local --max-steps 200

      aigc train --family diffusion --data new_shapes/ --init-from shapes --max-steps 500

      aigc train --family gpt --data tang300 --name poet --resume --max-steps 2000

      aigc train --family vae --data digits --conditional --max-minutes 2

      aigc train --family ar --data sunspots --order auto --max-order 20

      aigc train --family rnn --data co2 --fill interpolate --set block_size=64 --max-minutes 2

    `aigc train --family F --help` lists every --set key of F with its default.
    """
    _quiet_libraries()
    from aigc.config import parse_sets

    service = _service()
    sets = parse_sets(set_ or [])
    sets.update(service.image_flag_sets(family, image_size, conditional))
    series_flags = {"order": order, "max_order": max_order, "column": column, "time_column": time_column,
                    "freq": freq, "fill": fill}
    if any(v is not None for v in series_flags.values()):
        sets.update(service.series_flag_sets(family, data, {k: v for k, v in series_flags.items() if v is not None}))
    run_dir, metrics = service.train(family, data, val_data=val_data, name=name, overwrite=overwrite, resume=resume,
                                     max_minutes=max_minutes, max_steps=max_steps, init_from=init_from,
                                     config_file=config, sets=sets)
    from aigc.distributed import end_processes, is_main_process

    end_processes()
    if not is_main_process():  # under torchrun the main process reports
        return
    if json_out:
        # an AR fit's order and lags are its result: also at the top level, as the docs promise
        fitted = {k: metrics[k] for k in ("order", "lags") if k in metrics}
        _emit_json({"run_dir": str(run_dir), **fitted, "metrics": metrics})
    else:
        shown = {k: v for k, v in metrics.items() if k in ("val_bpc", "val_loss", "val_nelbo", "steps", "order",
                                                           "sigma")}
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()),
              file=sys.stderr)
        print(run_dir)


@app.command()
@user_errors
def sweep(
    family: Annotated[str, typer.Option(help="the family whose settings are searched (ngram, rnn, gpt, vae, "
                                             "dcgan, diffusion, ar)")],
    data: Annotated[str, typer.Option(help="a named data set or a file or folder, as for aigc train")],
    trials: Annotated[int, typer.Option(help="trials this process runs (1..1000); workers add theirs")],
    budget_minutes: Annotated[float | None, typer.Option(help="training time of each trial, in (0, 600]; "
                                                              "gradient-trained families only")] = None,
    space: Annotated[str | None, typer.Option(help="a TOML file of the search space: [key] low/high/log "
                                                   "or choices; key = value fixes a setting")] = None,
    name: Annotated[str | None, typer.Option(help="the study (default sweep-FAMILY-DATA); its runs are "
                                                  "NAME-t000, ...")] = None,
    storage: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the study's database (default: the "
                                                     "store's, $AIGC_DATABASE_URL or sqlite:///$AIGC_HOME/aigc.db)")
                       ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the TPE sampler (give each worker its own)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Search a family's settings for the lowest validation metric with Optuna (TPE, median pruning); every
    trial is an ordinary run, the best one is marked in its run.json (docs/sweep.md).

    Examples:

      aigc sweep --family ngram --data tang300 --trials 7

      aigc sweep --family gpt --data tang300 --trials 20 --budget-minutes 2

      aigc sweep --family rnn --data poems.txt --trials 10 --budget-minutes 1 --space space.toml

      aigc sweep --family gpt --data tang300 --trials 10 --budget-minutes 2 --storage postgresql+psycopg://db/aigc

    Another process or machine with the same --name and --storage joins the same study.
    """
    _quiet_libraries()
    from aigc import sweep as sweeps

    result = sweeps.run_sweep(family=family, data=data, trials=trials, budget_minutes=budget_minutes,
                              space=sweeps.load_space(space) if space is not None else None, name=name,
                              storage=storage, seed=seed, progress=functools.partial(print, file=sys.stderr,
                                                                                     flush=True))
    if json_out:
        _emit_json(result)
        return
    best = result["best"]
    if best is None:
        print(f"study {result['study']}: no trial completed yet", file=sys.stderr)
        return
    params = " ".join(f"{k}={v}" for k, v in best["params"].items())
    print(f"best: trial #{best['number']} {result['objective']} {best['value']:.4f} ({params}) of "
          f"{len(result['trials'])} trials in study {result['study']}", file=sys.stderr)
    print(best["run"])


@app.command()
@user_errors
def optimize(
    run: Annotated[str, typer.Argument(help="the run to improve (a name or a run directory)")],
    from_feedback: Annotated[bool, typer.Option("--from-feedback", help="learn from the ratings and arena votes "
                                                                        "stored for RUN (required)")] = False,
    method: Annotated[str, typer.Option(help="sft: fine-tune on liked outputs; dpo: on preference pairs; "
                                             "rerank: a reward model for best-of-n")] = "sft",
    name: Annotated[str | None, typer.Option(help="the new run's name (default: RUN-METHOD)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run of this name")] = False,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps (default 100 for text, 1000 for images)")
                         ] = None,
    max_minutes: Annotated[float | None, typer.Option(help="training-time budget instead of steps")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value: a [train] key (lr, batch_size, ...) "
                                                                 "or beta, best_of, l2; repeatable")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Make a new run from RUN and people's feedback on it; the last line printed is the new run's directory.

    The new run records its parent, the method and the exact feedback used (aigc runs NEW --json). See
    docs/optimize.md.

    Examples:

      aigc optimize poet --from-feedback --method sft

      aigc optimize poet --from-feedback --method dpo --set beta=0.2 --max-steps 200

      aigc optimize poet --from-feedback --method rerank --name poet-picky
    """
    if not from_feedback:
        raise UserError("aigc optimize learns from feedback so far: pass --from-feedback (a sweep over settings "
                        "is aigc sweep)")
    _quiet_libraries()
    from aigc.config import parse_sets

    run_dir, metrics = _service().optimize(run, method, name=name, overwrite=overwrite, max_steps=max_steps,
                                           max_minutes=max_minutes, sets=parse_sets(set_ or []))
    if json_out:
        _emit_json({"run_dir": str(run_dir), "metrics": metrics})
        return
    shown = {k: v for k, v in metrics.items() if k in ("parent_val_bpc", "val_bpc", "steps", "reward_accuracy")}
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()),
          file=sys.stderr)
    print(run_dir)


@app.command()
@user_errors
def generate(
    run: Annotated[str | None, typer.Argument(help="run name, run directory, or Hugging Face causal-LM folder")] = None,
    prompt: Annotated[str | None, typer.Option(help="text to continue (default: a new document)")] = None,
    n: Annotated[int | None, typer.Option("-n", help="number of samples or images (default 1)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: a fresh one, echoed)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens to generate at most (default 100)")] = None,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature, default 0.8 (music: "
                                                           "the run's calibrated one, aigc calibrate; vae-rnn clips: "
                                                           "the run's, 1); 0 = greedy")] = None,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens (0 = off)")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass (1 = off; music: default 0.95)")] = None,
    min_p: Annotated[float | None, typer.Option(help="drop tokens below min_p x the top probability")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="> 1 discourages repeats (default 1)")] = None,
    num_beams: Annotated[int | None, typer.Option(help="beam search width (default 1: no beam search)")] = None,
    no_repeat_ngram_size: Annotated[int | None, typer.Option(help="forbid repeating any n-gram of this size")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="cut a sample before this string; repeatable")] = None,
    window: Annotated[int | None, typer.Option(help="text and music runs: the most tokens the model reads; past "
                                                    "it, it reads the last half again and goes on (default: the "
                                                    "run's training block_size; 0 = all its positions)")] = None,
    stream: Annotated[bool, typer.Option(help="print the text as it is generated")] = False,
    class_: Annotated[str | None, typer.Option("--class", help="image and sound runs: class name or index")] = None,
    out: Annotated[str | None, typer.Option(help="image, series, music and sound runs: folder for the files")] = None,
    from_image: Annotated[str | None, typer.Option(help="regenerate a PNG (a video run's GIF or MP4, a sound's PNG or "
                                                         "JSON) from the record it carries")] = None,
    sampler: Annotated[str | None, typer.Option(help="diffusion: ddpm | ddim | dpm-solver (default)")] = None,
    steps: Annotated[int | None, typer.Option(help="diffusion: sampling steps (default 20)")] = None,
    eta: Annotated[float | None, typer.Option(help="diffusion, ddim only: 0 = deterministic, 1 = DDPM-like")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="diffusion, conditional: 1 = no guidance")] = None,
    truncation: Annotated[float | None, typer.Option(help="dcgan: truncate latents to [-T, T] (default: none; "
                                                          "smaller = less variety)")] = None,
    horizon: Annotated[int | None, typer.Option(help="series runs: steps to forecast (1..1000)")] = None,
    paths: Annotated[int | None, typer.Option(help="series runs: sample paths to generate (default 0)")] = None,
    level: Annotated[float | None, typer.Option(help="series runs: prediction-interval level (default 0.95)")] = None,
    noise: Annotated[str | None, typer.Option(help="series runs: gaussian (default) | bootstrap (resampled "
                                                   "residuals)")] = None,
    bars: Annotated[int | None, typer.Option(help="music runs: bars per piece (default 8)")] = None,
    prompt_midi: Annotated[str | None, typer.Option(help="music runs: continue the first bars of this MIDI "
                                                         "file")] = None,
    prompt_piece: Annotated[str | None, typer.Option(help="music runs: continue the first bars of this validation "
                                                          "piece of the run (a name of run.json's data.val.names)")
                            ] = None,
    prompt_bars: Annotated[int | None, typer.Option(help="music runs: bars of --prompt-midi or --prompt-piece to "
                                                         "continue (default 2)")] = None,
    harmonise_midi: Annotated[str | None, typer.Option(help="music runs: keep this MIDI file's melody (its top voice) "
                                                            "and write the voices below it")] = None,
    harmonise_piece: Annotated[str | None, typer.Option(help="music runs: keep the soprano of this validation piece "
                                                             "of the run and write the voices below it")] = None,
    candidates: Annotated[int | None, typer.Option(help="music runs, with --harmonise-*: chords drawn per melody "
                                                        "note, the one that best foresees the note kept (default 4; "
                                                        "1: one draw)")] = None,
    constrained: Annotated[bool | None, typer.Option("--constrained/--no-constrained",
                                                     help="music runs: grammar-constrained sampling (default on; "
                                                          "docs/audio.md)")] = None,
    grammar_version: Annotated[int | None, typer.Option(help="music runs: the constrained grammar's version (default "
                                                             "the newest, 2; 1: as before 2026-12-07)")] = None,
    message: Annotated[str | None, typer.Option(help="text runs: chat; print the reply to this user message (the "
                                                     "message is the prompt, as in the API's chat)")] = None,
    best_of: Annotated[int | None, typer.Option(help="runs with a reward model (aigc optimize "
                                                     "--method rerank): keep the best of N candidates per output "
                                                     "(default: the run's own; 1 = off)")] = None,
    no_record: Annotated[bool, typer.Option("--no-record", help="do not record it in the store (aigc history)")
                         ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Generate text, images, or series forecasts and sample paths from a trained run.

    Examples:

      aigc generate poet --prompt 床前明月光 -n 3 --seed 1

      aigc generate poet --temperature 0 --max-new-tokens 64

      aigc generate poet --num-beams 4 -n 2 --no-repeat-ngram-size 3

      aigc generate poet --stop 。 --stream

      aigc generate poet --message 床前明月光

      aigc generate my-vae -n 64 --seed 0 --out pictures/

      aigc generate my-gan -n 16 --truncation 1.5

      aigc generate --from-image pictures/007.png

      aigc generate my-ar --horizon 24 --paths 5 --level 0.9 --seed 0 --json

      aigc generate poet-rerank --prompt 月 --best-of 8

      aigc generate bach-gpt --harmonise-midi soprano.mid -n 2 --seed 0 --out harmonised/
    """
    _quiet_libraries()
    if run is None and from_image is None:
        _fail("missing RUN: give a run name or directory, or --from-image FILE", 2)  # a usage error
    if stream and json_out:
        raise UserError("--stream and --json exclude each other")
    if message is not None and prompt is not None:
        raise UserError("--message and --prompt exclude each other (a chat message is the prompt)")
    service = _service()
    if message is not None:
        prompt = service.chat_prompt([{"role": "user", "content": message}])
    options = {"prompt": prompt, "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
               "top_k": top_k, "top_p": top_p, "min_p": min_p, "repetition_penalty": repetition_penalty,
               "num_beams": num_beams, "no_repeat_ngram_size": no_repeat_ngram_size, "stop": stop or None,
               "class_": class_, "sampler": sampler, "steps": steps, "eta": eta, "guidance_scale": guidance_scale,
               "truncation": truncation, "horizon": horizon, "paths": paths, "level": level, "noise": noise,
               "best_of": best_of, "bars": bars, "prompt_midi": prompt_midi, "prompt_piece": prompt_piece,
               "prompt_bars": prompt_bars, "harmonise_midi": harmonise_midi, "harmonise_piece": harmonise_piece,
               "candidates": candidates, "constrained": constrained, "window": window,
               "grammar_version": grammar_version}
    options = {k: v for k, v in options.items() if v is not None}
    if from_image is not None:
        if run is not None or seed is not None or options:
            raise UserError("--from-image takes the run, seed, class and sampler from the image's record: "
                            "give no RUN, -n, --seed, --class or sampling option")
        generation = service.regenerate_image(from_image)
    else:
        generation = service.generate(run, options, seed=seed, stream=print_stream if stream else None)
    request = {"endpoint": "cli", "run": run, "from_image": from_image, "seed": seed, **options}
    if generation.modality == "text":
        if message is not None:  # the reply alone, as chat answers
            generation.outputs = [s[len(prompt):] for s in generation.outputs]
        _show_text(generation, stream, json_out)
        if not no_record:
            _record(service, generation, request)
        return
    files = service.save(generation, out)
    if not no_record:
        _record(service, generation, request, files)
    if generation.modality == "music":
        if json_out:
            _emit_json({"files": files, "settings": generation.record["settings"],
                        "rendered_with": generation.extra.get("rendered_with"), "outputs": generation.outputs})
            return
        for path in files:
            print(path)
        print(f"{len(generation.outputs)} piece(s) of {', '.join(str(o['bars']) for o in generation.outputs)} bars, "
              f"seed {generation.record['settings']['seed']}; audio: {generation.extra.get('rendered_with')}",
              file=sys.stderr)
        return
    if generation.modality == "sound":  # NNN.wav, NNN.png and NNN.json per sound
        if json_out:
            record = generation.record
            _emit_json({"files": files, "settings": record["settings"], "sounds": record["sounds"],
                        "sounds_per_s": record["sounds_per_s"]})
            return
        for path in files:
            print(path)
        return
    if generation.modality == "video":  # NNN.gif and NNN.mp4 per clip, and sheet.png
        if json_out:
            record = generation.record
            _emit_json({"files": files, "sheet": generation.extra.get("sheet"), "settings": record["settings"],
                        "clips": record["clips"], "clips_per_s": record["clips_per_s"]})
            return
        for path in files:
            print(path)
        return
    if generation.modality == "image":
        if json_out:
            settings = generation.record["settings"]
            _emit_json({"files": files, "grid": generation.extra.get("grid"), "settings": settings,
                        **({"images_per_s": generation.record["images_per_s"]}
                           if "images_per_s" in generation.record else {})})
            return
        for path in files:
            print(path)
        if generation.extra.get("grid"):
            print(f"grid: {generation.extra['grid']}", file=sys.stderr)
        return
    result = {**generation.outputs, "files": files, "seconds": generation.record["seconds"],
              "settings": generation.record["settings"]}
    if json_out:
        _emit_json(result)
        return
    print(f"{'time':<20} {'forecast':>14} {'lower':>14} {'upper':>14}")
    for row in zip(result["time"], result["forecast"], result["lower"], result["upper"], strict=True):
        print(f"{row[0]!s:<20} {row[1]:>14.6g} {row[2]:>14.6g} {row[3]:>14.6g}")
    print(f"{result['level']:.0%} intervals; seed {result['settings']['seed']}; files: "
          f"{', '.join(result['files'])}", file=sys.stderr)


def _record(service, generation, request: dict, files: list[str] | None = None) -> None:
    from aigc.db import Store

    with Store() as db:
        ids = service.record(generation, db, source="cli", request=request, files=files)
    print(f"recorded as {ids[0]}{f' .. {ids[-1]}' if len(ids) > 1 else ''} (aigc history)", file=sys.stderr)


def print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _show_text(generation, stream: bool, json_out: bool) -> None:
    record, samples = generation.record, generation.outputs
    seed, rate = record["settings"]["seed"], record["stats"]["tokens_per_s"]
    if json_out:
        _emit_json({"run": record["run"], "samples": samples, "settings": record["settings"],
                    "stats": record["stats"]})
    elif stream:
        print()
        print(f"seed {seed}, {rate:.1f} tokens/s", file=sys.stderr)
    else:
        for i, sample in enumerate(samples):
            if len(samples) > 1:
                print(f"--- sample {i + 1} (seed {seed})")
            print(sample)
        print(f"seed {seed}, {rate:.1f} tokens/s", file=sys.stderr)


@app.command("calibrate")
@user_errors
def calibrate(
    run: Annotated[str, typer.Argument(help="a music run: run name or run directory")],
    pieces: Annotated[int | None, typer.Option(help="pieces sampled at each temperature 0.5, 0.6, ..., 0.9 "
                                                    "(default 64)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Fit a music run's sampling temperature to its training pieces (their pitch-class entropy and
    scale consistency), and sample at it from then on unless a temperature is given. Runs of rnn and gpt
    do this when training ends; this re-does it, e.g. with more pieces, or for a run made before.

    Example:

      aigc calibrate chorales --pieces 128
    """
    _quiet_libraries()
    result = _service().calibrate(run, pieces)
    if json_out:
        _emit_json(result)
        return
    fitted = result["calibration"]["fitted"]
    edge = " (at the edge of the temperatures tried)" if result["calibration"]["at_edge"] else ""
    print(f"temperature {result['temperature']:.2f}, top-p {result['top_p']}{edge}: pitch-class entropy "
          f"{fitted['pitch_class_entropy']:.3f} (training pieces "
          f"{result['calibration']['training']['pitch_class_entropy']:.3f}), scale consistency "
          f"{fitted['scale_consistency']:.3f} ({result['calibration']['training']['scale_consistency']:.3f}); "
          f"{result['calibration']['seconds']:.0f} s")


@app.command("eval")
@user_errors
def eval_(
    run: Annotated[str | None, typer.Argument(help="run name or run directory")] = None,
    images: Annotated[str | None, typer.Option(help="score this folder of images instead of a run "
                                                    "(with --data)")] = None,
    data: Annotated[str | None, typer.Option(help="with --images: the data set to score against (digits, "
                                                  "fashion-mnist, a folder or an array file)")] = None,
    n: Annotated[int | None, typer.Option("-n", help="image runs and --images: images scored (default 2000, "
                                                      "at most the held-out images); music runs: pieces sampled "
                                                      "(default 8)")] = None,
    out: Annotated[str | None, typer.Option(help="with --images: also write the JSON result to this file")] = None,
    horizon: Annotated[int | None, typer.Option(help="series runs: back-test forecasts of 1..H steps "
                                                     "(default 1)")] = None,
    level: Annotated[float | None, typer.Option(help="series runs: the interval level whose coverage is "
                                                     "scored (default 0.95)")] = None,
    temperature: Annotated[float | None, typer.Option(help="music runs: the sampling temperature of the pieces "
                                                           "(default: the run's calibrated one, aigc "
                                                           "calibrate)")] = None,
    top_p: Annotated[float | None, typer.Option(help="music runs: the pieces' top-p (default: the run's, "
                                                     "0.95)")] = None,
    constrained: Annotated[bool | None, typer.Option("--constrained/--no-constrained",
                                                     help="music runs: sample the pieces with the grammar (default: "
                                                          "the music default, on)")] = None,
    seed: Annotated[int | None, typer.Option(help="music runs: the seed of the pieces sampled (default 0)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Score a run on its validation split (bits per character, perplexity), sample from it
    (diversity, novelty, speed) and write eval.json and report.html into the run. Image runs get
    FID, KID, precision, recall, ... with their floors; --images scores any folder of images the
    same way against a data set's held-out images, and writes nothing into the folder.

    Examples:

      aigc eval poet --json

      aigc eval --images generated/ --data digits --json

      aigc eval my-ar --horizon 12 --level 0.9 --json
    """
    _quiet_libraries()
    if run is not None and images is not None:
        raise UserError("give a RUN or --images FOLDER, not both")
    if run is None and images is None:
        _fail("missing RUN: give a run name or directory, or --images FOLDER --data DATASET", 2)  # a usage error
    service = _service()
    if images is None:
        for flag, value in (("--data", data), ("--out", out)):
            if value is not None:
                raise UserError(f"{flag} applies to --images (a run is scored on its own data, into <run>/eval.json)")
        result = service.evaluate(run, {"n": n, "horizon": horizon, "level": level, "temperature": temperature,
                                        "top_p": top_p, "constrained": constrained, "seed": seed})
    else:
        if data is None:
            raise UserError("--images needs --data DATASET: the data set whose held-out images it is scored against")
        if horizon is not None or level is not None:
            raise UserError(f"--{'horizon' if horizon is not None else 'level'} applies to series runs")
        if temperature is not None or top_p is not None or constrained is not None or seed is not None:
            flag = "temperature" if temperature is not None else "top-p" if top_p is not None else \
                "constrained" if constrained is not None else "seed"
            raise UserError(f"--{flag} applies to music runs")
        result = service.evaluate_image_folder(images, data, n, out=out)
    if json_out:
        _emit_json(result)  # the same object as <run>/eval.json (or --out FILE)
        return
    for key, value in result["metrics"].items():
        print(f"{key:>16}  {value:.4f}" if isinstance(value, float) else f"{key:>16}  {value}")
    if images is not None:
        net = result["feature_net"]
        quality = (f"test accuracy {net['test_accuracy']:.3f}" if net["test_accuracy"] is not None
                   else f"test MSE {net['test_mse']:.4f}")
        print(f"{result['n']} images of {result['images']} against as many held-out images of {data}; "
              f"feature net: {net['kind']}, {quality}", file=sys.stderr)
    elif "naive" in result:  # a series run's back-test
        naive = result["naive"]
        print(f"naive forecast on the same origins: mae {naive['mae']:.4g}, mase {naive['mase']:.4f}; "
              f"picture: {result['picture']}", file=sys.stderr)
    elif "floors" in result:  # a video predictor: each metric beside its three floors
        floors = result["floors"]
        print(f"{'metric':>8} {'model':>10} " + " ".join(f"{name:>11}" for name in floors))
        for key in ("mse", "mae", "psnr", "ssim"):
            print(f"{key:>8} {result['metrics'][key]:>10.4f} " + " ".join(f"{f[key]:>11.4f}" for f in floors.values()))
        print(f"{result['clips']} validation clips; beats every floor on every metric: "
              f"{'yes' if result['metrics']['beats_floors'] else 'no'}", file=sys.stderr)
    elif "clip_net" in result:  # a clip generator: the clip net its clip-level distance is measured in
        net = result["clip_net"]
        print(f"{result['clips']} clips against as many validation clips; clip net: class accuracy "
              f"{net['class_accuracy']:.3f}, time-order accuracy {net['order_accuracy']:.3f}", file=sys.stderr)
    elif "statistics" in result:  # a music run: each statistic of the samples beside the pieces'
        stats, floors = result["statistics"], result["within_floor"]
        print(f"{'statistic':>20} {'samples':>8} {'val':>8} {'train':>8}  within the floor or 2 SE")
        for key in stats["samples"]:
            print(f"{key:>20} {stats['samples'][key]['mean']:>8.3f} {stats['val'][key]['mean']:>8.3f} "
                  f"{stats['train'][key]['mean']:>8.3f}  {'yes' if floors[key]['met'] else 'no'}")
    elif (Path(result["run"]) / "report.html").is_file():
        print(f"report: {Path(result['run']) / 'report.html'}")


@app.command()
@user_errors
def runs(
    run: Annotated[str | None, typer.Argument(help="show one run in detail")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
):
    """List the runs in $AIGC_HOME/runs, or show one.

    Examples:

      aigc runs

      aigc runs poet --json
    """
    from aigc.store import find_run, list_runs, read_run, runs_dir, summary

    if run is not None:
        run_dir = find_run(run)
        detail = {**summary(run_dir), "record": read_run(run_dir)}
        eval_path = run_dir / "eval.json"
        if eval_path.is_file():
            detail["eval"] = json.loads(eval_path.read_text(encoding="utf-8"))["metrics"]
        if json_out:
            _emit_json(detail)
        else:
            for key in ("name", "path", "family", "data", "status", "created", "steps", "val_bpc", "dtype"):
                print(f"{key:>10}  {detail[key]}")
            made = detail["record"].get("optimize")
            if made:  # a run of aigc optimize: its lineage
                fed = made["feedback"]
                print(f"{'parent':>10}  {made['parent']} (--method {made['method']}; {fed['liked']} liked, "
                      f"{fed['disliked']} disliked, {fed['pairs']} pairs; feedback sha256 {fed['sha256'][:16]})")
            for key, value in detail.get("eval", {}).items():
                print(f"{key:>16}  {value}")
        return
    rows = list_runs()
    if json_out:
        _emit_json({"runs_dir": str(runs_dir()), "runs": rows})
        return
    if not rows:
        print(f"no runs in {runs_dir()} (start one with: aigc train --family gpt --data tang300)", file=sys.stderr)
        return
    print(f"{'name':<36} {'family':<9} {'status':<11} {'steps':>6} {'score':>18}  data")
    for r in rows:
        score = f"{r['score']['metric']} {r['score']['value']:.4f}" if r["score"] else "-"
        parent = f"  <- {r['parent']} ({r['method']})" if r["parent"] else f"  ({r['error']})" if r.get("error") else ""
        print(f"{r['name']:<36} {r['family']:<9} {str(r['status']):<11} {str(r['steps'] or 0):>6} {score:>18}  "
              f"{r['data']}{parent}")


@app.command()
@user_errors
def report(
    out: Annotated[str | None, typer.Option(help="the HTML file to write (default $AIGC_HOME/report.html)")] = None,
    runs: Annotated[str | None, typer.Option(help="runs directory to report (default $AIGC_HOME/runs)")] = None,
    database: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the store (default $AIGC_DATABASE_URL, "
                                                      "else sqlite:///$AIGC_HOME/aigc.db)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Write one static HTML page of every run: metrics side by side, the arena's leaderboard, loss curves,
    samples, lineage and feedback. It opens offline; the last line printed is its path (docs/report.md).

    Examples:

      aigc report

      aigc report --out /tmp/runs.html --json
    """
    from aigc import report as reports

    result = reports.write(out, runs=runs, database=database)
    if json_out:
        _emit_json(result)
        return
    for problem in result["store_problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if result["problems"]:
        print(f"{result['problems']} of {result['runs']} runs could not be read in full (the page says why)",
              file=sys.stderr)
    print(result["report"])


@data_app.command("list")
def data_list():
    """The named corpora and whether they are installed.

    Example:

      aigc data list
    """
    from aigc.data.text import CORPORA, load_corpus

    width = max(len(name) for name in CORPORA)
    print(f"{'name':<{width}} {'installed':<9} {'package':<12} description")
    for name, corpus in CORPORA.items():
        try:
            load_corpus(name)
            installed = "yes"
        except UserError:
            installed = "no"
        print(f"{name:<{width}} {installed:<9} {corpus.package:<12} {corpus.description}")
    print("\nYour own data: a .txt file, a folder of them, a fortune file (entries split by '%' lines) "
          "or a .jsonl file with a \"text\" field.")
    from aigc.data.series import series_table

    print(f"\n{'series':<12} {'values':>6} {'missing':>7} {'freq':<7} {'season':>6} {'column':<12} "
          f"description (statsmodels' bundled data)")
    for row in series_table():
        print(f"{row['name']:<12} {row['values']:>6} {row['missing']:>7} {row['freq']:<7} {row['season'] or '-':>6} "
              f"{row['column']:<12} {row['description']}")
    print("\nYour own series: a .csv file (--column, --time-column, --freq; missing values need --fill).")
    from aigc.data.music import MUSIC_CORPORA

    print(f"\n{'music':<14} {'source':<14} {'licence':<44} description")
    for name, corpus in MUSIC_CORPORA.items():
        print(f"{name:<14} {corpus.package:<14} {corpus.licence:<44} {corpus.description}")
    print("\nYour own music: a .mid/.midi file or a folder of them (ngram, rnn, gpt; docs/audio.md).")
    from aigc.data.images import named_installed as images_installed
    from aigc.data.video import NAMED_VIDEOS, REAL_VIDEOS, real_installed

    print(f"\n{'video':<22} {'installed':<9} {'package':<22} description")
    for name, clips in NAMED_VIDEOS.items():
        print(f"{name:<22} {'yes' if images_installed(clips.images) else 'no':<9} {clips.package:<22} "
              f"{clips.description}")
    for name, real in REAL_VIDEOS.items():
        print(f"{name:<22} {'yes' if real_installed(name) else 'no':<9} {real.package:<22} {real.description} "
              f"({real.licence})")
    print("\nYour own clips: a GIF, MP4 or AVI file or a folder of them (simvp predicts; vae, diffusion make clips; "
          "docs/video.md).")
    from aigc.data.sounds import NAMED_SOUNDS, named_installed

    print(f"\n{'sounds':<10} {'installed':<9} {'package':<18} description")
    for name, sounds in NAMED_SOUNDS.items():
        print(f"{name:<10} {'yes' if named_installed(name) else 'no':<9} {sounds.package:<18} {sounds.description}")
    print("\nYour own sounds: a folder of WAV/FLAC/OGG hits, classes from its sub-folders (vae, dcgan, diffusion; "
          "docs/audio.md).")


@data_app.command("show")
@user_errors
def data_show(data: Annotated[str, typer.Argument(help="a named corpus or a path")],
              text_field: Annotated[str, typer.Option(help="field holding the text in JSONL files")] = "text",
              json_out: Annotated[bool, typer.Option("--json")] = False):
    """Statistics and the start of a corpus, as the training would see it.

    Examples:

      aigc data show tang300

      aigc data show co2
    """
    from aigc.data.series import is_series_data
    from aigc.data.sounds import is_sound_data

    if is_series_data(data):
        _show_series(data, json_out)
        return
    if is_sound_data(data):
        _show_sounds(data, json_out)
        return
    from aigc.data.text import load_corpus, split_corpus

    corpus = load_corpus(data, text_field=text_field)
    chars = "".join(corpus.docs)
    try:
        train_docs, val_docs = split_corpus(corpus)
    except UserError:  # too small to split: still worth showing
        train_docs, val_docs = list(corpus.docs), []
    info = {"source": corpus.source, "docs": len(corpus.docs), "chars": corpus.n_chars,
            "distinct_chars": len(set(chars)), "sha256": corpus.sha256,
            "train_chars": sum(map(len, train_docs)), "val_chars": sum(map(len, val_docs))}
    if json_out:
        _emit_json({**info, "head": corpus.docs[0][:300]})
        return
    for key, value in info.items():
        print(f"{key:>15}  {value:,}" if isinstance(value, int) else f"{key:>15}  {value}")
    print("--- first document:")
    print(corpus.docs[0][:300])


def _show_sounds(data: str, json_out: bool) -> None:
    from aigc.data.sounds import describe

    info = describe(data)
    if json_out:
        _emit_json(info)
        return
    for key in ("name", "package", "folder", "files", "train_files", "val_files", "copyright"):
        if info.get(key) is not None:
            print(f"{key:>12}  {info[key]}")
    print(f"{'licences':>12}  {', '.join(f'{k} {v}' for k, v in info['licences'].items())}")
    for name, files in info["classes"].items():
        print(f"{name:>12}  {len(files):>3}  {' '.join(f.rsplit('.', 1)[0] for f in files)}")


def _show_series(data: str, json_out: bool) -> None:
    from aigc.data.series import SeriesDataConfig, load_series

    series = load_series(data, SeriesDataConfig(fill="drop"))  # statistics of the values present
    v = series.values
    info = {**{k: val for k, val in series.describe().items() if k not in ("fill", "dropped", "sha256")},
            "values": len(v) + series.missing, "min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}
    head = [{"time": t, "value": float(x)} for t, x in zip(series.time[:10], v[:10], strict=False)]
    if json_out:
        _emit_json({**info, "head": head})
        return
    for key, value in info.items():
        print(f"{key:>10}  {value:.6g}" if isinstance(value, float) else f"{key:>10}  {value}")
    if series.missing:
        print(f"{'':>10}  ({series.missing} missing: train with --fill interpolate or --fill drop)")
    print("--- first values:")
    for row in head:
        print(f"{row['time']!s:<20} {row['value']:g}")


@app.command()
@user_errors
def quickstart(
    data: Annotated[str, typer.Option(help="corpus to fine-tune on")] = "tang300",
    pretrain_data: Annotated[str, typer.Option(help="corpus to pretrain on first, or 'none'")] = "fortunes-zh-notang",
    pretrain_steps: Annotated[int, typer.Option(help="pretraining steps (about 3 minutes)")] = 1200,
    max_steps: Annotated[int, typer.Option(help="fine-tuning steps (about 1 minute)")] = 300,
    name: Annotated[str, typer.Option(help="name of the final run (replaced if it exists); NAME-pretrain and "
                                           "NAME-ngram are the other two")] = "quickstart",
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value for both stages, repeatable")] = None,
):
    """The main job: pretrain a small GPT, fine-tune it on the Tang poems, write poems, evaluate them beside the
    n-gram baseline.

    Example:

      aigc quickstart
    """
    _quiet_libraries()
    from aigc.config import parse_sets
    from aigc.quickstart import run

    if pretrain_steps < 1 or max_steps < 1:
        raise UserError("--pretrain-steps and --max-steps must be >= 1")
    run(data=data, pretrain_data=None if pretrain_data == "none" else pretrain_data, pretrain_steps=pretrain_steps,
        max_steps=max_steps, name=name, sets=parse_sets(set_ or []))


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option(help="address to bind; anything but loopback needs an API key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    runs: Annotated[str | None, typer.Option(help="runs directory to serve (default $AIGC_HOME/runs)")] = None,
    model: Annotated[list[str] | None, typer.Option(help="NAME=DIR: also serve a local Hugging Face causal-LM "
                                                         "folder as model NAME; repeatable")] = None,
    database: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the store (default $AIGC_DATABASE_URL, "
                                                      "else sqlite:///$AIGC_HOME/aigc.db)")] = None,
    max_body_mb: Annotated[float, typer.Option(help="largest request body accepted (413 beyond)")] = 4.0,
    max_upload_mb: Annotated[float, typer.Option(help="largest upload of data to train on (413 beyond)")] = 100.0,
    rate_limit: Annotated[int, typer.Option(help="requests a minute per API key or client (0 = off; 429 beyond)")
                          ] = 600,
    max_queue: Annotated[int, typer.Option(help="generations waiting at most (503 with Retry-After beyond)")] = 32,
    batching: Annotated[bool, typer.Option(help="decode concurrent text requests to one model together")] = True,
    batch_size: Annotated[int, typer.Option(help="samples in one decoding batch at most")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="how long a batch waits at most for more requests "
                                                        "(5 ms without a new one ends the wait)")] = 50.0,
    stream_interval_ms: Annotated[float, typer.Option(help="streamed text goes out at most this often; the tokens "
                                                           "in between share a chunk (0: a chunk per token)")] = 20.0,
):
    """Serve every run (and --model folders) over HTTP: an OpenAI-compatible API, images and forecasts, the store
    of generations and ratings (docs/serve.md).

    Examples:

      aigc serve

      aigc serve --port 8080 --model gpt2=/models/gpt2

      aigc keys create laptop && aigc serve --host 0.0.0.0

    The web studio is at http://127.0.0.1:8000/ (`aigc studio` also opens it in the browser).
    """
    _serve(host=host, port=port, runs=runs, model=model, database=database, max_body_mb=max_body_mb,
           max_upload_mb=max_upload_mb, rate_limit=rate_limit, max_queue=max_queue, batching=batching,
           batch_size=batch_size, batch_window_ms=batch_window_ms, stream_interval_ms=stream_interval_ms)


@app.command()
@user_errors
def studio(
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    runs: Annotated[str | None, typer.Option(help="runs directory to serve (default $AIGC_HOME/runs)")] = None,
    database: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the store (default $AIGC_DATABASE_URL, "
                                                      "else sqlite:///$AIGC_HOME/aigc.db)")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="largest upload of data to train on (413 beyond)")] = 100.0,
    browser: Annotated[bool, typer.Option(help="open the studio in the web browser")] = True,
    run: Annotated[str | None, typer.Option(help="open the studio on this run's Generate page")] = None,
):
    """The web studio: `aigc serve` on loopback, opening http://127.0.0.1:PORT/ in the browser (docs/studio.md).

    Examples:

      aigc studio

      aigc studio --port 8080 --no-browser

      aigc studio --run poet
    """
    from urllib.parse import quote

    page = f"#/generate?model={quote(run)}" if run else ""
    _serve(host="127.0.0.1", port=port, runs=runs, model=None, database=database, max_upload_mb=max_upload_mb,
           open_browser=browser, page=page)


def _serve(*, host: str, port: int, runs: str | None, model: list[str] | None, database: str | None,
           max_body_mb: float = 4.0, max_upload_mb: float = 100.0, rate_limit: int = 600, max_queue: int = 32,
           batching: bool = True, batch_size: int = 16, batch_window_ms: float = 50.0, stream_interval_ms: float = 20.0,
           open_browser: bool = False, page: str = "") -> None:
    _quiet_libraries()
    from aigc.server import parse_models
    from aigc.server import serve as run_server
    from aigc.server.app import ServerConfig
    from aigc.store import runs_dir

    if not max_body_mb > 0 or not max_upload_mb > 0 or rate_limit < 0 or max_queue < 0:
        raise UserError("--max-body-mb and --max-upload-mb must be > 0, --rate-limit and --max-queue >= 0")
    if not 1 <= batch_size <= 256 or not 0 <= batch_window_ms <= 1000 or not 0 <= stream_interval_ms <= 1000:
        raise UserError("--batch-size must be in 1..256, --batch-window-ms and --stream-interval-ms in 0..1000")
    root = Path(runs).expanduser().resolve() if runs else runs_dir()
    if runs and not root.is_dir():
        raise UserError(f"--runs {runs}: no such directory")
    config = ServerConfig(runs=root, models=parse_models(model or []), database=database,
                          max_body_bytes=int(max_body_mb * 2**20), max_upload_bytes=int(max_upload_mb * 2**20),
                          rate_limit=rate_limit, max_queue=max_queue, batching=batching, batch_rows=batch_size,
                          batch_window_ms=batch_window_ms, stream_interval_ms=stream_interval_ms)
    run_server(config, host=host, port=port,
               on_started=(lambda url: _open_browser(url + page)) if open_browser else None)


def _open_browser(url: str) -> None:
    import webbrowser

    print(f"the studio: {url}", file=sys.stderr, flush=True)
    if not webbrowser.open(url):
        print(f"open {url} in your browser", file=sys.stderr, flush=True)


keys_app = typer.Typer(help="API keys of `aigc serve` (stored hashed in the store).\n\nExamples:\n\n"
                            "  aigc keys create laptop\n\n  aigc keys list\n\n  aigc keys revoke laptop",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
@user_errors
def keys_create(name: Annotated[str, typer.Argument(help="a name for the key (who or what uses it)")]):
    """Make an API key; it is printed once and stored only as a hash."""
    from aigc.db import Store

    with Store() as db:
        row, secret = db.create_key(name)
    print(secret)
    print(f"key {row['name']!r} ({row['id']}): send it as Authorization: Bearer <key>; it is not shown again",
          file=sys.stderr)


@keys_app.command("list")
@user_errors
def keys_list(json_out: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False):
    """The API keys (name, id, first characters, created, revoked)."""
    from aigc.db import Store

    with Store() as db:
        rows = db.list_keys()
    if json_out:
        _emit_json({"keys": rows})
        return
    if not rows:
        print("no API keys (aigc keys create NAME makes one)", file=sys.stderr)
    for r in rows:
        print(f"{r['name']:<24} {r['id']:<30} {r['prefix']}...  created {r['created']}"
              f"{'  REVOKED ' + r['revoked'] if r['revoked'] else ''}")


@keys_app.command("revoke")
@user_errors
def keys_revoke(name: Annotated[str, typer.Argument(help="the key's name or id")]):
    """Revoke an API key: requests with it get 401 from now on."""
    from aigc.db import Store

    with Store() as db:
        row = db.revoke_key(name)
    print(f"revoked key {row['name']!r} ({row['id']})", file=sys.stderr)


history_app = typer.Typer(help="Every generation recorded in the store, with its ratings.", invoke_without_command=True)
app.add_typer(history_app, name="history")


@history_app.callback()
@user_errors
def history(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Option(help="only this run's generations")] = None,
    rated: Annotated[bool, typer.Option("--rated", help="only rated generations")] = False,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
):
    """List recorded generations, newest first.

    Examples:

      aigc history

      aigc history --run poet --rated --json

      aigc history export feedback.jsonl
    """
    if ctx.invoked_subcommand is not None:
        return
    from aigc.db import Store

    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    with Store() as db:
        rows = db.list_generations(run=run, rated=True if rated else None, limit=limit)
    if json_out:
        _emit_json({"generations": rows})
        return
    if not rows:
        print("no generations recorded yet", file=sys.stderr)
    for r in rows:
        score = sum(x["score"] for x in r["ratings"])
        what = r["output"][0] if r["modality"] == "text" and r["output"] else (r["file"] or "")
        what = str(what).replace("\n", " ")
        print(f"{r['id']}  {r['created'][:19]}  {r['source']:<6} {r['run']:<24} "
              f"{'rated ' + format(score, '+d') if r['ratings'] else 'unrated':<9} {what[:60]}")


@history_app.command("export")
@user_errors
def history_export(
    file: Annotated[str, typer.Argument(help="JSON lines file to write (replaced)")],
    run: Annotated[str | None, typer.Option(help="only this run's generations")] = None,
):
    """Export generations with their ratings, one JSON object a line."""
    from aigc.db import Store

    with Store() as db:
        count = db.export_jsonl(Path(file), run=run)
    print(f"wrote {count} generations to {file}", file=sys.stderr)


def main() -> None:
    app()
