"""Uploads of sounds and clips (issues 17 and 18: "WAV/FLAC folders", "the user's own folder of GIF or MP4 files")
over a real server: a zip of WAV/FLAC files (a folder per class) and a zip of GIF/MP4 clips are checked as training
reads them, unpacked, and a tiny run trains on each through POST /v1/training; every bad upload (a corrupt WAV, a
too-long WAV, an unreadable MP4, a 1-frame GIF, clips of two sizes, a member escaping the folder, one over the cap)
is one clear 4xx that leaves nothing in the uploads area. Data: sounds and clips the tests write (no apt package)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from tests.test_server import start_server, stop_server
from tests.test_sounds import burst
from tests.test_uploads import make_zip

from aigc.data import sounds as s
from aigc.data import video as v

RATE = 22050
SOUND_SETS = {"n_mels": "16", "seconds": "0.2", "hop_length": "294", "n_fft": "512", "griffin_lim_iters": "4",
              "val_fraction": "0.34", "batch_size": "4", "warmup_steps": "1", "eval_interval": "2",
              "eval_batches": "1", "log_interval": "1", "dtype": "fp32", "compile": "false", "z_dim": "4",
              "base_channels": "8"}  # the tiny vae of tests/test_sounds.py
VIDEO_SETS = {"size": "0", "val_fraction": "0.25", "batch_size": "4", "warmup_steps": "1", "eval_interval": "2",
              "eval_batches": "1", "log_interval": "1", "dtype": "fp32", "compile": "false", "z_dim": "4",
              "base_channels": "8"}  # the tiny vae of tests/test_video.py


def wav(signal: np.ndarray, rate: int = RATE, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, signal, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def tone(freq: float, seconds: float = 0.3, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.8 * np.sin(2 * np.pi * freq * t) * np.exp(-8 * t)).astype(np.float32)


def hits() -> dict[str, bytes]:
    """Two classes of three hits, inside one top folder (how most zips are made): low tones (WAV), noise (FLAC)."""
    members = {f"kit/low/t{i}.wav": wav(tone(110 + 20 * i)) for i in range(3)}
    members |= {f"kit/noise/n{i}.flac": wav(burst(i), fmt="FLAC") for i in range(3)}
    return members


def moving(n: int, frames: int = 8) -> np.ndarray:
    """n clips (n, frames, 24, 24, 1) of moving digits."""
    return v.named_clips("moving-digits", "test", n, 0, v.VideoDataConfig(frames=frames, size=24)).clips


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("media-uploads")
    proc, url = start_server(home, "--max-upload-mb", "1", timeout=300)  # a loaded 2-core machine starts slowly
    with httpx.Client(base_url=url, timeout=120) as client:
        yield home, client
    stop_server(proc)


def post(client: httpx.Client, kind: str, filename: str, content: bytes) -> httpx.Response:
    return client.post("/v1/uploads", params={"kind": kind, "filename": filename}, content=content)


def left(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "uploads").iterdir()) if (home / "uploads").exists() else []


def train(client: httpx.Client, upload: dict, name: str, sets: dict) -> dict:
    """Train a tiny vae on an upload through POST /v1/training (3 s budget); the finished job."""
    job = client.post("/v1/training", json={"family": "vae", "data": upload["id"], "name": name, "minutes": 0.05,
                                            "sets": sets})
    assert job.status_code == 200, job.text
    deadline = time.monotonic() + 240
    while (done := client.get(f"/v1/jobs/{job.json()['id']}").json())["status"] == "running":
        assert time.monotonic() < deadline, done
        time.sleep(0.5)
    assert done["status"] == "done", done.get("error") or done
    return done


def test_a_zip_of_sounds_is_unpacked_and_a_sound_run_trains_on_it(served):
    home, client = served
    response = post(client, "sounds", "my kit.zip", make_zip({**hits(), "kit/README.txt": b"not a sound"}))
    assert response.status_code == 200, response.text
    upload = response.json()
    folder = Path(upload["data"])
    assert folder.parent == home / "uploads" / upload["id"] and folder.name == "my-kit"
    # the oracle: what `aigc train --data` lists of the folder (the top folder unwrapped, the text file left out)
    files, classes, _ = s.list_files(str(folder))
    assert classes == ("low", "noise") and sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "low", "low/t0.wav", "low/t1.wav", "low/t2.wav", "noise", "noise/n0.flac", "noise/n1.flac", "noise/n2.flac"]
    assert upload["summary"] == {"sounds": len(files), "classes": ["low", "noise"],
                                 "class_counts": {"low": 3, "noise": 3}}
    train(client, upload, "mykit", {**SOUND_SETS, "conditional": "true"})
    record = json.loads((home / "runs" / "mykit" / "run.json").read_text())
    assert record["modality"] == "sound" and record["class_names"] == ["low", "noise"]
    assert record["image_shape"] == [1, 16, 16]  # SOUND_SETS: 16 mel bands x 16 frames


def test_gif_and_mp4_clips_are_unpacked_and_a_clip_run_trains_on_them(served):
    home, client = served
    clips = moving(4)
    members = {f"{i}.gif" if i % 2 else f"{i}.mp4": (v.gif_bytes if i % 2 else v.mp4_bytes)(clip)
               for i, clip in enumerate(clips)}
    response = post(client, "video", "digits.zip", make_zip(members))
    assert response.status_code == 200, response.text
    upload = response.json()
    folder = Path(upload["data"])
    assert v.is_video_data(str(folder)) and sorted(p.name for p in folder.iterdir()) == sorted(members)
    # 8 frames a file, fewer than a clip's default 20: the record says what training on them needs
    assert upload["summary"] == {"files": 4, "frames": [8, 8], "size": [24, 24], "channels": 1, "classes": [],
                                 "train_sets": {"frames": "8", "context": "4"}}
    assert v.load_folder(str(folder), v.VideoDataConfig(frames=8)).clips.shape == (4, 8, 24, 24, 1)  # the oracle
    # the training request names none of it: the service applies the upload's train_sets (8 frames, not 20)
    assert "frames" not in VIDEO_SETS
    job = train(client, upload, "myclips", VIDEO_SETS)
    assert "--set=frames=8" in job["args"] and "--set=context=4" in job["args"]
    record = json.loads((home / "runs" / "myclips" / "run.json").read_text())
    assert record["modality"] == "video" and record["clip_shape"] == [8, 24, 24, 1]


def test_one_gif_file_is_an_upload_too(served):
    home, client = served
    response = post(client, "video", "walk.GIF", v.gif_bytes(moving(1, frames=24)[0]))
    assert response.status_code == 200, response.text
    upload = response.json()
    assert Path(upload["data"]).name == "walk.gif" and v.is_video_data(upload["data"])
    # one clip of the default 20 frames is too few to hold one out: two clips of 12 are what training needs
    assert upload["summary"]["frames"] == [24, 24] and upload["summary"]["train_sets"] == {"frames": "12"}
    assert v.load_folder(upload["data"], v.VideoDataConfig(frames=12)).n == 2  # the oracle: the reader's clips
    long = post(client, "video", "long.gif", v.gif_bytes(moving(1, frames=40)[0]))
    assert long.status_code == 200 and "train_sets" not in long.json()["summary"]  # two clips of 20: the defaults
    refused = post(client, "video", "short.gif", v.gif_bytes(moving(1, frames=3)[0]))
    assert refused.status_code == 400 and "3 frames in all are too few for two clips of 2 frames" in refused.text
    # the request's own keys win over the upload's: 6 frames asked for (and a context that fits), where it says 12
    train(client, upload, "walk6", {**VIDEO_SETS, "frames": "6", "context": "3"})
    assert json.loads((home / "runs" / "walk6" / "run.json").read_text())["clip_shape"] == [6, 24, 24, 1]
    missing = client.post("/v1/training", json={"family": "vae", "data": "upl-00000000000000000000", "name": "none"})
    assert missing.status_code == 404 and "no such upload" in missing.text


def _long_wav() -> bytes:
    return wav(np.zeros(int(31 * 4000), np.float32), rate=4000)  # 31 s at 4 kHz: 248 KB


BAD = {  # kind, file name, content, HTTP status, what the message says
    "corrupt wav": ("sounds", "kit.zip",
                    lambda: make_zip({**hits(), "kit/low/bad.wav": b"RIFF\x24\x00\x00\x00WAVEjunk"}),
                    400, "low/bad.wav: not a readable WAV/FLAC/OGG file"),
    "too long wav": ("sounds", "kit.zip", lambda: make_zip({**hits(), "kit/low/long.wav": _long_wav()}),
                     400, "low/long.wav: 31 s long; a sound here is a short hit of at most 30 s"),
    "one class": ("sounds", "kit.zip", lambda: make_zip({k: b for k, b in hits().items() if "/low/" in k}),
                  400, "one class folder (low)"),  # kit/low/...: the top folder unwrapped leaves one class
    "one sound": ("sounds", "kit.zip", lambda: make_zip({"a.wav": wav(tone(200))}),
                  400, "1 sound file(s) are too few to split"),
    "sounds escaping": ("sounds", "kit.zip", lambda: make_zip({**hits(), "../evil.wav": wav(tone(300))}),
                        400, "a path that leads outside its folder (../evil.wav)"),
    "no sounds": ("sounds", "kit.zip", lambda: make_zip({"notes.txt": b"hello"}), 400, "no sounds in the zip"),
    "sounds not a zip": ("sounds", "a.wav", lambda: wav(tone(200)), 400, "this is not a zip file"),
    "sounds over the cap": ("sounds", "kit.zip", lambda: b"PK" + b"\x00" * (2 * 2**20), 413, "1 MB"),
    "unreadable mp4": ("video", "clip.mp4", lambda: b"\x00\x00\x00\x18ftypmp42 not really a video" * 10,
                       400, "cannot read video clip.mp4"),
    "one-frame gif": ("video", "clips.zip", lambda: make_zip({"a.gif": v.gif_bytes(moving(1)[0]),
                                                              "still.gif": v.gif_bytes(moving(1)[0][:1])}),
                      400, "still.gif has 1 frame: a clip needs at least 2"),
    "two sizes": ("video", "clips.zip", lambda: make_zip({"a.gif": v.gif_bytes(moving(1)[0]),
                                                          "b.gif": v.gif_bytes(moving(1)[0][:, :20])}),
                  400, "the clips differ in size: a.gif is 24x24 but b.gif is 24x20"),
    "video escaping": ("video", "clips.zip", lambda: make_zip({"a.gif": v.gif_bytes(moving(1)[0]),
                                                               "x/../../b.gif": v.gif_bytes(moving(1)[0])}),
                       400, "a path that leads outside its folder"),
    "neither": ("video", "clip.mp4", lambda: b"just some text, not a clip", 400,
                "this is neither a clip (GIF, MP4, AVI) nor a zip file"),
    "video over the cap": ("video", "clip.mp4", lambda: b"\x00\x00\x00\x18ftypmp42" + b"\x00" * (2 * 2**20), 413,
                           "1 MB"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uploads_are_one_clear_4xx_and_leave_nothing(served, case):
    home, client = served
    kind, filename, content, status, message = BAD[case]
    before = left(home)
    response = post(client, kind, filename, content())
    assert response.status_code == status, response.text
    error = response.json()["error"]["message"]
    assert message in error and str(home) not in error  # no server paths in the answer
    assert left(home) == before


def test_the_cli_trains_on_an_upload_by_its_id_with_what_its_clips_need(one_thread):
    """`aigc train --data upl-...`: the same service call as POST /v1/training, so the upload's train_sets apply."""
    from typer.testing import CliRunner

    from aigc import uploads
    from aigc.cli import app
    from aigc.store import runs_dir

    upload = uploads.Upload.begin("video", "walk.gif", 2**20)
    upload.write(v.gif_bytes(moving(1, frames=24)[0]))
    record = upload.finish()
    assert record["summary"]["train_sets"] == {"frames": "12"}
    sets = [f"--set={k}={value}" for k, value in VIDEO_SETS.items()]
    done = CliRunner().invoke(app, ["train", "--family", "vae", "--data", record["id"], "--name", "walk",
                                    "--max-steps", "1", *sets])
    assert done.exit_code == 0, done.output
    assert json.loads((runs_dir() / "walk" / "run.json").read_text())["clip_shape"] == [12, 24, 24, 1]
    wrong = CliRunner().invoke(app, ["train", "--family", "vae", "--data", "upl-00000000000000000000"])
    assert wrong.exit_code != 0 and "no such upload" in wrong.output and "Traceback" not in wrong.output
