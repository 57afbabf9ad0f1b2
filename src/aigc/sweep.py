"""Hyperparameter sweeps (docs/sweep.md): Optuna searches a family's settings for the lowest validation metric.

1. The plan (`plan_sweep`): the family, its search space (SPACES, or a --space TOML file) checked key by key
   against the family's configuration sections, the objective metric and the time budget of a trial. Nothing
   starts before every check has passed.
2. The study: an Optuna study in the store's own database (aigc.db.default_url(), or --storage), opened with
   load_if_exists, so that a second `aigc sweep` with the same name and storage (another process, another
   machine on the same PostgreSQL) joins it. Optuna's tables and its `alembic_version` table live beside the
   store's (whose version table is `aigc_alembic_version`). Creating Optuna's tables is serialised between
   processes (`_schema_lock`): two workers that start together on a new database would race, and one fail.
3. A trial: TPE samples the parameters; the trial is an ordinary run `STUDY-tNNN`, trained by `aigc train` as a
   child process (aigc.jobs: AIGC_HOME, logs, the run's lock); its periodic validation lines in metrics.jsonl
   are reported to the trial, and when the median pruner says so the child gets SIGINT (it saves its checkpoint
   and ends `interrupted`) and the trial is pruned. A finished trial's value is the run's final objective metric.
   A child that fails fails its trial, with its error line, and the sweep goes on.
4. The end: every finished trial's run.json gets a "sweep" field {study, trial, best}, best true for the best
   trial of the study; the result lists the trials, the best one and the parameters' importances.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from aigc import jobs, store
from aigc.config import coerce, fields_of
from aigc.data.images import NAMED_IMAGES
from aigc.data.series import NAMED_SERIES
from aigc.data.text import CORPORA
from aigc.db import BUSY_TIMEOUT_S, default_url
from aigc.errors import BadRequest, Conflict, NotFound, UserError
from aigc.modalities import MODALITIES
from aigc.service import modality_for
from aigc.studies import best_trial, importance, trial_row

MAX_TRIALS = 1000  # trials one `aigc sweep` runs at most
MAX_BUDGET_MINUTES = jobs.MAX_MINUTES  # the time budget of one trial at most
POLL_S = 0.5  # how often a running trial's metrics.jsonl is read
N_STARTUP_TRIALS = 2  # the median pruner prunes nothing before this many trials are complete
# a trial is not judged before this step: the first evaluation at the default eval_interval (100), after the
# learning-rate warm-up (50 steps)
N_WARMUP_STEPS = 100
SCHEMA_LOCK = 0x6f707475  # the PostgreSQL advisory lock held while Optuna creates its tables ("optu")
SPEC_FIELDS = {"low", "high", "log", "step", "choices"}

# The default search space of every family: small, around the defaults. A table {low, high[, log, step]} is a
# range (int or float as the key is), {choices} a set of values; a plain value is fixed for every trial.
SPACES: dict[str, dict[str, dict]] = {
    "ngram": {"order": {"low": 2, "high": 8}},
    "rnn": {"cell": {"choices": ["rnn", "gru", "lstm"]}, "n_layer": {"low": 1, "high": 3},
            "lr": {"low": 3e-4, "high": 1e-2, "log": True}, "dropout": {"low": 0.0, "high": 0.3}},
    "gpt": {"lr": {"low": 1e-4, "high": 3e-3, "log": True}, "n_layer": {"low": 1, "high": 4},
            "n_embd": {"choices": [32, 64, 128]}, "resid_pdrop": {"low": 0.0, "high": 0.3}},
    "vae": {"lr": {"low": 1e-4, "high": 3e-3, "log": True}, "z_dim": {"choices": [8, 16, 32]},
            "base_channels": {"choices": [16, 32, 64]}},
    "dcgan": {"lr": {"low": 5e-5, "high": 5e-4, "log": True}, "z_dim": {"choices": [32, 64, 128]}},
    "diffusion": {"lr": {"low": 1e-4, "high": 1e-3, "log": True}, "base_channels": {"choices": [16, 32, 64]}},
    "ar": {"order": {"low": 1, "high": 24}},
}


class TrialFailed(Exception):
    """A trial's training failed (its error line is the message); the sweep goes on with the next trial."""


@dataclass(frozen=True)
class Plan:
    study: str  # the study's name; its runs are STUDY-tNNN
    family: str
    data: str
    modality: str
    searched: dict[str, BaseDistribution]  # key -> what Optuna samples it from
    fixed: dict[str, object]  # key -> the value every trial trains with
    objective: str  # the run.json metric minimised (objective_metric)
    minutes: float | None  # each trial's training-time budget; None for a closed-form fit
    prunable: bool  # gradient-trained: periodic validation lines, so the pruner can judge a trial


# ----------------------------------------------------------------------------------
# the plan


def objective_metric(modality: str, trainer: str, bound_score: bool) -> str:
    """What a sweep minimises, from the run's final metrics: text val_bpc (bits per character: comparable across
    tokenizers, where the loss per token is not); a family scored by its bound (the VAE) val_nelbo; AR's fit,
    which holds no validation split, its BIC; every other family val_loss."""
    if trainer == "fit":
        return "bic"
    if bound_score:
        return "val_nelbo"
    return "val_bpc" if modality == "text" else "val_loss"


def plan_sweep(*, family: str, data: str, trials: int, budget_minutes: float | None, space: dict | None = None,
               name: str | None = None) -> Plan:
    """Check a sweep's request (BadRequest or NotFound naming what is wrong) and return its plan."""
    modality, fam = modality_for(family, data)  # NotFound for an unknown family
    if not (isinstance(trials, int) and not isinstance(trials, bool) and 1 <= trials <= MAX_TRIALS):
        raise BadRequest(f"--trials must be a whole number in 1..{MAX_TRIALS}, got {trials!r}")
    _check_data(data)
    gradient = fam.trainer == "gradient"
    if gradient:
        if budget_minutes is None:
            raise BadRequest(f"{family} is trained by gradient steps: give --budget-minutes M, the training time "
                             f"of each trial (more than 0, at most {MAX_BUDGET_MINUTES:g})")
        if not (isinstance(budget_minutes, int | float) and math.isfinite(budget_minutes)
                and 0 < budget_minutes <= MAX_BUDGET_MINUTES):
            raise BadRequest(f"--budget-minutes must be more than 0 and at most {MAX_BUDGET_MINUTES:g}, "
                             f"got {budget_minutes!r}")
    elif budget_minutes is not None:
        raise BadRequest(f"--budget-minutes applies to gradient-trained families; {family} is fitted in closed "
                         f"form (each trial takes the time its fit takes)")
    name = default_study_name(family, data) if name is None else name
    if not (isinstance(name, str) and len(name) <= 120 and store.valid_name(name)):
        raise BadRequest(f"invalid study name {name!r}: use letters, digits, '.', '_' and '-' (at most 120, "
                         f"starting with a letter or digit); its runs are named NAME-t000, NAME-t001, ...")
    sections = MODALITIES[modality].sections(fam)
    searched, fixed = parse_space(SPACES[family] if space is None else space, sections, family)
    if modality == "music" and "calibrate" not in searched:  # trials are ranked by held-out NLL, which the sampling
        fixed.setdefault("calibrate", "false")               # does not move: `aigc calibrate` the one kept
    return Plan(study=name, family=family, data=data, modality=modality, searched=searched, fixed=fixed,
                objective=objective_metric(modality, fam.trainer, fam.bound_score),
                minutes=float(budget_minutes) if gradient else None, prunable=gradient)


def default_study_name(family: str, data: str) -> str:
    """sweep-FAMILY-DATA: the same for every worker given the same family and data."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data).stem or "data").strip("-") or "data"
    return f"sweep-{family}-{stem}"[:120]


def _check_data(data: str) -> None:
    """A named data set, or a file or folder that exists: else every trial would fail the same way."""
    if not isinstance(data, str) or not data.strip() or data.startswith("-"):
        raise BadRequest(f"invalid data {data!r}: give a data set's name or a path")
    if data in CORPORA or data in NAMED_IMAGES or data in NAMED_SERIES:
        return
    if not Path(data).expanduser().exists():
        raise NotFound(f"data {data!r}: no such file or folder, and not a named data set (see: aigc data list)")


def load_space(path: str) -> dict:
    """A --space file: one TOML table per searched key (`[lr]` low = 1e-4, high = 1e-2, log = true), and plain
    `key = value` lines for settings fixed in every trial."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"--space {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadRequest(f"--space {path}: cannot read it: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadRequest(f"--space {path}: not valid TOML: {e}") from None


def parse_space(space: dict, sections: dict[str, type], family: str) -> tuple[dict[str, BaseDistribution], dict]:
    """(searched, fixed): each key checked against the family's configuration keys (those --set takes) and each
    bound, choice and fixed value against the key's type and range."""
    if not isinstance(space, dict):
        raise BadRequest("the search space is a table of keys")
    fields = {name: f for config_type in sections.values() for name, f in fields_of(config_type).items()}
    searched, fixed = {}, {}
    for key, spec in space.items():
        if key not in fields:
            raise BadRequest(f"space: unknown key {key!r} for family {family} "
                             f"(see: aigc train --family {family} --help)")
        try:
            if isinstance(spec, dict):
                searched[key] = _distribution(key, spec, fields[key])
            else:
                fixed[key] = coerce(key, spec, fields[key])
        except UserError as e:
            raise BadRequest(f"space: {e}") from None
    if not searched:
        raise BadRequest(f"space: nothing to search: give at least one key a table ({{low, high}} or {{choices}}); "
                         f"the default space of {family} is {json.dumps(SPACES[family])}")
    return searched, fixed


def _distribution(key: str, spec: dict, field) -> BaseDistribution:
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise UserError(f"{key}: unknown field {unknown[0]!r} (a range is low, high, log, step; a set is choices)")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise UserError(f"{key}: give either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{key}: choices must be a non-empty list, got {choices!r}")
        values = [coerce(key, c, field) for c in choices]
        if len(set(values)) != len(values):
            raise UserError(f"{key}: the choices repeat a value: {choices!r}")
        return CategoricalDistribution(values)
    kind = _kind(field)
    if kind not in (int, float):
        raise UserError(f"{key} is a {kind.__name__}: search it with choices = [...], not low/high")
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{key}: a range needs both low and high")
    low, high = coerce(key, spec["low"], field), coerce(key, spec["high"], field)
    if not low < high:
        raise UserError(f"{key}: low must be below high, got {low!r} and {high!r} (a fixed value is `{key} = "
                        f"VALUE`)")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{key}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{key}: a log range needs low > 0, got {low!r}")
    step = spec.get("step")
    if step is not None:
        if log:
            raise UserError(f"{key}: a range takes log or step, not both")
        if isinstance(step, bool) or not isinstance(step, int | float) or not step > 0 or (kind is int
                                                                                           and step != int(step)):
            raise UserError(f"{key}: step must be a {'whole ' if kind is int else ''}number > 0, got {step!r}")
    if kind is int:
        return IntDistribution(low, high, log=log, step=int(step or 1))
    return FloatDistribution(low, high, log=log, step=None if step is None else float(step))


def _kind(field) -> type:
    """A configuration field's type (annotations are strings under `from __future__ import annotations`)."""
    return field.type if isinstance(field.type, type) else {"int": int, "float": float, "str": str,
                                                            "bool": bool}[field.type]


# ----------------------------------------------------------------------------------
# the study


def run_sweep(*, family: str, data: str, trials: int, budget_minutes: float | None, space: dict | None = None,
              name: str | None = None, storage: str | None = None, seed: int | None = None,
              progress: Callable[[str], None] | None = None, pruner: optuna.pruners.BasePruner | None = None
              ) -> dict:
    """Run `trials` trials of the sweep `name` (default sweep-FAMILY-DATA), joining its study where it exists in
    `storage` (default: the store's database); mark the best run; return {study, storage, objective, trials,
    best, importance}. `progress` gets one line per trial; `pruner`: default MedianPruner."""
    plan = plan_sweep(family=family, data=data, trials=trials, budget_minutes=budget_minutes, space=space,
                      name=name)
    url = storage or default_url()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress lines say what Optuna would log
    if pruner is None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=N_STARTUP_TRIALS, n_warmup_steps=N_WARMUP_STEPS)
    study = optuna.create_study(storage=open_storage(url), study_name=plan.study, load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
    _check_study(study, plan)
    study.optimize(_Objective(plan), n_trials=trials, catch=(TrialFailed,),
                   callbacks=[_Progress(plan, trials, progress)])
    best = mark_best(study)
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    return {"study": plan.study, "storage": sa.make_url(url).render_as_string(hide_password=True),
            "family": plan.family, "objective": plan.objective, "trials": rows, "best": best,
            "importance": importance(study)}


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage in the database `url`, its tables created (under `_schema_lock`) where they are not."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise BadRequest(f"--storage {url!r}: not a database URL (sqlite:///path/to/aigc.db, "
                         f"postgresql+psycopg://user@host/db)") from None
    engine_kwargs = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file:"):
            raise BadRequest(f"--storage {url!r}: give SQLite a file (sqlite:///path/to/aigc.db): workers share "
                             f"the study through it")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_S}}  # wait for another worker's write
    try:
        with _schema_lock(parsed):
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except sa.exc.OperationalError as e:  # a server that is down, a wrong password, a locked file
        reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        raise UserError(f"cannot open the database {parsed.render_as_string()!r}: {reason}") from None
    except ImportError as e:
        raise UserError(f"database {parsed.render_as_string()!r}: its driver is not installed (for PostgreSQL: "
                        f"pip install 'aigc[postgres]'): {e}") from None


@contextlib.contextmanager
def _schema_lock(url: sa.URL) -> Iterator[None]:
    """One process at a time creates Optuna's tables in a database (two at once: "table ... already exists" or a
    duplicate alembic_version row, 3 of 6 tries on SQLite): on SQLite an flock on a file beside the database (one
    machine, as SQLite is), on PostgreSQL a session advisory lock (every machine)."""
    if url.get_backend_name() == "sqlite":
        with open(f"{url.database}-sweep.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif url.get_backend_name() == "postgresql":
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sa.select(sa.func.pg_advisory_lock(SCHEMA_LOCK)))
                connection.commit()
                try:
                    yield
                finally:
                    connection.execute(sa.select(sa.func.pg_advisory_unlock(SCHEMA_LOCK)))
                    connection.commit()
        finally:
            engine.dispose()
    else:
        yield


def _check_study(study: optuna.Study, plan: Plan) -> None:
    """A study made by another worker is of the same family and objective (the first worker records them)."""
    attrs = study.user_attrs
    if "family" not in attrs and study.get_trials(deepcopy=False):  # the first worker sets them before any trial
        raise Conflict(f"study {plan.study!r} was not made by aigc sweep: pick another --name")
    if "family" not in attrs:
        for key, value in (("family", plan.family), ("objective", plan.objective), ("data", plan.data),
                           ("budget_minutes", plan.minutes)):
            study.set_user_attr(key, value)
        return
    if (attrs["family"], attrs.get("objective")) != (plan.family, plan.objective):
        raise Conflict(f"study {plan.study!r} sweeps {attrs['family']} ({attrs.get('objective')}), not "
                       f"{plan.family} ({plan.objective}): pick another --name")


class _Objective:
    """One trial: its parameters, its run trained by a child process, its value (Optuna calls it)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, trial: optuna.Trial) -> float:
        plan = self.plan
        params = {key: _suggest(trial, key, dist) for key, dist in plan.searched.items()}
        run = f"{plan.study}-t{trial.number:03d}"
        trial.set_user_attr("run", run)
        try:
            job = jobs.start_training(family=plan.family, data=plan.data, name=run, minutes=plan.minutes,
                                      sets={**plan.fixed, **params})
        except UserError as e:  # e.g. a run of that name exists already
            trial.set_user_attr("error", str(e))
            raise TrialFailed(str(e)) from None
        trial.set_user_attr("job", job["id"])
        try:
            job = self._watch(trial, job["id"], store.runs_dir() / run / "metrics.jsonl")
        except BaseException:  # pruned, or this process stopped (Ctrl-C): the child stops too
            _stop(job["id"])
            raise
        trial.set_user_attr("status", job["status"])
        if job["status"] != "done":
            error = job["error"] or f"the training ended {job['status']}"
            trial.set_user_attr("error", error)
            raise TrialFailed(error)
        metrics = store.read_run(store.runs_dir() / run).get("metrics") or {}
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if isinstance(v, int | float | str)
                                        and not (isinstance(v, float) and not math.isfinite(v))})
        value = metrics.get(plan.objective)
        if not isinstance(value, int | float) or not math.isfinite(value):
            trial.set_user_attr("error", f"the run has no finite {plan.objective}: {value!r}")
            raise TrialFailed(f"run {run} has no finite {plan.objective} ({value!r})")
        return float(value)

    def _watch(self, trial: optuna.Trial, job_id: str, metrics: Path) -> dict:
        """Report each new validation line to the trial until the child ends (its job); prune it when told."""
        lines, reported = _NewLines(metrics), set()
        while True:
            job = jobs.get_job(job_id)  # the status first: once it has ended, its last lines are in the file
            running = job["status"] == "running"
            for line in lines.read():
                if "val_loss" not in line or line["step"] in reported:
                    continue
                value = line.get(self.plan.objective, line["val_loss"])  # text: val_bpc; others: val_loss
                if not (isinstance(value, int | float) and math.isfinite(value)):
                    continue
                trial.report(float(value), line["step"])
                reported.add(line["step"])
                if running and self.plan.prunable and trial.should_prune():
                    job = _stop(job_id)
                    trial.set_user_attr("status", job["status"])
                    raise optuna.TrialPruned(f"pruned at step {line['step']} ({self.plan.objective} {value:.4f})")
            if not running:
                return job
            time.sleep(POLL_S)


def _suggest(trial: optuna.Trial, key: str, dist: BaseDistribution):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def _stop(job_id: str) -> dict:
    """SIGINT to a trial's child (it saves its checkpoint and ends `interrupted`), then wait for its end."""
    job = jobs.stop_job(job_id)
    while job["status"] == "running":
        time.sleep(POLL_S / 5)
        job = jobs.get_job(job_id)
    return job


class _NewLines:
    """The JSON lines appended to a file since the last read (a last line still being written waits)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        out = []
        for raw in complete.splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and isinstance(line.get("step"), int):
                    out.append(line)
        return out


class _Progress:
    """One line per trial this process ran: trial k/N, its run, parameters, value or state, elapsed time."""

    def __init__(self, plan: Plan, total: int, emit: Callable[[str], None] | None):
        self.plan, self.total, self.emit, self.done = plan, total, emit, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done += 1
        if self.emit is None:
            return
        if trial.state == TrialState.COMPLETE:
            outcome = f"{self.plan.objective} {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            step = trial.last_step
            outcome = f"pruned at step {step}" if step is not None else "pruned"
        else:
            outcome = f"{trial.state.name.lower()}: {trial.user_attrs.get('error', '')}".rstrip(": ")
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        elapsed = trial.duration.total_seconds() if trial.duration is not None else 0.0
        self.emit(f"trial {self.done}/{self.total} (#{trial.number}, run {trial.user_attrs.get('run')}): {params} "
                  f"-> {outcome} ({elapsed:.0f}s)")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------
# the result


def mark_best(study: optuna.Study) -> dict | None:
    """Write {study, trial, best} into the run.json of every finished trial whose run is here (a worker on
    another machine has its runs in its own AIGC_HOME); returns the best trial's row, None before any completes."""
    trials = study.get_trials(deepcopy=False)
    best = best_trial(trials)
    for t in trials:
        run = t.user_attrs.get("run")
        if t.state == TrialState.RUNNING or not run:  # a running trial's child still writes its run.json
            continue
        run_dir = store.runs_dir() / run
        if store.is_run(run_dir):
            record = store.read_run(run_dir)
            record["sweep"] = {"study": study.study_name, "trial": t.number, "best": best is not None and
                               t.number == best.number}
            store.write_record(run_dir, record)
    return None if best is None else {**trial_row(best), "metrics": best.user_attrs.get("metrics")}
