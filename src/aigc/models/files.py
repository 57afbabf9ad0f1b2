"""A model folder as two files: a JSON record (the config and whatever else rebuilds the model) and
the tensors in safetensors, no pickles. The ar, series rnn and image families (vae, dcgan,
diffusion) save and load through these two functions; each keeps its own file names and record.

The weights are written first and the JSON last, `json.dumps(record, indent=2)` plus a newline, as
every one of those families wrote them from the start: folders written before this module load.
`framework` is safetensors' own: "pt" for torch tensors, "np" for numpy arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.numpy
import safetensors.torch

# safetensors' module per framework: its save_file and load_file take and give that framework's type
SAFETENSORS = {"pt": safetensors.torch, "np": safetensors.numpy}


def save_config_and_weights(directory: Path, config_file: str, record: dict, weights_file: str, tensors: dict,
                            *, framework: str = "pt") -> None:
    """Write `directory/weights_file` (the tensors) and then `directory/config_file` (the record)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _safetensors(framework).save_file(tensors, str(directory / weights_file))
    (directory / config_file).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def load_config_and_weights(directory: Path, config_file: str, weights_file: str, *, what: str,
                            framework: str = "pt") -> tuple[dict, dict]:
    """(record, tensors) of a folder written by `save_config_and_weights`; a missing file is a
    FileNotFoundError "no <what> at <directory>: <file> is missing"."""
    directory = Path(directory)
    weights, config_path = directory / weights_file, directory / config_file
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {what} at {directory}: {path.name} is missing")
    record = json.loads(config_path.read_text(encoding="utf-8"))
    return record, _safetensors(framework).load_file(str(weights))


def _safetensors(framework: str):
    if framework not in SAFETENSORS:
        raise ValueError(f"framework must be one of {', '.join(SAFETENSORS)}, got {framework!r}")
    return SAFETENSORS[framework]
