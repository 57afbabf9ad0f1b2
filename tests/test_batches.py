"""Contract: every training-batches class implements `train.Batches`, the one interface train_loop calls
(same method signatures, and every method answers a call made as the loop makes it)."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from aigc.modalities.series import SeriesBatches
from aigc.train import Batches, ImageBatches, TextBatches


class TinyLM(nn.Module):
    """A bigram table: forward(input_ids).logits, as the text families answer."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table(input_ids))  # (B, T, V)


class TinyImageModel(nn.Module):
    """forward(x, noise=...)["loss"] and draw_noise, as the image families answer."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def draw_noise(self, n: int, device=None, generator=None) -> dict[str, torch.Tensor]:
        return {"eps": torch.randn(n, 1, 4, 4, device=device, generator=generator)}

    def forward(self, x, noise=None):
        eps = self.draw_noise(len(x))["eps"] if noise is None else noise["eps"]  # evaluation: drawn here
        return {"loss": ((self.scale * x - eps) ** 2).mean()}


class TinySeriesModel(nn.Module):
    """forward(x, y, weights)["loss"], as the recurrent series family answers: weighted squared error."""

    def __init__(self):
        super().__init__()
        self.coef = nn.Parameter(torch.zeros(()))

    def forward(self, x, y, weights):
        return {"loss": (weights * (y - self.coef * x) ** 2).sum() / weights.sum()}


def text_case():
    ids = np.arange(200) % 7
    return TextBatches(ids[:150], ids[150:], block_size=8), TinyLM(7)


def image_case():
    x = torch.rand(12, 1, 4, 4) * 2 - 1
    return ImageBatches(x[:8], None, x[8:], None, hflip=True), TinyImageModel()


def series_case():
    z = np.sin(np.arange(60) / 3.0)
    return SeriesBatches(z[:45], z[45 - 8:], 8), TinySeriesModel()


CASES = {"text": text_case, "image": image_case, "series": series_case}
METHODS = ("sample", "val_batches", "noise", "loss", "val_metrics")


@pytest.mark.parametrize("case", CASES)
def test_batches_implement_the_protocol(case):
    batches, model = CASES[case]()
    assert isinstance(batches, Batches)
    assert isinstance(batches.unit, str) and batches.unit
    assert isinstance(batches.items_per_sample, int) and batches.items_per_sample > 0
    for name in METHODS:  # the Protocol's parameters: names, kinds (keyword-only phase and noise), defaults
        declared = inspect.signature(getattr(Batches, name)).parameters
        actual = inspect.signature(getattr(type(batches), name)).parameters
        assert [(p.name, p.kind, p.default) for p in actual.values()] == \
               [(p.name, p.kind, p.default) for p in declared.values()], name


@pytest.mark.parametrize("case", CASES)
def test_batches_answer_the_calls_of_the_training_loop(case):
    batches, model = CASES[case]()
    n = 4
    batch = batches.sample(torch.Generator().manual_seed(0), n)
    assert isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) and len(t) == n for t in batch)
    again = batches.sample(torch.Generator().manual_seed(0), n)
    assert all(torch.equal(a, b) for a, b in zip(batch, again, strict=True))  # drawn from the generator alone

    val = batches.val_batches(2, 3)
    assert 1 <= len(val) <= 2
    assert all(isinstance(b, tuple) and 1 <= len(b[0]) <= 3 and len({len(t) for t in b}) == 1 for b in val)

    torch.manual_seed(0)
    noise = batches.noise(model, n, torch.device("cpu"))
    assert noise is None or all(isinstance(t, torch.Tensor) and len(t) == n for t in noise.values())
    rows = slice(0, n // 2)  # the loop slices the batch and its noise alike
    part = tuple(t[rows] for t in batch)
    part_noise = None if noise is None else {name: t[rows] for name, t in noise.items()}
    loss = batches.loss(model, part, phase=None, noise=part_noise)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # as the evaluation calls it: no noise given
        val_loss = batches.loss(model, val[0], phase=None)
    assert val_loss.ndim == 0 and math.isfinite(val_loss.item())

    metrics = batches.val_metrics(val_loss.item())
    assert isinstance(metrics, dict) and all(math.isfinite(v) for v in metrics.values())
