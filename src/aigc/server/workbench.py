"""The studio's actions as /v1 endpoints, for the web studio and any application alike (docs/studio.md): a
model's generation controls, details (with its lineage), preview and what its feedback allows; the named data sets
and uploads; training and evaluation jobs, and optimizations from feedback; the arena (battles, votes, the
leaderboard); sweeps (their trials, importances, best); how to make a stored generation again.

Every route is a thin front on the service layer (aigc.service, aigc.uploads, aigc.jobs, aigc.db and
aigc.evaluate.arena), as the rest of the API is.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import random
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from PIL import Image

from aigc import jobs, service, store, uploads
from aigc.errors import BadRequest, Conflict, NotFound
from aigc.evaluate import arena
from aigc.fsutil import json_safe, read_json
from aigc.modalities.music import sampling_before
from aigc.server import schemas
from aigc.server.limits import ApiError

# which fields of a request body a person sets in the studio, by modality; the rest are advanced (folded away)
BASIC = {"text": ("max_tokens", "temperature", "n", "best_of"), "image": ("n", "steps", "guidance_scale", "best_of"),
         "series": ("horizon", "paths", "level"), "music": ("n", "bars", "temperature"),
         "video": ("n", "steps", "guidance_scale"), "sound": ("n", "steps")}
# the API's field -> the service's option (where the names differ)
OPTION_OF = {"max_tokens": "max_new_tokens"}
CONTROLS = {  # the body fields the studio shows, by modality (an image family adds its sampler options)
    "text": ("max_tokens", "temperature", "n", "top_k", "top_p", "min_p", "repetition_penalty", "num_beams",
             "no_repeat_ngram_size"),
    "image": ("n",),
    "series": ("horizon", "level", "paths", "noise"),
    "music": ("n", "bars", "temperature", "top_k", "top_p", "constrained", "grammar_version"),
    "video": ("n",),  # a diffusion clip generator adds its sampler options
    "sound": ("n",),
}
REQUESTS = {"text": schemas.CompletionRequest, "image": schemas.ImageRequest, "series": schemas.ForecastRequest,
            "music": schemas.AudioRequest, "video": schemas.VideoRequest, "sound": schemas.AudioRequest}
PRESETS = {"quick": 2.0, "good": 10.0}  # training presets: minutes
RUN_FILES = (".png", ".html", ".md", ".json", ".jsonl", ".csv", ".toml")  # a run's files the API serves
PREVIEW_TEXT = {"n": 3, "max_new_tokens": 60}
ARENA_TOKENS = 60  # tokens each side of a text battle writes
ARENA_BARS = 4  # bars each side of a music battle composes (a preview: as many)
CLASSED = ("image", "video", "sound")  # the arena's modalities whose prompt is the class both sides draw
MAX_CURVE = 500  # points of a loss curve returned


@dataclasses.dataclass
class Context:
    """What the routes need of the app that installs them (aigc.server.app.create_app)."""

    db: object  # aigc.db.Store
    config: object  # aigc.server.app.ServerConfig
    caller: Callable  # the dependency that checks the key and the rate limit; gives the key's id
    model_path: Callable  # model id -> (modality, directory)
    start: Callable  # (request, work(emit, cancel), kind) -> Job: work off the event loop, in the queue
    source: Callable  # request -> the generation's source ("api", or "studio" from the studio's pages)


def install(app: FastAPI, ctx: Context) -> None:
    db, config = ctx.db, ctx.config
    previews: dict[tuple, dict] = {}

    def run_dir(model: str) -> Path:
        if model in config.models:
            raise ApiError(400, f"model {model!r} is a --model folder, not a run: it has no training record",
                           param="model")
        return ctx.model_path(model)[1]

    # ------------------------------------------------------------------ models, for people

    @app.get("/v1/models/{model}/controls", summary="the generation options a model takes, with ranges and defaults")
    def controls(model: str, key_id: str | None = Depends(ctx.caller)):
        modality, path = ctx.model_path(model)
        defaults = service.generation_defaults(str(path))
        window = ("window",) if defaults.get("window") is not None else ()  # a gpt's
        if model in config.models:
            return {"model": model, "modality": "text", "family": "hf", "classes": None,
                    "controls": _controls("text", window, defaults)}
        record = store.read_run(path)
        fam = service.FAMILIES[record["family"]]
        extra = tuple(o for o in fam.sampler_options if o != "guidance_scale" or record.get("num_classes"))
        extra += window + (("best_of",) if "best_of" in defaults else ())  # a reward model's run: best of N
        if modality == "sound":  # the audio endpoint takes a diffusion run's steps of the sampling options
            extra = tuple(o for o in extra if o in schemas.AudioRequest.model_fields)
        classes = record.get("class_names") or ([str(i) for i in range(record["num_classes"])]
                                                if record.get("num_classes") else None)
        return {"model": model, "modality": modality, "family": record["family"], "classes": classes,
                "openings": service.openings(str(path)) if modality == "music" else None,
                "controls": _controls(modality, extra, defaults)}

    @app.get("/v1/models/{model}/feedback", summary="what the ratings and votes stored for a run allow: counts, and "
                                                    "which aigc optimize methods can start (or why not)")
    def feedback(model: str, key_id: str | None = Depends(ctx.caller)):
        return service.feedback_summary(str(run_dir(model)), db)

    @app.get("/v1/models/{model}/details", summary="a run's record, metrics, loss curve, files and baseline")
    def details(model: str, key_id: str | None = Depends(ctx.caller)):
        path = run_dir(model)
        row = store.summary(path)
        record = store.read_run(path)
        evaluation = read_json(path / "eval.json") if (path / "eval.json").is_file() else None
        files = sorted(str(f.relative_to(path)) for f in path.rglob("*")
                       if f.is_file() and f.suffix in RUN_FILES and "checkpoints" not in f.parts
                       and not f.name.startswith("."))
        return json_safe({"id": model, **{k: row[k] for k in ("family", "modality", "data", "status", "created",
                                                               "steps", "score")},
                          "metrics": record.get("metrics") or {}, "eval": (evaluation or {}).get("metrics"),
                          "budget": record.get("budget"), "curve": _curve(path / "metrics.jsonl"),
                          "files": files, "baseline": _baseline(config.runs, model, row),
                          "lineage": store.lineage(record, config.runs),
                          "report": "report.html" if "report.html" in files else None})

    @app.get("/v1/models/{model}/files/{name:path}", summary="a file of a run (report, pictures, metrics)")
    def run_file(model: str, name: str, key_id: str | None = Depends(ctx.caller)):
        path = run_dir(model)
        target = (path / name).resolve()
        if (path not in target.parents or target.suffix not in RUN_FILES or "checkpoints" in target.parts
                or not target.is_file()):
            raise ApiError(404, f"run {model!r} has no file {name!r} (see GET /v1/models/{model}/details)")
        return FileResponse(target)

    @app.get("/v1/models/{model}/preview", summary="a few outputs at seed 0 with the defaults (not recorded)")
    async def preview(model: str, request: Request, key_id: str | None = Depends(ctx.caller)):
        modality, path = ctx.model_path(model)
        signature = (model, service.weights_sha256(path))
        if signature in previews:
            return previews[signature]
        options = {"text": PREVIEW_TEXT, "image": {"n": 8}, "series": {"horizon": 24, "paths": 20},
                   "music": {"n": 1, "bars": ARENA_BARS}, "video": {"n": 2}, "sound": {"n": 1}}[modality]
        if modality in ("image", "video", "sound") and store.read_run(path).get("num_classes"):
            options = {**options, "class_": "0"}

        def work(emit, cancel):
            return service.generate(str(path), options, seed=0, cancel=cancel)

        generation = await (await ctx.start(request, work, "text" if modality == "text" else "other")).result()
        previews[signature] = {"model": model, "modality": modality, "seed": 0, **_shown(generation)}
        return previews[signature]

    # ------------------------------------------------------------------ data

    @app.get("/v1/datasets", summary="named data sets (installed or not) and uploads, by modality")
    def datasets(key_id: str | None = Depends(ctx.caller)):
        return {"object": "list", "data": service.datasets(), "uploads": uploads.list_uploads()}

    @app.post("/v1/uploads", summary="upload data to train on (the raw file as the body)",
              responses={413: {"model": schemas.ErrorResponse, "description": "over the upload cap"}})
    async def upload(request: Request, kind: str, filename: str = "upload",
                     key_id: str | None = Depends(ctx.caller)):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_upload_bytes:
            raise ApiError(413, _too_large(config.max_upload_bytes), code="upload_too_large")
        job = uploads.Upload.begin(kind, filename, config.max_upload_bytes)
        try:
            async for chunk in request.stream():
                job.write(chunk)
        except BaseException:
            job.abort()
            raise
        return await _off_loop(job.finish)

    @app.get("/v1/uploads", summary="uploads, newest first")
    def list_uploads(key_id: str | None = Depends(ctx.caller)):
        return {"object": "list", "data": uploads.list_uploads()}

    @app.get("/v1/uploads/{upload_id}", summary="one upload")
    def get_upload(upload_id: str, key_id: str | None = Depends(ctx.caller)):
        return uploads.get_upload(upload_id)

    # ------------------------------------------------------------------ training and evaluation jobs

    def check_runs_dir() -> None:
        if Path(config.runs).resolve() != store.runs_dir().resolve():
            raise ApiError(409, f"jobs write runs into {store.runs_dir()}, and this server serves --runs "
                                f"{config.runs}: serve $AIGC_HOME/runs to train from the API")

    @app.post("/v1/training", summary="start training a run (a separate process); returns the job")
    def start_training(body: schemas.TrainingRequest, key_id: str | None = Depends(ctx.caller)):
        check_runs_dir()
        if not body.data.startswith("upl-") and body.data not in {row["name"] for row in service.datasets()}:
            raise ApiError(400, f"data {body.data!r}: give a named data set (GET /v1/datasets) or an upload id "
                                f"(POST /v1/uploads)", param="data")
        data, sets = service.training_data(body.data, body.sets)  # an upload: its files and the keys they need
        if body.minutes is not None and body.preset is not None:
            raise ApiError(400, "give minutes or preset, not both", param="preset")
        minutes = PRESETS[body.preset] if body.preset else body.minutes
        if service.FAMILIES[body.family].trainer != "gradient":
            minutes = None  # fitted in closed form: no time budget
        elif minutes is None:
            minutes = PRESETS["quick"]
        return jobs.start_training(family=body.family, data=data, name=body.name, minutes=minutes,
                                   sets=sets or None, conditional=bool(body.conditional))

    @app.post("/v1/optimizations", summary="a new run from a run and the feedback stored for it (aigc optimize, a "
                                           "separate process); returns the job")
    def start_optimization(body: schemas.OptimizationRequest, key_id: str | None = Depends(ctx.caller)):
        check_runs_dir()
        run_dir(body.model)
        return jobs.start_optimization(body.model, body.method, name=body.name, max_steps=body.max_steps,
                                       sets=body.sets or None, database=ctx.db.url)

    @app.post("/v1/evaluations", summary="evaluate a run (a separate process); returns the job")
    def start_evaluation(body: schemas.EvaluationRequest, key_id: str | None = Depends(ctx.caller)):
        check_runs_dir()
        run_dir(body.model)
        return jobs.start_evaluation(body.model)

    @app.get("/v1/jobs", summary="training and evaluation jobs, newest first")
    def list_jobs(key_id: str | None = Depends(ctx.caller)):
        return {"object": "list", "data": [_job(j) for j in jobs.list_jobs()]}

    @app.get("/v1/jobs/{job_id}", summary="a job: status, progress, ETA, loss curve, result or error")
    def get_job(job_id: str, key_id: str | None = Depends(ctx.caller)):
        return _job(jobs.get_job(job_id))

    @app.post("/v1/jobs/{job_id}/stop", summary="stop a job (a training keeps its checkpoint)")
    def stop_job(job_id: str, key_id: str | None = Depends(ctx.caller)):
        return _job(jobs.stop_job(job_id))

    # ------------------------------------------------------------------ the arena

    @app.post("/v1/arena/battles", summary="two anonymous runs answer the same prompt")
    async def battle(body: schemas.BattleRequest, request: Request, key_id: str | None = Depends(ctx.caller)):
        if body.modality == "music" and body.prompt:
            raise ApiError(400, "a music battle takes no prompt: both runs compose a piece from nothing",
                           param="prompt")
        left, right = _opponents(config.runs, body.modality, body.prompt, body.models)
        seed = service.draw_seed(body.seed)
        options = {"text": {"prompt": body.prompt or "", "max_new_tokens": ARENA_TOKENS},
                   "image": {"n": 1, "class_": body.prompt or None},
                   "music": {"n": 1, "bars": ARENA_BARS},
                   "video": {"n": 1, "class_": body.prompt or None},
                   "sound": {"n": 1, "class_": body.prompt or None}}[body.modality]
        requested = {"endpoint": "arena", "modality": body.modality, "prompt": body.prompt, "seed": seed}

        def work(emit, cancel):
            made = []
            for path in (left, right):
                generation = service.generate(str(path), options, seed=seed, cancel=cancel)
                [gen_id] = service.record(generation, db, source=ctx.source(request), key_id=key_id,
                                          request={**requested, "model": path.name})
                made.append((gen_id, generation))
            row = db.add_battle(modality=body.modality, prompt=body.prompt, left_id=made[0][0],
                                right_id=made[1][0], key_id=key_id)
            return row, made

        kind = "text" if body.modality == "text" else "other"
        row, made = await (await ctx.start(request, work, kind)).result()
        sides = {side: {"generation_id": gen_id, **_shown(generation, request, gen_id)}
                 for side, (gen_id, generation) in zip(("left", "right"), made, strict=True)}
        return {"id": row["id"], "object": "battle", "modality": body.modality, "prompt": body.prompt, "seed": seed,
                **sides, "vote": None}

    @app.get("/v1/arena/battles/{battle_id}", summary="a battle (its runs are named once it has a vote)")
    def get_battle(battle_id: str, request: Request, key_id: str | None = Depends(ctx.caller)):
        return _battle(db.get_battle(battle_id), request)

    @app.post("/v1/arena/battles/{battle_id}/vote", summary="vote: left, right, tie or both_bad; names the runs")
    def vote(battle_id: str, body: schemas.VoteRequest, request: Request, key_id: str | None = Depends(ctx.caller)):
        return _battle(db.vote_battle(battle_id, body.winner, key_id=key_id), request)

    @app.get("/v1/arena/leaderboard", summary="runs ranked by Bradley-Terry (Elo scale), 95% bootstrap intervals")
    def leaderboard(modality: str = "text", key_id: str | None = Depends(ctx.caller)):
        if modality not in schemas.ARENA_MODALITIES:
            raise ApiError(400, f"modality must be one of {', '.join(schemas.ARENA_MODALITIES)}", param="modality")
        votes = db.list_votes(modality=modality)
        rows = arena.leaderboard(votes)
        scores = {r["name"]: r["score"] for r in store.list_runs(config.runs)}
        return json_safe({"object": "list", "modality": modality, "votes": len(votes),
                          "data": [{**r, "metric": scores.get(r["run"])} for r in rows]})

    # ------------------------------------------------------------------ sweeps

    @app.get("/v1/sweeps", summary="the studies of aigc sweep in the store's database, newest first")
    def list_sweeps(key_id: str | None = Depends(ctx.caller)):
        return json_safe({"object": "list", "data": service.sweeps(db.url, config.runs)})

    @app.get("/v1/sweeps/{name}", summary="a sweep: its trials, search space, importances and best trial")
    def get_sweep(name: str, key_id: str | None = Depends(ctx.caller)):
        return json_safe({"object": "sweep", **service.sweep(name, db.url, config.runs)})

    # ------------------------------------------------------------------ making a generation again

    @app.get("/v1/generations/{generation_id}/replay", summary="the request that makes a generation again")
    def replay(generation_id: str, request: Request, key_id: str | None = Depends(ctx.caller)):
        return _replay(db.get_generation(generation_id), str(request.base_url).rstrip("/"))


async def _off_loop(work: Callable):
    return await asyncio.get_running_loop().run_in_executor(None, work)


def _too_large(cap: int) -> str:
    return f"the upload is over the cap of {cap / 2**20:g} MB (aigc serve --max-upload-mb N raises it)"


def _controls(modality: str, extra: tuple[str, ...], defaults: dict) -> list[dict]:
    """The body fields a person sets, described from the request's own schema (ranges, help) and the service's
    defaults: one declaration for the API's checks and the studio's controls."""
    schema = REQUESTS[modality].model_json_schema()
    properties, out = schema["properties"], []
    for name in (*CONTROLS[modality], *extra):
        spec = properties[name]
        kinds = [s for s in spec.get("anyOf", [spec]) if s.get("type") != "null"]
        kind = kinds[0] if kinds else spec
        control = {"name": name, "type": "choice" if "enum" in kind else kind.get("type", "string"),
                   "help": spec.get("description", ""), "default": defaults.get(OPTION_OF.get(name, name)),
                   "advanced": name not in BASIC[modality]}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum"):
            if key in kind:
                control[{"enum": "choices"}.get(key, key)] = kind[key]
        out.append(json_safe(control))
    return out


def _curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if "loss" in row or "val_loss" in row:
                rows.append({k: row[k] for k in ("step", "loss", "val_loss", "elapsed_s") if k in row})
    stride = max(1, len(rows) // MAX_CURVE)
    return [r for i, r in enumerate(rows) if i % stride == 0 or "val_loss" in r]


def _baseline(root: Path, model: str, row: dict) -> dict | None:
    """The reference a run's headline is read against: for text, an n-gram run on the same data (the best one)."""
    if row["modality"] != "text" or row["family"] == "ngram":
        return None
    rivals = [r for r in store.list_runs(root) if r["family"] == "ngram" and r["data"] == row["data"]
              and r["status"] == "done" and r.get("val_bpc") is not None]
    if not rivals:
        return {"run": None, "family": "ngram", "val_bpc": None,
                "hint": f"no n-gram run on {row['data']}: train one (family ngram, a few seconds) to compare"}
    best = min(rivals, key=lambda r: r["val_bpc"])
    return {"run": best["name"], "family": "ngram", "val_bpc": best["val_bpc"]}


def _shown(generation, request: Request | None = None, gen_id: str | None = None) -> dict:
    """A generation's outputs as a page shows them: texts, PNGs (data URLs, or the stored file's URL), a forecast,
    music pieces (WAV and piano roll: data URLs, or the stored files' URLs)."""
    if generation.modality == "text":
        prompt = generation.record["settings"].get("prompt") or ""
        return {"texts": [s[len(prompt):] for s in generation.outputs], "prompt": prompt}
    if generation.modality == "image":
        if request is not None and gen_id is not None:
            return {"images": [str(request.url_for("generation_file", generation_id=gen_id))]}
        pictures = []
        for pixels in generation.outputs:
            buffer = io.BytesIO()
            Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
            pictures.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        return {"images": pictures}
    if generation.modality == "video":
        if request is not None and gen_id is not None:
            return _clips(generation.record["clips"], request, gen_id)
        with tempfile.TemporaryDirectory() as tmp:  # not recorded: the files travel in the answer
            service.save(generation, Path(tmp))
            return {"clips": [{"gif": _data_url(Path(tmp) / f"{i:03d}.gif", "image/gif"),
                               "mp4": _data_url(Path(tmp) / f"{i:03d}.mp4", "video/mp4"), "seed": rec["seed"]}
                              for i, rec in enumerate(generation.record["clips"])],
                    "sheet": _data_url(Path(tmp) / "sheet.png", "image/png"),
                    "job": generation.record["settings"]["job"]}
    if generation.modality == "music":
        if request is not None and gen_id is not None:
            return {"pieces": _pieces(generation.outputs, request, gen_id)}
        with tempfile.TemporaryDirectory() as tmp:  # not recorded: the files travel in the answer
            service.save(generation, Path(tmp))
            return {"pieces": [{"wav": _data_url(Path(tmp) / f"{i:03d}.wav", "audio/wav"),
                                "roll": _data_url(Path(tmp) / f"{i:03d}.png", "image/png"),
                                "bars": o["bars"], "notes": o["notes"]} for i, o in enumerate(generation.outputs)]}
    if generation.modality == "sound":
        if request is not None and gen_id is not None:
            return {"pieces": _sounds(generation.record["sounds"], request, gen_id)}
        # a preview (not recorded): the WAV and the spectrogram as data URLs
        with tempfile.TemporaryDirectory() as tmp:
            service.save(generation, Path(tmp))
            return {"pieces": [{"wav": _data_url(Path(tmp) / f"{i:03d}.wav", "audio/wav"),
                                "roll": _data_url(Path(tmp) / f"{i:03d}.png", "image/png"), "sound": True,
                                "cls": rec["class_name"]} for i, rec in enumerate(generation.record["sounds"])]}
    return {"forecast": forecast_of(generation)}


def _pieces(outputs: list[dict], request: Request, gen_id: str) -> list[dict]:
    """A stored music generation's pieces as a page plays and shows them: the URLs of each one's WAV, piano roll
    and MIDI file (GET /v1/generations/{id}/files/NNN.wav ...), its bars and notes."""
    def url(name: str) -> str:
        return str(request.url_for("generation_files", generation_id=gen_id, name=name))

    return [{"wav": url(f"{i:03d}.wav"), "roll": url(f"{i:03d}.png"), "midi": url(f"{i:03d}.mid"),
             "bars": o["bars"], "notes": o["notes"]} for i, o in enumerate(outputs)]


def _sounds(records: list[dict], request: Request, gen_id: str) -> list[dict]:
    """A stored sound generation's sounds as a page plays and shows them: the URLs of each one's WAV and spectrogram
    (GET /v1/generations/{id}/files/NNN.wav, NNN.png) and its class."""
    def url(name: str) -> str:
        return str(request.url_for("generation_files", generation_id=gen_id, name=name))

    return [{"wav": url(f"{i:03d}.wav"), "roll": url(f"{i:03d}.png"), "sound": True, "cls": rec.get("class_name")}
            for i, rec in enumerate(records)]


def _clips(records: list[dict], request: Request, gen_id: str) -> dict:
    """A stored video generation's clips as a page plays them: the URLs of each clip's GIF and MP4 and of the frame
    sheet (GET /v1/generations/{id}/files/NNN.gif, NNN.mp4, sheet.png)."""
    def url(name: str) -> str:
        return str(request.url_for("generation_files", generation_id=gen_id, name=name))

    return {"clips": [{"gif": url(f"{i:03d}.gif"), "mp4": url(f"{i:03d}.mp4"), "seed": rec.get("seed")}
                      for i, rec in enumerate(records)],
            "sheet": url("sheet.png"), "job": "predict" if any("context" in rec for rec in records) else "generate"}


def _data_url(path: Path, media_type: str) -> str:
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


def forecast_of(generation) -> dict:
    """A forecast as the API answers it: the outputs, and the end of the series it continues (for a chart)."""
    forecast = {k: v for k, v in json_safe(generation.outputs).items() if k != "run"}
    series = generation.extra.get("series")
    if series is not None:
        shown = min(len(series.values), max(3 * len(forecast["forecast"]), 48), 500)
        forecast["history"] = json_safe({"time": list(series.time[-shown:]), "values": list(series.values[-shown:])})
    return forecast


def _opponents(root: Path, modality: str, prompt: str | None, models: list[str] | None) -> tuple[Path, Path]:
    """Two different finished runs of `modality` that can answer `prompt` (image runs: the same classes), drawn
    at random unless `models` names them."""
    runs = [r for r in store.list_runs(root) if r["modality"] == modality and r["status"] == "done"]
    if models:
        named = {r["name"]: r for r in runs}
        missing = [m for m in models if m not in named]
        if missing:
            raise NotFound(f"no finished {modality} run {missing[0]!r} to battle")
        runs = [named[m] for m in models]
    if modality in CLASSED:
        runs = [r for r in runs if _draws(Path(r["path"]), prompt)]
    if modality == "video" and not models:  # clips against clips, predictions against predictions
        jobs_of = {r["name"]: store.read_run(Path(r["path"])).get("job") for r in runs}
        paired = [job for job in sorted(set(jobs_of.values())) if sum(j == job for j in jobs_of.values()) >= 2]
        if paired:  # a job with two runs or more, at random
            job = random.SystemRandom().choice(paired)
            runs = [r for r in runs if jobs_of[r["name"]] == job]
    if len({r["name"] for r in runs}) < 2:
        what = f"that can draw class {prompt!r}" if modality in CLASSED and prompt else ""
        raise Conflict(f"the arena needs two finished {modality} runs {what}; there are {len(runs)} "
                       f"(train another in Train)")
    left, right = random.SystemRandom().sample(runs, 2)
    return Path(left["path"]), Path(right["path"])


def _draws(path: Path, prompt: str | None) -> bool:
    record = store.read_run(path)
    if not record.get("num_classes"):
        return not prompt
    names = record.get("class_names") or [str(i) for i in range(record["num_classes"])]
    return bool(prompt) and (prompt in names or (prompt.isdigit() and int(prompt) < len(names)))


def _battle(row: dict, request: Request) -> dict:
    """A battle as a client sees it: the outputs; the runs only once it has a vote."""
    voted = row.get("vote") is not None
    sides = {}
    for side in ("left", "right"):
        gen = row[side]
        shown = {"generation_id": gen["id"]}
        if gen["modality"] == "text":
            shown["texts"] = [t[len(gen["request"].get("prompt") or ""):] for t in gen["output"] or []]
        elif gen["modality"] == "image":
            shown["images"] = [str(request.url_for("generation_file", generation_id=gen["id"]))]
        elif gen["modality"] == "music":
            shown["pieces"] = _pieces(gen["output"] or [], request, gen["id"])
        elif gen["modality"] == "video":
            shown.update(_clips(gen["output"] or [], request, gen["id"]))
        elif gen["modality"] == "sound":
            shown["pieces"] = _sounds(gen["output"] or [], request, gen["id"])
        if voted:
            shown["run"] = gen["run"]
            shown["family"] = gen.get("family")
        sides[side] = shown
    return json_safe({"id": row["id"], "object": "battle", "modality": row["modality"], "prompt": row["prompt"],
                      "seed": row["left"].get("seed"), **sides,
                      "vote": {"winner": row["vote"]["winner"], "created": row["vote"]["created"]} if voted else None})


def _job(row: dict) -> dict:
    return json_safe({"object": "job", **row})


def _replay(row: dict, base_url: str) -> dict:
    """The body, curl call and `aigc generate` command that make a stored generation again (same seed, same
    options: the same text or pixels), or why not."""
    request, seed, run = dict(row["request"]), row.get("seed"), row["run"]
    endpoint = request.pop("endpoint", None)
    modality = row["modality"]
    if modality == "text":
        prompt = request.get("prompt")
        if endpoint == "chat":
            prompt = next((m.get("content") for m in reversed(request.get("messages", [])) if m.get("role") == "user"),
                          "")
        body = {"model": run, "prompt": prompt or "", "seed": seed}
        for field in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "num_beams",
                      "no_repeat_ngram_size", "stop", "n", "best_of"):
            value = request.get(field, request.get(OPTION_OF.get(field, "")))
            if value is not None:
                body[field] = value
        body["window"] = request.get("window", 0)  # a row made before the window read all the model's positions
        if row.get("rerank"):  # the k it was picked with, whatever the run's own default is by now
            body["best_of"] = row["rerank"]["best_of"]
        if endpoint == "arena":
            body["max_tokens"] = ARENA_TOKENS
        path, cli = "/v1/completions", ["aigc", "generate", run, "--prompt", body["prompt"]]
    elif modality == "image":
        # one row per image, with its own seed: n=1 at that seed draws the same pixels
        body = {"model": run, "prompt": request.get("prompt") or request.get("class_") or "", "n": 1,
                "seed": seed, "response_format": "b64_json"}
        for field in ("sampler", "steps", "eta", "guidance_scale", "truncation"):
            if request.get(field) is not None:
                body[field] = request[field]
        if row.get("rerank") or (request.get("best_of") or 1) > 1:
            body["best_of"] = 1  # the image kept has its own seed: alone, it is drawn again as it was
        path, cli = "/v1/images/generations", ["aigc", "generate", run, "-n", "1"]
        if body["prompt"]:
            cli += ["--class", body["prompt"]]
    elif modality == "music":
        body = {"model": run, "seed": seed}
        for field in ("n", "bars", "temperature", "top_k", "top_p", "best_of", "prompt_piece", "prompt_bars",
                      "harmonise_piece", "candidates", "prompt_midi_b64", "harmonise_midi_b64"):
            if request.get(field) is not None:
                body[field] = request[field]
        body["constrained"] = bool(request.get("constrained", False))  # a row made before it was sampled without
        body["window"] = request.get("window", 0)  # a row made before the window read all the model's positions
        body["grammar_version"] = request.get("grammar_version", 1)  # and before version 2 of the grammar
        for field, value in sampling_before(request).items():  # a row made before its sampling was stored
            body.setdefault(field, value)
        if row.get("rerank"):  # the k it was picked with, whatever the run's own default is by now
            body["best_of"] = row["rerank"]["best_of"]
        if endpoint == "arena":
            body.update(n=1, bars=ARENA_BARS)
        path, cli = "/v1/audio/generations", ["aigc", "generate", run]
    elif modality == "sound":
        body = {"model": run, "seed": seed}
        for field in ("n", "instrument", "steps"):
            if request.get(field) is not None:
                body[field] = request[field]
        if endpoint == "arena":  # one sound of the class the battle asked for
            body["n"] = 1
            if request.get("prompt"):
                body["instrument"] = request["prompt"]
        path, cli = "/v1/audio/generations", ["aigc", "generate", run]
    elif modality == "video":
        body = {"model": run, "prompt": request.get("prompt") or "", "seed": seed}
        for field in ("n", "sampler", "steps", "eta", "guidance_scale"):
            if request.get(field) is not None:
                body[field] = request[field]
        if endpoint == "arena":
            body["n"] = 1
        path, cli = "/v1/videos/generations", ["aigc", "generate", run]
        if body["prompt"]:
            cli += ["--class", body["prompt"]]
    else:
        body = {"model": run, "horizon": request.get("horizon"), "seed": seed}
        for field in ("level", "paths", "noise", "best_of"):
            if request.get(field) is not None:
                body[field] = request[field]
        if row.get("rerank"):  # the k its paths were picked with
            body["best_of"] = row["rerank"]["best_of"]
        path, cli = "/v1/forecasts", ["aigc", "generate", run]
    if body.get("seed") is None:
        raise BadRequest(f"generation {row['id']!r} has no seed recorded: it cannot be made again")
    flags = {"max_tokens": "--max-new-tokens", "n": "-n", "instrument": "--class"}
    for field, value in body.items():
        if field in ("model", "prompt", "response_format") or (modality == "image" and field == "n"):
            continue
        if field.endswith("_midi_b64"):  # the CLI reads the file the request's MIDI was kept as
            cli += ["--" + field.removesuffix("_b64").replace("_", "-"),
                    str(uploads.kept_midi_path(base64.b64decode(value)))]
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool):  # a switch: --constrained / --no-constrained
                cli.append(("--" if item else "--no-") + field.replace("_", "-"))
                continue
            cli += [flags.get(field, "--" + field.replace("_", "-")), str(item)]
    curl = (f"curl -s {base_url}{path} -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body, ensure_ascii=False))}")
    return {"generation_id": row["id"], "endpoint": path, "body": body, "cli": shlex.join(cli), "curl": curl}
