"""`aigc optimize --method rerank` on series runs (docs/optimize.md): a scripted analyst rates the sample paths of
forecasts and likes those that end higher than they start; the rerank run's best-of-k paths are liked clearly more
often, its point forecast stays the parent's, and best of k is the by-hand choice of the parent's own paths.

Nothing in aigc.optimize knows that taste: the reward reads summary statistics of any path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aigc import service, store
from aigc.db import Store
from aigc.errors import BadRequest
from aigc.optimize import feedback as fb
from aigc.optimize.rerank import PATH_FEATURES, path_features
from aigc.optimize.reward import Reward

HORIZON = 12


def likes(path: list[float]) -> bool:
    return path[-1] > path[0]


def significantly_higher(before: float, after: float, n: int) -> bool:
    pooled = (before + after) / 2
    return after - before > 1.96 * math.sqrt(pooled * (1 - pooled) * 2 / n)


@pytest.fixture
def rated(aigc_home):
    """An AR run on sunspots and 4 forecasts of 50 paths each, every path rated by the analyst."""
    service.train("ar", "sunspots", name="spots")
    with Store() as db:
        for seed in range(4):
            made = service.generate("spots", {"horizon": HORIZON, "paths": 50}, seed=seed)
            gen_id = service.record(made, db, source="api", request={"horizon": HORIZON, "paths": 50})[0]
            for index, path in enumerate(made.outputs["paths"]):
                db.add_rating(gen_id, score=1 if likes(path) else -1, index=index)
    return aigc_home


def test_path_features_are_the_summary_statistics_in_the_series_units():
    series = torch.tensor([0.0, 2.0, 4.0]).numpy()  # last 4, std sqrt(8/3)
    scale = math.sqrt(8 / 3)
    [row] = path_features(series, [[5.0, 7.0, 6.0]]).tolist()
    y = [(v - 4.0) / scale for v in (5.0, 7.0, 6.0)]
    features = dict(zip(PATH_FEATURES, row, strict=True))
    assert features["end"] == pytest.approx(y[2]) and features["start"] == pytest.approx(y[0])
    assert features["end_minus_start"] == pytest.approx(y[2] - y[0])
    assert features["slope"] == pytest.approx((y[2] - y[0]) / 2)  # least squares through three points
    assert features["mean_abs_step"] == pytest.approx((abs(y[0]) + abs(y[1] - y[0]) + abs(y[2] - y[1])) / 3)
    assert path_features(series, [json.dumps([5.0, 7.0, 6.0])]).tolist() == [row]  # as feedback keeps a path
    with pytest.raises(BadRequest, match="finite numbers"):
        path_features(series, [[1.0, float("nan")]])


def test_rerank_on_a_series_run_keeps_paths_the_analyst_likes(rated):
    with Store() as db:
        feedback = fb.collect(db, "spots", "series")
    assert len(feedback.rated) == 200 and feedback.liked and feedback.disliked
    run_dir, metrics = service.optimize("spots", "rerank", name="spots-up", sets={"eval_samples": "64"})
    parent = store.read_run(store.runs_dir() / "spots")
    assert service.weights_sha256(run_dir) == service.weights_sha256(store.runs_dir() / "spots")
    kept = {k: v for k, v in parent["metrics"].items() if k not in ("steps", "train_time_s")}
    assert kept and {k: metrics[k] for k in kept} == kept  # the same model: the parent's back-test
    assert metrics["liked_share_after"] > metrics["liked_share_before"] and metrics["judged_samples"] == 64
    assert json.loads((run_dir / "reward.json").read_text())["features"] == "path-statistics"

    options = {"horizon": HORIZON, "paths": 100}
    before = [likes(p) for seed in (900, 901) for p in service.generate("spots", options, seed=seed).outputs["paths"]]
    after = [likes(p) for seed in (900, 901) for p in service.generate("spots-up", options, seed=seed).outputs["paths"]]
    assert significantly_higher(sum(before) / 200, sum(after) / 200, 200), (sum(before), sum(after))

    # best of 4 by hand: the parent's 12 paths at the same seed, scored by the reward, the best of each 4
    picked = service.generate("spots-up", {"horizon": HORIZON, "paths": 3}, seed=5)
    drawn = service.generate("spots", {"horizon": HORIZON, "paths": 12}, seed=5)
    scores = Reward.load(run_dir).score(path_features(service.load("spots").series.values, drawn.outputs["paths"]))
    expected = [drawn.outputs["paths"][4 * g + int(scores[4 * g:4 * g + 4].argmax())] for g in range(3)]
    assert picked.outputs["paths"] == expected
    assert picked.outputs["forecast"] == drawn.outputs["forecast"]  # the point forecast is the model's
    assert picked.record["settings"]["best_of"] == 4 and picked.extra["sampled"].shape == (3, HORIZON)
    # a forecast without paths has nothing to choose: the run's own k is not applied; asked for, it is refused
    assert "paths" not in service.generate("spots-up", {"horizon": HORIZON}, seed=0).outputs
    with pytest.raises(BadRequest, match="chooses among sample paths"):
        service.generate("spots-up", {"horizon": HORIZON, "best_of": 2}, seed=0)
    with pytest.raises(BadRequest, match="--method sft takes text, image and music runs; 'spots' is a series run"):
        service.optimize("spots", "sft")
