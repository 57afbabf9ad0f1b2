"""The text modality: corpora and tokenizers in, a language model out (ngram, rnn, gpt); samples continue a
prompt; scored by bits per character on the recorded validation split, diversity and copying.

A text run holds, beside run.json and config.toml: the tokenizer (tokenizer.json, tokenizer_config.json),
the validation documents (val.jsonl, checked by sha256), the model files (a gpt run is a Hugging Face
folder) and, for gradient families, metrics.jsonl and checkpoints/last/ (docs/runs.md).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aigc import __version__
from aigc.checkpoint import find_checkpoint, save_model_files, verify_manifest
from aigc.config import DataConfig, build, fields_of, read_toml, to_toml
from aigc.data.text import CORPORA, join_docs, load_corpus, split_corpus
from aigc.data.tokenizer import TextTokenizer, train_bpe, train_char, transfer_ids
from aigc.distributed import on_main
from aigc.errors import BadRequest, UserError
from aigc.evaluate.text import text_sample_metrics, verse_form, verse_lines, write_report
from aigc.fsutil import atomic_write_text, write_json
from aigc.modalities.base import Generation, Prepared, init_changes
from aigc.models import FAMILIES, Family, ngram
from aigc.sample import GenerateSettings, LoadedModel, load_run, settings_dict
from aigc.sample import generate as decode
from aigc.store import card_header, card_lineage, continued_from, read_run, sha256_text
from aigc.train import TextBatches, train_loop

NAME = "text"
BATCHES = True  # concurrent requests can share a decoding batch (generate(..., batched=True))
GENERATE_OPTIONS = ("prompt", "n", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "num_beams", "no_repeat_ngram_size", "stop", "window")
EVALUATE_OPTIONS = ()  # `aigc eval` options beyond the run
SAMPLING = ("temperature", "top_k", "top_p", "min_p")  # what beam search does not take
TOKENIZER_KEYS = ("tokenizer", "bpe_vocab_size")  # with --init-from the tokenizer is the checkpoint's
LN2 = math.log(2)
DIVERSITY_SAMPLES = 16  # N samples ...
DIVERSITY_TOKENS = 64  # ... of up to L new tokens each, at seed 0, for diversity and novelty
MIN_VERSE_LINES = 20  # the verse form is reported for runs whose training text has at least this many verse lines


# ----------------------------------------------------------------------------------
# training


def sections(fam: Family) -> dict[str, type]:
    out = {"model": fam.config, "data": DataConfig}
    if fam.trainer == "gradient":
        out["train"] = fam.train_config
    return out


def source_of(data: str) -> str:
    return data if data in CORPORA else str(Path(data).expanduser().resolve())


def check_request(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None) -> None:
    """Nothing a text request can get wrong before its data is read (--init-from is checked by the service)."""


def n_scored_chars(docs: list[str]) -> int:
    """Characters the validation NLL is divided by: every character, plus one per document
    boundary (the end-of-text token the model predicts between documents)."""
    return sum(len(d) for d in docs) + len(docs) - 1


def prepare(family: str, fam: Family, data: str, val_data: str | None, init_from: str | None, configs: dict,
            values: dict) -> Prepared:
    """Load and split the corpus, make the tokenizer and the model (the n-gram is fitted here); with `init_from` (a
    run of the family, or a gpt's Hugging Face folder) the model holds its weights."""
    changes = init_changes(fam, configs, values, TOKENIZER_KEYS) if init_from else {}
    data_cfg = configs["data"]
    if fam.trainer == "counts" and data_cfg.tokenizer != "char":  # the n-gram counts characters
        raise BadRequest("the ngram family is a character model: tokenizer must be char")
    if fam.trainer != "gradient" and data_cfg.token_dropout:
        raise BadRequest(f"token_dropout applies to gradient-trained families, not {family}")
    if data_cfg.tokenizer != "char" and (data_cfg.min_char_count != 1 or data_cfg.token_dropout):
        raise BadRequest("min_char_count and token_dropout need the char tokenizer (--set tokenizer=char)")
    corpus = load_corpus(data, text_field=data_cfg.text_field)
    if val_data:
        train_docs = list(corpus.docs)
        val_docs = list(load_corpus(val_data, text_field=data_cfg.text_field).docs)
    else:
        train_docs, val_docs = split_corpus(corpus, data_cfg.val_fraction)
    tokenizer = _make_tokenizer(data_cfg, train_docs, init_from)
    if data_cfg.token_dropout and tokenizer.unk_id is None:
        raise BadRequest(f"token_dropout needs a vocabulary with <unk>: the tokenizer of {init_from} has none")
    train_ids, val_ids = tokenizer.encode_docs(train_docs), tokenizer.encode_docs(val_docs)
    t0 = time.perf_counter()
    model, info = build_model(fam, configs, tokenizer, train_ids, init_from, changes)
    if fam.trainer == "counts":
        info["train_time_s"] = time.perf_counter() - t0
    record = {
        "data": {
            "train": {"source": corpus.source, "corpus_sha256": corpus.sha256,
                      "sha256": sha256_text(join_docs(train_docs)), "docs": len(train_docs),
                      "chars": sum(len(d) for d in train_docs)},
            "val": {"source": "split" if val_data is None else source_of(val_data), "file": "val.jsonl",
                    "sha256": sha256_text(join_docs(val_docs)), "docs": len(val_docs),
                    "chars": sum(len(d) for d in val_docs)},
        },
    }
    if "vocab_from_checkpoint" in info:
        record["vocab_from_checkpoint"] = info.pop("vocab_from_checkpoint")

    def write_files(staging: Path) -> None:
        tokenizer.save(staging)
        atomic_write_text(staging / "val.jsonl",
                          "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in val_docs))

    return Prepared(model, record, {"tokenizer": tokenizer, "train_ids": train_ids, "val_ids": val_ids,
                                    "chars": n_scored_chars(val_docs), "fit": info}, write_files)


def reload(family: str, fam: Family, run_dir: Path, record: dict, configs: dict) -> Prepared:
    train_docs, val_docs = _load_split(record, configs["data"], run_dir)
    tokenizer = TextTokenizer.load(run_dir)
    model = fam.load(on_main(find_checkpoint, run_dir))  # the main process tidies an interrupted save
    return Prepared(model, record, {"tokenizer": tokenizer, "train_ids": tokenizer.encode_docs(train_docs),
                                    "val_ids": tokenizer.encode_docs(val_docs), "chars": n_scored_chars(val_docs),
                                    "fit": {}})


def fit(fam: Family, prepared: Prepared, configs: dict, run_dir: Path, budget, resume: bool) -> dict:
    state = prepared.state
    if fam.trainer == "counts":
        on_main(save_model_files, prepared.model, run_dir)
        return state["fit"]
    val_ids = state["val_ids"]
    batches = TextBatches(state["train_ids"], val_ids, configs["train"].block_size,
                          chars_per_val_token=state["chars"] / max(1, len(val_ids) - 1),
                          token_dropout=configs["data"].token_dropout, unk_id=state["tokenizer"].unk_id)
    return train_loop(prepared.model, batches, configs["train"], run_dir, budget, resume=resume,
                      cpu_bf16=fam.cpu_bf16, compile_gain=fam.compile_gain)


def finish(family: str, fam: Family, prepared: Prepared, configs: dict, run_dir: Path, fit: dict) -> dict:
    metrics = score_validation(run_dir, prepared.state["val_ids"], prepared.state["chars"])
    metrics.update({k: v for k, v in fit.items() if k in ("steps", "train_time_s", "train_loss", "best_step",
                                                          "tokens_per_s", "pairs_per_s", "schedule_steps", "order")})
    if "parent_val_bpc" in prepared.state:  # a run of aigc optimize: the language before, beside after
        metrics["parent_val_bpc"] = prepared.state["parent_val_bpc"]
    return metrics


def score_validation(run_dir: Path, val_ids: np.ndarray, chars: int) -> dict:
    """NLL of the validation stream under the run's best weights: val_loss, perplexity, val_bpc."""
    loaded = load_run(str(run_dir))
    nll, n = loaded.nll(val_ids)
    val_loss = nll / max(1, n)
    return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 700)), "val_bpc": nll / LN2 / chars,
            "val_tokens": n, "val_chars": chars}


def card(run_dir: Path, record: dict, configs: dict) -> str:
    """README.md with Hugging Face model-card metadata (YAML header) and the run's numbers."""
    m = record.get("metrics", {})
    lib = "transformers" if record["family"] == "gpt" else "aigc"
    lines = [*card_header(record, "text-generation", library=lib, metrics=("bits-per-character",)),
             f"# {Path(run_dir).name}", "",
             f"A `{record['family']}` text model trained by AIGC Studio {__version__} on "
             f"`{record['data']['train']['source']}` ({record['data']['train']['chars']:,} training characters)."
             + continued_from(record),
             "", "## Results on the validation split", "",
             f"- bits per character: {m.get('val_bpc', float('nan')):.4f}",
             f"- loss per token: {m.get('val_loss', float('nan')):.4f} nats "
             f"(perplexity {m.get('perplexity', float('nan')):.2f})",
             f"- steps: {m.get('steps')}, training time: {m.get('train_time_s', 0):.0f} s, "
             f"dtype: {record.get('dtype', 'fp32')}" + (", torch.compile" if record.get("compiled") else ""),
             *card_lineage(record),
             "", "## Configuration", "", "```toml",
             to_toml(configs).strip(), "```", "",
             "## Use", "", "```", f"aigc generate {run_dir} --prompt '...'", f"aigc eval {run_dir}", "```", ""]
    if record["family"] == "gpt":
        lines += ["Or with transformers:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained({str(run_dir)!r})",
                  f"tokenizer = AutoTokenizer.from_pretrained({str(run_dir)!r})", "```", ""]
    lines += ["## Limitations", "",
              "A small model trained on a small corpus: it imitates surface form and copies phrases "
              "from its training text (see `aigc eval`, novelty and longest copy).", ""]
    return "\n".join(lines)


def _make_tokenizer(data_cfg: DataConfig, train_docs: list[str], init_from: str | None) -> TextTokenizer:
    """The run's tokenizer: its training split's (char or BPE); a checkpoint's BPE or Hugging Face tokenizer with
    --init-from (a char checkpoint's characters are mapped onto the run's own vocabulary, `build_model`)."""
    if init_from:
        tokenizer = TextTokenizer.load(Path(init_from))
        if tokenizer.kind != "char":
            return tokenizer
    if data_cfg.tokenizer == "bpe":
        return train_bpe(train_docs, data_cfg.bpe_vocab_size)
    return train_char(train_docs, data_cfg.min_char_count)


def build_model(fam: Family, configs: dict, tokenizer: TextTokenizer, train_ids: np.ndarray,
                init_from: str | None, changes: dict[str, float]) -> tuple[object, dict]:
    """The model, checked against the data; the n-gram is fitted here (it has no training loop)."""
    if fam.trainer == "counts":
        cfg = configs["model"]
        order = cfg.order or f"chosen on the tail of the training split among 1..{cfg.max_order}"
        print(f"counting the n-grams of {len(train_ids):,} tokens (order {order})...", file=sys.stderr)
        model, info = ngram.build_from_ids(train_ids, tokenizer.vocab_size, cfg, tokenizer.eot_id, tokenizer.unk_id)
        return model, {"order": info["order"], "tail_nats_per_token": info.get("tail_nats_per_token"), "steps": 0}
    train_cfg = configs["train"]
    if train_cfg.batch_size % train_cfg.grad_accum:
        raise BadRequest(f"batch_size {train_cfg.batch_size} is not divisible by grad_accum {train_cfg.grad_accum}")
    if len(train_ids) < train_cfg.block_size + 2:
        raise BadRequest(f"training split has {len(train_ids)} tokens; block_size {train_cfg.block_size} "
                         f"needs at least {train_cfg.block_size + 2} (lower it with --set block_size=N)")
    info = {}
    if init_from:
        if (Path(init_from) / "manifest.json").is_file():  # a run: its weights as it wrote them
            verify_manifest(Path(init_from))
        checkpoint_tokenizer, ids = TextTokenizer.load(Path(init_from)), None
        if checkpoint_tokenizer.kind == "char":  # the run's own characters, each row from the checkpoint's
            ids, found = transfer_ids(tokenizer, checkpoint_tokenizer)
            info["vocab_from_checkpoint"] = {"tokens": tokenizer.vocab_size, "found": found}
        model = fam.load_pretrained(Path(init_from), tokenizer.eot_id, changes, ids)
        # the architecture is the checkpoint's, the regularisation as given
        configs["model"] = fam.config(**{key: getattr(model.config, key) for key in fields_of(fam.config)})
    else:
        torch.manual_seed(train_cfg.seed)  # the initial weights depend on the seed alone
        model = fam.build(configs["model"], tokenizer.vocab_size, tokenizer.eot_id)
    n_positions = getattr(model.config, "n_positions", None)
    if n_positions is not None and train_cfg.block_size > n_positions:
        raise BadRequest(f"block_size {train_cfg.block_size} exceeds n_positions {n_positions}")
    return model, info


# ----------------------------------------------------------------------------------
# the text a run was trained and is scored on


def load_split(run_dir: Path) -> tuple[list[str], list[str]]:
    """The run's training and validation documents, checked against the recorded sha256."""
    record = read_run(run_dir)
    fam = FAMILIES[record["family"]]
    configs = build(sections(fam), read_toml(Path(run_dir) / "config.toml"), family=record["family"])
    return _load_split(record, configs["data"], Path(run_dir))


def _load_split(record: dict, data_cfg: DataConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    corpus = load_corpus(record["data"]["train"]["source"], text_field=data_cfg.text_field)
    if corpus.sha256 != record["data"]["train"]["corpus_sha256"]:
        raise UserError(f"the training data {record['data']['train']['source']} changed since the run was "
                        f"made (sha256 differs)")
    if record["data"]["val"]["source"] == "split":
        train_docs = split_corpus(corpus, data_cfg.val_fraction)[0]
    else:
        train_docs = list(corpus.docs)
    return train_docs, read_val(run_dir)


def trained_on(run_dir: Path) -> tuple[list[tuple[str, list[str]]], str | None]:
    """Everything a text run's weights have read: (run name and data, training documents) for the run and for
    every run it was fine-tuned from (--init-from, followed back), nearest first; and the first checkpoint in the
    chain that is not a run (a Hugging Face folder, whose training text is unknown), or None."""
    texts = []
    current: Path | None = Path(run_dir)
    while current is not None:
        if not (current / "run.json").is_file():
            return texts, str(current)
        record = read_run(current)
        texts.append((f"{current.name} ({record['data']['train']['source']})", load_split(current)[0]))
        current = Path(record["init_from"]) if record.get("init_from") else None
        if current is not None and not current.exists():
            raise UserError(f"{run_dir}: it was fine-tuned from {current}, which is gone: its training text is "
                            f"needed to measure copying")
    return texts, None


def read_val(run_dir: Path) -> list[str]:
    """The validation documents stored in the run (`val.jsonl`), verified against run.json."""
    record = read_run(run_dir)
    path = Path(run_dir) / "val.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: val.jsonl is missing")
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    if sha256_text(join_docs(docs)) != record["data"]["val"]["sha256"]:
        raise UserError(f"{run_dir}: val.jsonl does not match the sha256 recorded in run.json")
    return docs


# ----------------------------------------------------------------------------------
# generation


def load(spec: str) -> LoadedModel:
    """A text run, or any local Hugging Face causal-LM folder."""
    return load_run(spec)


def settings_of(options: dict, seed: int) -> GenerateSettings:
    """GenerateSettings from the options given (None or absent: the default); sampling knobs do not apply to
    beam search."""
    options = {k: v for k, v in options.items() if v is not None}
    num_beams = options.get("num_beams", 1)
    if num_beams > 1:
        given = [f"--{k.replace('_', '-')}" for k in SAMPLING if k in options]
        if given:
            raise BadRequest(f"{given[0]} does not apply to beam search (--num-beams {num_beams})")
    if "stop" in options:
        options["stop"] = list(options["stop"])
    return GenerateSettings(seed=seed, **options).validate()


def generate(loaded: LoadedModel, options: dict, seed: int, stream: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None, *, batched: bool = False) -> Generation:
    settings = settings_of(options, seed)
    samples, stats = decode(loaded, settings, stream=stream, cancel=cancel, batched=batched)
    return Generation(NAME, samples, {"run": str(loaded.path), "family": loaded.family,
                                      "settings": settings_dict(settings), "stats": stats})


def save(generation: Generation, out_dir: Path) -> list[str]:
    """samples.jsonl: one {"text", "seed"} per sample, and the record beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = generation.record["settings"]["seed"]
    path = out_dir / "samples.jsonl"
    atomic_write_text(path, "".join(json.dumps({"text": s, "seed": seed}, ensure_ascii=False) + "\n"
                                    for s in generation.outputs))
    write_json(out_dir / "generation.json", generation.record)
    return [str(path), str(out_dir / "generation.json")]


# ----------------------------------------------------------------------------------
# evaluation


def evaluate(run_dir: Path, record: dict, options: dict) -> dict:
    """Score the run on its recorded validation split, sample from it, write eval.json and report.html."""
    if options.get("n") is not None:
        raise BadRequest("-n applies to image runs: a text run is scored on its whole validation split")
    loaded = load_run(str(run_dir))
    val_docs = read_val(run_dir)
    texts, unknown = trained_on(run_dir)  # the run's training split, and its --init-from ancestors'
    own_train = texts[0][1]
    train_docs = [doc for _, docs in texts for doc in docs]

    # 1. likelihood of the validation split recorded in the run
    val_ids = loaded.tokenizer.encode_docs(val_docs)
    nll, n_tokens = loaded.nll(val_ids)
    chars = n_scored_chars(val_docs)
    val_loss = nll / max(1, n_tokens)

    # 2. samples at seed 0 with the default decoding settings (temperature 1: the model as it is)
    settings = GenerateSettings(n=DIVERSITY_SAMPLES, seed=0, max_new_tokens=DIVERSITY_TOKENS, temperature=1.0)
    context = loaded.max_context
    if context is not None:
        settings.max_new_tokens = min(settings.max_new_tokens, context - 1)
    samples, stats = decode(loaded, settings)

    # 3. diversity and novelty of the samples against all the text the weights were trained on
    train_text = join_docs(train_docs)
    if all(not s for s in samples):
        raise UserError(f"run {run_dir.name}: every sample was empty (the model ends every text at once)")
    sample_metrics = text_sample_metrics(samples, train_text)
    # 4. verse form (Chinese verse: lines of 5 or 7 characters), of the samples and of the run's own training text
    if len(verse_lines(own_train)) >= MIN_VERSE_LINES:
        sample_metrics.update(verse_form=verse_form(samples), verse_form_train=verse_form(own_train))
    metrics = {
        "val_bpc": nll / LN2 / chars,
        "val_loss": val_loss,
        "perplexity": math.exp(min(val_loss, 700)),
        **sample_metrics,
        "tokens_per_s": stats["tokens_per_s"],
    }
    sampling = {"n": settings.n, "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
                "temperature": settings.temperature, "generated_tokens": stats["generated_tokens"]}
    result = {
        "run": str(run_dir),
        "metrics": metrics,
        "samples": {**sampling, "texts": samples},  # the texts scored (aigc report shows them)
        "validation": {"tokens": n_tokens, "chars": chars, "docs": len(val_docs)},
        "copying_measured_against": {"runs": [source for source, _ in texts], "chars": sum(len(d) for d in train_docs),
                                     "unknown_checkpoint": unknown},
    }
    write_json(run_dir / "eval.json", result)
    write_report(run_dir / "report.html", title=f"{run_dir.name}: {record['family']} on "
                 f"{record['data']['train']['source']}", metrics=metrics, samples=samples[:8],
                 curves=read_curves(run_dir / "metrics.jsonl"), settings={**sampling,
                                                                          "family": record["family"],
                                                                          "dtype": record.get("dtype", "fp32")})
    return result


def read_curves(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r or "val_loss" in r]
