"""Grammar-constrained sampling of the music tokens (issue 17, aigc.data.music_grammar): the mask on hand-made
prefixes against the grammar worked out by hand, properties of many seeded samples of tiny runs of every family
(positions only forward, no more notes at an onset or sounding at once than the training pieces, every note whole),
seeded reproducibility, and records made before the option regenerate as before."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from aigc import service
from aigc.data import music as m
from aigc.data.music_grammar import RemiGrammar, limits_of
from aigc.db import Store
from aigc.errors import BadRequest
from aigc.modalities import music
from aigc.store import runs_dir
from conftest import tiny_music_run

VOCAB = m.vocabulary()
INDEX = {token: i for i, token in enumerate(VOCAB)}


def allowed_after(tokens: list[str], limits: dict) -> set[str]:
    """The tokens the grammar leaves finite after `tokens` (the document start first), on flat logits."""
    grammar = RemiGrammar(limits)
    ids = torch.tensor([[INDEX[m.EOT], *(INDEX[t] for t in tokens)]])
    out = grammar(ids, torch.zeros(1, len(VOCAB)))
    return {VOCAB[i] for i in torch.isfinite(out[0]).nonzero()[:, 0].tolist()}


def names(prefix: str, values) -> set[str]:
    return {f"{prefix}_{v}" for v in values}


def test_the_mask_is_the_grammar_worked_out_by_hand():
    limits = {"max_onsets": 2, "max_polyphony": 3}
    assert allowed_after([], limits) == names("TS", m.TIME_SIGNATURES)  # a piece opens with its time signature
    assert allowed_after(["TS_3/4"], limits) == {"Bar"}
    assert allowed_after(["TS_3/4", "Bar"], limits) == {"Bar"} | names("Pos", range(12))  # a 3/4 bar: 12 16ths
    assert allowed_after(["TS_4/4", "Bar", "Pos_4"], limits) == names("Pitch", range(21, 109))
    assert allowed_after(["TS_4/4", "Bar", "Pos_4", "Pitch_60"], limits) == names("Dur", range(1, 65))
    # after a whole note: a higher pitch at this onset, a later position, a new bar or the end
    assert allowed_after(["TS_4/4", "Bar", "Pos_4", "Pitch_60", "Dur_8"], limits) == \
        names("Pitch", range(61, 109)) | names("Pos", range(5, 16)) | {"Bar", m.EOT}
    # two notes at Pos_0 (max_onsets 2): no third; both sound until 16
    two = ["TS_4/4", "Bar", "Pos_0", "Pitch_60", "Dur_16", "Pitch_64", "Dur_16"]
    assert allowed_after(two, limits) == names("Pos", range(1, 16)) | {"Bar", m.EOT}
    # a third voice at Pos_2 until 6: three sound (max_polyphony 3): no pitch, and no onset before 6
    assert allowed_after([*two, "Pos_2", "Pitch_67", "Dur_4"], limits) == names("Pos", range(6, 16)) | {"Bar", m.EOT}
    # a new bar starts again at 0; the two long notes end at 16, on the bar line
    assert allowed_after([*two, "Pos_2", "Pitch_67", "Dur_4", "Bar"], limits) == {"Bar"} | names("Pos", range(16))
    # a note held across the bar line counts in the next bar: 3 sound at 16..19, so no onset there
    held = ["TS_4/4", "Bar", "Pos_0", "Pitch_60", "Dur_20", "Pitch_64", "Dur_20", "Pos_8", "Pitch_67", "Dur_12"]
    assert allowed_after([*held, "Bar"], limits) == {"Bar"} | names("Pos", range(4, 16))
    assert allowed_after([*held, "Bar", "Bar"], limits) == {"Bar"} | names("Pos", range(16))
    # the highest key: nothing above it at that onset
    assert "Pitch_108" not in allowed_after(["TS_4/4", "Bar", "Pos_0", "Pitch_108", "Dur_1"], limits)
    # the end of a piece is the end
    assert allowed_after(["TS_4/4", "Bar", "Pos_0", "Pitch_60", "Dur_1", m.EOT], limits) == {m.EOT}


def test_a_sounding_pitch_is_not_struck_again_since_version_2():
    """Decoding keeps one note per pitch at a time (`one_voice_per_pitch`), so striking a pitch that still sounds
    would cut the held note short (a kept opening's note, say): version 2 forbids it until the note has ended;
    version 1, how rows made before were sampled, allowed it."""
    limits = {"max_onsets": 4, "max_polyphony": 4}
    held = ["TS_4/4", "Bar", "Pos_0", "Pitch_60", "Dur_8", "Pitch_64", "Dur_2"]
    assert names("Pitch", (60,)).isdisjoint(allowed_after([*held, "Pos_4"], limits))  # 60 sounds until 8
    assert "Pitch_64" in allowed_after([*held, "Pos_4"], limits)  # 64 ended at 2
    assert "Pitch_60" in allowed_after([*held, "Pos_8"], limits)  # ended as this onset starts
    assert "Pitch_60" in allowed_after([*held, "Pos_4"], {**limits, "version": 1})
    # across the bar line, and the notes read from a prompt count as the model's own do
    long = ["TS_4/4", "Bar", "Pos_8", "Pitch_72", "Dur_12", "Bar"]
    assert "Pitch_72" not in allowed_after([*long, "Pos_3"], limits)
    assert "Pitch_72" in allowed_after([*long, "Pos_4"], limits)
    piece = m.decode([*long, "Pos_4", "Pitch_72", "Dur_4"])
    assert (8, 12, 72) in piece.notes  # the held note whole: what the grammar keeps from being cut


def test_the_mask_keeps_the_logits_it_allows_and_never_makes_the_draw_impossible():
    grammar = RemiGrammar({"max_onsets": 4, "max_polyphony": 4})
    ids = torch.tensor([[0, INDEX["TS_4/4"], INDEX["Bar"], INDEX["Pos_0"], INDEX["Pitch_60"]]] * 2)
    scores = torch.randn(2, len(VOCAB), generator=torch.Generator().manual_seed(0))
    scores[1, INDEX["Dur_1"]:] = -float("inf")  # a model (an n-gram) that gives every allowed token nothing
    out = grammar(ids, scores)
    durations = slice(INDEX["Dur_1"], None)
    assert torch.equal(out[0, durations], scores[0, durations])  # allowed: the model's own logits
    assert torch.isinf(out[0, :INDEX["Dur_1"]]).all()
    assert torch.equal(out[1], scores[1])  # nothing allowed is possible: the row is left as the model has it
    # the state follows the rows as the decoder appends a column a call
    nxt = torch.cat([ids, torch.tensor([[INDEX["Dur_4"]], [INDEX["Dur_4"]]])], dim=1)
    assert torch.isfinite(grammar(nxt, torch.zeros(2, len(VOCAB)))[0, INDEX["Pitch_61"]])
    assert torch.isinf(grammar(torch.cat([nxt, torch.tensor([[INDEX["Pitch_64"]]] * 2)], dim=1),
                               torch.zeros(2, len(VOCAB)))[0, INDEX["Pos_1"]])


def test_the_limits_are_the_training_pieces_own(chorales):
    assert limits_of(chorales) == {"max_onsets": 4, "max_polyphony": 4}  # four-part chorales
    melody = m.Piece("tune", "4/4", [(0, 4, 60), (4, 4, 62), (8, 8, 64)])
    assert limits_of([melody]) == {"max_onsets": 1, "max_polyphony": 1}  # a note ending as the next starts: one
    chord = m.Piece("chords", "4/4", [(0, 8, 48), (0, 8, 52), (0, 8, 55), (4, 4, 60), (4, 4, 64)])
    assert limits_of([melody, chord]) == {"max_onsets": 3, "max_polyphony": 5}


def violations(tokens: list[str], limits: dict) -> list[str]:
    """What in a token sequence breaks the grammar or the limits (independent of the processor: read from the
    tokens and the decoded notes)."""
    found, pos = [], None
    for i, token in enumerate(tokens):
        kind = token.split("_")[0]
        if kind == "TS" and i > 0:
            found.append(f"{i}: a time signature inside the piece")
        if kind == "Bar":
            pos = None
        if kind == "Pos":
            if pos is not None and int(token[4:]) <= pos:
                found.append(f"{i}: {token} after Pos_{pos}")
            pos = int(token[4:])
        if kind == "Pitch" and (i + 1 == len(tokens) or not tokens[i + 1].startswith("Dur_")):
            if i + 1 < len(tokens):  # a sample cut at its last full bar never ends inside a note
                found.append(f"{i}: {token} without its duration")
        if kind == "Dur" and not tokens[i - 1].startswith("Pitch_"):
            found.append(f"{i}: {token} without its pitch")
    piece = m.decode(tokens)
    written = {note for note in m.notes_as_written(tokens)}
    if written != set(piece.notes):
        found.append(f"notes cut short by their pitch struck again: {sorted(written - set(piece.notes))}")
    starts: dict[int, int] = {}
    for onset, _, _ in piece.notes:
        starts[onset] = starts.get(onset, 0) + 1
    if starts and max(starts.values()) > limits["max_onsets"]:
        found.append(f"{max(starts.values())} notes at one onset")
    sounding = max((sum(o <= t < o + d for o, d, _ in piece.notes) for t in range(0, 16 * 9)), default=0)
    if sounding > limits["max_polyphony"]:
        found.append(f"{sounding} notes at once")
    return found


@pytest.mark.parametrize("family", ["ngram", "rnn", "gpt"])
def test_constrained_samples_of_every_family_keep_the_grammar(family, midi_folder):
    run_dir, _ = tiny_music_run(family, midi_folder, f"g-{family}", n_positions=256, steps=4)
    limits = json.loads((run_dir / "run.json").read_text())["encoding"]["grammar"]
    train, _ = music.read_split(run_dir)
    assert limits == limits_of(train) == {"max_onsets": 4, "max_polyphony": 4}

    # many seeded pieces at temperature 1.5 (an untrained model draws nearly anything): none breaks the grammar
    made = service.generate(run_dir.name, {"n": 8, "bars": 3, "temperature": 1.5}, seed=3)
    assert made.record["settings"]["constrained"] is True
    assert made.record["settings"]["grammar"] == {**limits, "version": 2}
    assert sum(o["notes"] for o in made.outputs) > 0
    for output in made.outputs:
        assert violations(output["tokens"].split(), limits) == [], output["tokens"]
    if family == "rnn":  # the same pieces drawn without the grammar break it (the property is not vacuous); the
        # rnn's steps are the cheapest, and an untrained model without the grammar rarely ends a bar
        free = service.generate(run_dir.name, {"n": 8, "bars": 3, "temperature": 1.5, "constrained": False}, seed=3)
        assert free.record["settings"]["constrained"] is False and free.record["settings"]["grammar"] is None
        assert any(violations(o["tokens"].split(), limits) for o in free.outputs)
    # seeded: the same request, the same tokens; a continued opening keeps the grammar too
    again = service.generate(run_dir.name, {"n": 8, "bars": 3, "temperature": 1.5}, seed=3)
    assert [o["tokens"] for o in again.outputs] == [o["tokens"] for o in made.outputs]
    opening = music.openings(run_dir)[0]
    continued = service.generate(run_dir.name, {"n": 3, "bars": 2, "prompt_piece": opening, "prompt_bars": 1}, seed=1)
    for output in continued.outputs:
        assert violations(output["tokens"].split(), limits) == []


def test_a_run_made_before_the_grammar_counts_its_limits_and_old_records_regenerate_as_before(midi_folder):
    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app

    run_dir, _ = service.train("ngram", str(midi_folder), name="old", sets={"max_order": "3"})
    record_path = run_dir / "run.json"
    record = json.loads(record_path.read_text())
    del record["encoding"]["grammar"]  # as a run trained before constrained sampling
    record_path.write_text(json.dumps(record))
    assert music.grammar_of(run_dir, record) == {"max_onsets": 4, "max_polyphony": 4}

    home = runs_dir().parent
    app = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app) as client:
        # a generation recorded before the option existed: made without the grammar, its request without the field,
        # at the sampling defaults of then (temperature 0.8, no top-p: `music.sampling_before`)
        old = service.generate("old", {"n": 2, "bars": 2, "constrained": False, "temperature": 0.8, "top_p": 1.0},
                               seed=7)
        with Store(f"sqlite:///{home}/aigc.db") as db:
            gen = db.add_generation(run="old", run_path=str(run_dir), modality="music", seed=7, family="ngram",
                                    request={"endpoint": "audio", "model": "old", "n": 2, "bars": 2},
                                    output=old.outputs)
        replay = client.get(f"/v1/generations/{gen}/replay").json()
        assert replay["body"]["constrained"] is False and "--no-constrained" in replay["cli"]
        again = client.post(replay["endpoint"], json=replay["body"]).json()
        assert [d["record"]["tokens"] for d in again["data"]] == [o["tokens"] for o in old.outputs]
        # a row made with the first version of the grammar (a sounding pitch could be struck again) replays with it
        # (made at the defaults of then, 0.6 without top-p, before rows stored their sampling)
        then = {"temperature": 0.6, "top_p": 1.0}
        first = service.generate("old", {"n": 8, "bars": 8, "grammar_version": 1, **then}, seed=3)
        newest = service.generate("old", {"n": 8, "bars": 8, **then}, seed=3)
        assert [o["tokens"] for o in first.outputs] != [o["tokens"] for o in newest.outputs], "pick another seed"
        with Store(f"sqlite:///{home}/aigc.db") as db:
            gen = db.add_generation(run="old", run_path=str(run_dir), modality="music", seed=3, family="ngram",
                                    request={"endpoint": "audio", "model": "old", "n": 8, "bars": 8,
                                             "constrained": True}, output=first.outputs)
        replay = client.get(f"/v1/generations/{gen}/replay").json()
        assert replay["body"]["grammar_version"] == 1 and "--grammar-version 1" in replay["cli"]
        again = client.post(replay["endpoint"], json=replay["body"]).json()
        assert [d["record"]["tokens"] for d in again["data"]] == [o["tokens"] for o in first.outputs]
        # a new generation records what it was made with, and its replay makes it again
        made = client.post("/v1/audio/generations", json={"model": "old", "n": 2, "bars": 2, "seed": 7}).json()
        assert made["data"][0]["record"]["settings"]["constrained"] is True
        assert made["data"][0]["record"]["settings"]["grammar"]["version"] == 2
        replay = client.get(f"/v1/generations/{made['generation_id']}/replay").json()
        assert replay["body"]["constrained"] is True and "--constrained" in replay["cli"]
        assert replay["body"]["grammar_version"] == 2
        assert [d["midi_b64"] for d in client.post(replay["endpoint"], json=replay["body"]).json()["data"]] == \
            [d["midi_b64"] for d in made["data"]]
        bad = client.post("/v1/audio/generations", json={"model": "old", "constrained": "sometimes"})
        assert bad.status_code == 400 and "constrained" in bad.text
    with pytest.raises(BadRequest, match="constrained must be true or false"):
        service.generate("old", {"constrained": "yes"}, seed=0)
    with pytest.raises(BadRequest, match="--grammar-version must be in 1..2"):
        service.generate("old", {"grammar_version": 3}, seed=0)
    shutil.rmtree(run_dir)
