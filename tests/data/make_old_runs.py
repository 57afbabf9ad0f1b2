"""Make tests/data/old_runs/: tiny run directories of every modality written by the code BEFORE the service layer
(commit e0ee6bc, issue 12), and the outputs that code generated from them (expected.json), so that
tests/test_old_runs.py can check that runs made before a change load and generate the same outputs after it.

Run with the OLD package on the path, from the repository root:
    git worktree add /tmp/oldcode e0ee6bc
    PYTHONPATH=/tmp/oldcode/src .venv/bin/python tests/data/make_old_runs.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "old_runs"


def main() -> None:
    home = Path("/tmp/aigc-old-runs-home")
    shutil.rmtree(home, ignore_errors=True)
    os.environ["AIGC_HOME"] = str(home)
    import numpy as np
    from aigc.image_runs import generate_images
    from aigc.runs import train
    from aigc.series_runs import generate_series

    import aigc
    from aigc.sample import GenerateSettings, generate, load_run

    print(f"aigc from {aigc.__file__}", file=sys.stderr)
    data = home / "data"
    data.mkdir(parents=True)
    poems = data / "poems.txt"
    poems.write_text("\n%\n".join(f"《诗{i}》\n" + "\n".join("春江花月夜山水风云雨"[(i + j) % 10:] [:5] + "，。"[j % 2]
                                                             for j in range(4)) for i in range(30)) + "\n",
                     encoding="utf-8")
    rng = np.random.default_rng(0)
    images = data / "shapes.npz"
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(images, x=x, y=np.arange(40) % 2)
    series = data / "walk.csv"
    series.write_text("t,v\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(np.cumsum(rng.normal(size=120)))),
                      encoding="utf-8")
    tiny_text = {"block_size": "16", "batch_size": "4", "warmup_steps": "2", "eval_interval": "2", "dtype": "fp32",
                 "compile": "false"}
    runs = {
        "ngram": ("ngram", poems, {"max_order": "3"}, None),
        "rnn": ("rnn", poems, {**tiny_text, "cell": "gru", "n_layer": "1", "n_hidden": "16", "n_embd": "8"}, 2),
        "gpt": ("gpt", poems, {**tiny_text, "n_layer": "1", "n_head": "2", "n_embd": "16", "n_positions": "64"}, 2),
        "vae": ("vae", images, {"z_dim": "2", "base_channels": "4", "batch_size": "8", "eval_interval": "2",
                                "warmup_steps": "1", "dtype": "fp32", "conditional": "true"}, 2),
        "dcgan": ("dcgan", images, {"z_dim": "4", "base_channels": "4", "batch_size": "8", "eval_interval": "2",
                                    "warmup_steps": "1", "dtype": "fp32"}, 2),
        "diffusion": ("diffusion", images, {"base_channels": "8", "depth": "1", "res_blocks": "1",
                                            "attention": "false", "batch_size": "8", "eval_interval": "2",
                                            "warmup_steps": "1", "dtype": "fp32"}, 2),
        "ar": ("ar", series, {"column": "v", "order": "2"}, None),
        "rnn-series": ("rnn", series, {"column": "v", "block_size": "8", "batch_size": "4",
                                       "n_hidden": "8", "eval_interval": "2", "warmup_steps": "1"}, 2),
    }
    expected = {}
    for name, (family, path, sets, steps) in runs.items():
        run_dir, _ = train(family, str(path), name=name, max_steps=steps, sets=sets)
        if family in ("ngram", "rnn", "gpt") and name != "rnn-series":
            loaded = load_run(str(run_dir))
            settings = GenerateSettings(prompt="春", n=2, seed=7, max_new_tokens=12, temperature=1.0, top_k=5)
            expected[name] = {"samples": generate(loaded, settings)[0],
                              "greedy": generate(loaded, GenerateSettings(temperature=0, max_new_tokens=12))[0]}
        elif family in ("vae", "dcgan", "diffusion"):
            options = {"sampler": "ddim", "steps": 3} if family == "diffusion" else {}
            result = generate_images(str(run_dir), n=2, seed=3, class_="1" if family == "vae" else None,
                                     out=str(home / "out" / name), options=options)
            from PIL import Image

            expected[name] = {"pixels_sha256": [hashlib.sha256(np.asarray(Image.open(f)).tobytes()).hexdigest()
                                                for f in result["files"]],
                              "options": options, "class": "1" if family == "vae" else None}
        else:
            result = generate_series(str(run_dir), horizon=5, paths=2, seed=4, out=str(home / "out" / name))
            expected[name] = {k: result[k] for k in ("forecast", "lower", "upper", "paths")}
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for name in runs:
        shutil.copytree(home / "runs" / name, OUT / name,
                        ignore=shutil.ignore_patterns("checkpoints", "samples", "pictures", "generated",
                                                      "metrics.jsonl"))
    (OUT / "expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
