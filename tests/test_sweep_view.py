"""Sweeps as the service, the API and the studio read them (aigc.studies, `service.sweeps`, `service.sweep`,
`GET /v1/sweeps`, `GET /v1/sweeps/{name}`), and where a run came from (`lineage` in `GET /v1/models/{id}/details`).

The sweep is real Optuna in the store's own database, with the study attributes `aigc sweep` records (its own
`plan_sweep` and `_check_study` make them) and trials added with `study.add_trial`: five complete trials whose runs
are real tiny gpt runs trained here (each value is its run's val_bpc), a pruned one (its value the last validation
value it reported, as Optuna's `tell` sets it) and a failed one; then the sweep's own `mark_best`. What is read
back is checked against Optuna: `study.trials`, `study.best_trial`, `optuna.importance.get_param_importances`.
Child processes are what tests/test_sweep.py tests; here they would only cost time.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from optuna.trial import FrozenTrial, TrialState, create_trial
from tests.conftest import TINY_SETS, make_poems

from aigc import service, store, studies, sweep
from aigc.db import Store
from aigc.errors import NotFound
from aigc.server.app import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = "poet-sweep"
SPACE = {  # a --space: a log range, an int range, a set of choices, a plain range; and the tiny gpt's fixed keys
    "lr": {"low": 1e-3, "high": 3e-2, "log": True}, "n_layer": {"low": 1, "high": 2},
    "n_embd": {"choices": [16, 32]}, "resid_pdrop": {"low": 0.0, "high": 0.3},
    **{k: v for k, v in TINY_SETS["gpt"].items() if k not in ("n_layer", "n_embd", "resid_pdrop")},
}
COMPLETE = [  # the complete trials' settings
    {"lr": 0.002, "n_layer": 1, "n_embd": 16, "resid_pdrop": 0.0},
    {"lr": 0.02, "n_layer": 2, "n_embd": 32, "resid_pdrop": 0.1},
    {"lr": 0.005, "n_layer": 1, "n_embd": 32, "resid_pdrop": 0.25},
    {"lr": 0.012, "n_layer": 2, "n_embd": 16, "resid_pdrop": 0.05},
    {"lr": 0.03, "n_layer": 1, "n_embd": 32, "resid_pdrop": 0.15},
]
PRUNED = {"lr": 0.001, "n_layer": 2, "n_embd": 16, "resid_pdrop": 0.3}
FAILED = {"lr": 0.008, "n_layer": 1, "n_embd": 16, "resid_pdrop": 0.2}
STEPS = 12  # each trial's training (the sweep would give it --budget-minutes)


def write_poems(home: Path) -> str:
    poems = home / "poems.txt"
    poems.write_text("\n%\n".join(make_poems()) + "\n", encoding="utf-8")
    return str(poems)


def trial(state: TrialState, params: dict, plan: sweep.Plan, attrs: dict, start: datetime, value: float | None = None,
          reports: dict | None = None) -> FrozenTrial:
    """A finished trial as Optuna records it: its times are those of its training here (`create_trial` would
    give it none)."""
    return FrozenTrial(number=0, trial_id=0, state=state, value=value, datetime_start=start,
                       datetime_complete=datetime.now(), params=params, distributions=plan.searched, user_attrs=attrs,
                       system_attrs={}, intermediate_values=reports or {})


def build_sweep(home: Path, name: str = STUDY) -> optuna.Study:
    """A gpt sweep on the conftest's poems in home's store, as `aigc sweep` would leave it (module docstring)."""
    poems = write_poems(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        plan = sweep.plan_sweep(family="gpt", data=poems, trials=7, budget_minutes=0.2, space=SPACE, name=name)
        study = optuna.create_study(storage=sweep.open_storage(f"sqlite:///{home / 'aigc.db'}"), study_name=name,
                                    direction="minimize", load_if_exists=True)
        sweep._check_study(study, plan)  # the study attributes, exactly as the first worker records them
        for params in [*COMPLETE, PRUNED, FAILED]:
            number, start = len(study.trials), datetime.now()
            run = f"{name}-t{number:03d}"
            attrs = {"run": run, "job": f"job-{number}"}
            if params is FAILED:  # its child failed before making the run
                study.add_trial(trial(TrialState.FAIL, params, plan, {**attrs, "status": "failed",
                                                                     "error": "the training ended failed"}, start))
                continue
            sets = {k: str(v) for k, v in {**plan.fixed, **params}.items()}
            steps = STEPS // 2 if params is PRUNED else STEPS
            run_dir, metrics = service.train("gpt", poems, name=run, max_steps=steps, sets=sets)
            if params is PRUNED:  # reported its validation lines, then stopped: the run is interrupted
                lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                reports = {r["step"]: r["val_bpc"] for r in map(json.loads, lines)
                           if "val_loss" in r and "val_bpc" in r}
                store.write_record(run_dir, {**store.read_run(run_dir), "status": "interrupted"})
                study.add_trial(trial(TrialState.PRUNED, params, plan, {**attrs, "status": "interrupted"}, start,
                                      value=reports[max(reports)], reports=reports))
                continue
            kept = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            study.add_trial(trial(TrialState.COMPLETE, params, plan, {**attrs, "status": "done", "metrics": kept},
                                  start, value=metrics["val_bpc"]))
        sweep.mark_best(study)
    return study


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    home = tmp_path_factory.mktemp("swept")
    study = build_sweep(home)
    return home, study


@pytest.fixture(scope="module")
def api(swept):
    home, _ = swept
    app = create_app(ServerConfig(runs=home / "runs", database=f"sqlite:///{home / 'aigc.db'}", rate_limit=0))
    with TestClient(app) as client:
        yield client


def read(home: Path, name: str | None = None):
    url, runs = f"sqlite:///{home / 'aigc.db'}", home / "runs"
    return service.sweeps(url, runs) if name is None else service.sweep(name, url, runs)


def test_a_sweep_reads_back_as_optuna_holds_it(swept):
    home, study = swept
    shown = read(home, STUDY)
    trials = study.trials
    assert [t["number"] for t in shown["trials"]] == [t.number for t in trials] == list(range(7))
    assert [t["state"] for t in shown["trials"]] == ["complete"] * 5 + ["pruned", "fail"]
    for row, t in zip(shown["trials"], trials, strict=True):
        assert row["value"] == t.value and row["params"] == t.params
        assert row["run"] == t.user_attrs["run"] == f"{STUDY}-t{t.number:03d}"
        assert row["status"] == t.user_attrs["status"] and row["error"] == t.user_attrs.get("error")
        assert row["duration_s"] == t.duration.total_seconds() > 0
    assert shown["trials"][6]["error"] == "the training ended failed" and shown["trials"][6]["value"] is None
    assert shown["trials"][5]["value"] == trials[5].intermediate_values[max(trials[5].intermediate_values)]
    # each complete trial's value is its run's own val_bpc; the run of the failed trial was never made
    for row in shown["trials"][:5]:
        assert row["value"] == store.read_run(home / "runs" / row["run"])["metrics"]["val_bpc"]
    assert [t["here"] for t in shown["trials"]] == [True] * 6 + [False]
    # the best: Optuna's own, marked on its row and in its run's run.json
    best = study.best_trial
    assert shown["best"]["number"] == best.number and shown["best"]["value"] == best.value
    assert shown["best"]["run"] == best.user_attrs["run"] and shown["best"]["params"] == best.params
    assert [t["number"] for t in shown["trials"] if t["best"]] == [best.number]
    assert store.read_run(home / "runs" / best.user_attrs["run"])["sweep"] == {"study": STUDY, "trial": best.number,
                                                                              "best": True}
    # the importances: Optuna's fANOVA with the same seed, every searched parameter
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=studies.IMPORTANCE_SEED)
    assert shown["importance"] == pytest.approx(optuna.importance.get_param_importances(study, evaluator=evaluator))
    assert set(shown["importance"]) == set(COMPLETE[0]) and sum(shown["importance"].values()) == pytest.approx(1)
    assert read(home, STUDY)["importance"] == shown["importance"]  # the same on every visit
    # the study's record and search space, as the sweep planned it
    assert (shown["family"], shown["objective"], shown["budget_minutes"]) == ("gpt", "val_bpc", 0.2)
    assert shown["data"] == str(home / "poems.txt")
    assert shown["states"] == {"running": 0, "complete": 5, "pruned": 1, "fail": 1, "waiting": 0}
    assert shown["space"] == {"lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                              "n_layer": {"type": "int", "low": 1, "high": 2, "log": False},
                              "n_embd": {"type": "categorical", "choices": [16, 32]},
                              "resid_pdrop": {"type": "float", "low": 0.0, "high": 0.3, "log": False}}
    assert shown["command"] == (f"aigc sweep --family gpt --data {home / 'poems.txt'} --name {STUDY} --trials 10 "
                                f"--budget-minutes 0.2")


def test_the_list_sums_each_sweep_up(swept):
    home, study = swept
    [row] = read(home)
    assert row["name"] == STUDY and row["trials"] == 7
    assert row["states"]["complete"] == 5 and row["states"]["pruned"] == 1 and row["states"]["fail"] == 1
    assert row["best"] == {"number": study.best_trial.number, "value": study.best_trial.value,
                           "params": study.best_trial.params, "run": study.best_trial.user_attrs["run"], "here": True}


def test_the_endpoints_answer_what_the_service_reads(swept, api):
    home, _ = swept
    listed = api.get("/v1/sweeps")
    assert listed.status_code == 200
    assert listed.json() == {"object": "list", "data": read(home)}
    one = api.get(f"/v1/sweeps/{STUDY}")
    assert one.status_code == 200
    assert one.json() == {"object": "sweep", **read(home, STUDY)}
    missing = api.get("/v1/sweeps/nope")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] == "no sweep named 'nope' (see GET /v1/sweeps; start one with aigc sweep)"


def test_details_say_where_a_run_came_from(swept, api):
    """A trial's run names its sweep; a run of aigc optimize its parent, method and feedback; an --init-from run
    the run it continued."""
    home, study = swept
    parent = study.best_trial.user_attrs["run"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        with Store(f"sqlite:///{home / 'aigc.db'}") as db:
            made = service.generate(parent, {"prompt": "春", "n": 3, "max_new_tokens": 8}, seed=1)
            [gen] = service.record(made, db, source="api", request={"prompt": "春"})
            for index, score in ((0, 1), (1, 1), (2, -1)):
                db.add_rating(gen, score=score, index=index)
            service.optimize(parent, "sft", name="poet-sft", max_steps=2, db=db)
        service.train("gpt", str(home / "poems.txt"), name="continued", init_from=str(home / "runs" / parent),
                      max_steps=2, sets={"block_size": "16", "batch_size": "4", "eval_interval": "2",
                                         "eval_batches": "1", "dtype": "fp32"})
    trial = api.get(f"/v1/models/{parent}/details").json()["lineage"]
    assert trial == {"optimized": None, "continued": None,
                     "sweep": {"study": STUDY, "trial": study.best_trial.number, "best": True}}
    other = next(t for t in study.trials if t.state == TrialState.COMPLETE and t.number != study.best_trial.number)
    assert api.get(f"/v1/models/{other.user_attrs['run']}/details").json()["lineage"]["sweep"]["best"] is False
    optimized = api.get("/v1/models/poet-sft/details").json()["lineage"]
    feedback = store.read_run(home / "runs" / "poet-sft")["optimize"]["feedback"]
    assert optimized["optimized"] == {"parent": parent, "here": True, "method": "sft", "liked": 2, "disliked": 1,
                                      "pairs": 2, "sha256": feedback["sha256"]}
    assert optimized["continued"] is None  # its init_from is its parent, said once
    continued = api.get("/v1/models/continued/details").json()["lineage"]
    assert continued["continued"] == {"path": str((home / "runs" / parent).resolve()), "run": parent, "here": True}
    assert continued["optimized"] is None and continued["sweep"] is None


def test_a_database_with_no_sweep_has_none_and_stays_as_it_was(db_url, tmp_path):
    """Read on SQLite and PostgreSQL: no Optuna tables (the store's own only) is no sweeps, and looking creates
    none; a study that aigc sweep did not make is not one of its sweeps."""
    Store(db_url).close()
    engine = sa.create_engine(db_url)
    tables = set(sa.inspect(engine).get_table_names())
    assert service.sweeps(db_url, tmp_path) == []
    with pytest.raises(NotFound, match="no sweep named 'nope'"):
        service.sweep("nope", db_url, tmp_path)
    assert set(sa.inspect(engine).get_table_names()) == tables
    foreign = optuna.create_study(storage=sweep.open_storage(db_url), study_name="by-hand")
    foreign.add_trial(create_trial(value=1.0, params={"x": 0.5},
                                   distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    assert service.sweeps(db_url, tmp_path) == []
    with pytest.raises(NotFound, match="no sweep made by aigc sweep named 'by-hand'"):
        service.sweep("by-hand", db_url, tmp_path)
    engine.dispose()


def test_a_sweep_with_one_complete_trial_has_no_importances_yet(db_url, tmp_path):
    plan = sweep.plan_sweep(family="gpt", data="tang300", trials=1, budget_minutes=1, name="young")
    study = optuna.create_study(storage=sweep.open_storage(db_url), study_name="young", direction="minimize")
    sweep._check_study(study, plan)
    params = {"lr": 1e-3, "n_layer": 2, "n_embd": 64, "resid_pdrop": 0.1}
    study.add_trial(create_trial(value=3.5, params=params, distributions=plan.searched,
                                 user_attrs={"run": "young-t000"}))
    study.add_trial(create_trial(state=TrialState.RUNNING, params=params, distributions=plan.searched,
                                 user_attrs={"run": "young-t001"}))
    shown = service.sweep("young", db_url, tmp_path)
    assert shown["importance"] is None and shown["best"]["number"] == 0 and shown["best"]["here"] is False
    assert [t["state"] for t in shown["trials"]] == ["complete", "running"]
    assert shown["trials"][1]["duration_s"] is None
    [row] = service.sweeps(db_url, tmp_path)
    assert row["states"]["running"] == 1 and row["family"] == "gpt" and row["data"] == "tang300"
    with pytest.raises(NotFound):  # no name aigc sweep makes: not looked up (PostgreSQL refuses a NUL in SQL)
        service.sweep("young\x00", db_url, tmp_path)
