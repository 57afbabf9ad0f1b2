"""The modality contract: the Protocol every modality module implements, and what its stages return."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aigc.checkpoint import verify_manifest
from aigc.config import fields_of
from aigc.errors import BadRequest, Conflict
from aigc.models import Family
from aigc.store import read_run


@dataclass
class Prepared:
    """What a modality made of a training request before the run directory exists (or of a run to resume)."""

    model: Any  # the model to train (None where `fit` builds it)
    record: dict  # the modality's part of run.json (data sources and checksums, shapes, classes, ...)
    state: Any = None  # whatever fit, finish and write_files need: tokenized text, image tensors, a series
    write_files: Callable[[Path], None] | None = None  # files of a new run beside run.json and config.toml


@dataclass
class Generation:
    """The outputs of one generation request and its record (enough to make them again)."""

    modality: str
    outputs: Any  # text: list of strings; image: list of (H, W, C) uint8 arrays; series: the forecast dict
    record: dict  # run, settings (seed included), speed; image: one record per image
    extra: dict = field(default_factory=dict)  # what an interface may show beside the outputs


def finished_run(run_dir: Path, modality: str) -> dict:
    """The run.json of a finished run of `modality`, its weights verified against their manifest; a clear error
    for a run of another modality or one with no saved model yet (what every modality's `load` starts with)."""
    record = read_run(run_dir)
    if record.get("modality") != modality:
        article = "an" if modality[0] in "aeiou" else "a"
        raise BadRequest(f"run {Path(run_dir).name!r} is not {article} {modality} run")
    if not (Path(run_dir) / "manifest.json").is_file():
        raise Conflict(f"run {Path(run_dir).name!r} has no saved model yet (status: {record.get('status')})")
    verify_manifest(run_dir)
    return record


def init_changes(fam: Family, configs: dict, values: dict, fixed: tuple[str, ...] = ()) -> dict:
    """A run continued from a checkpoint (--init-from) has the checkpoint's architecture: the [model] keys given
    that it may still set (`fam.init_keys`, regularisation) with their values. Any other [model] key given, or one
    of `fixed` (e.g. the tokenizer's), is an error naming it."""
    given = [k for k in values if k in fixed or (k in fields_of(fam.config) and k not in fam.init_keys)]
    if given:
        may = f" (a run continued from one may set {', '.join(fam.init_keys)})" if fam.init_keys else ""
        raise BadRequest(f"{given[0]} comes from the --init-from checkpoint and cannot be set{may}")
    return {k: getattr(configs["model"], k) for k in fam.init_keys if k in values}


@runtime_checkable
class Modality(Protocol):
    """The stages of a run that differ by modality (every function takes what it needs, no hidden state)."""

    NAME: str  # "text", "image", "series"
    BATCHES: bool  # whether `generate` takes batched=True (concurrent requests decoded together)
    GENERATE_OPTIONS: tuple[str, ...]  # the generation options it takes beyond the seed
    EVALUATE_OPTIONS: tuple[str, ...]  # the evaluation options it takes

    def sections(self, fam: Family) -> dict[str, type]: ...  # configuration sections, e.g. model, data, train

    def source_of(self, data: str) -> str: ...  # how a --data spec is recorded (name, or absolute path)

    def check_request(self, family: str, fam: Family, data: str, val_data: str | None,
                      init_from: str | None) -> None: ...  # what the modality refuses before anything is read

    def prepare(self, family: str, fam: Family, data: str, val_data: str | None, init_from: str | None,
                configs: dict, values: dict) -> Prepared: ...

    def reload(self, family: str, fam: Family, run_dir: Path, record: dict, configs: dict) -> Prepared: ...

    def fit(self, fam: Family, prepared: Prepared, configs: dict, run_dir: Path, budget, resume: bool) -> dict: ...

    def finish(self, family: str, fam: Family, prepared: Prepared, configs: dict, run_dir: Path,
               fit: dict) -> dict: ...  # the metrics of the final weights (main process)

    def card(self, run_dir: Path, record: dict, configs: dict) -> str: ...  # README.md of the run

    def load(self, spec: str) -> Any: ...  # a finished run (or another folder the modality reads), verified

    def generate(self, loaded: Any, options: dict, seed: int, stream: Callable[[str], None] | None,
                 cancel: threading.Event | None = None, *, batched: bool = False
                 ) -> Generation: ...  # cancel set: raise errors.Cancelled; batched: only where BATCHES

    def save(self, generation: Generation, out_dir: Path) -> list[str]: ...  # files written

    def evaluate(self, run_dir: Path, record: dict, options: dict) -> dict: ...  # writes eval.json
