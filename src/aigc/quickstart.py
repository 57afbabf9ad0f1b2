"""The main job on the built-in defaults: pretrain a small GPT on Chinese text that does not quote the Tang
poems, fine-tune it on the Tang poems, write a few poems, evaluate them against the n-gram baseline on the
same split, and say where the runs and the report are.

How the defaults were chosen (measured, docs/quickstart.md): trained on the 27 k characters of tang300
alone, a GPT either has not learned the language yet or recites its training poems, scoring far worse than
the Kneser-Ney n-gram. Pretraining on `fortunes-zh-notang` (fortunes-zh without
the 191 documents that share a verse line with tang300: no leakage) and fine-tuning with dropout and token
dropout for a few hundred steps beats the n-gram on the same validation split with the same vocabulary.
Step budgets, not time budgets, so that every machine writes the same poems; eager, not torch.compile, so
that they do not depend on whether a machine has a C++ compiler.
"""

from __future__ import annotations

import sys
import time

from aigc import service

PRETRAIN_DATA = "fortunes-zh-notang"
PRETRAIN_STEPS = 1200  # ~3 minutes on 2 CPU cores
FINETUNE_STEPS = 300  # ~1 minute
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "n_positions")  # come from the checkpoint when fine-tuning
PRETRAIN_ONLY = (*ARCHITECTURE, "min_char_count")  # the fine-tuned run's vocabulary is the n-gram's
# 4 layers x 128, context 128; characters seen fewer than 3 times in the pretraining text share <unk>
# (a 4k-way output layer trains much faster than a 6k-way one, docs/quickstart.md). Batch 16 x 128 beat
# 8 x 128 and 32 x 128 at equal time on held-out Tang poems.
PRETRAIN_CONFIG = {
    "n_layer": "4", "n_head": "4", "n_embd": "128", "n_positions": "128", "min_char_count": "3",
    "batch_size": "16", "block_size": "128", "lr": "2e-3", "warmup_steps": "100", "val_fraction": "0.02",
    "eval_interval": "300", "keep_best": "false", "compile": "false",
}
# The fine-tuned run has its own vocabulary (tang300's training characters, as the n-gram has: their bits per
# character compare exactly), each embedding starting from the pretrained one. Dropout 0.1 and token dropout
# 0.2 (a fifth of the inputs replaced by <unk>) keep the validation loss falling for 300 steps.
FINETUNE_CONFIG = {
    "embd_pdrop": "0.1", "attn_pdrop": "0.1", "resid_pdrop": "0.1", "token_dropout": "0.2",
    "batch_size": "32", "block_size": "64", "lr": "1e-3", "warmup_steps": "20", "eval_interval": "50",
    "keep_best": "false", "compile": "false",
}
PROMPTS = ("", "", "春", "月")


STUDIO_COMMAND = ".venv/bin/aigc studio"  # what the main job ends by printing (from the project's folder)


def run(*, data: str = "tang300", pretrain_data: str | None = PRETRAIN_DATA, pretrain_steps: int = PRETRAIN_STEPS,
        max_steps: int = FINETUNE_STEPS, name: str = "quickstart", sets: dict[str, str] | None = None) -> dict:
    """The main job; `sets` apply to both stages (architecture keys to the pretraining only). Returns the final
    run's evaluation with the n-gram's beside it (`baseline`)."""
    say = print  # the story goes to stdout: this command is for people
    sets = sets or {}
    t0 = time.perf_counter()
    pretrained = None
    steps = 4 if pretrain_data else 3
    if pretrain_data:
        say(f"1/{steps} pretraining a small GPT on {pretrain_data} ({pretrain_steps} steps)...")
        pretrained, m = service.train("gpt", pretrain_data, name=f"{name}-pretrain", overwrite=True,
                                      max_steps=pretrain_steps, sets={**PRETRAIN_CONFIG, **sets})
        say(f"    {pretrain_data}: {m['val_bpc']:.3f} bits per character on its held-out end")
    stage = 2 if pretrain_data else 1
    say(f"{stage}/{steps} fine-tuning it on {data} ({max_steps} steps)..." if pretrain_data
        else f"1/{steps} training a small GPT on {data} ({max_steps} steps)...")
    architecture = {k: v for k, v in {**PRETRAIN_CONFIG, **sets}.items() if k in ARCHITECTURE}
    tuned_sets = {**FINETUNE_CONFIG, **{k: v for k, v in sets.items() if k not in PRETRAIN_ONLY}}
    if pretrained is None:  # no pretraining: the same model, from scratch
        tuned_sets.update(architecture)
    run_dir, metrics = service.train("gpt", data, name=name, overwrite=True, max_steps=max_steps,
                             init_from=str(pretrained) if pretrained else None, sets=tuned_sets)
    baseline_dir, baseline = service.train("ngram", data, name=f"{name}-ngram", overwrite=True)
    say(f"    validation: {metrics['val_bpc']:.3f} bits per character; the n-gram baseline on the same split: "
        f"{baseline['val_bpc']:.3f}")

    say(f"{stage + 1}/{steps} writing poems (aigc generate):")
    length = min(80, (service.load(str(run_dir)).max_context or 10**6) - 2)
    for i, prompt in enumerate(PROMPTS):
        poem = service.generate(str(run_dir), {"prompt": prompt, "max_new_tokens": length, "temperature": 0.8},
                                seed=i)
        say(f"--- poem {i + 1}" + (f" (prompt {prompt!r})" if prompt else ""))
        say(poem.outputs[0].strip())

    say(f"{stage + 2}/{steps} evaluating (aigc eval), the GPT and the n-gram...")
    result = service.evaluate(str(run_dir))
    result["baseline"] = service.evaluate(str(baseline_dir))
    say(comparison(result, result["baseline"]))
    copied = result["copying_measured_against"]
    say(f"    copying is measured against all {copied['chars']:,} characters the GPT was trained on "
        f"({', '.join(copied['runs'])})")
    say(f"done in {time.perf_counter() - t0:.0f} s")
    say(f"run:    {run_dir}")
    say(f"report: {run_dir / 'report.html'}")
    say(f"studio: {STUDIO_COMMAND} --run {run_dir.name}    (the web studio on this run, in your browser)")
    sys.stdout.flush()
    return result


def comparison(gpt: dict, ngram: dict) -> str:
    """The table the main job ends with: the GPT beside the n-gram on the same validation split."""
    rows = [("", "bits/char (val)", "novelty (8-grams)", "longest copy", "verse form")]
    for label, result in (("gpt (quickstart)", gpt), ("n-gram baseline", ngram)):
        m = result["metrics"]
        form = m.get("verse_form")
        rows.append((label, f"{m['val_bpc']:.3f}", f"{m['novelty_8gram']:.3f}", str(m["longest_copy"]),
                     "-" if form is None else f"{form:.2f}"))
    train_form = gpt["metrics"].get("verse_form_train")
    if train_form is not None:
        rows.append(("training poems", "", "", "", f"{train_form:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("    " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows)
