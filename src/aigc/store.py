"""The run store: where runs live, and reading, listing, claiming and committing run directories.

A run is a directory `$AIGC_HOME/runs/<name>/` (docs/runs.md) whose `run.json` is its record. This module
is plain Python (no torch, transformers or diffusers), so that `aigc runs` and a server's model list start
in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from aigc.errors import Conflict, NotFound, UserError
from aigc.fsutil import read_json, write_json

RECORD = "run.json"
STAGE = "stage.json"  # what a run is doing after (or instead of) its training steps: `Stage`
HEADLINES = {  # modality -> the metrics that sum a run up, best first: from eval.json, else run.json
    "text": ("val_bpc",),
    "image": ("fid", "val_nelbo", "val_loss"),
    "series": ("mase", "sigma"),
    "music": ("val_nll_per_note",),
    "video": ("mse", "frame_fid", "val_nelbo", "val_loss"),
    "sound": ("kid", "val_nelbo", "val_loss"),
}


def aigc_home() -> Path:
    return Path(os.environ.get("AIGC_HOME") or ".").resolve()


def runs_dir() -> Path:
    return aigc_home() / "runs"


def cache_dir() -> Path:
    return aigc_home() / "cache"


def generations_dir() -> Path:
    """Files of the generations the store (aigc.db) records: the PNGs of API image requests."""
    return aigc_home() / "generations"


def run_in(root: Path, name: str) -> Path:
    """The run called `name` directly inside `root`, and nowhere else: no path, no '..', no symlink that
    leads out of `root` (what a server resolves a model id with)."""
    root = Path(root).resolve()
    if valid_name(name):
        path = (root / name).resolve()
        if path.parent == root and is_run(path):
            return path
    raise NotFound(f"no such model: {name!r} (see GET /v1/models)")


def valid_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name))


def check_name(name: str | None) -> None:
    if name is not None and not valid_name(name):
        raise UserError(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-'")


def is_run(path: Path) -> bool:
    return (Path(path) / RECORD).is_file()


def find_run(spec: str) -> Path:
    """A run name (under $AIGC_HOME/runs) or a path to a run directory."""
    path = Path(spec).expanduser()
    if is_run(path):
        return path.resolve()
    named = runs_dir() / spec
    if valid_name(spec) and is_run(named):
        return named
    raise NotFound(f"no such run: {spec!r} (not a run directory, and not a run name in {runs_dir()}; "
                   f"see: aigc runs)")


def read_run(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / RECORD)


def write_record(run_dir: Path, record: dict) -> None:
    write_json(Path(run_dir) / RECORD, record)


class Stage:
    """The progress of one stage of making a run beside its training steps (aigc optimize: counting, scoring,
    judging): a bar on the terminal (tqdm: count, rate and ETA; off when stderr is not a terminal, as training's)
    and the run's stage.json {stage, done, total, unit, started, updated}, which a job's view reads
    (aigc.jobs: its `stage`, `progress` and `eta_s`), written at most every WRITE_EVERY_S and at the end."""

    WRITE_EVERY_S = 0.5

    def __init__(self, run_dir: Path, name: str, total: int, unit: str = "it"):
        self.path, self.name, self.total, self.unit = Path(run_dir) / STAGE, name, max(0, int(total)), unit
        self.done, self.started, self._written = 0, time.time(), 0.0
        self.bar = tqdm(total=self.total, unit=unit, desc=name, leave=False, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        self._write()

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self.bar.update(n)
        if time.time() - self._written >= self.WRITE_EVERY_S or self.done == self.total:
            self._write()

    def _write(self) -> None:
        self._written = time.time()
        write_json(self.path, {"stage": self.name, "done": self.done, "total": self.total, "unit": self.unit,
                               "started": self.started, "updated": self._written})

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def read_stage(run_dir: Path) -> dict | None:
    """The run's stage.json (`Stage`), None where it has none or it cannot be read."""
    try:
        stage = read_json(Path(run_dir) / STAGE)
    except (OSError, ValueError):
        return None
    return stage if isinstance(stage, dict) and isinstance(stage.get("total"), int) else None


def modality_of(record: dict) -> str:
    return record.get("modality", "text")  # text runs made before the field existed have none


def list_runs(root: Path | None = None) -> list[dict]:
    """A summary of every run in `root`; a run whose run.json cannot be read (cut short by a full disk, edited
    by hand) is listed with status "unreadable" and why, and the others as usual."""
    root = runs_dir() if root is None else Path(root)
    return [_summary_or_why(path) for path in (sorted(root.iterdir()) if root.is_dir() else []) if is_run(path)]


def _summary_or_why(run_dir: Path) -> dict:
    try:
        return summary(run_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"{RECORD}: {type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"{RECORD}: no {e} in it"
        return {"name": Path(run_dir).name, "path": str(Path(run_dir).resolve()), "family": "-", "modality": None,
                "data": "-", "status": "unreadable", "error": why, "created": None, "steps": None, "val_bpc": None,
                "dtype": None, "evaluated": False, "score": None, "init_from": None, "parent": None, "method": None}


def summary(run_dir: Path) -> dict:
    record = read_run(run_dir)
    metrics = record.get("metrics", {})
    eval_path = Path(run_dir) / "eval.json"
    return {"name": Path(run_dir).name, "path": str(Path(run_dir).resolve()), "family": record["family"],
            "modality": modality_of(record), "data": record["data"]["train"]["source"],
            "status": record.get("status"), "created": record.get("created"), "steps": metrics.get("steps"),
            "val_bpc": metrics.get("val_bpc"), "dtype": record.get("dtype"), "evaluated": eval_path.is_file(),
            "score": headline(record, eval_path), "init_from": record.get("init_from"),
            "parent": (record.get("optimize") or {}).get("parent"),
            "method": (record.get("optimize") or {}).get("method")}


def lineage(record: dict, root: Path) -> dict:
    """Where a run came from, as a page shows it; each part None where it does not apply:
    - optimized: made by `aigc optimize` from a parent ({parent, method, liked, disliked, pairs, sha256});
    - continued: trained from another model's weights, `--init-from` ({path, run}: run is the name where that
      folder is a run in `root`); an optimized run's init_from is its parent, said once, under optimized;
    - sweep: a trial of `aigc sweep` ({study, trial, best}).
    A run named (`parent`, `run`) comes with `here`: whether `root` serves it, so a page links only those."""
    made = record.get("optimize")
    optimized = None
    if made:
        fed = made.get("feedback") or {}
        optimized = {"parent": made.get("parent"), "here": _served(root, made.get("parent")),
                     "method": made.get("method"), **{k: fed.get(k) for k in ("liked", "disliked", "pairs", "sha256")}}
    continued = None
    if record.get("init_from") and not made:
        path = Path(record["init_from"])
        inside = path.parent.resolve() == Path(root).resolve() and _served(root, path.name)
        continued = {"path": str(path), "run": path.name if inside else None, "here": inside}
    sweep = record.get("sweep")
    return {"optimized": optimized, "continued": continued,
            "sweep": {k: sweep.get(k) for k in ("study", "trial", "best")} if sweep else None}


def _served(root: Path, name: str | None) -> bool:
    try:
        return bool(name) and run_in(root, name) is not None
    except NotFound:
        return False


def headline(record: dict, eval_path: Path) -> dict | None:
    """{"metric", "value"}: the first headline metric the run has (lower is better for all of them)."""
    found = dict(record.get("metrics") or {})
    if eval_path.is_file():
        found.update(read_json(eval_path).get("metrics") or {})
    for metric in HEADLINES.get(modality_of(record), ()):
        if isinstance(found.get(metric), int | float):
            return {"metric": metric, "value": found[metric]}
    return None


def card_header(record: dict, task: str, *, library: str = "aigc", metrics: tuple[str, ...] = ()) -> list[str]:
    """The Hugging Face model-card metadata (YAML between --- lines) every run's README.md starts with."""
    lines = ["---", "license: other", f"library_name: {library}", "tags:", "- aigc-studio", f"- {record['family']}",
             f"- {task}", "datasets:", f"- {record['data']['train']['source']}"]
    if metrics:
        lines += ["metrics:", *(f"- {m}" for m in metrics)]
    return [*lines, "---", ""]


def card_lineage(record: dict) -> list[str]:
    """The model card's lines on the run a run of aigc optimize was made from, the feedback it learned from, and
    before and after: the regular metric on the same validation split, and the judged share of liked outputs."""
    made = record.get("optimize")
    if not made:
        return []
    fed, m = made["feedback"], record.get("metrics", {})
    lines = ["", "## Lineage", "",
             f"Made by `aigc optimize {made['parent']} --from-feedback --method {made['method']}` from "
             f"{fed['liked']} liked and {fed['disliked']} disliked outputs and {fed['pairs']} preference pairs "
             f"({len(fed['rating_ids'])} ratings, {len(fed['vote_ids'])} arena votes; feedback sha256 "
             f"`{fed['sha256'][:16]}`).", ""]
    if "parent_val_bpc" in m:
        lines.append(f"- bits per character on the same validation split: {m['parent_val_bpc']:.4f} before, "
                     f"{m.get('val_bpc', float('nan')):.4f} after")
    if m.get("parent_val_loss") is not None:  # music
        lines.append(f"- NLL per token on the same validation pieces: {m['parent_val_loss']:.4f} nats before, "
                     f"{m.get('val_loss', float('nan')):.4f} after")
    if "fid_before" in m:
        lines.append(f"- FID against the same held-out images ({m['fid_images']} each): {m['fid_before']:.2f} "
                     f"before, {m['fid_after']:.2f} after (floor {m['fid_floor']:.2f})")
    if "fid_matched_before" in m:
        lines.append(f"- FID against held-out images in each side's own class mix: {m['fid_matched_before']:.2f} "
                     f"before, {m['fid_matched_after']:.2f} after")
    if "liked_share_before" in m:
        (lo0, hi0), (lo1, hi1) = m["liked_share_before_ci95"], m["liked_share_after_ci95"]
        accuracy = m.get("judge_heldout_accuracy")
        lines.append(f"- liked, as the reward model fitted on this feedback judges {m['judged_samples']} fresh "
                     f"outputs: {m['liked_share_before']:.1%} before [{lo0:.1%}, {hi0:.1%}], "
                     f"{m['liked_share_after']:.1%} after [{lo1:.1%}, {hi1:.1%}] (95% intervals; the judge's "
                     f"accuracy on held-out ratings: " + ("not measured, too few" if accuracy is None else
                                                          f"{accuracy:.1%} of {m['judge_heldout_n']}") + ")")
    return lines


def continued_from(record: dict) -> str:
    """The model card's words on the checkpoint a run continued from (--init-from), after its first sentence; a
    run of aigc optimize says where it came from in its own lineage section."""
    if not record.get("init_from") or "optimize" in record:
        return ""
    parent = record["init_from"]
    return f" Its training started from the weights of `{Path(parent).name}` (`--init-from {parent}`)."


def claim_run_dir(family: str, data: str, name: str | None, overwrite: bool) -> Path:
    """The run's final path; an existing run there is an error unless --overwrite."""
    root = runs_dir()
    if name is None:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data).name or "data").strip("-") or "data"
        name = f"{family}-{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = root / name
    if run_dir.exists():
        if not overwrite:
            raise Conflict(f"run {name!r} already exists in {root}: pass --overwrite to replace it "
                           f"or --resume to continue it")
        if not is_run(run_dir):
            raise Conflict(f"--overwrite: {run_dir} exists but is not a run directory; not deleting it")
    return run_dir


def commit_run_dir(run_dir: Path, write_files: Callable[[Path], None]) -> Path:
    """Write the run's first files into a staging folder (`write_files(staging)`), then swap it into
    place, replacing an old run only now, when the new one is known to be valid."""
    staging = run_dir.parent / f".staging-{run_dir.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_files(staging)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        os.replace(staging, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run_dir


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
