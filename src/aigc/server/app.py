"""The HTTP API (FastAPI): OpenAI-compatible text, our images and forecasts, and the store of generations and
ratings. Every route is a thin front on aigc.service, as the CLI is: it turns a body into the service's
options, runs the work off the event loop (`Job`), records it (aigc.db), and shapes the answer.

Errors are OpenAI's shape with the right status, never 422 (`install_error_handlers`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline  # /docs with Swagger UI from the wheel, not a CDN
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc import __version__, service, store, studio
from aigc.data.video import FRAME_MS
from aigc.db import Store, new_id
from aigc.errors import BadRequest, Cancelled, Conflict, NotFound, TooLarge, UserError
from aigc.fsutil import json_safe
from aigc.server import schemas, workbench
from aigc.server.limits import ApiError, RateLimit, WorkQueue, error_body

log = logging.getLogger("aigc.server")
STATUS_OF = {BadRequest: 400, NotFound: 404, Conflict: 409, TooLarge: 413}
ERROR_RESPONSES = {status: {"model": schemas.ErrorResponse, "description": text} for status, text in {
    400: "invalid request", 401: "missing or wrong API key", 404: "no such model or generation",
    409: "the run is not ready (still training)", 413: "request body over the cap", 429: "rate limit",
    500: "error inside a model", 503: "queue full (Retry-After)", 507: "the server's disk is full"}.items()}
# the files in a generation's folder that the API serves (a music generation's pieces, a video generation's clips and
# frame sheet), with their media types
GENERATION_FILES = {".wav": "audio/wav", ".mid": "audio/midi", ".png": "image/png", ".json": "application/json",
                    ".gif": "image/gif", ".mp4": "video/mp4"}
# which modality an endpoint field belongs to, for the message about a field sent to the wrong endpoint
FIELD_OWNERS = {**{f: "video" for f in schemas.VideoRequest.model_fields},  # first: the others own shared fields
                **{f: "music" for f in schemas.AudioRequest.model_fields},
                **{f: "text" for f in schemas.CompletionRequest.model_fields | schemas.ChatRequest.model_fields},
                **{f: "image" for f in schemas.ImageRequest.model_fields},
                **{f: "series" for f in schemas.ForecastRequest.model_fields}}
ENDPOINTS = {"text": "/v1/completions or /v1/chat/completions", "image": "/v1/images/generations",
             "series": "/v1/forecasts", "music": "/v1/audio/generations", "video": "/v1/videos/generations",
             "sound": "/v1/audio/generations"}


@dataclasses.dataclass
class ServerConfig:
    runs: Path  # the runs directory served (new runs appear without a restart)
    models: dict[str, Path] = dataclasses.field(default_factory=dict)  # --model NAME=DIR: Hugging Face folders
    database: str | None = None  # None: aigc.db.default_url()
    max_body_bytes: int = 4 * 2**20
    max_upload_bytes: int = 100 * 2**20  # POST /v1/uploads (data to train on), streamed to disk
    rate_limit: int = 600  # requests a minute per key (or client address); 0 = off
    max_queue: int = 32  # generations waiting beyond those at work; then 503
    batching: bool = True  # concurrent text requests to one model share a decoding batch
    batch_rows: int = 16  # at most this many samples in a batch
    batch_window_ms: float = 50.0  # how long a batch waits at most for more requests (5 ms of quiet ends it)
    stream_interval_ms: float = 20.0  # streamed text reaches the clients at most this often (0: every token)


def create_app(config: ServerConfig) -> FastAPI:
    db = Store(config.database)
    limiter = RateLimit(config.rate_limit)
    # text: as many at work as a batch takes (they wait in the batcher and decode together); images and
    # forecasts: one at a time (each uses every core). Threads of their own, enough for both.
    service.configure_batching(config.batch_window_ms / 1000, config.batch_rows)
    queues = {"text": WorkQueue(config.batch_rows if config.batching else 1, config.max_queue),
              "other": WorkQueue(1, config.max_queue)}
    executor = ThreadPoolExecutor(max_workers=config.batch_rows + 2, thread_name_prefix="aigc-work")
    app = FastAPIOffline(title="AIGC Studio API", version=__version__, responses=ERROR_RESPONSES,
                  description="OpenAI-compatible text completions and chat, images and forecasts from your runs, "
                              "and the store of every generation and rating (docs/serve.md).")
    app.state.db, app.state.config = db, config
    install_error_handlers(app)
    _strip_422(app)

    def caller(request: Request) -> str | None:
        """The API key's id (None while no key exists), after the rate limit."""
        key_id = None
        if db.has_keys():
            scheme, _, secret = request.headers.get("authorization", "").partition(" ")
            key_id = db.check_key(secret.strip()) if scheme.lower() == "bearer" else None
            if key_id is None:
                raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key> "
                                    "(aigc keys create NAME makes one)", code="invalid_api_key")
        limiter.check(key_id or f"address:{request.client.host if request.client else '-'}")
        return key_id

    def model_path(model: str) -> tuple[str, Path]:
        """A model id -> (its modality, its directory); only names inside the runs directory and --model names."""
        if model in config.models:
            return "text", config.models[model]
        path = store.run_in(config.runs, model)
        return store.modality_of(store.read_run(path)), path

    def servable(name: str) -> bool:
        """A run listed is one a request can name (not, say, a symlink to a run outside the runs directory)."""
        try:
            return store.run_in(config.runs, name) is not None
        except NotFound:
            return False

    def text_model(model: str) -> Path:
        modality, path = model_path(model)
        if modality != "text":
            raise _wrong_modality(model, modality)
        return path

    def source(request: Request) -> str:
        """What made a generation: the studio's pages say so in a header; everything else is the API."""
        return "studio" if request.headers.get("x-aigc-source") == "studio" else "api"

    async def start(request: Request, work: Callable, kind: str = "other") -> Job:
        queue = queues[kind]
        await queue.acquire()
        return Job(asyncio.get_running_loop(), work, queue, request, executor, config.stream_interval_ms / 1000)

    workbench.install(app, workbench.Context(db=db, config=config, caller=caller, model_path=model_path,
                                             start=start, source=source))
    studio.mount(app)

    @app.get("/health", response_model=schemas.Health, summary="liveness and load, for a load balancer (no key)")
    def health():
        return {"status": "ok", "version": __version__, "generating": sum(q.running for q in queues.values()),
                "waiting": sum(q.waiting for q in queues.values())}

    # ------------------------------------------------------------------ models

    @app.get("/v1/models", response_model=schemas.ModelList, summary="the runs and --model folders served")
    def list_models(key_id: str | None = Depends(caller)):
        cards = [_run_card(row) for row in store.list_runs(config.runs)
                 if row["status"] != "unreadable" and servable(row["name"])]
        cards += [{"id": name, "created": int(path.stat().st_mtime), "owned_by": "local", "modality": "text",
                   "family": "hf", "data": None, "status": "done", "headline": None}
                  for name, path in config.models.items()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model}", response_model=schemas.ModelCard, summary="one model")
    def get_model(model: str, key_id: str | None = Depends(caller)):
        modality, path = model_path(model)
        if model in config.models:
            return {"id": model, "created": int(path.stat().st_mtime), "owned_by": "local", "modality": "text",
                    "family": "hf"}
        return _run_card(store.summary(path))

    # ------------------------------------------------------------------ text

    @app.post("/v1/completions", response_model=schemas.Completion, summary="continue a prompt",
              responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: schemas.CompletionRequest, request: Request, key_id: str | None = Depends(caller)):
        _neutral_only(body)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "one prompt per request (send a string)", param="prompt")
            body.prompt = body.prompt[0]
        if body.suffix:
            raise ApiError(400, "suffix is not supported (a model continues its prompt; it does not fill in)",
                           param="suffix")
        return await _text(request, body, body.prompt, body.max_tokens, key_id, chat=False, echo=bool(body.echo))

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletion, summary="answer the last user message",
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat(body: schemas.ChatRequest, request: Request, key_id: str | None = Depends(caller)):
        _neutral_only(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        prompt = service.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        return await _text(request, body, prompt, body.max_tokens or body.max_completion_tokens, key_id, chat=True)

    async def _text(request: Request, body: schemas.TextControls, prompt: str, max_tokens: int | None,
                    key_id: str | None, *, chat: bool, echo: bool = False):
        path = text_model(body.model)
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        options = {"prompt": prompt, "n": body.n, "max_new_tokens": max_tokens, "temperature": body.temperature,
                   "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
                   "repetition_penalty": body.repetition_penalty, "num_beams": body.num_beams,
                   "no_repeat_ngram_size": body.no_repeat_ngram_size, "stop": stops or None, "best_of": body.best_of,
                   "window": body.window}
        requested = {"endpoint": "chat" if chat else "completions", **body.model_dump(exclude_none=True)}
        streaming, gen_id = bool(body.stream), new_id("gen")

        def work(emit, cancel):
            generation = service.generate(str(path), options, seed=body.seed, stream=emit if streaming else None,
                                          cancel=cancel, batch=config.batching)
            service.record(generation, db, source=source(request), request=requested, key_id=key_id, ids=[gen_id])
            return gen_id, generation

        job = await start(request, work, "text")
        shape = _ChatShape(body.model) if chat else _CompletionShape(body.model, prompt if echo else "")
        if not streaming:
            gen_id, generation = await job.result()
            return shape.whole(gen_id, generation, prompt)
        first = await job.next_event()  # errors before the first token are a normal error response
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(job, first, shape, gen_id, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ images and forecasts

    @app.post("/v1/images/generations", response_model=schemas.ImagesResponse, summary="draw images")
    async def images(body: schemas.ImageRequest, request: Request, key_id: str | None = Depends(caller)):
        modality, path = model_path(body.model)
        if modality != "image":
            raise _wrong_modality(body.model, modality)
        record = store.read_run(path)
        if body.size is not None:
            _, height, width = record["image_shape"]  # (C, H, W)
            if body.size not in (f"{width}x{height}", "auto"):
                raise ApiError(400, f"size {body.size!r}: this run makes {width}x{height} images", param="size")
        class_ = body.prompt.strip() or None
        if class_ is not None and not record.get("num_classes"):
            raise ApiError(400, f"model {body.model!r} is unconditional: send an empty prompt (it draws no class)",
                           param="prompt")
        if class_ is None and record.get("num_classes"):
            names = record.get("class_names") or [str(i) for i in range(record["num_classes"])]
            raise ApiError(400, f"model {body.model!r} is conditional: send a class as the prompt "
                                f"(one of: {', '.join(names)})", param="prompt")
        options = {"n": body.n or 1, "class_": class_, **body.sampling(), "truncation": body.truncation,
                   "best_of": body.best_of}
        requested = {"endpoint": "images", **body.model_dump(exclude_none=True)}

        def work(emit, cancel):
            generation = service.generate(str(path), options, seed=body.seed, cancel=cancel)
            return service.record(generation, db, source=source(request), request=requested, key_id=key_id), generation

        ids, generation = await (await start(request, work)).result()
        data = []
        for gen_id, rec in zip(ids, generation.record["images"], strict=True):
            datum = {"generation_id": gen_id, "seed": rec["seed"]}
            if body.response_format == "b64_json":
                datum["b64_json"] = base64.b64encode(Path(db.get_generation(gen_id)["file"]).read_bytes()).decode()
            else:
                datum["url"] = str(request.url_for("generation_file", generation_id=gen_id))
            data.append(datum)
        return {"id": ids[0], "generation_id": ids[0], "created": int(time.time()), "data": data, "model": body.model}

    async def saved_generation(request: Request, path: Path, options: dict, seed, requested: dict,
                               key_id: str | None) -> tuple[str, object, list[str]]:
        """A generation whose files are written under its id in the generations folder, then recorded: music and
        clips (its id, the generation, its files)."""
        def work(emit, cancel):
            generation = service.generate(str(path), options, seed=seed, cancel=cancel)
            gen_id = new_id("gen")
            files = service.save(generation, store.generations_dir() / gen_id)
            service.record(generation, db, source=source(request), request=requested, files=files, key_id=key_id,
                           ids=[gen_id])
            return gen_id, generation, files

        return await (await start(request, work)).result()

    @app.post("/v1/audio/generations", response_model=schemas.AudioResponse,
              summary="compose music (MIDI and WAV) or make sounds (WAV and spectrogram)")
    async def audio(body: schemas.AudioRequest, request: Request, key_id: str | None = Depends(caller)):
        modality, path = model_path(body.model)
        if modality not in ("music", "sound"):
            raise _wrong_modality(body.model, modality)
        options = {"n": body.n or 1, "bars": body.bars, "temperature": body.temperature, "top_k": body.top_k,
                   "top_p": body.top_p, "best_of": body.best_of, "class_": body.instrument, "steps": body.steps,
                   "prompt_piece": body.prompt_piece, "prompt_bars": body.prompt_bars,
                   "harmonise_piece": body.harmonise_piece, "candidates": body.candidates,
                   "constrained": body.constrained, "window": body.window,
                   "grammar_version": body.grammar_version}
        for field, option in (("prompt_midi_b64", "prompt_midi"), ("harmonise_midi_b64", "harmonise_midi")):
            sent = getattr(body, field)
            if sent is not None:
                if modality != "music":
                    raise ApiError(400, f"{field} applies to music runs; {body.model!r} is a {modality} run",
                                   param=field)
                options[option] = service.keep_midi(_base64(sent, field), field)
        requested = {"endpoint": "audio", **body.model_dump(exclude_none=True)}

        gen_id, generation, files = await saved_generation(request, path, options, body.seed, requested, key_id)
        if modality == "sound":
            return _sound_response(request, body.model, gen_id, generation, files)
        data = []
        for i, output in enumerate(generation.outputs):
            stem = Path(files[4 * i]).with_suffix("")  # NNN.mid, NNN.wav, NNN.png, NNN.json per piece
            urls = {f"{kind}_url": str(request.url_for("generation_files", generation_id=gen_id,
                                                       name=stem.with_suffix(suffix).name))
                    for kind, suffix in (("wav", ".wav"), ("midi", ".mid"), ("png", ".png"))}
            data.append({"index": i, "bars": output["bars"], "notes": output["notes"], **urls,
                         "wav_b64": base64.b64encode(stem.with_suffix(".wav").read_bytes()).decode(),
                         "midi_b64": base64.b64encode(stem.with_suffix(".mid").read_bytes()).decode(),
                         "record": json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))})
        return {"id": gen_id, "generation_id": gen_id, "created": int(time.time()), "model": body.model,
                "seed": generation.record["settings"]["seed"], "rendered_with": generation.extra["rendered_with"],
                "data": data}

    @app.post("/v1/videos/generations", response_model=schemas.VideoResponse,
              summary="make or predict clips (GIF and MP4)")
    async def videos(body: schemas.VideoRequest, request: Request, key_id: str | None = Depends(caller)):
        modality, path = model_path(body.model)
        if modality != "video":
            raise _wrong_modality(body.model, modality)
        options = {"n": body.n or 1, "class_": body.prompt.strip() or None, **body.sampling(),
                   "temperature": body.temperature, "best_of": body.best_of}
        requested = {"endpoint": "videos", **body.model_dump(exclude_none=True)}

        gen_id, generation, files = await saved_generation(request, path, options, body.seed, requested, key_id)
        def url(name: str) -> str:
            return str(request.url_for("generation_files", generation_id=gen_id, name=name))

        data = [{"index": i, "frames": len(clip), "fps": 1000 / FRAME_MS, "record": rec,
                 "gif_url": url(Path(files[i]).name), "mp4_url": url(Path(files[i]).with_suffix(".mp4").name),
                 "gif_b64": base64.b64encode(Path(files[i]).read_bytes()).decode()}
                for i, (clip, rec) in enumerate(zip(generation.outputs, generation.record["clips"], strict=True))]
        sheet = Path(generation.extra["sheet"])
        return {"id": gen_id, "generation_id": gen_id, "created": int(time.time()), "model": body.model,
                "seed": generation.record["settings"]["seed"], "job": generation.record["settings"]["job"],
                "sheet_b64": base64.b64encode(sheet.read_bytes()).decode(), "sheet_url": url(sheet.name), "data": data}

    @app.post("/v1/forecasts", response_model=schemas.ForecastResponse, summary="forecast a series run")
    async def forecasts(body: schemas.ForecastRequest, request: Request, key_id: str | None = Depends(caller)):
        modality, path = model_path(body.model)
        if modality != "series":
            raise _wrong_modality(body.model, modality)
        options = {"horizon": body.horizon, "level": body.level, "paths": body.paths, "noise": body.noise,
                   "best_of": body.best_of}
        requested = {"endpoint": "forecasts", **body.model_dump(exclude_none=True)}

        def work(emit, cancel):
            generation = service.generate(str(path), options, seed=body.seed, cancel=cancel)
            [gen_id] = service.record(generation, db, source=source(request), request=requested, key_id=key_id)
            return gen_id, generation

        gen_id, generation = await (await start(request, work)).result()
        forecast = workbench.forecast_of(generation)
        return {"id": gen_id, "generation_id": gen_id, "created": int(time.time()), "model": body.model,
                "seed": generation.record["settings"]["seed"], "forecast": forecast}

    # ------------------------------------------------------------------ the store

    @app.get("/v1/generations", response_model=schemas.GenerationList, summary="generations, newest first")
    def list_generations(model: str | None = None, modality: str | None = None, rated: bool | None = None,
                         q: str | None = None, limit: int = 50, offset: int = 0,
                         key_id: str | None = Depends(caller)):
        if not (1 <= limit <= 1000 and 0 <= offset <= 10**9):
            raise ApiError(400, "limit must be in 1..1000 and offset >= 0", param="limit")
        filters = {"run": model, "modality": modality, "rated": rated, "query": q}
        rows = db.list_generations(**filters, limit=limit, offset=offset)
        return {"object": "list", "data": [_generation(row) for row in rows], "total": db.count_generations(**filters)}

    @app.get("/v1/generations/{generation_id}", response_model=schemas.Generation, summary="one generation")
    def get_generation(generation_id: str, key_id: str | None = Depends(caller)):
        return _generation(db.get_generation(generation_id))

    @app.get("/v1/generations/{generation_id}/file", name="generation_file",
             summary="the file it wrote (an image's PNG; a music generation's first MIDI)",
             response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
    def generation_file(generation_id: str, key_id: str | None = Depends(caller)):
        row = db.get_generation(generation_id)
        if not row.get("file") or not Path(row["file"]).is_file():
            raise ApiError(404, f"generation {generation_id!r} has no file")
        return FileResponse(row["file"], media_type="image/png" if row["file"].endswith(".png") else None)

    @app.get("/v1/generations/{generation_id}/files/{name}", name="generation_files",
             summary="one of the files a generation wrote into its folder (music: NNN.wav, NNN.mid, NNN.png; "
                     "video: NNN.gif, NNN.mp4, sheet.png)",
             response_class=FileResponse, responses={200: {"content": {"audio/wav": {}, "audio/midi": {},
                                                                       "image/gif": {}, "video/mp4": {}}}})
    def generation_files(generation_id: str, name: str, key_id: str | None = Depends(caller)):
        row = db.get_generation(generation_id)
        folder = Path(row["file"]).parent if row.get("file") else None
        target = folder / name if folder is not None and folder.name == generation_id else None
        if target is None or Path(name).name != name or target.suffix not in GENERATION_FILES or not target.is_file():
            raise ApiError(404, f"generation {generation_id!r} has no file {name!r}")
        return FileResponse(target, media_type=GENERATION_FILES[target.suffix])

    @app.post("/v1/generations/{generation_id}/ratings", response_model=schemas.Rating, summary="rate a generation")
    def rate(generation_id: str, body: schemas.RatingRequest, key_id: str | None = Depends(caller)):
        row = db.add_rating(generation_id, score=body.score, stars=body.stars, comment=body.comment,
                            index=body.index, key_id=key_id)
        return {"object": "rating", **row}

    return app


def _sound_response(request: Request, model: str, gen_id: str, generation, files: list[str]) -> dict:
    """The answer of /v1/audio/generations for a sound run: per sound its WAV (inline and as a URL), its spectrogram's
    URL and its record."""
    data = []
    for i in range(len(generation.outputs)):
        stem = Path(files[3 * i]).with_suffix("")  # NNN.wav, NNN.png, NNN.json per sound
        urls = {f"{kind}_url": str(request.url_for("generation_files", generation_id=gen_id,
                                                   name=stem.with_suffix(suffix).name))
                for kind, suffix in (("wav", ".wav"), ("png", ".png"))}
        data.append({"index": i, "kind": "sound", **urls,
                     "wav_b64": base64.b64encode(stem.with_suffix(".wav").read_bytes()).decode(),
                     "record": json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))})
    return {"id": gen_id, "generation_id": gen_id, "created": int(time.time()), "model": model,
            "seed": generation.record["settings"]["seed"], "rendered_with": generation.extra["rendered_with"],
            "data": data}


def _base64(text: str, field: str) -> bytes:
    """The bytes of a base64 field; anything else is a 400 that names the field."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ApiError(400, f"{field} is not base64 (the file's bytes, base64-encoded)", param=field,
                       code="invalid_base64") from None


def _wrong_modality(model: str, modality: str) -> ApiError:
    article = "an" if modality == "image" else "a"
    return ApiError(400, f"model {model!r} is {article} {modality} run: use {ENDPOINTS[modality]}", param="model",
                    code="wrong_modality")


def _run_card(row: dict) -> dict:
    created = row.get("created")
    try:
        stamp = int(datetime.fromisoformat(created).timestamp()) if created else 0
    except ValueError:
        stamp = 0
    return {"id": row["name"], "created": stamp, "owned_by": "aigc", "modality": row["modality"],
            "family": row["family"], "data": row["data"], "status": row["status"], "headline": row["score"]}


def _generation(row: dict) -> dict:
    return {"object": "generation", **json_safe(row)}


def _neutral_only(body: schemas.TextControls) -> None:
    """OpenAI fields that our decoding has no counterpart for: taken only at their neutral values."""
    for name, instead in (("frequency_penalty", "repetition_penalty"), ("presence_penalty", "repetition_penalty")):
        if getattr(body, name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported: use {instead} (> 1 discourages repeats)", param=name)
    if body.logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")


# ----------------------------------------------------------------------------------
# work off the event loop


class Job:
    """A generation in a worker thread: its events ("text" pieces as it streams, then "done" or "error") come
    to the event loop through a queue; the queue slot is freed when the thread ends, not when the client
    leaves. A client that disconnects sets `cancel`, and the generation stops at its next token."""

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Callable, queue: WorkQueue, request: Request,
                 executor: ThreadPoolExecutor, interval_s: float = 0.0):
        self.loop, self.request, self.cancel = loop, request, threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self._queue, self._mailbox = queue, Mailbox.of(loop, interval_s)
        loop.run_in_executor(executor, self._run, work)

    def _post(self, kind: str, value) -> None:
        self._mailbox.post(self, kind, value)

    def _run(self, work: Callable) -> None:
        def emit(text: str) -> None:
            if self.cancel.is_set():
                raise Cancelled("the client went away")
            self._post("text", text)

        try:
            self._post("done", work(emit, self.cancel))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the request
            self._post("error", e)
        finally:
            asyncio.run_coroutine_threadsafe(self._queue.release(), self.loop)

    async def next_event(self, *, watch_disconnect: bool = True) -> tuple[str, object]:
        """The next event; an error is raised. Watching: the client's disconnect cancels the work (a stream
        learns of it from its generator being closed instead)."""
        while True:
            try:
                kind, value = await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                if watch_disconnect and await self.request.is_disconnected():
                    self.cancel.set()
                continue
            if kind == "error":
                if isinstance(value, UserError | ApiError | Cancelled):
                    raise value
                if disk_full(value):
                    raise ApiError(507, DISK_FULL, code="disk_full") from value
                log.error("error inside a model", exc_info=value)
                raise ApiError(500, f"internal error: {type(value).__name__}: {value}", code="model_error")
            return kind, value

    async def result(self):
        while True:
            kind, value = await self.next_event()
            if kind == "done":
                return value


class Mailbox:
    """What worker threads hand to the event loop: events gathered under a lock, delivered by one callback at a
    time, and at most once every `interval_s`. A decoding batch of 16 rows emits 16 pieces of text a step (a
    step of a small gpt takes 5 ms); handing each over with its own `call_soon_threadsafe` wakes the loop 16 times
    a step, contends for the GIL with the decoding and sends every client a chunk per token. So the pieces wait
    here: a delivery takes all that came since the last one, and a job's consecutive pieces of text become one
    (a stream's chunks then carry one or more tokens each; their concatenation is the same). The first event
    after a quiet interval goes at once (a lone request's first token does not wait); vLLM's `stream_interval`
    makes the same trade. A job's end ("done" or "error") goes at once, with everything waiting: its client has
    its text and waits only for the end (a closed-loop client's next request, and the batch row it fills, wait
    on it too)."""

    _boxes: dict[tuple[int, float], Mailbox] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float):
        self.loop, self.interval_s = loop, interval_s
        self._lock, self._pending, self._scheduled, self._last = threading.Lock(), [], False, -math.inf

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, interval_s: float = 0.0) -> Mailbox:
        box = cls._boxes.get((id(loop), interval_s))
        if box is None or box.loop is not loop:
            box = cls._boxes[(id(loop), interval_s)] = cls(loop, interval_s)
        return box

    def post(self, job: Job, kind: str, value) -> None:
        with self._lock:
            self._pending.append((job, kind, value))
            urgent = kind != "text"
            if self._scheduled and not urgent:
                return
            self._scheduled = True
            wait = 0.0 if urgent else self._last + self.interval_s - time.monotonic()
        if wait > 0:
            self.loop.call_soon_threadsafe(self.loop.call_later, wait, self._deliver)
        else:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            if not self._pending:  # an urgent delivery took them; a later post has scheduled its own
                return
            pending, self._pending, self._scheduled, self._last = self._pending, [], False, time.monotonic()
        merged: dict[Job, list] = {}
        for job, kind, value in pending:
            events = merged.setdefault(job, [])
            if kind == "text" and events and events[-1][0] == "text":
                events[-1] = ("text", events[-1][1] + value)
            else:
                events.append((kind, value))
        for job, events in merged.items():
            for event in events:
                job.events.put_nowait(event)


@dataclasses.dataclass
class _CompletionShape:
    model: str
    echo: str  # the prompt, when echo was asked for
    closing = ""  # the text of the last chunk, which carries the finish reason

    def whole(self, gen_id: str, generation, prompt: str) -> dict:
        stats = generation.record["stats"]
        choices = [{"index": i, "text": self.echo + sample[len(prompt):], "logprobs": None, "finish_reason": reason}
                   for i, (sample, reason) in enumerate(zip(generation.outputs, stats["finish_reasons"], strict=True))]
        return {"id": gen_id, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": choices, "usage": _usage(stats), "generation_id": gen_id,
                "seed": generation.record["settings"]["seed"], "batch_rows": stats.get("batch_rows", 1)}

    def chunk(self, gen_id: str, text: str | None, finish_reason: str | None = None) -> dict:
        return {"id": gen_id, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}],
                "generation_id": gen_id}

    def opening(self, gen_id: str) -> dict | None:
        return self.chunk(gen_id, self.echo) if self.echo else None


@dataclasses.dataclass
class _ChatShape:
    model: str
    closing = None  # the last chunk's delta is empty

    def whole(self, gen_id: str, generation, prompt: str) -> dict:
        stats = generation.record["stats"]
        choices = [{"index": i, "message": {"role": "assistant", "content": sample[len(prompt):], "refusal": None},
                    "logprobs": None, "finish_reason": reason}
                   for i, (sample, reason) in enumerate(zip(generation.outputs, stats["finish_reasons"], strict=True))]
        return {"id": gen_id, "object": "chat.completion", "created": int(time.time()), "model": self.model,
                "choices": choices, "usage": _usage(stats), "generation_id": gen_id,
                "seed": generation.record["settings"]["seed"], "batch_rows": stats.get("batch_rows", 1)}

    def chunk(self, gen_id: str, text: str | None, finish_reason: str | None = None) -> dict:
        delta = {} if text is None else {"content": text}
        return {"id": gen_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                "generation_id": gen_id}

    def opening(self, gen_id: str) -> dict:
        return {**self.chunk(gen_id, None), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]}


def _usage(stats: dict) -> dict:
    prompt, completion = stats["prompt_tokens"], stats["generated_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(job: Job, first: tuple[str, object], shape, gen_id: str, include_usage: bool):
    """The stream: a chunk per piece of text as it comes, then the finish reason, the usage when asked for,
    and `data: [DONE]`; an error on the way is one `data: {"error": ...}` event. Every chunk carries the
    generation's id (drawn before the work starts). A client that goes away closes this generator, which
    cancels the work."""
    try:
        opening = shape.opening(gen_id)
        if opening is not None:
            yield _sse_line(opening)
        kind, value = first
        while kind == "text":
            yield _sse_line(shape.chunk(gen_id, value))
            kind, value = await job.next_event(watch_disconnect=False)
        stats = value[1].record["stats"]
        yield _sse_line(shape.chunk(gen_id, shape.closing, stats["finish_reasons"][0]))
        if include_usage:
            yield _sse_line({**shape.chunk(gen_id, None), "choices": [], "usage": _usage(stats)})
        yield b"data: [DONE]\n\n"
    except ApiError as e:  # the status line is sent: the error goes into the stream
        yield _sse_line(e.body())
    except UserError as e:
        yield _sse_line(error_body(next((s for kind, s in STATUS_OF.items() if isinstance(e, kind)), 400), str(e)))
    finally:
        job.cancel.set()  # done already, or nobody is listening any more


def _sse_line(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


# ----------------------------------------------------------------------------------
# errors


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: validation and JSON errors are 400 (never 422), user errors by kind."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = _validation_message(e.errors(), request.url.path)
        return JSONResponse(error_body(400, message, param, "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 400:  # Starlette: a body that is not UTF-8 JSON
            message = f"the body is not valid JSON: {e.detail}"
        elif e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif e.status_code == 405:
            allowed = (getattr(e, "headers", None) or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        else:
            message = str(e.detail)
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        status = next((s for kind, s in STATUS_OF.items() if isinstance(e, kind)), 400)
        return JSONResponse(error_body(status, str(e)), status_code=status)

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, e: Cancelled):
        return Response(status_code=499)  # nobody is listening

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        if disk_full(e):
            return JSONResponse(error_body(507, DISK_FULL, code="disk_full"), status_code=507)
        log.exception("error inside %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)


DISK_FULL = "no space left on the server's disk: nothing was stored; free some space and try again"


def disk_full(e: BaseException) -> bool:
    """A write that failed for want of space: ENOSPC from a file, or SQLite's "database or disk is full"."""
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "database or disk is full" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _validation_message(errors: list[dict], path: str) -> tuple[str, str | None]:
    # a field of several types (`stop`: a string or a list) fails once per type: of the first field's errors,
    # the one that got deepest (the list with an empty string in it, not "not a string") says what is wrong
    field = tuple(errors[0].get("loc", ()))[:2]
    error = max((e for e in errors if tuple(e.get("loc", ()))[:2] == field),
                key=lambda e: (len(e.get("loc", ())), not e.get("type", "").endswith("_type")))
    # pydantic names the type tried in the location ("stop", "list[constrained-str]", 0): the param is "stop.0"
    loc = [str(x) for x in error.get("loc", ())
           if x not in ("body", "query", "path") and not _is_union_tag(x)]
    param = ".".join(loc) or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}", None
    if kind == "missing" and not loc:
        return "the body is empty: send a JSON object (Content-Type: application/json)", None
    if kind == "extra_forbidden" and loc:
        owner = FIELD_OWNERS.get(loc[-1])
        where = f" ({loc[-1]} applies to {owner} models: {ENDPOINTS[owner]})" if owner and owner != _owner(path) else ""
        return f"{param}: unknown field for {path}{where}", param
    if kind == "missing":
        return f"{param}: missing field", param
    if not loc and (kind == "model_attributes_type" or "dict" in kind):
        return "the body must be a JSON object (Content-Type: application/json)", None
    return f"{param}: {error.get('msg')}" if param else str(error.get("msg")), param


def _is_union_tag(part) -> bool:
    """A type's name in an error's location ("str", "list[str]", "constrained-str"); field names are identifiers."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or not part.isidentifier())


def _owner(path: str) -> str | None:
    return next((m for m, e in ENDPOINTS.items() if path in e.split(" or ")), None)


def _strip_422(app: FastAPI) -> None:
    """The schema says what the server answers: 400 for an invalid body, never FastAPI's 422."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

