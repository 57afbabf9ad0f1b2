"""The `aigc` command line (Typer). It only parses arguments and calls the library.

User errors print one line, `error: ...`, on stderr and exit 1 (usage errors exit 2, Ctrl-C 130),
without a traceback; AIGC_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from aigc.errors import UserError
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
            from aigc.train import Interrupted

            if isinstance(e, Interrupted):
                _fail(str(e), 130)
            if isinstance(e, (ValueError, FloatingPointError, OSError)):
                _fail(f"{type(e).__name__}: {e}", 1)
            raise

    return wrapper


def _fail(message: str, code: int):
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _emit_json(obj: dict) -> None:
    print(json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False, default=str))


class TrainCommand(TyperCommand):
    """`aigc train --family F --help` also lists every configuration key of F with its default."""

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        family = ctx.params.get("family")
        if family:
            from aigc.config import describe
            from aigc.runs import sections_for

            try:
                text = describe(sections_for(family))
            except UserError as e:
                text = str(e)
            with formatter.section(f"Configuration keys of {family} (--set key=value)"):
                formatter.write_text("")
                for line in text.splitlines():
                    formatter.write(f"  {line}\n")


@app.command(cls=TrainCommand)
@user_errors
def train(
    family: Annotated[str, typer.Option(help="ngram | rnn | gpt", is_eager=True)],
    data: Annotated[str, typer.Option(help="tang300, song100, fortunes-zh, fortunes, or a .txt/.jsonl/"
                                           "fortune file or a folder")],
    val_data: Annotated[str | None, typer.Option(help="validation data (default: the last 10% of --data)")] = None,
    name: Annotated[str | None, typer.Option(help="run name (default: FAMILY-DATA-TIMESTAMP)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run of this name")] = False,
    resume: Annotated[bool, typer.Option(help="continue the run --name from its last checkpoint")] = False,
    max_minutes: Annotated[float | None, typer.Option(help="training-time budget (default 10 when "
                                                          "--max-steps is not given either)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimizer-step budget")] = None,
    init_from: Annotated[str | None, typer.Option(help="gpt: a local Hugging Face GPT-2 folder to fine-tune")] = None,
    config: Annotated[str | None, typer.Option(help="a TOML file of configuration keys")] = None,
    image_size: Annotated[int | None, typer.Option(help="image families: resize images to N x N")] = None,
    conditional: Annotated[bool, typer.Option(help="image families: the class-conditional variant")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value, repeatable")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Train a model; the last line printed is the run directory.

    Examples:

      aigc train --family gpt --data tang300 --max-minutes 3

      aigc train --family rnn --data poems.txt --set cell=gru --set n_layer=2

      aigc train --family ngram --data fortunes

      aigc train --family gpt --data my.jsonl --init-from ./gpt2-local --max-steps 200

      aigc train --family gpt --data tang300 --name poet --resume --max-steps 2000

      aigc train --family vae --data digits --conditional --max-minutes 2

    `aigc train --family F --help` lists every --set key of F with its default.
    """
    _quiet_libraries()
    from aigc.config import parse_sets
    from aigc.runs import train as run_train

    sets = parse_sets(set_ or [])
    if image_size is not None or conditional:
        from aigc.runs import family_of

        if family_of(family).modality != "image":
            raise UserError(f"--{'image-size' if image_size is not None else 'conditional'} applies to image "
                            f"families, not {family}")
        if image_size is not None:
            sets["image_size"] = str(image_size)
        if conditional:
            sets["conditional"] = "true"
    run_dir, metrics = run_train(family, data, val_data=val_data, name=name, overwrite=overwrite,
                                 resume=resume, max_minutes=max_minutes, max_steps=max_steps,
                                 init_from=init_from, config_file=config, sets=sets)
    if json_out:
        _emit_json({"run_dir": str(run_dir), "metrics": metrics})
    else:
        shown = {k: v for k, v in metrics.items() if k in ("val_bpc", "val_loss", "val_nelbo", "steps")}
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()),
              file=sys.stderr)
        print(run_dir)


@app.command()
@user_errors
def generate(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(help="run name, run directory, or Hugging Face causal-LM folder")] = None,
    prompt: Annotated[str, typer.Option(help="text to continue (default: a new document)")] = "",
    n: Annotated[int, typer.Option("-n", help="number of samples")] = 1,
    seed: Annotated[int | None, typer.Option(help="random seed (default: a fresh one, echoed)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 100,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature, default 0.8; 0 = greedy")] = None,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens (0 = off)")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass (1 = off)")] = None,
    min_p: Annotated[float | None, typer.Option(help="drop tokens below min_p x the top probability")] = None,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats")] = 1.0,
    num_beams: Annotated[int, typer.Option(help="beam search width (1 = no beam search)")] = 1,
    no_repeat_ngram_size: Annotated[int, typer.Option(help="forbid repeating any n-gram of this size")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="cut a sample before this string; repeatable")] = None,
    stream: Annotated[bool, typer.Option(help="print the text as it is generated")] = False,
    class_: Annotated[str | None, typer.Option("--class", help="image runs: class name or index")] = None,
    out: Annotated[str | None, typer.Option(help="image runs: folder for the PNGs")] = None,
    from_image: Annotated[str | None, typer.Option(help="regenerate a PNG from the record it carries")] = None,
    sampler: Annotated[str | None, typer.Option(help="diffusion: ddpm | ddim | dpm-solver (default)")] = None,
    steps: Annotated[int | None, typer.Option(help="diffusion: sampling steps (default 20)")] = None,
    eta: Annotated[float | None, typer.Option(help="diffusion, ddim only: 0 = deterministic, 1 = DDPM-like")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="diffusion, conditional: 1 = no guidance")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Generate text (or images) from a trained run.

    Examples:

      aigc generate poet --prompt 床前明月光 -n 3 --seed 1

      aigc generate poet --temperature 0 --max-new-tokens 64

      aigc generate poet --num-beams 4 -n 2 --no-repeat-ngram-size 3

      aigc generate poet --stop 。 --stream

      aigc generate my-vae -n 64 --seed 0 --out pictures/

      aigc generate --from-image pictures/007.png
    """
    _quiet_libraries()
    if run is None and from_image is None:
        _fail("missing RUN: give a run name or directory, or --from-image FILE", 2)  # a usage error
    if from_image is not None or _is_image_run(run):
        options = {"sampler": sampler, "steps": steps, "eta": eta, "guidance_scale": guidance_scale}
        _generate_images(ctx, run, n, seed, class_, out, from_image, json_out, options)
        return
    for flag in ("class_", "out", "sampler", "steps", "eta", "guidance_scale"):
        if _given(ctx, flag):
            raise UserError(f"--{flag.rstrip('_').replace('_', '-')} applies to image runs")
    from aigc.sample import GenerateSettings, load_run, print_stream, settings_dict
    from aigc.sample import generate as run_generate

    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    if num_beams > 1:
        given = [f"--{k.replace('_', '-')}" for k, v in sampling.items() if v is not None]
        if given:
            raise UserError(f"{given[0]} does not apply to beam search (--num-beams {num_beams})")
    defaults = GenerateSettings()
    settings = GenerateSettings(
        prompt=prompt, n=n, seed=secrets.randbelow(2**31) if seed is None else seed,
        max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, num_beams=num_beams,
        no_repeat_ngram_size=no_repeat_ngram_size, stop=list(stop or []),
        **{k: (getattr(defaults, k) if v is None else v) for k, v in sampling.items()},
    ).validate()
    loaded = load_run(run)
    if stream and json_out:
        raise UserError("--stream and --json exclude each other")
    samples, stats = run_generate(loaded, settings, stream=print_stream if stream else None)
    if json_out:
        _emit_json({"run": str(loaded.path), "samples": samples, "settings": settings_dict(settings),
                    "stats": stats})
    elif stream:
        print()
        print(f"seed {settings.seed}, {stats['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    else:
        for i, sample in enumerate(samples):
            if len(samples) > 1:
                print(f"--- sample {i + 1} (seed {settings.seed})")
            print(sample)
        print(f"seed {settings.seed}, {stats['tokens_per_s']:.1f} tokens/s", file=sys.stderr)


TEXT_ONLY = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "num_beams", "no_repeat_ngram_size", "stop", "stream")


def _given(ctx: typer.Context, param: str) -> bool:
    """Was the option on the command line (not its default)? Compared by name: typer vendors its
    own click, whose ParameterSource is not click's."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _is_image_run(run: str | None) -> bool:
    if run is None:
        return False
    from aigc.runs import find_run, read_run

    try:
        return read_run(find_run(run)).get("modality") == "image"
    except UserError:
        return False  # not a run: a Hugging Face folder, or an error that the text path reports


def _generate_images(ctx, run, n, seed, class_, out, from_image, json_out, options) -> None:
    from aigc.image_runs import generate_images, regenerate

    for param in TEXT_ONLY:
        if _given(ctx, param):
            raise UserError(f"--{param.replace('_', '-')} applies to text runs, not images")
    if from_image is not None:
        if run is not None or _given(ctx, "n") or seed is not None or class_ is not None or any(
                v is not None for v in options.values()):
            raise UserError("--from-image takes the run, seed, class and sampler from the image's record: "
                            "give no RUN, -n, --seed, --class or sampling option")
        result = regenerate(from_image, out)
    else:
        result = generate_images(run, n=n, seed=secrets.randbelow(2**31) if seed is None else seed,
                                 class_=class_, out=out, options=options)
    if json_out:
        _emit_json(result)
    else:
        for path in result["files"]:
            print(path)
        if result["grid"]:
            print(f"grid: {result['grid']}", file=sys.stderr)


@app.command("eval")
@user_errors
def eval_(
    run: Annotated[str, typer.Argument(help="run name or run directory")],
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
):
    """Score a run on its validation split (bits per character, perplexity), sample from it
    (diversity, novelty, speed) and write eval.json and report.html into the run.

    Example:

      aigc eval poet --json
    """
    _quiet_libraries()
    from aigc.evaluate import evaluate_run

    result = evaluate_run(run)
    if json_out:
        _emit_json(result)  # the same object as <run>/eval.json
        return
    for key, value in result["metrics"].items():
        print(f"{key:>16}  {value:.4f}" if isinstance(value, float) else f"{key:>16}  {value}")
    report = Path(result["run"]) / "report.html"
    if report.is_file():
        print(f"report: {report}")


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
    from aigc.runs import find_run, list_runs, read_run, runs_dir, summary

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
    print(f"{'name':<36} {'family':<6} {'status':<11} {'steps':>6} {'val_bpc':>8}  data")
    for r in rows:
        bpc = f"{r['val_bpc']:.4f}" if isinstance(r["val_bpc"], float) else "-"
        print(f"{r['name']:<36} {r['family']:<6} {str(r['status']):<11} {str(r['steps'] or 0):>6} {bpc:>8}  "
              f"{r['data']}")


@data_app.command("list")
def data_list():
    """The named corpora and whether they are installed.

    Example:

      aigc data list
    """
    from aigc.data.text import CORPORA, load_corpus

    print(f"{'name':<12} {'installed':<9} {'package':<12} description")
    for name, corpus in CORPORA.items():
        try:
            load_corpus(name)
            installed = "yes"
        except UserError:
            installed = "no"
        print(f"{name:<12} {installed:<9} {corpus.package:<12} {corpus.description}")
    print("\nYour own data: a .txt file, a folder of them, a fortune file (entries split by '%' lines) "
          "or a .jsonl file with a \"text\" field.")


@data_app.command("show")
@user_errors
def data_show(data: Annotated[str, typer.Argument(help="a named corpus or a path")],
              text_field: Annotated[str, typer.Option(help="field holding the text in JSONL files")] = "text",
              json_out: Annotated[bool, typer.Option("--json")] = False):
    """Statistics and the start of a corpus, as the training would see it.

    Example:

      aigc data show tang300
    """
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


@app.command()
@user_errors
def quickstart(
    data: Annotated[str, typer.Option(help="corpus to train on")] = "tang300",
    max_minutes: Annotated[float | None, typer.Option(help="training-time budget instead of steps")] = None,
    max_steps: Annotated[int | None, typer.Option(help="step budget (default 2000, about 4 minutes)")] = None,
    name: Annotated[str, typer.Option(help="run name (replaced if it exists)")] = "quickstart",
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value, repeatable")] = None,
):
    """The main job: train a small GPT on the Tang poems, write a few poems, evaluate them.

    Example:

      aigc quickstart
    """
    _quiet_libraries()
    from aigc.config import parse_sets
    from aigc.quickstart import run

    run(data=data, max_minutes=max_minutes, max_steps=max_steps, name=name, sets=parse_sets(set_ or []))


def main() -> None:
    app()
