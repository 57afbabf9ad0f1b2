"""The studio's /v1 endpoints over a real server (httpx): what the pages call, any application can call too.
Generation controls come from the API's own declaration; a preview is not recorded; a replay makes the same
text, the same pixels and the same forecast; a battle hides its runs until its vote; uploads have their own
cap; training runs as a job."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from tests.test_server import start_server, stop_server, train_runs

from aigc.server import schemas

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("workbench")
    train_runs(home, ("poet", "poet3", "digits", "digits2", "sun"))
    proc, url = start_server(home, "--max-upload-mb", "1")
    with httpx.Client(base_url=url, timeout=120) as client:
        yield home, client
    stop_server(proc)


def test_controls_are_the_api_declaration_with_the_service_defaults(served):
    _, client = served
    spec = client.get("/v1/models/poet/controls").json()
    by_name = {c["name"]: c for c in spec["controls"]}
    declared = schemas.CompletionRequest.model_fields
    assert by_name["max_tokens"]["maximum"] == declared["max_tokens"].metadata[1].le == schemas.MAX_TOKENS
    assert by_name["temperature"]["default"] == 0.8 and by_name["max_tokens"]["default"] == 100
    assert by_name["top_p"]["exclusiveMinimum"] == 0 and by_name["top_p"]["advanced"]
    images = client.get("/v1/models/digits/controls").json()
    assert images["classes"] == [str(i) for i in range(10)]
    assert [c["name"] for c in images["controls"]] == ["n"]  # a VAE has no sampler options
    series = {c["name"]: c for c in client.get("/v1/models/sun/controls").json()["controls"]}
    assert series["level"]["default"] == 0.95 and series["noise"]["choices"] == ["gaussian", "bootstrap"]


def test_details_and_a_preview_that_is_not_recorded(served):
    _, client = served
    details = client.get("/v1/models/digits/details").json()
    assert details["curve"] and {"step", "loss"} <= set(details["curve"][0])
    assert details["metrics"]["val_nelbo"] == details["score"]["value"]
    png = next(f for f in details["files"] if f.endswith(".png"))
    assert client.get(f"/v1/models/digits/files/{png}").headers["content-type"] == "image/png"
    assert client.get("/v1/models/digits/files/../../aigc.db").status_code == 404
    assert client.get("/v1/models/digits/files/manifest.json").status_code in (200, 404)
    before = client.get("/v1/generations").json()["total"]
    preview = client.get("/v1/models/poet/preview").json()
    assert len(preview["texts"]) == 3
    again = client.get("/v1/models/poet/preview").json()
    assert again == preview  # seed 0, cached by the weights
    forecast = client.get("/v1/models/sun/preview").json()["forecast"]
    assert len(forecast["forecast"]) == 24 and len(forecast["paths"]) == 20 and forecast["history"]["values"]
    assert client.get("/v1/generations").json()["total"] == before


def test_replay_makes_the_same_text_pixels_and_forecast(served):
    _, client = served
    text = client.post("/v1/completions", json={"model": "poet", "prompt": "春", "max_tokens": 20, "seed": 7,
                                                "temperature": 1.1, "top_k": 5}).json()
    image = client.post("/v1/images/generations", json={"model": "digits", "prompt": "3", "n": 2, "seed": 11,
                                                        "response_format": "b64_json"}).json()
    forecast = client.post("/v1/forecasts", json={"model": "sun", "horizon": 6, "paths": 3, "seed": 5}).json()
    replay = client.get(f"/v1/generations/{text['generation_id']}/replay").json()
    assert replay["body"]["top_k"] == 5 and "--top-k 5" in replay["cli"] and "--seed 7" in replay["cli"]
    made = client.post(replay["endpoint"], json=replay["body"]).json()
    assert made["choices"][0]["text"] == text["choices"][0]["text"]
    second = image["data"][1]  # the second image of two: its own seed
    replay = client.get(f"/v1/generations/{second['generation_id']}/replay").json()
    made = client.post(replay["endpoint"], json=replay["body"]).json()

    def pixels(b64: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))

    assert np.array_equal(pixels(made["data"][0]["b64_json"]), pixels(second["b64_json"]))
    replay = client.get(f"/v1/generations/{forecast['generation_id']}/replay").json()
    assert client.post(replay["endpoint"], json=replay["body"]).json()["forecast"] == forecast["forecast"]


def test_a_battle_hides_its_runs_until_the_vote_and_the_leaderboard_counts_it(served):
    _, client = served
    battle = client.post("/v1/arena/battles", json={"modality": "text", "prompt": "月", "seed": 3}).json()
    assert "run" not in battle["left"] and battle["left"]["texts"] and battle["vote"] is None
    shown = client.get(f"/v1/arena/battles/{battle['id']}").json()
    assert "run" not in shown["right"]
    voted = client.post(f"/v1/arena/battles/{battle['id']}/vote", json={"winner": "right"}).json()
    assert {voted["left"]["run"], voted["right"]["run"]} == {"poet", "poet3"} and voted["vote"]["winner"] == "right"
    again = client.post(f"/v1/arena/battles/{battle['id']}/vote", json={"winner": "left"})
    assert again.status_code == 409
    board = client.get("/v1/arena/leaderboard", params={"modality": "text"}).json()
    top = board["data"][0]
    assert top["run"] == voted["right"]["run"] and top["votes"] == 1 and top["lower"] <= top["rating"] <= top["upper"]
    assert top["metric"]["metric"] == "val_bpc"
    # an image battle: both conditional runs draw the class, at the same seed
    drawn = client.post("/v1/arena/battles", json={"modality": "image", "prompt": "3", "seed": 1}).json()
    for side in ("left", "right"):
        png = client.get(drawn[side]["images"][0])
        assert png.headers["content-type"] == "image/png"
    voted = client.post(f"/v1/arena/battles/{drawn['id']}/vote", json={"winner": "tie"}).json()
    assert {voted["left"]["run"], voted["right"]["run"]} == {"digits", "digits2"}
    lonely = client.post("/v1/arena/battles", json={"modality": "image", "prompt": "giraffe"})
    assert lonely.status_code == 409 and "two finished image runs" in lonely.json()["error"]["message"]
    assert client.post("/v1/arena/battles/battle-nope/vote", json={"winner": "tie"}).status_code == 404
    assert client.post(f"/v1/arena/battles/{battle['id']}/vote", json={"winner": "both"}).status_code == 400


def test_uploads_have_their_own_cap_and_training_runs_as_a_job(served):
    home, client = served
    datasets = client.get("/v1/datasets").json()
    assert {"tang300", "digits", "sunspots"} <= {d["name"] for d in datasets["data"]}
    big = client.post("/v1/uploads", params={"kind": "text", "filename": "big.txt"}, content=b"a" * (2 * 2**20))
    assert big.status_code == 413 and "1 MB" in big.json()["error"]["message"]
    poems = (home / "poems.txt").read_bytes()
    upload = client.post("/v1/uploads", params={"kind": "text", "filename": "mine.txt"}, content=poems)
    assert upload.status_code == 200, upload.text
    upload = upload.json()
    assert upload["summary"]["characters"] > 0
    assert client.post("/v1/training", json={"family": "ngram", "data": "/etc/passwd"}).status_code == 400
    job = client.post("/v1/training", json={"family": "ngram", "data": upload["id"], "name": "fitted"}).json()
    twice = client.post("/v1/training", json={"family": "ngram", "data": upload["id"], "name": "fitted"})
    assert twice.status_code == 409 and "fitted" in twice.json()["error"]["message"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "done", done
    assert "fitted" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    evaluation = client.post("/v1/evaluations", json={"model": "fitted"}).json()
    while client.get(f"/v1/jobs/{evaluation['id']}").json()["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get(f"/v1/jobs/{evaluation['id']}").json()["status"] == "done"
    assert client.get("/v1/models/fitted/details").json()["eval"]["val_bpc"] > 0
