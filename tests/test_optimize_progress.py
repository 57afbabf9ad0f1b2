"""The progress of `aigc optimize` beyond its training steps (issue 16): counting, scoring and the before/after
judging write the run's stage.json (store.Stage), and a job's view shows that stage, its progress and its ETA, in
the same fields as a training's (aigc.jobs)."""

from __future__ import annotations

import json
import time

import pytest
from tests.conftest import make_poems
from tests.test_jobs import TIMEOUT_S, one_thread_children  # noqa: F401  (an autouse fixture)

from aigc import jobs, service, store
from aigc.db import Store
from aigc.modalities import MODALITIES
from aigc.optimize import feedback as fb
from aigc.optimize import judge, rerank

PROMPTS = ("春", "月")


@pytest.fixture
def rated_ngram(aigc_home):
    """A counted n-gram of poems, 32 of its outputs rated (liked: a completion with 山)."""
    poems = aigc_home / "poems.txt"
    poems.write_text("\n%\n".join(make_poems(200)) + "\n", encoding="utf-8")
    service.train("ngram", str(poems), name="poet", sets={"max_order": "3"})
    with Store() as db:
        for i, prompt in enumerate(PROMPTS):
            made = service.generate("poet", {"prompt": prompt, "n": 16, "max_new_tokens": 10}, seed=i)
            gen_id = service.record(made, db, source="api", request={"prompt": prompt})[0]
            for index, text in enumerate(made.outputs):
                db.add_rating(gen_id, score=1 if "山" in text[len(prompt):] else -1, index=index)
    return aigc_home


def test_a_stage_writes_its_progress_and_a_job_view_reads_it(aigc_home):
    run_dir = aigc_home / "runs" / "r"
    run_dir.mkdir(parents=True)
    store.write_record(run_dir, {"family": "ngram", "status": "running", "data": {"train": {"source": "x"}},
                                 "budget": {"max_steps": 100, "max_minutes": None}})
    job = {"run": "r", "args": [], "kind": "optimize"}
    assert jobs._progress(job, "running")["stage"] == "training"  # steps to come, no stage.json yet
    with store.Stage(run_dir, "judging", 10, "outputs") as stage:
        stage.update(4)
        time.sleep(stage.WRITE_EVERY_S)
        stage.update(1)  # written: half a second since the last write
        written = json.loads((run_dir / store.STAGE).read_text())
        assert (written["stage"], written["done"], written["total"], written["unit"]) == ("judging", 5, 10, "outputs")
        view = jobs._progress(job, "running")
        spent = written["updated"] - written["started"]
        assert (view["stage"], view["stage_done"], view["stage_total"]) == ("judging", 5, 10)
        assert view["progress"] == 0.5 and view["eta_s"] == pytest.approx(5 * spent / 5)
        stage.update(5)  # the last update is always written
    assert json.loads((run_dir / store.STAGE).read_text())["done"] == 10
    assert jobs._progress(job, "done")["progress"] == 1.0
    (run_dir / store.STAGE).write_text("{not json")  # being replaced: read as no stage
    assert store.read_stage(run_dir) is None and jobs._progress(job, "running")["stage"] == "training"


def test_judging_reports_every_chunk_of_fresh_outputs(rated_ngram):
    with Store() as db:
        feedback = fb.collect(db, "poet")
    loaded = service.load("poet")
    reward = rerank.fit_from_feedback("text", loaded, feedback, l2=0.01)
    told: list[int] = []
    n = 2 * judge.CHUNK + 6  # per prompt: a full chunk and a part of one
    out = judge.before_after(MODALITIES["text"], loaded, loaded, feedback, reward, n_samples=n,
                             progress=told.append)
    assert sum(told) == 2 * n and max(told) <= judge.CHUNK and len(told) == 2 * 2 * 2
    # the same run on both sides, the same seeds: the same outputs, the same share
    assert out["liked_share_before"] == out["liked_share_after"]


def test_an_optimization_ends_with_its_judging_stage_complete(rated_ngram):
    run_dir, metrics = service.optimize("poet", "sft", sets={"eval_samples": "40"})
    stage = store.read_stage(run_dir)
    assert (stage["stage"], stage["done"], stage["total"], stage["unit"]) == ("judging", 80, 80, "outputs")
    assert metrics["judged_samples"] == 40


@pytest.mark.slow
def test_an_optimization_job_shows_counting_and_judging_with_progress_and_eta(rated_ngram):
    job = jobs.start_optimization("poet", "sft", sets={"eval_samples": "3000"})
    seen, deadline = [], time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        view = jobs.get_job(job["id"])
        seen.append(view)
        if view["status"] != "running":
            break
        time.sleep(0.1)
    assert seen[-1]["status"] == "done", seen[-1]["error"]
    assert seen[-1]["progress"] == 1.0
    judging = [v for v in seen if v["status"] == "running" and v["stage"] == "judging"]
    assert judging, [v["stage"] for v in seen]
    assert any(0 < v["progress"] < 1 and v["eta_s"] is not None for v in judging), judging[-1]
    progress = [v["progress"] for v in judging]
    assert progress == sorted(progress) and all(v["stage_total"] == 6000 for v in judging)
