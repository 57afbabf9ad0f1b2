"""Sounds (issue 17): hits as log-mel spectrograms through the image families, back to audio by Griffin-Lim.
Data: WAV/FLAC files the tests write (decaying sines and noise bursts), no apt package. Oracles: librosa's mel
frequencies for where a sine lands, a spectrogram's round trip through Griffin-Lim, the same file at two sample
rates; a short training end to end for each family with exact regeneration and the KID evaluation."""

from __future__ import annotations

import io
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from typer.testing import CliRunner

from aigc import service, store
from aigc.cli import app
from aigc.data import sounds as s
from aigc.data.images import read_png_record
from aigc.errors import BadRequest, NotFound, UserError

runner = CliRunner()
RATE = 22050
SMALL = {"n_mels": "16", "seconds": "0.2", "hop_length": "294", "n_fft": "512", "griffin_lim_iters": "4",
         "val_fraction": "0.34"}  # 16 bands x 16 frames
TINY = {**SMALL, "batch_size": "4", "warmup_steps": "1", "eval_interval": "2", "eval_batches": "1",
        "log_interval": "1", "dtype": "fp32", "compile": "false"}
TINY_MODEL = {"vae": {"z_dim": "4", "base_channels": "8"},
              "dcgan": {"z_dim": "8", "base_channels": "8", "label_dim": "4"},
              "diffusion": {"base_channels": "8", "depth": "1", "res_blocks": "1", "attention": "false",
                            "timesteps": "50"}}


def tone(freq: float, seconds: float = 0.5, rate: int = RATE, decay: float = 8.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.8 * np.sin(2 * np.pi * freq * t) * np.exp(-decay * t)).astype(np.float32)


def burst(seed: int, seconds: float = 0.3, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.random.default_rng(seed).uniform(-0.5, 0.5, len(t)) * np.exp(-20 * t)).astype(np.float32)


@pytest.fixture
def hits(tmp_path) -> Path:
    """Two classes of six hits: low tones (WAV) and noise bursts (FLAC)."""
    root = tmp_path / "hits"
    (root / "low").mkdir(parents=True)
    (root / "noise").mkdir()
    for i in range(6):
        soundfile.write(root / "low" / f"t{i}.wav", tone(110 + 20 * i), RATE, subtype="PCM_16")
        soundfile.write(root / "noise" / f"n{i}.flac", burst(i), RATE)
    return root


def test_a_sine_lands_in_the_mel_band_of_its_frequency():
    import librosa

    cfg = s.SoundDataConfig()
    assert (cfg.samples, cfg.frames, cfg.n_mels) == (22050, 64, 64)  # 1 s, 64 x 64
    for freq in (250.0, 1000.0, 4000.0):
        spec = s.to_spectrogram(tone(freq, 1.0, decay=0.0) / 0.8, cfg)
        assert spec.shape == (64, 64, 1) and spec.dtype == np.uint8
        centres = librosa.mel_frequencies(n_mels=cfg.n_mels + 2, fmax=cfg.sample_rate / 2)[1:-1]
        brightest = int(np.argmax(spec[:, 32, 0]))  # row 0 is the highest band
        assert cfg.n_mels - 1 - brightest == int(np.argmin(np.abs(centres - freq))), freq


def test_silence_is_black_and_griffin_lim_gives_the_spectrogram_back():
    cfg = s.SoundDataConfig()
    assert (s.to_spectrogram(np.zeros(cfg.samples, np.float32), cfg) == 0).all()
    x = np.zeros(cfg.samples, np.float32)
    x[:11025] = tone(440, 0.5, decay=6.0) / 0.8 + tone(1500, 0.5, decay=10.0) / 2
    spec = s.to_spectrogram(x, cfg)
    audio = s.to_audio(spec, cfg, seed=0)
    assert audio.shape == (cfg.samples,) and audio.dtype == np.float32
    assert np.array_equal(audio, s.to_audio(spec, cfg, seed=0))  # seeded
    back = s.to_spectrogram(audio / np.abs(audio).max(), cfg).astype(float)
    loud = spec[..., 0] > 128
    assert np.abs(back[..., 0][loud] - spec[..., 0][loud]).mean() < 12  # within ~4 dB where the sound is
    silent = s.to_spectrogram(s.to_audio(np.zeros_like(spec), cfg, seed=0), cfg)
    assert (silent == 0).all()


def test_a_file_at_another_rate_is_resampled(tmp_path):
    cfg = s.SoundDataConfig()
    soundfile.write(tmp_path / "a.wav", tone(500, 0.5, rate=22050), 22050)
    soundfile.write(tmp_path / "b.wav", tone(500, 0.5, rate=8000), 8000)
    a, b = (s.read_audio(tmp_path / f, cfg) for f in ("a.wav", "b.wav"))
    assert a.shape == b.shape == (cfg.samples,)
    assert np.abs(a).max() == pytest.approx(1.0, abs=1e-3) and np.abs(b).max() == pytest.approx(1.0, abs=0.05)
    sa, sb = s.to_spectrogram(a, cfg).astype(int), s.to_spectrogram(b, cfg).astype(int)
    assert np.argmax(sa[:, 5, 0]) == np.argmax(sb[:, 5, 0])
    assert np.abs(sa - sb)[cfg.n_mels // 4:].mean() < 6  # the bands below 4 kHz (8000 Hz holds nothing above)


def test_bad_files_get_one_clear_error(tmp_path):
    cfg = s.SoundDataConfig()
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadRequest, match="no WAV/FLAC/OGG files in this folder"):
        s.list_files(str(tmp_path / "empty"))
    with pytest.raises(NotFound, match="no such sound folder"):
        s.list_files(str(tmp_path / "missing"))
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    with pytest.raises(BadRequest, match=r"bad\.wav: not a readable WAV/FLAC/OGG file"):
        s.read_audio(tmp_path / "bad.wav", cfg)
    # two hours at 1 kHz, 8 bits (7 MB): refused from its header, before the samples are read
    with soundfile.SoundFile(tmp_path / "long.wav", "w", samplerate=1000, channels=1, subtype="PCM_U8") as f:
        block = np.zeros(1000 * 600, np.float32)
        for _ in range(12):
            f.write(block)
    with pytest.raises(BadRequest, match=r"long\.wav: 7,200 s long; a sound here is a short hit of at most 30 s"):
        s.read_audio(tmp_path / "long.wav", cfg)
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    soundfile.write(mixed / "top.wav", tone(200), RATE)
    soundfile.write(mixed / "a" / "x.wav", tone(200), RATE)
    with pytest.raises(BadRequest, match="files both at the top"):
        s.list_files(str(mixed))


def test_the_split_is_by_file_seeded_and_stratified(hits):
    files, names, source = s.list_files(str(hits))
    assert names == ("low", "noise") and len(files) == 12 and source == str(hits.resolve())
    cfg = s.SoundDataConfig(val_fraction=0.34)
    train, val = s.split_files(files, cfg)
    assert not {f.path for f in train} & {f.path for f in val} and len(train) + len(val) == 12
    assert sorted(f.label for f in val) == [0, 0, 1, 1]  # two of each class
    assert s.split_files(files, cfg) == (train, val)  # seeded
    seeds = {tuple(f.path.name for f in s.split_files(files, s.SoundDataConfig(split_seed=k))[1]) for k in range(5)}
    assert len(seeds) > 1
    info = s.describe(str(hits))
    assert info["files"] == 12 and info["classes"]["low"] == [f"t{i}.wav" for i in range(6)]


def test_drums_are_read_from_the_debian_package_when_installed():
    if not s.named_installed("drums"):
        with pytest.raises(NotFound, match="apt-get install -y --no-install-recommends sonic-pi-samples"):
            s.list_files("drums")
        return
    files, names, _ = s.list_files("drums")
    counts = {name: sum(f.label == i for f in files) for i, name in enumerate(names)}
    assert counts == {"kick": 18, "snare": 11, "cymbal": 8, "tom": 7, "tabla": 26}
    assert s.describe("drums")["licences"] == {"CC0": 68, "MIT": 2}


def test_sound_data_makes_sound_runs():
    assert service.modality_for("vae", "drums")[0] == "sound"
    assert service.modality_for("vae", "fashion-mnist")[0] == "image"
    assert any(row["name"] == "drums" and row["modality"] == "sound" for row in service.datasets())


def _train(family: str, hits: Path, name: str, **extra) -> tuple[Path, dict]:
    sets = {**TINY, **TINY_MODEL[family], **extra}
    return service.train(family, str(hits), name=name, max_steps=3, sets=sets)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()


@pytest.mark.parametrize("family", ["vae", "dcgan", "diffusion"])
def test_each_family_trains_on_sounds_and_generates_the_same_bytes_for_a_seed(family, hits, tmp_path, one_thread):
    run_dir, metrics = _train(family, hits, f"s-{family}", conditional="true")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["modality"] == "sound" and record["image_shape"] == [1, 16, 16]
    assert record["class_names"] == ["low", "noise"] and len(record["data"]["val"]["files"]) == 4
    assert "Griffin-Lim" in (run_dir / "README.md").read_text()
    options = {"n": 2, "class_": "noise", **({"steps": 2} if family == "diffusion" else {})}
    args = ["generate", run_dir.name, "-n", "2", "--seed", "5", "--class", "noise", "--out", str(tmp_path / "a")]
    result = runner.invoke(app, args + (["--steps", "2"] if family == "diffusion" else []))
    assert result.exit_code == 0, result.output
    again = service.generate(run_dir.name, options, seed=5)
    files = service.save(again, tmp_path / "b")
    assert sorted(Path(f).name for f in files) == ["000.json", "000.png", "000.wav", "001.json", "001.png",
                                                  "001.wav"]
    for f in files:
        assert Path(f).read_bytes() == (tmp_path / "a" / Path(f).name).read_bytes(), f
    samples, rate = read_wav(tmp_path / "a" / "001.wav")
    assert rate == RATE and len(samples) == 4410  # 0.2 s
    assert samples.any() and np.abs(samples).max() == pytest.approx(0.9 * 32767, abs=1)  # normalised
    rec = read_png_record(tmp_path / "a" / "001.png")
    assert rec["seed"] == 6 and rec["class_name"] == "noise" and rec["run"] == str(run_dir)
    assert json.loads((tmp_path / "a" / "001.json").read_text())["sample_rate"] == RATE
    for source in ("001.png", "001.json"):  # --from-image: the sound again from its record, the same bytes
        out = tmp_path / f"again-{source}"
        result = runner.invoke(app, ["generate", "--from-image", str(tmp_path / "a" / source), "--out", str(out)])
        assert result.exit_code == 0, result.output
        for name in ("001.wav", "001.png"):
            assert (out / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), (source, name)
    (tmp_path / "bad.json").write_text('{"seed": 1}')
    with pytest.raises(UserError, match="holds no sound's generation record"):
        service.regenerate_image(str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="this run is conditional: give --class"):
        service.generate(run_dir.name, {"n": 1}, seed=0)


def test_eval_reports_kid_beside_its_floor_and_the_class_accuracy(hits, one_thread):
    run_dir, _ = _train("vae", hits, "s-eval", conditional="true")
    result = service.evaluate(run_dir.name, {})
    m = result["metrics"]
    assert result["n"] == 4 and result["n_train"] == 8  # every held-out hit
    assert math.isfinite(m["kid"]) and math.isfinite(m["kid_floor"])
    assert 0 <= m["class_accuracy"] <= 1 and 0 <= m["class_accuracy_real"] <= 1
    assert json.loads((run_dir / "eval.json").read_text())["metrics"]["kid"] == m["kid"]
    assert store.summary(run_dir)["score"] == {"metric": "kid", "value": m["kid"]}  # what `aigc runs` shows
    with pytest.raises(UserError, match="-n must be at least 3"):
        service.evaluate(run_dir.name, {"n": 2})


def test_sound_runs_refuse_what_they_do_not_take(hits):
    with pytest.raises(UserError, match="--val-data does not apply to sound runs"):
        service.train("vae", str(hits), val_data=str(hits), name="x", max_steps=1, sets=TINY)
    with pytest.raises(UserError, match="--conditional needs classes"):
        flat = hits.parent / "flat"
        flat.mkdir()
        soundfile.write(flat / "a.wav", tone(100), RATE)
        soundfile.write(flat / "b.wav", tone(300), RATE)
        service.train("vae", str(flat), name="y", max_steps=1, sets={**TINY, "conditional": "true"})
    assert torch.get_num_threads() >= 1


def test_a_sound_run_continues_from_another_with_its_spectrograms(hits, tmp_path, one_thread):
    parent_dir, _ = _train("vae", hits, "s-parent", conditional="true")
    parent = service.family_of("vae").load(parent_dir)
    # no spectrogram key, no [model] key, no --conditional: all three are the parent's
    child_dir, metrics = service.train("vae", str(hits), name="s-child", init_from="s-parent", max_steps=1,
                                       sets={k: v for k, v in TINY.items() if k not in SMALL} | {"lr": "1e-6"})
    theirs, ours = (store.read_run(d) for d in (parent_dir, child_dir))
    assert ours["image_shape"] == theirs["image_shape"] == [1, 16, 16] and ours["class_names"] == ["low", "noise"]
    config = (child_dir / "config.toml").read_text()
    assert "n_mels = 16" in config and "hop_length = 294" in config and "conditional = true" in config
    child = service.family_of("vae").load(child_dir)
    moved = False
    for name, p in parent.named_parameters():  # one step of lr 1e-6: the parent's weights, moved by at most ~lr
        q = dict(child.named_parameters())[name]
        torch.testing.assert_close(q, p, rtol=1e-5, atol=2e-6, msg=name)
        moved |= not torch.equal(q, p)
    assert moved and metrics["steps"] == 1
    with pytest.raises(UserError, match="n_mels comes from the --init-from checkpoint"):
        service.train("vae", str(hits), name="s-x", init_from="s-parent", max_steps=1, sets={**TINY, "n_mels": "32"})
    other = tmp_path / "other"  # other classes
    (other / "high").mkdir(parents=True)
    (other / "noise").mkdir()
    for i in range(6):
        soundfile.write(other / "high" / f"t{i}.wav", tone(880 + 20 * i), RATE, subtype="PCM_16")
        soundfile.write(other / "noise" / f"n{i}.flac", burst(i), RATE)
    with pytest.raises(UserError, match="needs the same classes"):
        service.train("vae", str(other), name="s-y", init_from="s-parent", max_steps=1, sets=TINY)
    with pytest.raises(UserError, match="continues only from"):
        service.train("dcgan", str(hits), name="s-z", init_from="s-parent", max_steps=1, sets=TINY)
    assert not any((store.runs_dir() / n).exists() for n in ("s-x", "s-y", "s-z"))  # nothing written


def test_the_audio_endpoint_makes_sounds_and_they_can_be_rated(hits, one_thread):
    import base64
    import io

    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app
    from aigc.store import runs_dir

    _train("vae", hits, "drumkit", conditional="true")
    home = runs_dir().parent
    app_ = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app_) as client:
        body = {"model": "drumkit", "n": 2, "seed": 5, "instrument": "low"}
        first, again = (client.post("/v1/audio/generations", json=body) for _ in range(2))
        assert first.status_code == 200, first.text
        made = first.json()
        assert made["seed"] == 5 and "Griffin-Lim" in made["rendered_with"] and len(made["data"]) == 2
        one = made["data"][1]
        assert one["kind"] == "sound" and one["record"]["seed"] == 6 and one["record"]["class_name"] == "low"
        assert one["midi_b64"] is None and one["bars"] is None
        wav = base64.b64decode(one["wav_b64"])
        with wave.open(io.BytesIO(wav)) as w:
            assert (w.getframerate(), w.getsampwidth(), w.getnframes()) == (RATE, 2, 4410)
        assert [d["wav_b64"] for d in again.json()["data"]] == [d["wav_b64"] for d in made["data"]]
        png = client.get(one["png_url"])
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert client.get(one["wav_url"]).content == wav
        gen_id = made["generation_id"]
        assert client.get(f"/v1/generations/{gen_id}").json()["modality"] == "sound"
        rated = client.post(f"/v1/generations/{gen_id}/ratings", json={"score": 1, "index": 1})
        assert rated.status_code in (200, 201), rated.text
        refused = client.post("/v1/audio/generations", json={"model": "drumkit", "bars": 4, "instrument": "low"})
        assert refused.status_code == 400 and "--bars does not apply to sound runs" in refused.text
        unknown = client.post("/v1/audio/generations", json={"model": "drumkit", "instrument": "cowbell"})
        assert unknown.status_code == 400 and "unknown class 'cowbell'" in unknown.text
        wrong = client.post("/v1/images/generations", json={"model": "drumkit"})
        assert wrong.status_code == 400 and "/v1/audio/generations" in wrong.text


def test_the_arena_battles_two_sound_runs_on_a_class(hits, one_thread):
    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app
    from aigc.store import runs_dir

    for name, seed in (("kit-a", "0"), ("kit-b", "1")):
        _train("vae", hits, name, conditional="true", seed=seed)
    home = runs_dir().parent
    app_ = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app_) as client:
        battle = client.post("/v1/arena/battles", json={"modality": "sound", "prompt": "noise", "seed": 2})
        assert battle.status_code == 200, battle.text
        b = battle.json()
        for side in ("left", "right"):
            [piece] = b[side]["pieces"]
            assert "run" not in b[side] and piece["sound"] is True and piece["cls"] == "noise"  # anonymous
            samples, rate = read_wav_bytes(client.get(piece["wav"]).content)
            assert rate == RATE and len(samples) == 4410  # one 0.2 s hit
            assert client.get(piece["roll"]).content[:4] == b"\x89PNG"
        voted = client.post(f"/v1/arena/battles/{b['id']}/vote", json={"winner": "left"}).json()
        assert {voted["left"]["run"], voted["right"]["run"]} == {"kit-a", "kit-b"}
        assert voted["left"]["pieces"] == b["left"]["pieces"]
        board = client.get("/v1/arena/leaderboard", params={"modality": "sound"}).json()
        assert board["votes"] == 1 and [r["run"] for r in board["data"]][0] == voted["left"]["run"]
        gen = client.get(f"/v1/generations/{b['left']['generation_id']}").json()
        assert gen["modality"] == "sound" and [o["class_name"] for o in gen["output"]] == ["noise"]
        replay = client.get(f"/v1/generations/{gen['id']}/replay").json()  # made again: the same WAV bytes
        assert replay["endpoint"] == "/v1/audio/generations" and replay["body"]["instrument"] == "noise"
        again = client.post(replay["endpoint"], json=replay["body"]).json()
        assert client.get(again["data"][0]["wav_url"]).content == client.get(b["left"]["pieces"][0]["wav"]).content
        unknown = client.post("/v1/arena/battles", json={"modality": "sound", "prompt": "cowbell"})
        assert unknown.status_code == 409 and "two finished sound runs that can draw class 'cowbell'" in unknown.text


def read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()
