"""Image benchmark: dcgan, vae and diffusion under the same wall-clock budget, a diffusion sampler
table, and the diffusion family's denoiser (diffusers' UNet2DModel) against a hand-written UNet of the
same size.

    python benchmarks/images.py                 # fashion-mnist, 15 min per model (about 2 hours on 2 CPU cores)
    python benchmarks/images.py --quick         # digits (8x8), 1 min per model: a few minutes
    python benchmarks/images.py --minutes 5 --sampler-n 500

Writes benchmarks/results/images.json (everything measured), images.md (the tables) and
images-<family>.png (a sample grid per family). Runs and the feature-net cache live in a private
AIGC home (default benchmarks/.work, not in git), so a user's own runs are untouched.

1. Families. Each family trains through the product path (`aigc train`, its default settings,
   unconditional) for the same training-time budget, then `aigc eval` scores it: FID, KID,
   precision, recall, classifier score against N held-out images, with every metric's floor
   (real training images vs held-out ones at the same N), training and sampling images/s, and the
   model FLOP utilisation of training: matmul and convolution FLOPs of a training step per image
   (forward and backward, every phase of a GAN; torch's FlopCounterMode) x training images/s over
   the matmul peak measured in this run in the run's dtype.
2. Samplers. The diffusion run samples with DDPM 1000, DDIM 10/20/50 (eta 0) and DPM-Solver++
   10/20; FID (and its floor) at `--sampler-n` images, seconds per image. Target: a 20-step
   sampler within 10% of the 1000-step DDPM FID.
3. Denoiser. The same DDPM with the hand-written UNet of benchmarks/compact_unet.py (the same
   blocks and parameter count as the family's UNet2DModel, asserted) trained for the same budget in
   the same loop: training images/s (the ratio hand-written / UNet2DModel, both measured in this
   run) and FID at equal time. The issue asked for the better of the two; this table is the
   evidence, re-measurable with `--families diffusion --skip-samplers [--seed S]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, machine, matmul_peak, write_results

FAMILIES = ("dcgan", "vae", "diffusion")
SAMPLERS = (("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpm-solver", 10), ("dpm-solver", 20))
SAMPLE_BATCH = 250


def compact_twin(model):
    """A fresh Diffusion model like `model` whose denoiser is the hand-written UNet of compact_unet.py,
    and both parameter counts (they must match)."""
    from compact_unet import UNet

    from aigc.models.diffusion import Diffusion
    from aigc.models.ema import EMA

    cfg = model.config
    twin = Diffusion(cfg, model.image_shape, model.num_classes)
    twin.unet = UNet(cfg, model.image_shape[0], model.num_classes)
    twin.ema = EMA(twin.unet, cfg.ema_decay) if cfg.ema_decay > 0 else None
    kept = sum(p.numel() for p in model.unet.parameters())
    compact = sum(p.numel() for p in twin.unet.parameters())
    return twin, kept, compact


def sample_all(model, n: int, seed: int = 0, **options) -> tuple[torch.Tensor, float]:
    """n images in batches, and the seconds it took."""
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, SAMPLE_BATCH):
            g = torch.Generator().manual_seed(seed + i)
            out.append(model.sample(min(SAMPLE_BATCH, n - i), generator=g, **options))
    return torch.cat(out), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, 1 minute per model, smaller samples")
    parser.add_argument("--data", default=None, help="fashion-mnist (default) or digits (--quick)")
    parser.add_argument("--minutes", type=float, default=None, help="training budget per model (default 15; quick 1)")
    parser.add_argument("--n", type=int, default=None, help="images scored per family (default 2000; quick 297)")
    parser.add_argument("--sampler-n", type=int, default=None, help="images per sampler (default 500; quick 100)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=None, help="training seed of every model (default: the "
                        "families' own, 1337); repeat the benchmark with several to see the spread")
    parser.add_argument("--skip-samplers", action="store_true")
    parser.add_argument("--skip-denoiser", action="store_true")
    parser.add_argument("--home", default=str(ROOT / ".work"), help="private AIGC home for the runs and caches")
    parser.add_argument("--out", default=str(RESULTS), help="folder for images.json, images.md and the grids")
    args = parser.parse_args()
    data = args.data or ("digits" if args.quick else "fashion-mnist")
    minutes = args.minutes or (1.0 if args.quick else 15.0)
    n_eval = args.n or (297 if args.quick else 2000)
    sampler_n = args.sampler_n or (100 if args.quick else 500)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}: use {', '.join(FAMILIES)}")
    os.environ["AIGC_HOME"] = str(Path(args.home).resolve())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from aigc.config import build, read_toml
    from aigc.data.images import to_tensor
    from aigc.evaluate.images import feature_net, floors, image_metrics
    from aigc.modalities.image import load_image_split
    from aigc.models import FAMILIES as REGISTRY
    from aigc.service import evaluate, sections_for
    from aigc.service import train as run_train
    from aigc.store import read_run
    from aigc.train import Budget, ImageBatches, resolve_dtype, train_loop

    started = time.time()
    result = {
        "benchmark": "images", "data": data, "minutes_per_model": minutes, "n_eval": n_eval,
        "sampler_n": sampler_n, "quick": args.quick, "seed": args.seed,
        "machine": machine(),
        "families": {}, "samplers": [], "denoiser": None,
    }
    peak = {"fp32": matmul_peak(torch.float32)[0], "bf16": matmul_peak(torch.bfloat16)[0]}  # GFLOP/s
    result["machine"]["matmul_gflops"] = peak

    def save() -> None:
        result["wall_s"] = time.time() - started
        write_results(out_dir, "images", result, markdown(result))

    # 1. every family, same budget, through the product path
    runs = {}
    for family in families:
        print(f"\n== {family}: training {minutes:g} min on {data}", file=sys.stderr)
        sets = {} if args.seed is None else {"seed": str(args.seed)}
        run_dir, fit = run_train(family, data, name=f"bench-{family}-{data}", overwrite=True, max_minutes=minutes,
                                 sets=sets)
        runs[family] = run_dir
        print(f"== {family}: scoring {n_eval} images", file=sys.stderr)
        scored = evaluate(str(run_dir), {"n": n_eval})["metrics"]
        grid = sorted((run_dir / "samples").glob("step-*.png"))[-1]
        shutil.copyfile(grid, out_dir / f"images-{family}.png")
        result["families"][family] = {
            **{k: scored.get(k) for k in ("fid", "fid_floor", "kid", "kid_floor", "precision", "recall",
                                          "classifier_score", "classifier_score_floor", "images_per_s")},
            "sample_images_per_s": scored.get("images_per_s"), "train_images_per_s": fit["images_per_s"],
            "steps": fit["steps"], "train_time_s": fit["train_time_s"], "dtype": read_run(run_dir).get("dtype"),
            "grid": f"images-{family}.png", "run": str(run_dir),
        }
        result["families"][family].pop("images_per_s")
        flops = train_flops_per_image(REGISTRY[family], REGISTRY[family].load(run_dir), batch=8)
        dtype = result["families"][family]["dtype"] or "fp32"
        result["families"][family].update(train_flops_per_image=flops,
                                          train_mfu=flops * fit["images_per_s"] / (peak[dtype] * 1e9))
        save()

    if "diffusion" not in runs:
        print(json.dumps(result["families"], indent=2))
        return
    fam = REGISTRY["diffusion"]
    diffusion = fam.load(runs["diffusion"]).eval()
    record = read_run(runs["diffusion"])
    configs = build(sections_for("diffusion"), read_toml(runs["diffusion"] / "config.toml"), family="diffusion")
    train_set, val_set = load_image_split(data, None, configs["data"])
    x_train, x_val = to_tensor(train_set.images), to_tensor(val_set.images)
    net, _ = feature_net(train_set, test=val_set)

    # 2. samplers on the diffusion run
    if not args.skip_samplers:
        n = min(sampler_n, len(x_val))
        floor = floors(x_train, x_val, net, n)["fid"]
        for sampler, steps in SAMPLERS:
            print(f"== sampler {sampler} {steps} steps: {n} images", file=sys.stderr)
            fakes, seconds = sample_all(diffusion, n, sampler=sampler, steps=steps)
            fid = image_metrics(x_val[:n], fakes, net)["fid"]
            result["samplers"].append({"sampler": sampler, "steps": steps, "n": n, "fid": fid, "fid_floor": floor,
                                       "s_per_image": seconds / n})
            save()
        ddpm = result["samplers"][0]["fid"]
        best20 = min(r["fid"] for r in result["samplers"] if r["steps"] == 20)
        result["targets_samplers"] = {"ddpm_1000_fid": ddpm, "best_20_step_fid": best20,
                                      "within_10_percent": best20 <= 1.1 * ddpm}
        save()

    # 3. the family's UNet2DModel against the hand-written UNet: same DDPM, same loop, same budget
    if not args.skip_denoiser:
        torch.manual_seed(configs["train"].seed)
        twin, kept, compact = compact_twin(fam.build(configs["model"], tuple(record["image_shape"]), 0))
        print(f"\n== hand-written UNet ({compact:,} parameters; UNet2DModel {kept:,}): training {minutes:g} min",
              file=sys.stderr)
        if kept != compact:
            raise SystemExit(f"the hand-written UNet has {compact:,} parameters, UNet2DModel {kept:,}: "
                             "the layouts differ")
        work = Path(os.environ["AIGC_HOME"]) / "compact-unet"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        batches = ImageBatches(x_train, None, x_val, None)
        fit = train_loop(twin, batches, configs["train"], work, Budget(None, minutes), after_step=True)
        twin.eval()
        n = min(n_eval, len(x_val))
        fakes, seconds = sample_all(twin, n)
        compact_fid = image_metrics(x_val[:n], fakes, net)["fid"]
        unet2d = result["families"]["diffusion"]
        ratio = fit["images_per_s"] / unet2d["train_images_per_s"]
        result["denoiser"] = {
            "parameters": kept, "dtype": resolve_dtype(configs["train"].dtype, fam.cpu_bf16),
            "unet2d": {"train_images_per_s": unet2d["train_images_per_s"], "fid": unet2d["fid"],
                       "steps": unet2d["steps"], "sample_images_per_s": unet2d["sample_images_per_s"]},
            "compact": {"train_images_per_s": fit["images_per_s"], "fid": compact_fid, "steps": fit["steps"],
                        "sample_images_per_s": n / seconds},
            "compact_speed_ratio": ratio,
            "kept_is_better": unet2d["fid"] <= compact_fid,
        }
        save()
    save()
    print((out_dir / "images.md").read_text(encoding="utf-8"))


def train_flops_per_image(fam, model, batch: int) -> float:
    """Matmul and convolution FLOPs of one training step per image: the loss's forward and backward
    passes, of every phase for a GAN, as torch's FlopCounterMode counts them (MFU's numerator)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    x = torch.zeros(batch, *model.image_shape)
    counter = FlopCounterMode(display=False)
    with counter:
        for phase in fam.phases or (None,):
            kwargs = {} if phase is None else {"phase": phase}
            model(x, noise=model.draw_noise(batch), **kwargs)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def _f(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Image benchmark: {r['data']}, {r['minutes_per_model']:g} min per model", "",
             f"Machine: {m['cpus']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}"
             + (f", {m['cuda']}" if m["cuda"] else ", no GPU") + f". Scored on {r['n_eval']} images against as many "
             "held-out ones, in the feature space of the project's classifier; floor = real training images vs "
             "held-out ones at the same N.", "",
             "| family | FID | FID floor | KID | KID floor | precision | recall | classifier score | "
             "train img/s | train MFU | sample img/s | steps | dtype |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, f in r["families"].items():
        lines.append(f"| {family} | {_f(f['fid'])} | {_f(f['fid_floor'])} | {_f(f['kid'], 4)} "
                     f"| {_f(f['kid_floor'], 4)} "
                     f"| {_f(f['precision'])} | {_f(f['recall'])} | {_f(f['classifier_score'])} | "
                     f"{_f(f['train_images_per_s'], 0)} | {_f(f.get('train_mfu'), 3)} | "
                     f"{_f(f['sample_images_per_s'], 0)} | {f['steps']} | "
                     f"{f['dtype']} |")
    lines += ["", " ".join(f"![{k}]({v['grid']})" for k, v in r["families"].items()), ""]
    if r["samplers"]:
        lines += [f"## Diffusion samplers ({r['samplers'][0]['n']} images each; FID floor "
                  f"{_f(r['samplers'][0]['fid_floor'])})", "", "| sampler | steps | FID | s per image |",
                  "|---|---|---|---|"]
        lines += [f"| {s['sampler']} | {s['steps']} | {_f(s['fid'])} | {_f(s['s_per_image'], 4)} |"
                  for s in r["samplers"]]
        t = r.get("targets_samplers")
        if t:
            lines += ["", "Target, a 20-step sampler within 10% of DDPM 1000: best 20-step FID "
                      f"{_f(t['best_20_step_fid'])}"
                      f" vs {_f(t['ddpm_1000_fid'])}: **{'met' if t['within_10_percent'] else 'missed'}**."]
        lines.append("")
    d = r.get("denoiser")
    if d:
        lines += [f"## Denoiser: diffusers' UNet2DModel (kept) vs a hand-written UNet ({d['parameters']:,} "
                  f"parameters each, {d['dtype']}, same loop and budget)", "",
                  "| denoiser | train img/s | FID | steps | sample img/s |", "|---|---|---|---|---|"]
        for key, label in (("unet2d", "UNet2DModel (kept)"), ("compact", "hand-written")):
            e = d[key]
            lines.append(f"| {label} | {_f(e['train_images_per_s'], 0)} | {_f(e['fid'])} | {e['steps']} | "
                         f"{_f(e['sample_images_per_s'], 1)} |")
        lines += ["", f"Training speed, hand-written / UNet2DModel (same run): **{d['compact_speed_ratio']:.2f}x**; "
                  f"UNet2DModel's FID no worse: **{'yes' if d['kept_is_better'] else 'no'}**.", ""]
    lines.append(f"Wall time {r.get('wall_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
