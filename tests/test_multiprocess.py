"""Several processes: `torchrun --standalone --nproc_per_node 2` (gloo on CPU) against one process.

With dropout 0, fp32 and one thread per process, 2 processes take the same optimisation steps as
1 (batch_size is the global batch; DDP averages the gradients of the two halves): the weights
agree to float32 rounding (summation order), within ATOL. Only the main process writes: one run
directory (the default name has a timestamp, and both processes must use the same one), one log
without duplicated lines, one line on stdout. A 2-process checkpoint resumes in 1 process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aigc.service import train
from conftest import TINY_SETS

pytestmark = pytest.mark.usefixtures("one_thread", "cpu_only")

ATOL = 1e-5  # largest |difference| allowed between the weights of 1 and 2 processes (measured: see the tests)
GPT = {**TINY_SETS["gpt"], "batch_size": "8", "eval_interval": "4", "log_interval": "1"}
DIFFUSION = {"base_channels": "8", "depth": "1", "res_blocks": "1", "attention": "false", "dropout": "0.0",
             "timesteps": "50", "batch_size": "8", "warmup_steps": "2", "eval_interval": "4", "eval_batches": "1",
             "log_interval": "1", "dtype": "fp32", "conditional": "true"}
DCGAN = {"z_dim": "4", "base_channels": "8", "batch_size": "8", "eval_interval": "2", "eval_batches": "1",
         "dtype": "fp32", "log_interval": "1"}


@pytest.fixture
def cpu_only(monkeypatch):
    """These tests compare gloo on CPU with one CPU process: on a machine with a GPU, the runs made
    in this process keep to the CPU too (torchrun's get CUDA_VISIBLE_DEVICES="")."""
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state from an earlier test holds the GPU
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # and would hold the CPU for the next one


def torchrun(home: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m aigc train ARGS` on the CPU, offline, one thread per process."""
    env = {**os.environ, "AIGC_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "aigc", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def set_args(sets: dict) -> list[str]:
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of the metrics.jsonl lines holding `key`; a duplicated step fails."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if key in r]
    assert len(steps) == len(set(steps)), f"duplicated log lines: {steps}"
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.parametrize("family", ["vae", "diffusion"])
def test_the_loss_of_a_batch_is_the_mean_over_its_halves_with_the_noise_sliced(family):
    # what lets N processes (and grad_accum micro-batches) reproduce one: noise drawn for the whole
    # batch (draw_noise) and sliced like it gives each half the noise it had in the whole
    from aigc.config import build
    from aigc.models import FAMILIES
    from aigc.service import sections_for

    fam = FAMILIES[family]
    sets = {k: v for k, v in DIFFUSION.items() if k in ("base_channels", "depth", "res_blocks", "attention",
                                                        "timesteps")} if family == "diffusion" else {"z_dim": "4"}
    torch.manual_seed(0)
    model = fam.build(build(sections_for(family), sets, family=family)["model"], (1, 8, 8), 3)
    x, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 3
    noise = model.draw_noise(8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(x, y, noise=noise)["loss"]
        halves = [model(x[rows], y[rows], noise={k: v[rows] for k, v in noise.items()})["loss"]
                  for rows in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2, rtol=1e-6, atol=1e-6)
    assert set(noise) == ({"t", "eps", "u"} if family == "diffusion" else {"eps"})


def test_two_processes_train_a_gpt_like_one_and_the_checkpoint_resumes(poems_file, aigc_home):
    train("gpt", str(poems_file), name="one", max_steps=4, sets=GPT)
    one_at_4 = weights(aigc_home / "runs/one/checkpoints/last")
    train("gpt", str(poems_file), name="one", resume=True, max_steps=8)
    one_at_8 = weights(aigc_home / "runs/one/checkpoints/last")

    # no --name: the default name has a timestamp, and both processes must use the main one's
    proc = torchrun(aigc_home, "--family", "gpt", "--data", str(poems_file), "--max-steps", "4", *set_args(GPT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = sorted(p.name for p in (aigc_home / "runs").iterdir() if p.name != "one")
    assert len(made) == 1, made  # one run directory, no staging leftovers
    two = aigc_home / "runs" / made[0]
    assert proc.stdout.split() == [str(two)]  # the main process alone reports
    assert json.loads((two / "run.json").read_text())["status"] == "done"
    assert largest_difference(one_at_4, weights(two / "checkpoints/last")) < ATOL
    one_loss, two_loss = logged(aigc_home / "runs/one", "loss"), logged(two, "loss")
    assert sorted(two_loss) == [1, 2, 3, 4]
    for step, loss in two_loss.items():  # the logged loss is the global batch's
        assert loss == pytest.approx(one_loss[step], abs=1e-5)
    assert len(logged(two, "val_loss")) == 1

    # the 2-process checkpoint continues in one process, to the weights of 8 steps in one
    train("gpt", str(poems_file), name=two.name, resume=True, max_steps=8)
    assert largest_difference(one_at_8, weights(two / "checkpoints/last")) < ATOL
    assert sorted(logged(two, "loss")) == list(range(1, 9))


def test_two_processes_train_a_conditional_diffusion_model_like_one(aigc_home):
    # the noise (t, eps, the label drop) is drawn for the global batch, so an image's noise does not
    # depend on which process trains on it. One process with grad_accum=2 sums the gradients in the
    # order 2 processes do: the weights agree exactly (measured: 0.0). With grad_accum=1 they differ
    # by up to about lr (7e-4 measured): at this width every GroupNorm group is one channel, so the
    # gradients of the per-channel shifts before one (emb_proj) are zero up to rounding, and Adam
    # scales rounding noise to steps of size lr. The logged losses agree either way.
    train("diffusion", "digits", name="one", max_steps=4, sets={**DIFFUSION, "grad_accum": "2"})
    proc = torchrun(aigc_home, "--family", "diffusion", "--data", "digits", "--name", "two", "--max-steps", "4",
                    *set_args(DIFFUSION))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = aigc_home / "runs/one", aigc_home / "runs/two"
    assert largest_difference(weights(one / "checkpoints/last"), weights(two / "checkpoints/last")) < ATOL
    assert largest_difference(weights(one), weights(two)) < ATOL  # the EMA weights too
    for step, loss in logged(two, "loss").items():  # the logged loss is the global batch's
        assert loss == pytest.approx(logged(one, "loss")[step], abs=1e-5)
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["step-000004.png"]


def test_a_gan_trains_under_two_processes(aigc_home):
    # two phases: each leaves the other's parameters without gradients (DDP: find_unused_parameters);
    # BatchNorm makes it not bit-comparable with one process, so only this: it trains and writes once
    proc = torchrun(aigc_home, "--family", "dcgan", "--data", "digits", "--name", "gan", "--max-steps", "2",
                    *set_args(DCGAN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = aigc_home / "runs/gan"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
    assert sorted(logged(run_dir, "loss_generator")) == [1, 2]


def test_more_processes_than_gpus_is_a_clear_error():
    from aigc.distributed import check_gpus
    from aigc.errors import UserError

    check_gpus(2, 0)  # no GPU: gloo on the CPU takes any number
    check_gpus(2, 2)
    with pytest.raises(UserError, match="2 processes on this machine but 1 GPU.*--nproc_per_node 1"):
        check_gpus(2, 1)


@pytest.mark.slow
def test_two_processes_train_a_compiled_gpt_like_one(poems_file, aigc_home):
    # torch.compile under DDP (accelerate compiles the DDP-wrapped module); the plain module is saved
    from aigc.train import compile_unavailable

    if compile_unavailable(torch.device("cpu")) is not None:
        pytest.skip("torch.compile cannot run here")
    sets = {**GPT, "compile": "true"}
    train("gpt", str(poems_file), name="one", max_steps=4, sets=sets)
    proc = torchrun(aigc_home, "--family", "gpt", "--data", str(poems_file), "--name", "two", "--max-steps", "4",
                    *set_args(sets))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = aigc_home / "runs/one", aigc_home / "runs/two"
    assert json.loads((two / "run.json").read_text())["compiled"] is True
    assert largest_difference(weights(one / "checkpoints/last"), weights(two / "checkpoints/last")) < ATOL
