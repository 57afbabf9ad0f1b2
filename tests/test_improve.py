"""What a run's feedback allows (service.feedback_summary, GET /v1/models/{id}/feedback: the studio's Improve panel)
and best of N in the studio's controls: the counts are those of the feedback snapshot that `aigc optimize` would
record; a method is offered exactly when `service.optimize` would start it, and when it is not, the reason is the
very error `optimize` answers (checked against it); the controls declare `best_of` only for a run with a reward
model, its default the run's own k; a best-of generation's store row says what the reranking chose, and its
replay makes the same text again.

Tiny real runs (an n-gram and a gpt on the conftest's poems, a conditional VAE on digits, an AR on sunspots); the
feedback is real store rows."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from tests.conftest import TINY_SETS
from tests.test_server import start_server, stop_server, train_runs

from aigc import service, store
from aigc.db import Store
from aigc.errors import NotFound, UserError
from aigc.optimize import feedback as fb

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """runs/: poet (n-gram), tiny (gpt, 4 steps), digits (conditional VAE), sun (AR)."""
    home = tmp_path_factory.mktemp("improve")
    train_runs(home, ("poet", "digits", "sun"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        service.train("gpt", str(home / "poems.txt"), name="tiny", max_steps=4, sets=TINY_SETS["gpt"])
    return home


@pytest.fixture
def db(home, tmp_path, monkeypatch):
    """The runs of `home`, and an empty store of this test's own."""
    monkeypatch.setenv("AIGC_HOME", str(home))
    with Store(f"sqlite:///{tmp_path / 'aigc.db'}") as db:
        yield db


def texts(db: Store, run: str, prompt: str, outputs: list[str]) -> str:
    return db.add_generation(run=run, modality="text", source="api", request={"prompt": prompt}, output=outputs)


def methods(summary: dict) -> dict[str, dict]:
    assert [m["method"] for m in summary["methods"]] == ["sft", "dpo", "rerank"]
    return {m["method"]: m for m in summary["methods"]}


def assert_counts_are_the_snapshots(summary: dict, db: Store, run: str, modality: str) -> None:
    snapshot = fb.collect(db, run, modality).snapshot()
    assert summary["modality"] == modality and summary["run"] == run
    assert {k: summary[k] for k in ("liked", "disliked", "pairs")} == {k: snapshot[k] for k in
                                                                         ("liked", "disliked", "pairs")}
    assert summary["ratings"] == len(snapshot["rating_ids"]) and summary["votes"] == len(snapshot["vote_ids"])


def assert_reasons_are_optimizes_errors(summary: dict, db: Store) -> None:
    """Each method the summary refuses, `optimize` refuses with the same words, before any run is made; the
    methods it offers pass every check `optimize` makes before it claims a directory."""
    for m in summary["methods"]:
        if m["available"]:
            assert m["reason"] is None
            continue
        before = sorted(p.name for p in store.runs_dir().iterdir())
        with pytest.raises(UserError) as refused:
            service.optimize(summary["run"], m["method"], db=db)
        assert str(refused.value) == m["reason"], m["method"]
        assert sorted(p.name for p in store.runs_dir().iterdir()) == before


def test_a_text_run_with_liked_outputs_only_can_learn_from_them_and_nothing_else(db):
    gen = texts(db, "tiny", "春", ["春山", "春水", "春风"])
    db.add_rating(gen, score=1, index=0)
    db.add_rating(gen, score=1, index=1)
    summary = service.feedback_summary("tiny", db)
    assert_counts_are_the_snapshots(summary, db, "tiny", "text")
    assert (summary["liked"], summary["disliked"], summary["pairs"], summary["ratings"], summary["votes"]) == \
        (2, 0, 0, 2, 0)
    by = methods(summary)
    assert by["sft"] == {"method": "sft", "available": True, "reason": None}
    assert not by["dpo"]["available"] and by["dpo"]["reason"].startswith("--method dpo learns from pairs")
    assert not by["rerank"]["available"] and "needs liked and disliked outputs" in by["rerank"]["reason"]
    assert_reasons_are_optimizes_errors(summary, db)


def test_pairs_from_ratings_and_votes_open_dpo_and_rerank(db):
    gen = texts(db, "tiny", "春", ["春山", "春水", "春风"])
    db.add_rating(gen, score=1, index=0)
    db.add_rating(gen, score=-1, index=1)
    db.add_rating(gen, score=-1, index=2)
    rival = texts(db, "poet", "江", ["江月"])
    mine = texts(db, "tiny", "江", ["江山"])
    db.add_vote(mine, rival, "left", prompt="江")
    db.add_vote(mine, rival, "tie", prompt="江")  # says nothing about order: not counted
    summary = service.feedback_summary("tiny", db)
    assert_counts_are_the_snapshots(summary, db, "tiny", "text")
    assert (summary["liked"], summary["disliked"], summary["pairs"], summary["ratings"], summary["votes"]) == \
        (1, 2, 3, 3, 1)
    assert all(m["available"] for m in summary["methods"])
    # the rival n-gram has the vote too (it lost it), and no ratings: a pair for rerank, nothing for sft
    rival_summary = service.feedback_summary("poet", db)
    assert (rival_summary["pairs"], rival_summary["votes"], rival_summary["liked"]) == (1, 1, 0)
    assert methods(rival_summary)["rerank"]["available"]


def test_an_ngram_is_offered_sft_and_rerank(db):
    gen = texts(db, "poet", "月", ["月山", "月水"])
    db.add_rating(gen, score=1, index=0)
    db.add_rating(gen, score=-1, index=1)
    summary = service.feedback_summary("poet", db)
    assert_counts_are_the_snapshots(summary, db, "poet", "text")
    by = methods(summary)
    assert not by["dpo"]["available"]
    assert by["dpo"]["reason"] == ("--method dpo fine-tunes a gradient-trained family; ngram is counted: "
                                   "use --method sft (its counts) or rerank")
    assert by["rerank"]["available"] and by["sft"]["available"]
    assert_reasons_are_optimizes_errors(summary, db)


def test_an_image_run_takes_no_dpo(db, home):
    for label, score in ((3, 1), (3, -1), (5, 1)):
        gen = db.add_generation(run="digits", modality="image", source="api", request={"prompt": str(label)},
                                output={"class": label}, file=str(home / f"gen-{label}-{score}.png"))
        db.add_rating(gen, score=score)
    texts(db, "digits", "春", ["春山"])  # a text row under the image run's name is not its feedback
    summary = service.feedback_summary("digits", db)
    assert_counts_are_the_snapshots(summary, db, "digits", "image")
    assert (summary["liked"], summary["disliked"], summary["pairs"], summary["ratings"]) == (2, 1, 1, 3)
    by = methods(summary)
    assert by["dpo"]["reason"] == "--method dpo takes text and music runs; 'digits' is an image run (use: sft, rerank)"
    assert by["rerank"]["available"] and by["sft"]["available"]


def test_a_series_run_and_an_unknown_run(db):
    summary = service.feedback_summary("sun", db)
    assert (summary["modality"], summary["liked"], summary["ratings"]) == ("series", 0, 0)
    by = methods(summary)  # rerank only, and it has nothing to learn from yet
    assert by["sft"]["reason"] == "--method sft takes text, image and music runs; 'sun' is a series run (use: rerank)"
    assert by["rerank"]["reason"].startswith("--method rerank needs liked and disliked outputs (or arena votes) of "
                                             "run 'sun'")
    assert_reasons_are_optimizes_errors(summary, db)
    with pytest.raises(NotFound):
        service.feedback_summary("nope", db)


def test_an_unfinished_run_is_offered_nothing(db, home):
    record = store.read_run(home / "runs" / "tiny")
    store.write_record(home / "runs" / "tiny", {**record, "status": "interrupted"})
    try:
        gen = texts(db, "tiny", "春", ["春山"])
        db.add_rating(gen, score=1)
        summary = service.feedback_summary("tiny", db)
    finally:
        store.write_record(home / "runs" / "tiny", record)
    assert summary["liked"] == 1
    assert {m["reason"] for m in summary["methods"]} == {"run 'tiny' is interrupted: optimize a finished run"}


# ----------------------------------------------------------------------------------
# the endpoints


@pytest.fixture(scope="module")
def served(home):
    proc, url = start_server(home)
    with httpx.Client(base_url=url, timeout=120) as http:
        yield http
    stop_server(proc)


def test_the_endpoint_answers_what_the_service_says(served, home, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(home))
    made = served.post("/v1/completions", json={"model": "tiny", "prompt": "春", "n": 3, "max_tokens": 6, "seed": 3})
    assert made.status_code == 200, made.text
    for index, score in ((0, 1), (1, -1), (2, -1)):
        rated = served.post(f"/v1/generations/{made.json()['id']}/ratings", json={"score": score, "index": index})
        assert rated.status_code == 200, rated.text
    answer = served.get("/v1/models/tiny/feedback")
    assert answer.status_code == 200, answer.text
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        assert answer.json() == service.feedback_summary("tiny", db)
        assert_counts_are_the_snapshots(answer.json(), db, "tiny", "text")
    assert (answer.json()["liked"], answer.json()["disliked"], answer.json()["pairs"]) == (1, 2, 2)

    unknown = served.get("/v1/models/nope/feedback")
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] == "no such model: 'nope' (see GET /v1/models)"


def test_best_of_is_a_control_of_a_run_with_a_reward_and_its_choice_is_stored(served, home, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(home))

    def control_names(model: str) -> list[str]:
        return [c["name"] for c in served.get(f"/v1/models/{model}/controls").json()["controls"]]

    assert "best_of" not in control_names("poet") and "best_of" not in control_names("digits")
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        gen = texts(db, "poet", "春", ["春山月", "春水风", "春天"])
        for index, score in ((0, 1), (1, -1), (2, -1)):
            db.add_rating(gen, score=score, index=index)
        service.optimize("poet", "rerank", name="poet-picky", sets={"eval_samples": "0", "best_of": "3"}, db=db)
    spec = served.get("/v1/models/poet-picky/controls").json()
    best_of = {c["name"]: c for c in spec["controls"]}["best_of"]
    assert (best_of["default"], best_of["minimum"], best_of["maximum"], best_of["advanced"]) == (3, 1, 64, False)
    assert best_of["type"] == "integer"

    # a generation with it: the store keeps the request's best_of and what the reranking chose
    made = served.post("/v1/completions", json={"model": "poet-picky", "prompt": "春", "n": 2, "max_tokens": 8,
                                                "seed": 5, "best_of": 4})
    assert made.status_code == 200, made.text
    row = served.get(f"/v1/generations/{made.json()['id']}").json()
    assert row["request"]["best_of"] == 4
    rerank = row["rerank"]
    assert (rerank["best_of"], rerank["candidates"], len(rerank["scores"])) == (4, 8, 2)
    assert [i // 4 for i in rerank["chosen"]] == [0, 1]  # one from each group of 4 candidates
    # made again from its replay: the same texts (the replay sends the k it was picked with)
    replay = served.get(f"/v1/generations/{made.json()['id']}/replay").json()
    assert replay["body"]["best_of"] == 4 and "--best-of 4" in replay["cli"]
    again = served.post(replay["endpoint"], json=replay["body"]).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in made.json()["choices"]]
    # its own k when the request says nothing, none at all with best_of 1
    plain = served.post("/v1/completions", json={"model": "poet-picky", "prompt": "春", "max_tokens": 8, "seed": 5})
    assert served.get(f"/v1/generations/{plain.json()['id']}").json()["rerank"]["best_of"] == 3
    off = served.post("/v1/completions", json={"model": "poet-picky", "prompt": "春", "max_tokens": 8, "seed": 5,
                                               "best_of": 1})
    assert served.get(f"/v1/generations/{off.json()['id']}").json()["rerank"] is None


def test_each_image_of_a_best_of_generation_keeps_its_own_choice_and_replays_alone(served, home, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(home))
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        made = service.generate("digits", {"n": 6, "class_": "3"}, seed=0)
        for i, gen in enumerate(service.record(made, db, source="api", request={"prompt": "3"})):
            db.add_rating(gen, score=1 if i % 2 else -1)
        service.optimize("digits", "rerank", name="digits-picky", sets={"eval_samples": "0"}, db=db)
    # an image rerank run keeps the first liked of 3 by default (text runs: the best of 4; docs/optimize.md has the
    # measurement)
    assert {c["name"]: c for c in served.get("/v1/models/digits-picky/controls").json()["controls"]}["best_of"][
        "default"] == 3
    answer = served.post("/v1/images/generations", json={"model": "digits-picky", "prompt": "3", "n": 2, "seed": 9,
                                                         "response_format": "b64_json"}).json()
    rows = [served.get(f"/v1/generations/{d['generation_id']}").json() for d in answer["data"]]
    assert [r["rerank"]["best_of"] for r in rows] == [3, 3] and [r["rerank"]["candidates"] for r in rows] == [6, 6]
    assert [r["rerank"]["chosen"][0] // 3 for r in rows] == [0, 1]  # image i: one of candidates 3i .. 3i + 2
    assert [r["seed"] for r in rows] == [9 + r["rerank"]["chosen"][0] for r in rows]  # the kept candidate's seed
    for datum, row in zip(answer["data"], rows, strict=True):
        replay = served.get(f"/v1/generations/{row['id']}/replay").json()
        assert replay["body"]["best_of"] == 1  # alone at its own seed: not the first liked of 3 again
        again = served.post(replay["endpoint"], json=replay["body"]).json()["data"][0]["b64_json"]
        assert np.array_equal(pixels(again), pixels(datum["b64_json"]))  # the pixels (the PNGs' records differ)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_a_method_offered_starts_and_a_second_start_is_told_the_run_is_being_made(served, home):
    made = served.post("/v1/completions", json={"model": "tiny", "prompt": "月", "n": 2, "max_tokens": 6, "seed": 8})
    for index, score in ((0, 1), (1, -1)):
        served.post(f"/v1/generations/{made.json()['id']}/ratings", json={"score": score, "index": index})
    assert {m["method"]: m for m in served.get("/v1/models/tiny/feedback").json()["methods"]}["rerank"]["available"]
    body = {"model": "tiny", "method": "rerank", "name": "tiny-rerank", "sets": {"eval_samples": "0"}}
    started = served.post("/v1/optimizations", json=body)
    assert started.status_code == 200, started.text
    again = served.post("/v1/optimizations", json=body)  # while the first one's process starts
    assert again.status_code == 409
    assert again.json()["error"]["message"] == (f"run 'tiny-rerank' is being made by aigc optimize (job "
                                                f"{started.json()['id']})")
    job = started.json()
    deadline = time.monotonic() + 300
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        job = served.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "done", job
    assert "best_of" in {c["name"] for c in served.get("/v1/models/tiny-rerank/controls").json()["controls"]}
