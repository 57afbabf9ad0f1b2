"""Sweeps (aigc.sweep, docs/sweep.md): real Optuna studies whose trials are real `aigc train` child processes.

Each child imports torch (about 10 s on a busy 2-core machine), so the tests start few of them: an n-gram
sweep in this process, two worker processes joining one study on SQLite and on PostgreSQL, a tiny GPT sweep
whose second trial is pruned, and requests that fail before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from tests.conftest import TINY_SETS, make_poems
from typer.testing import CliRunner

from aigc import store
from aigc.cli import app
from aigc.db import Store
from aigc.errors import BadRequest, NotFound
from aigc.sweep import SPACES, load_space, plan_sweep, run_sweep

TIMEOUT_S = 300  # two workers, each with two children, on a busy 2-core machine


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children inherit it


@pytest.fixture
def poems(tmp_path) -> str:
    path = tmp_path / "poems.txt"
    path.write_text("\n%\n".join(make_poems()), encoding="utf-8")
    return str(path)


def sweep_fields() -> dict[str, dict]:
    """run name -> the "sweep" field of its run.json, for every run in the store."""
    return {r["name"]: store.read_run(Path(r["path"])).get("sweep") for r in store.list_runs()}


@pytest.mark.slow
def test_an_ngram_sweep_runs_ordinary_runs_and_marks_the_best(poems, aigc_home):
    lines = []
    result = run_sweep(family="ngram", data=poems, trials=3, budget_minutes=None, seed=0, progress=lines.append)

    assert result["study"] == "sweep-ngram-poems" and result["objective"] == "val_bpc"
    assert result["storage"] == f"sqlite:///{aigc_home / 'aigc.db'}"  # the store's own database
    trials = result["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 3
    assert all(2 <= t["params"]["order"] <= 8 for t in trials)
    runs = [t["run"] for t in trials]
    assert runs == [f"sweep-ngram-poems-t{i:03d}" for i in range(3)]
    # every trial is an ordinary run: `aigc runs` lists it, done, its value its run.json's val_bpc
    listed = {r["name"]: r for r in store.list_runs()}
    assert sorted(listed) == runs and {r["status"] for r in listed.values()} == {"done"}
    for t in trials:
        record = store.read_run(store.runs_dir() / t["run"])
        assert record["metrics"]["val_bpc"] == pytest.approx(t["value"])
        assert record["metrics"]["order"] == t["params"]["order"]
    # exactly one run is marked best: the one with the lowest value
    marks = sweep_fields()
    assert [name for name, mark in marks.items() if mark["best"]] == [result["best"]["run"]]
    assert result["best"]["value"] == min(t["value"] for t in trials)
    assert {mark["study"] for mark in marks.values()} == {"sweep-ngram-poems"}
    assert result["best"]["metrics"]["val_loss"] > 0  # the other metrics are kept beside the objective
    assert len(lines) == 3 and lines[0].startswith("trial 1/3 (#0, run sweep-ngram-poems-t000): order=")
    assert "val_bpc" in lines[0]


@pytest.mark.slow
def test_two_workers_share_one_study_beside_the_store(poems, aigc_home, db_url):
    """Two `aigc sweep` processes started together, the same --name and --storage: one study of 4 trials, in a
    database that already holds the store's tables, which stay usable (on SQLite, then on PostgreSQL)."""
    Store(db_url).close()  # the store's tables and its aigc_alembic_version first
    env = {**os.environ, "AIGC_HOME": str(aigc_home)}
    argv = [sys.executable, "-m", "aigc", "sweep", "--family", "ngram", "--data", poems, "--trials", "2",
            "--name", "shared", "--storage", db_url, "--json"]
    workers = [subprocess.Popen([*argv, "--seed", str(seed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for seed in (1, 2)]
    outputs = [w.communicate(timeout=TIMEOUT_S) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
        assert [line[:6] for line in err.splitlines()] == ["trial "] * 2  # its progress lines, nothing else
        assert json.loads(out)["study"] == "shared"

    study = optuna.load_study(study_name="shared", storage=db_url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    runs = {t.user_attrs["run"] for t in trials}
    assert runs == {f"shared-t{i:03d}" for i in range(4)}
    assert {r["name"] for r in store.list_runs()} == runs  # this test's workers share one AIGC_HOME
    best = [name for name, mark in sweep_fields().items() if mark["best"]]
    value = {t.user_attrs["run"]: t.value for t in trials}
    assert len(best) == 1 and value[best[0]] == min(value.values())

    # both schemas in one database: Optuna's tables and version table beside the store's, and the store works
    tables = set(sa.inspect(sa.create_engine(db_url, poolclass=sa.NullPool)).get_table_names())
    assert {"aigc_alembic_version", "generations", "api_keys"} <= tables
    assert {"alembic_version", "studies", "trials", "trial_values"} <= tables
    with Store(db_url) as db:
        assert db.list_generations() == []
        db.add_generation(run="shared-t000", modality="text", request={"prompt": ""}, output=["春江花月夜"])
        assert [g["run"] for g in db.list_generations()] == ["shared-t000"]


class PruneAllButTheFirst(optuna.pruners.BasePruner):
    """Prunes every trial but trial 0 at its first report: the prune path without the median's timing."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number > 0 and trial.last_step is not None


@pytest.mark.slow
def test_a_pruned_trial_is_an_interrupted_run_with_a_checkpoint(poems):
    space = {**TINY_SETS["gpt"], "lr": {"low": 1e-3, "high": 3e-3, "log": True}}
    result = run_sweep(family="gpt", data=poems, trials=2, budget_minutes=0.15, space=space, name="tiny", seed=0,
                       pruner=PruneAllButTheFirst())

    first, second = result["trials"]
    assert first["state"] == "complete" and first["status"] == "done" and first["value"] > 0
    assert second["state"] == "pruned" and second["status"] == "interrupted"
    pruned = store.runs_dir() / second["run"]
    assert store.read_run(pruned)["status"] == "interrupted"
    assert (pruned / "checkpoints" / "last").is_dir()  # `aigc train --resume` could continue it
    study = optuna.load_study(study_name="tiny", storage=result["storage"])
    steps = study.trials[1].intermediate_values
    assert list(steps) == [4]  # the first validation line (eval_interval = 4), reported as val_bpc
    # the budget bounds the finished trial; it reported every validation line
    assert sorted(study.trials[0].intermediate_values)[:2] == [4, 8]
    assert result["best"]["run"] == first["run"]
    assert sweep_fields() == {first["run"]: {"study": "tiny", "trial": 0, "best": True},
                              second["run"]: {"study": "tiny", "trial": 1, "best": False}}


def test_bad_requests_fail_before_anything_starts(poems, aigc_home, tmp_path):
    with pytest.raises(NotFound, match="unknown family 'nope'"):
        run_sweep(family="nope", data=poems, trials=2, budget_minutes=1)
    with pytest.raises(BadRequest, match="unknown key 'n_head' for family rnn"):
        run_sweep(family="rnn", data=poems, trials=2, budget_minutes=1, space={"n_head": {"low": 1, "high": 4}})
    bad_specs = [({"cell": {"choices": ["gru", "transformer"]}}, "cell: must be one of"),
                 ({"n_layer": {"low": 3, "high": 1}}, "n_layer: low must be below high"),
                 ({"n_layer": {"low": 1.5, "high": 3}}, "n_layer: expected int"),
                 ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "lr: must be > 0"),
                 ({"cell": {"low": 1, "high": 2}}, "cell is a str: search it with choices"),
                 ({"lr": {"min": 1e-4, "high": 1e-2}}, "lr: unknown field 'min'"),
                 ({"dropout": 0.1}, "nothing to search")]
    for space, message in bad_specs:
        with pytest.raises(BadRequest, match=message):
            run_sweep(family="rnn", data=poems, trials=2, budget_minutes=1, space=space)
    with pytest.raises(BadRequest, match="give --budget-minutes"):
        run_sweep(family="gpt", data=poems, trials=2, budget_minutes=None)
    with pytest.raises(BadRequest, match="--budget-minutes must be more than 0 and at most 600"):
        run_sweep(family="gpt", data=poems, trials=2, budget_minutes=601)
    with pytest.raises(BadRequest, match="--budget-minutes applies to gradient-trained families"):
        run_sweep(family="ngram", data=poems, trials=2, budget_minutes=1)
    with pytest.raises(BadRequest, match=r"--trials must be a whole number in 1\.\.1000"):
        run_sweep(family="ngram", data=poems, trials=0, budget_minutes=None)
    with pytest.raises(NotFound, match="no such file or folder"):
        run_sweep(family="ngram", data=str(tmp_path / "missing.txt"), trials=2, budget_minutes=None)

    space_file = tmp_path / "space.toml"
    space_file.write_text("[lr]\nlow = 1e-4\nhigh = \n", encoding="utf-8")
    with pytest.raises(BadRequest, match="space.toml: not valid TOML"):
        load_space(str(space_file))
    done = CliRunner().invoke(app, ["sweep", "--family", "gpt", "--data", poems, "--trials", "2",
                                    "--budget-minutes", "1", "--space", str(space_file)])
    assert done.exit_code == 1 and done.stderr.startswith("error: --space") and "not valid TOML" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback
    # nothing started: no run, no job, no study in the store's database
    assert not (aigc_home / "runs").exists() and not (aigc_home / "jobs").exists()
    assert not (aigc_home / "aigc.db").exists()


def test_every_default_space_fits_its_family():
    data = {"vae": "digits", "dcgan": "digits", "diffusion": "digits", "ar": "sunspots"}
    for family in SPACES:
        plan = plan_sweep(family=family, data=data.get(family, "tang300"), trials=1,
                          budget_minutes=None if family in ("ngram", "ar") else 1.0)
        assert set(plan.searched) == set(SPACES[family]) and plan.fixed == {}
        assert plan.prunable == (family not in ("ngram", "ar"))
