"""Run directories: create one from a training request, find one by name, read its record.

`train()` is what `aigc train` calls: it resolves the configuration, loads and splits the data,
builds the tokenizer and the model, trains it (the shared loop, or a family's closed-form fit),
scores the best weights on the validation split and writes the model card.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from aigc import __version__
from aigc.checkpoint import find_checkpoint, save_model_files
from aigc.config import DataConfig, ImageDataConfig, build, read_toml, to_toml
from aigc.data.text import Corpus, join_docs, load_corpus, split_corpus
from aigc.data.tokenizer import TextTokenizer, train_bpe, train_char, transfer_ids
from aigc.distributed import is_main_process, on_main
from aigc.errors import UserError
from aigc.fsutil import atomic_write_text, write_json
from aigc.models import FAMILIES, Family, gpt
from aigc.store import (
    card_header,
    claim_run_dir,
    commit_run_dir,
    now,
    read_run,
    runs_dir,
    sha256_text,
    valid_name,
)

LN2 = math.log(2)
DEFAULT_MAX_MINUTES = 10.0  # the budget when neither --max-steps nor --max-minutes is given


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown family {name!r} (choose from: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def sections_for(family: str, modality: str | None = None) -> dict[str, type]:
    """The configuration sections of a family; modality="series": those of its series variant."""
    fam = family_of(family)
    if modality == "series" or fam.modality == "series":
        from aigc.data.series import SeriesDataConfig
        from aigc.series_runs import series_family

        fam = series_family(family)
        sections = {"model": fam.config, "data": SeriesDataConfig}
    else:
        sections = {"model": fam.config, "data": ImageDataConfig if fam.modality == "image" else DataConfig}
    if fam.trainer == "gradient":
        sections["train"] = fam.train_config
    return sections


def n_scored_chars(docs: list[str]) -> int:
    """Characters the validation NLL is divided by: every character, plus one per document
    boundary (the end-of-text token the model predicts between documents)."""
    return sum(len(d) for d in docs) + len(docs) - 1


def train(family: str, data: str, *, val_data: str | None = None, name: str | None = None,
          overwrite: bool = False, resume: bool = False, max_minutes: float | None = None,
          max_steps: int | None = None, init_from: str | None = None, config_file: str | None = None,
          sets: dict[str, str] | None = None) -> tuple[Path, dict]:
    fam = family_of(family)
    sets = sets or {}
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if resume and not name:
        raise UserError("--resume needs --name NAME of the run to continue")
    if init_from and not fam.init_from:
        raise UserError(f"--init-from does not apply to family {family} (only: "
                        f"{', '.join(k for k, f in FAMILIES.items() if f.init_from)})")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {max_steps}")
    if max_minutes is not None and not (max_minutes > 0 and math.isfinite(max_minutes)):
        raise UserError(f"--max-minutes must be > 0, got {max_minutes}")
    if name is not None and not valid_name(name):
        raise UserError(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-'")

    budget_minutes = max_minutes if (max_minutes or max_steps) else DEFAULT_MAX_MINUTES
    header = {"family": family, "data": data, "aigc_version": __version__}
    from aigc.data.series import is_series_data

    if fam.modality == "series" or is_series_data(data):  # the data decides: rnn also takes a series
        from aigc.series_runs import train_series

        return train_series(family, data, val_data=val_data, name=name, overwrite=overwrite, resume=resume,
                            max_steps=max_steps, max_minutes=max_minutes, config_file=config_file, sets=sets,
                            header=header)
    if fam.modality == "image":
        from aigc.image_runs import train_images

        return train_images(fam, family, data, val_data=val_data, name=name, overwrite=overwrite, resume=resume,
                            budget=(max_steps, budget_minutes), config_file=config_file, sets=sets, header=header)
    if resume:
        run_dir = runs_dir() / name
        if not (run_dir / "run.json").is_file():
            raise UserError(f"--resume: no run named {name!r} in {runs_dir()}")
        if sets or config_file or init_from or val_data:
            raise UserError("--resume continues with the run's recorded configuration and data; "
                            "drop --set/--config/--init-from/--val-data")
        record = read_run(run_dir)
        if record["family"] != family:
            raise UserError(f"run {name!r} is a {record['family']} run, not {family}")
        if fam.trainer != "gradient":
            raise UserError(f"--resume applies to gradient-trained families, not {family}")
        if record["data"]["train"]["source"] != _source_of(data):
            raise UserError(f"run {name!r} was trained on {record['data']['train']['source']}, not {data}")
        configs = build(sections_for(family), read_toml(run_dir / "config.toml"), family=family)
        train_docs, val_docs = _load_split(record, configs["data"], run_dir)
        tokenizer = TextTokenizer.load(run_dir)
        train_ids, val_ids = tokenizer.encode_docs(train_docs), tokenizer.encode_docs(val_docs)
        model = fam.load(on_main(find_checkpoint, run_dir))  # the main process tidies an interrupted save
    else:
        # Everything that can fail on the user's input happens before the run directory is
        # touched: a failed request leaves no half-made run and never destroys an existing one.
        values = dict(read_toml(Path(config_file))) if config_file else {}
        values.update(sets)
        if init_from:
            arch = [k for k in values if k in ("n_layer", "n_head", "n_embd", "n_positions", "tokenizer",
                                               "bpe_vocab_size")]
            if arch:
                raise UserError(f"{arch[0]} comes from the --init-from checkpoint and cannot be set")
        configs = build(sections_for(family), values, family=family)
        data_cfg = configs["data"]
        if family == "ngram" and data_cfg.tokenizer != "char":
            raise UserError("the ngram family is a character model: tokenizer must be char")
        if fam.trainer != "gradient" and data_cfg.token_dropout:
            raise UserError(f"token_dropout applies to gradient-trained families, not {family}")
        if data_cfg.tokenizer != "char" and (data_cfg.min_char_count != 1 or data_cfg.token_dropout):
            raise UserError("min_char_count and token_dropout need the char tokenizer (--set tokenizer=char)")
        # several processes (torchrun): one name for all (the default has a timestamp); only the
        # main process writes the run, the others compute the same data and model (docs/runs.md)
        final_dir = on_main(claim_run_dir, family, data, name, overwrite)
        corpus = load_corpus(data, text_field=configs["data"].text_field)
        if val_data:
            train_docs = list(corpus.docs)
            val_docs = list(load_corpus(val_data, text_field=configs["data"].text_field).docs)
        else:
            train_docs, val_docs = split_corpus(corpus, configs["data"].val_fraction)
        tokenizer = _make_tokenizer(configs["data"], train_docs, init_from)
        if data_cfg.token_dropout and tokenizer.unk_id is None:
            raise UserError(f"token_dropout needs a vocabulary with <unk>: the tokenizer of {init_from} has none")
        train_ids, val_ids = tokenizer.encode_docs(train_docs), tokenizer.encode_docs(val_docs)
        t0 = time.perf_counter()
        dropouts = {k: getattr(configs["model"], k) for k in gpt.DROPOUTS if k in values}  # given for --init-from
        model, fit = _build_model(fam, family, configs, tokenizer, train_ids, init_from, dropouts)
        if fam.trainer == "counts":
            fit["train_time_s"] = time.perf_counter() - t0
        record = _new_record(family, corpus, train_docs, val_docs, val_data, init_from)
        if "vocab_from_checkpoint" in fit:
            record["vocab_from_checkpoint"] = fit.pop("vocab_from_checkpoint")

        def write_files(staging: Path) -> None:
            tokenizer.save(staging)
            _write_val(staging, val_docs)
            write_json(staging / "run.json", record)
            atomic_write_text(staging / "config.toml", to_toml(configs, header))

        run_dir = on_main(commit_run_dir, final_dir, write_files)
    record["budget"] = {"max_steps": max_steps, "max_minutes": budget_minutes}
    record["status"] = "running"
    on_main(write_json, run_dir / "run.json", record)
    chars = n_scored_chars(val_docs)

    if fam.trainer == "counts":
        on_main(save_model_files, model, run_dir)
    else:
        from aigc.train import Budget, TextBatches, train_loop

        with recording_failure(run_dir, record):
            batches = TextBatches(train_ids, val_ids, configs["train"].block_size,
                                  chars_per_val_token=chars / max(1, len(val_ids) - 1),
                                  token_dropout=configs["data"].token_dropout, unk_id=tokenizer.unk_id)
            fit = train_loop(model, batches, configs["train"], run_dir, Budget(max_steps, budget_minutes),
                             resume=resume, cpu_bf16=fam.cpu_bf16, compile_gain=fam.compile_gain)
        record.update(dtype=fit["dtype"], compiled=fit["compiled"])

    def finish() -> dict:  # the main process scores and records; every process returns its metrics
        metrics = score_validation(run_dir, val_ids, chars)
        metrics.update({k: v for k, v in fit.items() if k in ("steps", "train_time_s", "train_loss", "best_step",
                                                              "tokens_per_s", "schedule_steps", "order")})
        record.update(status="done", metrics=metrics, finished=now())
        write_json(run_dir / "run.json", record)
        write_model_card(run_dir, record, configs)
        return metrics

    return run_dir, on_main(finish)


@contextlib.contextmanager
def recording_failure(run_dir: Path, record: dict):
    """Around training: an exception marks the run `interrupted` (Ctrl-C) or `failed` in run.json
    (written by the main process), then goes on."""
    from aigc.train import Interrupted

    try:
        yield
    except BaseException as e:
        record["status"] = "interrupted" if isinstance(e, Interrupted | KeyboardInterrupt) else "failed"
        if is_main_process():
            write_json(Path(run_dir) / "run.json", record)
        raise


def score_validation(run_dir: Path, val_ids: np.ndarray, chars: int) -> dict:
    """NLL of the validation stream under the run's best weights: val_loss, perplexity, val_bpc."""
    from aigc.sample import load_run

    loaded = load_run(str(run_dir))
    nll, n = loaded.nll(val_ids)
    val_loss = nll / max(1, n)
    return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 700)), "val_bpc": nll / LN2 / chars,
            "val_tokens": n, "val_chars": chars}


def load_split(run_dir: Path) -> tuple[list[str], list[str]]:
    """The run's training and validation documents, checked against the recorded sha256."""
    record = read_run(run_dir)
    configs = build(sections_for(record["family"]), read_toml(Path(run_dir) / "config.toml"),
                    family=record["family"])
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


def write_model_card(run_dir: Path, record: dict, configs: dict) -> None:
    """README.md with Hugging Face model-card metadata (YAML header) and the run's numbers."""
    m = record.get("metrics", {})
    lib = "transformers" if record["family"] == "gpt" else "aigc"
    lines = [*card_header(record, "text-generation", library=lib, metrics=("bits-per-character",)),
             f"# {Path(run_dir).name}", "",
             f"A `{record['family']}` text model trained by AIGC Studio {__version__} on "
             f"`{record['data']['train']['source']}` ({record['data']['train']['chars']:,} training characters).",
             "", "## Results on the validation split", "",
             f"- bits per character: {m.get('val_bpc', float('nan')):.4f}",
             f"- loss per token: {m.get('val_loss', float('nan')):.4f} nats "
             f"(perplexity {m.get('perplexity', float('nan')):.2f})",
             f"- steps: {m.get('steps')}, training time: {m.get('train_time_s', 0):.0f} s, "
             f"dtype: {record.get('dtype', 'fp32')}" + (", torch.compile" if record.get("compiled") else ""),
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
    atomic_write_text(Path(run_dir) / "README.md", "\n".join(lines))


def _make_tokenizer(data_cfg: DataConfig, train_docs: list[str], init_from: str | None) -> TextTokenizer:
    """The run's tokenizer: its training split's (char or BPE); a checkpoint's BPE or Hugging Face tokenizer with
    --init-from (a char checkpoint's characters are mapped onto the run's own vocabulary, `_build_model`)."""
    if init_from:
        tokenizer = TextTokenizer.load(Path(init_from))
        if tokenizer.kind != "char":
            return tokenizer
    if data_cfg.tokenizer == "bpe":
        return train_bpe(train_docs, data_cfg.bpe_vocab_size)
    return train_char(train_docs, data_cfg.min_char_count)


def _build_model(fam: Family, family: str, configs: dict, tokenizer: TextTokenizer, train_ids: np.ndarray,
                 init_from: str | None, dropouts: dict[str, float]) -> tuple[object, dict]:
    """The model, checked against the data; the n-gram is fitted here (it has no training loop)."""
    if fam.trainer == "counts":
        from aigc.models import ngram

        cfg = configs["model"]
        order = cfg.order or f"chosen on the tail of the training split among 1..{cfg.max_order}"
        print(f"counting the n-grams of {len(train_ids):,} tokens (order {order})...", file=sys.stderr)
        model, info = ngram.build_from_ids(train_ids, tokenizer.vocab_size, configs["model"],
                                           tokenizer.eot_id, tokenizer.unk_id)
        return model, {"order": info["order"], "tail_nats_per_token": info.get("tail_nats_per_token"),
                       "steps": 0}
    import torch

    train_cfg = configs["train"]
    if train_cfg.batch_size % train_cfg.grad_accum:
        raise UserError(f"batch_size {train_cfg.batch_size} is not divisible by grad_accum {train_cfg.grad_accum}")
    if len(train_ids) < train_cfg.block_size + 2:
        raise UserError(f"training split has {len(train_ids)} tokens; block_size {train_cfg.block_size} "
                        f"needs at least {train_cfg.block_size + 2} (lower it with --set block_size=N)")
    info = {}
    if init_from:
        model = gpt.load_pretrained(Path(init_from), tokenizer.eot_id, dropouts)
        configs["model"] = gpt.config_of(model)  # the architecture is the checkpoint's, dropout as given
        checkpoint_tokenizer = TextTokenizer.load(Path(init_from))
        if checkpoint_tokenizer.kind == "char":  # the run's own characters, each embedding from the checkpoint's
            ids, found = transfer_ids(tokenizer, checkpoint_tokenizer)
            gpt.select_embeddings(model, ids)
            info["vocab_from_checkpoint"] = {"tokens": tokenizer.vocab_size, "found": found}
    else:
        torch.manual_seed(train_cfg.seed)  # the initial weights depend on the seed alone
        model = fam.build(configs["model"], tokenizer.vocab_size, tokenizer.eot_id)
    n_positions = getattr(model.config, "n_positions", None)
    if n_positions is not None and train_cfg.block_size > n_positions:
        raise UserError(f"block_size {train_cfg.block_size} exceeds n_positions {n_positions}")
    return model, info


def _new_record(family: str, corpus: Corpus, train_docs: list[str], val_docs: list[str],
                val_data: str | None, init_from: str | None) -> dict:
    return {
        "family": family, "modality": "text", "created": now(), "aigc_version": __version__,
        "init_from": str(Path(init_from).resolve()) if init_from else None,
        "data": {
            "train": {"source": corpus.source, "corpus_sha256": corpus.sha256,
                      "sha256": sha256_text(join_docs(train_docs)), "docs": len(train_docs),
                      "chars": sum(len(d) for d in train_docs)},
            "val": {"source": "split" if val_data is None else _source_of(val_data), "file": "val.jsonl",
                    "sha256": sha256_text(join_docs(val_docs)), "docs": len(val_docs),
                    "chars": sum(len(d) for d in val_docs)},
        },
    }


def _write_val(run_dir: Path, docs: list[str]) -> None:
    atomic_write_text(run_dir / "val.jsonl",
                      "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))


def _source_of(spec: str) -> str:
    from aigc.data.text import CORPORA

    return spec if spec in CORPORA else str(Path(spec).expanduser().resolve())
