"""Runs made before the service layer (by the code of commit e0ee6bc; tests/data/make_old_runs.py) load and
generate exactly what that code generated from them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aigc import service
from aigc.store import list_runs

OLD = Path(__file__).resolve().parent / "data" / "old_runs"
EXPECTED = json.loads((OLD / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture
def old_runs(aigc_home):
    shutil.copytree(OLD, aigc_home / "runs", ignore=shutil.ignore_patterns("expected.json"))
    service.MODELS.clear()
    return aigc_home / "runs"


def test_every_old_run_is_listed(old_runs):
    rows = {r["name"]: r for r in list_runs()}
    assert set(rows) == set(EXPECTED)
    assert rows["rnn-series"]["modality"] == "series" and rows["gpt"]["modality"] == "text"


@pytest.mark.parametrize("name", ["ngram", "rnn", "gpt"])
def test_old_text_runs_generate_the_same_samples(old_runs, name):
    sampled = service.generate(name, {"prompt": "春", "n": 2, "max_new_tokens": 12, "temperature": 1.0, "top_k": 5},
                               seed=7)
    greedy = service.generate(name, {"temperature": 0, "max_new_tokens": 12}, seed=0)
    assert sampled.outputs == EXPECTED[name]["samples"]
    assert greedy.outputs == EXPECTED[name]["greedy"]


@pytest.mark.parametrize("name", ["vae", "dcgan", "diffusion"])
def test_old_image_runs_generate_the_same_pixels(old_runs, name):
    want = EXPECTED[name]
    generation = service.generate(name, {"n": 2, "class_": want["class"], **want["options"]}, seed=3)
    assert [hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest() for p in generation.outputs] == \
        want["pixels_sha256"]


@pytest.mark.parametrize("name", ["ar", "rnn-series"])
def test_old_series_runs_forecast_the_same(old_runs, name):
    result = service.generate(name, {"horizon": 5, "paths": 2}, seed=4).outputs
    # AR is statsmodels' float64 arithmetic: bitwise. The GRU's float32 kernels take another path on a CPU without
    # AVX-512 (a CI machine gave a relative difference of 8e-9): the same to 1e-6, far below a wrong load's error.
    rtol = 0.0 if name == "ar" else 1e-6
    for key in ("forecast", "lower", "upper", "paths"):
        np.testing.assert_allclose(np.asarray(result[key]), np.asarray(EXPECTED[name][key]), rtol=rtol, atol=0.0,
                                   err_msg=key)
