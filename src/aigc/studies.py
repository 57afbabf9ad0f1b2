"""Reading the Optuna studies that `aigc sweep` makes (docs/sweep.md): what `GET /v1/sweeps` and the studio's Sweeps
page show (docs/studio.md), through `service.sweeps` and `service.sweep`.

A study is read where the sweep wrote it, the store's database. Nothing here writes to it: a database in which no
sweep has run yet has no Optuna tables, and so no sweeps (its tables are not created by looking). Only studies
that `aigc sweep` made are shown; they are the ones with the family and objective recorded as study attributes.

Two rules are shared with the sweep itself (aigc.sweep imports them): which trial is the best (`best_trial`: the
lowest value, the lowest number on a tie) and the parameters' importances (`importance`: fANOVA with a fixed seed,
so the same trials give the same numbers on every visit).
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from aigc import store
from aigc.db import BUSY_TIMEOUT_S
from aigc.errors import Conflict, NotFound, UserError

STATES = tuple(s.name.lower() for s in TrialState)  # running, complete, pruned, fail, waiting
IMPORTANCE_SEED = 0  # fANOVA fits a random forest: a fixed seed makes the importances a function of the trials
MORE_TRIALS = 10  # the --trials of the command a sweep's page suggests for more


# ----------------------------------------------------------------------------------
# rules shared with aigc.sweep


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best complete trial of a study that minimises: the lowest value, the lowest number on a tie."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return min(complete, key=lambda t: (t.value, t.number)) if complete else None


def importance(study: optuna.Study) -> dict[str, float] | None:
    """Optuna's parameter importances (fANOVA, seeded), once two trials are complete and some parameter took two
    values; None before, or where Optuna cannot compute them."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None
    keys = {k for t in complete for k in t.params}
    if not any(len({repr(t.params.get(k)) for t in complete}) >= 2 for k in keys):
        return None
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ValueError, RuntimeError):  # e.g. trials of different search spaces, or all values equal
        return None


def trial_row(t: FrozenTrial) -> dict:
    """A trial as `aigc sweep --json` lists it."""
    return {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": dict(t.params),
            "run": t.user_attrs.get("run"), "status": t.user_attrs.get("status"),
            "error": t.user_attrs.get("error")}


# ----------------------------------------------------------------------------------
# reading a database


@contextlib.contextmanager
def reading(url: str) -> Iterator[optuna.storages.RDBStorage | None]:
    """Optuna's storage in the database `url`, to read; None where no sweep has created its tables there."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise UserError(f"not a database URL: {url!r}") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and not (parsed.database and Path(parsed.database).is_file()):
        yield None
        return
    engine_kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_S}} if sqlite else {}
    engine = sa.create_engine(parsed, poolclass=sa.NullPool, **engine_kwargs)
    try:
        with engine.connect() as connection:
            made = sa.inspect(connection).has_table("studies")
    except sa.exc.OperationalError as e:  # a server that is down, a wrong password
        reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        raise UserError(f"cannot open the database {parsed.render_as_string()!r}: {reason}") from None
    finally:
        engine.dispose()
    if not made:
        yield None
        return
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)
    except RuntimeError as e:  # tables of another Optuna version
        raise Conflict(f"the sweeps in {parsed.render_as_string()!r} were made by another Optuna version: {e}") \
            from None
    try:
        yield storage
    finally:
        storage.remove_session()
        storage.engine.dispose()


def list_sweeps(url: str, runs: Path) -> list[dict]:
    """Every study aigc sweep made in the database `url`, the newest first: its family, data, objective, trial
    counts by state and best trial (`here`: whether its run is in `runs`)."""
    with reading(url) as storage:
        if storage is None:
            return []
        out = []
        for frozen in reversed(storage.get_all_studies()):  # they come in the order they were made
            attrs = frozen.user_attrs
            if "family" not in attrs:
                continue
            trials = storage.get_all_trials(storage.get_study_id_from_name(frozen.study_name), deepcopy=False)
            best = best_trial(trials)
            starts = [t.datetime_start for t in trials if t.datetime_start is not None]
            out.append({"name": frozen.study_name, **_about(attrs), "trials": len(trials), "states": _counts(trials),
                        "best": None if best is None else _best(best, runs),
                        "started": min(starts).isoformat(timespec="seconds") if starts else None,
                        "last": max(starts).isoformat(timespec="seconds") if starts else None})
        return out


def describe_sweep(name: str, url: str, runs: Path) -> dict:
    """One sweep: every trial (number, state, value, params, run, status, error, duration), the search space
    (from the trials' distributions), the importances, the best trial, and the command that adds trials."""
    with reading(url) as storage:
        study = None
        if storage is not None and store.valid_name(name):  # aigc sweep names its studies so (and no NUL reaches SQL)
            with contextlib.suppress(KeyError):  # Optuna's "no such study"
                study = optuna.load_study(study_name=name, storage=storage)
        if study is None or "family" not in study.user_attrs:
            made = "" if study is None else " made by aigc sweep"
            raise NotFound(f"no sweep{made} named {name!r} (see GET /v1/sweeps; start one with aigc sweep)")
        attrs = study.user_attrs
        trials = study.get_trials(deepcopy=False)
        best = best_trial(trials)
        rows = []
        for t in trials:
            duration = t.duration.total_seconds() if t.duration is not None else None
            rows.append({**trial_row(t), "here": _here(runs, t.user_attrs.get("run")),
                         "best": best is not None and t.number == best.number, "duration_s": duration,
                         "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None})
        command = ["aigc", "sweep", "--family", attrs["family"], "--data", str(attrs.get("data")), "--name", name,
                   "--trials", str(MORE_TRIALS)]
        if attrs.get("budget_minutes") is not None:
            command += ["--budget-minutes", f"{attrs['budget_minutes']:g}"]
        return {"name": name, **_about(attrs), "direction": "minimize", "trials": rows, "states": _counts(trials),
                "space": _space(trials), "importance": importance(study),
                "best": None if best is None else _best(best, runs), "command": shlex.join(command)}


def _about(attrs: dict) -> dict:
    return {"family": attrs["family"], "data": attrs.get("data"), "objective": attrs.get("objective"),
            "budget_minutes": attrs.get("budget_minutes")}


def _counts(trials: list[FrozenTrial]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for t in trials:
        counts[t.state.name.lower()] += 1
    return counts


def _best(t: FrozenTrial, runs: Path) -> dict:
    run = t.user_attrs.get("run")
    return {"number": t.number, "value": t.value, "params": dict(t.params), "run": run, "here": _here(runs, run)}


def _here(runs: Path, run: str | None) -> bool:
    """Whether a trial's run is in `runs` (a worker on another machine keeps its runs in its own AIGC_HOME)."""
    if not run:
        return False
    try:
        store.run_in(runs, run)
    except NotFound:
        return False
    return True


def _space(trials: list[FrozenTrial]) -> dict[str, dict]:
    """Each parameter's range as the trials searched it: {type: int | float, low, high, log} or {type: categorical,
    choices}. Optuna keeps a parameter's kind, log flag and choices the same across a study; a range given by
    another worker's --space may differ, so the union is taken."""
    space: dict[str, dict] = {}
    for t in trials:
        for key, dist in t.distributions.items():
            shown = _describe(dist)
            seen = space.get(key)
            if seen is not None and seen["type"] != "categorical":
                shown.update(low=min(seen["low"], shown["low"]), high=max(seen["high"], shown["high"]))
            space[key] = shown
    return space


def _describe(dist: BaseDistribution) -> dict:
    if isinstance(dist, CategoricalDistribution):
        return {"type": "categorical", "choices": list(dist.choices)}
    kind = "int" if isinstance(dist, IntDistribution) else "float"
    return {"type": kind, "low": dist.low, "high": dist.high, "log": dist.log}
