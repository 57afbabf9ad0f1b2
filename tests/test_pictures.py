"""The pictures written at the end of training: the diffusion trajectory and interpolation GIFs
(frames and sizes read back with PIL, against the model's own samples), spherical interpolation
against its closed form, every image family through the dispatcher, and a run that ends with them.
Smoothness of a trained model's interpolation is in test_diffusion_digits.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from aigc.data.images import make_grid, to_uint8
from aigc.evaluate.pictures import GIF_FRAMES, PICTURES, _slerp, save_gif, write_pictures
from aigc.models import FAMILIES
from aigc.models.diffusion import Diffusion, DiffusionConfig
from aigc.service import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"base_channels": 8, "depth": 1, "res_blocks": 1, "attention": False}


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        return [np.array(frame.convert("L")) for frame in ImageSequence.Iterator(gif)]


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 1) -> (H * scale, W * scale): nearest-neighbour enlargement."""
    return image[:, :, 0].repeat(scale, axis=0).repeat(scale, axis=1)


def distinct_runs(frames: list[np.ndarray]) -> list[np.ndarray]:
    """The frames with each run of identical consecutive frames kept once (what a GIF stores)."""
    return [f for i, f in enumerate(frames) if i == 0 or not np.array_equal(f, frames[i - 1])]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's formula, written independently of the module: sin((1-t) w)/sin w a + sin(t w)/sin w b."""
    w = math.acos(float((a.flatten() @ b.flatten()) / (a.norm() * b.norm())))
    return (math.sin((1 - t) * w) * a + math.sin(t * w) * b) / math.sin(w)


def test_slerp_keeps_the_norm_and_turns_at_a_constant_rate():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    b = b * a.norm() / b.norm()  # equal norms: the arc of a great circle
    omega = math.acos(float((a.flatten() @ b.flatten()) / a.norm() ** 2))
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        z = _slerp(a, b, t)
        torch.testing.assert_close(z, slerp(a, b, t))
        assert float(z.norm()) == pytest.approx(float(a.norm()), rel=1e-9)
        assert math.acos(min(1.0, float((a.flatten() @ z.flatten()) / a.norm() ** 2))) == pytest.approx(
            t * omega, abs=1e-6)
    torch.testing.assert_close(_slerp(a, a, 0.3), a)  # parallel: no arc, no division by zero


def test_save_gif_plays_there_and_back_and_holds_the_last_frame(tmp_path):
    frames = np.stack([np.full((3, 4, 1), 40 * i, np.uint8) for i in range(4)])
    save_gif(tmp_path / "a.gif", frames, scale=2, bounce=True)
    read = gif_frames(tmp_path / "a.gif")
    assert [int(f[0, 0]) for f in read] == [0, 40, 80, 120, 80, 40]  # then the loop starts again at 0
    assert read[0].shape == (6, 8)
    save_gif(tmp_path / "b.gif", frames, hold_ms=1500)
    with Image.open(tmp_path / "b.gif") as gif:
        gif.seek(3)
        assert gif.info["duration"] == 1500 and gif.info["loop"] == 0
    with pytest.raises(ValueError, match="uint8 frames"):
        save_gif(tmp_path / "c.gif", frames.astype(np.float32))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_diffusion_pictures_are_the_models_trajectory_and_interpolation(num_classes, tmp_path):
    torch.manual_seed(0)
    model = Diffusion(DiffusionConfig(**TINY), (1, 8, 8), num_classes).eval()
    y = torch.tensor([2, 0, 1]) if num_classes else None
    paths = write_pictures("diffusion", model, torch.zeros(3, 1, 8, 8), y, tmp_path)
    assert [p.name for p in paths] == ["trajectory.gif", "interpolation.gif"]

    # trajectory: one 8-image row per step of dpm-solver (20 steps), from x_T to the samples, enlarged 8x
    labels = torch.arange(8) % num_classes if num_classes else None
    images, xs = model.sample(8, generator=torch.Generator().manual_seed(0), y=labels, sampler="dpm-solver",
                              steps=20, return_trajectory=True)
    expected = [enlarge(make_grid(to_uint8(x), nrow=8), 8) for x in xs]
    frames = gif_frames(paths[0])
    assert frames[0].shape == (12 * 8, 82 * 8)  # 8 images of 8 x 8 with 2-pixel gaps, 8x
    assert len(xs) == 21 and len(frames) == len(distinct_runs(expected))  # the GIF merges repeated frames
    for got, want in zip(frames, distinct_runs(expected), strict=True):
        np.testing.assert_array_equal(got, want)  # grayscale GIFs are lossless
    np.testing.assert_array_equal(frames[-1], enlarge(make_grid(to_uint8(images), nrow=8), 8))

    # interpolation: DDIM (eta 0) samples of the slerp between two seeded noises, there and back, 16x.
    # _slerp itself is checked above: an untrained model amplifies float rounding into different pixels
    z0, z1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.stack([_slerp(z0, z1, float(t)) for t in torch.linspace(0, 1, GIF_FRAMES)])
    y_frames = None if y is None else torch.full((GIF_FRAMES,), 2)  # the class of y[0]
    there = [enlarge(f, 16) for f in to_uint8(model.sample(GIF_FRAMES, z=z, y=y_frames, sampler="ddim", steps=50))]
    frames = gif_frames(paths[1])
    assert frames[0].shape == (128, 128)
    want = distinct_runs(there + there[-2:0:-1])
    assert len(frames) == len(want)
    for got, w in zip(frames, want, strict=True):
        np.testing.assert_array_equal(got, w)


@pytest.mark.parametrize("family", [name for name, fam in FAMILIES.items() if fam.modality == "image"])
def test_every_image_family_gets_its_pictures(family, tmp_path):
    """Through the dispatcher, with the family's default configuration, conditional on 8x8 images."""
    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = fam.build(fam.config(), (1, 8, 8), 3).eval()
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 3
    paths = write_pictures(family, model, x, y, tmp_path)
    assert bool(paths) == (family in PICTURES)
    for path in paths:
        with Image.open(path) as picture:
            assert picture.format in ("PNG", "GIF")
            if picture.format == "GIF":
                assert picture.n_frames > 1


def test_a_diffusion_run_ends_with_its_pictures(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / f"{i:02d}.png")
    sets = {**{k: str(v).lower() for k, v in TINY.items()}, "batch_size": "4", "eval_interval": "2",
            "warmup_steps": "1", "dtype": "fp32"}
    run_dir, _ = train("diffusion", str(tmp_path), name="pictures", max_steps=2, sets=sets)
    assert sorted(p.name for p in (run_dir / "pictures").iterdir()) == ["interpolation.gif", "trajectory.gif"]
