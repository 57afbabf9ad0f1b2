"""Benchmark: video prediction 10 -> 10 on moving-fashion-mnist, the simvp predictor against the three floors.

Trains `simvp` for --minutes (default 15) through the service, as `aigc train` does, then scores every
validation clip (1000 clips of the test images, split seed 0) as `aigc eval` does: MSE and MAE per frame (summed
over a frame's pixels in [0, 1]), PSNR and SSIM, each beside the floors (the last frame copied, black frames, the
mean frame). The target (issue 18): beat every floor on every metric after 15 minutes on 2 CPU cores. OpenSTL's
Moving MNIST figures (digits, not clothes; 200 epochs on a GPU) are printed beside, as an indication only.

    python benchmarks/video.py                # 15 minutes of training, then the scoring
    python benchmarks/video.py --minutes 2    # a quick look

Writes benchmarks/results/video.json and benchmarks/results/video.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from common import RESULTS, describe_machine, machine, write_results

OPENSTL = {"ConvLSTM-S": (46.3, 0.878), "PredRNN": (25.0, 0.944), "SimVP+gSTA": (15.1, 0.967)}  # MSE, SSIM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--data", default="moving-fashion-mnist")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["AIGC_HOME"] = home
        from aigc import service

        run_dir, metrics = service.train("simvp", args.data, name="bench", max_minutes=args.minutes)
        scored = service.evaluate(run_dir.name)
    m, floors = scored["metrics"], scored["floors"]
    rows = [f"| simvp, {args.minutes:g} min ({metrics['steps']} steps) | "
            + " | ".join(f"{m[k]:.4f}" for k in ("mse", "mae", "psnr", "ssim")) + " |"]
    rows += [f"| floor: {name} | " + " | ".join(f"{f[k]:.4f}" for k in ("mse", "mae", "psnr", "ssim")) + " |"
             for name, f in floors.items()]
    rows += [f"| OpenSTL {name} (Moving MNIST digits) | {mse} | | | {ssim} |" for name, (mse, ssim) in OPENSTL.items()]
    markdown = "\n".join([
        f"# Video prediction 10 -> 10 on {args.data}", "", describe_machine(machine()), "",
        f"{scored['clips']} validation clips; beats every floor on every metric: "
        f"{'yes' if m['beats_floors'] else 'no'}.", "",
        "| | MSE/frame | MAE/frame | PSNR | SSIM |", "|---|---|---|---|---|", *rows, ""])
    write_results(RESULTS, "video", {"args": vars(args), "machine": machine(), "train": metrics, "eval": scored},
                  markdown)
    print(markdown)


if __name__ == "__main__":
    main()
