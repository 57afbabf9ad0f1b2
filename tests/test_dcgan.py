"""DCGAN: shapes, the two losses against torch's own, the truncated normal against scipy, the
two-phase step of the shared loop (each optimizer moves only its own network, two optimizer
states in the checkpoint, exact resume), EMA sampling, save/load, and that it learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import stats

from aigc.checkpoint import load_optimizer_state
from aigc.models import FAMILIES
from aigc.models.dcgan import (
    DCGAN,
    PHASES,
    DCGANConfig,
    discriminator_loss,
    generator_loss,
    truncated_normal,
)
from aigc.service import train
from aigc.train import Budget, ImageBatches, train_loop

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"z_dim": "4", "base_channels": "8", "batch_size": "16", "eval_interval": "4", "dtype": "fp32",
        "log_interval": "2"}


def tiny(shape=(1, 8, 8), num_classes=0, **kw) -> DCGAN:
    torch.manual_seed(0)
    return DCGAN(DCGANConfig(z_dim=4, base_channels=8, **kw), shape, num_classes)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 5, 7)])
def test_generator_and_discriminator_shapes(shape):
    model = tiny(shape, num_classes=3)
    y = torch.tensor([0, 2])
    x = model.sample(2, generator=seeded(0), y=y)
    assert x.shape == (2, *shape) and x.min() >= -1 and x.max() <= 1
    assert model.discriminator(x, y).shape == (2,)


def test_nonsaturating_losses_are_binary_cross_entropy():
    real, fake = torch.randn(64) * 3, torch.randn(64) * 3
    bce = (F.binary_cross_entropy_with_logits(real, torch.ones(64))
           + F.binary_cross_entropy_with_logits(fake, torch.zeros(64)))
    torch.testing.assert_close(discriminator_loss("nonsaturating", real, fake), bce)
    # the generator's loss is -log D(G(z)), not log(1 - D(G(z)))
    torch.testing.assert_close(generator_loss("nonsaturating", fake),
                               F.binary_cross_entropy_with_logits(fake, torch.ones(64)))


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 0.25])
    # relu(1 - s_real): 0, 0.5, 2 -> mean 2.5/3; relu(1 + s_fake): 0, 1, 1.25 -> mean 2.25/3
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(2.5 / 3 + 2.25 / 3)
    assert generator_loss("hinge", fake).item() == pytest.approx(-(-3.0 + 0.0 + 0.25) / 3)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_truncated_normal_matches_scipy(t):
    z = truncated_normal((20_000,), t, seeded(0)).numpy()
    assert np.abs(z).max() <= t
    assert z.var() == pytest.approx(stats.truncnorm(-t, t).var(), rel=0.05)
    assert stats.kstest(z, stats.truncnorm(-t, t).cdf).pvalue > 0.001


def test_truncation_is_checked_and_shrinks_the_latents():
    model = tiny()
    assert model.latents(500, seeded(1), truncation=0.5).abs().max() <= 0.5
    assert model.latents(500, seeded(1)).abs().max() > 2
    for bad in (0, -1, 11, True):
        with pytest.raises(ValueError, match="truncation"):
            model.sample(2, generator=seeded(0), truncation=bad)


def test_each_phase_leaves_gradients_on_its_own_network_only():
    model = tiny()
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    model(x, phase="discriminator")["loss"].backward()
    assert all(p.grad is None for p in model.generator.parameters())  # fakes made without gradients
    assert all(p.grad is not None for p in model.discriminator.parameters())
    model.zero_grad(set_to_none=True)
    model(x, phase="generator")["loss"].backward()
    assert all(p.grad is not None for p in model.generator.parameters())
    with pytest.raises(ValueError, match="unknown phase"):
        model(x, phase="both")
    assert set(p for ph in PHASES for p in model.phase_parameters(ph)) == set(model.parameters())


def test_the_registry_declares_the_phases_and_the_gan_train_defaults():
    fam = FAMILIES["dcgan"]
    assert fam.phases == ("discriminator", "generator") and fam.after_step and fam.sampler_options == ("truncation",)
    cfg = fam.train_config()
    assert (cfg.lr, cfg.beta1, cfg.min_lr_ratio, cfg.weight_decay, cfg.keep_best) == (2e-4, 0.5, 1.0, 0.0, False)


def _batches(n=64, shape=(1, 8, 8), value=None):
    g = seeded(3)
    x = torch.rand((n, *shape), generator=g) * 2 - 1 if value is None else torch.full((n, *shape), value)
    return ImageBatches(x, None, x[:16], None)


def test_one_loop_step_moves_each_network_with_its_own_optimizer(tmp_path):
    from aigc.models.dcgan import GANTrainConfig

    model = tiny(ema_decay=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = GANTrainConfig(batch_size=8, dtype="fp32", eval_interval=100)
    train_loop(model, _batches(), cfg, tmp_path, Budget(1, None), phases=PHASES)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v.cpu(), before[k])}
    assert any(k.startswith("generator.") for k in changed) and any(k.startswith("discriminator.") for k in changed)
    saved = load_optimizer_state(tmp_path / "checkpoints" / "last")
    assert set(saved) == set(PHASES)
    n_g = len(list(model.generator.parameters()))
    n_d = len(list(model.discriminator.parameters()))
    assert len(saved["generator"]["state"]) == n_g and len(saved["discriminator"]["state"]) == n_d
    assert saved["generator"]["param_groups"][0]["betas"] == (0.5, 0.999)


def test_the_generator_learns_a_constant_image(tmp_path):
    """Real images are all 0.5: after training, generated pixels sit near 0.5 (they start near 0)."""
    from aigc.models.dcgan import GANTrainConfig

    model = tiny(ema_decay=0.0)
    start = model.sample(64, generator=seeded(0)).mean().item()
    cfg = GANTrainConfig(batch_size=32, lr=2e-3, dtype="fp32", eval_interval=1000)
    train_loop(model, _batches(value=0.5), cfg, tmp_path, Budget(120, None), phases=PHASES)
    x = model.sample(64, generator=seeded(0))
    assert abs(start - 0.5) > 0.3
    assert abs(x.mean().item() - 0.5) < 0.1 and (x - 0.5).abs().mean() < 0.15


def test_sampling_uses_the_ema_weights():
    model = tiny(ema_decay=0.5)
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(0.05)
    model.after_step()
    twin = tiny(ema_decay=0.0)
    twin.load_state_dict(model.state_dict())
    twin.generator.load_state_dict({**model.generator.state_dict(), **model.ema.weights})
    a = model.sample(4, generator=seeded(0))
    torch.testing.assert_close(a, twin.sample(4, generator=seeded(0)))
    live = tiny(ema_decay=0.0)
    live.load_state_dict(model.state_dict())
    assert not torch.allclose(a, live.sample(4, generator=seeded(0)))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_save_load_round_trip_gives_identical_samples(tmp_path, num_classes):
    model = tiny(num_classes=num_classes)
    model.after_step()
    model.save(tmp_path)
    loaded = DCGAN.load(tmp_path)
    assert loaded.config == model.config and loaded.ema.updates == 1
    y = torch.tensor([0, 2]) if num_classes else None
    for truncation in (None, 0.7):
        a = model.sample(2, generator=seeded(4), y=y, truncation=truncation)
        assert torch.equal(a, loaded.sample(2, generator=seeded(4), y=y, truncation=truncation))
    assert any(k.startswith("ema.") for k in load_file(tmp_path / "model.safetensors"))


def test_labels_are_checked():
    cond, uncond = tiny(num_classes=3), tiny()
    with pytest.raises(ValueError, match="conditional"):
        cond.sample(2, generator=seeded(0))
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(2, generator=seeded(0), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0..2"):
        cond.sample(2, generator=seeded(0), y=torch.tensor([0, 3]))


def test_resume_continues_exactly(aigc_home):
    """4 steps, then --resume to 8, gives the weights of 8 steps in one go (both optimizers, the EMA,
    the RNG that draws the latents; evaluations in between do not disturb it)."""
    train("dcgan", "digits", name="straight", max_steps=8, sets=TINY)
    train("dcgan", "digits", name="halves", max_steps=4, sets=TINY)
    run_dir, _ = train("dcgan", "digits", name="halves", max_steps=8, resume=True)
    a = load_file(aigc_home / "runs" / "straight" / "model.safetensors")
    b = load_file(run_dir / "model.safetensors")
    assert set(a) == set(b) and any(k.startswith("ema.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_cli_trains_generates_with_truncation_and_regenerates(aigc_home, tmp_path):
    import json

    from typer.testing import CliRunner

    from aigc.cli import app
    from aigc.data.images import read_png_record

    runner = CliRunner()
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    r = runner.invoke(app, ["train", "--family", "dcgan", "--data", "digits", "--conditional", "--name", "gan",
                            "--max-steps", "4", "--json", *sets])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["metrics"]
    assert metrics["steps"] == 4 and math.isfinite(metrics["val_loss"])
    log = [json.loads(line) for line in (aigc_home / "runs" / "gan" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_generator" in row and "loss_discriminator" in row for row in log)
    r = runner.invoke(app, ["generate", "gan", "-n", "3", "--seed", "2", "--class", "7", "--truncation", "0.8",
                            "--out", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["settings"]["truncation"] == 0.8
    record = read_png_record(tmp_path / "out" / "001.png")
    assert record["truncation"] == 0.8 and record["seed"] == 3 and record["class"] == 7
    r = runner.invoke(app, ["generate", "--from-image", str(tmp_path / "out" / "001.png"), "--out",
                            str(tmp_path / "again"), "--json"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "001.png")),
                          np.asarray(Image.open(tmp_path / "again" / "001.png")))
    listed = json.loads(runner.invoke(app, ["runs", "--json"]).stdout)["runs"]
    assert listed[0]["score"] == {"metric": "val_loss", "value": metrics["val_loss"]}  # D's loss, until evaluated
    for bad, message in ((["--truncation", "0"], "truncation"), (["--steps", "5"], "--steps does not apply")):
        r = runner.invoke(app, ["generate", "gan", "-n", "1", "--class", "1", *bad])
        assert r.exit_code == 1 and message in r.output, r.output
