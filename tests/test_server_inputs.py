"""The bad-input catalogue against a real `aigc serve`: every case gets exactly its status and, for an error,
OpenAI's error shape (never FastAPI's 422), and the server still serves afterwards. The valid controls in the
catalogue prove that the checks do not refuse the happy path. docs/api-errors.md lists the messages.

Also: a 30 MB body, declared or chunked, is refused 413 without the server holding it in memory."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import httpx
import pytest
from tests.test_server import start_server, stop_server, train_runs

from aigc.server.limits import BodyLimit

pytestmark = pytest.mark.usefixtures("one_thread")

C, CHAT, IMG, FC = "/v1/completions", "/v1/chat/completions", "/v1/images/generations", "/v1/forecasts"
RATE = "/v1/generations/{gen}/ratings"  # {gen}: a real text generation, made by the fixture
USER = [{"role": "user", "content": "春"}]
PLAIN, FORM = {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}
NO_TYPE: dict[str, str] = {}  # no Content-Type at all

# (name, method, path, body: a JSON value, raw bytes or None, headers: None = JSON, expected status)
CASES = [
    # wrong types, one of each kind of field
    ("str for int", "POST", C, {"model": "poet", "max_tokens": "5"}, None, 400),
    ("float for int", "POST", C, {"model": "poet", "max_tokens": 5.0}, None, 400),
    ("int for str (prompt)", "POST", C, {"model": "poet", "prompt": 5}, None, 400),
    ("int for str (model)", "POST", C, {"model": 5}, None, 400),
    ("bool for int", "POST", C, {"model": "poet", "n": True}, None, 400),
    ("bool for number", "POST", C, {"model": "poet", "temperature": True}, None, 400),
    ("list for str", "POST", C, {"model": ["poet"]}, None, 400),
    ("object for number", "POST", C, {"model": "poet", "temperature": {"value": 1}}, None, 400),
    ("str for bool", "POST", C, {"model": "poet", "stream": "yes"}, None, 400),
    ("int for str (stop)", "POST", C, {"model": "poet", "stop": 5}, None, 400),
    ("str for int (images n)", "POST", IMG, {"model": "digits", "prompt": "7", "n": "2"}, None, 400),
    ("int for str (images prompt)", "POST", IMG, {"model": "digits", "prompt": 7}, None, 400),
    ("str for int (horizon)", "POST", FC, {"model": "sun", "horizon": "3"}, None, 400),
    ("str for number (level)", "POST", FC, {"model": "sun", "horizon": 3, "level": "0.9"}, None, 400),
    ("bool for int (paths)", "POST", FC, {"model": "sun", "horizon": 3, "paths": True}, None, 400),
    ("bool for score", "POST", RATE, {"score": True}, None, 400),
    ("float for score", "POST", RATE, {"score": 1.0}, None, 400),
    ("str for score", "POST", RATE, {"score": "1"}, None, 400),
    ("float for stars", "POST", RATE, {"score": 1, "stars": 4.5}, None, 400),
    ("int for content", "POST", CHAT, {"model": "poet", "messages": [{"role": "user", "content": 3}]}, None, 400),
    ("str for message", "POST", CHAT, {"model": "poet", "messages": ["hi"]}, None, 400),
    ("str for messages", "POST", CHAT, {"model": "poet", "messages": "hi"}, None, 400),
    ("image part in content", "POST", CHAT, {"model": "poet", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None, 400),
    ("str for limit (query)", "GET", "/v1/generations?limit=abc", None, None, 400),
    ("str for rated (query)", "GET", "/v1/generations?rated=maybe", None, None, 400),
    # NaN, infinity, huge numbers
    ("NaN", "POST", C, b'{"model":"poet","temperature":NaN}', None, 400),
    ("Infinity", "POST", C, b'{"model":"poet","temperature":Infinity}', None, 400),
    ("-Infinity", "POST", C, b'{"model":"poet","top_p":-Infinity}', None, 400),
    ("1e999 (inf once parsed)", "POST", C, b'{"model":"poet","temperature":1e999}', None, 400),
    ("NaN level", "POST", FC, b'{"model":"sun","horizon":3,"level":NaN}', None, 400),
    ("1e308", "POST", C, {"model": "poet", "temperature": 1e308}, None, 400),
    ("temperature 1e-38", "POST", C, {"model": "poet", "temperature": 1e-38, "repetition_penalty": 50}, None, 400),
    ("10**30 max_tokens", "POST", C, {"model": "poet", "max_tokens": 10**30}, None, 400),
    ("10**30 seed", "POST", C, {"model": "poet", "seed": 10**30}, None, 400),
    ("2**63 seed", "POST", IMG, {"model": "digits", "prompt": "7", "seed": 2**63}, None, 400),
    ("10**30 horizon", "POST", FC, {"model": "sun", "horizon": 10**30}, None, 400),
    # negative and out-of-range values
    ("max_tokens -1", "POST", C, {"model": "poet", "max_tokens": -1}, None, 400),
    ("max_tokens 0", "POST", C, {"model": "poet", "max_tokens": 0}, None, 400),
    ("max_tokens 5000", "POST", C, {"model": "poet", "max_tokens": 5000}, None, 400),
    ("max_completion_tokens 0", "POST", CHAT, {"model": "poet", "messages": USER, "max_completion_tokens": 0},
     None, 400),
    ("temperature -0.1", "POST", C, {"model": "poet", "temperature": -0.1}, None, 400),
    ("temperature 2.5", "POST", C, {"model": "poet", "temperature": 2.5}, None, 400),
    ("top_p 0", "POST", C, {"model": "poet", "top_p": 0}, None, 400),
    ("top_p 1.5", "POST", C, {"model": "poet", "top_p": 1.5}, None, 400),
    ("n 0", "POST", C, {"model": "poet", "n": 0}, None, 400),
    ("n 17", "POST", C, {"model": "poet", "n": 17}, None, 400),
    ("top_k -1", "POST", C, {"model": "poet", "top_k": -1}, None, 400),
    ("min_p 1", "POST", C, {"model": "poet", "min_p": 1}, None, 400),
    ("repetition_penalty 0", "POST", C, {"model": "poet", "repetition_penalty": 0}, None, 400),
    ("num_beams 17", "POST", C, {"model": "poet", "num_beams": 17}, None, 400),
    ("no_repeat_ngram_size 65", "POST", C, {"model": "poet", "no_repeat_ngram_size": 65}, None, 400),
    ("seed -1", "POST", C, {"model": "poet", "seed": -1}, None, 400),
    ("5 stops", "POST", C, {"model": "poet", "stop": ["a", "b", "c", "d", "e"]}, None, 400),
    ("empty stop string", "POST", C, {"model": "poet", "stop": ""}, None, 400),
    ("empty string in stops", "POST", C, {"model": "poet", "stop": ["。", ""]}, None, 400),
    ("horizon 0", "POST", FC, {"model": "sun", "horizon": 0}, None, 400),
    ("horizon 1001", "POST", FC, {"model": "sun", "horizon": 1001}, None, 400),
    ("level 1", "POST", FC, {"model": "sun", "horizon": 3, "level": 1}, None, 400),
    ("paths -1", "POST", FC, {"model": "sun", "horizon": 3, "paths": -1}, None, 400),
    ("noise uniform", "POST", FC, {"model": "sun", "horizon": 3, "noise": "uniform"}, None, 400),
    ("limit 0 (query)", "GET", "/v1/generations?limit=0", None, None, 400),
    ("offset -1 (query)", "GET", "/v1/generations?offset=-1", None, None, 400),
    # prompts: empty is valid, a ~1 MB one is valid for the n-gram (no context: it reads the last tokens), 10 MB is
    # over the body cap
    ("empty prompt (valid)", "POST", C, {"model": "poet", "prompt": "", "max_tokens": 4}, None, 200),
    ("no prompt (valid)", "POST", C, {"model": "poet", "max_tokens": 4}, None, 200),
    ("1 MB prompt (valid: n-gram)", "POST", C, {"model": "poet", "prompt": "春" * 350_000, "max_tokens": 4}, None, 200),
    ("10 MB prompt", "POST", C, {"model": "poet", "prompt": "a" * (10 * 2**20)}, None, 413),
    ("prompt list of one (valid)", "POST", C, {"model": "poet", "prompt": ["春"], "max_tokens": 4}, None, 200),
    ("prompt list of two", "POST", C, {"model": "poet", "prompt": ["春", "秋"]}, None, 400),
    ("prompt empty list", "POST", C, {"model": "poet", "prompt": []}, None, 400),
    # a field of another modality: 400 naming the endpoint that takes it
    ("steps on completions", "POST", C, {"model": "poet", "steps": 10}, None, 400),
    ("steps on chat", "POST", CHAT, {"model": "poet", "messages": USER, "steps": 10}, None, 400),
    ("horizon on images", "POST", IMG, {"model": "digits", "prompt": "7", "horizon": 3}, None, 400),
    ("top_k on forecasts", "POST", FC, {"model": "sun", "horizon": 3, "top_k": 5}, None, 400),
    ("unknown field", "POST", C, {"model": "poet", "temprature": 1}, None, 400),
    # a run of another modality
    ("completions on an image run", "POST", C, {"model": "digits", "prompt": "x"}, None, 400),
    ("chat on a series run", "POST", CHAT, {"model": "sun", "messages": USER}, None, 400),
    ("images on a text run", "POST", IMG, {"model": "poet"}, None, 400),
    ("images on a series run", "POST", IMG, {"model": "sun"}, None, 400),
    ("forecasts on an image run", "POST", FC, {"model": "digits", "horizon": 3}, None, 400),
    # chat
    ("chat without a user message", "POST", CHAT, {"model": "poet", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "assistant", "content": "ok"}]}, None, 400),
    ("chat unknown role", "POST", CHAT, {"model": "poet", "messages": [{"role": "wizard", "content": "x"}]}, None, 400),
    ("chat empty messages", "POST", CHAT, {"model": "poet", "messages": []}, None, 400),
    ("chat no messages", "POST", CHAT, {"model": "poet"}, None, 400),
    ("chat both token limits", "POST", CHAT, {"model": "poet", "messages": USER, "max_tokens": 4,
                                              "max_completion_tokens": 4}, None, 400),
    ("chat logprobs true", "POST", CHAT, {"model": "poet", "messages": USER, "logprobs": True}, None, 400),
    ("chat text parts (valid)", "POST", CHAT, {"model": "poet", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "春"}]}]}, None, 200),
    # OpenAI fields without a counterpart
    ("frequency_penalty 0.5", "POST", C, {"model": "poet", "frequency_penalty": 0.5}, None, 400),
    ("presence_penalty 1", "POST", C, {"model": "poet", "presence_penalty": 1}, None, 400),
    ("frequency_penalty 0 (valid)", "POST", C, {"model": "poet", "frequency_penalty": 0, "max_tokens": 4}, None, 200),
    ("logprobs true", "POST", C, {"model": "poet", "logprobs": True}, None, 400),
    ("logprobs 5", "POST", C, {"model": "poet", "logprobs": 5}, None, 400),
    ("logit_bias", "POST", C, {"model": "poet", "logit_bias": {"42": 5}}, None, 400),
    ("best_of 2 without a reward model", "POST", C, {"model": "poet", "best_of": 2}, None, 400),
    ("best_of 65", "POST", C, {"model": "poet", "best_of": 65}, None, 400),
    ("best_of 1 (valid)", "POST", C, {"model": "poet", "best_of": 1, "max_tokens": 4}, None, 200),
    ("suffix", "POST", C, {"model": "poet", "suffix": "。"}, None, 400),
    # images
    ("unknown class", "POST", IMG, {"model": "digits", "prompt": "sneaker"}, None, 400),
    ("class index 10", "POST", IMG, {"model": "digits", "prompt": "10"}, None, 400),
    ("no class on a conditional run", "POST", IMG, {"model": "digits"}, None, 400),
    ("class on an unconditional run", "POST", IMG, {"model": "plain", "prompt": "7"}, None, 400),
    ("prompt of 1001 chars", "POST", IMG, {"model": "digits", "prompt": "7" * 1001}, None, 400),
    ("images n 0", "POST", IMG, {"model": "digits", "prompt": "7", "n": 0}, None, 400),
    ("images n 65", "POST", IMG, {"model": "digits", "prompt": "7", "n": 65}, None, 400),
    ("size 999x999", "POST", IMG, {"model": "digits", "prompt": "7", "size": "999x999"}, None, 400),
    ("response_format jpeg", "POST", IMG, {"model": "digits", "prompt": "7", "response_format": "jpeg"}, None, 400),
    ("output_format webp", "POST", IMG, {"model": "digits", "prompt": "7", "output_format": "webp"}, None, 400),
    ("sampler foo", "POST", IMG, {"model": "digits", "prompt": "7", "sampler": "foo"}, None, 400),
    ("sampler ddim on a vae", "POST", IMG, {"model": "digits", "prompt": "7", "sampler": "ddim"}, None, 400),
    ("steps on a vae", "POST", IMG, {"model": "digits", "prompt": "7", "steps": 5}, None, 400),
    ("truncation on a vae", "POST", IMG, {"model": "digits", "prompt": "7", "truncation": 1.0}, None, 400),
    ("class by name, its size (valid)", "POST", IMG, {"model": "digits", "prompt": "7", "size": "8x8"}, None, 200),
    ("unconditional, b64 (valid)", "POST", IMG, {"model": "plain", "response_format": "b64_json"}, None, 200),
    ("forecast (valid)", "POST", FC, {"model": "sun", "horizon": 3, "paths": 2, "level": 0.8}, None, 200),
    ("forecast without horizon", "POST", FC, {"model": "sun"}, None, 400),
    # ratings and the store
    ("score 2", "POST", RATE, {"score": 2}, None, 400),
    ("no score", "POST", RATE, {"stars": 3}, None, 400),
    ("stars 6", "POST", RATE, {"score": 1, "stars": 6}, None, 400),
    ("stars 0", "POST", RATE, {"score": 1, "stars": 0}, None, 400),
    ("comment of 10,001 chars", "POST", RATE, {"score": 1, "comment": "x" * 10_001}, None, 400),
    ("index -1", "POST", RATE, {"score": 1, "index": -1}, None, 400),
    ("rating (valid)", "POST", RATE, {"score": -1, "stars": 2, "comment": "x" * 10_000}, None, 200),
    ("rate an unknown generation", "POST", "/v1/generations/gen-0000/ratings", {"score": 1}, None, 404),
    ("an unknown generation", "GET", "/v1/generations/gen-0000", None, None, 404),
    ("file of an unknown generation", "GET", "/v1/generations/gen-0000/file", None, None, 404),
    ("file of a text generation", "GET", "/v1/generations/{gen}/file", None, None, 404),
    ("an unknown sweep", "GET", "/v1/sweeps/nope", None, None, 404),
    ("sweeps (valid, none yet)", "GET", "/v1/sweeps", None, None, 200),
    ("feedback of an unknown model", "GET", "/v1/models/nope/feedback", None, None, 404),
    ("feedback of a symlinked run", "GET", "/v1/models/linked/feedback", None, None, 404),
    ("feedback (valid, none yet)", "GET", "/v1/models/poet/feedback", None, None, 200),
    ("a generation (valid)", "GET", "/v1/generations/{gen}", None, None, 200),
    # bodies that are not a JSON object
    ("bad JSON", "POST", C, b"{", None, 400),
    ("trailing comma", "POST", C, b'{"model":"poet",}', None, 400),
    ("not UTF-8", "POST", C, b"\xff\xfe{}", None, 400),
    ("a JSON array", "POST", C, b"[]", None, 400),
    ("null", "POST", C, b"null", None, 400),
    ("a JSON string", "POST", C, b'"poet"', None, 400),
    ("empty body", "POST", C, b"", None, 400),
    ("empty body, rating", "POST", RATE, b"", None, 400),
    ("text/plain", "POST", C, b'{"model":"poet"}', PLAIN, 400),
    ("form-urlencoded", "POST", C, b"model=poet", FORM, 400),
    ("no Content-Type", "POST", C, b'{"model":"poet"}', NO_TYPE, 400),
    ("JSON with charset (valid)", "POST", C, b'{"model":"poet","max_tokens":4}',
     {"content-type": "application/json; charset=utf-8"}, 200),
    # model ids resolve only inside the runs directory
    ("model ../poet", "POST", C, {"model": "../poet"}, None, 404),
    ("model /etc/passwd", "POST", C, {"model": "/etc/passwd"}, None, 404),
    ("model poet/../poet", "POST", C, {"model": "poet/../poet"}, None, 404),
    ("model poet/", "POST", C, {"model": "poet/"}, None, 404),
    ("model with NUL", "POST", C, {"model": "poet\u0000"}, None, 400),
    ("prompt with NUL", "POST", C, {"model": "poet", "prompt": "春\u0000"}, None, 400),
    ("model empty", "POST", C, {"model": ""}, None, 400),
    ("model unknown", "POST", C, {"model": "nope"}, None, 404),
    ("model unicode", "POST", C, {"model": "诗人"}, None, 404),
    ("model emoji", "POST", IMG, {"model": "🎨"}, None, 404),
    ("model symlinked out of the runs dir", "POST", C, {"model": "linked"}, None, 404),
    ("GET model (valid)", "GET", "/v1/models/poet", None, None, 200),
    ("GET model %2e%2e%2fpoet", "GET", "/v1/models/%2e%2e%2fpoet", None, None, 404),
    ("GET model %2e%2e", "GET", "/v1/models/%2e%2e", None, None, 404),
    ("GET model %2fetc%2fpasswd", "GET", "/v1/models/%2fetc%2fpasswd", None, None, 404),
    ("GET model symlinked", "GET", "/v1/models/linked", None, None, 404),
    ("GET model unicode", "GET", "/v1/models/%E8%AF%97%E4%BA%BA", None, None, 404),
    # routes and methods
    ("unknown route", "GET", "/v1/nope", None, None, 404),
    ("unknown route, POST", "POST", "/v1/embeddings", {"model": "poet", "input": "x"}, None, 404),
    ("DELETE /v1/models", "DELETE", "/v1/models", None, None, 405),
    ("GET /v1/completions", "GET", C, None, None, 405),
    ("PUT a rating", "PUT", RATE, {"score": 1}, None, 405),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Four runs (a poet n-gram, a conditional and an unconditional VAE, an AR on sunspots), a run outside the
    runs directory symlinked into it as `linked`, a text generation to rate, and a server over them."""
    home = tmp_path_factory.mktemp("inputs")
    train_runs(home, ("poet", "digits", "plain", "sun"))
    shutil.copytree(home / "runs" / "poet", home / "outside" / "poet")
    (home / "runs" / "linked").symlink_to(home / "outside" / "poet", target_is_directory=True)
    proc, url = start_server(home)
    with httpx.Client(base_url=url, timeout=60) as http:
        made = http.post(C, json={"model": "poet", "prompt": "春", "max_tokens": 4, "seed": 1})
        assert made.status_code == 200, made.text
        yield {"proc": proc, "url": url, "http": http, "gen": made.json()["id"]}
    stop_server(proc)


def send(http: httpx.Client, method: str, path: str, body, headers: dict | None, gen: str) -> httpx.Response:
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if headers is None:
        headers = {"content-type": "application/json"} if content is not None else {}
    return http.request(method, path.format(gen=gen), content=content, headers=headers)


def assert_error_shape(answer: httpx.Response) -> dict:
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"].strip()
    return error


@pytest.mark.parametrize(("name", "method", "path", "body", "headers", "status"), CASES, ids=[c[0] for c in CASES])
def test_each_bad_input_gets_its_status_and_openai_error_shape(server, name, method, path, body, headers, status):
    answer = send(server["http"], method, path, body, headers, server["gen"])
    assert answer.status_code == status, f"{name}: {answer.status_code} {answer.text[:500]}"
    if status == 200:
        assert "error" not in answer.json()
        return
    error = assert_error_shape(answer)
    if status == 405:
        assert answer.headers["allow"] in error["message"]


def test_the_messages_say_what_to_do(server):
    """Spot checks on the wording the catalogue's cases get (all of them: docs/api-errors.md)."""
    cases = {case[0]: case for case in CASES}

    def message(name: str) -> str:
        _, method, path, body, headers, _ = cases[name]
        return send(server["http"], method, path, body, headers, server["gen"]).json()["error"]["message"]

    assert message("steps on completions").endswith("(steps applies to image models: /v1/images/generations)")
    assert "/v1/forecasts" in message("horizon on images")
    assert "/v1/completions or /v1/chat/completions" in message("top_k on forecasts")
    assert message("unknown class") == "unknown class 'sneaker' (one of: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, or 0..9)"
    assert message("size 999x999") == "size '999x999': this run makes 8x8 images"
    assert message("empty string in stops") == "stop.1: String should have at least 1 character"
    assert message("frequency_penalty 0.5").startswith("frequency_penalty is not supported: use repetition_penalty")
    assert message("empty body").startswith("the body is empty")
    assert message("a JSON array").startswith("the body must be a JSON object")
    assert message("an unknown sweep") == "no sweep named 'nope' (see GET /v1/sweeps; start one with aigc sweep)"
    assert message("feedback of an unknown model") == "no such model: 'nope' (see GET /v1/models)"


def test_after_the_catalogue_the_server_serves_and_lists_only_what_it_serves(server):
    for case in CASES:  # the whole catalogue again, quickly: nothing in it may have broken the server
        if case[-1] != 200:
            send(server["http"], *case[1:5], server["gen"])
    assert server["proc"].poll() is None
    models = server["http"].get("/v1/models")
    assert models.status_code == 200
    assert {m["id"] for m in models.json()["data"]} == {"poet", "digits", "plain", "sun"}  # not `linked`


def raw_request(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1e3"])
def test_a_content_length_that_is_not_a_number_is_400(server, length):
    """uvicorn's HTTP parser refuses it before the app sees it (400, its own plain-text body); behind a server
    that passes it on, BodyLimit answers 400 in OpenAI's shape."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
    answer = raw_request(server["url"], head + length + b"\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 400 ")
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def capture(message):
        sent.append(message)

    async def never(scope, receive, send):
        raise AssertionError("the app must not be called")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", length)]}
    asyncio.run(BodyLimit(never, 4 * 2**20)(scope, receive, capture))
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["message"] == "Content-Length is not a number"
    assert server["http"].get("/v1/models").status_code == 200


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_a_30_mb_body_is_refused_without_being_held(server):
    http, pid, size = server["http"], server["proc"].pid, 30 * 2**20
    head, tail = b'{"model":"poet","prompt":"', b'"}'

    def chunked():  # no Content-Length: the server learns the size only by reading
        yield head
        for _ in range(size // 2**20):
            yield b"a" * 2**20
        yield tail

    json_type = {"content-type": "application/json"}
    http.post(C, content=b"x" * (5 * 2**20), headers=json_type)  # warm up the path a refused body takes
    before = vm_rss_kb(pid)
    started = time.monotonic()
    declared = http.post(C, content=head + b"a" * size + tail, headers=json_type)
    streamed = http.post(C, content=chunked(), headers=json_type)
    grown_mb = (vm_rss_kb(pid) - before) / 1024
    for answer in (declared, streamed):
        assert answer.status_code == 413
        assert "over the server's cap of 4,194,304 bytes" in assert_error_shape(answer)["message"]
    assert "content-length" not in {k.lower() for k in streamed.request.headers}
    assert grown_mb < 15, f"the server grew {grown_mb:.1f} MB reading two 30 MB bodies"
    assert time.monotonic() - started < 30
    assert http.get("/v1/models").status_code == 200
