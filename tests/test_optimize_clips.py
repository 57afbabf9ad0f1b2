"""`aigc optimize --method rerank` on clip-generating video runs and on sound runs (docs/optimize.md): a scripted
viewer rates 200 clips (a listener 200 sounds) of a tiny run and likes the bright ones (the loud ones); the rerank
run's best-of-3 outputs are liked clearly more often, they are the by-hand first-liked of the parent's own at the
same seed, and the rated outputs are read back as their records and made again by the run.

Nothing in aigc.optimize knows either taste: the reward reads summary statistics and the clip net's features of a
clip, and the evaluation feature net's features of a spectrogram."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tests import test_sounds
from tests.test_sounds import TINY as SOUND_TINY
from tests.test_video import TINY as VIDEO_TINY
from tests.test_video import TINY_MODEL

from aigc import service, store
from aigc.db import Store
from aigc.errors import BadRequest
from aigc.optimize import feedback as fb
from aigc.optimize import rerank
from aigc.optimize.reward import Reward, best_of

RATED = 200
hits = test_sounds.hits  # the fixture: two classes of six hits, written by that test module


def significantly_higher(before: float, after: float, n: int) -> bool:
    pooled = (before + after) / 2
    return after - before > 1.96 * math.sqrt(pooled * (1 - pooled) * 2 / n)


def brightness(pixels: np.ndarray) -> float:
    return float(pixels.astype(np.float64).mean())


def rate_all(run: str, options: dict, pixels_of) -> float:
    """RATED outputs of `run` in 4 generations, each rated by whether it is brighter than the median of them all;
    returns that median (the taste's threshold)."""
    made = [service.generate(run, {**options, "n": RATED // 4}, seed=1000 * g) for g in range(4)]
    threshold = float(np.median([brightness(pixels_of(o)) for m in made for o in m.outputs]))
    with Store() as db:
        for generation in made:
            gen_id = service.record(generation, db, source="api", request={"n": RATED // 4})[0]
            for index, output in enumerate(generation.outputs):
                db.add_rating(gen_id, score=1 if brightness(pixels_of(output)) > threshold else -1, index=index)
    return threshold


def check_rerank(run: str, modality: str, options: dict, pixels_of, threshold: float) -> None:
    """The rerank run likes what the viewer likes, picks as the by-hand oracle, and keeps the parent's weights."""
    with Store() as db:
        feedback = fb.collect(db, run, modality)
    assert len(feedback.rated) == RATED and feedback.liked and feedback.disliked
    rec = json.loads(feedback.rated[0].output)  # a rated output is its record, made again by the run
    assert rec["seed"] == 0 and rec["run"] == str(store.runs_dir() / run)
    first = service.generate(run, {**options, "n": 1}, seed=0).outputs[0]
    assert np.array_equal(pixels_of(rerank._remade(modality, service.load(run), rec)), pixels_of(first))

    run_dir, metrics = service.optimize(run, "rerank", name=f"{run}-bright", sets={"eval_samples": "32"})
    assert service.weights_sha256(run_dir) == service.weights_sha256(store.runs_dir() / run)
    assert metrics["liked_share_after"] > metrics["liked_share_before"] and metrics["judged_samples"] == 32
    reward = Reward.load(run_dir)
    assert reward.info["best_of"] == 3 and reward.info["pick"] == "first-liked"
    assert reward.info["features"] == ("clip-statistics+clip-net" if modality == "video" else "evaluation-features")

    liked = {side: sum(brightness(pixels_of(o)) > threshold for seed in (900, 950)  # sounds: at most 64 a request
                       for o in service.generate(side, {**options, "n": 50}, seed=seed).outputs)
             for side in (run, run_dir.name)}
    assert significantly_higher(liked[run] / 100, liked[run_dir.name] / 100, 100), liked

    # first-liked of 3 by hand: the parent's 6 outputs at the same seed, scored by the reward
    picked = service.generate(run_dir.name, {**options, "n": 2}, seed=5)
    drawn = service.generate(run, {**options, "n": 6}, seed=5)
    scores = reward.score(rerank.features_of(modality, service.load(run), [""] * 6, drawn.outputs))
    chosen = best_of(scores, 2, 3, "first-liked")
    assert all(np.array_equal(pixels_of(picked.outputs[i]), pixels_of(drawn.outputs[c]))
               for i, c in enumerate(chosen))
    records = picked.record["clips" if modality == "video" else "sounds"]
    assert [r["seed"] for r in records] == [5 + c for c in chosen] and all(r["best_of"] == 3 for r in records)
    plain = service.generate(run_dir.name, {**options, "n": 2, "best_of": 1}, seed=5)  # off: the parent's own
    pairs = zip(plain.outputs, drawn.outputs[:2], strict=True)
    assert all(np.array_equal(pixels_of(a), pixels_of(b)) for a, b in pairs)
    with pytest.raises(BadRequest, match="--method sft takes"):
        service.optimize(run, "sft")


def test_rerank_on_a_clip_generator_keeps_clips_the_viewer_likes(one_thread):
    service.train("vae", "moving-digits", name="clips", max_steps=6, sets={**VIDEO_TINY, **TINY_MODEL["vae"]})
    threshold = rate_all("clips", {}, lambda clip: clip)
    check_rerank("clips", "video", {}, lambda clip: clip, threshold)

    # the API takes best_of for clips, and a predictor is refused: it has nothing to choose among
    service.train("simvp", "moving-digits", name="pred", max_steps=2,
                  sets={**VIDEO_TINY, **TINY_MODEL["simvp"], "val_clips": "4"})
    with pytest.raises(BadRequest, match="predicts the frames of a given clip"):
        service.optimize("pred", "rerank")
    with pytest.raises(BadRequest, match="needs a reward model"):
        service.generate("pred", {"n": 1, "best_of": 2}, seed=0)


def test_the_api_makes_best_of_k_clips(one_thread):
    from fastapi.testclient import TestClient

    from aigc.server.app import ServerConfig, create_app

    service.train("vae", "moving-digits", name="clips", max_steps=4, sets={**VIDEO_TINY, **TINY_MODEL["vae"]})
    rate_all("clips", {}, lambda clip: clip)
    service.optimize("clips", "rerank", name="picky", sets={"eval_samples": "4"})
    home = store.runs_dir().parent
    app_ = create_app(ServerConfig(runs=store.runs_dir(), database=f"sqlite:///{home}/aigc.db", rate_limit=0))
    with TestClient(app_) as client:
        made = client.post("/v1/videos/generations", json={"model": "picky", "n": 2, "seed": 5})
        assert made.status_code == 200, made.text
        by_hand = service.generate("picky", {"n": 2}, seed=5)
        assert [d["record"]["seed"] for d in made.json()["data"]] == [r["seed"] for r in by_hand.record["clips"]]
        assert all(d["record"]["best_of"] == 3 for d in made.json()["data"])
        off = client.post("/v1/videos/generations", json={"model": "picky", "n": 2, "seed": 5, "best_of": 1})
        assert [d["record"]["seed"] for d in off.json()["data"]] == [5, 6]
        refused = client.post("/v1/videos/generations", json={"model": "clips", "n": 1, "best_of": 2})
        assert refused.status_code == 400 and "needs a reward model" in refused.text


def test_rerank_on_a_sound_run_keeps_sounds_the_listener_likes(hits, one_thread):
    service.train("vae", str(hits), name="hits", max_steps=3, sets={**SOUND_TINY, "z_dim": "4", "base_channels": "8"})
    spectrogram = lambda o: o["spectrogram"] if isinstance(o, dict) else o  # noqa: E731
    threshold = rate_all("hits", {}, spectrogram)
    check_rerank("hits", "sound", {}, spectrogram, threshold)


def test_clip_statistics_against_a_hand_made_clip():
    clip = np.zeros((1, 3, 5, 5, 1), np.uint8)
    for t in range(3):
        clip[0, t, 2, t + 1] = 255  # one bright pixel moving right one pixel a frame
    [row] = rerank.clip_statistics(clip).double().tolist()
    assert len(row) == rerank.CLIP_STATISTICS
    stats = row[16:]
    assert stats[0] == pytest.approx(1 / 25) and stats[1] == pytest.approx(1 / 25)  # first, last brightness
    assert stats[3:7] == pytest.approx([0.5, 0.25, 0.5, 0.75])  # centre (y, x) at the first and the last frame
    assert stats[7] == pytest.approx(0.25)  # a quarter of the frame per frame
    assert stats[9] == pytest.approx(2 / 25)  # two pixels change from one frame to the next
    assert stats[2] == pytest.approx(1 / 25) and row[:16] != [0.0] * 16
