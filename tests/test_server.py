"""`aigc serve` for real: uvicorn in a subprocess on a free loopback port, driven by the official `openai` client
(strict response validation) and by httpx; the answers are checked against the service called in-process (what
`aigc generate` prints) for the same seed, and the store against what was asked."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from aigc import service
from aigc.data.images import read_png_record

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VAE = {"z_dim": "4", "base_channels": "8", "batch_size": "16", "eval_interval": "5", "warmup_steps": "2",
            "dtype": "fp32", "log_interval": "5", "conditional": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, *args: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "AIGC_HOME": str(home), "OMP_NUM_THREADS": "1", "AIGC_DATABASE_URL": ""}
    log = tempfile.TemporaryFile()  # not a pipe: a server that logs much would block on a full one
    # no rate limit unless a test sets one (a later --rate-limit wins): a fast machine could pass 600 a minute
    proc = subprocess.Popen([sys.executable, "-m", "aigc", "serve", "--port", str(port), "--rate-limit", "0", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the server exited {proc.returncode}: {log.read().decode(errors='replace')}")
        try:
            if httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the server did not start in {timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


RECIPES = {  # name -> (family, data, training arguments) of the tiny runs the server tests serve
    "poet": ("ngram", "poems", {"sets": {"max_order": "4"}}),
    "digits": ("vae", "digits", {"max_steps": 10, "sets": TINY_VAE}),
    "plain": ("vae", "digits", {"max_steps": 10, "sets": {**TINY_VAE, "conditional": "false"}}),
    "sun": ("ar", "sunspots", {}),
    "poet3": ("ngram", "poems", {"sets": {"max_order": "3"}}),  # a second text run (the arena needs two)
    "digits2": ("vae", "digits", {"max_steps": 10, "sets": TINY_VAE}),  # a second conditional image run
}


def train_runs(home: Path, names: tuple[str, ...] = ("poet", "digits", "sun")) -> None:
    """Tiny runs in home/runs, from RECIPES (data "poems": the conftest's poems, written to home/poems.txt)."""
    from tests.conftest import make_poems

    poems = home / "poems.txt"
    poems.write_text("\n%\n".join(make_poems()) + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        for name in names:
            family, data, kwargs = RECIPES[name]
            service.train(family, str(poems) if data == "poems" else data, name=name, **kwargs)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, tmp_path_factory):
    """Three runs (an n-gram poet, a conditional VAE on digits, an AR on sunspots) and a server over them, its
    store in SQLite, then in PostgreSQL (every test of the module runs on both; PostgreSQL skips, saying why,
    where no server can start)."""
    from tests.conftest import make_poems
    from transformers import GPT2Config, GPT2LMHeadModel

    from aigc.data.tokenizer import train_char

    home = tmp_path_factory.mktemp("served")
    train_runs(home)
    folder = home / "folders" / "tiny-gpt2"  # a plain Hugging Face folder, served with --model
    folder.mkdir(parents=True)
    train_char(make_poems()).save(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    database = None
    if request.param == "postgresql":
        from tests import postgres

        server = request.getfixturevalue("postgres_url")
        database = postgres.create_database(server)
    proc, url = start_server(home, "--model", f"tiny={folder}", *(["--database", database] if database else []))
    yield {"home": home, "url": url, "proc": proc, "folder": folder, "database": database}
    stop_server(proc)
    if database:
        postgres.drop_database(server, database)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0,
                         _strict_response_validation=True)


@pytest.fixture
def in_home(served, monkeypatch):
    """The in-process service sees the served runs (the oracle for what the server answers)."""
    monkeypatch.setenv("AIGC_HOME", str(served["home"]))
    return served["home"]


def test_models_lists_every_run_with_our_fields_and_sees_new_runs(client, served):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"poet", "digits", "sun", "tiny"}
    assert (models["tiny"].model_extra["family"], models["tiny"].owned_by) == ("hf", "local")
    poet = models["poet"].model_extra
    assert (poet["modality"], poet["family"], poet["headline"]["metric"]) == ("text", "ngram", "val_bpc")
    assert models["digits"].model_extra["modality"] == "image" and models["sun"].model_extra["family"] == "ar"
    runs = served["home"] / "runs"
    shutil.copytree(runs / "poet", runs / "poet-copy")
    shutil.copytree(runs / "poet", runs / "poet-cut")
    (runs / "poet-cut" / "run.json").write_text('{"family": "ng', encoding="utf-8")  # cut short
    try:
        assert {m.id for m in client.models.list()} == {"poet", "digits", "sun", "tiny", "poet-copy"}  # no restart
    finally:
        shutil.rmtree(runs / "poet-copy")
        shutil.rmtree(runs / "poet-cut")


def test_the_api_docs_need_no_network(served):
    page = httpx.get(f"{served['url']}/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    links = [part.split('"')[0] for part in page.text.split('"http')[1:]]
    assert links == [], links  # every script, style and icon is served by the server itself
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', page.text):
        assert httpx.get(f"{served['url']}{asset}").status_code == 200, asset


def test_completion_equals_the_cli_and_stream_equals_whole(client, in_home):
    whole = client.completions.create(model="poet", prompt="春", max_tokens=24, seed=7, temperature=1.0)
    oracle = service.generate("poet", {"prompt": "春", "max_new_tokens": 24, "temperature": 1.0}, seed=7)
    assert whole.choices[0].text == oracle.outputs[0][len("春"):]
    assert whole.id == whole.model_extra["generation_id"] and whole.id.startswith("gen-")
    assert whole.usage.prompt_tokens == 2
    assert whole.usage.completion_tokens == oracle.record["stats"]["generated_tokens"]
    # the client's Completion type makes finish_reason required, yet a completion stream's chunks before the
    # last have none (as OpenAI's own): strict validation cannot read any completion stream, so this one is lenient
    lenient = client.with_options()
    lenient._strict_response_validation = False
    chunks = list(lenient.completions.create(model="poet", prompt="春", max_tokens=24, seed=7, temperature=1.0,
                                             stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.model == "poet" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_a_hugging_face_folder_is_served_by_its_name(client, served):
    done = client.completions.create(model="tiny", prompt="春", max_tokens=8, seed=2)
    oracle = service.generate(str(served["folder"]), {"prompt": "春", "max_new_tokens": 8}, seed=2)
    assert done.choices[0].text == oracle.outputs[0][1:] and done.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=str(served["folder"]), prompt="春")  # a path is not a model id


def test_concurrent_requests_are_batched_and_each_gets_what_it_gets_alone(served, in_home):
    prompts = ["春", "", "江南", "明月光"] * 3
    asks = [{"model": "poet", "prompt": prompt, "max_tokens": 10 + 3 * i, "seed": i, "temperature": 1.0,
             **({"stop": ["。"]} if i % 2 else {"top_k": 4})} for i, prompt in enumerate(prompts)]
    answers, barrier = [None] * len(asks), threading.Barrier(len(asks))

    def ask(i: int) -> None:
        barrier.wait()
        answers[i] = httpx.post(f"{served['url']}/v1/completions", json=asks[i], timeout=120).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(a["batch_rows"] for a in answers) > 1  # some shared a batch
    for body, answer in zip(asks, answers, strict=True):
        options = {"prompt": body["prompt"], "max_new_tokens": body["max_tokens"], "temperature": 1.0,
                   "stop": body.get("stop"), "top_k": body.get("top_k")}
        alone = service.generate("poet", options, seed=body["seed"])
        assert answer["choices"][0]["text"] == alone.outputs[0][len(body["prompt"]):], body


def test_chat_answers_the_last_user_message_as_the_cli_does(client, in_home):
    reply = client.chat.completions.create(model="poet", seed=3, max_completion_tokens=16, messages=[
        {"role": "system", "content": "ignored"}, {"role": "user", "content": "不是这个"},
        {"role": "assistant", "content": "…"}, {"role": "user", "content": "月"}])
    oracle = service.generate("poet", {"prompt": "月", "max_new_tokens": 16}, seed=3)
    assert reply.choices[0].message.content == oracle.outputs[0][1:]
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    streamed = client.chat.completions.create(model="poet", seed=3, max_tokens=16, stream=True,
                                              messages=[{"role": "user", "content": "月"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content


def test_extra_body_controls_and_stops(client, in_home):
    beams = client.completions.create(model="poet", prompt="山", max_tokens=12, n=2,
                                      extra_body={"num_beams": 3, "no_repeat_ngram_size": 2})
    oracle = service.generate("poet", {"prompt": "山", "max_new_tokens": 12, "n": 2, "num_beams": 3,
                                       "no_repeat_ngram_size": 2}, seed=0)
    assert [c.text for c in beams.choices] == [s[1:] for s in oracle.outputs]
    stopped = client.completions.create(model="poet", prompt="", max_tokens=40, seed=1, stop=["。", "，"],
                                        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2})
    assert "。" not in stopped.choices[0].text and "，" not in stopped.choices[0].text


def test_images_equal_aigc_generate_and_urls_carry_records(client, in_home, served):
    got = client.images.generate(model="digits", prompt="7", n=2, response_format="b64_json",
                                 extra_body={"seed": 5})
    oracle = service.generate("digits", {"n": 2, "class_": "7"}, seed=5)
    pixels = [np.array(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in got.data]
    for ours, theirs in zip(pixels, oracle.outputs, strict=True):
        np.testing.assert_array_equal(ours, theirs[:, :, 0])
    ids = [d.model_extra["generation_id"] for d in got.data]
    assert len(set(ids)) == 2 and got.model_extra["id"] == ids[0]
    by_url = client.images.generate(model="digits", prompt="7", n=1, extra_body={"seed": 6})
    png = httpx.get(by_url.data[0].url).content
    record = read_png_record(io.BytesIO(png))
    assert (record["seed"], record["class"]) == (6, 7)
    with pytest.raises(openai.BadRequestError, match="unknown class 'sneaker'.*0, 1, 2"):
        client.images.generate(model="digits", prompt="sneaker")


def test_forecasts_are_the_numbers_of_aigc_generate(served, in_home):
    got = httpx.post(f"{served['url']}/v1/forecasts", json={"model": "sun", "horizon": 6, "paths": 2, "seed": 3})
    assert got.status_code == 200, got.text
    oracle = service.generate("sun", {"horizon": 6, "paths": 2}, seed=3).outputs
    body = got.json()
    assert body["forecast"]["forecast"] == pytest.approx(oracle["forecast"], rel=1e-12)
    np.testing.assert_allclose(body["forecast"]["paths"], oracle["paths"], rtol=1e-12)
    assert body["seed"] == 3 and body["id"] == body["generation_id"]


def test_generations_are_stored_and_rated(client, served):
    done = client.completions.create(model="poet", prompt="风", max_tokens=8, seed=11)
    url = f"{served['url']}/v1/generations/{done.id}"
    row = httpx.get(url).json()
    assert row["run"] == "poet" and row["seed"] == 11 and row["request"]["prompt"] == "风"
    assert row["output"][0] == "风" + done.choices[0].text and row["source"] == "api"
    assert row["run_sha256"] and row["latency_s"] > 0 and row["completion_tokens"] == done.usage.completion_tokens
    rated = httpx.post(f"{url}/ratings", json={"score": 1, "stars": 4, "comment": "好诗"})
    assert rated.status_code == 200 and rated.json()["score"] == 1
    assert httpx.get(url).json()["ratings"][0]["comment"] == "好诗"
    listed = httpx.get(f"{served['url']}/v1/generations", params={"model": "poet", "rated": True}).json()
    assert done.id in [g["id"] for g in listed["data"]]
    for bad in ({"score": 2}, {"score": 1, "stars": 0}, {"score": "1"}, {}):
        answer = httpx.post(f"{url}/ratings", json=bad)
        assert answer.status_code == 400 and "error" in answer.json(), bad
    assert httpx.post(f"{served['url']}/v1/generations/gen-0/ratings", json={"score": 1}).status_code == 404


def test_client_errors_are_the_clients_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="no such model"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="poet", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="image run: use /v1/images"):
        client.completions.create(model="digits", prompt="x")
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model="poet", prompt="x", stop=["a", "b", "c", "d", "e"])


def test_a_failure_inside_a_model_is_a_500_and_the_server_goes_on(client, served):
    """A run whose weights file is garbage that its manifest vouches for: loading fails inside safetensors."""
    import hashlib

    runs = served["home"] / "runs"
    broken = runs / "broken"
    shutil.copytree(runs / "digits", broken)
    try:
        (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
        manifest = json.loads((broken / "manifest.json").read_text())
        manifest["files"]["model.safetensors"]["sha256"] = hashlib.sha256(b"not a safetensors file" * 10).hexdigest()
        (broken / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(openai.InternalServerError, match="internal error"):
            client.images.generate(model="broken", prompt="1")
        assert client.images.generate(model="digits", prompt="1", extra_body={"seed": 0}).data[0].url
    finally:
        shutil.rmtree(broken)


def test_a_full_disk_is_a_clean_507_and_the_server_goes_on(client, served):
    """The folder the server writes PNGs into, mounted as a 64 KiB tmpfs and filled (needs root)."""
    folder = served["home"] / "generations"
    folder.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): no full disk to test with")
    try:
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # fill it to the last byte
            while True:
                os.write(fd, b"\0" * 1024)
        os.close(fd)
        before = httpx.get(f"{served['url']}/v1/generations", params={"limit": 1}).json()["total"]
        with pytest.raises(openai.APIStatusError, match="no space left") as caught:
            client.images.generate(model="digits", prompt="1", extra_body={"seed": 0})
        assert caught.value.status_code == 507 and caught.value.body["type"] == "insufficient_storage"
        assert httpx.get(f"{served['url']}/v1/generations", params={"limit": 1}).json()["total"] == before
        assert [p.name for p in folder.iterdir()] == ["filler"]  # no half-written PNG left behind
        assert client.completions.create(model="poet", prompt="春", max_tokens=4, seed=1).choices
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_sixteen_threads_generating_and_rating_lose_no_row(served):
    url, barrier, errors = served["url"], threading.Barrier(16), []
    before = httpx.get(f"{url}/v1/generations", params={"limit": 1}).json()["total"]

    def worker(i: int) -> None:
        try:
            with httpx.Client(timeout=120) as http:
                barrier.wait()
                for j in range(2):
                    done = http.post(f"{url}/v1/completions", json={"model": "poet", "prompt": "春", "max_tokens": 4,
                                                                    "seed": 100 * i + j})
                    done.raise_for_status()
                    http.post(f"{url}/v1/generations/{done.json()['id']}/ratings",
                              json={"score": 1 if j else -1}).raise_for_status()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    after = httpx.get(f"{url}/v1/generations", params={"limit": 1000}).json()
    assert after["total"] == before + 32
    assert sum(len(g["ratings"]) for g in after["data"] if g["request"].get("max_tokens") == 4) == 32


def test_a_bad_body_never_kills_the_server_nor_answers_422(served):
    for body in (b"\xff\xfe", b"{", b"[]", b"null", json.dumps({"model": "poet", "max_tokens": 10**30}).encode()):
        answer = httpx.post(f"{served['url']}/v1/completions", content=body,
                            headers={"content-type": "application/json"})
        assert answer.status_code == 400 and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{served['url']}/v1/models").status_code == 200


def make_key(home: Path, name: str) -> str:
    made = subprocess.run([sys.executable, "-m", "aigc", "keys", "create", name], env={
        **os.environ, "AIGC_HOME": str(home), "AIGC_DATABASE_URL": ""}, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_keys_rate_limit_and_sigterm(tmp_path, served):
    """A second server whose store has keys: 401 without one, 429 past the rate limit (per key), and SIGTERM
    lets the requests in flight finish and exits 0."""
    home = tmp_path / "home"
    shutil.copytree(served["home"] / "runs" / "poet", home / "runs" / "poet")
    secret, other = make_key(home, "tester"), make_key(home, "other")
    assert secret.startswith("aigc-") and secret not in (home / "aigc.db").read_bytes().decode("latin-1")
    proc, url = start_server(home, "--rate-limit", "10")
    try:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="aigc-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            wrong.models.list()
        bare = httpx.get(f"{url}/v1/models")  # no Authorization header at all
        assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, _strict_response_validation=True)
        assert [m.id for m in keyed.models.list()] == ["poet"]
        done = keyed.completions.create(model="poet", prompt="春", max_tokens=4, seed=1)
        assert httpx.get(f"{url}/v1/generations/{done.id}",
                         headers={"Authorization": f"Bearer {secret}"}).json()["key_id"].startswith("key-")
        for _ in range(7):
            keyed.models.list()
        with pytest.raises(openai.RateLimitError, match="rate limit"):
            keyed.models.list()  # the eleventh request in a minute
        answers = []

        def ask(seed: int) -> None:
            answer = httpx.post(f"{url}/v1/completions", timeout=90, headers={"Authorization": f"Bearer {other}"},
                                json={"model": "poet", "prompt": "", "max_tokens": 4096, "seed": seed, "n": 4,
                                      "temperature": 2.0})
            answers.append((answer.status_code, time.monotonic()))

        askers = [threading.Thread(target=ask, args=(seed,)) for seed in range(8)]
        for t in askers:
            t.start()
        deadline = time.monotonic() + 60
        while sum(httpx.get(f"{url}/health").json()[k] for k in ("generating", "waiting")) + len(answers) < 8:
            assert time.monotonic() < deadline, "the eight requests never reached the server"
            time.sleep(0.001)
        assert len(answers) < 8
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in askers:
            t.join(timeout=90)
        assert proc.wait(timeout=60) == 0
        assert sorted(code for code, _ in answers) == [200] * 8
        assert max(at for _, at in answers) > signalled  # some were still at work when the signal came
    finally:
        stop_server(proc)


def test_a_non_loopback_host_without_a_key_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "aigc", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                         env={**os.environ, "AIGC_HOME": str(tmp_path), "AIGC_DATABASE_URL": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "refusing to serve on 0.0.0.0 without an API key" in out.stderr
    out = subprocess.run([sys.executable, "-m", "aigc", "serve", "--stream-interval-ms", "-1"],
                         env={**os.environ, "AIGC_HOME": str(tmp_path), "AIGC_DATABASE_URL": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "--stream-interval-ms in 0..1000" in out.stderr


def test_a_cancelled_generation_stops_at_the_next_token(in_home):
    """What a disconnect does (the server sets the job's event): decoding stops at the next token."""
    from aigc.errors import Cancelled

    cancel, pieces = threading.Event(), []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        cancel.set()

    with pytest.raises(Cancelled):
        service.generate("poet", {"prompt": "", "max_new_tokens": 4096, "temperature": 2.0}, seed=2,
                         stream=on_text, cancel=cancel)
    assert 1 <= len(pieces) <= 2
    with pytest.raises(Cancelled):
        service.generate("digits", {"n": 4, "class_": "1"}, seed=0, cancel=cancel)


def test_load_at_twice_the_capacity_then_sigterm(tmp_path, served):
    """A server that takes 4 generations at once (2 in a batch, 2 waiting) and 32 concurrent requests: every
    answer is 200 or 503 with Retry-After, within 60 s, never a 5xx else; SIGTERM under that load: the
    requests in flight are answered, a new connection is refused, the process exits 0."""
    import asyncio

    home = tmp_path / "home"
    shutil.copytree(served["home"] / "runs" / "poet", home / "runs" / "poet")
    proc, url = start_server(home, "--batch-size", "2", "--max-queue", "2", "--rate-limit", "0")
    try:
        async def one(client, seed: int):
            try:
                answer = await client.post(f"{url}/v1/completions", json={
                    "model": "poet", "prompt": "", "max_tokens": 200, "seed": seed, "temperature": 1.5})
                return answer.status_code, answer.headers.get("retry-after"), answer.json()
            except httpx.TransportError as e:  # refused after SIGTERM
                return type(e).__name__, None, None

        async def storm(n: int, then=None):
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.create_task(one(client, seed)) for seed in range(n)]
                if then is not None:
                    await then(tasks)
                return await asyncio.gather(*tasks)

        answers = asyncio.run(storm(32))
        codes = [code for code, _, _ in answers]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 4, codes
        assert all(retry and int(retry) > 0 and "busy" in body["error"]["message"]
                   for code, retry, body in answers if code == 503)

        async def terminate(tasks):
            # under load: once a generation is seen in flight, or one is already answered (a fast model can finish
            # between two looks); the test fails rather than waits for ever
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/health").json()["generating"] == 0 and not any(t.done() for t in tasks):
                assert time.monotonic() < deadline, "no generation was seen in flight within 60 s"
                await asyncio.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health", timeout=5)

        answers = asyncio.run(storm(8, terminate))
        assert proc.wait(timeout=60) == 0
        codes = [code for code, _, _ in answers]
        assert codes.count(200) >= 1 and set(codes) <= {200, 503, "ConnectError"}, codes
    finally:
        stop_server(proc)


def test_streamed_text_is_delivered_at_most_once_an_interval_and_nothing_is_lost():
    """The mailbox between decoding threads and the event loop: the first piece goes at once, then the pieces
    that come within an interval share one delivery, each job's in order; a job's end goes at once, without
    waiting for the interval; with no interval each post is its own wake-up (or merged with those already
    waiting)."""
    import asyncio

    from aigc.server.app import Mailbox

    class Job:  # what a mailbox needs of a job: a queue of events
        def __init__(self):
            self.events = asyncio.Queue()

    async def scenario(interval: float) -> tuple[list[float], dict]:
        loop = asyncio.get_running_loop()
        box, jobs, deliveries = Mailbox(loop, interval), [Job(), Job()], []
        deliver = box._deliver

        def counted():
            deliveries.append(time.monotonic())
            deliver()

        box._deliver = counted
        t0, ended = time.monotonic(), []

        def worker():
            for i in range(60):  # 60 tokens for each of two jobs, one every 5 ms: 0.3 s
                for j, job in enumerate(jobs):
                    box.post(job, "text", f"{j}:{i},")
                time.sleep(0.005)
            time.sleep(0.03)  # within the interval of the last delivery of text
            ended.append(time.monotonic() - t0)
            for job in jobs:
                box.post(job, "done", None)

        thread = threading.Thread(target=worker)
        thread.start()
        texts = {0: "", 1: ""}
        for j, job in enumerate(jobs):
            while (event := await job.events.get())[0] == "text":
                texts[j] += event[1]
        thread.join()
        return [t - t0 for t in deliveries], texts, ended[0]

    for interval in (0.1, 0.0):
        deliveries, texts, ended = asyncio.run(scenario(interval))
        assert texts == {j: "".join(f"{j}:{i}," for i in range(60)) for j in (0, 1)}
        assert deliveries[0] < 0.05  # the first piece does not wait for the interval
        if interval:
            text_deliveries = [t for t in deliveries if t < ended]
            assert all(b - a >= interval * 0.9 for a, b in zip(text_deliveries, text_deliveries[1:], strict=False))
            assert len(deliveries) <= 7  # 0.3 s of tokens in 0.1 s intervals, and the ends
            assert deliveries[-1] - ended < 0.05  # the ends go at once, not an interval after the last text
        else:
            assert len(deliveries) > 20  # one a post, less what the loop merged while it was busy
