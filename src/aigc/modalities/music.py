"""The music modality: symbolic music (Bach chorales, the user's MIDI files) through the text families.

Pieces are encoded as event tokens on a 16th-note grid (aigc.data.music: a fixed REMI-like vocabulary in a
`tokenizers` WordLevel tokenizer), so ngram, rnn and gpt train on music as token-id sequences with the text
modality's model building and training loop, and generate with the text decoding (aigc.sample): a sample is a
token string, decoded back to notes. A generation is written as MIDI, WAV and a piano-roll PNG, each carrying its
record; evaluation is held-out NLL per token and per note beside the n-gram's on the same split and encoding,
musical statistics beside the validation and training pieces', and copying.

A music run holds, beside run.json and config.toml: the tokenizer (tokenizer.json, tokenizer_config.json), the
pieces of its split as token strings (train.jsonl, val.jsonl, checked by sha256) and the model files as a text
run of its family has them.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from aigc import __version__
from aigc.checkpoint import find_checkpoint, save_model_files
from aigc.config import fields_of, option, read_toml, to_toml
from aigc.data import music as m
from aigc.data.music_grammar import GRAMMAR_VERSION, HarmonyGrammar, RemiGrammar, limits_of
from aigc.distributed import on_main
from aigc.errors import BadRequest, UserError
from aigc.evaluate.music import (
    STATISTICS,
    CopyIndex,
    copied_share,
    note_ngrams,
    statistics_of,
    statistics_with_errors,
    within_floor,
)
from aigc.fsutil import atomic_write_bytes, atomic_write_text, write_json
from aigc.modalities import text
from aigc.modalities.base import Generation, Prepared, init_changes
from aigc.models import Family, ngram
from aigc.sample import MAX_NEW_TOKENS_CAP, LoadedModel, context_limit, load_run, settings_dict
from aigc.sample import generate as decode
from aigc.store import card_header, card_lineage, read_run, sha256_text
from aigc.train import TextBatches, train_loop

NAME = "music"
BATCHES = True  # the text decoding batches concurrent requests
GENERATE_OPTIONS = ("n", "bars", "temperature", "top_k", "top_p", "constrained", "prompt_midi", "prompt_piece",
                    "prompt_bars", "harmonise_midi", "harmonise_piece", "candidates", "window", "grammar_version")
# `aigc eval RUN -n N --temperature T --top-p P --no-constrained --seed S`: the pieces sampled for the statistics
# (default EVAL_SAMPLES, at SAMPLING_DEFAULTS, seed 0)
EVALUATE_OPTIONS = ("n", "temperature", "top_p", "constrained", "seed")
DEFAULT_BARS = 8  # a piece lasts this many bars (a piece the model ends sooner is continued, `_extend`)
PROMPT_BARS = 2  # bars of a prompt (--prompt-midi, --prompt-piece) continued unless --prompt-bars says otherwise
# how a music run samples unless asked otherwise, where it has no calibrated temperature of its own (`sampling_of`;
# rnn and gpt runs fit one when training ends, `calibrate`): chosen on the validation chorales' statistics
# (docs/audio.md, "The sampling default, again"); the held-out NLL does not depend on it
# `constrained`: grammar-constrained sampling (aigc.data.music_grammar: positions only forward, no more notes at one
# onset or sounding at once than the training pieces have, every note whole); a record without it was made without
# it. Temperature 0.8 with top-p 0.95 (since 2026-12-07; 0.6 before, which a retrained gpt of the same recipe met 1 of
# 4 at): 3 of the 4 statistics within their floors on two 10-minute gpts (dropout 0.1 without torch.compile, and the
# family's dropout 0 compiled) at seed 0 and on the second at seed 1 with 128 pieces; docs/audio.md, "The sampling
# default, again"
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 0, "top_p": 0.95, "constrained": True}
GENERATE_DEFAULTS = {"n": 1, "bars": DEFAULT_BARS, **SAMPLING_DEFAULTS, "grammar_version": GRAMMAR_VERSION}  # as shown


def sampling_of(run_dir: Path) -> dict:
    """How the run samples unless asked otherwise: SAMPLING_DEFAULTS, with the temperature and top-p its
    calibration chose (SAMPLING_FILE) where it has one."""
    path = Path(run_dir) / SAMPLING_FILE
    if not path.is_file():
        return dict(SAMPLING_DEFAULTS)
    try:
        own = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: fit it again with `aigc calibrate {Path(run_dir).name}`, or "
                        "delete it to sample at the music defaults") from None
    return {**SAMPLING_DEFAULTS, **{k: own[k] for k in ("temperature", "top_p") if k in own}}


def sampling_before(request: dict) -> dict:
    """How a stored row whose request does not say its sampling was sampled: at the defaults of its day. Rows store
    the sampling they were made with since 2026-12-07 (`service.record`); before, the default was temperature 0.6
    (since grammar-constrained sampling, which rows store as `constrained`) and 0.8 before that, top-p and top-k
    off."""
    return {"temperature": 0.6 if "constrained" in request else 0.8, "top_k": 0, "top_p": 1.0}
BUDGET_MARGIN = 2.0  # tokens allowed per bar, over the training split's mean
MAX_EXTENSIONS = 4  # continuations of a piece the model ended too soon
MUSIC_CONTEXT = 1024  # a gpt's n_positions unless given: 8 chorale bars take ~300 tokens, a prompt more
# candidates per melody note of a harmonisation (`_harmonise_by_onsets`; 1: one left-to-right draw of the whole
# piece): 4 measured on the audio benchmark's gpt and n-gram, consonant sonorities 0.20 -> 0.34 and 0.35 -> 0.46 on
# the first 10 validation chorales (docs/audio.md, "Harmonisation"), at several times the sampling time
HARMONY_CANDIDATES = 4
MAX_CANDIDATES = 16
EVAL_SAMPLES = 8  # pieces sampled at seed 0 (as the run samples, `sampling_of`) for the statistics and copying (-n N)
# calibrated sampling (docs/audio.md, "Calibrated sampling"): when a run of a gradient family finishes, pieces are
# sampled at each of these temperatures (top-p as SAMPLING_DEFAULTS, grammar-constrained, at CALIBRATION_SEED, not
# the evaluation's seed 0) and the temperature whose fitted statistics lie nearest the training pieces' is the run's
# own default (SAMPLING_FILE). Only training pieces are read. Two 10-minute gpts of one recipe wanted 0.6 and 0.8
# ("The sampling default, again"); fitted on 64 pieces per temperature they met 3 of 4 statistics at both seeds
CALIBRATION_TEMPERATURES = (0.5, 0.6, 0.7, 0.8, 0.9)  # the fit stays inside them: no extrapolation
CALIBRATION_SEED = 1000
CALIBRATED = ("pitch_class_entropy", "scale_consistency")  # what temperature moves (polyphony: the grammar's)
# `calibrate = "auto"` calibrates a run of rnn or gpt that trained this long at least: the 10-minute gpt's
# calibration took 65 s on an idle machine and up to 2.5 minutes on a busy one (64 pieces per temperature), more
# than a short trial's training
CALIBRATE_AFTER_MINUTES = 2.0
SAMPLING_FILE = "sampling.json"


@dataclass
class MusicSamplingConfig:
    calibrate: str = option("auto", "fit the run's sampling temperature to its training pieces' pitch-class entropy "
                                    "and scale consistency when training ends (auto: rnn and gpt trained "
                                    f"{CALIBRATE_AFTER_MINUTES:g} minutes or more)", choices=("auto", "true", "false"))
    calibration_pieces: int = option(64, "pieces sampled at each calibration temperature "
                                         f"({', '.join(map(str, CALIBRATION_TEMPERATURES))})", min=4, max=1024)


# ----------------------------------------------------------------------------------
# training


def sections(fam: Family) -> dict[str, type]:
    out = {"model": fam.config, "data": m.MusicDataConfig}
    if fam.trainer == "gradient":
        out["train"] = fam.train_config
    out["sampling"] = MusicSamplingConfig
    return out


def source_of(data: str) -> str:
    return data if data in m.MUSIC_CORPORA else str(Path(data).expanduser().resolve())


def check_request(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None) -> None:
    """`--init-from` (a music run of the family, found by the service) must have written our encoding."""
    if init_from is None:
        return
    encoding = read_run(Path(init_from)).get("encoding", {})
    if (encoding.get("name"), encoding.get("version")) != ("remi-16th", m.ENCODING_VERSION):
        raise BadRequest(f"--init-from: {Path(init_from).name} was trained on the encoding {encoding.get('name')} "
                         f"version {encoding.get('version')}, this one writes remi-16th version {m.ENCODING_VERSION}: "
                         f"its token ids mean other things")


def ids_of(tokenizer, pieces: list[m.Piece]) -> np.ndarray:
    """The token stream EOT piece1 EOT piece2 ... (the text families' document stream)."""
    vocab = tokenizer.tokenizer.get_vocab()
    out: list[int] = []
    for piece in pieces:
        out.append(tokenizer.eot_id)
        out.extend(vocab[t] for t in m.encode(piece))
    return np.asarray(out, dtype=np.int32)


def _lines(pieces: list[m.Piece]) -> str:
    return "".join(json.dumps({"name": p.name, "tokens": " ".join(m.encode(p))}) + "\n" for p in pieces)


def prepare(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None, configs: dict,
            values: dict) -> Prepared:
    """Read and split the pieces, encode them, build the model (the n-gram is fitted here)."""
    changes = init_changes(fam, configs, values) if init_from else {}
    read, source = m.load_music(data)
    pieces = m.remove_copies(read)  # before the split: no piece in both
    if val_data:  # the pieces scored are the user's own; one also in --data is held out, not trained on
        val_pieces = m.remove_copies(m.load_music(val_data)[0])
        held = {m.digest(p) for p in val_pieces}
        train_pieces = [p for p in pieces if m.digest(p) not in held]
        if not train_pieces:
            raise BadRequest(f"every piece of {data} is also in --val-data {val_data}: nothing is left to train on")
    else:
        train_pieces, val_pieces = m.split_pieces(pieces, configs["data"].val_fraction, configs["data"].split_seed)
    tokenizer = m.music_tokenizer()
    seen = m.transposed(train_pieces, configs["data"].transpose)  # the augmentation: training split only
    train_ids, val_ids = ids_of(tokenizer, seen), ids_of(tokenizer, val_pieces)
    if "n_positions" in fields_of(fam.config) and "n_positions" not in values and not init_from:
        configs["model"].n_positions = MUSIC_CONTEXT  # room for DEFAULT_BARS and more (a checkpoint has its own)
    t0 = time.perf_counter()
    model, info = text.build_model(fam, configs, tokenizer, train_ids, init_from, changes)
    read_before = 0
    if init_from:  # validation pieces the checkpoint's weights have read are not held out from them: said
        ancestors = {m.digest(p) for p in trained_pieces(Path(init_from))}
        read_before = sum(m.digest(p) in ancestors for p in val_pieces)
        if read_before:
            print(f"note: {read_before} of the {len(val_pieces)} validation pieces were training pieces of "
                  f"{Path(init_from).name} (or of a run it continued): the validation NLL flatters the new run",
                  file=sys.stderr)
    if fam.trainer == "counts":
        info["train_time_s"] = time.perf_counter() - t0
    train_text, val_text = _lines(train_pieces), _lines(val_pieces)
    bars = sum(m.bars_of(m.encode(p)) for p in train_pieces)
    grammar = limits_of(train_pieces)  # what constrained sampling allows (transpositions do not change it)
    record = {
        "data": {
            "train": {"source": source, "file": "train.jsonl", "sha256": sha256_text(train_text),
                      "pieces": len(train_pieces), "tokens": len(train_ids),
                      "notes": sum(len(p.notes) for p in train_pieces), "bars": bars,
                      "transposed_pieces": len(seen) - len(train_pieces)},
            "val": {"source": source_of(val_data) if val_data else "split", "file": "val.jsonl",
                    "sha256": sha256_text(val_text),
                    "pieces": len(val_pieces), "tokens": len(val_ids), "notes": sum(len(p.notes) for p in val_pieces),
                    "names": [p.name for p in val_pieces], "read_by_checkpoint": read_before},
            "copies_removed": len(read) - len(pieces),  # bach-chorales: already removed when the corpus is read
            "held_out_from_data": len(pieces) - len(train_pieces) if val_data else 0,  # --val-data pieces in --data
        },
        "encoding": {"name": "remi-16th", "version": m.ENCODING_VERSION, "vocab_size": tokenizer.vocab_size,
                     "tokens_per_bar": len(ids_of(tokenizer, train_pieces)) / max(1, bars), "grammar": grammar},
    }

    def write_files(staging: Path) -> None:
        tokenizer.save(staging)
        atomic_write_text(staging / "train.jsonl", train_text)
        atomic_write_text(staging / "val.jsonl", val_text)

    return Prepared(model, record, {"tokenizer": tokenizer, "train_ids": train_ids, "val_ids": val_ids,
                                    "notes": record["data"]["val"]["notes"], "fit": info}, write_files)


def reload(family: str, fam: Family, run_dir: Path, record: dict, configs: dict) -> Prepared:
    tokenizer = m.music_tokenizer()
    train, val = read_split(run_dir, record)
    model = fam.load(on_main(find_checkpoint, run_dir))
    return Prepared(model, record, {"tokenizer": tokenizer,
                                    "train_ids": ids_of(tokenizer, m.transposed(train, configs["data"].transpose)),
                                    "val_ids": ids_of(tokenizer, val), "notes": record["data"]["val"]["notes"],
                                    "fit": {}})


def fit(fam: Family, prepared: Prepared, configs: dict, run_dir: Path, budget, resume: bool) -> dict:
    state = prepared.state
    if fam.trainer == "counts":
        on_main(save_model_files, prepared.model, run_dir)
        return state["fit"]
    batches = TextBatches(state["train_ids"], state["val_ids"], configs["train"].block_size)
    return train_loop(prepared.model, batches, configs["train"], run_dir, budget, resume=resume,
                      cpu_bf16=fam.cpu_bf16, compile_gain=fam.compile_gain)


def finish(family: str, fam: Family, prepared: Prepared, configs: dict, run_dir: Path, fit: dict) -> dict:
    """Where the run's `calibrate` says so, its sampling calibrated (`calibrate`); then the held-out NLL of the
    final weights (`scores`)."""
    setting = configs["sampling"].calibrate
    long_enough = fam.trainer == "gradient" and fit.get("train_time_s", 0) >= CALIBRATE_AFTER_MINUTES * 60
    if setting == "true" or (setting == "auto" and long_enough):
        # the weights are saved: a calibration that fails or is stopped (Ctrl-C, the studio's Stop) leaves the run
        # whole, sampling at the music defaults until `aigc calibrate` fits it
        try:
            calibrate(run_dir, configs["sampling"].calibration_pieces)
        except (UserError, KeyboardInterrupt) as e:
            why = "it was stopped" if isinstance(e, KeyboardInterrupt) else str(e)
            print(f"note: the sampling was not calibrated ({why}): {Path(run_dir).name} samples at the music "
                  f"defaults until `aigc calibrate {Path(run_dir).name}`", file=sys.stderr)
    return scores(prepared, run_dir, fit)


def scores(prepared: Prepared, run_dir: Path, fit: dict) -> dict:
    """The held-out NLL per token and per note of the final weights, and the training figures. `aigc optimize`
    scores its runs with it and keeps the parent's calibration (aigc.optimize.music.finish)."""
    nll, n = load_run(str(run_dir)).nll(prepared.state["val_ids"])
    metrics = {"val_loss": nll / max(1, n), "perplexity": math.exp(min(nll / max(1, n), 700)),
               "val_nll_per_note": nll / max(1, prepared.state["notes"]), "val_tokens": n}
    metrics.update({k: v for k, v in fit.items() if k in ("steps", "train_time_s", "train_loss", "best_step",
                                                          "tokens_per_s", "schedule_steps", "order")})
    return metrics


def card(run_dir: Path, record: dict, configs: dict) -> str:
    met, data = record.get("metrics", {}), record["data"]
    return "\n".join([
        *card_header(record, "text-generation", library="aigc", metrics=("perplexity",)),
        f"# {Path(run_dir).name}", "",
        f"A `{record['family']}` music model trained by AIGC Studio {__version__} on `{data['train']['source']}` "
        f"({data['train']['pieces']} pieces, {data['train']['notes']:,} notes, {data['train']['tokens']:,} tokens "
        f"of the REMI-like 16th-note encoding, docs/audio.md).", "",
        "## Results on the held-out pieces", "",
        f"- NLL per token: {met.get('val_loss', float('nan')):.4f} nats; per note: "
        f"{met.get('val_nll_per_note', float('nan')):.4f} nats ({data['val']['pieces']} pieces)",
        f"- steps: {met.get('steps')}, training time: {met.get('train_time_s', 0):.0f} s", *card_lineage(record),
        _sampling_line(run_dir), "",
        "## Configuration", "", "```toml", to_toml(configs).strip(), "```", "",
        "## Use", "", "```", f"aigc generate {run_dir} -n 4 --seed 0 --out pieces/", f"aigc eval {run_dir}", "```",
        "", "## Limitations", "",
        "A small model of a few hundred chorales: it copies phrases of its training pieces (see `aigc eval`, "
        "longest copy), and a sample ends where the model ends it or at the bar budget.", ""])


def trained_pieces(run_dir: Path) -> list[m.Piece]:
    """Every piece a music run's weights have read (before transposition): its training split and those of the runs it
    was continued from (--init-from, followed back)."""
    pieces, current = [], Path(run_dir)
    while current is not None:
        if not (current / "run.json").is_file():
            raise UserError(f"{run_dir}: it was continued from {current}, which is gone: its training pieces are "
                            f"needed to measure copying")
        record = read_run(current)
        pieces += read_split(current, record)[0]
        current = Path(record["init_from"]) if record.get("init_from") else None
    return pieces


def read_split(run_dir: Path, record: dict | None = None) -> tuple[list[m.Piece], list[m.Piece]]:
    """The run's training and validation pieces, checked against the sha256 in run.json."""
    record = record or read_run(run_dir)
    return _read_part(run_dir, record, "train"), _read_part(run_dir, record, "val")


def _read_part(run_dir: Path, record: dict, part: str) -> list[m.Piece]:
    path = Path(run_dir) / record["data"][part]["file"]
    if not path.is_file():
        raise UserError(f"{run_dir}: {path.name} is missing")
    content = path.read_text(encoding="utf-8")
    if sha256_text(content) != record["data"][part]["sha256"]:
        raise UserError(f"{run_dir}: {path.name} does not match the sha256 recorded in run.json")
    rows = [json.loads(line) for line in content.splitlines() if line]
    return [m.decode(row["tokens"].split(), row["name"]) for row in rows]


def openings(run_dir: Path) -> list[str]:
    """The names of the run's validation pieces, in the order of its split: the openings a person can have continued
    (`prompt_piece`). Held-out pieces, so a continuation is not the model reciting what it trained on."""
    return list(read_run(run_dir)["data"]["val"].get("names", []))


# ----------------------------------------------------------------------------------
# generation


def load(spec: str) -> LoadedModel:
    loaded = load_run(spec)
    if loaded.tokenizer.kind != "music":
        raise BadRequest(f"{spec} is not a music run")
    return loaded


def prompt_tokens(path: str, bars: int) -> list[str]:
    """The first `bars` bars of a MIDI file, as tokens (the time signature first)."""
    if bars < 1:
        raise BadRequest(f"--prompt-bars must be >= 1, got {bars}")
    return m.first_bars(m.encode(m.read_midi(Path(path).expanduser())), bars)


def piece_prompt_tokens(run_dir: Path, name: str, bars: int) -> list[str]:
    """The first `bars` bars of the run's validation piece `name` (`openings`), as tokens."""
    if bars < 1:
        raise BadRequest(f"--prompt-bars must be >= 1, got {bars}")
    return m.first_bars(m.encode(validation_piece(run_dir, name, "--prompt-piece")), bars)


def validation_piece(run_dir: Path, name: str, option: str) -> m.Piece:
    """The run's validation piece `name` (one of `openings`); a wrong name is an error that lists them."""
    record = read_run(run_dir)
    names = record["data"]["val"].get("names", [])
    if name not in names:
        shown = ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")
        raise BadRequest(f"{option} {name!r} is not a validation piece of {Path(run_dir).name}: one of {shown}")
    return _read_part(run_dir, record, "val")[names.index(name)]


def melody_of(run_dir: Path, midi: str | None, piece: str | None) -> m.Piece:
    """The melody to harmonise: the top voice (`m.soprano_line`) of a MIDI file, or of one of the run's validation
    pieces (a held-out chorale's soprano), on its time signature."""
    source = m.read_midi(Path(midi).expanduser()) if midi is not None else \
        validation_piece(run_dir, piece, "--harmonise-piece")
    return m.Piece(source.name, source.time_signature, m.soprano_line(source.notes))


def generate(loaded: LoadedModel, options: dict, seed: int, stream: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None, *, batched: bool = False) -> Generation:
    """`n` pieces of `bars` bars, decoded by the text decoding; with a prompt (the first `prompt_bars` bars of a MIDI
    file, `prompt_midi`, or of one of the run's validation pieces, `prompt_piece`) the piece is those bars and `bars`
    more."""
    if stream is not None:
        raise BadRequest("--stream applies to text runs")
    options = {**sampling_of(loaded.path), **{k: v for k, v in options.items() if v is not None}}
    constrained = options.pop("constrained")
    if not isinstance(constrained, bool):
        raise BadRequest(f"constrained must be true or false, got {constrained!r}")
    version = options.pop("grammar_version", None)
    version = GRAMMAR_VERSION if version is None else version
    if version not in range(1, GRAMMAR_VERSION + 1) or isinstance(version, bool):
        raise BadRequest(f"--grammar-version must be in 1..{GRAMMAR_VERSION}, got {version!r}")
    bars_given = options.get("bars")
    bars = options.pop("bars", DEFAULT_BARS)
    if not 1 <= bars <= 256:
        raise BadRequest(f"--bars must be in 1..256, got {bars}")
    prompt_midi, prompt_piece = options.pop("prompt_midi", None), options.pop("prompt_piece", None)
    prompt_bars = options.pop("prompt_bars", None)
    harmonise_midi, harmonise_piece = options.pop("harmonise_midi", None), options.pop("harmonise_piece", None)
    candidates = options.pop("candidates", None)
    if harmonise_midi is not None or harmonise_piece is not None:
        return harmonise(loaded, options, seed, constrained, version, cancel=cancel, batched=batched,
                         midi=harmonise_midi,
                         piece=harmonise_piece, candidates=HARMONY_CANDIDATES if candidates is None else candidates,
                         others={"bars": bars_given, "prompt_midi": prompt_midi, "prompt_piece": prompt_piece,
                                 "prompt_bars": prompt_bars})
    if candidates is not None:
        raise BadRequest("--candidates applies with --harmonise-midi or --harmonise-piece")
    if prompt_midi is not None and prompt_piece is not None:
        raise BadRequest("--prompt-midi and --prompt-piece exclude each other: give one opening to continue")
    if prompt_bars is not None and prompt_midi is None and prompt_piece is None:
        raise BadRequest("--prompt-bars applies with --prompt-midi or --prompt-piece")
    if prompt_midi is not None:
        prompt = prompt_tokens(prompt_midi, prompt_bars or PROMPT_BARS)
    elif prompt_piece is not None:
        prompt = piece_prompt_tokens(loaded.path, prompt_piece, prompt_bars or PROMPT_BARS)
    else:
        prompt = []
    record = read_run(loaded.path)
    grammar = {**grammar_of(loaded.path, record), "version": version} if constrained else None
    per_bar = record["encoding"]["tokens_per_bar"]
    budget = math.ceil(bars * per_bar * BUDGET_MARGIN) + 2
    limit = context_limit(loaded, options.get("window"))
    room = MAX_NEW_TOKENS_CAP if limit is None else limit - len(prompt) - 1
    if room < per_bar:
        raise BadRequest(f"the prompt ({len(prompt)} tokens) leaves no room in the model's context of "
                         f"{limit} tokens: use fewer --prompt-bars")
    settings = text.settings_of({**options, "max_new_tokens": min(budget, room, MAX_NEW_TOKENS_CAP),
                                 "prompt": " ".join(prompt) + " " if prompt else ""}, seed)
    samples, stats = decode(loaded, settings, cancel=cancel, batched=batched, processors=_grammar(grammar))
    want = m.bars_of(prompt) + bars
    samples = [_extend(loaded, settings, sample.split(), want, seed, i, cancel, grammar)
               for i, sample in enumerate(samples)]
    outputs = []
    for sample in samples:
        tokens = m.first_bars(sample, want)
        piece = m.decode(tokens)
        outputs.append({"tokens": " ".join(tokens), "bars": m.bars_of(tokens), "notes": len(piece.notes)})
    settings_out = {**settings_dict(settings), "bars": bars, "prompt_midi": prompt_midi, "prompt_piece": prompt_piece,
                    "prompt_bars": (prompt_bars or PROMPT_BARS) if prompt else None, "constrained": constrained,
                    "grammar": grammar}
    settings_out.pop("stop")
    return Generation(NAME, outputs, {"run": str(loaded.path), "family": loaded.family, "settings": settings_out,
                                      "stats": stats})


def harmonise(loaded: LoadedModel, options: dict, seed: int, constrained: bool, version: int, *,
              cancel: threading.Event | None,
              batched: bool, midi: str | None, piece: str | None, others: dict,
              candidates: int = HARMONY_CANDIDATES) -> Generation:
    """`n` harmonisations of a melody (a MIDI file's top voice, `midi`, or a validation piece's soprano, `piece`):
    the melody kept exactly as the top voice, the model's lower voices under it (aigc.data.music_grammar's
    HarmonyGrammar); the piece lasts as long as the melody."""
    if midi is not None and piece is not None:
        raise BadRequest("--harmonise-midi and --harmonise-piece exclude each other: give one melody")
    given = [k for k, v in others.items() if v is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise BadRequest(f"{flags} does not apply with --harmonise-midi or --harmonise-piece: the piece is as long "
                         "as the melody and begins with it")
    if not (isinstance(candidates, int) and 1 <= candidates <= MAX_CANDIDATES):
        raise BadRequest(f"--candidates must be in 1..{MAX_CANDIDATES}, got {candidates!r}")
    if not constrained:
        raise BadRequest("harmonisation keeps the melody by the grammar of constrained sampling: leave "
                         "--no-constrained out")
    melody = melody_of(loaded.path, midi, piece)
    record = read_run(loaded.path)
    limits = {**grammar_of(loaded.path, record), "version": version}
    if limits["max_polyphony"] < 2:
        raise BadRequest(f"{Path(loaded.path).name} learned pieces of one voice (at most 1 note sounds at once in its "
                         "training pieces): it cannot write voices under a melody")
    bars = m.bars_of(m.encode(melody))
    limit = context_limit(loaded, options.get("window"))
    room = min(MAX_NEW_TOKENS_CAP, MAX_NEW_TOKENS_CAP if limit is None else limit - 1)
    least = HarmonyGrammar(limits, melody, room).minimum()  # the melody's own tokens
    if least > room:
        raise BadRequest(f"the melody ({len(melody.notes)} notes, {bars} bars) takes {least} tokens alone, more than "
                         f"the {room} this model can generate at once: give a shorter melody")
    # the budget as for a piece of as many bars (and at least twice the melody's own), capped by the context: the
    # grammar keeps what the melody still needs of it
    budget = min(max(math.ceil(bars * record["encoding"]["tokens_per_bar"] * BUDGET_MARGIN) + 2, 2 * least), room)
    if candidates == 1:
        settings = text.settings_of({**options, "max_new_tokens": budget, "prompt": ""}, seed)
        samples, stats = decode(loaded, settings, cancel=cancel, batched=batched,
                                processors=[HarmonyGrammar(limits, melody, budget)])
    else:
        settings = text.settings_of({**options, "max_new_tokens": budget}, seed)
        made = [_harmonise_by_onsets(loaded, settings, limits, melody, budget, candidates, i, cancel, batched)
                for i in range(settings.n)]
        samples = [sample for sample, _ in made]
        stats = {"generated_tokens": sum(s["generated_tokens"] for _, s in made),
                 "seconds": sum(s["seconds"] for _, s in made)}
        stats["tokens_per_s"] = stats["generated_tokens"] / stats["seconds"] if stats["seconds"] else math.nan
    outputs = []
    for sample in samples:
        tokens = sample.split()
        notes = m.decode(tokens).notes
        if not set(melody.notes) <= set(notes):  # the grammar makes this impossible; never hand out a broken one
            raise UserError("a harmonisation lost notes of its melody (a bug: please report it)")
        outputs.append({"tokens": " ".join(tokens), "bars": m.bars_of(tokens), "notes": len(notes)})
    settings_out = {**settings_dict(settings), "bars": bars, "harmonise_midi": midi, "harmonise_piece": piece,
                    "candidates": candidates,
                    "melody": {"name": melody.name, "time_signature": melody.time_signature,
                               "notes": len(melody.notes), "sha256": sha256_text(json.dumps(melody.notes))},
                    "constrained": True, "grammar": limits}
    settings_out.pop("stop")
    return Generation(NAME, outputs, {"run": str(loaded.path), "family": loaded.family, "settings": settings_out,
                                      "stats": stats})


def _harmonise_by_onsets(loaded: LoadedModel, settings, limits: dict, melody: m.Piece, budget: int, candidates: int,
                         index: int, cancel: threading.Event | None, batched: bool) -> tuple[str, dict]:
    """The `index`-th harmonisation of a request, written onset by onset of the melody: the voices up to and under
    its k-th note drawn `candidates` times (the piece so far as the prompt, the seed `seed + n * k + index`: each
    piece and note its own), keeping the candidate under which the
    model finds the melody's note most probable (`HarmonyGrammar.melody_scores`). Why: the encoding puts an onset's
    lower notes before its top note, so a left-to-right model writes each chord before it reads the melody's note
    in it; drawing a few chords and keeping the one that best foresees the melody's note lets the note choose its
    chord (measured in docs/audio.md, "Harmonisation")."""
    tokens: list[str] = []
    generated, seconds = 0, 0.0
    options = {k: v for k, v in settings_dict(settings).items() if k not in ("seed", "n", "stop", "prompt")}
    for k in range(1, len(melody.notes) + 1):
        last = k == len(melody.notes)  # the last note: on to the piece's end
        step = text.settings_of({**options, "n": candidates, "prompt": " ".join(tokens) + " " if tokens else "",
                                 "max_new_tokens": budget - len(tokens)}, settings.seed + settings.n * k + index)
        grammar = HarmonyGrammar(limits, melody, budget, until=None if last else k)
        samples, stats = decode(loaded, step, cancel=cancel, batched=batched, processors=[grammar])
        scores = grammar.melody_scores()
        tokens = samples[max(range(candidates), key=lambda i: scores[i])].split()
        generated, seconds = generated + stats["generated_tokens"], seconds + stats["seconds"]
    return " ".join(tokens), {"generated_tokens": generated, "seconds": seconds}


def grammar_of(run_dir: Path, record: dict) -> dict[str, int]:
    """The limits constrained sampling keeps a run's pieces to (the most notes at one onset and sounding at once in
    its training pieces): stored in run.json at training, counted from train.jsonl for a run made before."""
    return record["encoding"].get("grammar") or limits_of(read_split(run_dir, record)[0])


def _grammar(grammar: dict | None) -> list[RemiGrammar]:
    """The logits processors of one decoding request: a fresh grammar (it holds each row's state), or none."""
    return [] if grammar is None else [RemiGrammar(grammar)]


def _extend(loaded: LoadedModel, settings, tokens: list[str], bars: int, seed: int, index: int,
            cancel: threading.Event | None, grammar: dict | None = None) -> list[str]:
    """A piece the model ended before `bars` bars (a chorale's final cadence) goes on: the text decoding continues
    it from a new bar, at the seed `seed + 1000 * round + index` (so the same request gives the same piece), at most
    MAX_EXTENSIONS times; what it then has is what it is (its bars are in the record)."""
    for round_ in range(1, MAX_EXTENSIONS + 1):
        if m.bars_of(tokens) >= bars:
            break
        prompt = [*tokens, "Bar"]
        limit = context_limit(loaded, settings.window)
        room = MAX_NEW_TOKENS_CAP if limit is None else limit - len(prompt) - 1
        if room < 8:
            break
        options = {k: v for k, v in settings_dict(settings).items() if k != "seed"}
        more = text.settings_of({**options, "n": 1, "prompt": " ".join(prompt) + " ",
                                 "max_new_tokens": min(settings.max_new_tokens, room)}, seed + 1000 * round_ + index)
        [sample], _ = decode(loaded, more, cancel=cancel, processors=_grammar(grammar))
        tokens = sample.split()
    return tokens


def save(generation: Generation, out_dir: Path) -> list[str]:
    """Per piece: NNN.mid (the record as a text event), NNN.wav (16-bit PCM), NNN.png (piano roll, the record as
    its text chunk) and NNN.json (the record, how the audio was rendered and the generation's speed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, how = [], None
    for i, output in enumerate(generation.outputs):
        piece = m.decode(output["tokens"].split(), f"{i:03d}")
        record = {"run": generation.record["run"], "family": generation.record["family"],
                  "settings": generation.record["settings"], "index": i, "bars": output["bars"]}
        stem = out_dir / f"{i:03d}"
        midi = stem.with_suffix(".mid")
        atomic_write_bytes(midi, m.midi_bytes(piece, json.dumps(record, sort_keys=True)))
        samples, rate, how = m.render(piece, midi)
        atomic_write_bytes(stem.with_suffix(".wav"), m.wav_bytes(samples, rate))
        m.piano_roll_png(stem.with_suffix(".png"), piece, record)
        write_json(stem.with_suffix(".json"), {**record, "audio": how, "notes": output["notes"],
                                               "tokens": output["tokens"], "stats": generation.record["stats"]})
        files += [str(stem.with_suffix(s)) for s in (".mid", ".wav", ".png", ".json")]
    generation.extra["rendered_with"] = how
    return files


# ----------------------------------------------------------------------------------
# evaluation


def nearest_temperature(temperatures: np.ndarray, values: dict[str, np.ndarray], means: dict[str, float],
                        spread: dict[str, float]) -> tuple[float, dict[str, np.ndarray]]:
    """The temperature (on a 0.01 grid across the temperatures sampled) where least-squares lines of each
    statistic's per-piece `values` against `temperatures` lie nearest `means`, each distance in units of `spread`;
    and the lines ((slope, intercept) per statistic). NaN values are left out; ValueError when a statistic was
    measured at fewer than two temperatures."""
    lines = {}
    for key, value in values.items():
        keep = ~np.isnan(value)
        if len(set(temperatures[keep].tolist())) < 2:
            raise ValueError(f"{key}: measured at fewer than two temperatures")
        lines[key] = np.polyfit(temperatures[keep], value[keep], 1)
    grid = np.round(np.arange(temperatures.min(), temperatures.max() + 1e-9, 0.01), 2)
    cost = sum(((np.polyval(lines[k], grid) - means[k]) / spread[k]) ** 2 for k in values)
    return float(grid[int(np.argmin(cost))]), lines


def calibrate(run_dir: Path, pieces: int = 64) -> dict:
    """Fit the run's sampling temperature on its training pieces and write it (SAMPLING_FILE): `pieces` pieces at
    each of CALIBRATION_TEMPERATURES, a line per CALIBRATED statistic against the temperature (least squares over
    every piece), and the temperature where the lines lie nearest the training pieces' means, each distance in
    units of the training pieces' standard deviation. Only training pieces are read; the validation pieces are left
    to evaluation."""
    run_dir = Path(run_dir)
    loaded = load(str(run_dir))
    record = read_run(run_dir)
    train, _ = read_split(run_dir, record)
    excerpt = excerpts(train, DEFAULT_BARS)
    target = statistics_with_errors([p.notes for p in excerpt], [m.bar_length(p.time_signature) for p in excerpt])
    top_p = SAMPLING_DEFAULTS["top_p"]
    t0 = time.perf_counter()
    rows = []  # (temperature, statistic values) per piece with notes
    bar = tqdm(total=pieces * len(CALIBRATION_TEMPERATURES), unit="piece", desc="calibrating the sampling",
               leave=False, file=sys.stderr, disable=not sys.stderr.isatty())
    for temperature in CALIBRATION_TEMPERATURES:
        generation = generate(loaded, {"n": pieces, "temperature": temperature, "top_p": top_p, "top_k": 0,
                                       "constrained": True}, CALIBRATION_SEED)
        for output in generation.outputs:
            piece = m.decode(output["tokens"].split())
            if piece.notes:
                values = statistics_of(piece.notes, m.bar_length(piece.time_signature))
                rows.append((temperature, [values[k] for k in CALIBRATED]))
        bar.update(pieces)
    bar.close()
    temperatures = np.array([t for t, _ in rows])
    values = {key: np.array([v[j] for _, v in rows]) for j, key in enumerate(CALIBRATED)}
    spread = {key: target[key]["se"] * math.sqrt(target[key]["n"]) for key in CALIBRATED}  # the training pieces' sd
    try:
        chosen, lines = nearest_temperature(temperatures, values, {k: target[k]["mean"] for k in CALIBRATED}, spread)
    except ValueError:
        raise UserError(f"run {run_dir.name}: too few sampled pieces with notes to calibrate its sampling") from None
    result = {
        "temperature": chosen, "top_p": top_p,
        "calibration": {
            "pieces_per_temperature": pieces, "temperatures": list(CALIBRATION_TEMPERATURES),
            "seed": CALIBRATION_SEED, "bars": DEFAULT_BARS, "seconds": round(time.perf_counter() - t0, 1),
            "training": {k: target[k]["mean"] for k in CALIBRATED},
            "sampled": {k: {str(t): float(np.nanmean([v[j] for tt, v in rows if tt == t]))
                            for t in CALIBRATION_TEMPERATURES} for j, k in enumerate(CALIBRATED)},
            "fitted": {k: float(np.polyval(lines[k], chosen)) for k in CALIBRATED},
            "at_edge": chosen in (CALIBRATION_TEMPERATURES[0], CALIBRATION_TEMPERATURES[-1]),
        }}
    write_json(run_dir / SAMPLING_FILE, result)
    return result


def evaluate(run_dir: Path, record: dict, options: dict) -> dict:
    """Held-out NLL per token and per note beside the n-gram's on the same split and encoding; musical statistics
    of samples beside the validation pieces' and the training pieces' (the floor); copying. Writes eval.json."""
    loaded = load(str(run_dir))
    train, val = read_split(run_dir, record)
    tokenizer = loaded.tokenizer
    transpose = int(read_toml(Path(run_dir) / "config.toml").get("transpose", 0))  # the run's augmentation
    train_ids, val_ids = ids_of(tokenizer, m.transposed(train, transpose)), ids_of(tokenizer, val)
    val_notes = sum(len(p.notes) for p in val)

    # 1. likelihood of the held-out pieces, and the n-gram's (order chosen on the training tail) on the same split,
    #    encoding and augmentation
    nll, n_tokens = loaded.nll(val_ids)
    if loaded.family == "ngram":
        base_nll = nll
    else:
        baseline, _ = ngram.build_from_ids(train_ids, tokenizer.vocab_size, ngram.NGramConfig(), tokenizer.eot_id,
                                           None)
        base_nll = baseline.kn.nll(val_ids[1:], context=val_ids[:1])

    # 2. samples at seed 0 (unless asked), sampled as a user's are unless asked otherwise (`sampling_of`)
    n_samples = int(options.get("n") or EVAL_SAMPLES)
    seed = int(options.get("seed") or 0)
    if seed < 0:
        raise BadRequest(f"--seed must be >= 0, got {seed}")
    sampling = {**sampling_of(run_dir),
                **{k: options[k] for k in ("temperature", "top_p", "constrained") if k in options}}
    generation = generate(loaded, {"n": n_samples, **sampling}, seed)
    samples = [m.decode(o["tokens"].split()) for o in generation.outputs]
    if not any(p.notes for p in samples):
        raise UserError(f"run {run_dir.name}: every sample was empty (the model ends every piece at once)")

    # 3. statistics, each beside the validation pieces' and its floor, the training pieces': all on excerpts of
    #    as many bars as the samples have (pitch-class entropy and groove consistency grow with a piece's length)
    stats = {name: statistics_with_errors([p.notes for p in pieces], [m.bar_length(p.time_signature) for p in pieces])
             for name, pieces in (("samples", samples), ("val", excerpts(val, DEFAULT_BARS)),
                                  ("train", excerpts(train, DEFAULT_BARS)))}
    floors = within_floor(stats["samples"], stats["val"], stats["train"])

    # 4. copying: the longest run of notes shared with a training piece, and the share of copied 8-note runs,
    #    beside the same for the validation pieces (excerpts as long as the samples)
    train_notes = [p.notes for p in trained_pieces(run_dir)]  # with --init-from: what the checkpoint read too
    grams = note_ngrams(train_notes)
    index = CopyIndex(train_notes)
    copies = [index.longest(p.notes) for p in samples if p.notes]
    val_copies = [index.longest(p.notes) for p in excerpts(val, DEFAULT_BARS)]
    shares = [copied_share(p.notes, grams) for p in samples]
    val_shares = [copied_share(p.notes, grams) for p in excerpts(val, DEFAULT_BARS)]
    metrics = {
        "val_nll_per_token": nll / max(1, n_tokens), "val_nll_per_note": nll / max(1, val_notes),
        "ngram_nll_per_token": base_nll / max(1, n_tokens), "ngram_nll_per_note": base_nll / max(1, val_notes),
        **{k: stats["samples"][k]["mean"] for k in STATISTICS},
        "statistics_within_floor": sum(f["met"] for f in floors.values()),
        "longest_copy_notes": float(np.mean(copies)), "longest_copy_notes_max": int(max(copies)),
        "val_longest_copy_notes": float(np.mean(val_copies)),
        "copied_8gram_share": _mean(shares), "val_copied_8gram_share": _mean(val_shares),
        "sample_bars": float(np.mean([o["bars"] for o in generation.outputs])),
        "tokens_per_s": generation.record["stats"]["tokens_per_s"],
    }
    result = {"run": str(run_dir), "metrics": metrics, "statistics": stats, "within_floor": floors,
              "validation": {"pieces": len(val), "tokens": n_tokens, "notes": val_notes},
              "samples": {"n": n_samples, "seed": seed, **sampling, "bars": DEFAULT_BARS,
                          "tokens": [o["tokens"] for o in generation.outputs]}}
    write_json(Path(run_dir) / "eval.json", result)
    return result


def _mean(values: list[float]) -> float:
    """The mean of the values that are numbers (NaN when none is: pieces too short for an 8-note run)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def excerpts(pieces: list[m.Piece], bars: int) -> list[m.Piece]:
    """The first `bars` bars of each piece (what the statistics of samples of that many bars are compared with)."""
    return [m.decode(m.first_bars(m.encode(p), bars), p.name) for p in pieces]


def _sampling_line(run_dir: Path) -> str:
    own, path = sampling_of(run_dir), Path(run_dir) / SAMPLING_FILE
    if path.is_file():
        pieces = json.loads(path.read_text(encoding="utf-8"))["calibration"]["pieces_per_temperature"]
        how = f"calibrated on the training pieces ({pieces} pieces per temperature; `aigc calibrate`)"
    else:
        how = "the music defaults (not calibrated)"
    return f"- samples at temperature {own['temperature']}, top-p {own['top_p']}: {how}"
