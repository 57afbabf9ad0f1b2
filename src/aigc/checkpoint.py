"""Model folders and resumable checkpoints, written atomically and verified by sha256 on load.

Layout of a run directory (see docs/runs.md):
  <run>/model.safetensors, config.json, generation_config.json, manifest.json   best weights
  <run>/checkpoints/last/{model files, optimizer.pt, state.json, manifest.json}  what resume needs

A folder is first written as `.tmp-*` next to its destination, every file fsync'd, then renamed
into place; `manifest.json` (sha256 and size of every file) is written last and checked on load.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from aigc.errors import UserError
from aigc.fsutil import fsync_dir, fsync_tree, read_json, sha256_file, write_json

MANIFEST = "manifest.json"


def write_manifest(directory: Path, files: list[str]) -> None:
    entries = {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
               for name in sorted(files)}
    write_json(directory / MANIFEST, {"format_version": 1, "files": entries})


def verify_manifest(directory: Path) -> None:
    """Raise a UserError if any file listed in the manifest is missing or changed."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory}: no {MANIFEST}; the folder was not written completely")
    for name, entry in read_json(path)["files"].items():
        f = Path(directory) / name
        if not f.is_file():
            raise UserError(f"{directory}: {name} is missing (listed in {MANIFEST})")
        if sha256_file(f) != entry["sha256"]:
            raise UserError(f"{directory}: {name} is corrupted (sha256 does not match {MANIFEST})")


def save_model(model, directory: Path) -> None:
    """A model's own files: `save(dir)` where the family defines it (n-gram, image families),
    else transformers' `save_pretrained`."""
    save = getattr(model, "save", None) or model.save_pretrained
    save(directory)


def save_model_files(model, directory: Path) -> list[str]:
    """Write the model's own files (save_pretrained layout) into `directory` atomically, file by file.

    Returns the file names written. Other files in `directory` (tokenizer, metrics) are untouched.
    """
    directory = Path(directory)
    tmp = directory / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_model(model, tmp)
        fsync_tree(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in names:
            os.replace(tmp / name, directory / name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_manifest(directory, names)
    return names


def save_checkpoint(run_dir: Path, model, optimizers: dict[str, torch.optim.Optimizer], state: dict) -> Path:
    """Write `checkpoints/last/` atomically: model, optimizer states, and the JSON training state.

    `optimizers` maps a name to an optimizer: {"model": ...} for most families, one per phase for a
    GAN; optimizer.pt holds {name: state_dict}. The RNG states live in state.json as plain lists of
    ints (never pickled), and the optimizer states hold only tensors and numbers, so they load with
    `torch.load(weights_only=True)`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-last-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp)
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / "optimizer.pt")
    write_json(tmp / "state.json", state)
    fsync_tree(tmp)
    write_manifest(tmp, [p.name for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST])
    final, old = root / "last", root / f".old-last-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path:
    """The last complete checkpoint, verified; leftovers of an interrupted save are removed."""
    root = Path(run_dir) / "checkpoints"
    last = root / "last"
    if not last.is_dir():
        # a crash between the two renames of save_checkpoint leaves the previous one as .old-*
        olds = sorted(root.glob(".old-last-*")) if root.is_dir() else []
        if not olds:
            raise UserError(f"{run_dir}: no checkpoint to resume from (checkpoints/last is missing)")
        os.replace(olds[-1], last)
    for leftover in list(root.glob(".tmp-last-*")) + list(root.glob(".old-last-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    verify_manifest(last)
    return last


def load_optimizer_state(directory: Path) -> dict[str, dict]:
    """{name: optimizer state_dict}; a checkpoint of one optimizer written before names were kept
    (a bare state_dict) reads as {"model": state_dict}."""
    saved = torch.load(Path(directory) / "optimizer.pt", map_location="cpu", weights_only=True)
    return {"model": saved} if "param_groups" in saved else saved
