"""The music modality (issue 17, part 1): the encoding's round trip, the split, training ngram/rnn/gpt on chorales
from the music21 corpus written as MIDI by the test, seeded generation, rendering, evaluation and bad input."""

from __future__ import annotations

import json
import math
import random
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aigc import service
from aigc.cli import app
from aigc.data import music as m
from aigc.errors import BadRequest, UserError
from aigc.evaluate.music import (
    STATISTICS,
    copied_share,
    groove_consistency,
    longest_copy,
    note_ngrams,
    pitch_class_entropy,
    polyphony,
    scale_consistency,
    statistics_with_errors,
    within_floor,
)
from aigc.modalities import music as music_modality
from aigc.modalities.music import SAMPLING_DEFAULTS
from aigc.store import runs_dir
from conftest import tiny_music_run

runner = CliRunner()


@pytest.fixture
def midi_folder(midi_folder: Path, chorales) -> Path:
    """conftest's four chorales as MIDI files, and an exact copy of the first under another name."""
    shutil.copy(midi_folder / f"{chorales[0].name}.mid", midi_folder / "copy.mid")
    return midi_folder


def test_tokens_and_midi_round_trip_keep_every_note(chorales, tmp_path):
    for piece in chorales:
        tokens = m.encode(piece)
        assert m.decode(tokens).notes == piece.notes
        assert m.music_tokenizer().decode(m.music_tokenizer().encode(" ".join(tokens))) == " ".join(tokens)
        path = tmp_path / f"{piece.name}.mid"
        path.write_bytes(m.midi_bytes(piece, "record"))
        back = m.read_midi(path)  # music21 reads what we wrote: pitch, onset and duration at 16ths
        assert back.notes == piece.notes and back.time_signature == piece.time_signature
        assert m.midi_text(path) == "record"
    assert all(len(piece.notes) > 100 for piece in chorales)


def test_the_round_trip_and_the_excerpts_keep_the_chorales_polyphony(chorales):
    """Polyphony above 4 in samples is not made by the encoding: tokens -> notes keeps a chorale's polyphony exactly,
    its 8-bar excerpt never sounds more than its four voices, and muspy's polyphony equals a plain count of the notes
    sounding per 16th (the oracle), on the same grid as the samples'."""
    from aigc.modalities.music import excerpts

    for piece, excerpt in zip(chorales, excerpts(chorales, 8), strict=True):
        assert polyphony(m.decode(m.encode(piece)).notes) == polyphony(piece.notes)
        end = max(o + d for o, d, _ in excerpt.notes)
        sounding = np.zeros(end, dtype=int)
        for onset, dur, _ in excerpt.notes:
            sounding[onset:onset + dur] += 1
        assert sounding.max() <= 4
        assert polyphony(excerpt.notes) == pytest.approx(sounding[sounding > 0].mean())


def test_quantize_clips_long_notes_and_drops_grace_notes():
    assert m.quantize([(0.0, 0.0, 60), (0.25, 100.0, 62), (1.0, 1.0, 10)]) == [(1, m.MAX_DUR, 62)]


def test_transposition_keeps_pitches_on_the_piano():
    low = m.Piece("low", "4/4", [(0, 4, 22), (4, 4, 60)])
    out = m.transposed([low], 2)
    assert [p.name for p in out] == ["low", "low-1", "low+1", "low+2"]  # -2 would leave the piano
    assert out[-1].notes == [(0, 4, 24), (4, 4, 62)]


def test_copies_are_removed_before_the_split(chorales):
    copy = m.Piece("copy", chorales[0].time_signature, list(chorales[0].notes))
    pieces = m.remove_copies([*chorales, copy, copy])
    assert len(pieces) == len(chorales)
    for seed in range(5):
        train, val = m.split_pieces(pieces, 0.4, seed)
        assert not {" ".join(m.encode(p)) for p in train} & {" ".join(m.encode(p)) for p in val}
        assert len(train) + len(val) == len(pieces)


def test_music_statistics_on_hand_made_pieces():
    c_major = [(i * 4, 4, p) for i, p in enumerate((60, 62, 64, 65, 67, 69, 71))]
    assert pitch_class_entropy(c_major) == pytest.approx(math.log2(7))
    assert scale_consistency(c_major) == 1.0
    assert scale_consistency(c_major + [(28, 4, 61)]) == pytest.approx(7 / 8)
    assert polyphony([(0, 4, 60), (0, 4, 64), (0, 4, 67)]) == 3.0
    assert polyphony([(0, 4, 60), (8, 4, 62)]) == 1.0  # silent steps do not count
    bar_a, bar_b = [(0, 4, 60), (4, 4, 62), (8, 8, 64)], [(16, 4, 60), (20, 4, 62), (24, 4, 64), (28, 4, 65)]
    assert groove_consistency(bar_a + [(o + 16, d, p) for o, d, p in bar_a], 16) == 1.0  # the same onsets
    assert groove_consistency(bar_a + bar_b, 16) == pytest.approx(1 - 1 / 16)  # bar b adds an onset at 12
    assert math.isnan(groove_consistency(bar_a, 16))  # one bar: no pair to compare
    import muspy  # the oracle, on pieces that do not end on a bar line (where it counts an empty bar more)

    for piece in (bar_a + bar_b[:-1], bar_a + bar_b + [(32, 2, 60), (36, 1, 67)]):
        music = muspy.Music(resolution=4, tracks=[muspy.Track(notes=[muspy.Note(o, p, d) for o, d, p in piece])])
        assert groove_consistency(piece, 16) == pytest.approx(muspy.groove_consistency(music, 16))
    melody = [(0, 4, 60), (4, 4, 62), (8, 4, 64), (12, 4, 65)]
    transposed_in_time = [(o + 32, d, p) for o, d, p in melody[1:]]  # the same three notes later
    assert longest_copy(transposed_in_time, [melody]) == 3
    assert longest_copy([(0, 4, 30)], [melody]) == 0
    grams = note_ngrams([melody], 3)
    assert copied_share(melody, grams, 3) == 1.0
    assert copied_share([(o, d, 125 - p) for o, d, p in melody], grams, 3) == 0.0  # upside down: nothing shared
    stats = statistics_with_errors([c_major, melody, []])  # a piece without notes does not count
    assert stats["pitch_class_entropy"]["mean"] == pytest.approx((math.log2(7) + 2) / 2)
    assert stats["pitch_class_entropy"]["se"] == pytest.approx(abs(math.log2(7) - 2) / 2)  # sd / sqrt 2
    assert stats["polyphony"]["n"] == 2


def test_the_floor_test_of_issue_17():
    def stat(mean: float, se: float) -> dict:
        return {k: {"mean": mean, "se": se, "n": 10} for k in STATISTICS}

    # samples 1.0, validation 1.5, training 1.4: a gap of 0.5 against a floor of 0.1
    assert not within_floor(stat(1.0, 0.1), stat(1.5, 0.1), stat(1.4, 0.1))["polyphony"]["met"]  # 2 SE = 0.28
    assert within_floor(stat(1.0, 0.3), stat(1.5, 0.1), stat(1.4, 0.1))["polyphony"]["met"]  # 2 SE = 0.63
    assert within_floor(stat(1.45, 0.0), stat(1.5, 0.0), stat(1.4, 0.0))["polyphony"]["met"]  # nearer than the floor


@pytest.mark.parametrize("family", ["ngram", "rnn", "gpt"])
def test_train_generate_and_evaluate_on_four_chorales(family, midi_folder, tmp_path):
    run_dir, metrics = tiny_music_run(family, midi_folder, f"bach-{family}", n_positions=128, steps=8)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["modality"] == "music"
    assert record["data"]["copies_removed"] == 1 and record["data"]["train"]["pieces"] == 3
    assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["val_nll_per_note"])

    options = {"n": 2, "bars": 1}
    first = service.generate(run_dir.name, options, seed=5)
    files = service.save(first, tmp_path / "a")
    again = service.save(service.generate(run_dir.name, options, seed=5), tmp_path / "b")
    assert [Path(f).name for f in files] == ["000.mid", "000.wav", "000.png", "000.json",
                                             "001.mid", "001.wav", "001.png", "001.json"]
    for a, b in zip(files, again, strict=True):
        if not a.endswith(".json"):  # the sidecar also holds the speed
            assert Path(a).read_bytes() == Path(b).read_bytes(), a
    record = json.loads(m.midi_text(tmp_path / "a" / "000.mid"))
    assert record["settings"]["seed"] == 5 and record["run"] == str(run_dir)

    assert service.generation_defaults(run_dir.name)["bars"] == 8
    result = service.evaluate(run_dir.name)
    for key in ("val_nll_per_token", "val_nll_per_note", "ngram_nll_per_token", "pitch_class_entropy",
                "scale_consistency", "polyphony", "groove_consistency", "longest_copy_notes", "copied_8gram_share",
                "statistics_within_floor"):
        assert key in result["metrics"]
    assert result["statistics"]["train"]["polyphony"]["mean"] == pytest.approx(4, abs=0.3)
    assert result["statistics"]["train"]["groove_consistency"]["n"] == 3
    assert (run_dir / "eval.json").is_file()


def test_folk_tunes_are_melodies_read_from_the_essen_abc_files_and_cached():
    files = [f for f in m.essen_files() if f.name == "test0.abc"]  # 16 tunes (music21 reads ABC slowly)
    assert len(m.essen_files()) == 31 and len(files) == 1
    tunes = m.folk_tunes(files)
    assert len(tunes) == 16 and len({t.name for t in tunes}) == len(tunes)
    voices = [polyphony(t.notes) for t in tunes]  # one voice; at 16ths, a tune of 32nd-note runs (test0-15) has
    assert sum(v == 1.0 for v in voices) == 15 and max(voices) < 1.5  # notes that round onto one step
    assert {t.time_signature for t in tunes} >= {"4/4", "3/4", "6/8"}
    for tune in tunes:
        assert m.decode(m.encode(tune)).notes == tune.notes
    assert len(list((runs_dir().parent / "cache" / "music").glob("folk-abc-test0-*.json"))) == 1
    assert m.folk_tunes(files + files) == tunes  # from the cache; a file read twice adds only copies, removed
    first = tunes[0]  # "Ich hab die Nacht getrumet", 6/8, an eighth-note pickup (B,2 at L:1/16) before bar 1
    assert first.time_signature == "6/8" and first.notes[0] == (10, 2, 59)
    assert runner.invoke(app, ["data", "list"]).output.count("NON-COMMERCIAL") == 1


def test_the_cli_trains_generates_and_evaluates_a_music_run(midi_folder, tmp_path):
    done = runner.invoke(app, ["train", "--family", "ngram", "--data", str(midi_folder), "--name", "chorales",
                               "--set", "max_order=3", "--set", "transpose=1"])
    assert done.exit_code == 0, done.output
    record = json.loads((runs_dir() / "chorales" / "run.json").read_text())
    assert record["data"]["train"]["transposed_pieces"] == 2 * record["data"]["train"]["pieces"]
    assert record["data"]["val"]["pieces"] == 1  # the validation split is not augmented
    out = tmp_path / "out"
    done = runner.invoke(app, ["generate", "chorales", "-n", "1", "--seed", "1", "--out", str(out), "--no-record",
                               "--prompt-midi", str(midi_folder / "copy.mid"), "--prompt-bars", "1", "--bars", "2"])
    assert done.exit_code == 0, done.output
    assert (out / "000.mid").is_file() and (out / "000.png").is_file()
    made = json.loads((out / "000.json").read_text())
    assert made["tokens"].startswith(" ".join(m.first_bars(m.encode(m.read_midi(midi_folder / "copy.mid")), 1)))
    assert made["settings"]["prompt_bars"] == 1
    assert {k: made["settings"][k] for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS  # sampled as the defaults say
    done = runner.invoke(app, ["eval", "chorales", "--temperature", "1"])
    assert done.exit_code == 0 and "scale_consistency" in done.output
    samples = json.loads((runs_dir() / "chorales" / "eval.json").read_text())["samples"]
    assert samples["temperature"] == 1 and samples["top_p"] == SAMPLING_DEFAULTS["top_p"]
    first = samples["tokens"]
    done = runner.invoke(app, ["eval", "chorales", "--temperature", "1", "--seed", "4"])  # fresh pieces, to confirm on
    samples = json.loads((runs_dir() / "chorales" / "eval.json").read_text())["samples"]
    assert done.exit_code == 0 and samples["seed"] == 4 and samples["tokens"] != first
    done = runner.invoke(app, ["eval", "chorales", "--seed", "-1"])
    assert done.exit_code != 0 and "--seed must be >= 0" in done.output


def test_render_falls_back_to_plain_synthesis(chorales, tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_NO_FLUIDSYNTH", "1")
    piece = m.Piece("x", "4/4", chorales[0].notes[:20])
    midi = tmp_path / "x.mid"
    midi.write_bytes(m.midi_bytes(piece))
    samples, rate, how = m.render(piece, midi)
    assert how.startswith("additive") and rate == m.SAMPLE_RATE
    path = tmp_path / "x.wav"
    path.write_bytes(m.wav_bytes(samples, rate))
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
    back, _ = m.read_wav(path)
    assert abs(back).max() == pytest.approx(0.9, abs=1e-3)  # normalised
    assert len(back) / rate >= (max(o + d for o, d, _ in piece.notes)) * m.seconds_per_step()


@pytest.mark.skipif(not (shutil.which("fluidsynth") and m.soundfont()), reason="fluidsynth and a GM soundfont "
                    "are apt packages (fluidsynth, timgm6mb-soundfont), not installed here")
def test_render_with_fluidsynth(chorales, tmp_path):
    piece = m.Piece("x", "4/4", chorales[0].notes[:20])
    midi = tmp_path / "x.mid"
    midi.write_bytes(m.midi_bytes(piece))
    samples, rate, how = m.render(piece, midi)
    assert how.startswith("fluidsynth") and abs(samples).max() > 0


def test_bad_music_input_is_one_clear_error_and_leaves_no_run(tmp_path, midi_folder):
    corrupt = tmp_path / "bad.mid"
    corrupt.write_bytes(b"MThd\x00\x00\x00\x06garbage")
    with pytest.raises(BadRequest, match="not a readable MIDI file"):
        m.read_midi(corrupt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no MIDI files"):
        m.load_music(str(empty))
    for data, says in ((corrupt, "not a readable MIDI file"), (empty, "nor .mid/.midi files")):
        done = runner.invoke(app, ["train", "--family", "ngram", "--data", str(data), "--name", "bad"])
        assert done.exit_code != 0 and says in done.output
        assert "Traceback" not in done.output and done.output.count("error") == 1, done.output
    assert not (runs_dir() / "bad").exists()
    with pytest.raises(BadRequest, match="not a readable MIDI file"):  # --val-data is read as --data is
        service.train("rnn", str(midi_folder), name="bad", val_data=str(corrupt))
    assert not (runs_dir() / "bad").exists()


def test_a_music_run_continues_from_another_and_is_scored_on_pieces_of_ones_own(chorales, midi_folder, tmp_path):
    """--init-from: the new run starts from the checkpoint's weights (a learning rate of ~0 leaves them as they
    were), and copying is measured against what the checkpoint read too. --val-data: the pieces scored are those
    given; one also in --data is held out of training, and one the checkpoint trained on is counted."""
    import torch

    from aigc.models import FAMILIES

    first, _ = tiny_music_run("gpt", midi_folder, "first", n_positions=128, steps=4)
    first_train = {p.name for p in music_modality.read_split(first)[0]}
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    for piece in chorales[:2]:
        (mine / f"{piece.name}.mid").write_bytes(m.midi_bytes(piece))
    for piece in chorales[1:4]:  # chorales[1] is in both: held out of training
        (theirs / f"{piece.name}.mid").write_bytes(m.midi_bytes(piece))
    run_dir, _ = service.train("gpt", str(mine), val_data=str(theirs), init_from="first", name="second", max_steps=1,
                               sets={"lr": "1e-12", "warmup_steps": "0", "block_size": "16", "batch_size": "2",
                                     "eval_interval": "1", "eval_batches": "1", "dtype": "fp32"})
    record = json.loads((run_dir / "run.json").read_text())
    assert record["init_from"] == str(first.resolve())
    val = record["data"]["val"]
    assert val["source"] == str(theirs.resolve())
    assert sorted(val["names"]) == sorted(p.name for p in m.remove_copies(m.load_music(str(theirs))[0]))
    assert record["data"]["held_out_from_data"] == 1 and record["data"]["train"]["pieces"] == 1
    assert val["read_by_checkpoint"] == len(first_train & set(val["names"])) > 0
    before, after = FAMILIES["gpt"].load(first), FAMILIES["gpt"].load(run_dir)
    assert after.config.n_positions == 128  # the checkpoint's architecture
    for a, b in zip(before.parameters(), after.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    copies = service.evaluate("second", {"n": 2})["metrics"]["longest_copy_notes"]
    assert copies >= 0
    # refused before anything is written: a run of another family or modality, a [model] key, nothing left to train
    with pytest.raises(BadRequest, match="continues only from"):
        service.train("gpt", str(mine), init_from=str(tiny_music_run("ngram", midi_folder, "counted", n_positions=0,
                                                                     steps=0)[0]), name="never")
    with pytest.raises(BadRequest, match="n_layer comes from the --init-from checkpoint"):
        service.train("gpt", str(mine), init_from="first", name="never", sets={"n_layer": "2"})
    with pytest.raises(BadRequest, match="nothing is left to train on"):
        service.train("gpt", str(mine), val_data=str(mine), name="never")
    assert not (runs_dir() / "never").exists()


def test_the_api_composes_music_as_wav_and_midi(midi_folder):
    import base64

    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app

    service.train("ngram", str(midi_folder), name="chorales", sets={"max_order": "3"})
    home = runs_dir().parent
    app = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app) as client:
        body = {"model": "chorales", "n": 2, "bars": 2, "seed": 4}
        first, again = (client.post("/v1/audio/generations", json=body) for _ in range(2))
        assert first.status_code == 200, first.text
        made = first.json()
        assert made["seed"] == 4 and len(made["data"]) == 2 and made["rendered_with"]
        wav = base64.b64decode(made["data"][0]["wav_b64"])
        midi = base64.b64decode(made["data"][0]["midi_b64"])
        assert wav[:4] == b"RIFF" and midi[:4] == b"MThd"
        assert made["data"][0]["record"]["settings"]["seed"] == 4
        assert [d["midi_b64"] for d in again.json()["data"]] == [d["midi_b64"] for d in made["data"]]
        assert client.get(f"/v1/generations/{made['generation_id']}").status_code == 200
        # the same files, kept: by URL, with their media types; nothing else of the folder or outside it
        for key, media in (("wav", "audio/wav"), ("midi", "audio/midi"), ("png", "image/png")):
            got = client.get(made["data"][1][f"{key}_url"])
            assert got.status_code == 200 and got.headers["content-type"] == media
        assert client.get(made["data"][0]["wav_url"]).content == wav
        gen = made["generation_id"]
        for name in ("004.wav", "000.txt", "%2e%2e%2f%2e%2e%2faigc.db", "%2e%2e"):
            assert client.get(f"/v1/generations/{gen}/files/{name}").status_code == 404, name
        replay = client.get(f"/v1/generations/{gen}/replay").json()
        assert replay["endpoint"] == "/v1/audio/generations" and "--bars 2" in replay["cli"]
        assert client.post(replay["endpoint"], json=replay["body"]).json()["data"][0]["midi_b64"] == \
            made["data"][0]["midi_b64"]
        wrong = client.post("/v1/images/generations", json={"model": "chorales"})
        assert wrong.status_code == 400 and "/v1/audio/generations" in wrong.text
        unknown = client.post("/v1/forecasts", json={"model": "chorales", "horizon": 1, "bars": 2})
        assert unknown.status_code == 400 and "bars" in unknown.text


def test_the_api_continues_the_opening_of_a_validation_piece(midi_folder):
    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app

    service.train("ngram", str(midi_folder), name="chorales", sets={"max_order": "3", "val_fraction": "0.4"})
    record = json.loads((runs_dir() / "chorales" / "run.json").read_text())
    names = record["data"]["val"]["names"]
    assert service.openings("chorales") == names and len(names) == 2
    val = {json.loads(line)["name"]: json.loads(line)["tokens"].split()
           for line in (runs_dir() / "chorales" / "val.jsonl").read_text().splitlines()}
    home = runs_dir().parent
    server = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(server) as client:
        assert client.get("/v1/models/chorales/controls").json()["openings"] == names
        body = {"model": "chorales", "n": 2, "bars": 2, "seed": 5, "prompt_piece": names[1], "prompt_bars": 1}
        answer = client.post("/v1/audio/generations", json=body)
        assert answer.status_code == 200, answer.text
        made = answer.json()
        opening = m.first_bars(val[names[1]], 1)  # the piece's time signature and first bar, then the model's 2 bars
        for datum in made["data"]:
            assert datum["record"]["tokens"].split()[:len(opening)] == opening
            assert datum["bars"] == 3 and datum["record"]["settings"]["prompt_piece"] == names[1]
        replay = client.get(f"/v1/generations/{made['generation_id']}/replay").json()
        assert f"--prompt-piece {names[1]}" in replay["cli"] and replay["body"]["prompt_bars"] == 1
        assert [d["midi_b64"] for d in client.post(replay["endpoint"], json=replay["body"]).json()["data"]] == \
            [d["midi_b64"] for d in made["data"]]
        for wrong, says in (({"prompt_piece": "bwv000"}, "not a validation piece of chorales: one of"),
                            ({"prompt_bars": 2}, "--prompt-bars applies with --prompt-midi or --prompt-piece"),
                            ({"prompt_piece": names[0], "prompt_bars": 0}, "prompt_bars")):
            refused = client.post("/v1/audio/generations", json={"model": "chorales", **wrong})
            assert refused.status_code == 400 and says in refused.text, refused.text
    done = runner.invoke(app, ["generate", "chorales", "--prompt-piece", names[0], "--prompt-midi",
                               str(midi_folder / "copy.mid"), "--no-record"])
    assert done.exit_code != 0 and "exclude each other" in done.output and "Traceback" not in done.output


def test_the_arena_battles_two_music_runs(midi_folder):
    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app

    for name, order in (("bach3", "3"), ("bach4", "4")):
        service.train("ngram", str(midi_folder), name=name, sets={"max_order": order})
    home = runs_dir().parent
    app = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app) as client:
        refused = client.post("/v1/arena/battles", json={"modality": "music", "prompt": "C major"})
        assert refused.status_code == 400 and "no prompt" in refused.text
        battle = client.post("/v1/arena/battles", json={"modality": "music", "seed": 3})
        assert battle.status_code == 200, battle.text
        sides = battle.json()
        for side in ("left", "right"):
            [piece] = sides[side]["pieces"]
            assert "run" not in sides[side]  # anonymous until the vote
            assert client.get(piece["wav"]).content[:4] == b"RIFF"
            assert client.get(piece["roll"]).content[:4] == b"\x89PNG"
        voted = client.post(f"/v1/arena/battles/{sides['id']}/vote", json={"winner": "right"}).json()
        assert {voted["left"]["run"], voted["right"]["run"]} == {"bach3", "bach4"}
        assert voted["left"]["pieces"] == sides["left"]["pieces"]
        board = client.get("/v1/arena/leaderboard", params={"modality": "music"}).json()
        assert board["votes"] == 1 and board["data"][0]["run"] == voted["right"]["run"]
        gen = client.get(f"/v1/generations/{sides['left']['generation_id']}").json()
        assert gen["modality"] == "music" and gen["output"][0]["bars"] == 4  # ARENA_BARS
        replay = client.get(f"/v1/generations/{gen['id']}/replay").json()
        assert replay["body"]["bars"] == 4 and replay["body"]["n"] == 1
        controls = client.get("/v1/models/bach3/controls").json()
        assert [c["name"] for c in controls["controls"]] == ["n", "bars", "temperature", "top_k", "top_p",
                                                             "constrained", "grammar_version"]  # no window: n-gram
        by_name = {c["name"]: c for c in controls["controls"]}
        assert by_name["bars"]["default"] == 8
        assert by_name["constrained"]["default"] is True and by_name["constrained"]["type"] == "boolean"
        preview = client.get("/v1/models/bach3/preview").json()
        assert preview["pieces"][0]["wav"].startswith("data:audio/wav;base64,")


def test_music_uploads_are_checked_as_training_reads_them(midi_folder, tmp_path):
    import io
    import zipfile

    from aigc import uploads

    def upload(name: str, content: bytes) -> dict:
        job = uploads.Upload.begin("music", name, 5 * 2**20)
        job.write(content)
        return job.finish()

    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as z:
        for path in sorted(midi_folder.glob("*.mid")):
            z.write(path, f"chorales/{path.name}")
    done = upload("chorales.zip", packed.getvalue())
    assert done["summary"]["pieces"] == 5 and done["summary"]["copies"] == 1
    assert m.is_music_data(done["data"]) and len(m.load_music(done["data"])[0]) == 5
    with pytest.raises(BadRequest, match="at least 2"):
        upload("one.mid", (midi_folder / "copy.mid").read_bytes())
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("notes.txt", "no music here")
    with pytest.raises(BadRequest, match="no MIDI files"):
        upload("notes.zip", empty.getvalue())
    with pytest.raises(BadRequest, match="neither a MIDI file nor a zip"):
        upload("song.mid", b"just text")
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("a.mid", (midi_folder / "copy.mid").read_bytes())
        z.writestr("b.mid", b"MThd\x00\x00\x00\x06garbage")
    with pytest.raises(BadRequest, match="b.mid: not a readable MIDI file"):
        upload("two.zip", broken.getvalue())
    assert [u["id"] for u in uploads.list_uploads()] == [done["id"]]  # the refused ones left nothing


def test_the_copy_index_finds_the_longest_shared_run_as_a_brute_force_search_does():
    """CopyIndex (seeded runs extended note by note) against the definition searched exhaustively: every start in
    the piece against every start in every training piece, the first note's gap ignored. Random pieces on a small
    alphabet, with passages copied from the training pieces, so that runs both shorter and longer than the seed
    occur."""
    from aigc.evaluate.music import CopyIndex, note_events

    def brute(notes, training):
        events, best = note_events(notes), 0
        for piece in map(note_events, training):
            for i in range(len(events)):
                for j in range(len(piece)):
                    if events[i][:2] != piece[j][:2]:
                        continue
                    k = 1
                    while i + k < len(events) and j + k < len(piece) and events[i + k] == piece[j + k]:
                        k += 1
                    best = max(best, k)
        return best

    rng = random.Random(0)

    def piece(n):
        onset, out = 0, []
        for _ in range(n):
            onset += rng.choice((2, 4))
            out.append((onset, rng.choice((2, 4)), rng.choice((60, 62, 64))))
        return out

    training = [piece(rng.randint(5, 40)) for _ in range(6)]
    index = CopyIndex(training)
    lengths = set()
    for _ in range(60):
        notes = piece(rng.randint(0, 30))
        if rng.random() < 0.5:  # a passage of a training piece, moved in time, in the middle
            source = rng.choice(training)
            a = rng.randrange(len(source))
            passage = source[a:a + rng.randint(1, 20)]
            shift = (notes[-1][0] if notes else 0) + 100 - passage[0][0]
            notes = notes + [(o + shift, d, p) for o, d, p in passage] + [(o + 1000, d, p) for o, d, p in piece(5)]
        expected = brute(notes, training)
        assert index.longest(notes) == expected
        lengths.add(expected)
    assert min(lengths) < CopyIndex.SEED < max(lengths)  # both ways of finding a run were exercised
