"""`aigc optimize --from-feedback` (aigc.optimize, docs/optimize.md): the feedback read from the store, the sft and
dpo objectives against their formulas, and the loop closed end to end: a scripted user rates a tiny model's
outputs, optimize makes a new run, and the share of outputs that user likes rises while bits per character stays
near the parent's.

The scripted taste here (likes a completion with 山) is not the benchmark's (月, benchmarks/feedback.py): nothing
in optimize may know either."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import TINY_SETS, make_model, make_poems
from typer.testing import CliRunner

from aigc import service, store
from aigc.cli import app
from aigc.data.tokenizer import TextTokenizer, train_char
from aigc.db import Store
from aigc.errors import BadRequest, Conflict, UserError
from aigc.optimize import feedback as fb
from aigc.optimize.reward import Reward, features
from aigc.optimize.text import dpo_loss, encode_example, padded, sequence_logp

PROMPTS = ("《诗", "春", "江", "月")  # the rated prompts; fresh samples use other seeds of the same prompts


def likes(prompt: str, text: str) -> bool:
    return "山" in text[len(prompt):]


# ----------------------------------------------------------------------------------
# the objectives


def test_dpo_loss_is_the_formula_on_hand_computed_log_probabilities():
    pc, pr = torch.tensor([-3.0, -10.0, -2.5]), torch.tensor([-4.0, -9.0, -2.5])
    rc, rr = torch.tensor([-3.5, -9.5, -3.0]), torch.tensor([-3.5, -9.5, -2.0])
    beta = 0.5
    expected = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
        margin = (a - c) - (b - d)  # 1.0, -0.5, 1.0
        expected.append(-math.log(1 / (1 + math.exp(-beta * margin))))
    assert dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # at the reference the loss is log 2, whatever beta
    assert dpo_loss(rc, rr, rc, rr, 3.0).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("family", ["gpt", "rnn"])
def test_sequence_logp_sums_the_completion_tokens_only(family):
    tokenizer = train_char(make_poems())
    model = make_model(family, tokenizer.encode_docs(make_poems()), tokenizer).eval()
    examples = [encode_example(tokenizer, "春", "春江花月夜", 64),
                encode_example(tokenizer, "《诗", "《诗1》\n山水", 64),
                encode_example(tokenizer, "", "风云", 64)]
    assert examples[0] == ([tokenizer.eot_id, *tokenizer.encode("春江花月夜")], 2)
    x, y = padded(examples)
    got = sequence_logp(model, x, y)
    for row, (ids, start) in enumerate(examples):
        alone = torch.tensor([ids])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=alone).logits[0].float(), dim=-1)
        by_hand = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))  # the completion's tokens
        assert got[row].item() == pytest.approx(by_hand, abs=1e-4)


def test_an_example_is_cut_to_the_context():
    tokenizer = train_char(make_poems())
    ids, start = encode_example(tokenizer, "春", "春" + "江" * 100, 17)
    assert len(ids) == 17 and start == 2


# ----------------------------------------------------------------------------------
# the feedback read from the store


def _text_generation(db: Store, run: str, prompt: str, texts: list[str]) -> str:
    return db.add_generation(run=run, modality="text", source="api", request={"prompt": prompt}, output=texts,
                             latency_s=0.1)


def test_feedback_sums_ratings_and_makes_pairs_from_ratings_and_votes(aigc_home):
    with Store() as db:
        a = _text_generation(db, "poet", "春", ["春山好", "春水", "春天"])
        db.add_rating(a, score=1, index=0)
        db.add_rating(a, score=1, index=0)  # weight 2
        db.add_rating(a, score=-1, index=1)
        db.add_rating(a, score=0, stars=5, index=2)  # a neutral rating with 5 stars counts as good
        b = _text_generation(db, "poet", "江", ["江山"])
        db.add_rating(b, score=1)  # no index on a one-output generation: that output
        other = _text_generation(db, "rival", "江", ["江水"])
        db.add_rating(other, score=1)  # another run's rating is not this run's feedback
        db.add_vote(b, other, "right", prompt="江")
        db.add_vote(b, other, "tie", prompt="江")  # says nothing about order
        found = fb.collect(db, "poet")
        rating_ids = {r["id"] for g in db.list_generations(run="poet") for r in g["ratings"]}
    assert [(r.output, r.score) for r in found.liked] == [("春山好", 2), ("春天", 1), ("江山", 1)]
    assert [(r.output, r.score) for r in found.disliked] == [("春水", -1)]
    assert [(p.prompt, p.chosen, p.rejected, p.source) for p in found.pairs] == [
        ("春", "春山好", "春水", "ratings"), ("春", "春天", "春水", "ratings"), ("江", "江水", "江山", "vote")]
    snap = found.snapshot()
    assert set(snap["rating_ids"]) == rating_ids and len(snap["vote_ids"]) == 1
    assert (snap["liked"], snap["disliked"], snap["pairs"]) == (3, 1, 3)
    with Store() as db:
        assert fb.collect(db, "poet").snapshot() == snap  # the same store, the same snapshot
        db.add_rating(b, score=-1)  # now 江山 is neutral (+1 - 1)
        changed = fb.collect(db, "poet").snapshot()
    assert changed["sha256"] != snap["sha256"] and changed["liked"] == 2


def test_each_method_says_what_feedback_it_lacks(aigc_home):
    with Store() as db:
        a = _text_generation(db, "poet", "春", ["春山", "春水"])
        db.add_rating(a, score=-1, index=1)
        found = fb.collect(db, "poet")
    with pytest.raises(BadRequest, match="sft learns from liked outputs"):
        fb.require(found, "sft")
    with pytest.raises(BadRequest, match="dpo learns from pairs"):
        fb.require(found, "dpo")
    with pytest.raises(BadRequest, match="rerank needs liked and disliked"):
        fb.require(found, "rerank")


# ----------------------------------------------------------------------------------
# the loop, end to end


def share_liked(run: str, seed: int, n: int) -> tuple[float, int]:
    liked = total = 0
    for i, prompt in enumerate(PROMPTS):
        for text in service.generate(run, {"prompt": prompt, "n": n, "max_new_tokens": 12}, seed=seed + i).outputs:
            liked, total = liked + likes(prompt, text), total + 1
    return liked / total, total


def significantly_higher(before: float, after: float, n: int) -> bool:
    """A one-sided two-proportion z-test at 97.5%: after - before > 1.96 standard errors."""
    pooled = (before + after) / 2
    return after - before > 1.96 * math.sqrt(pooled * (1 - pooled) * 2 / n)


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """Tiny gpt, rnn and n-gram parents on 200 poems, 200 outputs of each rated by the scripted user."""
    home = tmp_path_factory.mktemp("optimize")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        poems = home / "poems.txt"
        poems.write_text("\n%\n".join(make_poems(200)) + "\n", encoding="utf-8")
        bigger = {"gpt": {"n_embd": "32"}, "rnn": {"n_hidden": "64", "n_embd": "32"}}
        with Store() as db:
            for family in ("gpt", "rnn", "ngram"):
                if family == "ngram":  # counted: no steps
                    service.train(family, str(poems), name=family, sets={"order": "3"})
                else:
                    service.train(family, str(poems), name=family, max_steps=150,
                                  sets={**TINY_SETS[family], "eval_interval": "50", **bigger[family]})
                for i, prompt in enumerate(PROMPTS):
                    made = service.generate(family, {"prompt": prompt, "n": 50, "max_new_tokens": 12}, seed=i)
                    gen_id = service.record(made, db, source="api", request={"prompt": prompt})[0]
                    for index, text in enumerate(made.outputs):
                        db.add_rating(gen_id, score=1 if likes(prompt, text) else -1, index=index)
        yield home


@pytest.mark.slow
@pytest.mark.parametrize("family, method, lr, tolerance", [
    ("gpt", "sft", "3e-4", 0.15), ("gpt", "dpo", "3e-4", 0.5), ("gpt", "rerank", None, 0.0),
    ("rnn", "sft", "1e-3", 0.15), ("rnn", "dpo", "1e-3", 0.7), ("rnn", "rerank", None, 0.0),
    ("ngram", "sft", None, 0.15)])
def test_one_round_of_ratings_makes_a_run_the_user_likes_more(rated, monkeypatch, family, method, lr, tolerance):
    monkeypatch.setenv("AIGC_HOME", str(rated))
    sets = {"batch_size": "16", "lr": lr} if lr else {}
    run_dir, metrics = service.optimize(family, method, sets={**sets, "eval_samples": "64"})

    before, n = share_liked(family, 1000, 50)
    after, _ = share_liked(run_dir.name, 1000, 50)
    assert n == 200 and significantly_higher(before, after, n), (before, after)
    # the language stays near the parent's on its validation split (DPO moves it more: docs/optimize.md)
    parent = store.read_run(rated / "runs" / family)
    assert metrics["parent_val_bpc"] == parent["metrics"]["val_bpc"]
    assert metrics["val_bpc"] <= parent["metrics"]["val_bpc"] * (1 + tolerance) + 1e-9
    # before and after, as the judge (a reward fitted on the same ratings) sees 64 fresh outputs of each
    assert metrics["judged_samples"] == 64 and metrics["judged_prompts"] == len(PROMPTS)
    for side in ("before", "after"):
        lo, hi = metrics[f"liked_share_{side}_ci95"]
        assert 0 <= lo <= metrics[f"liked_share_{side}"] <= hi <= 1
    assert "liked, as the reward model fitted on this feedback judges" in (run_dir / "README.md").read_text("utf-8")
    # the lineage: the parent, the method and the exact feedback
    record = store.read_run(run_dir)
    made = record["optimize"]
    assert (made["parent"], made["method"], record["status"]) == (family, method, "done")
    with Store() as db:
        rating_ids = sorted(r["id"] for g in db.list_generations(run=family, limit=1000) for r in g["ratings"])
        assert made["feedback"] == fb.collect(db, family).snapshot()
    assert made["feedback"]["rating_ids"] == rating_ids and len(rating_ids) == 200
    assert f"--method {method}" in (run_dir / "README.md").read_text(encoding="utf-8")


def test_aigc_optimize_from_the_command_line_and_runs_shows_the_lineage(rated, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(rated))
    runner = CliRunner()
    made = runner.invoke(app, ["optimize", "gpt", "--from-feedback", "--method", "sft", "--name", "gpt-cli",
                               "--max-steps", "3", "--json"])
    assert made.exit_code == 0, made.output
    out = json.loads(made.stdout.strip().splitlines()[-1])
    assert Path(out["run_dir"]).name == "gpt-cli" and out["metrics"]["steps"] == 3
    listed = runner.invoke(app, ["runs"])
    assert listed.exit_code == 0
    assert any("gpt-cli" in line and "<- gpt (sft)" in line for line in listed.stdout.splitlines())
    # an optimized run is a run like any other: it generates, and `aigc train --resume` refuses it clearly
    assert service.generate("gpt-cli", {"prompt": "春", "max_new_tokens": 4}, seed=0).outputs[0].startswith("春")
    with pytest.raises(Conflict, match="made by aigc optimize"):
        service.train("gpt", "ignored", name="gpt-cli", resume=True)


@pytest.mark.parametrize("args, message", [
    (["gpt", "--method", "sft"], "pass --from-feedback"),
    (["gpt", "--from-feedback", "--method", "ppo"], "unknown --method 'ppo'"),
    (["gpt", "--from-feedback", "--set", "beta=-1"], "beta: must be > 0"),
    (["gpt", "--from-feedback", "--set", "n_layers=2"], "unknown key 'n_layers'"),
    (["nosuchrun", "--from-feedback"], "no such run"),
])
def test_bad_requests_are_one_clear_error_and_make_no_run(rated, monkeypatch, args, message):
    monkeypatch.setenv("AIGC_HOME", str(rated))
    before = sorted(p.name for p in (rated / "runs").iterdir())
    result = CliRunner().invoke(app, ["optimize", *args])
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert sorted(p.name for p in (rated / "runs").iterdir()) == before


def test_a_run_without_feedback_or_of_another_kind_is_refused(aigc_home, poems_file):
    service.train("ngram", str(poems_file), name="counted", sets={"max_order": "3"})
    with pytest.raises(BadRequest, match=r"ngram is counted: use --method sft \(its counts\) or rerank"):
        service.optimize("counted", "dpo")
    with pytest.raises(BadRequest, match="sft learns from liked outputs, and run 'counted' has none"):
        service.optimize("counted", "sft")
    service.train("vae", "digits", name="pictures", max_steps=2,
                  sets={"z_dim": "2", "base_channels": "4", "batch_size": "8", "eval_interval": "2"})
    with pytest.raises(BadRequest, match="--method dpo takes text and music runs; 'pictures' is an image run"):
        service.optimize("pictures", "dpo")
    with pytest.raises(BadRequest, match="sft learns from liked outputs, and run 'pictures' has none"):
        service.optimize("pictures", "sft")
    service.train("ar", "sunspots", name="spots")
    with pytest.raises(BadRequest, match="sft takes text, image and music runs; 'spots' is a series run"):
        service.optimize("spots", "sft")
    with pytest.raises(BadRequest, match="rerank needs liked and disliked outputs .* of run 'spots'"):
        service.optimize("spots", "rerank")
    with pytest.raises(BadRequest, match="rerank needs liked and disliked"):
        service.optimize("counted", "rerank")
    assert sorted(p.name for p in store.runs_dir().iterdir()) == ["counted", "pictures", "spots"]


# ----------------------------------------------------------------------------------
# best of k by a reward model


def test_a_rerank_run_keeps_the_best_of_k_by_its_reward(rated, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(rated))
    run_dir, metrics = service.optimize("gpt", "rerank", name="gpt-picky", sets={"best_of": "3", "eval_samples": "0"})
    parent = rated / "runs" / "gpt"
    # the parent's weights, byte for byte, and a reward beside them
    assert service.weights_sha256(run_dir) == service.weights_sha256(parent)
    assert metrics["val_bpc"] == store.read_run(parent)["metrics"]["val_bpc"]
    assert json.loads((run_dir / "reward.json").read_text())["best_of"] == 3

    options = {"prompt": "春", "max_new_tokens": 12}
    picked = service.generate("gpt-picky", {**options, "n": 2}, seed=5)
    # oracle: the parent's 6 samples at the same seed, scored by the reward by hand, the best of each 3
    candidates = service.generate("gpt", {**options, "n": 6}, seed=5).outputs
    scores = Reward.load(run_dir).score(features(service.load("gpt"), ["春"] * 6, candidates))
    expected = [candidates[3 * g + int(scores[3 * g:3 * g + 3].argmax())] for g in range(2)]
    assert picked.outputs == expected
    assert picked.record["settings"]["best_of"] == 3 and len(picked.record["stats"]["finish_reasons"]) == 2
    assert service.generate("gpt-picky", {**options, "n": 2}, seed=5).outputs == expected  # the same seed again
    # best_of 1: the parent's own samples
    assert service.generate("gpt-picky", {**options, "best_of": 1}, seed=5).outputs == \
        service.generate("gpt", options, seed=5).outputs
    # a stream gets the chosen text in one piece
    pieces = []
    streamed = service.generate("gpt-picky", options, seed=5, stream=pieces.append)
    assert pieces == [streamed.outputs[0][len("春"):]]

    with pytest.raises(BadRequest, match="needs a reward model, and gpt has none"):
        service.generate("gpt", {**options, "best_of": 2})
    with pytest.raises(BadRequest, match=r"--best-of must be in 1\.\.64"):
        service.generate("gpt-picky", {**options, "best_of": 65})
    with pytest.raises(BadRequest, match="beam search"):
        service.generate("gpt-picky", {**options, "num_beams": 2})
    assert service.generate("gpt-picky", {**options, "num_beams": 2, "best_of": 1}, seed=0).outputs


def _brightness(image: np.ndarray) -> float:
    return float(image.mean())


@pytest.fixture(scope="module")
def rated_pictures(tmp_path_factory):
    """A small unconditional VAE on digits and 160 of its images rated by a scripted user who likes bright digits
    (more ink than the median of the parent's images)."""
    home = tmp_path_factory.mktemp("pictures")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        # trained well enough that more training on its data alone does not brighten it (a control measured with
        # feedback_share 0.01: 0.435 -> 0.295 of bright images, where 0.5 gave 0.63)
        service.train("vae", "digits", name="pics", max_steps=400,
                      sets={"z_dim": "4", "base_channels": "8", "batch_size": "32", "eval_interval": "200",
                            "warmup_steps": "2", "dtype": "fp32"})
        made = service.generate("pics", {"n": 160}, seed=0)
        cut = float(np.median([_brightness(p) for p in made.outputs]))
        with Store() as db:
            ids = service.record(made, db, source="api", request={"endpoint": "images", "n": 160})
            for gen_id, pixels in zip(ids, made.outputs, strict=True):
                db.add_rating(gen_id, score=1 if _brightness(pixels) > cut else -1)
    return home, cut


def _share_bright(run: str, cut: float) -> float:
    images = service.generate(run, {"n": 200}, seed=50_000).outputs
    return sum(_brightness(p) > cut for p in images) / len(images)


@pytest.mark.slow
def test_image_sft_learns_a_taste_read_from_the_picture(rated_pictures, monkeypatch):
    home, cut = rated_pictures
    monkeypatch.setenv("AIGC_HOME", str(home))
    run_dir, metrics = service.optimize("pics", "sft", max_steps=60, sets={"eval_samples": "100"})
    before, after = _share_bright("pics", cut), _share_bright(run_dir.name, cut)
    assert significantly_higher(before, after, 200), (before, after)
    parent = store.read_run(home / "runs" / "pics")
    assert metrics["steps"] == 60 and "val_nelbo" in metrics and metrics["fid_images"] == 100
    record = store.read_run(run_dir)
    assert record["init_from"] == str((home / "runs" / "pics").resolve())
    assert record["data"] == parent["data"] and record["optimize"]["feedback"]["liked"] == 80
    # the default read the taste in none of the training images, so it mixed the liked pictures in instead of tilting
    config = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))["optimize"]
    assert (config["tilt"], config["feedback_share"], metrics["tilt_liked_share"]) == (0.0, 0.5, 0.0)
    with pytest.raises(UserError, match="feedback_share"):
        service.optimize("pics", "sft", name="never", sets={"feedback_share": "1.5"})


@pytest.mark.slow
def test_image_sft_on_the_data_alone_keeps_the_parents_loss(rated_pictures, monkeypatch):
    """The continuation costs nothing by itself: sft on the data alone (feedback_share 0: sft's learning rate,
    warm-up and fresh optimizer, no liked image) leaves the validation -ELBO within noise of the parent's. (tilt is
    not tested here for a taste: this 400-step parent's samples darken as it trains on, the bright share 0.435 ->
    0.025 after 300 steps on the data alone, and no reward fitted on its ratings reads brightness from a real digit
    or its reconstruction; docs/optimize.md)"""
    home, cut = rated_pictures
    monkeypatch.setenv("AIGC_HOME", str(home))
    parent = store.read_run(home / "runs" / "pics")["metrics"]["val_nelbo"]
    _, alone = service.optimize("pics", "sft", name="pics-data", max_steps=60,
                                sets={"feedback_share": "0", "eval_samples": "0"})
    assert alone["val_nelbo"] <= parent * 1.02, (parent, alone["val_nelbo"])


@pytest.mark.slow
def test_tilt_that_judges_no_training_image_liked_is_refused_and_makes_no_run(rated_pictures, monkeypatch):
    """tilt whose reward judges none (or all) of the training images liked would be sft on the data alone: one clear
    error instead, and no run. This parent's reconstructions are all darker than its median sample (measured: none
    of the 1,500 above the user's cut), so the reward fitted on its ratings likes none of them."""
    home, _ = rated_pictures
    monkeypatch.setenv("AIGC_HOME", str(home))
    with pytest.raises(BadRequest, match="judges none of the .* training images of pics liked .*reconstruction"):
        service.optimize("pics", "sft", name="pics-tilted", max_steps=2, sets={"feedback_share": "0", "tilt": "3"})
    assert not (home / "runs" / "pics-tilted").exists()


def test_tilt_judges_a_vae_s_training_images_by_their_reconstructions_and_other_families_by_the_images(monkeypatch):
    """Oracle: VAE.reconstruct (the decoder mean at z = mu) rounded to 8 bits as a generated PNG is, whatever the
    batching; a conditional VAE reconstructs each image with its label; a dcgan's images are judged as they are."""
    from types import SimpleNamespace

    from aigc.data.images import to_tensor, to_uint8
    from aigc.models.vae import VAE, VAEConfig
    from aigc.optimize import image as optimize_image

    monkeypatch.setattr(optimize_image, "RECON_BATCH", 3)  # three batches: 3, 3, 1
    torch.manual_seed(0)
    x = to_tensor(torch.randint(0, 256, (7, 8, 8, 1), dtype=torch.uint8).numpy())
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for num_classes, labels in ((0, None), (3, y)):
        model = VAE(VAEConfig(z_dim=2, base_channels=4), (1, 8, 8), num_classes=num_classes).eval()
        with torch.no_grad():
            expected = to_tensor(to_uint8(model.reconstruct(x, labels)))
        judged = optimize_image.as_the_parent_draws(SimpleNamespace(record={"family": "vae"}, model=model), x, labels)
        assert torch.equal(judged, expected)
        assert not torch.equal(judged, x)
    assert optimize_image.as_the_parent_draws(SimpleNamespace(record={"family": "dcgan"}, model=None), x, None) is x


@pytest.mark.slow
def test_image_rerank_moves_a_taste_read_from_the_picture(rated_pictures, monkeypatch):
    """The rerank run's images are brighter by the user's rule, and each image it keeps still regenerates alone."""
    home, cut = rated_pictures
    monkeypatch.setenv("AIGC_HOME", str(home))
    run_dir, metrics = service.optimize("pics", "rerank", sets={"eval_samples": "100"})
    assert metrics["liked_share_after"] > metrics["liked_share_before"]
    # quality beside the preference: FID of the same 100 fresh images of each side against held-out digits
    assert metrics["fid_images"] == 100 and metrics["fid_before"] > metrics["fid_floor"] >= 0
    assert all(math.isfinite(metrics[k]) for k in ("fid_after", "fid_matched_before", "fid_matched_after"))
    assert "FID against the same held-out images (100 each)" in (run_dir / "README.md").read_text("utf-8")

    before, after = _share_bright("pics", cut), _share_bright(run_dir.name, cut)
    assert significantly_higher(before, after, 200), (before, after)
    kept = service.generate(run_dir.name, {"n": 3}, seed=7)
    assert kept.record["rerank"]["pick"] == "first-liked"  # images' default: rejection sampling by the reward
    for chosen, score in zip(kept.record["rerank"]["chosen"], kept.record["rerank"]["scores"], strict=True):
        assert score > 0 or chosen % 3 == 0  # one the reward does not like is kept only as its group's first
    assert [r["seed"] for r in kept.record["images"]] == [7 + i for i in kept.record["rerank"]["chosen"]]
    for pixels, rec in zip(kept.outputs, kept.record["images"], strict=True):
        alone = service.generate("pics", {"n": 1}, seed=rec["seed"]).outputs[0]
        np.testing.assert_array_equal(pixels, alone)


def test_liked_image_batches_mix_liked_images_by_weight_with_the_data():
    from aigc.optimize.image import LikedImageBatches
    from aigc.train import ImageBatches

    data = ImageBatches(torch.zeros(50, 1, 4, 4), torch.zeros(50, dtype=torch.long), torch.zeros(5, 1, 4, 4),
                        torch.zeros(5, dtype=torch.long))
    liked_x = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 2.0)])
    batches = LikedImageBatches(data, liked_x, torch.tensor([3, 7]), [1.0, 3.0], share=0.25)
    x, y = batches.sample(torch.Generator().manual_seed(0), 4000)
    values = x[:, 0, 0, 0]
    assert (values[:1000] > 0).all() and (values[1000:] == 0).all()  # a quarter liked, then the data
    assert ((y[:1000] == 3) == (values[:1000] == 1)).all()  # each liked image keeps its class
    assert (values[:1000] == 2).float().mean().item() == pytest.approx(0.75, abs=0.04)  # drawn 1 : 3 by weight
    x, _ = batches.sample(torch.Generator().manual_seed(0), 1)
    assert x[0, 0, 0, 0] > 0  # at least one liked image in every batch


def test_tilted_weights_draw_the_data_as_first_liked_of_k_keeps_it():
    """Oracle: every k-tuple of draws from 5 images enumerated, the first liked of each kept (else the first): the
    probability of each image kept is its weight / N."""
    import itertools

    from aigc.optimize.image import tilted_weights

    liked = torch.tensor([False, True, False, False, True])
    for k in (1, 2, 3):
        kept = torch.zeros(5, dtype=torch.float64)
        for draws in itertools.product(range(5), repeat=k):
            kept[next((i for i in draws if liked[i]), draws[0])] += 1
        kept /= 5**k
        assert torch.allclose(tilted_weights(liked, k) / 5, kept, atol=1e-12), k
    assert torch.equal(tilted_weights(torch.zeros(3, dtype=torch.bool), 3), torch.ones(3, dtype=torch.float64))


def test_a_fractional_tilt_lies_between_its_counts_and_keeps_each_side_uniform():
    """k = 2.5: the liked share of the weighted draw is the closed form 1 - (1 - q)^k, strictly between k = 2's and
    k = 3's; every liked image weighs the same, every other the same; the weights still sum to N (a distribution)."""
    from aigc.optimize.image import tilted_weights

    liked = torch.tensor([False, True, False, False, True, False, False, False])
    q = 2 / 8
    shares = {}
    for k in (2, 2.5, 3):
        w = tilted_weights(liked, k)
        assert w.sum().item() == pytest.approx(8, abs=1e-12)
        assert torch.unique(w[liked]).numel() == 1 and torch.unique(w[~liked]).numel() == 1
        shares[k] = (w[liked].sum() / w.sum()).item()
    assert shares[2.5] == pytest.approx(1 - (1 - q) ** 2.5, abs=1e-12)
    assert shares[2] < shares[2.5] < shares[3]


def test_a_tilt_below_one_draw_is_refused_before_any_run(rated_pictures, monkeypatch):
    """0 < tilt < 1 would weigh the liked images below the rest: one clear error, and no run."""
    home, _ = rated_pictures
    monkeypatch.setenv("AIGC_HOME", str(home))
    with pytest.raises(BadRequest, match="tilt must be 0 .* or at least 1"):
        service.optimize("pics", "sft", name="pics-untilted", max_steps=2, sets={"feedback_share": "0", "tilt": "0.5"})
    assert not (home / "runs" / "pics-untilted").exists()


def test_liked_image_batches_draw_the_data_by_its_weights_and_share_0_is_the_data_alone():
    from aigc.optimize.image import LikedImageBatches
    from aigc.train import ImageBatches

    x = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 1, 2, 2).clone()
    data = ImageBatches(x, None, x[:1], None)
    batches = LikedImageBatches(data, torch.full((1, 1, 2, 2), 9.0), None, [1.0], share=0.0,
                                data_weights=torch.tensor([0.0, 1.0, 0.0, 3.0], dtype=torch.float64))
    (drawn,) = batches.sample(torch.Generator().manual_seed(0), 4000)
    values = drawn[:, 0, 0, 0]
    assert set(values.tolist()) == {1.0, 3.0}  # never a liked image, never a row of weight 0
    assert (values == 3).float().mean().item() == pytest.approx(0.75, abs=0.03)


def test_the_anchor_adds_its_formula_to_the_training_loss_alone():
    """loss = data loss + anchor / 2 * ||w - w_parent||^2 (the same noise), its gradient the data's plus
    anchor * (w - w_parent); in eval mode (the validation loss) the data's alone."""
    from aigc.models.vae import VAE, VAEConfig
    from aigc.optimize.image import LikedImageBatches
    from aigc.train import ImageBatches

    torch.manual_seed(0)
    model = VAE(VAEConfig(z_dim=2, base_channels=4), (1, 8, 8))
    parent = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    plain = ImageBatches(x, None, x, None)
    anchored = LikedImageBatches(plain, x[:1], None, [1.0], share=0.5, anchor=3.0, parent=parent)
    noise = model.draw_noise(6, generator=torch.Generator().manual_seed(1))
    vector = torch.nn.utils.parameters_to_vector
    distance = (vector(model.parameters()) - vector(parent)).pow(2).sum()
    data_loss = plain.loss(model, (x,), noise=noise)
    loss = anchored.loss(model, (x,), noise=noise)
    assert loss.item() == pytest.approx(data_loss.item() + 1.5 * distance.item(), rel=1e-6)
    data_grads = torch.autograd.grad(data_loss, list(model.parameters()))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for g, g0, p, p0 in zip(grads, data_grads, model.parameters(), parent, strict=True):
        assert torch.allclose(g, g0 + 3.0 * (p - p0), atol=1e-5)
    model.eval()
    assert anchored.loss(model, (x,), noise=noise).item() == pytest.approx(data_loss.item(), rel=1e-6)


def test_class_matched_images_follow_the_class_mix_the_classifier_reads(aigc_home):
    from aigc.data.images import load_images, to_tensor
    from aigc.evaluate.images import feature_net
    from aigc.optimize.judge import _class_matched

    train, val = load_images("digits"), load_images("digits", split="test")
    fakes = to_tensor(val.images[val.labels >= 7][:60])  # real 7s, 8s and 9s stand in for a run's images
    net, _ = feature_net(train)
    with torch.no_grad():
        read = net(fakes).argmax(1).numpy()
    matched = _class_matched(fakes, train, val)
    assert matched.n == 60
    assert sorted(matched.labels.tolist()) == sorted(read.tolist())  # the same classes, as many of each
    assert np.isin(read, [7, 8, 9]).mean() > 0.8  # the classifier reads the stand-ins mostly right
    # and the matched images are the held-out split's own pictures of those classes
    rows = [np.flatnonzero((val.images == image).all(axis=(1, 2, 3)))[0] for image in matched.images]
    assert [int(val.labels[r]) for r in rows] == matched.labels.tolist()


def test_sft_on_an_ngram_adds_the_liked_completions_counts(rated, monkeypatch):
    """The new n-gram's counts are the parent's plus, for every liked completion, each n-gram that ends on one of
    its tokens (not the prompt's), count_weight times its weight: counted here by hand."""
    from aigc.models import FAMILIES
    from aigc.optimize.text import liked_counts

    tokenizer = train_char(make_poems())
    ids, start = encode_example(tokenizer, "春", "春山水", 16)  # EOT 春 山 水: the completion is 山 水
    grams = liked_counts([(ids, start)], [2.0], 3, tokenizer.vocab_size, 5.0)
    as_str = [chr(i) for i in ids]
    assert grams == {"".join(as_str[0:3]): 10, "".join(as_str[1:4]): 10}  # EOT 春 山, 春 山 水
    assert liked_counts([(ids, start)], [-1.0], 3, tokenizer.vocab_size, 5.0) == {}

    monkeypatch.setenv("AIGC_HOME", str(rated))
    with pytest.raises(BadRequest, match="--max-steps and --max-minutes apply to trained families"):
        service.optimize("ngram", "sft", max_steps=10)
    run_dir, metrics = service.optimize("ngram", "sft", name="ngram-more",
                                        sets={"count_weight": "3", "eval_samples": "0"})
    parent, child = FAMILIES["ngram"].load(rated / "runs" / "ngram").kn, FAMILIES["ngram"].load(run_dir).kn
    with Store() as db:
        found = fb.collect(db, "ngram")
    tok = TextTokenizer.load(run_dir)
    examples = [encode_example(tok, r.prompt, r.output, len(r.output) + 2) for r in found.liked]
    expected = dict(parent.counts_)
    for gram, times in liked_counts(examples, [float(r.score) for r in found.liked], 3, parent.vocab_size, 3.0).items():
        expected[gram] = expected.get(gram, 0) + times
    assert child.counts_ == expected and child.tail_ == parent.tail_
    assert metrics["counts_added"] == sum(expected.values()) - sum(parent.counts_.values()) > 0
    assert tok.vocab_size == parent.vocab_size
