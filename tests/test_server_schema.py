"""The API keeps the promises of its own /openapi.json: schemathesis sends generated requests, valid and invalid,
to every operation of the app in-process (wrapped in BodyLimit, as `aigc serve` runs it) and checks that no answer
is a 5xx, that each status is one the schema declares, with the declared content type and a body of the declared
schema, and that an invalid request is refused (4xx)."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from tests.test_server import train_runs

from aigc import service
from aigc.server.app import ServerConfig, create_app
from aigc.server.limits import BodyLimit

pytestmark = pytest.mark.usefixtures("one_thread")

# OpenAI fields taken at their neutral value only, and best_of (> 1 needs a run with a reward model)
NEUTRAL_ONLY = ("frequency_penalty", "presence_penalty", "logprobs", "logit_bias", "best_of", "suffix")
VAE_REFUSES = ("sampler", "steps", "eta", "guidance_scale", "truncation", "size",  # diffusion / dcgan options
               "best_of")  # > 1: the tiny VAE has no reward model
GEN_ID = "gen-" + "5c" * 12  # an image generation the fixture stores (so its file and ratings can be reached)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


def load_schema():
    """The schema does not depend on what is served: it is read at collection from an app over a throwaway empty
    home; the requests go to the fixture's app (call_and_validate's `app=`)."""
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(ServerConfig(runs=Path(tmp) / "runs", database=f"sqlite:///{tmp}/aigc.db"))
        loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
        app.state.db.close()
    return loaded


schema = load_schema()


def runnable(path: str, body: dict) -> dict | None:
    """A valid body made one the tiny run of its endpoint answers 200: its run, and without what the schema allows
    but that run refuses (OpenAI fields other than at their neutral value, a VAE's want of a class, ...)."""
    if path in ("/v1/completions", "/v1/chat/completions"):
        body = {k: v for k, v in body.items() if k not in NEUTRAL_ONLY} | {"model": "poet"}
        if path == "/v1/completions":
            return body | {"prompt": "春"} if isinstance(body.get("prompt"), list) else body
        if "max_tokens" in body:
            body.pop("max_completion_tokens", None)  # both: 400
        return body | {"messages": [*body["messages"], {"role": "user", "content": "春"}]}  # no user message: 400
    if path == "/v1/images/generations":
        return {k: v for k, v in body.items() if k not in VAE_REFUSES} | {"model": "digits", "prompt": "3"}
    if path == "/v1/forecasts":
        return body | {"model": "sun"}
    return None


@schema.hook
def flatmap_case(context, case):
    """A valid request names a random id, which is a 404: the fuzzed ones are made to name a served run (and to be
    runnable) or the stored generation, so that the 200 answers are validated too; the coverage phase's requests
    (which no flatmap hook sees) keep their random ids. Setting the case's body or path parameters makes
    schemathesis check again whether the request is still valid (an edit that broke one would be judged so)."""
    meta = case.meta
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE:
        return st.just(case)
    path = case.operation.path
    if "{model}" in path:
        edits = [{"path_parameters": {"model": run}} for run in ("poet", "digits", "sun")]
    elif "{generation_id}" in path:
        edits = [{"path_parameters": {"generation_id": GEN_ID}}]
    elif isinstance(case.body, dict) and (body := runnable(path, case.body)) is not None:
        edits = [{"body": body}]
    else:
        return st.just(case)
    return st.sampled_from(edits).map(partial(edited, case))


def edited(case, edits: dict):
    for name, value in edits.items():
        setattr(case, name, value if name == "body" else {**getattr(case, name), **value})
    if edits and isinstance(case.body, dict):
        # JSON Schema counts 8.0 as an integer, the server's strict models only 8 (docs/api-errors.md); an int is
        # a valid number too, so every whole float can go as an int
        case.body = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in case.body.items()}
    return case


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The app over three tiny runs (text `poet`, image `digits`, series `sun`) and one stored image generation,
    wrapped in BodyLimit as `aigc serve` wraps it."""
    home = tmp_path_factory.mktemp("schema")
    train_runs(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        app = create_app(ServerConfig(runs=home / "runs", database=f"sqlite:///{home}/aigc.db", rate_limit=0))
        image = service.generate("digits", {"n": 1, "class_": "3"}, seed=0)
        service.record(image, app.state.db, source="api", request={"endpoint": "images"}, ids=[GEN_ID])
    return BodyLimit(app, 4 * 2**20)


@schema.parametrize()
@settings(max_examples=25, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_every_answer_is_what_the_schema_says(case, api):
    case.call_and_validate(app=api, checks=CHECKS)



def test_the_schema_declares_400_for_invalid_input_never_422():
    for path, operations in schema.raw_schema["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
            assert "400" in operation["responses"], (method, path)
    assert "HTTPValidationError" not in schema.raw_schema["components"]["schemas"]
