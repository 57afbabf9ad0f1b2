"""Typed configuration: dataclasses with a default, a range and a help line per field.

A run's configuration is flat keys (`--set n_layer=2`, or the same keys in a TOML file, at top
level or under [model], [data], [train]) spread over up to three dataclasses: the family's model
config, `DataConfig` and `TrainConfig`. An unknown key, a wrong type or an out-of-range value is
a `UserError` naming the key; nothing is silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc.errors import UserError


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           choices: tuple[str, ...] | None = None, min_exclusive: bool = False) -> Any:
    """A dataclass field with its help line and valid range (checked by `validate`)."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive}
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    tokenizer: str = option("char", "char: one token per Unicode character; bpe: byte-level BPE",
                            choices=("char", "bpe"))
    min_char_count: int = option(1, "char tokenizer: a character seen fewer times in the training split is <unk> "
                                    "(a smaller, faster output layer on a large Chinese corpus)", min=1)
    bpe_vocab_size: int = option(2000, "vocabulary size of the BPE tokenizer", min=257, max=200_000)
    val_fraction: float = option(0.1, "share of the corpus (its end) held out for validation "
                                      "when --val-data is not given", min=0.0, max=0.5, min_exclusive=True)
    text_field: str = option("text", "field holding the text in JSONL files")
    token_dropout: float = option(0.0, "share of the training inputs replaced by <unk> (char tokenizer, gradient "
                                       "families): the model cannot lean on exact copies of what it read, a "
                                       "regulariser for a small corpus", min=0.0, max=0.9)


@dataclass
class ImageDataConfig:
    image_size: int = option(0, "resize images to N x N pixels (0 = keep; set by --image-size)", min=0, max=4096)
    channels: int = option(0, "1 = grayscale, 3 = RGB, 0 = as the data is", choices=None, min=0, max=3)
    hflip: bool = option(False, "flip training images horizontally at random (augmentation)")
    conditional: bool = option(False, "train the class-conditional variant (set by --conditional)")
    val_fraction: float = option(0.1, "share of a folder or array file (its end) held out for validation; "
                                      "named data sets use their test split", min=0.0, max=0.5, min_exclusive=True)


@dataclass
class TrainConfig:
    lr: float = option(1e-3, "peak learning rate (AdamW)", min=0.0, max=1.0, min_exclusive=True)
    min_lr_ratio: float = option(0.1, "final learning rate as a share of lr (cosine decay)", min=0.0, max=1.0)
    batch_size: int = option(32, "global batch: sequences per optimizer step, over all processes", min=1)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", min=1)
    block_size: int = option(128, "training context length in tokens", min=2)
    warmup_steps: int = option(50, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not biases, norms)", min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = option(0.99, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = no clipping)", min=0.0)
    eval_interval: int = option(100, "evaluate on the validation split every N steps", min=1)
    eval_batches: int = option(8, "validation batches per periodic evaluation", min=1)
    keep_best: bool = option(True, "the run root keeps the weights with the lowest validation loss "
                                   "(false: the last weights)")
    log_interval: int = option(10, "write a metrics.jsonl line every N steps", min=1)
    seed: int = option(1337, "seed for initialisation, batches and dropout", min=0)
    dtype: str = option("auto", "auto: bf16 autocast where the hardware has it, else fp32",
                        choices=("auto", "fp32", "bf16"))
    compile: str = option("auto", "torch.compile the model (inductor): faster steps after seconds to minutes of "
                                  "compiling. auto: for the families that gain from it (measured), with a budget "
                                  "of at least 2 minutes and 1000 steps; needs a C++ compiler on a CPU, Triton on "
                                  "a GPU, else trains eager", choices=("auto", "true", "false"))


@dataclass
class OptimizeConfig:
    """`aigc optimize` keys beyond [train] (docs/optimize.md)."""

    # beta 0.3, measured (benchmarks/feedback.py's setting, a 1-minute tang300 gpt): liked 0.37 -> 0.73 at +1.7%
    # bits/char, where 0.1 gave no gain (0.35) at +5.6%
    beta: float = option(0.3, "dpo: how strongly the new run is held near the parent (DPO's beta; larger: "
                              "nearer)", min=0.0, max=100.0, min_exclusive=True)
    best_of: int = option(4, "rerank: candidates drawn per sample, the reward model keeps the best", min=1, max=64)
    pick: str = option("best", "rerank: which of the best_of candidates is kept: best (the highest reward) or "
                               "first-liked (the first the reward judges liked, else the first drawn: rejection "
                               "sampling, which keeps the variety of what is liked)", choices=("best", "first-liked"))
    l2: float = option(0.01, "rerank: L2 penalty of the reward model", min=0.0, max=100.0)
    count_weight: float = option(20.0, "sft on an n-gram: times each liked completion's n-grams are counted per "
                                       "unit of its rating", min=0.0, max=1e6, min_exclusive=True)
    feedback_share: float = option(0.5, "sft on images: the share of each batch drawn from the liked images (the "
                                        "rest from the training data; 0: the data alone). Unless it or tilt is "
                                        "set: 0 with tilt 2.5 where a reward fitted on the ratings judges at least "
                                        "5% of the training images liked", min=0.0, max=1.0)
    tilt: float = option(0.0, "sft on images: the training data drawn as a reward fitted on the ratings keeps it, "
                              "the first it judges liked of this many (rerank's rule applied to the data; a vae's "
                              "images judged by their reconstructions, as the parent draws them; a fraction between "
                              "two counts tilts between them; 0: the data as it is, else at least 1; unless it "
                              "or feedback_share is set: 2.5 where that reward judges at least 5% of the training "
                              "images liked, else 0)",
                         min=0.0, max=64.0)
    anchor: float = option(0.0, "sft on images: weight of the pull towards the parent's weights, "
                                "anchor / 2 * sum((w - w_parent)^2) added to the loss (0: none)", min=0.0, max=1e6)
    pool: int = option(0, "sft on images: fresh images of the parent drawn and added to the liked ones where a "
                          "reward fitted on the ratings judges them liked (0: the rated liked images alone)",
                       min=0, max=100_000)
    eval_samples: int = option(200, "fresh outputs of the parent and of the new run judged before and after "
                                    "(0: none)", min=0, max=10_000)


def fields_of(config_type: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_type)}


def coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Turn a TOML value or a `--set` string into the field's type, or raise a UserError."""
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if kind is str and isinstance(value, bool) and "true" in (f.metadata.get("choices") or ()):
        value = "true" if value else "false"  # TOML's compile = true for the choice "true"
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            else:
                value = kind(text)
        except ValueError:
            raise UserError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {kind.__name__}, got {value!r}")
    meta = f.metadata
    if kind in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}: must be a finite number, got {value!r}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            raise UserError(f"{key}: must be {'>' if meta.get('min_exclusive') else '>='} {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise UserError(f"{key}: must be <= {hi}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"{key}: must be one of {', '.join(meta['choices'])}, got {value!r}")
    return value


def config_from_record(config_type: type, record: dict, path: Path):
    """A family config from the JSON a model folder stores; unknown keys are an error (a file
    written by another version, or edited by hand), never silently dropped."""
    unknown = sorted(set(record) - set(fields_of(config_type)))
    if unknown:
        raise ValueError(f"{path}: unknown {config_type.__name__} keys {unknown}")
    return config_type(**record)


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """`["n_layer=2", "cell=gru"]` -> {"n_layer": "2", "cell": "gru"}."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """Flatten a config file: top-level keys plus the keys of [model], [data], [train] and (music runs)
    [sampling]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in ("model", "data", "train", "sampling", "run", "optimize"):
                raise UserError(f"{path}: unknown section [{key}] (sections: model, data, train, sampling)")
            if key in ("run", "optimize"):
                continue  # written by the run directory for people to read (an optimized run's is in run.json)
            flat.update(value)
        else:
            flat[key] = value
    return flat


def build(sections: dict[str, type], values: dict[str, Any], *, family: str) -> dict[str, Any]:
    """Instantiate each section's dataclass from flat `values`; unknown keys are an error."""
    owner: dict[str, str] = {}
    for section, config_type in sections.items():
        for name in fields_of(config_type):
            owner[name] = section
    unknown = sorted(set(values) - set(owner))
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} for family {family} "
                        f"(see: aigc train --family {family} --help)")
    out = {}
    for section, config_type in sections.items():
        fs = fields_of(config_type)
        kwargs = {k: coerce(k, v, fs[k]) for k, v in values.items() if owner[k] == section}
        out[section] = config_type(**kwargs)
    return out


def to_toml(sections: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """Write a resolved config as TOML (scalar values only)."""
    lines = []
    for name, obj in {"run": header or {}, **sections}.items():
        items = obj if isinstance(obj, dict) else dataclasses.asdict(obj)
        if not items:
            continue
        lines.append(f"[{name}]")
        for key, value in items.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return '""'
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def describe(sections: dict[str, type]) -> str:
    """Every key with its default and help line, for `aigc train --family F --help`."""
    lines = []
    for section, config_type in sections.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(config_type):
            meta = f.metadata
            extra = f" ({'|'.join(meta['choices'])})" if meta.get("choices") else ""
            lines.append(f"  {f.name} = {f.default!r}{extra}  # {meta.get('help', '')}")
    return "\n".join(lines)
