"""aigc.models.files: the config-JSON + safetensors folder shared by the ar, series rnn and image
families. Folders written by hand the way each family wrote them before the shared helper (safetensors
first, then `json.dumps(record, indent=2)` and a newline) still load, and a save writes those bytes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from aigc.models.ar import AR, ARConfig
from aigc.models.dcgan import DCGAN, DCGANConfig
from aigc.models.files import load_config_and_weights, save_config_and_weights
from aigc.models.rnn_series import SeriesRNN, SeriesRNNConfig
from aigc.models.vae import VAE, VAEConfig


def write_old_folder(directory, config_file, record, weights_file, tensors, module) -> None:
    """The old save code, spelled out: the weights with safetensors' `module`, then the JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    module.save_file(tensors, str(directory / weights_file))
    (directory / config_file).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def folder_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def assert_same_weights_and_resaved_bytes(model, reference, old, new) -> None:
    """`model` (loaded from the folder `old`) holds exactly `reference`'s weights, and saving it
    into `new` writes `old` again, byte for byte."""
    loaded = model.state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    model.save(new)
    assert folder_bytes(new) == folder_bytes(old)


def test_ar_folder_in_the_old_layout_loads(tmp_path):
    phi, series, resid = np.array([0.5, 0.3]), np.array([100.0, 110.0]), np.array([1.0, -1.0, 0.5])
    record = {"config": {"order": 2, "max_order": 2}, "const": 30.0, "sigma2": 4.0, "info": {"selected_by": "given"}}
    write_old_folder(tmp_path / "old", "ar.json", record, "ar.safetensors",
                     {"phi": phi, "series": series, "resid": resid}, safetensors.numpy)
    model = AR.load(tmp_path / "old")
    assert model.config == ARConfig(order=2, max_order=2)
    assert model.forecast(1).tolist() == [115.0]  # the seeds' worked example
    np.testing.assert_array_equal(model.resid_, resid)
    assert model.sigma2_ == 4.0 and model.info_ == {"selected_by": "given"}
    model.save(tmp_path / "new")
    assert folder_bytes(tmp_path / "new") == folder_bytes(tmp_path / "old")


def test_series_rnn_folder_in_the_old_layout_loads(tmp_path):
    torch.manual_seed(0)
    config = SeriesRNNConfig(n_hidden=4)
    reference = SeriesRNN(config, context=6, loc=0.5, scale=2.0)
    state = weights(reference)
    state["history"] = torch.arange(10, dtype=torch.float64)
    state["resid"] = torch.tensor([0.1, -0.2], dtype=torch.float64)
    record = {"config": dataclasses.asdict(config), "context": 6, "loc": 0.5, "scale": 2.0}
    write_old_folder(tmp_path / "old", "series_rnn.json", record, "series_rnn.safetensors", state, safetensors.torch)
    model = SeriesRNN.load(tmp_path / "old")
    assert (model.config, model.context, model.loc, model.scale) == (config, 6, 0.5, 2.0)
    np.testing.assert_array_equal(model.history, np.arange(10.0))
    assert_same_weights_and_resaved_bytes(model, reference, tmp_path / "old", tmp_path / "new")


def test_vae_folder_in_the_old_layout_loads(tmp_path):
    torch.manual_seed(0)
    config = VAEConfig(z_dim=4, base_channels=8, label_dim=4)
    reference = VAE(config, (1, 8, 8), 3)
    state = weights(reference)
    record = {**dataclasses.asdict(config), "image_shape": [1, 8, 8], "num_classes": 3}
    write_old_folder(tmp_path / "old", "vae_config.json", record, "model.safetensors", state, safetensors.torch)
    model = VAE.load(tmp_path / "old")
    assert (model.config, model.image_shape, model.num_classes) == (config, (1, 8, 8), 3)
    assert not model.training
    assert_same_weights_and_resaved_bytes(model, reference, tmp_path / "old", tmp_path / "new")


def test_dcgan_folder_with_ema_weights_in_the_old_layout_loads(tmp_path):
    torch.manual_seed(0)
    config = DCGANConfig(z_dim=4, base_channels=8)
    reference = DCGAN(config, (1, 8, 8), 0)
    assert reference.ema is not None  # the default keeps EMA weights of the generator
    state = weights(reference)
    state.update(reference.ema.tensors())
    record = {**dataclasses.asdict(config), "image_shape": [1, 8, 8], "num_classes": 0,
              "ema_updates": reference.ema.updates}
    write_old_folder(tmp_path / "old", "dcgan_config.json", record, "model.safetensors", state, safetensors.torch)
    model = DCGAN.load(tmp_path / "old")
    assert model.config == config and model.ema.updates == reference.ema.updates
    assert_same_weights_and_resaved_bytes(model, reference, tmp_path / "old", tmp_path / "new")


@pytest.mark.parametrize("missing", ["w.safetensors", "c.json"])
def test_a_missing_file_is_named(tmp_path, missing):
    save_config_and_weights(tmp_path, "c.json", {"a": 1}, "w.safetensors", {"x": torch.zeros(2)})
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"no toy model at {tmp_path}: {missing} is missing"):
        load_config_and_weights(tmp_path, "c.json", "w.safetensors", what="toy model")


def test_round_trip_in_either_framework(tmp_path):
    save_config_and_weights(tmp_path / "pt", "c.json", {"a": [1, 2]}, "w.safetensors", {"x": torch.ones(3)})
    record, tensors = load_config_and_weights(tmp_path / "pt", "c.json", "w.safetensors", what="toy")
    assert record == {"a": [1, 2]} and torch.equal(tensors["x"], torch.ones(3))
    save_config_and_weights(tmp_path / "np", "c.json", {}, "w.safetensors", {"x": np.ones(3, dtype=np.float32)},
                            framework="np")
    _, tensors = load_config_and_weights(tmp_path / "np", "c.json", "w.safetensors", what="toy", framework="np")
    assert isinstance(tensors["x"], np.ndarray) and tensors["x"].tolist() == [1.0, 1.0, 1.0]
    weights = [(tmp_path / f / "w.safetensors").read_bytes() for f in ("np", "pt")]
    assert weights[0] == weights[1]  # one file format for both


def test_an_unknown_framework_is_refused(tmp_path):
    with pytest.raises(ValueError, match="framework must be one of pt, np, got 'tf'"):
        save_config_and_weights(tmp_path, "c.json", {}, "w.safetensors", {}, framework="tf")
