"""What a gpt training step costs on this machine, one change at a time.

    python benchmarks/gpt_step.py               # about 3 minutes
    python benchmarks/gpt_step.py --seconds 5 --compile

A bare PyTorch loop (AdamW, next-token cross-entropy) over transformers' GPT2LMHeadModel of the
gpt family's default size (4 layers x 128, 4 heads, 100 characters) at batch 32 x 128, random tokens.
The reference row is GPT-2 as transformers makes it with dropout 0.1 (its default attention kernel,
sdpa); every other row changes one or two things: the attention kernel (eager: matmul, softmax,
matmul), dropout, the dtype, a fused AdamW, one thread instead of all, torch.compile (`--compile`:
its compile time shows in the warm-up column). Tokens/s are timed after warm-up steps; the ratio
is against the reference in the same run. These are the measurements behind gpt's defaults
(docs/speed.md).

Writes benchmarks/results/gpt_step.json and gpt_step.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import RESULTS, machine, write_results
from transformers import GPT2Config, GPT2LMHeadModel

VARIANTS = [  # name, attention kernel, dropout, dtype, fused AdamW, compile, threads (0: torch's default)
    ("reference: sdpa, dropout 0.1, bf16", "sdpa", 0.1, "bf16", False, False, 0),
    ("sdpa, dropout 0", "sdpa", 0.0, "bf16", False, False, 0),
    ("eager, dropout 0.1", "eager", 0.1, "bf16", False, False, 0),
    ("eager, dropout 0 (gpt's defaults on a CPU)", "eager", 0.0, "bf16", False, False, 0),
    ("eager, dropout 0, fused AdamW", "eager", 0.0, "bf16", True, False, 0),
    ("eager, dropout 0, one thread", "eager", 0.0, "bf16", False, False, 1),
    ("sdpa, dropout 0, fp32", "sdpa", 0.0, "fp32", False, False, 0),
    ("eager, dropout 0, fp32", "eager", 0.0, "fp32", False, False, 0),
]
COMPILED = ("eager, dropout 0, torch.compile", "eager", 0.0, "bf16", False, True, 0)


def tokens_per_s(attention: str, dropout: float, dtype: str, fused: bool, compile_: bool, threads: int, batch: int,
                 block: int, seconds: float) -> tuple[float, float]:
    """(tokens/s after 3 warm-up steps, seconds the warm-up took), with `threads` torch threads (0: as is)."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        return _timed(attention, dropout, dtype, fused, compile_, batch, block, seconds)
    finally:
        torch.set_num_threads(default_threads)


def _timed(attention: str, dropout: float, dtype: str, fused: bool, compile_: bool, batch: int, block: int,
           seconds: float) -> tuple[float, float]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=100, n_positions=256, bos_token_id=0,
                        eos_token_id=0, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    model = GPT2LMHeadModel(config).train()
    model.set_attn_implementation(attention)
    forward = torch.compile(model) if compile_ else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    x = torch.randint(0, 100, (batch, block + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = forward(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warm = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return steps * batch * block / (time.perf_counter() - t0), warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per row (default 20)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (needs a C++ compiler)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    variants = VARIANTS + ([COMPILED] if args.compile else [])
    rows = []
    for name, attention, dropout, dtype, fused, compile_, threads in variants:
        rate, warm = tokens_per_s(attention, dropout, dtype, fused, compile_, threads, args.batch, args.block,
                                  args.seconds)
        rows.append({"variant": name, "attention": attention, "dropout": dropout, "dtype": dtype, "fused_adamw": fused,
                     "compile": compile_, "threads": threads or torch.get_num_threads(), "tokens_per_s": rate,
                     "warmup_s": warm})
        print(f"{name}: {rate:,.0f} tokens/s", flush=True)
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    result = {"benchmark": "gpt_step", "batch": args.batch, "block": args.block, "seconds": args.seconds,
              "machine": machine(), "rows": rows}
    text = markdown(result)
    write_results(args.out, "gpt_step", result, text)
    print(text, end="")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# gpt training step, batch {result['batch']} x {result['block']}, one change at a time", "",
             f"Machine: {m['cpus']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}. "
             "GPT2LMHeadModel 4 x 128, 100 tokens; ratio against the first row, measured in the same run.", "",
             "| variant | tokens/s | ratio | first 3 steps (s) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['ratio']:.2f}x | {r['warmup_s']:.1f} |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
