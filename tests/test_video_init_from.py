"""Continuing a video run (`aigc train --init-from RUN`, issue 18): simvp, vae-rnn and a vae on stacked frames start
from the parent's weights exactly and train on, record where they came from, and refuse what cannot continue
(other clip shapes, another context, an architecture key, another conditioning) with one clear error before
anything is written. The families' shared harness (image and text) is tests/test_init_from.py."""

from __future__ import annotations

import copy

import pytest
import torch

from aigc import service
from aigc.errors import BadRequest
from aigc.modalities import MODALITIES
from aigc.models import FAMILIES
from aigc.store import read_run, runs_dir

pytestmark = pytest.mark.usefixtures("one_thread")

CLIPS = {"frames": "8", "context": "4", "size": "24", "val_clips": "8"}
TRAIN = {"batch_size": "4", "warmup_steps": "1", "eval_interval": "3", "eval_batches": "1", "log_interval": "1",
         "dtype": "fp32", "compile": "false"}
ARCH = {"simvp": {"hid_s": "8", "hid_t": "16", "n_t": "1"},
        "vae-rnn": {"z_dim": "4", "base_channels": "8", "label_dim": "4", "n_hidden": "16"},
        "vae": {"z_dim": "4", "base_channels": "8"}}
CONDITIONAL = {"simvp": {}, "vae-rnn": {"conditional": "true"}, "vae": {"conditional": "true"}}
LR = 1e-6  # one AdamW step moves a weight by at most lr (plus its decay)


def _parent(family: str) -> None:
    service.train(family, "moving-digits", name="parent", max_steps=2,
                  sets={**CLIPS, **TRAIN, **ARCH[family], **CONDITIONAL[family]})


@pytest.mark.parametrize("family", ["simvp", "vae-rnn", "vae"])
def test_a_continued_video_run_starts_from_the_parent_and_trains_on(family, monkeypatch):
    _parent(family)
    parent = FAMILIES[family].load(runs_dir() / "parent")
    modality, started = MODALITIES["video"], []
    real = modality.fit

    def fit(fam, prepared, *args):  # the model the loop is given, before it trains
        started.append(copy.deepcopy(prepared.model))
        return real(fam, prepared, *args)

    monkeypatch.setattr(modality, "fit", fit)
    child_dir, metrics = service.train(family, "moving-digits", name="child", max_steps=2, init_from="parent",
                                       sets={**CLIPS, **TRAIN, "lr": str(LR)})
    expected = parent.state_dict()
    assert set(started[0].state_dict()) == set(expected)
    for name, tensor in started[0].state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    final, moved = FAMILIES[family].load(child_dir).state_dict(), False
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=4 * LR, msg=name)
            moved |= not torch.equal(final[name], tensor)
    assert moved and metrics["steps"] == 2
    record = read_run(child_dir)
    assert record["init_from"] == str((runs_dir() / "parent").resolve())
    assert record["num_classes"] == (10 if CONDITIONAL[family] else 0)  # the parent's conditioning, not asked again
    assert "--init-from" in (child_dir / "README.md").read_text()


@pytest.mark.parametrize(("family", "sets", "message"), [
    ("simvp", {"frames": "10"}, "was trained on clips of 8 x 24 x 24 x 1 (T x H x W x C), moving-digits's are 10 x 24 "
                                "x 24 x 1: use --set frames=8"),
    ("simvp", {"context": "3"}, "predicts from 4 frames: use --set context=4"),
    ("simvp", {"hid_s": "16"}, "hid_s comes from the --init-from checkpoint and cannot be set (a run continued from "
                               "one may set l1, ssim)"),
    ("vae-rnn", {"conditional": "false"}, "conditional comes from the --init-from checkpoint: run 'parent' is "
                                          "conditional"),
    ("vae-rnn", {"window": "16"}, "window comes from the --init-from checkpoint and cannot be set"),
])
def test_what_cannot_continue_is_one_clear_error_before_anything_is_written(family, sets, message):
    _parent(family)
    with pytest.raises(BadRequest) as e:
        service.train(family, "moving-digits", name="child", max_steps=2, init_from="parent",
                      sets={**CLIPS, **TRAIN, **sets})
    assert message in str(e.value)
    assert not (runs_dir() / "child").exists()


def test_a_continued_vae_rnn_may_set_its_temperature_and_keeps_the_weights():
    _parent("vae-rnn")
    child_dir, _ = service.train("vae-rnn", "moving-digits", name="child", max_steps=2, init_from="parent",
                                 sets={**CLIPS, **TRAIN, "lr": str(LR), "temperature": "0.5"})
    assert FAMILIES["vae-rnn"].load(child_dir).config.temperature == 0.5
