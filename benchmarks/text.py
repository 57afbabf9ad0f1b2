"""Text benchmark: ngram, rnn (gru, lstm) and gpt on fortunes and tang300 under the same training
budget, with nanoGPT's CPU recipe and plain transformers training as references measured in the
same run.

    python benchmarks/text.py                   # 3 min per model, both corpora (about 35 minutes)
    python benchmarks/text.py --quick           # 20 s per model: a few minutes
    python benchmarks/text.py --long            # also gpt and lstm for 30 min on fortunes
    python benchmarks/text.py --generation-only # section 5 alone: gpt and lstm 1 min each (about 4 minutes)

Writes benchmarks/results/text.json and text.md. Runs live in a private AIGC home (default
benchmarks/.work), away from a user's own runs.

1. The machine: matmul throughput (GFLOP/s) in fp32 and bf16, measured first; MFU below is
   against the peak of the dtype the run trained in.
2. Every model trains through `aigc train` with its defaults (rnn: cell gru or lstm) for the same
   training-time budget; the n-gram fits in closed form (its fit time is reported). Validation bits
   per character on the run's held-out split, training tokens/s, MFU = model FLOPs per token x
   tokens/s / peak, with FLOPs per token = 6 x (parameters used in matrix products) + 6 x n_layer x
   block_size x n_embd for gpt's attention (Kaplan et al. 2020; PaLM's appendix B), and two samples.
3. `nanogpt-recipe`: nanoGPT's published CPU recipe (4 layers x 128, 4 heads, context 64, batch 12,
   lr 1e-3, 100 warm-up steps, dropout 0, 2000 iterations, no torch.compile) in our loop, at the same
   time budget. gpt with its defaults compiles (compile=auto; the compiling counts in its budget).
4. Plain transformers: GPT2LMHeadModel of our gpt's size and dropout, as transformers makes it
   (its default attention kernel), trained by a bare PyTorch loop (AdamW, bf16 autocast where our
   run used it, the same batch and context) for 30 s: our gpt's tokens/s over its tokens/s, both
   measured here. Target: 1.3x. (Our gpt differs by the attention kernel it picks on a CPU, see
   aigc/models/gpt.py, and by torch.compile where compile=auto compiles it.)
5. Generation: tokens/s of the gpt and rnn-lstm runs at batch 1 and 16, through `aigc generate`
   and through transformers' `generate` with and without the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, machine, matmul_peak, write_results

CORPORA = ("fortunes", "tang300")
NANOGPT_RECIPE = {"n_layer": "4", "n_head": "4", "n_embd": "128", "n_positions": "64", "block_size": "64",
                  "batch_size": "12", "lr": "1e-3", "warmup_steps": "100", "min_lr_ratio": "0.1",
                  "embd_pdrop": "0.0", "attn_pdrop": "0.0", "resid_pdrop": "0.0", "eval_interval": "250",
                  "compile": "false"}  # the recipe runs nanoGPT with --compile=False
MODELS = {  # row name -> (family, --set values)
    "ngram": ("ngram", {}),
    "rnn-gru": ("rnn", {"cell": "gru"}),
    "rnn-lstm": ("rnn", {"cell": "lstm"}),
    "gpt": ("gpt", {}),
    "nanogpt-recipe": ("gpt", NANOGPT_RECIPE),
}
NGRAM_ANCHOR = 2.28  # interpolated KN 7-gram on fortunes, bits per character (performance-anchors.md)


def flops_per_token(model, family: str, block_size: int) -> float:
    """6 x parameters in matrix products (+ gpt's attention): embeddings read by lookup do not count,
    gpt's token embedding does (it is also the output layer)."""
    lookup = 0
    if family == "gpt":
        lookup = model.transformer.wpe.weight.numel()
    elif family == "rnn":
        lookup = model.wte.weight.numel()
    n = sum(p.numel() for p in model.parameters()) - lookup
    attention = 6 * model.config.n_layer * block_size * model.config.n_embd if family == "gpt" else 0
    return 6.0 * n + attention


def plain_transformers_tokens_per_s(model_config, batch: int, block: int, bf16: bool, seconds: float) -> float:
    """GPT2LMHeadModel of the same size and dropout, as transformers makes it (its default attention
    kernel, sdpa), trained by a bare loop on random tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**{k: v for k, v in model_config.to_dict().items() if not k.startswith("_")})
    model = GPT2LMHeadModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, model_config.vocab_size, (batch, block + 1))
    steps, t0, start = 0, None, time.perf_counter()
    while True:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x[:, :-1], labels=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if steps == 3:
            t0 = time.perf_counter()  # the first steps allocate: not timed
        if t0 is not None and time.perf_counter() - t0 > seconds or time.perf_counter() - start > 4 * seconds:
            break
    return (steps - 3) * batch * block / (time.perf_counter() - t0)


def generation_speed(loaded, new_tokens: int, batches: tuple[int, ...] = (1, 16)) -> list[dict]:
    """Sampling tokens/s of a run at each batch size: `aigc generate`'s path (sample.generate, which
    stops a row at the end-of-text token and counts the tokens before it), and transformers'
    `generate` at a fixed length with the cache (what that path uses: gpt's key/value cache, the
    rnn's recurrent state) and without it."""
    from aigc.sample import GenerateSettings, generate

    model = loaded.model.eval()
    new_tokens = min(new_tokens, (loaded.max_context or 10**6) - 2)
    prompt = torch.tensor([[loaded.tokenizer.eot_id]])
    rows = []
    for batch in batches:
        _, stats = generate(loaded, GenerateSettings(n=batch, seed=0, max_new_tokens=new_tokens, temperature=0.8))
        entry = {"batch": batch, "new_tokens": new_tokens, "aigc_generate_tokens_per_s": stats["tokens_per_s"]}
        for cache in (True, False):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(prompt.repeat(batch, 1), attention_mask=torch.ones(batch, 1, dtype=torch.long),
                                     do_sample=True, temperature=0.8, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, use_cache=cache,
                                     pad_token_id=loaded.tokenizer.eot_id)
            seconds = time.perf_counter() - t0
            entry["kv_cache" if cache else "no_cache"] = (out.shape[1] - 1) * batch / seconds
        entry["cache_speedup"] = entry["kv_cache"] / entry["no_cache"]
        rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s per model")
    parser.add_argument("--minutes", type=float, default=None, help="training budget per model (default 3)")
    parser.add_argument("--corpora", default=",".join(CORPORA))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--long", action="store_true", help="also 30 min on fortunes for the --long-models")
    parser.add_argument("--long-models", default="gpt,rnn-lstm", help="the models --long trains (default gpt,rnn-lstm)")
    parser.add_argument("--home", default=str(ROOT / ".work"), help="private AIGC home for the runs")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--generation-only", action="store_true",
                        help="only section 5: gpt and rnn-lstm on fortunes for --minutes (default 1; generation speed "
                             "depends on the model's shape, not on how long it trained), written as generation.json/md")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an earlier text.json (same machine) and replace the ones run now")
    args = parser.parse_args()
    stem = "text"
    if args.generation_only:
        args.corpora, args.models, args.minutes, stem = "fortunes", "gpt,rnn-lstm", args.minutes or 1.0, "generation"
    minutes = args.minutes or (1 / 3 if args.quick else 3.0)
    corpora = [c for c in args.corpora.split(",") if c]
    models = [m for m in args.models.split(",") if m]
    unknown = sorted((set(models) | set(args.long_models.split(","))) - set(MODELS) - {""})
    if unknown:
        raise SystemExit(f"unknown models {unknown}: use {', '.join(MODELS)}")
    os.environ["AIGC_HOME"] = str(Path(args.home).resolve())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from aigc.sample import GenerateSettings, generate, load_run
    from aigc.service import train as run_train
    from aigc.store import read_run

    started = time.time()
    print("measuring matmul throughput...", file=sys.stderr)
    probes = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    peak = {name: best for name, (best, _) in probes.items()}
    result = {"benchmark": stem, "minutes_per_model": minutes, "quick": args.quick,
              "machine": {**machine(), "matmul_gflops": peak,
                          "matmul_gflops_by_size": {name: sizes for name, (_, sizes) in probes.items()}},
              "rows": [], "plain_transformers": None, "generation": {}}
    if args.append and (out_dir / f"{stem}.json").is_file():
        earlier = json.loads((out_dir / f"{stem}.json").read_text(encoding="utf-8"))
        result["rows"] = earlier["rows"]
        result["plain_transformers"] = earlier.get("plain_transformers")
        result["generation"] = earlier.get("generation")

    def save() -> None:
        result["wall_s"] = time.time() - started
        write_results(out_dir, stem, result, markdown(result))

    plan = [(c, m, minutes) for c in corpora for m in models]
    if args.long:
        plan += [("fortunes", m, 30.0) for m in args.long_models.split(",") if m]
    for corpus, row, budget in plan:
        family, sets = MODELS[row]
        name = f"bench-{row}-{corpus}-{budget:g}min"
        print(f"\n== {row} on {corpus}: {budget:g} min", file=sys.stderr)
        t0 = time.perf_counter()
        max_steps = 2000 if row == "nanogpt-recipe" else None  # the recipe's 2000 iterations, or the budget
        closed_form = family == "ngram"  # fitted in closed form: no budget
        run_dir, metrics = run_train(family, corpus, name=name, overwrite=True,
                                     max_minutes=None if closed_form else budget, max_steps=max_steps,
                                     sets=dict(sets))
        wall = time.perf_counter() - t0
        loaded = load_run(str(run_dir))
        length = min(100, (loaded.max_context or 10**6) - 2)  # nanoGPT's recipe has a context of 64
        samples = [generate(loaded, GenerateSettings(seed=s, max_new_tokens=length, temperature=0.8))[0][0].strip()
                   for s in (0, 1)]
        entry = {"corpus": corpus, "model": row, "family": family, "minutes": budget,
                 "val_bpc": metrics["val_bpc"], "steps": metrics.get("steps"),
                 "train_time_s": metrics.get("train_time_s", wall), "tokens_per_s": metrics.get("tokens_per_s"),
                 "dtype": read_run(run_dir).get("dtype"), "samples": samples, "run": str(run_dir)}
        if family != "ngram":
            fpt = flops_per_token(loaded.model, family, _block_of(run_dir))
            entry["flops_per_token"] = fpt
            entry["mfu"] = fpt * entry["tokens_per_s"] / (peak[entry["dtype"] or "fp32"] * 1e9)
        else:
            entry["order"] = metrics.get("order")
        result["rows"] = [r for r in result["rows"] if (r["corpus"], r["model"], r["minutes"]) != (
            corpus, row, budget)] + [entry]
        save()

    gpt_rows = [r for r in result["rows"] if r["model"] == "gpt" and r["minutes"] == minutes]
    if gpt_rows and not args.generation_only and (result["plain_transformers"] is None or "gpt" in models):
        row = gpt_rows[0]
        loaded = load_run(row["run"])
        block = _block_of(Path(row["run"]))
        batch = _batch_of(Path(row["run"]))
        bf16 = row["dtype"] == "bf16"
        print(f"\n== plain transformers GPT-2 training loop, {'bf16' if bf16 else 'fp32'}, 30 s", file=sys.stderr)
        theirs = plain_transformers_tokens_per_s(loaded.model.config, batch, block, bf16, 10 if args.quick else 30)
        result["plain_transformers"] = {"tokens_per_s": theirs, "ours_tokens_per_s": row["tokens_per_s"],
                                        "ratio": row["tokens_per_s"] / theirs, "dtype": row["dtype"],
                                        "batch_size": batch, "block_size": block, "target": 1.3}
    result["generation"] = result.get("generation") or {}
    for row in [r for r in result["rows"] if r["model"] in ("gpt", "rnn-lstm") and r["minutes"] == minutes
                and r["corpus"] == corpora[0] and r["model"] in models]:
        print(f"\n== generation speed of {row['model']}: cache on and off, batch 1 and 16", file=sys.stderr)
        result["generation"][row["model"]] = generation_speed(load_run(row["run"]), 100 if args.quick else 200)
    save()
    print((out_dir / f"{stem}.md").read_text(encoding="utf-8"))


def _train_config(run_dir: Path) -> dict:
    from aigc.config import read_toml

    return read_toml(run_dir / "config.toml")


def _block_of(run_dir: Path) -> int:
    return int(_train_config(run_dir)["block_size"])


def _batch_of(run_dir: Path) -> int:
    return int(_train_config(run_dir)["batch_size"])


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def markdown(r: dict) -> str:
    m = r["machine"]
    title = "Generation benchmark" if r["benchmark"] == "generation" else "Text benchmark"
    lines = [f"# {title}: {r['minutes_per_model']:g} min per model", "",
             f"Machine: {m['cpus']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}; matmul "
             f"{m['matmul_gflops']['fp32']:.0f} GFLOP/s fp32, {m['matmul_gflops']['bf16']:.0f} GFLOP/s bf16 "
             "(measured in this run; MFU is against the peak of the run's dtype).", "",
             "| corpus | model | minutes | val bpc | steps | tokens/s | MFU | dtype |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        model = row["model"] + (f" (order {row['order']})" if row.get("order") else "")
        lines.append(f"| {row['corpus']} | {model} | {row['minutes']:g} | {_f(row['val_bpc'])} | {row['steps']} | "
                     f"{_f(row['tokens_per_s'], 0)} | {_f(row.get('mfu'), 3)} | {row['dtype'] or '-'} |")
    p = r.get("plain_transformers")
    if p:
        lines += ["", f"Our gpt trains at {_f(p['ours_tokens_per_s'], 0)} tokens/s; a bare PyTorch loop over "
                  f"transformers' GPT2LMHeadModel of the same size (batch {p['batch_size']}, context "
                  f"{p['block_size']}, {p['dtype']}) at {_f(p['tokens_per_s'], 0)}: **{p['ratio']:.2f}x** "
                  f"(target {p['target']}x)."]
    for model, g in (r.get("generation") or {}).items():
        lines += ["", f"## Generation speed ({model}, {g[0]['new_tokens']} new tokens, sampling at temperature 0.8)",
                  "", "| batch | aigc generate tok/s | transformers generate, cache | without the cache | "
                  "cache speed-up |", "|---|---|---|---|---|"]
        lines += [f"| {e['batch']} | {_f(e['aigc_generate_tokens_per_s'], 0)} | {_f(e['kv_cache'], 0)} | "
                  f"{_f(e['no_cache'], 0)} | {e['cache_speedup']:.2f}x |" for e in g]
    if r.get("generation"):
        lines += ["", "`aigc generate` counts the tokens before each row's end-of-text token, over the time of the "
                  "whole batch; the transformers columns generate a fixed length. The cache is gpt's key/value "
                  "cache and the rnn's recurrent state."]
    fortunes = {row["model"]: row["val_bpc"] for row in r["rows"] if row["corpus"] == "fortunes"
                and row["minutes"] == r["minutes_per_model"]}
    if fortunes:
        neural = {k: v for k, v in fortunes.items() if k != "ngram"}
        best = min(neural, key=neural.get) if neural else None
        lines += ["", f"On fortunes the n-gram reaches {_f(fortunes.get('ngram'))} bits/char (anchor "
                  f"{NGRAM_ANCHOR}); the best neural model at {r['minutes_per_model']:g} min is "
                  f"{best} at {_f(neural.get(best))}; nanoGPT's recipe {_f(fortunes.get('nanogpt-recipe'))}."]
        ngram = fortunes.get("ngram")
        long_rows = [row for row in r["rows"] if row["corpus"] == "fortunes" and row["minutes"] >= 30]
        if ngram is not None and long_rows:
            lines += ["", "At 30 minutes (goal: a neural model below the n-gram's "
                      f"{_f(ngram)} bits/char): " + "; ".join(
                          f"{row['model']} {_f(row['val_bpc'])} (**{'beats' if row['val_bpc'] < ngram else 'misses'}**)"
                          for row in long_rows) + "."]
    lines += ["", "## Samples (seed 0 and 1, temperature 0.8)", ""]
    for row in r["rows"]:
        lines.append(f"**{row['model']} on {row['corpus']} ({row['minutes']:g} min)**")
        lines += [f"> {s[:160].replace(chr(10), ' / ')}" for s in row["samples"]]
        lines.append("")
    lines.append(f"Wall time {r.get('wall_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
