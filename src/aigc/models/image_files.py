"""The files of an image family's model folder: `model.safetensors` (the weights, and the EMA
weights as `ema.<name>` where the model keeps them) and `<family>_config.json` (the config fields,
`image_shape`, `num_classes`, `ema_updates`). No pickles: models/files.py writes and reads the two."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from aigc.config import config_from_record
from aigc.models.ema import pop_ema
from aigc.models.files import load_config_and_weights, save_config_and_weights

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
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.ema is not None:
        state.update(model.ema.tensors())
    record = {**dataclasses.asdict(model.config), "image_shape": list(model.image_shape),
              "num_classes": model.num_classes}
    if model.ema is not None:
        record["ema_updates"] = model.ema.updates
    save_config_and_weights(directory, config_file, record, WEIGHTS_FILE, state)


def load_image_model(cls, config_type: type, directory: Path, config_file: str):
    """`cls(config, image_shape, num_classes)` with the folder's weights, in eval mode; a missing
    file, an unknown config key, or a missing or extra tensor is an error."""
    record, state = load_config_and_weights(directory, config_file, WEIGHTS_FILE,
                                            what=f"{cls.__name__.lower()} checkpoint")
    weights = Path(directory) / WEIGHTS_FILE
    image_shape = tuple(record.pop("image_shape"))
    num_classes = record.pop("num_classes")
    ema_updates = record.pop("ema_updates", 0)
    model = cls(config_from_record(config_type, record, Path(directory) / config_file), image_shape, num_classes)
    if model.ema is not None:
        model.ema.load(state, ema_updates, weights)
    elif pop_ema(state):
        raise ValueError(f"{weights}: holds EMA weights but the config says ema_decay=0")
    model.load_state_dict(state)  # strict: a missing or extra tensor is an error
    return model.eval()
