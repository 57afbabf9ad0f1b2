"""The main job on the built-in defaults: train a small GPT on the Tang poems, write a few poems,
evaluate them, and say where the run and its report are."""

from __future__ import annotations

import sys

from aigc.evaluate import evaluate_run
from aigc.runs import train
from aigc.sample import GenerateSettings, generate, load_run

# A 4-layer GPT sized for about 4 minutes on 2 CPU cores. The corpus is tiny (~27 k characters), so the
# validation loss is lowest after a few hundred steps, long before the model has learned the verse
# form: the main job keeps the last weights (keep_best = false) and reports the validation score
# honestly; `aigc eval` measures how much the poems copy from the training text. Dropout 0.2 is the
# measured middle: 0.1 recites training poems (novelty 0.33), 0.3 has not learned the line form yet.
# Eager, not torch.compile (which compile=auto would choose for 2000 steps): compiled kernels round
# differently and draw other dropout masks, and the poems should not depend on whether a machine has
# a C++ compiler.
QUICKSTART_CONFIG = {
    "n_layer": "4", "n_head": "4", "n_embd": "128", "n_positions": "128",
    "embd_pdrop": "0.2", "attn_pdrop": "0.2", "resid_pdrop": "0.2",
    "block_size": "64", "batch_size": "32", "lr": "2e-3", "warmup_steps": "30", "eval_interval": "100",
    "keep_best": "false", "compile": "false",
}
PROMPTS = ("", "", "春", "月")


QUICKSTART_STEPS = 2000  # a step budget, not a time budget: the same poems on every machine (~4 min here)


def run(*, data: str = "tang300", max_minutes: float | None = None, max_steps: int | None = None,
        name: str = "quickstart", sets: dict[str, str] | None = None) -> dict:
    say = print  # the story goes to stdout: this command is for people
    if max_steps is None and max_minutes is None:
        max_steps = QUICKSTART_STEPS
    budget = " and ".join(([f"{max_steps} steps"] if max_steps else []) +
                          ([f"{max_minutes:g} minutes"] if max_minutes else []))
    say(f"1/3 training a small GPT on {data} ({budget})...")
    run_dir, metrics = train("gpt", data, name=name, overwrite=True, max_minutes=max_minutes,
                             max_steps=max_steps, sets={**QUICKSTART_CONFIG, **(sets or {})})
    say(f"    validation: {metrics['val_bpc']:.3f} bits per character after {metrics['steps']} steps")

    say("2/3 writing poems (aigc generate):")
    loaded = load_run(str(run_dir))
    length = min(80, (loaded.max_context or 10**6) - 2)
    for i, prompt in enumerate(PROMPTS):
        samples, _ = generate(loaded, GenerateSettings(prompt=prompt, seed=i, max_new_tokens=length,
                                                       temperature=0.8))
        say(f"--- poem {i + 1}" + (f" (prompt {prompt!r})" if prompt else ""))
        say(samples[0].strip())

    say("3/3 evaluating (aigc eval)...")
    result = evaluate_run(str(run_dir))
    m = result["metrics"]
    say(f"    val_bpc {m['val_bpc']:.3f}, distinct-2 {m['distinct_2']:.3f}, self-BLEU {m['self_bleu']:.3f}, "
        f"novelty {m['novelty_8gram']:.3f}, {m['tokens_per_s']:.0f} tokens/s")
    say(f"run:    {run_dir}")
    say(f"report: {run_dir / 'report.html'}")
    sys.stdout.flush()
    return result
