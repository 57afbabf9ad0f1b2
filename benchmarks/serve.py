"""Serving benchmark: a quickstart-sized gpt served for real by `aigc serve` (a subprocess on loopback),
streamed completions of max_tokens 100 from 1, 4, 16 and 64 concurrent clients, with batching on and off;
requests/s, tokens/s, p50/p99 latency and time to first token; against a bare loop of transformers
`generate` calls on the same model at batch 1 and 16, measured in the same run.

    python benchmarks/serve.py [--quick] [--out benchmarks/results]

Targets at 16 clients (issue 14): the server's tokens/s speed-up from 1 to 16 clients >= 0.75x the bare
batch-16 / batch-1 ratio; >= 4x the server with batching off; p99 latency <= 3x p50.

The first target compares four speeds, and on this 2-core machine any one of them moves by up to a fifth from
minute to minute. So after the sweep come rounds of the four measured back to back (the server at 1 and 16
clients, the bare loop at batch 1 and 16), each round's own ratio of ratios, and the target is judged on the
median round; the sweep's figures are in the table beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, describe_machine, fmt, machine, write_results

sys.path.insert(0, str(ROOT.parent / "src"))

PROMPT = "春眠不觉晓"  # every request the same length: the batch has no padding
MAX_TOKENS = 100
RATIO_ROUNDS = {False: 5, True: 2}  # by --quick
GPT = {"n_layer": "4", "n_head": "4", "n_embd": "128", "n_positions": "256", "block_size": "128",
       "batch_size": "8", "dtype": "fp32", "compile": "false", "warmup_steps": "1", "eval_interval": "1",
       "eval_batches": "1"}


def make_run(home: Path) -> str:
    """The quickstart's gpt shape (4 layers x 128), trained one step: its speed is what is measured."""
    from aigc.service import train

    data = "tang300" if Path("/usr/share/games/fortunes/tang300").is_file() else None  # the Debian fortunes-zh
    if data is None:
        data = str(home / "poems.txt")
        Path(data).write_text("\n%\n".join("春江花月夜，山水风云雨。" * 4 for _ in range(200)), encoding="utf-8")
    train("gpt", data, name="served-gpt", max_steps=1, sets=GPT)
    return "served-gpt"


def bare_generate(run: str, batch: int, repeats: int) -> float:
    """Tokens/s of transformers' `generate` (sampling, cache on, exactly MAX_TOKENS new tokens) in-process."""
    from aigc import service

    loaded = service.load(run)
    ids = [loaded.tokenizer.eot_id] + loaded.tokenizer.encode(PROMPT)
    prompt = torch.tensor([ids] * batch)
    with torch.no_grad():
        loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=8,
                              pad_token_id=loaded.tokenizer.eot_id)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                  max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                  pad_token_id=loaded.tokenizer.eot_id)
    return batch * MAX_TOKENS * repeats / (time.perf_counter() - t0)


def start_server(home: Path, port: int, batching: bool) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "AIGC_HOME": str(home), "AIGC_DATABASE_URL": ""}
    proc = subprocess.Popen([sys.executable, "-m", "aigc", "serve", "--port", str(port), "--rate-limit", "0",
                             "--max-queue", "512", "--batching" if batching else "--no-batching"], env=env)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


async def one_request(port: int, run: str, seed: int) -> dict:
    """One streamed completion over a plain asyncio connection: the load generator shares the two cores with the
    server it measures, so it does as little as it can (httpx's pure-Python HTTP parser took a good part of a
    core at 16 streams). It sends the request, reads bytes until the server closes, and parses only the usage
    at the end. A completion stream has no opening chunk, so the first body bytes are the first token's chunk."""
    body = json.dumps({"model": run, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "seed": seed, "temperature": 0.8,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    received, first, head = bytearray(), None, -1
    while piece := await reader.read(65536):
        received += piece
        if first is None:
            head = received.find(b"\r\n\r\n")
            if head >= 0 and len(received) > head + 4:
                first = time.perf_counter() - t0
    writer.close()
    status = received[:received.find(b"\r\n")].decode()
    if " 200 " not in status:
        raise SystemExit(f"{status}: {bytes(received[head + 4:])[:500]!r}")
    tokens = None
    for line in dechunk(bytes(received[head + 4:])).decode().splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        elif line.startswith("data: {") and '"error"' in line:
            raise SystemExit(f"error in the stream: {line}")
    if tokens is None:
        raise SystemExit("the stream ended without its usage")
    return {"latency": time.perf_counter() - t0, "ttft": first if first is not None else float("nan"),
            "tokens": tokens}


def dechunk(data: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content."""
    out, i = bytearray(), 0
    while True:
        eol = data.index(b"\r\n", i)
        size = int(data[i:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[eol + 2:eol + 2 + size]
        i = eol + 2 + size + 2


async def load(port: int, run: str, clients: int, per_client: int) -> dict:
    async def worker(c: int) -> list[dict]:
        return [await one_request(port, run, seed=1000 * c + k) for k in range(per_client)]

    t0 = time.perf_counter()
    done = await asyncio.gather(*(worker(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    rows = [r for per in done for r in per]
    latencies = sorted(r["latency"] for r in rows)
    ttfts = sorted(r["ttft"] for r in rows)
    return {"clients": clients, "requests": len(rows), "seconds": wall, "requests_per_s": len(rows) / wall,
            "tokens_per_s": sum(r["tokens"] for r in rows) / wall, "latency_p50": quantile(latencies, 0.5),
            "latency_p99": quantile(latencies, 0.99), "ttft_p50": quantile(ttfts, 0.5),
            "ttft_p99": quantile(ttfts, 0.99)}


def ratio_round(port: int, run: str, quick: bool) -> dict:
    """The four speeds the first target compares, measured back to back (a few seconds each)."""
    server_1 = asyncio.run(load(port, run, 1, 2 if quick else 8))["tokens_per_s"]
    server_16 = asyncio.run(load(port, run, 16, 1 if quick else 4))["tokens_per_s"]
    bare_1, bare_16 = bare_generate(run, 1, 2 if quick else 8), bare_generate(run, 16, 1 if quick else 4)
    return {"server_1": server_1, "server_16": server_16, "bare_1": bare_1, "bare_16": bare_16,
            "ratio": (server_16 / server_1) / (bare_16 / bare_1)}


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 \
        else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a couple of minutes)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    args = parser.parse_args()
    if not args.port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="aigc-serve-bench-"))
    os.environ["AIGC_HOME"] = str(home)
    run = make_run(home)
    result = {"benchmark": "serve", "quick": args.quick, "machine": machine(), "max_tokens": MAX_TOKENS,
              "bare_rounds": [], "rows": [], "ratio_rounds": []}

    def measure_bare() -> None:
        print("bare transformers generate at batch 1 and 16...", file=sys.stderr)
        result["bare_rounds"].append({"batch_1": bare_generate(run, 1, 2 if args.quick else 8),
                                      "batch_16": bare_generate(run, 16, 1 if args.quick else 4)})

    for batching in (True, False):
        measure_bare()  # before the server with batching and after it: the machine's speed drifts within a run
        proc = start_server(home, args.port, batching)
        try:
            asyncio.run(load(args.port, run, 1, 1))  # loads the model
            for clients in (1, 4, 16, 64):
                # several requests per client: continuous batching's steady state, not one batch's start
                per_client = 1 if args.quick and clients >= 16 else (2 if clients >= 64 else 8 if clients != 4 else 4)
                print(f"batching {'on' if batching else 'off'}, {clients} clients...", file=sys.stderr)
                row = {"batching": batching, **asyncio.run(load(args.port, run, clients, per_client))}
                result["rows"].append(row)
                print(f"  {row['tokens_per_s']:.0f} tokens/s, p50 {row['latency_p50']:.2f} s, "
                      f"p99 {row['latency_p99']:.2f} s", file=sys.stderr)
            for k in range(RATIO_ROUNDS[args.quick] if batching else 0):
                result["ratio_rounds"].append(ratio_round(args.port, run, args.quick))
                print(f"round {k + 1}: {result['ratio_rounds'][-1]['ratio']:.2f} of the bare ratio", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    rounds = result["bare_rounds"]
    bare = {key: statistics.fmean(r[key] for r in rounds) for key in ("batch_1", "batch_16")}
    result["bare_generate_tokens_per_s"] = {**bare, "ratio": bare["batch_16"] / bare["batch_1"]}
    result["targets"] = targets(result)
    write_results(args.out, "serve", result, markdown(result))
    print(markdown(result))


def targets(result: dict) -> dict:
    by = {(r["batching"], r["clients"]): r for r in result["rows"]}
    on16, on1, off16 = by[(True, 16)], by[(True, 1)], by[(False, 16)]
    speedup = on16["tokens_per_s"] / on1["tokens_per_s"]
    bare_ratio = result["bare_generate_tokens_per_s"]["ratio"]
    median_round = statistics.median(r["ratio"] for r in result["ratio_rounds"])
    return {
        "speedup_1_to_16": speedup, "bare_ratio": bare_ratio, "sweep_speedup_vs_bare_ratio": speedup / bare_ratio,
        "speedup_vs_bare_ratio": median_round, "speedup_met": median_round >= 0.75,
        "vs_batching_off": on16["tokens_per_s"] / off16["tokens_per_s"],
        "vs_batching_off_met": on16["tokens_per_s"] >= 4 * off16["tokens_per_s"],
        "p99_over_p50": on16["latency_p99"] / on16["latency_p50"],
        "p99_met": on16["latency_p99"] <= 3 * on16["latency_p50"],
        "server_1_client_vs_bare_batch_1": on1["tokens_per_s"] / result["bare_generate_tokens_per_s"]["batch_1"],
    }


def markdown(r: dict) -> str:
    t, bare, rounds = r["targets"], r["bare_generate_tokens_per_s"], r["bare_rounds"]
    lines = [
        "# Serving: `aigc serve`, streamed completions of 100 tokens, a 4 x 128 gpt", "",
        f"Machine: {describe_machine(r['machine'])}. Bare transformers `generate` in-process on the same model, "
        f"measured before the server with batching and after it (the mean of the two): "
        f"{bare['batch_1']:.0f} tokens/s at batch 1, {bare['batch_16']:.0f} at batch 16 "
        f"(ratio {bare['ratio']:.2f}x; before: {rounds[0]['batch_1']:.0f} and {rounds[0]['batch_16']:.0f}, after: "
        f"{rounds[1]['batch_1']:.0f} and {rounds[1]['batch_16']:.0f}).", "",
        "| batching | clients | requests | requests/s | tokens/s | latency p50 (s) | p99 (s) | first token p50 (s) "
        "| p99 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {'on' if row['batching'] else 'off'} | {row['clients']} | {row['requests']} | "
                     f"{fmt(row['requests_per_s'])} | {row['tokens_per_s']:.0f} | {fmt(row['latency_p50'])} | "
                     f"{fmt(row['latency_p99'])} | {fmt(row['ttft_p50'])} | {fmt(row['ttft_p99'])} |")
    lines += [
        "", "Targets at 16 clients:", "",
        f"- tokens/s speed-up from 1 to 16 clients against the bare batch-16/batch-1 ratio, the median of "
        f"{len(r['ratio_rounds'])} rounds: {t['speedup_vs_bare_ratio']:.2f} of it (target >= 0.75: "
        f"{'met' if t['speedup_met'] else 'missed'}); rounds (server 1 and 16 clients, bare batch 1 and 16, "
        f"tokens/s -> ratio of ratios): " + "; ".join(
            f"{x['server_1']:.0f}, {x['server_16']:.0f}, {x['bare_1']:.0f}, {x['bare_16']:.0f} -> {x['ratio']:.2f}"
            for x in r["ratio_rounds"]),
        f"- in the sweep above: {t['speedup_1_to_16']:.2f}x against the bare {t['bare_ratio']:.2f}x, "
        f"{t['sweep_speedup_vs_bare_ratio']:.2f} of it",
        f"- batching on vs off: {t['vs_batching_off']:.2f}x (target >= 4: "
        f"{'met' if t['vs_batching_off_met'] else 'missed'})",
        f"- p99 / p50 latency {t['p99_over_p50']:.2f} (target <= 3: {'met' if t['p99_met'] else 'missed'})",
        f"- the server at 1 client makes {t['server_1_client_vs_bare_batch_1']:.2f}x the bare batch-1 tokens/s",
        ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
