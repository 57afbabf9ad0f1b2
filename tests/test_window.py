"""The decoding window in the store (issue 17): a gpt reads at most its training block while it writes (past it, the
window slides); a new generation records the window it was made with, a row made before the window existed replays
reading all the model's positions (window 0), and each replay makes the same tokens again."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from aigc import service
from aigc.db import Store
from aigc.modalities.music import SAMPLING_DEFAULTS
from aigc.server.app import ServerConfig, create_app
from aigc.store import runs_dir
from conftest import TINY_SETS, make_poems, tiny_music_run


@pytest.fixture
def client(aigc_home):
    app = create_app(ServerConfig(runs=runs_dir(), database=f"sqlite:///{aigc_home}/aigc.db", rate_limit=0))
    with TestClient(app) as client:
        yield client


def _old_row(home, run_dir, modality: str, request: dict, seed: int, output) -> str:
    """A row as a generation made before the window was stored: its request has no window."""
    with Store(f"sqlite:///{home}/aigc.db") as db:
        return db.add_generation(run=run_dir.name, run_path=str(run_dir), modality=modality, seed=seed, family="gpt",
                                 request=request, output=output)


def test_text_rows_replay_with_the_window_they_were_made_with(aigc_home, tmp_path, client):
    poems = tmp_path / "poems.txt"
    poems.write_text("\n%\n".join(make_poems(30)) + "\n", encoding="utf-8")
    run_dir, _ = service.train("gpt", str(poems), name="wpoet", sets=TINY_SETS["gpt"], max_steps=4)  # block 16
    window = {c["name"]: c for c in client.get("/v1/models/wpoet/controls").json()["controls"]}["window"]
    assert window["default"] == 16 and window["advanced"] and window["minimum"] == 0  # the studio shows the block
    ask = {"model": "wpoet", "prompt": "春", "max_tokens": 40, "n": 4, "seed": 0, "temperature": 1.0}
    made = client.post("/v1/completions", json=ask).json()
    replay = client.get(f"/v1/generations/{made['generation_id']}/replay").json()
    assert replay["body"]["window"] == 16 and "--window 16" in replay["cli"]
    texts = [c["text"] for c in made["choices"]]
    assert [c["text"] for c in client.post(replay["endpoint"], json=replay["body"]).json()["choices"]] == texts
    # what the generation would have been before the window: all 64 positions read
    whole = service.generate("wpoet", {"prompt": "春", "n": 4, "max_new_tokens": 40, "temperature": 1.0, "window": 0},
                             seed=0)
    assert whole.outputs != ["春" + t for t in texts], "the window changed nothing here: pick another seed"
    gen = _old_row(aigc_home, run_dir, "text", {"endpoint": "completions", **ask}, 0, whole.outputs)
    replay = client.get(f"/v1/generations/{gen}/replay").json()
    assert replay["body"]["window"] == 0 and "--window 0" in replay["cli"]
    again = client.post(replay["endpoint"], json=replay["body"]).json()
    assert ["春" + c["text"] for c in again["choices"]] == whole.outputs


def test_music_rows_replay_with_the_window_they_were_made_with(aigc_home, midi_folder, client):
    run_dir, _ = tiny_music_run("gpt", midi_folder, "wbach", n_positions=512, steps=4)  # block 16
    controls = {c["name"]: c for c in client.get("/v1/models/wbach/controls").json()["controls"]}
    assert controls["window"]["default"] == 16 and controls["grammar_version"]["default"] == 2
    made = client.post("/v1/audio/generations", json={"model": "wbach", "n": 2, "bars": 16, "seed": 0}).json()
    assert made["data"][0]["record"]["settings"]["window"] == 16
    assert len(made["data"][0]["record"]["tokens"].split()) > 16  # 16 bars, a Bar token each: the window slid
    replay = client.get(f"/v1/generations/{made['generation_id']}/replay").json()
    assert replay["body"]["window"] == 16 and "--window 16" in replay["cli"]
    # the sampling it was made with is stored, so a later change of the music defaults does not change the replay
    assert {k: replay["body"][k] for k in ("temperature", "top_k", "top_p")} == \
        {k: SAMPLING_DEFAULTS[k] for k in ("temperature", "top_k", "top_p")}
    assert [d["midi_b64"] for d in client.post(replay["endpoint"], json=replay["body"]).json()["data"]] == \
        [d["midi_b64"] for d in made["data"]]
    # a row from before the window and before its sampling was stored: made at the defaults of then (0.6, no top-p)
    whole = service.generate("wbach", {"n": 2, "bars": 16, "window": 0, "temperature": 0.6, "top_p": 1.0}, seed=0)
    assert [o["tokens"] for o in whole.outputs] != [d["record"]["tokens"] for d in made["data"]]
    gen = _old_row(aigc_home, run_dir, "music", {"endpoint": "audio", "model": "wbach", "n": 2, "bars": 16,
                                                 "constrained": True}, 0, whole.outputs)
    replay = client.get(f"/v1/generations/{gen}/replay").json()
    assert replay["body"]["window"] == 0 and "--window 0" in replay["cli"] and replay["body"]["temperature"] == 0.6
    again = client.post(replay["endpoint"], json=replay["body"]).json()
    assert [d["record"]["tokens"] for d in again["data"]] == [o["tokens"] for o in whole.outputs]
    bad = client.post("/v1/audio/generations", json={"model": "wbach", "window": 1})
    assert bad.status_code == 400 and "window" in bad.text
