"""The video modality (issue 18): seeded clip construction without leakage, GIF round trips, bad input, the
prediction metrics against hand-made oracles, and a short training end to end for each job (simvp predicts;
vae and diffusion make clips, frames as channels) with exact regeneration. Data: moving-digits (scikit-learn's
digits, no apt package) and GIFs the tests write."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from aigc import service
from aigc.cli import app
from aigc.data import video as v
from aigc.data.images import load_images
from aigc.errors import UserError
from aigc.evaluate import video as vm

runner = CliRunner()
TINY = {"frames": "8", "context": "4", "size": "24", "val_clips": "12", "batch_size": "4", "warmup_steps": "2",
        "eval_interval": "3", "eval_batches": "1", "log_interval": "1", "dtype": "fp32", "compile": "false"}
TINY_MODEL = {"simvp": {"hid_s": "8", "hid_t": "16", "n_t": "1"},
              "vae": {"z_dim": "4", "base_channels": "8"},
              "diffusion": {"base_channels": "8", "depth": "1", "res_blocks": "1", "attention": "false",
                            "timesteps": "50"}}


def test_clips_are_seeded_and_have_the_stated_defaults():
    cfg = v.VideoDataConfig()
    assert (cfg.frames, cfg.objects, cfg.context) == (20, 1, 10)
    a = v.named_clips("moving-digits", "test", 5, 3, cfg)
    assert a.clips.shape == (5, 20, 32, 32, 1) and a.clips.dtype == np.uint8
    assert np.array_equal(a.clips, v.named_clips("moving-digits", "test", 5, 3, cfg).clips)
    assert not np.array_equal(a.clips, v.named_clips("moving-digits", "test", 5, 4, cfg).clips)
    assert a.labels.shape == (5,) and a.class_names == tuple(str(d) for d in range(10))
    two = v.named_clips("moving-digits", "test", 5, 3, v.VideoDataConfig(objects=2))
    assert two.labels is None and two.boxes.shape == (5, 20, 2, 2)
    # the objects move, and stay inside the frame
    assert (np.abs(np.diff(a.boxes, axis=1)).sum(axis=(1, 2, 3)) > 0).all()
    assert a.boxes.min() >= 0 and a.boxes.max() <= 32 - 16


def test_bouncing_keeps_positions_in_the_frame_and_reverses_at_an_edge():
    pos = v.trajectories(np.random.default_rng(0), 200, 2, 40)
    assert pos.min() >= 0 and pos.max() <= 1
    steps = np.linalg.norm(np.diff(pos, axis=1), axis=-1)
    assert steps.max() <= v.STEP + 1e-9  # never faster than the step (slower where an edge clips it)


def test_training_clips_come_from_training_images_and_validation_clips_from_test_images():
    cfg = v.VideoDataConfig(val_clips=40)
    train, val = v.load_split("moving-digits", cfg)
    train_images = load_images("digits", split="train").images.repeat(2, axis=1).repeat(2, axis=2)
    test_images = load_images("digits", split="test").images.repeat(2, axis=1).repeat(2, axis=2)
    assert np.array_equal(train.images, train_images)  # the clip maker draws from the training split alone

    def found(window: np.ndarray, images: np.ndarray) -> bool:
        return bool((images == window).all(axis=(1, 2, 3)).any())

    seen = {img.tobytes() for img in train_images}
    for clip, box in zip(val.clips, val.boxes, strict=True):
        y, x = box[0, 0]
        window = clip[0, y:y + 16, x:x + 16]
        assert found(window, test_images)  # a validation clip's object is a test image ...
        assert window.tobytes() not in seen  # ... and never a training one
    # and a training batch holds training images: the same check on clips the maker makes
    clips, picks, corners = v.moving_objects(train.images, None, np.random.default_rng(1), 10, frames=3, size=32,
                                             objects=1)
    for clip, (y, x) in zip(clips, corners[:, 0, 0], strict=True):
        assert found(clip[0, y:y + 16, x:x + 16], train_images)


def test_gif_round_trip_keeps_every_frame_and_the_record(tmp_path):
    clip = v.named_clips("moving-digits", "test", 1, 0, v.VideoDataConfig(frames=6)).clips[0]
    clip[3] = clip[2]  # identical consecutive frames: GIF writers merge them into one longer frame
    v.save_gif(tmp_path / "a.gif", clip, {"run": "x", "seed": 3})
    back = v.read_video(tmp_path / "a.gif")
    assert back.shape == (6, 32, 32, 3) and np.array_equal(back[..., :1], clip)
    assert v.read_gif_record(tmp_path / "a.gif") == {"run": "x", "seed": 3}
    rgb = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    v.save_gif(tmp_path / "rgb.gif", rgb)
    assert v.read_video(tmp_path / "rgb.gif").shape == (4, 8, 8, 3)  # colours are quantised to a palette


def test_tensors_stack_frames_as_channels_and_back():
    clips = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 7, 3), dtype=np.uint8)
    x = v.to_tensor(clips)
    assert x.shape == (2, 15, 6, 7) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[1, 3:6], torch.from_numpy(clips[1, 1]).permute(2, 0, 1).float() / 127.5 - 1)
    assert np.array_equal(v.to_uint8(x, 3), clips)
    clips.flags.writeable = False  # clips read from the cache are read-only: no warning, the same tensor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(v.to_tensor(clips), x)


def _gif(path: Path, frames: list[np.ndarray]) -> Path:
    pictures = [Image.fromarray(f) for f in frames]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=100)
    return path


def test_a_folder_of_gifs_is_cut_into_clips_and_split(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        _gif(tmp_path / f"{name}.gif", [rng.integers(0, 255, (10, 12), dtype=np.uint8) for _ in range(9)])
    assert v.is_video_data(str(tmp_path)) and service.modality_for("vae", str(tmp_path))[0] == "video"
    train, val = v.load_split(str(tmp_path), v.VideoDataConfig(frames=4, context=2, val_fraction=0.2))
    assert train.n + val.n == 6 and val.n == 1 and train.shape == (4, 10, 12, 1)  # 2 clips a file, 1 frame left
    resized, _ = v.load_split(str(tmp_path), v.VideoDataConfig(frames=4, context=2, size=8, val_fraction=0.2))
    assert resized.shape == (4, 8, 8, 1)


def test_the_data_decides_the_modality():
    assert service.modality_for("vae", "moving-digits")[0] == "video"
    assert service.modality_for("diffusion", "moving-fashion-mnist")[0] == "video"
    assert service.modality_for("vae", "digits")[0] == "image"
    assert service.modality_for("simvp")[0] == "video"


def _long_gif(path: Path, frames: int) -> Path:
    """A GIF of `frames` 2x2 frames, black and white in turn, written fast: PIL writes four, and the two middle
    frames' blocks (each starting with a graphic control extension, 21 F9 04) are repeated."""
    _gif(path, [np.full((2, 2), 255 * (i % 2), dtype=np.uint8) for i in range(4)])
    head, *blocks = path.read_bytes()[:-1].split(b"\x21\xf9\x04")  # without the trailer 3B
    first, b, a, last = (b"\x21\xf9\x04" + block for block in blocks)
    path.write_bytes(head + first + (b + a) * ((frames - 2) // 2) + last + b"\x3b")
    return path


@pytest.mark.parametrize("case", ["unreadable", "mixed sizes", "one frame", "too many frames", "too short"])
def test_bad_clips_are_one_clear_error(case, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    frame = np.zeros((8, 8), dtype=np.uint8)
    moving = [frame + 40 * i for i in range(4)]
    if case == "unreadable":
        (folder / "bad.gif").write_bytes(b"GIF89a not really")
        _gif(folder / "ok.gif", moving)
        match = r"cannot read video .*bad\.gif"
    elif case == "mixed sizes":
        _gif(folder / "a.gif", moving)
        _gif(folder / "b.gif", [np.zeros((9, 8), dtype=np.uint8) + 40 * i for i in range(4)])
        match = r"clips differ in size: .*a\.gif is 8x8, .*b\.gif is 8x9; give --set size=N"
    elif case == "one frame":
        _gif(folder / "a.gif", moving)
        _gif(folder / "still.gif", [frame])
        match = r"still\.gif has 1 frame: a clip needs at least 2"
    elif case == "too many frames":  # 10,000 frames: refused after MAX_FRAMES are read
        _long_gif(folder / "long.gif", 10_000)
        match = rf"long\.gif has more than {v.MAX_FRAMES} frames: cut it into shorter files"
    else:
        _gif(folder / "a.gif", moving)
        match = r"a\.gif has 4 frames, fewer than a clip's 20: give --set frames=4"
    with pytest.raises(UserError, match=match):
        v.load_split(str(folder), v.VideoDataConfig() if case == "too short" else v.VideoDataConfig(frames=4,
                                                                                                   context=2))
    if case == "one frame":  # the same error through the service, before any run directory exists
        with pytest.raises(UserError, match=match):
            service.train("vae", str(folder), name="bad", max_steps=1, sets={"frames": "4", "context": "2"})
        assert not (Path(service.store.runs_dir()) / "bad").exists()


def test_prediction_metrics_against_oracles():
    truth = torch.full((2, 3, 1, 12, 12), 0.5, dtype=torch.float64)
    perfect = vm.prediction_metrics(truth.clone(), truth)
    assert perfect["mse"] == 0 and perfect["mae"] == 0 and perfect["ssim"] == pytest.approx(1.0)
    black = vm.prediction_metrics(torch.zeros_like(truth), truth)
    assert black["mse"] == pytest.approx(0.25 * 144)  # summed over a frame's 144 pixels
    assert black["mae"] == pytest.approx(0.5 * 144)
    assert black["psnr"] == pytest.approx(10 * math.log10(1 / 0.25))
    assert black["mse_per_frame"] == pytest.approx([36.0, 36.0, 36.0])
    context = torch.rand(2, 2, 1, 12, 12, dtype=torch.float64)
    floors = vm.floors(context, truth, torch.full((1, 12, 12), 0.5))
    assert floors["mean_frame"]["mse"] == pytest.approx(0)  # here the mean frame is the truth
    assert floors["black"]["mse"] == pytest.approx(black["mse"])
    copied = vm.prediction_metrics(context[:, -1:].expand_as(truth), truth)
    assert floors["copy_last"] == copied
    assert not vm.beats_floors(black, floors) and vm.beats_floors(
        {"mse": -1, "mae": -1, "psnr": 1e9, "ssim": 2}, floors)


def test_object_windows_follow_the_object():
    clips = np.zeros((1, 2, 20, 20, 1), dtype=np.uint8)
    clips[0, 0, 2:6, 3:7] = 200
    clips[0, 1, 12:16, 10:14] = 200
    windows = vm.object_windows(clips, 4)
    assert (windows == 200).all()
    assert vm.class_consistency(np.array([[1, 1, 1], [1, 2, 1]])) == {"class_consistency": 0.5,
                                                                      "majority_share": pytest.approx(5 / 6)}
    assert vm.motion(clips)["speed"] == pytest.approx(math.hypot(10, 7))


def _train(family: str, name: str, **extra) -> tuple[Path, dict]:
    sets = {**TINY, **TINY_MODEL[family], **extra}
    return service.train(family, "moving-digits", name=name, max_steps=6, sets=sets)


def test_predictor_trains_generates_regenerates_and_evaluates(tmp_path, one_thread):
    run_dir, metrics = _train("simvp", "pred")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["modality"] == "video" and record["job"] == "predict" and record["clip_shape"] == [8, 24, 24, 1]
    for key in ("mse", "mae", "psnr", "ssim", "mse_copy_last", "ssim_black", "psnr_mean_frame"):
        assert math.isfinite(metrics[key]), key
    assert (run_dir / "samples").is_dir() and "| ssim |" in (run_dir / "README.md").read_text()

    result = runner.invoke(app, ["generate", "pred", "-n", "2", "--seed", "3", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["000.gif", "000.mp4", "001.gif", "001.mp4",
                                                                  "sheet.png"]
    again = service.generate("pred", {"n": 2}, seed=3)
    service.save(again, tmp_path / "b")
    for name in ("000.gif", "001.gif", "000.mp4", "001.mp4", "sheet.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    clip = v.read_video(tmp_path / "a" / "001.gif")
    assert clip.shape == (8, 24, 24, 3)
    truth = v.named_clips("moving-digits", "test", 1, 4, v.VideoDataConfig(frames=8, size=24)).clips[0]
    assert np.array_equal(clip[:4, ..., :1], truth[:4])  # the context is the clip at seed 3 + 1, as given
    rec = v.read_gif_record(tmp_path / "a" / "001.gif")
    assert rec["seed"] == 4 and rec["run"] == str(run_dir)
    regenerated = service.regenerate_image(str(tmp_path / "a" / "001.gif"))
    assert np.array_equal(regenerated.outputs[0], again.outputs[1])

    result = service.evaluate("pred", {"n": 6})
    assert result["clips"] == 6 and set(result["floors"]) == set(vm.FLOORS)
    assert (run_dir / "eval.json").is_file()


@pytest.mark.parametrize("family", ["vae", "diffusion"])
def test_clip_generators_reuse_the_image_families(family, tmp_path, one_thread):
    extra = {"conditional": "true"} if family == "vae" else {}
    run_dir, metrics = _train(family, f"gen-{family}", **extra)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["job"] == "generate" and record["modality"] == "video"
    model_file = "vae_config.json" if family == "vae" else "diffusion_config.json"
    assert json.loads((run_dir / model_file).read_text())["image_shape"] == [8, 24, 24]  # frames as channels
    options = {"n": 2, "class_": "7"} if family == "vae" else {"n": 2, "steps": 3}
    first = service.generate(run_dir.name, options, seed=1)
    assert first.outputs[0].shape == (8, 24, 24, 1)
    files = service.save(first, tmp_path / "a")
    service.save(service.generate(run_dir.name, options, seed=1), tmp_path / "b")
    for f in files:
        assert Path(f).read_bytes() == (tmp_path / "b" / Path(f).name).read_bytes()
    again = service.regenerate_image(str(tmp_path / "a" / "001.gif"))
    assert np.array_equal(again.outputs[0], first.outputs[1])
    if family == "diffusion":
        return
    assert math.isfinite(metrics["val_nelbo"])
    with pytest.raises(UserError, match="this run is conditional: give --class"):
        service.generate(run_dir.name, {"n": 1}, seed=0)
    result = service.evaluate(run_dir.name, {"n": 4})  # trains the digits' feature net (cached) in about 10 s
    m = result["metrics"]
    assert {"speed", "speed_real", "frame_change"} <= set(m)
    assert m["frame_fid"] >= 0 and m["frame_fid_floor"] >= 0
    assert 0 <= m["class_consistency"] <= 1 and 0 <= m["class_accuracy"] <= 1
    assert m["class_consistency_floor"] >= 0.5  # real clips keep their class from frame to frame
    assert m["clip_fd"] >= 0 and m["clip_fd_floor"] >= 0 and result["clip_net"]["order_accuracy"] >= 0


def test_the_api_makes_clips_as_gifs(one_thread):
    import base64
    import io

    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app
    from aigc.store import runs_dir

    _train("simvp", "pred", **{"val_clips": "4"})
    home = runs_dir().parent
    app_ = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app_) as client:
        body = {"model": "pred", "n": 2, "seed": 5}
        first, again = (client.post("/v1/videos/generations", json=body) for _ in range(2))
        assert first.status_code == 200, first.text
        made = first.json()
        assert made["seed"] == 5 and made["job"] == "predict" and len(made["data"]) == 2
        gif = base64.b64decode(made["data"][1]["gif_b64"])
        assert gif[:6] == b"GIF89a" and made["data"][1]["record"]["seed"] == 6
        with Image.open(io.BytesIO(gif)) as img:
            assert json.loads(img.info["comment"])["seed"] == 6
        assert base64.b64decode(made["sheet_b64"])[:4] == b"\x89PNG"
        assert [d["gif_b64"] for d in again.json()["data"]] == [d["gif_b64"] for d in made["data"]]
        assert client.get(f"/v1/generations/{made['generation_id']}").status_code == 200
        stored = client.get(made["data"][1]["gif_url"])  # the same file, kept in the store and served
        assert stored.headers["content-type"] == "image/gif" and stored.content == gif
        assert client.get(made["sheet_url"]).content == base64.b64decode(made["sheet_b64"])
        mp4 = client.get(made["data"][1]["mp4_url"])  # and the clip as an MP4, its record in the comment tag
        assert mp4.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"
        (runs_dir().parent / "got.mp4").write_bytes(mp4.content)
        assert v.read_record(runs_dir().parent / "got.mp4")["seed"] == 6
        import av

        with av.open(str(runs_dir().parent / "got.mp4")) as container:  # the answer's frames and fps: the file's own
            stream = container.streams.video[0]
            assert (stream.frames, float(stream.average_rate)) == (made["data"][1]["frames"], made["data"][1]["fps"])
        wrong = client.post("/v1/images/generations", json={"model": "pred"})
        assert wrong.status_code == 400 and "/v1/videos/generations" in wrong.text
        refused = client.post("/v1/videos/generations", json={"model": "pred", "steps": 4})
        assert refused.status_code == 400 and "--steps does not apply to simvp" in refused.text


def test_the_simvp_ssim_term_is_the_evaluations_ssim_and_has_gradients():
    from aigc.models.simvp import SimVP, SimVPConfig, frame_ssim

    gen = torch.Generator().manual_seed(0)
    pred = (torch.rand(3, 4, 16, 16, generator=gen) * 2 - 1).requires_grad_()
    truth = torch.rand(3, 4, 16, 16, generator=gen) * 2 - 1
    ssim = frame_ssim(pred, truth, 1)
    oracle = vm.prediction_metrics(((pred.detach() + 1) / 2)[:, :, None], ((truth + 1) / 2)[:, :, None])["ssim"]
    assert ssim.item() == pytest.approx(oracle, abs=1e-5)
    ssim.backward()
    assert pred.grad.abs().sum() > 0
    model = SimVP(SimVPConfig(hid_s=8, hid_t=16, n_t=1, ssim=0.5), (1, 16, 16), 2, 2)
    out = model(truth)
    assert out["loss"].item() == pytest.approx((out["mse"] + out["mae"] + 0.5 * (1 - out["ssim"])).item(), rel=1e-6)


def test_reordered_clips_are_frozen_or_shuffled_copies():
    from aigc.evaluate.clipnet import reorder

    clips = v.named_clips("moving-digits", "test", 30, 0, v.VideoDataConfig(frames=6, size=24)).clips
    out, order = reorder(clips, np.random.default_rng(0))
    assert set(order) == {0, 1, 2}
    for clip, new, o in zip(clips, out, order, strict=True):
        if o == 0:
            assert np.array_equal(new, clip)
        elif o == 1:
            assert all(np.array_equal(frame, clip[0]) for frame in new)
        else:  # the same frames, in another order
            assert sorted(f.tobytes() for f in new) == sorted(f.tobytes() for f in clip)


def test_the_clip_net_learns_class_and_time_order_and_its_distance_tells_still_clips_from_real(one_thread):
    from aigc.evaluate import clipnet
    from aigc.evaluate.images import fid_from_features

    cfg = v.VideoDataConfig(frames=8, size=24)
    net, info = clipnet.clip_net("moving-digits", cfg)
    assert info["cached"] is False and info["order_accuracy"] > 0.9 and info["class_accuracy"] > 0.3  # chance: 0.1
    again, info2 = clipnet.clip_net("moving-digits", cfg)
    pairs = zip(net.state_dict().values(), again.state_dict().values(), strict=True)
    assert info2["cached"] is True and all(torch.equal(a, b) for a, b in pairs)
    real = v.named_clips("moving-digits", "test", 100, 0, cfg).clips
    other = v.named_clips("moving-digits", "train", 100, 1, cfg).clips
    still = other.copy()
    still[:] = other[:, :1]  # each clip's first frame held: the right objects, no motion
    f_real = clipnet.clip_features(net, real)
    floor = fid_from_features(f_real, clipnet.clip_features(net, other))
    assert floor < fid_from_features(f_real, clipnet.clip_features(net, still))
    with pytest.raises(ValueError, match="like the clip net's training clips"):
        clipnet.clip_features(net, real[:, :4])


def test_a_video_battle_sets_clip_generators_against_each_other(one_thread):
    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app
    from aigc.store import runs_dir

    _train("simvp", "pred", val_clips="4")
    for name in ("gen-a", "gen-b"):
        _train("vae", name, val_clips="4")
    home = runs_dir().parent
    app_ = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app_) as client:
        for _ in range(3):  # the predictor has no rival of its own job: never drawn
            battle = client.post("/v1/arena/battles", json={"modality": "video", "seed": 1})
            assert battle.status_code == 200, battle.text
            b = battle.json()
            assert len(b["left"]["clips"]) == 1 and b["left"]["sheet"].endswith("/sheet.png")
            assert client.get(b["left"]["clips"][0]["gif"]).content[:6] == b"GIF89a"
        voted = client.post(f"/v1/arena/battles/{b['id']}/vote", json={"winner": "left"}).json()
        assert {voted["left"]["run"], voted["right"]["run"]} == {"gen-a", "gen-b"}
        board = client.get("/v1/arena/leaderboard", params={"modality": "video"}).json()
        assert [r["run"] for r in board["data"]][0] == voted["left"]["run"]
        replay = client.get(f"/v1/generations/{b['left']['generation_id']}/replay").json()
        assert replay["endpoint"] == "/v1/videos/generations" and replay["body"]["n"] == 1
        again = client.post(replay["endpoint"], json=replay["body"]).json()
        assert client.get(again["data"][0]["gif_url"]).content == client.get(b["left"]["clips"][0]["gif"]).content


def test_frames_too_small_for_ssim_are_one_clear_error(tmp_path):
    from aigc.models.simvp import SimVP, SimVPConfig

    folder = tmp_path / "tiny"
    folder.mkdir()
    for name in ("a.gif", "b.gif"):
        _gif(folder / name, [np.zeros((5, 5), dtype=np.uint8) + 40 * i for i in range(4)])
    with pytest.raises(UserError, match=r"simvp: frames of 5x5 are too small to score: SSIM .* needs more than 5 "
                                        r"pixels a side; give --set size=N"):
        service.train("simvp", str(folder), name="tiny", max_steps=1, sets={"frames": "4", "context": "2",
                                                                           "val_fraction": "0.5"})
    assert not (Path(service.store.runs_dir()) / "tiny").exists()
    with pytest.raises(ValueError, match="give --set ssim=0"):
        SimVP(SimVPConfig(), (1, 5, 8), 2, 2)
    SimVP(SimVPConfig(ssim=0.0), (1, 5, 8), 2, 2)  # the model alone is fine without the term


# ---- MP4, the real clip set vtest, your own folder of GIF and MP4 files ---------------------------------------


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2))


def test_mp4_round_trip_keeps_frames_size_and_record_within_the_stated_error(tmp_path):
    import av

    clip = v.named_clips("moving-digits", "test", 1, 0, v.VideoDataConfig(frames=12)).clips[0]  # (12, 32, 32, 1)
    v.save_mp4(tmp_path / "a.mp4", clip, {"run": "x", "seed": 3})
    with av.open(str(tmp_path / "a.mp4")) as container:
        codec = container.streams.video[0].codec_context
        assert (codec.name, codec.pix_fmt) == ("h264", "yuv420p")
        assert container.streams.video[0].average_rate == 1000 // v.FRAME_MS
    back = v.read_video(tmp_path / "a.mp4")
    assert back.shape == (12, 32, 32, 3)
    assert np.array_equal(back[..., 0], back[..., 1]) and np.array_equal(back[..., 0], back[..., 2])  # still gray
    # lossy (H.264 at crf 18): measured on moving-digits, mean error 0.19-0.25 levels of 255, PSNR about 50 dB
    error = np.abs(back[..., :1].astype(int) - clip)
    assert error.mean() < 1.0 and _psnr(back[..., :1], clip) > 40
    assert v.read_record(tmp_path / "a.mp4") == {"run": "x", "seed": 3}
    assert v.mp4_bytes(clip, {"run": "x", "seed": 3}) == (tmp_path / "a.mp4").read_bytes()  # the same bytes again
    # an odd side: yuv420p needs even sides, so the clip is written twice as large (2x2 blocks)
    odd = np.ascontiguousarray(clip[:, :25, :23])
    v.save_mp4(tmp_path / "odd.mp4", odd)
    big = v.read_video(tmp_path / "odd.mp4")
    assert big.shape == (12, 50, 46, 3)
    blocks = big[..., 0].reshape(12, 25, 2, 23, 2).mean(axis=(2, 4))
    assert np.abs(blocks - odd[..., 0]).mean() < 1.0
    # colour: yuv420p keeps one colour sample per 2x2 pixels (what browsers play), so sharp colour edges blur: a red
    # digit on cyan (the strongest colour edge there is) measured 23.1 dB, mean error 6.1 levels
    grad = np.broadcast_to(np.linspace(0, 255, 32).astype(np.uint8), clip.shape[:3])
    rgb = np.stack([clip[..., 0], 255 - clip[..., 0], grad], axis=-1)
    v.save_mp4(tmp_path / "rgb.mp4", rgb)
    assert _psnr(v.read_video(tmp_path / "rgb.mp4"), rgb) > 20
    with pytest.raises(UserError, match=r"rgb\.mp4 has no generation record"):
        v.read_record(tmp_path / "rgb.mp4")


@pytest.mark.parametrize("case", ["unreadable", "one frame", "10,000 frames"])
def test_bad_mp4_files_are_one_clear_error(case, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    moving = np.stack([np.full((16, 16, 1), 40 * i, dtype=np.uint8) for i in range(4)])
    v.save_mp4(folder / "ok.mp4", moving)
    if case == "unreadable":
        (folder / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
        match = r"cannot read video .*bad\.mp4"
    elif case == "one frame":
        v.save_mp4(folder / "still.mp4", moving[:1])
        match = r"still\.mp4 has 1 frame: a clip needs at least 2"
    else:  # decoding stops at MAX_FRAMES: the rest is never read
        frames = np.zeros((10_000, 16, 16, 1), dtype=np.uint8)
        frames[::2] = 255
        v.save_mp4(folder / "long.mp4", frames)
        match = rf"long\.mp4 has more than {v.MAX_FRAMES} frames: cut it into shorter files"
    with pytest.raises(UserError, match=match):
        v.load_split(str(folder), v.VideoDataConfig(frames=4, context=2))
    result = runner.invoke(app, ["train", "--family", "simvp", "--data", str(folder), "--name", "bad",
                                 "--max-steps", "1", "--set", "frames=4", "--set", "context=2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert not (Path(service.store.runs_dir()) / "bad").exists()


def test_your_own_folder_of_gif_and_mp4_files_trains_end_to_end(tmp_path, one_thread):
    """Your clips as files: three GIFs and three MP4s (moving digits written by this project's writers), a predictor
    trained on them for a few steps, its clips generated and made again from an MP4's record."""
    folder = tmp_path / "mine"
    folder.mkdir()
    clips = v.named_clips("moving-digits", "test", 6, 0, v.VideoDataConfig(frames=16, size=24)).clips
    for i, clip in enumerate(clips):
        (v.save_gif if i % 2 else v.save_mp4)(folder / f"{i}.{'gif' if i % 2 else 'mp4'}", clip)
    assert v.is_video_data(str(folder))
    sets = {**TINY, **TINY_MODEL["simvp"], "frames": "8", "size": "0", "val_fraction": "0.2"}
    run_dir, metrics = service.train("simvp", str(folder), name="mine", max_steps=6, sets=sets)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["clip_shape"] == [8, 24, 24, 1]  # gray: every frame of every file had R = G = B
    assert record["data"]["train"]["clips"] + record["data"]["val"]["clips"] == 12  # 2 clips a file
    assert math.isfinite(metrics["mse"])
    result = runner.invoke(app, ["generate", "mine", "-n", "2", "--seed", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["000.gif", "000.mp4", "001.gif", "001.mp4", "sheet.png"]
    again = service.regenerate_image(str(tmp_path / "out" / "001.mp4"))  # the record the MP4 carries
    assert np.array_equal(again.outputs[0], v.read_video(tmp_path / "out" / "001.gif")[..., :1])
    service.save(again, tmp_path / "again")
    for suffix in ("gif", "mp4"):  # made again: the same bytes
        assert (tmp_path / "again" / f"001.{suffix}").read_bytes() == (tmp_path / "out" / f"001.{suffix}").read_bytes()


vtest_installed = pytest.mark.skipif(not v.real_installed("vtest"), reason="vtest.avi is in the Debian package "
                                     "opencv-doc (scripts/setup.sh --corpora installs it)")


@vtest_installed
def test_vtest_is_cut_into_consecutive_clips_split_by_time():
    import av

    cfg = v.VideoDataConfig(frames=16)
    train, val = v.load_split("vtest", cfg)
    assert (train.n, val.n) == (43, 5) and train.shape == (16, 48, 64, 1)  # 49 clips of 795 frames; one left out
    assert train.labels is None and train.class_names is None
    whole = v.real_clips("vtest", cfg).clips.reshape(-1, 48, 64)  # the video's first 784 frames in order
    assert np.array_equal(train.clips.reshape(-1, 48, 64), whole[:43 * 16])
    assert np.array_equal(val.clips.reshape(-1, 48, 64), whole[44 * 16:])  # the last 5 clips, after a gap of one
    path = v.REAL_VIDEOS["vtest"].path
    with av.open(path) as container:  # the oracle: PIL's box filter of the video's frame 17
        frame = next(f for i, f in enumerate(container.decode(video=0)) if i == 17)
    assert (frame.width, frame.height) == (768, 576)
    box = np.asarray(Image.fromarray(frame.to_ndarray(format="gray")).reduce(12), dtype=int)
    assert np.abs(box - train.clips[1, 1, ..., 0]).max() <= 1  # rounding
    assert v.is_video_data("vtest") and service.modality_for("simvp", "vtest")[0] == "video"
    rows = {r["name"]: r for r in service.datasets()}
    assert rows["vtest"]["installed"] and "Apache-2.0 AND BSD-3-Clause" in rows["vtest"]["description"]
    listed = runner.invoke(app, ["data", "list"])
    assert listed.exit_code == 0 and "vtest" in listed.output and "opencv-doc" in listed.output
    with pytest.raises(UserError, match="--conditional needs class labels, and vtest has none"):
        v.load_split("vtest", v.VideoDataConfig(frames=16, conditional=True))


def test_a_missing_real_clip_set_says_which_package_installs_it(monkeypatch):
    monkeypatch.setitem(v.REAL_VIDEOS, "vtest", v.RealVideo("vtest", "/nonexistent/vtest.avi", "opencv-doc",
                                                            "Apache-2.0", 48, 64, "moved away"))
    assert not v.real_installed("vtest")
    with pytest.raises(UserError, match=r"clip set 'vtest' needs the Debian package opencv-doc .*apt-get install "
                                        r"--no-install-recommends opencv-doc"):
        v.load_split("vtest", v.VideoDataConfig(frames=16))
