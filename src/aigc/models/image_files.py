"""The files of an image family's model folder: `model.safetensors` (the weights, and the EMA
weights as `ema.<name>` where the model keeps them) and `<family>_config.json` (the config fields,
`image_shape`, `num_classes`, `ema_updates`). No pickles: a folder loads with safetensors and json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from aigc.config import config_from_record
from aigc.models.ema import pop_ema

WEIGHTS_FILE = "model.safetensors"


def check_image_args(family: str, image_shape: tuple[int, ...], num_classes: int, min_side: int
                     ) -> tuple[int, int, int]:
    """(C, H, W) as ints, or a ValueError: an image family needs C >= 1, sides >= min_side, num_classes >= 0."""
    channels, height, width = (int(s) for s in image_shape)
    if channels < 1 or height < min_side or width < min_side:
        raise ValueError(f"{family} needs images of at least 1 x {min_side} x {min_side} (C, H, W), "
                         f"got {tuple(image_shape)}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
    return channels, height, width


def save_image_model(model, directory: Path, config_file: str) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.ema is not None:
        state.update(model.ema.tensors())
    save_file(state, directory / WEIGHTS_FILE)
    record = {**dataclasses.asdict(model.config), "image_shape": list(model.image_shape),
              "num_classes": model.num_classes}
    if model.ema is not None:
        record["ema_updates"] = model.ema.updates
    (directory / config_file).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def load_image_model(cls, config_type: type, directory: Path, config_file: str):
    """`cls(config, image_shape, num_classes)` with the folder's weights, in eval mode; a missing
    file, an unknown config key, or a missing or extra tensor is an error."""
    directory = Path(directory)
    weights, config_path = directory / WEIGHTS_FILE, directory / config_file
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.__name__.lower()} checkpoint at {directory}: {path.name} is missing")
    record = json.loads(config_path.read_text(encoding="utf-8"))
    image_shape = tuple(record.pop("image_shape"))
    num_classes = record.pop("num_classes")
    ema_updates = record.pop("ema_updates", 0)
    model = cls(config_from_record(config_type, record, config_path), image_shape, num_classes)
    state = load_file(weights)
    if model.ema is not None:
        model.ema.load(state, ema_updates, weights)
    elif pop_ema(state):
        raise ValueError(f"{weights}: holds EMA weights but the config says ema_decay=0")
    model.load_state_dict(state)  # strict: a missing or extra tensor is an error
    return model.eval()
