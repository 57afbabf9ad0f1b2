"""Benchmark: the two video jobs on moving-fashion-mnist against issue 18's targets.

Prediction 10 -> 10: trains `simvp` for --minutes (default 15) through the service, as `aigc train` does, then
scores every validation clip (1000 clips of the test images, split seed 0) as `aigc eval` does: MSE and MAE per
frame (summed over a frame's pixels in [0, 1]), PSNR and SSIM, each beside the floors (the last frame copied, black
frames, the mean frame). Target: beat every floor on every metric. OpenSTL's Moving MNIST figures (digits, not
clothes; 200 epochs on a GPU) are printed beside, as an indication only.

Generation: trains a conditional `vae` on the clips (frames as channels) for --minutes, and the same family on
the images the clips are made of (Fashion-MNIST) for as long (the single-image reference), then scores --clips
clips as `aigc eval` does: per-frame FID on the 28 x 28 window around the object (target: within 3x of the image
run's FID), class consistency of that window frame to frame (target: >= 90%), class accuracy, motion, and the
clip-level Fréchet distance in the clip net's features, each with its real-vs-real floor.

    python benchmarks/video.py                           # both jobs, 15 minutes each training (45 min in all)
    python benchmarks/video.py --minutes 1 --name video-quick   # a quick look
    python benchmarks/video.py --job predict --set ssim=0  # one job; --set passes simvp's options
    python benchmarks/video.py --generator vae-rnn --predictor vae-rnn --name video-vae-rnn  # the per-frame VAE
                                                          # and GRU (vae-rnn) for both jobs, at the same minutes

`--generator vae|vae-rnn` picks the clip generator (vae: frames stacked as channels; vae-rnn: a per-frame VAE and
a GRU over its latents, conditional, both stages inside --minutes), `--predictor simvp|vae-rnn` the predictor
(vae-rnn unconditional there, scored on the same clips and floors). The single-image reference is the image vae
in both cases. `--set` goes to the predictor's run, `--generator-set` to the generator's:

    python benchmarks/video.py --job generate --generator vae-rnn --generator-set window=32 \
        --generator-set content_dim=32 --name video-vae-rnn-window   # the object drawn once a clip, then moved

Writes benchmarks/results/NAME.json and NAME.md (NAME: --name, default video).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from common import RESULTS, describe_machine, machine, write_results

OPENSTL = {"ConvLSTM-S": (46.3, 0.878), "PredRNN": (25.0, 0.944), "SimVP+gSTA": (15.1, 0.967)}  # MSE, SSIM
METRICS = ("mse", "mae", "psnr", "ssim")


def predict(service, args) -> tuple[dict, list[str]]:
    sets = dict(s.split("=", 1) for s in args.set)
    run_dir, metrics = service.train(args.predictor, args.data, name="predict", max_minutes=args.minutes,
                                     sets=sets or None)
    scored = service.evaluate(run_dir.name)
    m, floors = scored["metrics"], scored["floors"]
    rows = [f"| {args.predictor}{' ' + ' '.join(args.set) if args.set else ''}, {args.minutes:g} min "
            f"({metrics['steps']} steps)"
            f" | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |"]
    rows += [f"| floor: {name} | " + " | ".join(f"{f[k]:.4f}" for k in METRICS) + " |" for name, f in floors.items()]
    rows += [f"| OpenSTL {name} (Moving MNIST digits) | {mse} | | | {ssim} |" for name, (mse, ssim) in OPENSTL.items()]
    lines = [f"## Prediction 10 -> 10 on {args.data}", "",
             f"{scored['clips']} validation clips; beats every floor on every metric: "
             f"**{'yes' if m['beats_floors'] else 'no'}**.", "",
             "| | MSE/frame | MAE/frame | PSNR | SSIM |", "|---|---|---|---|---|", *rows, ""]
    return {"train": metrics, "eval": scored}, lines


def generate(service, args) -> tuple[dict, list[str]]:
    own = dict(s.split("=", 1) for s in args.generator_set)
    run_dir, metrics = service.train(args.generator, args.data, name="generate", max_minutes=args.minutes,
                                     sets={"conditional": "true", **own})
    scored = service.evaluate(run_dir.name, {"n": args.clips})
    m = scored["metrics"]
    from aigc.data.video import NAMED_VIDEOS

    images = NAMED_VIDEOS[args.data].images  # the image set the clips' objects come from
    image_dir, image_metrics = service.train("vae", images, name="image", max_minutes=args.minutes,
                                             sets={"conditional": "true"})
    image_fid = service.evaluate(image_dir.name, {"n": args.clips})["metrics"]["fid"]
    within = m["frame_fid"] <= 3 * image_fid
    consistent = m["class_consistency"] >= 0.9
    stages = f", {metrics['vae_steps']} of the per-frame VAE + {metrics['rnn_steps']} of the GRU" \
        if "vae_steps" in metrics else ""
    lines = [f"## Generation on {args.data}: {args.generator}{' ' + ' '.join(args.generator_set) if own else ''}, "
             f"conditional, {args.minutes:g} min ({metrics['steps']} steps{stages})", "",
             f"{args.clips} clips against as many validation clips; the floors: fresh training clips against the same.",
             "", "| metric | clips | floor (real vs real) | target |", "|---|---|---|---|",
             f"| per-frame FID, the object's window | {m['frame_fid']:.2f} | {m['frame_fid_floor']:.2f} | <= 3 x the "
             f"image vae's {image_fid:.2f} ({image_metrics['steps']} steps): **{'met' if within else 'missed'}** |",
             f"| class consistency | {m['class_consistency']:.3f} | {m['class_consistency_floor']:.3f} | >= 0.90: "
             f"**{'met' if consistent else 'missed'}** |",
             f"| class accuracy (the class asked for) | {m['class_accuracy']:.3f} | | |",
             f"| clip-level Fréchet distance (clip net) | {m['clip_fd']:.2f} | {m['clip_fd_floor']:.2f} | |",
             f"| speed (pixels a frame) | {m['speed']:.2f} | {m['speed_real']:.2f} | |",
             f"| frame change | {m['frame_change']:.4f} | {m['frame_change_real']:.4f} | |", "",
             f"Clip net: class accuracy {scored['clip_net']['class_accuracy']:.3f}, time-order accuracy "
             f"{scored['clip_net']['order_accuracy']:.3f} on validation clips ({scored['clip_net']['steps']} steps).",
             ""]
    return {"train": metrics, "eval": scored, "image": {"train": image_metrics, "fid": image_fid},
            "targets": {"frame_fid_within_3x": within, "class_consistency_90": consistent}}, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="training time of each run")
    parser.add_argument("--data", default="moving-fashion-mnist")
    parser.add_argument("--job", choices=("both", "predict", "generate"), default="both")
    parser.add_argument("--clips", type=int, default=200, help="generated clips scored")
    parser.add_argument("--generator", choices=("vae", "vae-rnn"), default="vae",
                        help="clip generator: vae (frames as channels) or vae-rnn (per-frame VAE + GRU)")
    parser.add_argument("--predictor", choices=("simvp", "vae-rnn"), default="simvp", help="predictor family")
    parser.add_argument("--set", action="append", default=[], help="predictor option KEY=VALUE (repeatable)")
    parser.add_argument("--generator-set", action="append", default=[],
                        help="clip generator option KEY=VALUE (repeatable), e.g. window=32")
    parser.add_argument("--name", default="video", help="results file name")
    args = parser.parse_args()
    result, lines = {"args": vars(args), "machine": machine()}, [f"# Video on {args.data}", "",
                                                                 describe_machine(machine()), ""]
    with tempfile.TemporaryDirectory() as home:
        os.environ["AIGC_HOME"] = home
        from aigc import service

        for job, run in (("predict", predict), ("generate", generate)):
            if args.job in (job, "both"):
                result[job], more = run(service, args)
                lines += more
    markdown = "\n".join(lines)
    write_results(RESULTS, args.name, result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
