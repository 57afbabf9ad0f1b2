"""The training loop: exact resume after Ctrl-C, keep-best, checksums, the learning-rate schedule,
and the validation NLL against a direct computation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aigc.config import TrainConfig
from aigc.data.tokenizer import train_char
from aigc.errors import UserError
from aigc.sample import load_run
from aigc.service import train
from aigc.train import Budget, Interrupted, TextBatches, compile_unavailable, lm_loss, lr_at, stream_nll, train_loop
from conftest import TINY_SETS, make_model, make_poems

RESUME_SETS = {**TINY_SETS["gpt"], "eval_interval": "50", "log_interval": "1"}
RESUME_STEPS = 300


def _set_args(sets: dict) -> list[str]:
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_ctrl_c_then_resume_gives_the_same_weights_as_an_uninterrupted_run(poems_file, aigc_home):
    reference, _ = train("gpt", str(poems_file), name="straight", max_steps=RESUME_STEPS, sets=RESUME_SETS)

    cmd = [sys.executable, "-m", "aigc", "train", "--family", "gpt", "--data", str(poems_file), "--name",
           "interrupted", "--max-steps", str(RESUME_STEPS), *_set_args(RESUME_SETS)]
    env = {**os.environ, "AIGC_HOME": str(aigc_home)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = aigc_home / "runs" / "interrupted" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way, then press Ctrl-C
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    state = json.loads((aigc_home / "runs/interrupted/checkpoints/last/state.json").read_text())
    assert 0 < state["step"] < RESUME_STEPS
    record = json.loads((aigc_home / "runs/interrupted/run.json").read_text())
    assert record["status"] == "interrupted"

    resumed, metrics_after = train("gpt", str(poems_file), name="interrupted", resume=True, max_steps=RESUME_STEPS)
    assert metrics_after["steps"] == RESUME_STEPS
    for where in ("checkpoints/last", "."):
        a, b = _weights(reference / where), _weights(resumed / where)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{where}: {key}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated log lines after resume


def test_keep_best_and_the_run_directory(poems_file):
    run_dir, metrics = train("gpt", str(poems_file), name="best", max_steps=8, sets=TINY_SETS["gpt"])
    for name in ("config.toml", "run.json", "metrics.jsonl", "model.safetensors", "config.json",
                 "generation_config.json", "tokenizer.json", "tokenizer_config.json", "val.jsonl", "README.md",
                 "manifest.json", "checkpoints/last/optimizer.pt", "checkpoints/last/state.json"):
        assert (run_dir / name).is_file(), name
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    best = min(evals, key=lambda r: r["val_loss"])
    assert metrics["best_step"] == best["step"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "done" and record["dtype"] == "fp32"
    assert "library_name: transformers" in (run_dir / "README.md").read_text()
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_a_corrupted_weights_file_is_refused(poems_file):
    run_dir, _ = train("rnn", str(poems_file), name="corrupt", max_steps=4, sets=TINY_SETS["rnn"])
    path = run_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        load_run("corrupt")
    ckpt = run_dir / "checkpoints" / "last" / "optimizer.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(UserError, match="corrupted"):
        train("rnn", str(poems_file), name="corrupt", resume=True, max_steps=8)


def test_token_dropout_replaces_inputs_by_unk_and_keeps_the_targets():
    ids = np.arange(2, 5002, dtype=np.int64) % 97 + 2  # no 0 (EOT) or 1 (<unk>) in the stream
    plain = TextBatches(ids, ids[:100], 64)
    dropped = TextBatches(ids, ids[:100], 64, token_dropout=0.25, unk_id=1)
    x0, y0 = plain.sample(torch.Generator().manual_seed(3), 256)
    x1, y1 = dropped.sample(torch.Generator().manual_seed(3), 256)
    assert torch.equal(y0, y1)  # the same windows, the same targets
    replaced = x1 != x0
    assert torch.all(x1[replaced] == 1) and not torch.any(x0 == 1)
    assert abs(replaced.float().mean().item() - 0.25) < 0.01  # 16,384 inputs: within 4 standard errors
    assert torch.equal(dropped.val_batches(1, 4)[0][0], plain.val_batches(1, 4)[0][0])  # validation is clean
    with pytest.raises(ValueError, match="<unk>"):
        TextBatches(ids, ids[:100], 64, token_dropout=0.1, unk_id=None)


@pytest.mark.parametrize(("family", "sets", "message"), [
    ("ngram", {"token_dropout": "0.1"}, "token_dropout applies to gradient-trained families"),
    ("rnn", {"tokenizer": "bpe", "bpe_vocab_size": "300", "token_dropout": "0.1"}, "need the char tokenizer"),
    ("gpt", {"tokenizer": "bpe", "bpe_vocab_size": "300", "min_char_count": "2"}, "need the char tokenizer"),
], ids=["ngram", "bpe-token-dropout", "bpe-min-count"])
def test_char_only_data_keys_are_refused_elsewhere(poems_file, family, sets, message):
    with pytest.raises(UserError, match=message):
        train(family, str(poems_file), name="x", max_steps=None if family == "ngram" else 1,
              sets={**TINY_SETS[family], **sets})


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert lr_at(500, cfg, 100) == pytest.approx(0.1)


@pytest.mark.parametrize("family", ["rnn", "gpt"])
def test_stream_nll_equals_one_full_pass_when_the_text_fits(family):
    docs = make_poems(2)
    tok = train_char(docs)
    ids = tok.encode_docs(docs)[:40]
    model = make_model(family, ids, tok).eval()
    x = torch.as_tensor(ids.astype(np.int64))[None]
    with torch.no_grad():
        direct = lm_loss(model, x[:, :-1], x[:, 1:]).item() * (len(ids) - 1)
    total, n = stream_nll(model, ids, block_size=64)
    assert n == len(ids) - 1
    assert total == pytest.approx(direct, rel=1e-5)
    if family == "rnn":  # a stateless RNN scores the same in windows as long as the context fits
        windowed, _ = stream_nll(model, ids, block_size=39)
        assert windowed == pytest.approx(direct, rel=1e-5)


def test_val_bpc_is_total_bits_over_characters(poems_file):
    run_dir, metrics = train("ngram", str(poems_file), name="bpc", sets={"max_order": "3"})
    val = [json.loads(line)["text"] for line in (run_dir / "val.jsonl").read_text().splitlines()]
    chars = sum(map(len, val)) + len(val) - 1
    assert metrics["val_chars"] == chars
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] * metrics["val_tokens"] / math.log(2) / chars)


def test_keep_best_false_keeps_the_last_weights(poems_file):
    run_dir, metrics = train("gpt", str(poems_file), name="last", max_steps=8,
                             sets={**TINY_SETS["gpt"], "keep_best": "false"})
    assert metrics["best_step"] == 8
    root, last = _weights(run_dir), _weights(run_dir / "checkpoints" / "last")
    assert all(torch.equal(root[k], last[k]) for k in root)


def test_dtype_auto_follows_the_family_on_cpu(monkeypatch):
    from aigc import train as train_module

    monkeypatch.setattr(train_module, "bf16_available", lambda: True)
    if torch.cuda.is_available():
        pytest.skip("the CPU rule does not apply on a GPU")
    assert train_module.resolve_dtype("auto", cpu_bf16=True) == "bf16"
    assert train_module.resolve_dtype("auto", cpu_bf16=False) == "fp32"
    assert train_module.resolve_dtype("bf16", cpu_bf16=False) == "bf16"  # asked for explicitly
    assert train_module.resolve_dtype("fp32", cpu_bf16=True) == "fp32"


def test_time_budget_estimates_and_records_the_schedule(poems_file):
    # 6 s: enough steps for the first estimate (after step 5) even on a busy machine
    run_dir, metrics = train("rnn", str(poems_file), name="timed", max_minutes=0.1, sets=TINY_SETS["rnn"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    estimates = [r["schedule_steps"] for r in records if "schedule_steps" in r]
    assert estimates and metrics["schedule_steps"] == estimates[-1]
    assert metrics["train_time_s"] >= 0.1 * 60  # it trained until the budget was spent
    budget = json.loads((run_dir / "run.json").read_text())["budget"]
    assert budget == {"max_steps": None, "max_minutes": 0.1}


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(poems_file, monkeypatch):
    import errno

    from aigc import checkpoint

    run_dir, _ = train("gpt", str(poems_file), name="disk", max_steps=4, sets=TINY_SETS["gpt"])
    before = _weights(run_dir / "checkpoints" / "last")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(checkpoint.torch, "save", full_disk)
        train("gpt", str(poems_file), name="disk", resume=True, max_steps=8)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    last = checkpoint.find_checkpoint(run_dir)  # still there, verified, and no temp folder left
    assert all(torch.equal(before[k], v) for k, v in _weights(last).items())
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    _, metrics = train("gpt", str(poems_file), name="disk", resume=True, max_steps=8)  # and resumable
    assert metrics["steps"] == 8


def test_training_runs_off_the_main_thread(poems_file):
    import threading

    results = {}

    def work():
        results["out"] = train("rnn", str(poems_file), name="thread", max_steps=2, sets=TINY_SETS["rnn"])

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(60)
    assert results["out"][1]["steps"] == 2


def test_one_process_trains_again_with_another_dtype(tmp_path):
    """accelerate keeps one state per process; a second run with another dtype (a benchmark, a
    server) must not fail on it."""
    from aigc.models.vae import VAE, VAEConfig
    from aigc.train import ImageBatches

    x = torch.rand(16, 1, 8, 8) * 2 - 1
    for i, dtype in enumerate(("fp32", "bf16", "fp32")):
        model = VAE(VAEConfig(z_dim=2, base_channels=4), (1, 8, 8))
        (tmp_path / str(i)).mkdir()
        fit = train_loop(model, ImageBatches(x, None, x[:4], None), TrainConfig(dtype=dtype, batch_size=4),
                         tmp_path / str(i), Budget(1, None))
        assert fit["dtype"] == dtype


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable(DEVICE) is not None, reason="torch.compile cannot run here")
def test_compiled_training_matches_eager_resumes_exactly_and_saves_plain_names(tmp_path):
    from aigc.models import gpt

    docs = make_poems(20)
    tok = train_char(docs)
    ids = tok.encode_docs(docs)
    split = len(ids) * 9 // 10

    def run(name: str, compile: str, *, on_eval=None, resume: bool = False) -> tuple[dict, dict]:
        run_dir = tmp_path / name
        run_dir.mkdir(exist_ok=True)
        model = gpt.load(run_dir / "checkpoints" / "last") if resume else make_model("gpt", ids, tok)
        cfg = TrainConfig(block_size=16, batch_size=4, warmup_steps=2, eval_interval=4, eval_batches=2,
                          dtype="fp32", compile=compile)
        fit = train_loop(model, TextBatches(ids[:split], ids[split:], 16), cfg, run_dir, Budget(12, None),
                         resume=resume, on_eval=on_eval)
        return fit, _weights(run_dir / "checkpoints" / "last")

    from torch._dynamo.utils import counters

    eager_fit, eager = run("eager", "false")
    counters.clear()
    compiled_fit, compiled = run("compiled", "true")
    assert (eager_fit["compiled"], compiled_fit["compiled"]) == (False, True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the model
    assert compiled.keys() == eager.keys()  # the family's own names, no "_orig_mod." prefix
    for key in eager:  # the same training, up to the order of floating-point sums
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=2e-3, msg=key)
    assert compiled_fit["train_loss"] == pytest.approx(eager_fit["train_loss"], rel=1e-3)

    def press_ctrl_c(model, step):
        if step == 4:
            signal.raise_signal(signal.SIGINT)  # the loop saves after the next step and stops

    with pytest.raises(Interrupted):
        run("resumed", "true", on_eval=press_ctrl_c)
    _, resumed = run("resumed", "auto", resume=True)  # auto on resume: as the run started (compiled)
    for key in compiled:
        torch.testing.assert_close(resumed[key], compiled[key], rtol=0, atol=1e-6, msg=key)


def test_compile_falls_back_to_eager_without_a_compiler(tmp_path, capfd):
    from torch._inductor import config as inductor_config

    from aigc.models.vae import VAE, VAEConfig
    from aigc.train import ImageBatches

    if torch.cuda.is_available():
        pytest.skip("a GPU compiles with Triton, not a C++ compiler")
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        assert "no C++ compiler" in compile_unavailable(DEVICE)
        fit = train_loop(VAE(VAEConfig(z_dim=2, base_channels=4), (1, 8, 8)), ImageBatches(x, None, x[:4], None),
                         TrainConfig(batch_size=4, compile="true"), tmp_path, Budget(2, None))
    assert fit["compiled"] is False and fit["steps"] == 2
    assert "compile=true cannot compile here, training runs eager" in capfd.readouterr().err


def test_compile_auto_needs_a_family_that_gains_and_a_budget_that_pays_back():
    from aigc.train import resolve_compile

    assert resolve_compile("auto", True, Budget(None, 10.0))  # the default 10-minute budget
    assert resolve_compile("auto", True, Budget(5000, None))
    assert not resolve_compile("auto", True, Budget(8, None))  # a few steps: compiling would not pay back
    assert not resolve_compile("auto", True, Budget(None, 1.0))
    assert not resolve_compile("auto", True, Budget(50, 10.0))  # both given: both must be long enough
    assert not resolve_compile("auto", False, Budget(None, 10.0))  # a family measured not to gain
    assert resolve_compile("true", False, Budget(8, None)) and not resolve_compile("false", True, Budget(None, 10.0))


def test_compile_falls_back_to_eager_when_compiling_fails(tmp_path):
    """A C++ compiler that answers --version but fails to build (like a missing Python.h): the
    probe finds out before training, which runs eager."""
    from torch._inductor import config as inductor_config

    from aigc.models.vae import VAE, VAEConfig
    from aigc.train import ImageBatches

    if torch.cuda.is_available():
        pytest.skip("a GPU compiles with Triton, not a C++ compiler")
    broken = tmp_path / "broken-g++"
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "g++ 12" && exit 0\nexit 1\n')
    broken.chmod(0o755)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    # no kernel built earlier (a cache) comes to the rescue
    with inductor_config.patch({"cpp.cxx": (None, str(broken)), "force_disable_caches": True}):
        assert "torch.compile failed on a test function" in compile_unavailable(DEVICE)
        fit = train_loop(VAE(VAEConfig(z_dim=2, base_channels=4), (1, 8, 8)), ImageBatches(x, None, x[:4], None),
                         TrainConfig(batch_size=4, compile="true"), tmp_path, Budget(2, None))
    assert fit["compiled"] is False and fit["steps"] == 2
