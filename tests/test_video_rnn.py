"""vae-rnn (issue 18): a per-frame VAE and a GRU over its latent sequence, trained in two stages in one run, making
clips and predicting them. End to end on moving-digits (tiny sizes), seeded reproducibility, resume in either stage,
the budget split, bad options, and the API serving its clips. The model's contract: tests/test_contract.py."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from safetensors.torch import load_file
from typer.testing import CliRunner

from aigc import service
from aigc.cli import app
from aigc.data import video as v
from aigc.data.images import named_installed
from aigc.errors import BadRequest
from aigc.evaluate import video as vm
from aigc.modalities.video import STAGE_DIR, stage_budgets
from aigc.models import vae
from aigc.models.vae_rnn import VAERNN, FrameStage, VAERNNConfig, cut_windows, paste_windows, window_corners
from aigc.train import Budget

runner = CliRunner()
TINY = {"frames": "8", "context": "4", "size": "24", "val_clips": "12", "batch_size": "4", "warmup_steps": "2",
        "eval_interval": "3", "eval_batches": "1", "log_interval": "1", "dtype": "fp32", "compile": "false",
        "z_dim": "4", "base_channels": "8", "label_dim": "4", "n_hidden": "16"}


def _train(name: str, steps: int = 8, **extra) -> tuple[Path, dict]:
    return service.train("vae-rnn", "moving-digits", name=name, max_steps=steps, sets={**TINY, **extra})


def test_trains_both_stages_makes_the_same_clips_for_a_seed_and_scores_both_jobs(tmp_path, one_thread):
    run_dir, metrics = _train("vr", conditional="true")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["job"] == "generate" and record["context"] == 4 and record["num_classes"] == 10
    assert metrics["vae_steps"] == 4 and metrics["rnn_steps"] == 4 and metrics["steps"] == 8  # vae_share 0.5
    for key in ("mse", "ssim", "ssim_black", "val_nelbo", "rnn_val_loss", "vae_val_loss"):
        assert math.isfinite(metrics[key]), key
    assert (run_dir / STAGE_DIR / "vae_config.json").is_file()  # stage 1's own run: its best VAE, its checkpoint
    assert (run_dir / STAGE_DIR / "checkpoints" / "last").is_dir() and (run_dir / "samples").is_dir()
    assert "per-frame VAE" in (run_dir / "README.md").read_text()

    args = ["generate", "vr", "-n", "2", "--seed", "3", "--class", "7"]
    for out in ("a", "b"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000.gif", "000.mp4", "001.gif", "001.mp4", "sheet.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = service.generate("vr", {"n": 1, "class_": "7"}, seed=4)
    first = v.read_video(tmp_path / "a" / "000.gif")
    assert first.shape == (8, 24, 24, 3) and not np.array_equal(first[..., 0], other.outputs[0][..., 0])
    again = service.regenerate_image(str(tmp_path / "a" / "001.gif"))  # from the record the GIF carries
    assert np.array_equal(again.outputs[0], other.outputs[0])  # clip 1 at seed 3 is seed 4

    means = [service.generate("vr", {"n": 1, "class_": "7", "temperature": 0}, seed=s) for s in (3, 4)]
    assert np.array_equal(means[0].outputs[0], means[1].outputs[0])  # no noise: the seed does not matter
    assert not np.array_equal(means[0].outputs[0], other.outputs[0])
    with pytest.raises(BadRequest, match="temperature must be in 0..4"):
        service.generate("vr", {"n": 1, "class_": "7", "temperature": 5}, seed=3)

    result = service.evaluate("vr", {"n": 4})  # trains the digits' feature net and clip net (cached)
    m = result["metrics"]
    assert {"frame_fid", "class_consistency", "class_accuracy", "clip_fd", "speed"} <= set(m)  # generation
    assert {"mse", "mae", "psnr", "ssim", "beats_floors"} <= set(m) and set(result["floors"]) == set(vm.FLOORS)
    assert result["clips"] == 4 and result["predicted_clips"] == 4


def test_prediction_reads_the_context_and_continues_it(one_thread):
    """The predicted frames come from the context: other context frames, another prediction; the given frames
    stay as they were."""
    run_dir, _ = _train("pred")
    model = VAERNN.load(run_dir)
    clips = v.named_clips("moving-digits", "test", 2, 0, v.VideoDataConfig(frames=8, size=24)).clips
    x = v.to_tensor(clips)
    future = model.predict(x[:, :4])
    assert future.shape == (2, 4, 24, 24) and future.abs().max() <= 1
    assert not torch.equal(future[0], future[1])
    torch.testing.assert_close(model.predict(x[:1, :4]), future[:1])  # a clip's prediction is its own


def test_the_budget_is_split_between_the_stages():
    assert stage_budgets(Budget(10, None), 0.3) == (Budget(3, None), Budget(7, None))
    first, second = stage_budgets(Budget(None, 15.0), 0.4)
    assert first.max_steps is None and math.isclose(first.max_minutes, 6.0) and math.isclose(second.max_minutes, 9.0)
    assert stage_budgets(Budget(2, None), 0.95) == (Budget(1, None), Budget(1, None))  # each stage a step at least


def test_the_split_option_moves_the_steps(one_thread):
    _, metrics = _train("split", steps=10, vae_share="0.2")
    assert (metrics["vae_steps"], metrics["rnn_steps"]) == (2, 8)


def test_a_split_frame_vae_decodes_each_frame_from_the_other_frames_content():
    """Stage 1 of a split run against its formula: frame a decoded from [z_b[:k], z_a[k:]] and b from [z_a[:k],
    z_b[k:]], the KL of both; with k = 0 it is the VAE's own loss on the same frames and noise."""
    torch.manual_seed(0)
    net = vae.VAE(vae.VAEConfig(z_dim=6, base_channels=8, label_dim=4), (1, 12, 12), num_classes=3)
    x, y = torch.rand(5, 2, 12, 12) * 2 - 1, torch.tensor([0, 2, 1, 1, 0])
    noise = {"eps": torch.randn(5, 2, 6)}
    frames, labels, eps = x.reshape(10, 1, 12, 12), y.repeat_interleave(2), noise["eps"].reshape(10, 6)
    mu, log_var = net.encode(frames, labels)
    z = mu + torch.exp(0.5 * log_var) * eps
    a, b = z[0::2], z[1::2]
    swapped = torch.stack([torch.cat([b[:, :4], a[:, 4:]], 1), torch.cat([a[:, :4], b[:, 4:]], 1)], 1).reshape(10, 6)
    recon = net.recon_nll(net.decode(swapped, labels), frames).mean()
    terms = FrameStage(net, 4)(x, y, noise=noise)
    torch.testing.assert_close(terms["recon"], recon)
    torch.testing.assert_close(terms["kl"], vae.kl_normal(mu, log_var).mean())
    plain = net.loss_terms(frames, labels, noise={"eps": eps})
    torch.testing.assert_close(FrameStage(net)(frames, labels, noise={"eps": eps[:, None]})["loss"], plain["loss"])


def test_a_split_run_keeps_one_content_per_clip_and_scores_it_by_its_formula(one_thread):
    """The split model's stage-2 loss against torch.distributions.Normal (the content's prior once, every motion
    given the ones before, per frame); a sampled clip holds one content in every frame and moves the rest."""
    torch.manual_seed(0)
    model = VAERNN(VAERNNConfig(z_dim=6, content_dim=4, base_channels=8, label_dim=4, n_hidden=16), (1, 12, 12),
                   frames=5, context=2, num_classes=3)
    x, y = torch.rand(3, 5, 12, 12) * 2 - 1, torch.tensor([0, 2, 1])
    m = model.latents(x, y)
    c, p = m[:, :, :4].mean(1), m[:, :, 4:]
    state = model.initial_state(y, 3)
    inputs = torch.cat([c[:, None].expand(-1, 5, -1), torch.cat([model.start.expand(3, 1, -1), p[:, :-1]], 1)], -1)
    mu, log_var, _ = model.step(inputs, state)
    mu_c, log_var_c = model.content_prior(state)
    log_p = (torch.distributions.Normal(mu_c, torch.exp(0.5 * log_var_c)).log_prob(c).sum(-1)
             + torch.distributions.Normal(mu, torch.exp(0.5 * log_var)).log_prob(p).sum((1, 2)))
    torch.testing.assert_close(model(x, y)["loss"], (-log_p / 5).mean())

    z = model.sample_latents(4, generator=torch.Generator().manual_seed(1), y=torch.tensor([0, 1, 2, 0]))
    assert torch.equal(z[:, :, :4], z[:, :1, :4].expand(-1, 5, -1))  # one content a clip
    assert not torch.equal(z[:, 0, 4:], z[:, 1, 4:]) and not torch.equal(z[0, :, :4], z[1, :, :4])
    future = model.predict(x[:, :2].reshape(3, 2, 12, 12), y)
    assert future.shape == (3, 3, 12, 12) and future.abs().max() <= 1


def test_a_split_run_trains_both_stages_and_makes_clips(tmp_path, one_thread):
    run_dir, metrics = _train("split-c", conditional="true", content_dim="2")
    assert metrics["vae_steps"] == 4 and metrics["rnn_steps"] == 4
    for key in ("mse", "ssim", "val_nelbo", "rnn_val_loss", "vae_val_loss"):
        assert math.isfinite(metrics[key]), key
    model = VAERNN.load(run_dir)
    assert model.config.content_dim == 2
    first = service.generate("split-c", {"n": 2, "class_": "3"}, seed=5).outputs
    again = service.generate("split-c", {"n": 2, "class_": "3"}, seed=5).outputs
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)) and first[0].shape[:3] == (8, 24, 24)


@pytest.mark.skipif(not named_installed("fashion-mnist"), reason="moving-fashion-mnist needs the Debian package "
                    "dataset-fashion-mnist (scripts/setup.sh --corpora)")
def test_windows_are_cut_where_the_evaluation_finds_the_object_and_paste_back():
    """The window around each frame's brightness centre is the evaluation's (evaluate/video.py's object_windows,
    on uint8 clips); pasting a frame's window back on black gives the frame where nothing lies outside it."""
    clips = v.named_clips("moving-fashion-mnist", "test", 3, 0, v.VideoDataConfig(frames=6)).clips  # (3, 6, 64, 64, 1)
    frames = v.to_tensor(clips).reshape(18, 1, 64, 64)
    corners = window_corners(frames, 32)
    windows = cut_windows(frames, corners, 32)
    expected = vm.object_windows(clips, 32).reshape(18, 32, 32, 1)
    np.testing.assert_array_equal(v.to_uint8(windows.reshape(3, 6, 32, 32), 1).reshape(18, 32, 32, 1), expected)
    pasted = paste_windows(windows, corners, (64, 64))
    outside = pasted.clone()
    outside[torch.arange(18)[:, None, None], 0, corners[:, 0, None, None] + torch.arange(32)[:, None],
            corners[:, 1, None, None] + torch.arange(32)] = 5.0
    assert torch.all(outside[outside != 5.0] == -1)  # black outside the window
    torch.testing.assert_close(cut_windows(pasted, corners, 32), windows)


def test_a_window_run_draws_one_object_a_clip_and_moves_it(tmp_path, one_thread):
    """window with content_dim = z_dim: every dimension of the window's latent is the clip's, so a clip's every
    frame shows the same drawn window, at places the recurrent net moves."""
    run_dir, metrics = _train("win", conditional="true", window="16", content_dim="4")
    for key in ("ssim", "val_nelbo", "rnn_val_loss", "vae_val_loss"):
        assert math.isfinite(metrics[key]), key
    model = VAERNN.load(run_dir)
    z = model.sample_latents(3, generator=torch.Generator().manual_seed(0), y=torch.tensor([1, 2, 3]))
    assert z.shape == (3, 8, 6) and torch.equal(z[:, :, :4], z[:, :1, :4].expand(-1, 8, -1))
    clips = model.decode(z, torch.tensor([1, 2, 3])).reshape(3, 8, 1, 24, 24)
    corners = torch.minimum(torch.round((z[..., 4:] + 1) / 2 * 8).clamp(min=0), torch.tensor(8.0)).long()
    windows = cut_windows(clips.flatten(0, 1), corners.flatten(0, 1), 16).reshape(3, 8, 1, 16, 16)
    torch.testing.assert_close(windows, windows[:, :1].expand(-1, 8, -1, -1, -1))  # the same object in every frame
    first = service.generate("win", {"n": 1, "class_": "2"}, seed=1).outputs[0]
    assert first.shape[:3] == (8, 24, 24)


@pytest.mark.parametrize(("sets", "steps", "message"), [
    ({"vae_share": "1.5"}, 4, "vae_share"),
    ({"vae_share": "half"}, 4, "vae_share"),
    ({"cell": "transformer"}, 4, "cell"),
    ({}, 1, "trains in 2 stages (vae, rnn), a step each at least: give --max-steps 2 or more"),
    ({"context": "8"}, 4, "context"),
    ({"content_dim": "4"}, 4, "content_dim must be below z_dim (4)"),
    ({"window": "25"}, 4, "window must fit in a frame (24x24)"),
])
def test_bad_options_are_one_clear_error(sets, steps, message):
    args = ["train", "--family", "vae-rnn", "--data", "moving-digits", "--name", "bad", "--max-steps", str(steps)]
    for key, value in {**TINY, **sets}.items():
        args += ["--set", f"{key}={value}"]
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


RESUME = {**TINY, "eval_interval": "20", "z_dim": "8", "base_channels": "16", "n_hidden": "64", "val_clips": "4"}
RESUME_STEPS = 400  # 200 a stage: Ctrl-C lands well inside the stage


def _interrupt(aigc_home: Path, name: str, log: Path, resume: bool) -> None:
    """Start `aigc train` (or --resume) in a process, press Ctrl-C once `log` has 10 lines, wait for it to stop."""
    cmd = [sys.executable, "-m", "aigc", "train", "--family", "vae-rnn", "--data", "moving-digits", "--name", name,
           "--max-steps", str(RESUME_STEPS)]
    cmd += ["--resume"] if resume else [a for k, val in RESUME.items() for a in ("--set", f"{k}={val}")]
    env = {**os.environ, "AIGC_HOME": str(aigc_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a loaded machine may take minutes to import torch
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted at step" in err, err


def test_an_interrupted_run_resumes_in_either_stage_exactly(aigc_home, one_thread):
    """Ctrl-C in stage 1, --resume, Ctrl-C in stage 2, --resume: the weights of the run trained straight through."""
    reference, _ = service.train("vae-rnn", "moving-digits", name="straight", max_steps=RESUME_STEPS, sets=RESUME)
    run = aigc_home / "runs" / "halted"
    _interrupt(aigc_home, "halted", run / STAGE_DIR / "metrics.jsonl", resume=False)
    assert not (run / STAGE_DIR / "done.json").exists() and not (run / "checkpoints").exists()  # still in stage 1
    _interrupt(aigc_home, "halted", run / "metrics.jsonl", resume=True)
    assert (run / STAGE_DIR / "done.json").exists()
    assert 0 < json.loads((run / "checkpoints/last/state.json").read_text())["step"] < RESUME_STEPS // 2  # in stage 2
    resumed, metrics = service.train("vae-rnn", "moving-digits", name="halted", resume=True, max_steps=RESUME_STEPS)
    assert (metrics["vae_steps"], metrics["rnn_steps"]) == (200, 200)
    for where in (".", STAGE_DIR):
        a, b = load_file(reference / where / "model.safetensors"), load_file(resumed / where / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{where}: {key}")


def test_the_api_serves_its_clips(one_thread):
    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app
    from aigc.store import runs_dir

    _train("vr", val_clips="4")
    home = runs_dir().parent
    app_ = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app_) as client:
        body = {"model": "vr", "n": 2, "seed": 5}
        first, again = (client.post("/v1/videos/generations", json=body) for _ in range(2))
        assert first.status_code == 200, first.text
        made = first.json()
        assert made["job"] == "generate" and len(made["data"]) == 2 and made["data"][1]["record"]["seed"] == 6
        assert base64.b64decode(made["data"][0]["gif_b64"])[:6] == b"GIF89a"
        assert [d["gif_b64"] for d in again.json()["data"]] == [d["gif_b64"] for d in made["data"]]
        refused = client.post("/v1/videos/generations", json={"model": "vr", "steps": 4})
        assert refused.status_code == 400 and "--steps does not apply to vae-rnn" in refused.text
        controls = {c["name"]: c for c in client.get("/v1/models/vr/controls").json()["controls"]}
        assert controls["temperature"]["default"] == 1.0 and controls["temperature"]["maximum"] == 4
        means = [client.post("/v1/videos/generations", json={**body, "n": 1, "seed": s, "temperature": 0})
                 for s in (1, 2)]
        assert means[0].status_code == 200, means[0].text
        frames = [[np.asarray(f.convert("L")) for f in ImageSequence.Iterator(Image.open(io.BytesIO(
            base64.b64decode(m.json()["data"][0]["gif_b64"]))))] for m in means]
        assert len(frames[0]) == 8 and np.array_equal(frames[0], frames[1])  # the means: the seed does not matter
        hot = client.post("/v1/videos/generations", json={**body, "temperature": 9})
        assert hot.status_code == 400 and "temperature" in hot.text

