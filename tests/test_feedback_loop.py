"""The loop closed through the HTTP API, as a person closes it in the studio (the fast version of
benchmarks/feedback.py): a scripted user asks a real `aigc serve` for 200 outputs of a tiny gpt, rates each one, asks
for a new run made from those ratings (POST /v1/optimizations, a job), and then likes clearly more of the new run's
fresh outputs. The taste here (a completion with 山) is not the benchmark's (月): optimize knows neither."""

from __future__ import annotations

import math
import time

import httpx
import openai
import pytest
from tests.conftest import TINY_SETS, make_poems
from tests.test_server import start_server, stop_server

from aigc import service

PROMPTS = ("《诗", "春", "江", "月")


def likes(text: str) -> bool:
    return "山" in text


def significantly_higher(before: float, after: float, n: int) -> bool:
    """A one-sided two-proportion z-test at 97.5%."""
    pooled = (before + after) / 2
    return after - before > 1.96 * math.sqrt(pooled * (1 - pooled) * 2 / n)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("loop")
    poems = home / "poems.txt"
    poems.write_text("\n%\n".join(make_poems(200)) + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        service.train("gpt", str(poems), name="poet", max_steps=150,
                      sets={**TINY_SETS["gpt"], "eval_interval": "50", "n_embd": "32"})
        service.train("ngram", str(poems), name="counted", sets={"max_order": "3"})
    proc, url = start_server(home)
    yield {"url": url, "home": home}
    stop_server(proc)


def completions(client: openai.OpenAI, model: str, per_prompt: int, seed: int, **extra) -> list[tuple[str, str, int]]:
    """(generation id, completion, index) for per_prompt outputs of each prompt, 16 a request."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        for j in range(0, per_prompt, 16):
            n = min(16, per_prompt - j)
            made = client.completions.create(model=model, prompt=prompt, n=n, max_tokens=12, seed=seed + 100 * i + j,
                                             extra_body=extra or None)
            out += [(made.id, choice.text, choice.index) for choice in made.choices]
    return out


def share_liked(client: openai.OpenAI, model: str, **extra) -> float:
    made = completions(client, model, 50, 10_000, **extra)
    assert len(made) == 200
    return sum(likes(text) for _, text, _ in made) / len(made)


def wait_for(http: httpx.Client, job: dict, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while job["status"] == "running":
        assert time.monotonic() < deadline, f"job {job['id']} still running after {timeout} s"
        time.sleep(0.5)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    return job


@pytest.mark.slow
def test_two_hundred_ratings_through_the_api_make_runs_the_user_likes_more(server):
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0)
    http = httpx.Client(base_url=server["url"], timeout=60)
    # 1. the scripted user rates 200 outputs, each by its index in its generation
    for gen_id, text, index in completions(client, "poet", 50, 0):
        rated = http.post(f"/v1/generations/{gen_id}/ratings", json={"score": 1 if likes(text) else -1, "index": index})
        assert rated.status_code == 200, rated.text
    # 2. a new run from those ratings, for each of two methods, as jobs
    made = {}
    for method, sets in (("sft", {"batch_size": "16", "lr": "3e-4"}), ("rerank", {})):
        started = http.post("/v1/optimizations", json={"model": "poet", "method": method,
                                                       "sets": {**sets, "eval_samples": "32"}})
        assert started.status_code == 200, started.text
        job = wait_for(http, started.json())
        assert job["status"] == "done", job
        assert job["run"] == f"poet-{method}" and job["progress"] == 1.0
        made[method] = job["result"]["metrics"]
    assert made["sft"]["steps"] == 100 and made["rerank"]["steps"] == 0
    assert {"liked_share_before", "liked_share_after", "parent_val_bpc"} <= set(made["sft"])
    listed = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert {"poet-sft", "poet-rerank"} <= listed
    # 3. fresh outputs: the user likes clearly more of each new run's (the rerank run draws 4 for each by default)
    before = share_liked(client, "poet")
    for model in ("poet-sft", "poet-rerank"):
        after = share_liked(client, model)
        assert significantly_higher(before, after, 200), (model, before, after)
    # best_of 1 turns the reranking off: the parent's own samples, the same seed
    plain = [text for _, text, _ in completions(client, "poet", 4, 7)]
    assert [text for _, text, _ in completions(client, "poet-rerank", 4, 7, best_of=1)] == plain


def test_an_optimization_the_feedback_cannot_feed_is_refused_before_any_job_starts(server):
    http = httpx.Client(base_url=server["url"], timeout=60)
    before = http.get("/v1/jobs").json()["data"]
    for body, status, message in [
        ({"model": "counted", "method": "sft"}, 400, "sft learns from liked outputs, and run 'counted' has none"),
        ({"model": "counted", "method": "ppo"}, 400, "method"),
        ({"model": "nosuch", "method": "sft"}, 404, "nosuch"),
        ({"model": "poet", "method": "sft", "name": "../x"}, 400, "invalid run name"),
    ]:
        answer = http.post("/v1/optimizations", json=body)
        assert answer.status_code == status, answer.text
        assert message in answer.json()["error"]["message"]
    assert http.get("/v1/jobs").json()["data"] == before
