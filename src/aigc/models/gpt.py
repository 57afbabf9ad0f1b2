"""GPT-2 architecture (transformers' `GPT2LMHeadModel`), trained from scratch or fine-tuned.

The model maths lives in transformers; this file only maps the project's config onto
`GPT2Config`. A run directory is a Hugging Face model folder: `AutoModelForCausalLM` and
`AutoTokenizer` load it unchanged.

Attention kernel: on a CPU every model made or loaded here uses transformers' "eager" attention
(matmul, softmax, matmul) instead of its default "sdpa": under bf16 autocast PyTorch's fused CPU
attention kernel has a slow backward pass, and the default 4 x 128 model trains faster without it
(benchmarks/gpt_step.py, benchmarks/results/gpt_step.md; fp32 and generation about the same). On a
GPU it keeps sdpa. The choice is not saved with the weights: the same numbers either way. Dropout is
0 by default: on a CPU the dropout masks (`bernoulli_`) take a large share of a training step
(benchmarks/results/gpt_step.md), and a model this small underfits a corpus of a few MB rather than
overfits it (nanoGPT's CPU recipe uses 0 too); raise it for a tiny corpus, as the quickstart does
(docs/speed.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from aigc.config import TrainConfig, option
from aigc.errors import UserError


@dataclass
class GPTConfig:
    n_layer: int = option(4, "transformer blocks", min=1, max=96)
    n_head: int = option(4, "attention heads per block (must divide n_embd)", min=1, max=128)
    n_embd: int = option(128, "embedding and hidden size", min=1, max=16384)
    n_positions: int = option(256, "largest context the position table holds (>= block_size)", min=2)
    embd_pdrop: float = option(0.0, "dropout on the embeddings", min=0.0, max=0.9)
    attn_pdrop: float = option(0.0, "dropout on the attention weights", min=0.0, max=0.9)
    resid_pdrop: float = option(0.0, "dropout on the residual branches", min=0.0, max=0.9)


@dataclass
class GPTTrainConfig(TrainConfig):
    """TrainConfig with a higher peak learning rate: for the default 4 x 128 model, 3-minute runs on fortunes
    reached a lower bits/char at 3e-3 than at 1e-3 or 2e-3 (docs/speed.md)."""

    lr: float = option(3e-3, "peak learning rate (AdamW)", min=0.0, max=1.0, min_exclusive=True)


def attention_kernel() -> str:
    """transformers' attention implementation for this machine: sdpa on a GPU, eager on a CPU
    (see the module docstring for the measurement)."""
    return "sdpa" if torch.cuda.is_available() else "eager"


def _with_kernel(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    model.set_attn_implementation(attention_kernel())
    return model


def build(config: GPTConfig, vocab_size: int, eot_id: int) -> GPT2LMHeadModel:
    if config.n_embd % config.n_head:
        raise UserError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    hf = GPT2Config(
        vocab_size=vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, embd_pdrop=config.embd_pdrop,
        attn_pdrop=config.attn_pdrop, resid_pdrop=config.resid_pdrop,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(hf)
    model.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    return _with_kernel(model)


def load(directory: Path) -> GPT2LMHeadModel:
    return _with_kernel(GPT2LMHeadModel.from_pretrained(directory, local_files_only=True, use_safetensors=True))


DROPOUTS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")  # not architecture: a fine-tuning run may set them


def load_pretrained(directory: Path, eot_id: int, changes: dict[str, float] | None = None,
                    ids: list[int] | None = None) -> GPT2LMHeadModel:
    """A local GPT-2 checkpoint (a gpt run or any Hugging Face GPT-2 folder) for fine-tuning (`--init-from`), with
    the dropout rates given in `changes` (the checkpoint's for the others) and, with `ids`, the run's own
    vocabulary (`select_embeddings`); never downloads."""
    directory = Path(directory)
    config = directory / "config.json"
    if not config.is_file():
        raise UserError(f"--init-from: {directory} is not a Hugging Face model folder (no config.json)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        if model_type != "gpt2":  # else GPT-2 from another model's config, weights it lacks random
            raise UserError(f"--init-from: {directory} holds a {model_type} model, not GPT-2")
        model = GPT2LMHeadModel.from_pretrained(directory, local_files_only=True, **(changes or {}))
    except (OSError, ValueError) as e:
        raise UserError(f"--init-from: cannot load a GPT-2 model from {directory}: {e}") from None
    if ids is not None:
        select_embeddings(model, ids)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, eot_id)
    model.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    return _with_kernel(model)


def select_embeddings(model: GPT2LMHeadModel, ids: list[int]) -> None:
    """Make row i of the (tied) token embedding the checkpoint's row ids[i]: a fine-tuning run's own vocabulary
    over a checkpoint's (`tokenizer.transfer_ids`)."""
    rows = model.get_input_embeddings().weight.detach()[torch.tensor(ids)].clone()  # (V_new, n_embd)
    model.resize_token_embeddings(len(ids), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(rows)
    model.config.vocab_size = len(ids)
