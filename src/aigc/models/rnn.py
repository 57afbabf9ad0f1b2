"""Recurrent language model: embedding -> nn.RNN / nn.GRU / nn.LSTM -> output layer.

The seeds' RNN, LSTM and GRU text generators in one file: `cell` picks the recurrent core. The
model is a transformers `PreTrainedModel` + `GenerationMixin`, so `generate` runs every decoding
strategy (greedy, sampling, beam search, ...) on it exactly as on GPT-2. It keeps no cache:
each generation step re-reads the sequence (`use_cache=False`), which is cheap at poem lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from aigc.config import option

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class RNNConfig:
    cell: str = option("lstm", "recurrent core: rnn (tanh), gru or lstm", choices=tuple(CELLS))
    n_layer: int = option(2, "stacked recurrent layers", min=1, max=16)
    n_hidden: int = option(256, "hidden state size", min=1, max=8192)
    n_embd: int = option(128, "token embedding size", min=1, max=8192)
    dropout: float = option(0.1, "dropout on embeddings, between layers and before the output layer",
                            min=0.0, max=0.9)


class RNNLMConfig(PretrainedConfig):
    """The transformers config stored in a run's config.json."""

    model_type = "aigc_rnn"

    def __init__(self, vocab_size: int = 2, cell: str = "lstm", n_layer: int = 2, n_hidden: int = 256,
                 n_embd: int = 128, dropout: float = 0.1, **kwargs):
        self.vocab_size = vocab_size
        self.cell = cell
        self.n_layer = n_layer
        self.n_hidden = n_hidden
        self.n_embd = n_embd
        self.dropout = dropout
        super().__init__(**kwargs)


class RNNLM(PreTrainedModel, GenerationMixin):
    config_class = RNNLMConfig
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: RNNLMConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        core = CELLS[config.cell]
        inter_layer_dropout = config.dropout if config.n_layer > 1 else 0.0
        self.core = core(config.n_embd, config.n_hidden, config.n_layer, batch_first=True,
                         dropout=inter_layer_dropout)
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Embedding N(0, 0.02) as GPT-2 does; the recurrent core and the output layer keep
        # PyTorch's uniform(-1/sqrt(H), 1/sqrt(H)) initialisation.
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutput:
        # input_ids (B, T) -> logits (B, T, V), or (B, logits_to_keep, V) during generation.
        # Left padding (attention_mask 0) only occurs in batched prompts of equal length here:
        # all rows share one prompt, so the mask is all ones and can be ignored.
        x = self.drop(self.wte(input_ids))  # (B, T, n_embd)
        h, _ = self.core(x)  # (B, T, n_hidden); zero initial state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self.drop(h))  # (B, T', V)
        return CausalLMOutput(logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": 1}


def build(config: RNNConfig, vocab_size: int, eot_id: int) -> RNNLM:
    hf = RNNLMConfig(vocab_size=vocab_size, cell=config.cell, n_layer=config.n_layer,
                     n_hidden=config.n_hidden, n_embd=config.n_embd, dropout=config.dropout,
                     bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    model = RNNLM(hf)
    model.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id,
                                               pad_token_id=eot_id, use_cache=False)
    return model


def load(directory) -> RNNLM:
    return RNNLM.from_pretrained(directory, local_files_only=True)
