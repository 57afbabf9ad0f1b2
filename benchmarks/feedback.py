"""The feedback loop, measured: a scripted user with a clear taste, hidden from the model, drives one round of
ratings and `aigc optimize` through the HTTP API of a real `aigc serve`, as a person would through the studio.

    python benchmarks/feedback.py [--quick] [--only text|image] [--methods sft,dpo,rerank] [--out benchmarks/results]
        [--set KEY=VALUE ...] [--name RESULT]

A method may carry its own keys after `+` (`--methods sft+tilt=2,sft+tilt=3+anchor=1`): each is one row, made from
the same parent and ratings and judged by the same user and FID images, so variants compare within one run.

- text: a gpt trained on the Tang poems (tang300). The user likes poems that mention the moon (月) and dislikes the
  rest. 200 outputs of the rated prompts are rated (+1 / -1, each by its index in its generation).
- images: an unconditional run on Fashion-MNIST. The user likes sneakers and ankle boots and dislikes the rest; a
  picture's class is read by the user's own classifier (scikit-learn's MLP on the pixels, trained here on the
  training split), apart from the evaluation feature net that the reward model reads.
Then, for each method, POST /v1/optimizations makes a new run (a job), and 200 fresh outputs of the parent and of
each new run (text: prompts that were never rated) are judged by the same user: the share liked before and after,
with 95% Wilson intervals and a one-sided two-proportion z-test, beside the regular metric on the same validation
split: bits per character (the new run's tolerance: at most 5% above the parent's) or FID against the parent's
held-out images (at most 25% above the parent's). Results: results/feedback.json and results/feedback.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, describe_machine, fmt, machine, write_results

sys.path.insert(0, str(ROOT.parent / "src"))

RATED_PROMPTS = ("春", "山", "秋", "江", "白", "青", "花", "风", "日", "云")
FRESH_PROMPTS = ("夜", "天", "水", "人", "长", "落", "明", "高")  # never rated: the new runs meet them fresh
MAX_TOKENS = 48  # a quatrain of seven-character lines and a little more
RATINGS = 200
FRESH = 200
TEXT_TOLERANCE = 0.05  # the new run's bits/char may be at most 5% above the parent's
EXTRA_SETS: dict[str, str] = {}  # --set
FID_TOLERANCE = 0.25  # its FID at most 25% above the parent's
LIKED_CLASSES = (7, 9)  # Fashion-MNIST's sneaker and ankle boot
# the parents' budgets in steps, not minutes, so that a busy machine trains the same parent (full, quick)
TEXT_STEPS = {False: 3000, True: 800}
IMAGE_STEPS = {False: 10_000, True: 3000}
GPT = {"n_layer": "4", "n_head": "4", "n_embd": "128", "n_positions": "256", "block_size": "128"}
Z95 = 1.959964


# ----------------------------------------------------------------------------------
# statistics


def wilson(k: int, n: int) -> list[float]:
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def z_test(k0: int, n0: int, k1: int, n1: int) -> float:
    """One-sided p-value of "the second share is higher" (pooled two-proportion z-test)."""
    pooled = (k0 + k1) / (n0 + n1)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
    if se == 0:
        return 0.5
    z = (k1 / n1 - k0 / n0) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


# ----------------------------------------------------------------------------------
# the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "AIGC_HOME": str(home), "AIGC_DATABASE_URL": ""}
    log = open(home / "server.log", "wb")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen([sys.executable, "-m", "aigc", "serve", "--port", str(port), "--rate-limit", "0"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: see {home / 'server.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def method_sets(method: str, sets: dict) -> tuple[str, dict]:
    """'sft+tilt=2+anchor=1' -> ('sft', sets with tilt 2 and anchor 1): a method and its own keys over `sets`."""
    name, *own = method.split("+")
    return name, {**sets, **dict(item.split("=", 1) for item in own)}


def optimize(http, run: str, method: str, sets: dict) -> dict:
    """POST /v1/optimizations for `method` (with its own keys after `+`, over `sets`; the new run named RUN-METHOD,
    every other character than a letter, digit, '.', '_' or '-' a '-') and wait for the job; the new run's
    metrics."""
    base, sets = method_sets(method, sets)
    name = f"{run}-{re.sub(r'[^A-Za-z0-9._-]+', '-', method)}"
    started = http.post("/v1/optimizations", json={"model": run, "method": base, "sets": sets, "name": name})
    if started.status_code != 200:
        raise SystemExit(f"optimize {run} {method}: {started.status_code} {started.text}")
    job = started.json()
    t0, shown = time.perf_counter(), None
    while job["status"] == "running":
        time.sleep(2)
        job = http.get(f"/v1/jobs/{job['id']}").json()
        line = f"  {method}: {job['status']} {job.get('progress') or 0:.0%}"
        if line != shown:
            print(f"{line} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            shown = line
    if job["status"] != "done":
        raise SystemExit(f"optimize {run} {method} ended {job['status']}: {job.get('error')}")
    return {"run": job["run"], "seconds": time.perf_counter() - t0, **job["result"]["metrics"]}


# ----------------------------------------------------------------------------------
# text: the moon


def moon(text: str, prompt: str) -> bool:
    return "月" in text[len(prompt):]


def text_outputs(client, model: str, prompts: tuple[str, ...], total: int, seed: int) -> list[tuple]:
    """(generation id, index, prompt, full text) for `total` outputs spread over the prompts, 16 a request."""
    out, per = [], math.ceil(total / len(prompts))
    for i, prompt in enumerate(prompts):
        for j in range(0, per, 16):
            n = min(16, per - j, total - len(out))
            if n <= 0:
                break
            made = client.completions.create(model=model, prompt=prompt, n=n, max_tokens=MAX_TOKENS,
                                             seed=seed + 1000 * i + j, echo=True)
            out += [(made.id, c.index, prompt, c.text) for c in made.choices]
    return out


def bench_text(home: Path, url: str, steps: int, methods: list[str], family: str = "gpt") -> dict:
    import httpx
    import openai

    from aigc import service, store

    if not Path("/usr/share/games/fortunes/tang300").is_file():
        raise SystemExit("tang300 is missing: install the Debian package fortunes-zh (scripts/setup.sh --corpora)")
    os.environ["AIGC_HOME"] = str(home)
    t0 = time.perf_counter()
    if family == "ngram":  # counted: no steps
        service.train("ngram", "tang300", name="poet")
    else:
        service.train("gpt", "tang300", name="poet", max_steps=steps, sets=GPT)
    train_s = time.perf_counter() - t0
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    http = httpx.Client(base_url=url, timeout=600)
    rated = text_outputs(client, "poet", RATED_PROMPTS, RATINGS, seed=0)
    for gen_id, index, prompt, text in rated:
        http.post(f"/v1/generations/{gen_id}/ratings", json={"score": 1 if moon(text, prompt) else -1,
                                                             "index": index}).raise_for_status()
    liked_rated = sum(moon(text, prompt) for _, _, prompt, text in rated)
    print(f"text: {len(rated)} rated, {liked_rated} liked", file=sys.stderr)

    def judged(model: str) -> tuple[int, int]:
        fresh = text_outputs(client, model, FRESH_PROMPTS, FRESH, seed=50_000)
        return sum(moon(text, prompt) for _, _, prompt, text in fresh), len(fresh)

    k0, n0 = judged("poet")
    parent_bpc = store.read_run(home / "runs" / "poet")["metrics"]["val_bpc"]
    rows = []
    for method in methods:
        made = optimize(http, "poet", method, {"eval_samples": "200", **EXTRA_SETS})
        k1, n1 = judged(made["run"])
        bpc = made["val_bpc"]
        rows.append({"modality": "text", "method": method, "run": made["run"], "rated": len(rated),
                     "rated_liked": liked_rated, "before": k0 / n0, "before_ci95": wilson(k0, n0), "n_before": n0,
                     "after": k1 / n1, "after_ci95": wilson(k1, n1), "n_after": n1,
                     "p_value": z_test(k0, n0, k1, n1), "metric": "val_bpc", "metric_before": parent_bpc,
                     "metric_after": bpc, "within_tolerance": bpc <= parent_bpc * (1 + TEXT_TOLERANCE),
                     "judge_before": made.get("liked_share_before"), "judge_after": made.get("liked_share_after"),
                     "judge_heldout_accuracy": made.get("judge_heldout_accuracy"), "optimize_s": made["seconds"],
                     "steps": made.get("steps")})
        print(f"text {method}: liked {k0 / n0:.3f} -> {k1 / n1:.3f}, bpc {parent_bpc:.4f} -> {bpc:.4f}",
              file=sys.stderr)
    return {"parent": {"family": family, "data": "tang300", "train_s": train_s, "val_bpc": parent_bpc,
                       "steps": steps if family != "ngram" else 0},
            "rows": rows}


# ----------------------------------------------------------------------------------
# images: sneakers and ankle boots


def user_classifier(seed: int = 1):
    """The scripted user's eyes: scikit-learn's MLP on Fashion-MNIST pixels (not the evaluation's conv net)."""
    from sklearn.neural_network import MLPClassifier

    from aigc.data.images import load_images

    train, test = load_images("fashion-mnist"), load_images("fashion-mnist", split="test")
    x = train.images.reshape(len(train.images), -1) / 255.0
    clf = MLPClassifier(hidden_layer_sizes=(256,), max_iter=20, random_state=seed).fit(x, train.labels)
    predicted = clf.predict(test.images.reshape(len(test.images), -1) / 255.0)
    liked_right = (np.isin(predicted, LIKED_CLASSES) == np.isin(test.labels, LIKED_CLASSES)).mean()
    return clf, {"test_accuracy": float((predicted == test.labels).mean()), "liked_accuracy": float(liked_right)}


def image_outputs(http, model: str, total: int, seed: int) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    out = []
    while len(out) < total:
        n = min(16, total - len(out))
        made = http.post("/v1/images/generations", json={"model": model, "n": n, "seed": seed + len(out),
                                                        "response_format": "b64_json"})
        made.raise_for_status()
        for datum in made.json()["data"]:
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(datum["b64_json"]))).convert("L"))
            out.append((datum["generation_id"], pixels))
    return out


def bench_images(home: Path, url: str, family: str, steps: int, methods: list[str]) -> dict:
    import httpx

    from aigc import service, store

    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        raise SystemExit("fashion-mnist is missing: install the Debian package dataset-fashion-mnist")
    os.environ["AIGC_HOME"] = str(home)
    t0 = time.perf_counter()
    clf, eyes = user_classifier()
    print(f"images: the user's classifier {eyes}", file=sys.stderr)
    service.train(family, "fashion-mnist", name="closet", max_steps=steps)
    train_s = time.perf_counter() - t0
    http = httpx.Client(base_url=url, timeout=600)

    def likes(images: list[np.ndarray]) -> np.ndarray:
        return np.isin(clf.predict(np.stack(images).reshape(len(images), -1) / 255.0), LIKED_CLASSES)

    rated = image_outputs(http, "closet", RATINGS, seed=0)
    verdicts = likes([p for _, p in rated])
    for (gen_id, _), liked in zip(rated, verdicts, strict=True):
        http.post(f"/v1/generations/{gen_id}/ratings", json={"score": 1 if liked else -1}).raise_for_status()
    print(f"images: {len(rated)} rated, {int(verdicts.sum())} liked", file=sys.stderr)

    def judged(model: str) -> tuple[int, int]:
        fresh = image_outputs(http, model, FRESH, seed=50_000)
        return int(likes([p for _, p in fresh]).sum()), len(fresh)

    k0, n0 = judged("closet")
    rows = []
    for method in methods:
        made = optimize(http, "closet", method, {"eval_samples": "500", **EXTRA_SETS})
        k1, n1 = judged(made["run"])
        fid0, fid1 = made.get("fid_before"), made.get("fid_after")
        rows.append({"modality": "image", "method": method, "run": made["run"], "rated": len(rated),
                     "rated_liked": int(verdicts.sum()), "before": k0 / n0, "before_ci95": wilson(k0, n0),
                     "n_before": n0, "after": k1 / n1, "after_ci95": wilson(k1, n1), "n_after": n1,
                     "p_value": z_test(k0, n0, k1, n1), "metric": f"FID ({made.get('fid_images')} images)",
                     "metric_before": fid0, "metric_after": fid1, "fid_floor": made.get("fid_floor"),
                     "fid_matched_before": made.get("fid_matched_before"),
                     "fid_matched_after": made.get("fid_matched_after"),
                     "within_tolerance": fid0 is not None and fid1 <= fid0 * (1 + FID_TOLERANCE),
                     "matched_within_tolerance": made.get("fid_matched_before") is not None
                     and made["fid_matched_after"] <= made["fid_matched_before"] * (1 + FID_TOLERANCE),
                     "judge_before": made.get("liked_share_before"), "judge_after": made.get("liked_share_after"),
                     "judge_heldout_accuracy": made.get("judge_heldout_accuracy"), "optimize_s": made["seconds"],
                     "steps": made.get("steps")})
        print(f"images {method}: liked {k0 / n0:.3f} -> {k1 / n1:.3f}, FID {fid0} -> {fid1}", file=sys.stderr)
    parent = store.read_run(home / "runs" / "closet")
    return {"parent": {"family": family, "data": "fashion-mnist", "train_s": train_s,
                       "steps": parent["metrics"].get("steps")}, "user": eyes, "rows": rows}


# ----------------------------------------------------------------------------------


def image_parent(home: Path) -> None:
    """The quick image benchmark's parent and its ratings (run "closet") in `home`, made once through the benchmark's
    own code with no optimization (benchmarks/feedback_picks.py and feedback_sft.py measure variants against it)."""
    if (home / "runs" / "closet").is_dir():
        return
    proc, url = start_server(home)
    try:
        bench_images(home, url, "vae", IMAGE_STEPS[True], [])
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def table(result: dict) -> str:
    lines = [f"# Feedback loop: one round of {RATINGS} ratings, then aigc optimize", "",
             f"{describe_machine(result['machine'])}; {'quick' if result['quick'] else 'full'} run; "
             f"{result['seconds']:.0f} s in all.", "",
             f"Liked: the share of {result.get('fresh', 200)} fresh outputs the scripted user likes (text: prompts "
             "never rated), with the "
             "95% Wilson interval; p: one-sided two-proportion z-test. Judge: the same share as the new run's "
             "own report estimates it (a reward model fitted on the ratings).", "",
             "| modality | method | liked before | liked after | p | metric | before | after | within tolerance "
             "| judge before -> after | judge held-out accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for part in ("text", "image"):
        for r in result.get(part, {}).get("rows", []):
            lo0, hi0 = r["before_ci95"]
            lo1, hi1 = r["after_ci95"]
            lines.append(
                f"| {part} | {r['method']} | {r['before']:.3f} [{lo0:.3f}, {hi0:.3f}] | {r['after']:.3f} "
                f"[{lo1:.3f}, {hi1:.3f}] | {r['p_value']:.2g} | {r['metric']} | {fmt(r['metric_before'])} | "
                f"{fmt(r['metric_after'])} | {'yes' if r['within_tolerance'] else 'no'} | "
                f"{fmt(r['judge_before'])} -> {fmt(r['judge_after'])} | {fmt(r['judge_heldout_accuracy'])} |")
    if "text" in result:
        p = result["text"]["parent"]
        made = f"gpt ({GPT['n_layer']} x {GPT['n_embd']}) trained {p['steps']} steps" \
            if p["family"] == "gpt" else "an n-gram counted"
        lines += ["", f"Text parent: {made} ({p['train_s']:.0f} s) on tang300, val {p['val_bpc']:.4f} bits/char. "
                      f"Tolerance: bits/char "
                      f"at most {TEXT_TOLERANCE:.0%} above the parent's."]
    matched = [r for r in result.get("image", {}).get("rows", []) if r.get("fid_matched_before") is not None]
    if matched:
        lines += ["", "FID against held-out images drawn to each side's own class mix (the preference moves the mix "
                      "on purpose; this FID takes the mix out and measures the pictures): "
                  + "; ".join(f"{r['method']} {fmt(r['fid_matched_before'])} -> {fmt(r['fid_matched_after'])} "
                              f"(within tolerance: {'yes' if r.get('matched_within_tolerance') else 'no'})"
                              for r in matched) + "."]
    if "image" in result:
        p, u = result["image"]["parent"], result["image"]["user"]
        lines += ["", f"Image parent: unconditional {p['family']} on fashion-mnist ({p['steps']} steps, "
                      f"{p['train_s']:.0f} s with the user's classifier). The user's classifier: "
                      f"{u['test_accuracy']:.3f} accuracy on the test split, {u['liked_accuracy']:.3f} on liked vs "
                      f"not. Tolerance: FID at most {FID_TOLERANCE:.0%} above the parent's."]
    return "\n".join(lines) + "\n"


def main() -> None:
    global FRESH  # --fresh: read by bench_text and bench_images, as EXTRA_SETS is
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller parents (about a minute each)")
    parser.add_argument("--only", choices=("text", "image"))
    parser.add_argument("--methods", default="sft,dpo,rerank")
    parser.add_argument("--image-family", default="vae", choices=("vae", "dcgan", "diffusion"))
    parser.add_argument("--text-family", default="gpt", choices=("gpt", "ngram"), help="ngram: sft and rerank")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an [optimize] or [train] key for every optimize (aigc optimize --set)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", help="the results' file name (default: feedback[-quick][-text|-image][-ngram])")
    parser.add_argument("--fresh", type=int, default=FRESH,
                        help=f"fresh outputs the user judges per side, parent and each new run (at least {FRESH})")
    args = parser.parse_args()
    if args.fresh < FRESH:
        parser.error(f"--fresh must be at least {FRESH} (the issue's minimum), got {args.fresh}")
    FRESH = args.fresh
    EXTRA_SETS.update(dict(item.split("=", 1) for item in args.set))
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    result = {"machine": machine(), "quick": args.quick, "fresh": FRESH}
    with tempfile.TemporaryDirectory(prefix="aigc-feedback-") as tmp:
        home = Path(tmp)
        proc, url = start_server(home)
        try:
            if args.only in (None, "text"):
                takes = [m for m in methods if args.text_family != "ngram" or method_sets(m, {})[0] != "dpo"]
                result["text"] = bench_text(home, url, TEXT_STEPS[args.quick], takes, args.text_family)
            if args.only in (None, "image"):
                result["image"] = bench_images(home, url, args.image_family, IMAGE_STEPS[args.quick],
                                               [m for m in methods if method_sets(m, {})[0] != "dpo"])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result["seconds"] = time.perf_counter() - t0
    name = ("feedback-quick" if args.quick else "feedback") + (f"-{args.only}" if args.only else "") \
        + (f"-{args.text_family}" if args.text_family != "gpt" and args.only != "image" else "")
    write_results(args.out, args.name or name, result, table(result))
    print(table(result))


if __name__ == "__main__":
    main()
