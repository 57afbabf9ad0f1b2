"""Image runs end to end on small data: train (the shared loop), sample grids during training,
PNGs that carry their generation record, regeneration, eval, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from aigc import service
from aigc.cli import app
from aigc.data.images import read_png_record
from aigc.errors import UserError
from aigc.service import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"z_dim": "4", "base_channels": "8", "batch_size": "16", "eval_interval": "5", "warmup_steps": "2",
        "dtype": "fp32", "log_interval": "5"}


def generate_images(run: str, *, n: int = 1, seed: int = 0, class_: str | None = None, out: str | None = None,
                    options: dict | None = None) -> dict:
    """The service's generation and its files, as `aigc generate` makes them."""
    generation = service.generate(run, {"n": n, "class_": class_, **(options or {})}, seed=seed)
    files = service.save(generation, out)
    return {"files": files, "grid": generation.extra.get("grid"), "settings": generation.record["settings"]}


def regenerate(image: str, out: str | None = None) -> dict:
    generation = service.regenerate_image(image)
    return {"files": service.save(generation, out), "settings": generation.record["settings"]}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def class_folder(tmp_path):
    """Two classes of 8x8 grayscale PNGs in sub-folders: bright squares and dark squares."""
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for name, level in (("bright", 220), ("dark", 30)):
        (root / name).mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(rng.normal(level, 10, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("AIGC_HOME")
    os.environ["AIGC_HOME"] = str(home)
    try:
        run_dir, metrics = train("vae", "digits", name="digits", max_steps=10,
                                 sets={**TINY, "conditional": "true"})
    finally:
        if old is None:
            os.environ.pop("AIGC_HOME")
        else:
            os.environ["AIGC_HOME"] = old
    return run_dir, metrics


def test_training_writes_a_run_with_sample_grids(digits_run):
    run_dir, metrics = digits_run
    for name in ("run.json", "config.toml", "model.safetensors", "vae_config.json", "manifest.json",
                 "metrics.jsonl", "README.md", "checkpoints/last/state.json"):
        assert (run_dir / name).is_file(), name
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000005.png", "step-000010.png"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["modality"] == "image" and record["image_shape"] == [1, 8, 8]
    assert record["num_classes"] == 10 and record["data"]["val"]["images"] == 297  # digits' test split
    assert np.isfinite(metrics["val_nelbo"]) and metrics["val_nelbo"] > 0
    gif = Image.open(run_dir / "pictures" / "interpolation.gif")
    assert gif.n_frames > 10
    assert Image.open(run_dir / "pictures" / "reconstructions.png").size == (8 * 8 + 9 * 2, 8 * 8 + 9 * 2)  # 8 x 8
    assert Image.open(run_dir / "pictures" / "latent.png").format == "PNG"  # z_dim 4: the PCA scatter
    assert metrics["val_bits_per_dim"] == pytest.approx(metrics["val_nelbo"] / np.log(2) / 64)


def test_generated_pngs_carry_their_record_and_regenerate_exactly(digits_run, tmp_path):
    run_dir, _ = digits_run
    result = generate_images(str(run_dir), n=3, seed=5, class_="7", out=str(tmp_path / "a"))
    assert [p.rsplit("/", 1)[1] for p in result["files"]] == ["000.png", "001.png", "002.png"]
    assert Image.open(result["grid"]).size[0] > 8
    record = read_png_record(tmp_path / "a" / "001.png")
    assert record["seed"] == 6 and record["class"] == 7 and record["family"] == "vae"
    # image i uses seed S + i: the second image alone, from seed 6, has the same pixels
    alone = generate_images(str(run_dir), n=1, seed=6, class_="7", out=str(tmp_path / "b"))
    assert np.array_equal(np.array(Image.open(alone["files"][0])), np.array(Image.open(result["files"][1])))
    again = regenerate(str(tmp_path / "a" / "002.png"), str(tmp_path / "c"))
    assert np.array_equal(np.array(Image.open(again["files"][0])),
                          np.array(Image.open(tmp_path / "a" / "002.png")))


def test_conditional_classes_are_checked(digits_run):
    run_dir, _ = digits_run
    with pytest.raises(UserError, match="give --class"):
        generate_images(str(run_dir), n=1)
    with pytest.raises(UserError, match="unknown class"):
        generate_images(str(run_dir), n=1, class_="cat")


def test_folder_with_class_subfolders_trains_conditionally(class_folder):
    run_dir, metrics = train("vae", str(class_folder), name="shapes", max_steps=4,
                             sets={**TINY, "conditional": "true"})
    record = json.loads((run_dir / "run.json").read_text())
    assert record["class_names"] == ["bright", "dark"]
    # z_dim = 4 here; the 2-D manifold is tested below
    assert record["data"]["val"]["source"] == "held out" and record["data"]["val"]["images"] == 4


def test_two_dimensional_latent_gives_the_manifold_plot(class_folder):
    run_dir, _ = train("vae", str(class_folder), name="z2", max_steps=2, sets={**TINY, "z_dim": "2"})
    assert Image.open(run_dir / "pictures" / "latent.png").size == (15 * 8, 15 * 8)


def test_cli_train_generate_eval(class_folder, tmp_path, aigc_home):
    result = invoke("train", "--family", "vae", "--data", class_folder, "--name", "cli", "--max-steps", 4,
                    *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")], "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["run_dir"].endswith("cli") and "val_nelbo" in out["metrics"]
    result = invoke("generate", "cli", "-n", 4, "--seed", 1, "--out", tmp_path / "png", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["files"]) == 4
    result = invoke("generate", "--from-image", tmp_path / "png" / "003.png", "--out", tmp_path / "re", "--json")
    assert result.exit_code == 0, result.output
    result = invoke("eval", "cli", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert set(metrics) >= {"val_nelbo", "val_bits_per_dim", "images_per_s", "fid", "kid", "precision", "recall",
                            "classifier_score", "fid_floor", "kid_floor", "precision_floor", "recall_floor",
                            "memorization_rate"}
    assert json.loads((aigc_home / "runs" / "cli" / "eval.json").read_text()) == json.loads(result.stdout)


@pytest.mark.parametrize("args, message", [
    (["train", "--family", "gpt", "--data", "x.txt", "--image-size", "16"], "--image-size applies to image"),
    (["train", "--family", "rnn", "--data", "x.txt", "--conditional"], "--conditional applies to image"),
    (["train", "--family", "vae", "--data", "FOLDER_FLAT", "--conditional", "--max-steps", "2"], "needs class labels"),
    (["train", "--family", "vae", "--data", "FOLDER_MIXED", "--max-steps", "2"], "--image-size"),
    (["generate", "RUN", "--temperature", "0.5"], "--temperature applies to text, music and video runs"),
    (["generate", "RUN", "--prompt", "x"], "--prompt applies to text runs"),
    (["generate", "--from-image", "NOT_A_PNG"], "no such file"),
    (["generate"], "missing RUN"),
])
def test_image_cli_errors(args, message, class_folder, tmp_path, aigc_home):
    flat = tmp_path / "flat"
    flat.mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8), mode="L").save(flat / f"{i}.png")
        Image.fromarray(np.full((8 + i % 2, 8), 10 * i, np.uint8), mode="L").save(mixed / f"{i}.png")
    if "RUN" in args:
        train("vae", str(class_folder), name="err", max_steps=2, sets=TINY)
    subst = {"FOLDER_FLAT": flat, "FOLDER_MIXED": mixed, "RUN": "err", "NOT_A_PNG": tmp_path / "none.png"}
    result = invoke(*[subst.get(a, a) for a in args])
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    runs = [p.name for p in (aigc_home / "runs").iterdir()] if (aigc_home / "runs").is_dir() else []
    assert runs in ([], ["err"])  # a failed train leaves nothing behind


def test_sampling_options_the_family_does_not_declare_are_errors(digits_run):
    run_dir, _ = digits_run
    with pytest.raises(UserError, match="--steps does not apply to vae runs"):
        generate_images(str(run_dir), n=1, class_="1", options={"steps": 10})


def test_eval_of_a_conditional_run_reports_per_class_fid_and_floors(digits_run):
    run_dir, _ = digits_run
    result = service.evaluate(str(run_dir))
    m = result["metrics"]
    assert result["feature_net"]["kind"] == "classifier" and result["feature_net"]["test_accuracy"] > 0.8
    assert set(m["fid_per_class"]) == {str(c) for c in range(10)} or set(m["fid_per_class"]) == set(range(10))
    assert m["fid"] > m["fid_floor"] >= 0  # ten training steps are far from the real data
    assert json.loads((run_dir / "eval.json").read_text())["metrics"]["fid"] == pytest.approx(m["fid"])


def test_diffusion_trains_and_generates_with_its_sampling_options(class_folder, tmp_path):
    sets = {"base_channels": "8", "depth": "1", "res_blocks": "1", "attention": "false", "batch_size": "8",
            "eval_interval": "3", "warmup_steps": "1", "dtype": "fp32"}
    run_dir, metrics = train("diffusion", str(class_folder), name="diff", max_steps=3, sets=sets)
    assert np.isfinite(metrics["val_loss"]) and (run_dir / "samples" / "step-000003.png").is_file()
    a = generate_images(str(run_dir), n=2, seed=3, out=str(tmp_path / "a"), options={"sampler": "ddim", "steps": 5,
                                                                                       "eta": 0.5})
    record = read_png_record(tmp_path / "a" / "001.png")
    assert (record["sampler"], record["steps"], record["eta"], record["seed"]) == ("ddim", 5, 0.5, 4)
    again = regenerate(a["files"][1], str(tmp_path / "b"))
    assert np.array_equal(np.array(Image.open(again["files"][0])), np.array(Image.open(a["files"][1])))
    with pytest.raises(UserError, match="eta"):
        generate_images(str(run_dir), n=1, options={"sampler": "dpm-solver", "eta": 0.5})
