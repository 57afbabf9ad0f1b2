"""What every benchmark script shares: the machine it ran on and how results are written.

Each script writes `results/NAME.json` (machine-readable, replaced atomically, after every row so
that an interrupted run keeps what it measured) and `results/NAME.md` (the table people read).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RATE_KEYS = ("tokens_per_s", "images_per_s", "values_per_s")  # what train_loop reports, per modality


def machine() -> dict:
    """The machine as a result records it: timings are only compared within one of these."""
    from aigc.train import bf16_available

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "bf16_hardware": bf16_available(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.0
                ) -> tuple[float, dict[int, float]]:
    """GFLOP/s of square matrix products: the best over `sizes` (each the best of repeated timings
    for `seconds`), and the best per size. One size alone underestimates the peak: which size runs
    fastest depends on the cache sizes and the kernel library."""
    per_size = {}
    for size in sizes:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
        per_size[size] = best
    return max(per_size.values()), per_size


def describe_machine(m: dict) -> str:
    """One sentence for a table's header."""
    return (f"{m['cpus']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, "
            + (m.get("cuda") or "no GPU") + f"; bf16 in hardware: {'yes' if m.get('bf16_hardware') else 'no'}")


def write_results(out_dir: Path | str, name: str, result: dict, markdown: str) -> None:
    """results/NAME.json (atomically: a reader never sees half a file; strict JSON with null for NaN,
    non-ASCII text kept readable, anything else written as its str) and results/NAME.md."""
    from aigc.fsutil import atomic_write_text, json_safe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(result), indent=2, ensure_ascii=False, allow_nan=False, default=str)
    atomic_write_text(out_dir / f"{name}.json", text + "\n")
    (out_dir / f"{name}.md").write_text(markdown, encoding="utf-8")


def steady_rate(run_dir: Path) -> float | None:
    """The median training rate logged in the second half of a run: without the warm-up (and the
    compiling of torch.compile), which the run's mean rate includes."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [next(r[k] for k in RATE_KEYS if k in r) for r in records if any(k in r for k in RATE_KEYS)]
    return statistics.median(rates[len(rates) // 2:]) if rates else None


def fmt(value, digits: int = 3) -> str:
    """A table cell: '-' for a missing or non-finite number."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"
