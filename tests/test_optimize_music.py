"""`aigc optimize` on music runs (docs/optimize.md): a scripted listener rates pieces of a tiny model trained on Bach
chorales, and sft, dpo and rerank each make a run whose fresh pieces that listener likes clearly more, while the
NLL per token on the parent's validation pieces stays near the parent's.

The taste here (pieces whose mean pitch is high: above the median of the parent's rated pieces) is read from the
notes; nothing in aigc.optimize knows it."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter

import pytest
from tests.conftest import TINY_SETS

from aigc import service, store
from aigc.data import music as m
from aigc.db import Store
from aigc.optimize import feedback as fb

BARS = 2  # bars of each rated and fresh piece
pytestmark = pytest.mark.slow  # the tiny gpt trains 300 steps (fewer: its pieces end early and are continued slowly)


def mean_pitch(output: dict) -> float:
    notes = m.decode(output["tokens"].split()).notes
    return statistics.fmean(pitch for _, _, pitch in notes) if notes else 0.0


def significantly_higher(before: float, after: float, n: int) -> bool:
    """A one-sided two-proportion z-test at 97.5%: after - before > 1.96 standard errors."""
    pooled = (before + after) / 2
    return after - before > 1.96 * math.sqrt(pooled * (1 - pooled) * 2 / n)


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """A tiny gpt and an n-gram on 8 chorales (transposed by up to 3 semitones), 200 pieces of each rated by the
    listener: liked when the piece's mean pitch is above the median of the 200."""
    home = tmp_path_factory.mktemp("music-optimize")
    folder = home / "midi"
    folder.mkdir()
    for piece in m.bach_chorales(limit=8):
        (folder / f"{piece.name}.mid").write_bytes(m.midi_bytes(piece))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        data = {"val_fraction": "0.25", "transpose": "3"}
        service.train("gpt", str(folder), name="gpt", max_steps=300,  # fewer: pieces end early, continued slowly
                      sets={**TINY_SETS["gpt"], **data, "n_embd": "32", "n_positions": "128", "block_size": "64",
                            "batch_size": "8", "eval_interval": "100", "lr": "3e-3"})
        service.train("ngram", str(folder), name="ngram", sets={**data, "max_order": "4"})
        thresholds = {}
        with Store() as db:
            for family in ("gpt", "ngram"):
                made = [service.generate(family, {"n": 50, "bars": BARS}, seed=i) for i in range(4)]
                thresholds[family] = statistics.median(mean_pitch(o) for g in made for o in g.outputs)
                for generation in made:
                    gen_id = service.record(generation, db, source="api", request={"n": 50, "bars": BARS})[0]
                    for index, output in enumerate(generation.outputs):
                        liked = mean_pitch(output) > thresholds[family]
                        db.add_rating(gen_id, score=1 if liked else -1, index=index)
        yield home, thresholds


def share_liked(run: str, threshold: float, **options) -> float:
    outputs = [o for seed in (7000, 7001) for o in
               service.generate(run, {"n": 100, "bars": BARS, **options}, seed=seed).outputs]
    assert len(outputs) == 200
    return sum(mean_pitch(o) > threshold for o in outputs) / len(outputs)


def test_music_feedback_reads_pieces_as_their_tokens(rated, monkeypatch):
    home, _ = rated
    monkeypatch.setenv("AIGC_HOME", str(home))
    with Store() as db:
        feedback = fb.collect(db, "gpt", "music")
    assert len(feedback.rated) == 200 and 90 <= len(feedback.liked) <= 110
    with Store() as db:
        pieces = {(g["id"], i): o["tokens"] for g in db.list_generations(run="gpt", limit=10)
                  for i, o in enumerate(g["output"])}
    assert all(r.prompt == "" and r.output == pieces[r.generation_id, r.index] for r in feedback.rated)
    # pieces have no prompt: one group, its pairs spread over the liked and disliked pieces
    assert len(feedback.pairs) == fb.MAX_PAIRS_UNPROMPTED and all(p.source == "ratings" for p in feedback.pairs)
    assert max(Counter(p.chosen for p in feedback.pairs).values()) <= 2
    assert max(Counter(p.rejected for p in feedback.pairs).values()) <= 2


@pytest.mark.parametrize("family, method, sets, tolerance", [
    ("gpt", "sft", {"lr": "1e-3", "batch_size": "16"}, 0.15),
    ("gpt", "dpo", {"lr": "3e-4", "batch_size": "16"}, 0.1),
    ("gpt", "rerank", {}, 0.0),
    ("ngram", "sft", {}, 0.15),
    ("ngram", "rerank", {}, 0.0)])
def test_one_round_of_ratings_makes_a_music_run_the_listener_likes_more(rated, monkeypatch, family, method, sets,
                                                                         tolerance):
    home, thresholds = rated
    monkeypatch.setenv("AIGC_HOME", str(home))
    run_dir, metrics = service.optimize(family, method, sets={**sets, "eval_samples": "48"})

    before, after = share_liked(family, thresholds[family]), share_liked(run_dir.name, thresholds[family])
    print(f"music {family} {method}: liked {before:.3f} -> {after:.3f}, NLL per token {metrics['parent_val_loss']:.4f}"
          f" -> {metrics['val_loss']:.4f}, judged {metrics['liked_share_before']:.3f} -> "
          f"{metrics['liked_share_after']:.3f}")
    assert significantly_higher(before, after, 200), (before, after)
    # held-out NLL per token on the parent's validation pieces stays near the parent's
    parent = store.read_run(home / "runs" / family)
    assert metrics["parent_val_loss"] == parent["metrics"]["val_loss"]
    assert metrics["val_loss"] <= parent["metrics"]["val_loss"] * (1 + tolerance) + 1e-9
    # before and after as the judge sees 48 fresh pieces of each (of as many bars as the rated ones)
    assert metrics["judged_samples"] == 48 and metrics["judged_prompts"] == 1
    assert metrics["liked_share_after"] > metrics["liked_share_before"]
    card = (run_dir / "README.md").read_text("utf-8")
    assert f"--method {method}" in card and "NLL per token on the same validation pieces" in card
    record = store.read_run(run_dir)
    assert record["modality"] == "music" and record["encoding"] == parent["encoding"]
    assert record["optimize"]["feedback"]["liked"] + record["optimize"]["feedback"]["disliked"] == 200
    if method == "rerank":  # the parent's weights, a reward beside them; best_of 1 gives the parent's pieces
        assert service.weights_sha256(run_dir) == service.weights_sha256(home / "runs" / family)
        assert json.loads((run_dir / "reward.json").read_text())["features"] == \
            ("tokens:512" if family == "ngram" else "hidden:gpt")
        options = {"n": 3, "bars": BARS}
        assert service.generate(run_dir.name, {**options, "best_of": 1}, seed=3).outputs == \
            service.generate(family, options, seed=3).outputs
        picked = service.generate(run_dir.name, options, seed=3)
        assert picked.record["rerank"]["candidates"] == 12 and len(picked.outputs) == 3
        assert service.generation_defaults(run_dir.name)["best_of"] == 4
