"""Training, optimization and evaluation as separate processes, so that a server stays responsive while they work.

A job is `python -m aigc train --json ...`, `python -m aigc optimize RUN --from-feedback ... --json` or
`python -m aigc eval RUN --json`, started with AIGC_HOME = the
current home, in a session of its own, its output in log files. Everything about it is on disk, so that a page
can be left and reopened and a restarted server still knows it:

    $AIGC_HOME/jobs/<id>/job.json     {id, kind, run, args, pid, pid_created, started, ended, returncode,
                                       stop_requested}
    $AIGC_HOME/jobs/<id>/stdout.log   the child's stdout: the JSON it prints when it is done
    $AIGC_HOME/jobs/<id>/stderr.log   the child's stderr: its progress lines and its `error: ...` line
    $AIGC_HOME/jobs/locks/<run>.lock  one job at a time per run name (O_CREAT | O_EXCL), {job, kind, pid}

No thread watches a job: its state is computed when it is read. The children this process started are kept
(`_CHILDREN`) and polled, which reaps them; a job this process did not start (a server restarted since) is
judged by its pid (alive, not a zombie, the same process by its start time) and, once ended, by what it left:
the JSON on stdout, the run's run.json status, the last `error:` line. A training's progress comes from its
run's metrics.jsonl (docs/runs.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

import aigc
from aigc import store
from aigc.db import Store
from aigc.errors import BadRequest, Conflict, NotFound
from aigc.fsutil import read_json, write_json
from aigc.optimize import feedback

RECORD = "job.json"
MAX_MINUTES = 600.0  # the longest time budget a job may ask for
CURVE_POINTS = 500  # a curve holds at most this many points (half of them training loss, half validation)
START_GRACE_S = 60.0  # a lock whose job has no job.json yet is a start in progress for this long
TAIL_BYTES = 64 * 1024  # of stderr.log read for the error line
_ID = re.compile(r"job-[0-9a-f]{20}")
_SET_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_CHILDREN: dict[str, subprocess.Popen] = {}  # job id -> the child this process started, until it is reaped
_REAPING = threading.Lock()  # one thread at a time records a job's end


def jobs_dir() -> Path:
    return store.aigc_home() / "jobs"


# ----------------------------------------------------------------------------------
# starting


def start_training(*, family: str, data: str, name: str | None = None, minutes: float | None = None,
                   max_steps: int | None = None, sets: dict | None = None, conditional: bool = False) -> dict:
    """Start `aigc train` for a new run; returns the job (get_job). `data`: a named data set or an upload's `data`
    path; `name`: default FAMILY-DATA-TIMESTAMP; `sets`: configuration keys (`--set key=value`). Conflict when a
    job is already at work on that run name, or a run of that name exists."""
    if not isinstance(family, str) or not re.fullmatch(r"[a-z0-9_-]+", family):
        raise BadRequest(f"invalid family {family!r}")
    if not isinstance(data, str) or not data.strip() or data.startswith("-"):
        raise BadRequest(f"invalid data {data!r}: give a data set's name or an upload's data path")
    if name is None:
        name = default_name(family, data)
    elif not isinstance(name, str) or not store.valid_name(name):
        raise BadRequest(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                         f"starting with a letter or digit)")
    if minutes is not None and not (isinstance(minutes, int | float) and 0 < minutes <= MAX_MINUTES
                                    and math.isfinite(minutes)):
        raise BadRequest(f"minutes must be more than 0 and at most {MAX_MINUTES:g}, got {minutes!r}")
    if max_steps is not None and not (isinstance(max_steps, int) and not isinstance(max_steps, bool)
                                      and max_steps >= 1):
        raise BadRequest(f"max_steps must be a whole number >= 1, got {max_steps!r}")
    args = ["train", "--json", f"--family={family}", f"--data={_absolute(data)}", f"--name={name}"]
    if minutes is not None:
        args.append(f"--max-minutes={float(minutes)!r}")
    if max_steps is not None:
        args.append(f"--max-steps={max_steps}")
    if conditional:
        args.append("--conditional")
    for key, value in (sets or {}).items():
        if not isinstance(key, str) or not _SET_KEY.fullmatch(key):
            raise BadRequest(f"invalid configuration key {key!r}")
        args.append(f"--set={key}={_set_value(value)}")
    return _start("train", name, args, lambda: _check_new_run(name))


def start_evaluation(run: str) -> dict:
    """Start `aigc eval RUN --json` for a run that is done; returns the job (get_job)."""
    if not isinstance(run, str) or not store.valid_name(run) or not store.is_run(store.runs_dir() / run):
        raise NotFound(f"no such run: {run!r}")

    def check() -> None:
        status = store.read_run(store.runs_dir() / run).get("status")
        if status != "done":
            raise Conflict(f"run {run!r} is {status or 'not finished'}: only a finished (done) run can be evaluated")

    return _start("eval", run, ["eval", run, "--json"], check)


def start_optimization(run: str, method: str, *, name: str | None = None, max_steps: int | None = None,
                       sets: dict | None = None, database: str | None = None) -> dict:
    """Start `aigc optimize RUN --from-feedback --method METHOD --json` (a new run from a finished run and the
    feedback stored for it, docs/optimize.md); returns the job (get_job). `name`: default RUN-METHOD; `database`:
    the store's URL (default: aigc.db's), which the child reads the feedback from. A method that the run's feedback
    gives nothing to learn from is a BadRequest here, before any process starts."""
    if not isinstance(run, str) or not store.valid_name(run) or not store.is_run(store.runs_dir() / run):
        raise NotFound(f"no such run: {run!r}")
    if method not in ("sft", "dpo", "rerank"):
        raise BadRequest(f"unknown method {method!r} (choose from: sft, dpo, rerank)")
    name = f"{run}-{method}" if name is None else name
    if not isinstance(name, str) or not store.valid_name(name):
        raise BadRequest(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                         f"starting with a letter or digit)")
    if max_steps is not None and not (isinstance(max_steps, int) and not isinstance(max_steps, bool)
                                      and max_steps >= 1):
        raise BadRequest(f"max_steps must be a whole number >= 1, got {max_steps!r}")
    args = ["optimize", run, "--from-feedback", f"--method={method}", f"--name={name}", "--json"]
    if max_steps is not None:
        args.append(f"--max-steps={max_steps}")
    for key, value in (sets or {}).items():
        if not isinstance(key, str) or not _SET_KEY.fullmatch(key):
            raise BadRequest(f"invalid configuration key {key!r}")
        args.append(f"--set={key}={_set_value(value)}")

    def check() -> None:
        record = store.read_run(store.runs_dir() / run)
        if record.get("status") != "done":
            raise Conflict(f"run {run!r} is {record.get('status') or 'not finished'}: only a finished (done) run "
                           f"can be optimized")
        _check_new_run(name)
        modality = store.modality_of(record)
        if modality in ("text", "image"):  # others: the child says what it takes
            with Store(database) as db:
                feedback.require(feedback.collect(db, run, modality), method)

    return _start("optimize", name, args, check, {"AIGC_DATABASE_URL": database} if database else None)


def default_name(family: str, data: str) -> str:
    """FAMILY-DATA-TIMESTAMP, the name `aigc train` gives a run without --name (store.claim_run_dir)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data).name or "data").strip("-") or "data"
    return f"{family}-{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _start(kind: str, run: str, args: list[str], check, env: dict[str, str] | None = None) -> dict:
    """Claim the run's lock, `check()` what must hold, start the child (`env`: beside this process's); the lock is
    released when it ends."""
    job_id = f"job-{time.time_ns() // 1000:014x}{secrets.token_hex(3)}"
    folder = jobs_dir() / job_id
    _lock(run, job_id, kind)
    try:
        check()
        home = store.aigc_home()
        home.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True)
        argv = [sys.executable, "-m", "aigc", *args]
        with open(folder / "stdout.log", "wb") as out, open(folder / "stderr.log", "wb") as err:
            child = subprocess.Popen(argv, cwd=home, env={**_child_env(home), **(env or {})}, stdin=subprocess.DEVNULL,
                                     stdout=out,
                                     stderr=err, start_new_session=True)
    except BaseException:
        _unlock(run, job_id)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _CHILDREN[job_id] = child  # before job.json: a reader never sees the job without its child
    job = {"id": job_id, "kind": kind, "run": run, "args": argv, "pid": child.pid,
           "pid_created": _created(child.pid), "started": store.now(), "ended": None, "returncode": None,
           "stop_requested": None}
    write_json(folder / RECORD, job)
    return get_job(job_id)


def _check_new_run(name: str) -> None:
    run_dir = store.runs_dir() / name
    if store.is_run(run_dir):
        status = store.read_run(run_dir).get("status")
        raise Conflict(f"a run named {name!r} already exists ({status}): pick another name")
    if run_dir.exists():
        raise Conflict(f"{run_dir} exists and is not a run: pick another name")


def _absolute(data: str) -> str:
    """A path as an absolute path (the child works in AIGC_HOME, not here); a data set's name as it is (names
    have no '/' and no suffix: tang300, digits, co2)."""
    path = Path(data).expanduser()
    return str(path.resolve()) if ("/" in data or data.startswith("~") or path.suffix) else data


def _set_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str | int | float):
        raise BadRequest(f"configuration values are strings, numbers or booleans, got {value!r}")
    return str(value)


def _child_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "AIGC_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    # the child runs the aigc this process runs, also from a source tree that is not installed
    root = Path(aigc.__file__).resolve().parents[1]
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


# ----------------------------------------------------------------------------------
# the lock of a run name


def _lock_path(run: str) -> Path:
    return jobs_dir() / "locks" / f"{run}.lock"


@contextlib.contextmanager
def _guard():
    """Taking a stale lock over and releasing one, one at a time (threads and processes alike: flock)."""
    path = jobs_dir() / "locks" / ".guard"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lock(run: str, job_id: str, kind: str) -> None:
    path = _lock_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with _guard():
                holder = _holder(path)
                if holder is not None:
                    busy = {"train": "is already training", "optimize": "is being made by aigc optimize"}.get(
                        holder.get("kind"), "is being evaluated")
                    raise Conflict(f"run {run!r} {busy} (job {holder.get('job')})") from None
                path.unlink(missing_ok=True)  # stale: its job is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"job": job_id, "kind": kind, "pid": os.getpid()}, f)
        return
    raise Conflict(f"run {run!r} is busy: try again")


def _holder(path: Path) -> dict | None:
    """The lock's content while its job is alive (or being started); None for a stale or absent lock."""
    try:
        text, mtime = path.read_text(encoding="utf-8"), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}  # being written
    job_id = holder.get("job") if isinstance(holder, dict) else None
    record = jobs_dir() / job_id / RECORD if isinstance(job_id, str) and _ID.fullmatch(job_id) else None
    if record is not None and record.is_file():
        return holder if _alive(read_json(record)) else None
    return holder if time.time() - mtime < START_GRACE_S else None


def _unlock(run: str, job_id: str) -> None:
    path = _lock_path(run)
    with _guard():
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return
        if isinstance(holder, dict) and holder.get("job") == job_id:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------
# reading


def get_job(job_id: str) -> dict:
    """job.json plus `status` (running, done, failed, interrupted), `stopping`, `wall_s`, `result` (the child's
    JSON, when done), `error` (its last error line, when failed); a training also `step`, `steps_goal`,
    `elapsed_s`, `progress` (0..1), `eta_s` (None until it can be estimated), `curve`, and `stage` (with
    stage_done, stage_total, stage_unit: `_progress`)."""
    job = _refresh(_read(job_id))
    folder = jobs_dir() / job["id"]
    status = _status(job, folder)
    ended = _parse_time(job["ended"]) if job["ended"] else time.time()
    view = {**job, "status": status, "stopping": status == "running" and job.get("stop_requested") is not None,
            "wall_s": max(0.0, ended - _parse_time(job["started"])),
            "result": _result(folder) if status == "done" else None,
            "error": _error(folder, job["returncode"]) if status == "failed" else None}
    if job["kind"] in ("train", "optimize"):  # both train a run whose metrics.jsonl shows the progress
        view.update(_progress(job, status))
    else:
        view.update(progress=1.0 if status == "done" else None, eta_s=0.0 if status == "done" else None)
    return view


def list_jobs() -> list[dict]:
    """Every job, newest first, as get_job gives it but without the `curve` (get_job has it)."""
    root = jobs_dir()
    ids = sorted((p.name for p in root.iterdir() if _ID.fullmatch(p.name) and (p / RECORD).is_file()),
                 reverse=True) if root.is_dir() else []
    return [{k: v for k, v in get_job(job_id).items() if k != "curve"} for job_id in ids]


def stop_job(job_id: str) -> dict:
    """Ctrl-C for a job: SIGINT to its process group (a training finishes its step, saves its checkpoint and ends
    `interrupted`; `aigc train --resume` continues it). Sent once; a job that has ended is left as it is."""
    job = get_job(job_id)
    if job["status"] != "running" or job.get("stop_requested") is not None:
        return job
    with _REAPING:  # job.json is written by one thread at a time (its end, or this)
        record = _read(job["id"])
        if record["ended"] is None and record.get("stop_requested") is None:
            record["stop_requested"] = store.now()
            write_json(jobs_dir() / job["id"] / RECORD, record)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job["pid"], signal.SIGINT)  # start_new_session: the child leads its own group
    return get_job(job_id)


def _read(job_id: str) -> dict:
    path = jobs_dir() / job_id / RECORD if isinstance(job_id, str) and _ID.fullmatch(job_id) else None
    if path is None or not path.is_file():
        raise NotFound(f"no such job: {job_id!r}")
    return read_json(path)


def _alive(job: dict) -> bool:
    child = _CHILDREN.get(job["id"])
    if child is not None:
        return child.poll() is None  # polling reaps it once it has ended
    if job["ended"] is not None:
        return False
    try:
        process = psutil.Process(job["pid"])
        same = job.get("pid_created") is None or abs(process.create_time() - job["pid_created"]) < 1.0
        return same and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _refresh(job: dict) -> dict:
    """The job with its end recorded (and its lock released) once it has ended."""
    if job["ended"] is not None and job["id"] not in _CHILDREN:
        return job
    with _REAPING:
        job = _read(job["id"])
        if _alive(job):
            return job
        child = _CHILDREN.pop(job["id"], None)
        if child is not None:
            job["returncode"] = child.returncode
        if job["ended"] is None:
            logs = [jobs_dir() / job["id"] / f for f in ("stdout.log", "stderr.log")]
            # its end as seen here, or (a child of another process) when it last wrote
            last = time.time() if child is not None else max(p.stat().st_mtime for p in logs if p.exists())
            job["ended"] = datetime.fromtimestamp(last, UTC).isoformat(timespec="seconds")
        write_json(jobs_dir() / job["id"] / RECORD, job)
    _unlock(job["run"], job["id"])
    return job


def _status(job: dict, folder: Path) -> str:
    if job["ended"] is None:
        return "running"
    code = job["returncode"]  # None: it ended without this process watching it (a server restarted since)
    if code == 0 or (code is None and _result(folder) is not None):
        return "done"
    # the CLI exits 130 on Ctrl-C; a stop that came while Python was still starting is as the user asked too
    if code in (130, -signal.SIGINT) or job.get("stop_requested") is not None:
        return "interrupted"
    if code is not None:
        return "failed"
    run_dir = store.runs_dir() / job["run"]
    if job["kind"] in ("train", "optimize") and store.is_run(run_dir) and \
            store.read_run(run_dir).get("status") == "interrupted":
        return "interrupted"
    error = _error(folder, None)
    return "interrupted" if error and error.startswith("interrupted") else "failed"


def _result(folder: Path) -> dict | None:
    """The JSON object the child printed last on stdout."""
    try:
        lines = (folder / "stdout.log").read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _error(folder: Path, returncode: int | None) -> str | None:
    """The child's last `error: ...` line (without `error: `), else its last line on stderr."""
    path = folder / "stderr.log"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - TAIL_BYTES))
            lines = [line.strip() for line in f.read().decode("utf-8", errors="replace").splitlines()]
    except FileNotFoundError:
        lines = []
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    if lines:
        return lines[-1]
    if returncode is not None and returncode < 0:
        return f"the process was killed by {signal.Signals(-returncode).name}"
    return None


def _progress(job: dict, status: str) -> dict:
    """step, steps_goal, elapsed_s (training time), progress, eta_s and curve, from the run's files; and the stage
    it is in: "preparing" (nothing to count yet), "training" (the steps of metrics.jsonl), or the one its
    stage.json names (aigc optimize: "counting", "scoring", "judging"; store.Stage), whose done / total (in
    stage_unit) are then the progress and give the ETA."""
    run_dir = store.runs_dir() / job["run"]
    record = store.read_run(run_dir) if store.is_run(run_dir) else {}
    budget = record.get("budget") or _budget_of(job["args"])
    max_steps, max_minutes = budget.get("max_steps"), budget.get("max_minutes")
    step, elapsed, schedule, losses, vals = 0, None, None, {}, {}
    for line in _metrics(run_dir / "metrics.jsonl"):
        step = max(step, line.get("step", 0))
        if "elapsed_s" in line:
            elapsed = line["elapsed_s"]
        if "schedule_steps" in line:
            schedule = line["schedule_steps"]
        if "loss" in line:
            losses[line["step"]] = line["loss"]
        if "val_loss" in line:
            vals[line["step"]] = line["val_loss"]
    goal = schedule or max_steps
    if status == "done":
        progress = 1.0
    elif max_minutes:  # by time, or by steps where a step budget ends it first
        progress = max((elapsed or 0.0) / (max_minutes * 60), step / max_steps if max_steps else 0.0)
    else:
        progress = step / goal if goal else 0.0
    progress = min(1.0, progress)
    eta = None
    if status == "done":
        eta = 0.0
    elif status == "running" and elapsed and step:
        remaining = []
        if max_minutes:
            remaining.append(max_minutes * 60 - elapsed)
        if goal:
            remaining.append((goal - step) * elapsed / step)
        eta = max(0.0, min(remaining)) if remaining else None
    view = {"step": step, "steps_goal": goal, "elapsed_s": elapsed, "progress": progress, "eta_s": eta,
            "checkpoint": (run_dir / "checkpoints" / "last").is_dir(), "curve": _curve(losses, vals),
            "stage": "training" if max_steps or max_minutes or step else "preparing",
            "stage_done": None, "stage_total": None, "stage_unit": None}
    stage = store.read_stage(run_dir) if store.is_run(run_dir) else None
    if stage is not None:  # a stage after or instead of the training steps (aigc optimize: counting, judging)
        done, total = stage["done"], stage["total"]
        view.update(stage=stage["stage"], stage_done=done, stage_total=total, stage_unit=stage.get("unit"))
        if status == "running":
            spent = max(0.0, stage.get("updated", 0.0) - stage.get("started", 0.0))
            view.update(progress=min(1.0, done / total) if total else 0.0,
                        eta_s=(total - done) * spent / done if done and spent else None)
    return view


def _budget_of(args: list[str]) -> dict:
    """The budget a job asked for, from its argv (before the run's record has the one it trains with)."""
    flags = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--max-") and "=" in a)
    return {"max_steps": int(flags["max-steps"]) if "max-steps" in flags else None,
            "max_minutes": float(flags["max-minutes"]) if "max-minutes" in flags else None}


def _metrics(path: Path) -> list[dict]:
    """The lines of metrics.jsonl (a last line being written is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("step"), int):
            lines.append(value)
    return lines


def _curve(losses: dict[int, float], vals: dict[int, float]) -> list[dict]:
    """[{step, loss, val_loss}] by step: the training and the validation losses each thinned evenly to half of
    CURVE_POINTS (the last of each kept), then merged."""
    keep = set(_thin(sorted(losses), CURVE_POINTS // 2)) | set(_thin(sorted(vals), CURVE_POINTS // 2))
    return [{"step": s, "loss": losses.get(s), "val_loss": vals.get(s)} for s in sorted(keep)]


def _thin(steps: list[int], n: int) -> list[int]:
    if len(steps) <= n:
        return steps
    return [steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)]


def _created(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()
