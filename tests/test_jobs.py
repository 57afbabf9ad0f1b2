"""Jobs (aigc.jobs): `aigc train --json` and `aigc eval --json` as real child processes, their state on disk.

Each child imports torch (seconds), so the tests start few of them, side by side where they can."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from tests.conftest import TINY_SETS, make_poems

from aigc import jobs, store
from aigc.errors import BadRequest, Conflict, NotFound
from aigc.uploads import Upload

TIMEOUT_S = 240  # a child on a busy 2-core machine: imports alone can take 10 s


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children inherit it


@pytest.fixture
def poems_upload() -> dict:
    up = Upload.begin("text", "poems.txt", 10**6)
    up.write("\n%\n".join(make_poems()).encode("utf-8"))
    return up.finish()


def ended(job: dict) -> bool:
    return job["status"] != "running"


def wait(job_id: str, until=ended, timeout: float = TIMEOUT_S) -> dict:
    """Poll the job until `until(job)`; an end that comes first is an error (with the child's stderr)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.get_job(job_id)
        if until(job):
            return job
        if job["status"] != "running":
            raise AssertionError(f"job ended {job['status']} first: {job['error']}\n"
                                 f"{(jobs.jobs_dir() / job_id / 'stderr.log').read_text()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still running after {timeout} s: {jobs.get_job(job_id)}")


def lock_of(run: str):
    return jobs.jobs_dir() / "locks" / f"{run}.lock"


def test_train_on_an_upload_then_evaluate(poems_upload):
    job = jobs.start_training(family="ngram", data=poems_upload["data"], name="ng", sets=TINY_SETS["ngram"])
    assert job["kind"] == "train" and job["run"] == "ng" and job["status"] == "running"
    assert job["args"][1:4] == ["-m", "aigc", "train"] and "--json" in job["args"]
    folder = jobs.jobs_dir() / job["id"]
    assert {p.name for p in folder.iterdir()} == {"job.json", "stdout.log", "stderr.log"}
    assert lock_of("ng").is_file()

    done = wait(job["id"])
    assert done["status"] == "done", done["error"]
    assert done["returncode"] == 0 and done["ended"] and done["progress"] == 1.0
    assert done["result"]["run_dir"] == str(store.runs_dir() / "ng")
    assert done["result"]["metrics"]["val_bpc"] > 0
    assert json.loads((folder / "job.json").read_text())["returncode"] == 0
    assert not lock_of("ng").exists()  # released when it ended
    assert [j["id"] for j in jobs.list_jobs()] == [job["id"]]

    with pytest.raises(Conflict, match="'ng' already exists .*pick another name"):
        jobs.start_training(family="ngram", data=poems_upload["data"], name="ng")

    evaluation = jobs.start_evaluation("ng")
    assert evaluation["kind"] == "eval" and evaluation["args"][3:] == ["eval", "ng", "--json"]
    evaluated = wait(evaluation["id"])
    assert evaluated["status"] == "done", evaluated["error"]
    assert evaluated["result"]["metrics"]["val_bpc"] == pytest.approx(done["result"]["metrics"]["val_bpc"])
    assert (store.runs_dir() / "ng" / "eval.json").is_file()
    assert [j["id"] for j in jobs.list_jobs()] == [evaluation["id"], job["id"]]  # newest first
    with pytest.raises(NotFound):
        jobs.start_evaluation("no-such-run")


def test_a_time_budget_shows_progress_and_stop_interrupts_with_a_checkpoint(poems_upload):
    sets = {**TINY_SETS["gpt"], "n_embd": "32", "eval_interval": "20", "log_interval": "5"}
    job = jobs.start_training(family="gpt", data=poems_upload["data"], name="g", minutes=0.3, sets=sets)
    running = wait(job["id"], lambda j: j["step"] > 0 and j["eta_s"] is not None, timeout=TIMEOUT_S)
    assert 0 < running["progress"] < 1
    assert 0 < running["eta_s"] <= 18
    assert running["elapsed_s"] > 0 and running["curve"] and running["curve"][-1]["step"] <= running["step"]
    with pytest.raises(Conflict, match="'g' is already training"):
        jobs.start_training(family="gpt", data=poems_upload["data"], name="g", minutes=0.3, sets=sets)
    with pytest.raises(Conflict, match="'g' is already training"):
        jobs.start_evaluation("g")

    stopping = jobs.stop_job(job["id"])
    assert stopping["stop_requested"] is not None
    assert jobs.stop_job(job["id"])["stop_requested"] == stopping["stop_requested"]  # sent once
    ended = wait(job["id"])
    assert ended["status"] == "interrupted" and ended["returncode"] == 130
    assert 0 < ended["progress"] < 1 and ended["eta_s"] is None
    assert ended["checkpoint"]  # what `aigc train --resume --name g` continues from
    run_dir = store.runs_dir() / "g"
    assert (run_dir / "checkpoints" / "last" / "state.json").is_file()
    assert store.read_run(run_dir)["status"] == "interrupted"
    assert len(ended["curve"]) <= jobs.CURVE_POINTS
    assert jobs.stop_job(job["id"])["status"] == "interrupted"  # a no-op now
    with pytest.raises(Conflict, match="'g' is interrupted: only a finished"):
        jobs.start_evaluation("g")
    assert not lock_of("g").exists()


def test_two_concurrent_starts_of_one_name_make_one_job(poems_upload):
    barrier, outcomes = threading.Barrier(2), []

    def start():
        barrier.wait()
        try:
            outcomes.append(jobs.start_training(family="ngram", data=poems_upload["data"], name="same"))
        except Conflict as e:
            outcomes.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(started) == 1 and len(refused) == 1
    assert f"'same' is already training (job {started[0]['id']})" in str(refused[0])
    assert len(jobs.list_jobs()) == 1
    jobs.stop_job(started[0]["id"])  # at once: while Python starts, or later, it ends as stopped
    assert wait(started[0]["id"])["status"] in ("interrupted", "done")  # done: the signal beat the exec
    assert not lock_of("same").exists()


def test_failed_starts_report_the_childs_error_also_after_a_restart():
    stale = lock_of("bad")  # left by a server that died while starting a job: taken over
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"job": "job-" + "0" * 20, "kind": "train", "pid": 1}))
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    watched = jobs.start_training(family="ngram", data="no-such-corpus", name="bad")
    unwatched = jobs.start_training(family="ngram", data="no-such-corpus", name="bad2")
    child = jobs._CHILDREN.pop(unwatched["id"])  # as after a restart: known by its pid alone
    try:
        failed = wait(watched["id"])
        assert failed["status"] == "failed" and failed["returncode"] == 1
        assert failed["error"].startswith("no such file or directory: no-such-corpus")
        assert failed["result"] is None and failed["progress"] == 0.0
        # not reaped by anyone here: a zombie, which is not alive
        gone = wait(unwatched["id"])
        assert gone["status"] == "failed" and gone["returncode"] is None
        assert gone["error"].startswith("no such file or directory: no-such-corpus")
        assert not lock_of("bad").exists() and not lock_of("bad2").exists()
    finally:
        child.wait(timeout=TIMEOUT_S)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "../escape"}, "invalid run name"),
    ({"minutes": 0}, "minutes must be more than 0 and at most 600"),
    ({"minutes": 601}, "minutes must be more than 0 and at most 600"),
    ({"max_steps": 0}, "max_steps must be a whole number"),
    ({"sets": {"bad key": 1}}, "invalid configuration key"),
    ({"data": "--overwrite"}, "invalid data"),
])
def test_bad_requests_start_nothing(kwargs, message):
    with pytest.raises(BadRequest, match=message):
        jobs.start_training(**{"family": "ngram", "data": "tang300", **kwargs})
    assert jobs.list_jobs() == []


def test_unknown_jobs_are_not_found():
    for bad in ("job-" + "0" * 20, "../runs", "job-../../x"):
        with pytest.raises(NotFound):
            jobs.get_job(bad)
        with pytest.raises(NotFound):
            jobs.stop_job(bad)
