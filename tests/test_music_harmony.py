"""Harmonisation (issue 17's stretch goal, aigc.data.music_grammar.HarmonyGrammar): a melody is kept exactly as the
top voice and tiny runs of every family write the voices below it. The mask on hand-made prefixes against the rules
worked out by hand; properties of seeded harmonisations at a high temperature (an untrained model draws nearly
anything): every melody note there, nothing above the melody, the piece as long as the melody, the run's grammar
kept; seeded reproducibility, the CLI and API, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from aigc import service
from aigc.cli import app
from aigc.data import music as m
from aigc.data.music_grammar import HarmonyGrammar
from aigc.errors import BadRequest
from aigc.evaluate.music import consonant_share, is_consonant, notes_per_onset, sonorities
from aigc.modalities import music
from aigc.store import runs_dir
from conftest import tiny_music_run
from test_music_grammar import violations

runner = CliRunner()
VOCAB = m.vocabulary()
INDEX = {token: i for i, token in enumerate(VOCAB)}
LIMITS = {"max_onsets": 3, "max_polyphony": 3}
# a hand-made 3/4 melody: a pickup at 8 (E5), a rest, then C5 at the bar line held 8 16ths, G4 at 8
MELODY = m.Piece("tune", "3/4", [(8, 2, 76), (12, 8, 72), (20, 4, 67)])


def allowed_after(tokens: list[str], melody: m.Piece = MELODY, budget: int = 200) -> set[str]:
    grammar = HarmonyGrammar(LIMITS, melody, budget)
    ids = torch.tensor([[INDEX[m.EOT], *(INDEX[t] for t in tokens)]])
    out = grammar(ids, torch.zeros(1, len(VOCAB)))
    return {VOCAB[i] for i in torch.isfinite(out[0]).nonzero()[:, 0].tolist()}


def names(prefix: str, values) -> set[str]:
    return {f"{prefix}_{v}" for v in values}


def ceiling_broken(melody: list[m.Note], notes: list[m.Note]) -> list[m.Note]:
    """The notes that are not the melody's and sound, at some step, at or above the melody note sounding then (in a
    rest: the melody's previous note), or before the melody begins or after it ends."""
    end = max(o + d for o, d, _ in melody)
    top = {}
    for onset, _, pitch in sorted(melody):
        for t in range(onset, end):
            top[t] = pitch
    return [note for note in notes if note not in melody
            and any(t not in top or note[2] >= top[t] for t in range(note[0], note[0] + note[1]))]


def test_the_soprano_line_is_the_skyline():
    assert m.soprano_line(MELODY.notes) == MELODY.notes  # one voice: itself
    # a held top note over moving lower voices stays one note; a higher note starting under it cuts it short
    notes = [(0, 8, 72), (0, 8, 60), (4, 4, 64), (8, 8, 74), (8, 4, 67), (12, 4, 76), (12, 4, 55)]
    assert m.soprano_line(notes) == [(0, 8, 72), (8, 4, 74), (12, 4, 76)]


def test_the_mask_keeps_the_melody_by_hand():
    assert allowed_after([]) == {"TS_3/4"}  # the melody's time signature
    assert allowed_after(["TS_3/4", "Bar"]) == {"Pos_8"}  # nothing before the melody begins, no skipping it
    at_pickup = ["TS_3/4", "Bar", "Pos_8"]
    assert allowed_after(at_pickup) == names("Pitch", range(21, 77))  # lower notes, then the melody's E5
    assert allowed_after([*at_pickup, "Pitch_76"]) == {"Dur_2"}  # its duration, forced
    # a lower note lasts until the melody falls to or below it: A4 (69) under E5 (76), C5 (72) then G4 (67)
    assert allowed_after([*at_pickup, "Pitch_69"]) == names("Dur", range(1, 13))
    assert allowed_after([*at_pickup, "Pitch_60"]) == names("Dur", range(1, 17))  # to the melody's end
    # after the melody's note: no note above it; lower onsets in the rest of the bar (under E5, then its rest) or
    # the next Bar
    after = [*at_pickup, "Pitch_69", "Dur_2", "Pitch_76", "Dur_2"]
    assert allowed_after(after) == {"Bar", "Pos_9", "Pos_10", "Pos_11"}
    # the next bar begins with the melody's C5 at 0: nothing before it, no Bar past it; two lower notes at most
    bar = [*after, "Bar", "Pos_0"]
    assert allowed_after(bar) == names("Pitch", range(21, 73))
    assert allowed_after([*bar, "Pitch_50", "Dur_4", "Pitch_60", "Dur_4"]) == {"Pitch_72"}  # max_onsets 3
    done = [*bar, "Pitch_60", "Dur_4", "Pitch_72", "Dur_8"]
    assert allowed_after(done) == names("Pos", range(1, 8)) | {"Pos_8"}  # only forward, up to G4 at 8
    last = [*done, "Pos_8", "Pitch_67", "Dur_4"]
    # lower onsets under the held G4, or the end: nothing after the melody's last note, no Bar past it
    assert allowed_after(last) == {m.EOT, "Pos_9", "Pos_10", "Pos_11"}
    # the budget is kept for the melody: with just its own tokens left (E5's Pitch Dur, Bar Pos Pitch Dur for C5,
    # Pos Pitch Dur for G4, the end) no lower note may come; two tokens more make room for one
    assert allowed_after(at_pickup, budget=len(at_pickup) + 10) == {"Pitch_76"}
    assert allowed_after(at_pickup, budget=len(at_pickup) + 12) == names("Pitch", range(21, 77))


def test_the_melody_score_is_the_models_log_probability_of_the_melody_tokens():
    # a random walk through the grammar on random logits: the score adds log_softmax(logits)[token] (torch's) of
    # the melody's tokens drawn, as the model scored them before the mask, and of no other token
    generator = torch.Generator().manual_seed(0)
    grammar = HarmonyGrammar(LIMITS, MELODY, 200)
    ids, expected, melody_tokens = [INDEX[m.EOT]], 0.0, 0
    melody = {f"Pitch_{p}": f"Dur_{d}" for _, d, p in MELODY.notes}
    while True:
        logits = torch.randn(1, len(VOCAB), generator=generator)
        masked = grammar(torch.tensor([ids]), logits)
        token = int(torch.multinomial(torch.softmax(masked[0], -1), 1, generator=generator))
        if token == INDEX[m.EOT]:
            break
        previous = VOCAB[ids[-1]]
        if VOCAB[token] in melody and grammar.rows[0].next < len(MELODY.notes) and \
                MELODY.notes[grammar.rows[0].next][2] == int(VOCAB[token][6:]):
            expected += float(torch.log_softmax(logits[0], -1)[token])
            melody_tokens += 1
        elif previous in melody and VOCAB[token] == melody[previous] and grammar.rows[0].melody_note:
            expected += float(torch.log_softmax(logits[0], -1)[token])
            melody_tokens += 1
        ids.append(token)
    grammar(torch.tensor([ids]), torch.zeros(1, len(VOCAB)))  # reads the last token
    assert melody_tokens == 2 * len(MELODY.notes)
    assert set(MELODY.notes) <= set(m.decode([VOCAB[i] for i in ids[1:]]).notes)
    assert grammar.melody_scores() == [pytest.approx(expected)]


@pytest.mark.parametrize("family", ["ngram", "rnn", "gpt"])
def test_every_family_keeps_the_melody_and_writes_below_it(family, midi_folder, tmp_path):
    run_dir, _ = tiny_music_run(family, midi_folder, f"h-{family}", n_positions=512, steps=4)
    limits = json.loads((run_dir / "run.json").read_text())["encoding"]["grammar"]
    [name] = music.openings(run_dir)
    _, [held_out] = music.read_split(run_dir)
    soprano = m.soprano_line(held_out.notes)
    # one draw of the whole piece (candidates 1; the default, chords drawn per melody note, on a short melody below)
    made = service.generate(run_dir.name, {"n": 4, "harmonise_piece": name, "temperature": 1.5, "candidates": 1},
                            seed=3)
    assert made.record["settings"]["harmonise_piece"] == name
    assert made.record["settings"]["melody"]["notes"] == len(soprano)
    lower = 0
    for output in made.outputs:
        tokens = output["tokens"].split()
        notes = m.decode(tokens).notes
        assert set(soprano) <= set(notes)  # the melody kept exactly
        assert m.soprano_line(notes) == soprano  # and it is the top voice
        assert ceiling_broken(soprano, notes) == []  # nothing sounds above it
        assert output["bars"] == m.bars_of(m.encode(held_out))
        assert violations(tokens, limits) == []
        lower += len(notes) - len(soprano)
    assert lower > 0  # the model wrote lower voices
    again = service.generate(run_dir.name, {"n": 4, "harmonise_piece": name, "temperature": 1.5, "candidates": 1},
                             seed=3)
    assert [o["tokens"] for o in again.outputs] == [o["tokens"] for o in made.outputs]

    # a melody from a MIDI file (its top voice is taken), written with rests and a pickup, at the default: chords
    # drawn per melody note, the one that best foresees the note kept; seeded too
    path = tmp_path / "tune.mid"
    path.write_bytes(m.midi_bytes(m.Piece("tune", "3/4", [*MELODY.notes, (12, 4, 48)])))
    tune = service.generate(run_dir.name, {"n": 2, "harmonise_midi": str(path), "temperature": 1.5}, seed=1)
    assert tune.record["settings"]["candidates"] == music.HARMONY_CANDIDATES > 1
    assert [o["tokens"] for o in tune.outputs] == [o["tokens"] for o in service.generate(
        run_dir.name, {"n": 2, "harmonise_midi": str(path), "temperature": 1.5}, seed=1).outputs]
    for output in tune.outputs:
        notes = m.decode(output["tokens"].split()).notes
        assert set(MELODY.notes) <= set(notes) and ceiling_broken(MELODY.notes, notes) == []
        assert output["tokens"].startswith("TS_3/4 Bar Pos_8 ")


def test_the_cli_and_the_api_harmonise_and_bad_input_is_one_clear_error(midi_folder, tmp_path):
    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app

    run_dir, _ = service.train("ngram", str(midi_folder), name="chorales", sets={"max_order": "3",
                                                                                 "val_fraction": "0.25"})
    [name] = music.openings(run_dir)
    out = tmp_path / "out"
    done = runner.invoke(app, ["generate", "chorales", "--harmonise-piece", name, "--candidates", "1", "--seed", "2",
                               "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert {p.suffix for p in out.iterdir()} == {".mid", ".wav", ".png", ".json"}
    record = json.loads(m.midi_text(out / "000.mid"))
    assert record["settings"]["harmonise_piece"] == name  # the MIDI file names its melody

    home = runs_dir().parent
    server = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(server) as client:
        answer = client.post("/v1/audio/generations", json={"model": "chorales", "harmonise_piece": name, "seed": 2,
                                                            "candidates": 2})
        assert answer.status_code == 200, answer.text
        made = answer.json()
        assert made["data"][0]["midi_b64"] and made["data"][0]["record"]["settings"]["harmonise_piece"] == name
        replay = client.get(f"/v1/generations/{made['generation_id']}/replay").json()
        assert f"--harmonise-piece {name}" in replay["cli"] and "--candidates 2" in replay["cli"]
        assert [d["midi_b64"] for d in client.post(replay["endpoint"], json=replay["body"]).json()["data"]] == \
            [d["midi_b64"] for d in made["data"]]
        for wrong, says in (({"harmonise_piece": "bwv000"}, "--harmonise-piece 'bwv000' is not a validation piece"),
                            ({"harmonise_piece": name, "bars": 4}, "--bars does not apply with --harmonise"),
                            ({"harmonise_piece": name, "constrained": False}, "leave --no-constrained out"),
                            ({"candidates": 2}, "--candidates applies with --harmonise")):
            refused = client.post("/v1/audio/generations", json={"model": "chorales", **wrong})
            assert refused.status_code == 400 and says in refused.text, refused.text

    silent, text_file = tmp_path / "silent.mid", tmp_path / "notes.txt"
    silent.write_bytes(m.midi_bytes(m.Piece("silent", "4/4", [])))
    text_file.write_text("to be or not to be, that is the question\n" * 20)
    service.train("ngram", str(text_file), name="words", sets={"max_order": "2"})
    for args, says in ((["chorales", "--harmonise-midi", str(silent)], "has no notes"),
                       (["chorales", "--harmonise-midi", str(text_file)], "not a readable MIDI file"),
                       (["chorales", "--harmonise-midi", str(silent), "--harmonise-piece", name], "exclude each other"),
                       (["words", "--harmonise-midi", str(silent)], "--harmonise-midi does not apply to text runs")):
        done = runner.invoke(app, ["generate", *args, "--no-record", "--out", str(tmp_path / "no")])
        assert done.exit_code != 0 and says in done.output, done.output
        assert "Traceback" not in done.output
    assert not (tmp_path / "no").exists()
    one_voice = tmp_path / "one"
    one_voice.mkdir()
    for i, piece in enumerate([MELODY, m.Piece("other", "3/4", [(0, 4, 60), (4, 4, 62)])]):
        (one_voice / f"{i}.mid").write_bytes(m.midi_bytes(piece))
    service.train("ngram", str(one_voice), name="melodies", sets={"max_order": "2", "val_fraction": "0.5"})
    with pytest.raises(BadRequest, match="pieces of one voice"):
        service.generate("melodies", {"harmonise_midi": str(one_voice / "0.mid")})


def test_consonance_and_notes_per_onset_by_hand():
    c_major, d_minor_over_c = [48, 64, 67, 72], [48, 62, 65, 69]
    assert is_consonant(c_major) and is_consonant([48, 60]) and is_consonant([52, 60, 67])  # a sixth chord
    assert not is_consonant(d_minor_over_c)  # a 9th over the bass
    assert not is_consonant([48, 53]) and is_consonant([48, 55, 60])  # a fourth over the bass; between upper voices
    # C major held (4 notes at 0), a passing D over it at 4: two sonorities, one consonant
    notes = [(0, 8, 48), (0, 8, 55), (0, 8, 64), (0, 4, 72), (4, 4, 74)]
    assert sonorities(notes) == [[48, 55, 64, 72], [48, 55, 64, 74]]
    assert consonant_share(notes) == 0.5 and notes_per_onset(notes) == 2.5
    assert math.isnan(consonant_share([(0, 4, 60)]))


def test_the_api_harmonises_and_continues_a_midi_file_of_the_user_s_own(midi_folder):
    """POST /v1/audio/generations with harmonise_midi_b64 / prompt_midi_b64: the file's melody is kept exactly as the
    top voice (or its first bar begins the piece), the file is kept by its content where the record names it, the
    replay makes the same piece and its CLI reads the kept file; bad files are one clear error and keep nothing."""
    import base64

    from fastapi.testclient import TestClient

    from aigc import uploads
    from aigc.server.app import ServerConfig, create_app

    run_dir, _ = tiny_music_run("ngram", midi_folder, "own", n_positions=512, steps=4)
    tune = m.midi_bytes(m.Piece("tune", "3/4", [*MELODY.notes, (12, 4, 48)]))  # top voice: MELODY
    start = m.Piece("start", "4/4", [(0, 4, 60), (0, 4, 64), (4, 4, 67), (8, 8, 72), (16, 4, 62), (20, 4, 65)])
    opening = m.midi_bytes(start)
    home = runs_dir().parent
    server = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    with TestClient(server) as client:
        answer = client.post("/v1/audio/generations", json={"model": "own", "harmonise_midi_b64": b64(tune),
                                                            "temperature": 1.5, "seed": 4, "n": 2})
        assert answer.status_code == 200, answer.text
        made = answer.json()
        kept = uploads.kept_midi_path(tune)
        assert kept.read_bytes() == tune
        for datum in made["data"]:
            assert datum["record"]["settings"]["harmonise_midi"] == str(kept)
            notes = m.midi_piece(base64.b64decode(datum["midi_b64"]), "out", "out").notes
            assert set(MELODY.notes) <= set(notes) and ceiling_broken(MELODY.notes, notes) == []
        replay = client.get(f"/v1/generations/{made['generation_id']}/replay").json()
        assert f"--harmonise-midi {kept}" in replay["cli"]
        again = client.post(replay["endpoint"], json=replay["body"]).json()
        assert [d["midi_b64"] for d in again["data"]] == [d["midi_b64"] for d in made["data"]]

        answer = client.post("/v1/audio/generations", json={"model": "own", "prompt_midi_b64": b64(opening),
                                                            "prompt_bars": 1, "bars": 2, "seed": 1})
        assert answer.status_code == 200, answer.text
        [datum] = answer.json()["data"]
        first_bar = m.decode(m.first_bars(m.encode(start), 1)).notes
        assert len(first_bar) == 4
        assert set(first_bar) <= set(m.midi_piece(base64.b64decode(datum["midi_b64"]), "out", "out").notes)
        assert datum["record"]["settings"]["prompt_midi"] == str(uploads.kept_midi_path(opening))

        before = sorted((home / "uploads" / "midi").iterdir())
        for body, status, says in (
                ({"harmonise_midi_b64": "not base64!"}, 400, "harmonise_midi_b64 is not base64"),
                ({"harmonise_midi_b64": b64(b"MThd nonsense")}, 400, "harmonise_midi_b64: not a readable MIDI"),
                ({"prompt_midi_b64": b64(m.midi_bytes(m.Piece("silent", "4/4", [])))}, 400, "has no notes"),
                ({"harmonise_midi_b64": b64(tune), "harmonise_piece": music.openings(run_dir)[0]}, 400,
                 "exclude each other"),
                ({"harmonise_midi_b64": b64(b"MThd" + bytes(2**20))}, 413, "more than the 1 MB")):
            refused = client.post("/v1/audio/generations", json={"model": "own", **body})
            assert refused.status_code == status and says in refused.text, refused.text
        assert sorted((home / "uploads" / "midi").iterdir()) == before  # nothing kept from a refused request
