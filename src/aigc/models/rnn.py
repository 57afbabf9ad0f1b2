"""Recurrent language model: embedding -> nn.RNN / nn.GRU / nn.LSTM -> output layer.

The seeds' RNN, LSTM and GRU text generators in one file: `cell` picks the recurrent core. The
model is a transformers `PreTrainedModel` + `GenerationMixin`, so `generate` runs every decoding
strategy (greedy, sampling, beam search, ...) on it exactly as on GPT-2. Its cache is the
recurrent state (as transformers' RWKV keeps it, under the name `state`): the first generation step
reads the prompt, every later one reads one token and the state, so a step costs the same at any
length; beam search reorders the state with the beams (`_reorder_cache`). transformers >= 5.24
carries only a cache named `cache` from one step to the next (`state` is a deprecated name there),
so the model carries its state itself (`_update_model_kwargs_for_generation`, as RWKV does); that
works on every transformers version we support (4.50 and later).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from aigc.config import option
from aigc.errors import UserError

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


@dataclass
class RNNLMOutput(ModelOutput):
    """logits (B, T, V); state: the recurrent state after the last token, a tuple of (n_layer, B, n_hidden)
    tensors (h for rnn and gru, h and c for lstm), returned when use_cache; hidden_states: `(x, h)`, as
    transformers orders them: the embeddings (B, T, n_embd) and the last layer's outputs (B, T, n_hidden) at every
    position (all T, whatever logits_to_keep) before the output layer's dropout, returned when
    output_hidden_states (left padded rows: zeros at the pad positions)."""

    logits: torch.Tensor | None = None
    state: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


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

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the recurrent state, not transformers' key/value cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                state: tuple[torch.Tensor, ...] | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, output_hidden_states: bool | None = None, **kwargs) -> RNNLMOutput:
        # input_ids (B, T) -> logits (B, T, V), or (B, logits_to_keep, V) during generation; with
        # `state` (from the previous call) the sequence continues from it, else from a zero state.
        # Left padding (attention_mask 0 before a row's first token, as batched prompts of different lengths
        # have): each such row starts from the zero state at its first real token; its pad positions'
        # logits are zeros.
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if state is None and attention_mask is not None and not bool(attention_mask.all()):
            return self._forward_left_padded(input_ids, attention_mask, use_cache, logits_to_keep,
                                             output_hidden_states)
        x = self.drop(self.wte(input_ids))  # (B, T, n_embd)
        if state is not None and self.config.cell != "lstm":
            (state,) = state
        h, last = self.core(x, state)  # (B, T, n_hidden)
        hidden_states = (x, h) if output_hidden_states else None
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self.drop(h))  # (B, T', V)
        if not use_cache:
            return RNNLMOutput(logits=logits, hidden_states=hidden_states)
        return RNNLMOutput(logits=logits, state=last if isinstance(last, tuple) else (last,),
                           hidden_states=hidden_states)

    def _forward_left_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool | None,
                             logits_to_keep: int, output_hidden_states: bool) -> RNNLMOutput:
        """Row by row over each row's unpadded tokens (what it would read alone), then stacked."""
        outs = []
        for row, keep in zip(input_ids, attention_mask.bool(), strict=True):
            outs.append(self.forward(row[keep][None], use_cache=True, output_hidden_states=output_hidden_states))
        length = input_ids.shape[1]
        logits = input_ids.new_zeros((len(outs), length, self.config.vocab_size), dtype=outs[0].logits.dtype)
        for b, out in enumerate(outs):
            logits[b, length - out.logits.shape[1]:] = out.logits[0]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        hidden_states = None
        if output_hidden_states:
            hidden_states = []
            for i, width in enumerate((self.config.n_embd, self.config.n_hidden)):
                h = input_ids.new_zeros((len(outs), length, width), dtype=outs[0].logits.dtype)
                for b, out in enumerate(outs):
                    h[b, length - out.hidden_states[i].shape[1]:] = out.hidden_states[i][0]
                hidden_states.append(h)
            hidden_states = tuple(hidden_states)
        if not use_cache:
            return RNNLMOutput(logits=logits, hidden_states=hidden_states)
        state = tuple(torch.cat([out.state[i] for out in outs], dim=1) for i in range(len(outs[0].state)))
        return RNNLMOutput(logits=logits, state=state, hidden_states=hidden_states)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, state=None,
                                      use_cache: bool | None = None, **kwargs) -> dict:
        if state is not None:  # the state holds everything before the last token
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "state": state,
                "use_cache": use_cache, "logits_to_keep": 1}

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        """The recurrent state goes on to the next step, whatever cache names transformers forwards."""
        if outputs.get("state") is not None:
            model_kwargs["state"] = outputs["state"]
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def _reorder_cache(self, state: tuple[torch.Tensor, ...], beam_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Beam search: the state of the beams kept, in their new order (batch is dimension 1)."""
        return tuple(s.index_select(1, beam_idx.to(s.device)) for s in state)


def build(config: RNNConfig, vocab_size: int, eot_id: int) -> RNNLM:
    hf = RNNLMConfig(vocab_size=vocab_size, cell=config.cell, n_layer=config.n_layer,
                     n_hidden=config.n_hidden, n_embd=config.n_embd, dropout=config.dropout,
                     bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    model = RNNLM(hf)
    model.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id,
                                               pad_token_id=eot_id, use_cache=True)
    return model


def load(directory) -> RNNLM:
    model = RNNLM.from_pretrained(directory, local_files_only=True)
    model.generation_config.use_cache = True  # runs saved before the state cache recorded False
    return model


def load_pretrained(directory: Path, eot_id: int, changes: dict[str, float] | None = None,
                    ids: list[int] | None = None) -> RNNLM:
    """An rnn run's weights for a run continued from them (`--init-from`), with the dropout given in `changes` (the
    checkpoint's otherwise) and, with `ids`, the run's own vocabulary (`select_embeddings`)."""
    directory = Path(directory)
    config = directory / "config.json"
    if not config.is_file():
        raise UserError(f"--init-from: {directory} is not an rnn model folder (no config.json)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        if model_type != RNNLMConfig.model_type:  # else an RNN from another model's config, its weights random
            raise UserError(f"--init-from: {directory} holds a {model_type} model, not an rnn")
        model = RNNLM.from_pretrained(directory, local_files_only=True, **(changes or {}))
    except (OSError, ValueError) as e:
        raise UserError(f"--init-from: cannot load an rnn model from {directory}: {e}") from None
    if ids is not None:
        select_embeddings(model, ids)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, eot_id)
    model.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
                                               use_cache=True)
    return model


def select_embeddings(model: RNNLM, ids: list[int]) -> None:
    """Make row i of the token embedding and of the output layer (weights and bias) the checkpoint's row ids[i]:
    a continued run's own vocabulary over a checkpoint's (`tokenizer.transfer_ids`)."""
    index = torch.tensor(ids)
    wte, lm_head = nn.Embedding(len(ids), model.config.n_embd), nn.Linear(model.config.n_hidden, len(ids))
    with torch.no_grad():
        wte.weight.copy_(model.wte.weight[index])  # (V_new, n_embd)
        lm_head.weight.copy_(model.lm_head.weight[index])  # (V_new, n_hidden)
        lm_head.bias.copy_(model.lm_head.bias[index])  # (V_new,)
    model.wte, model.lm_head = wte, lm_head
    model.config.vocab_size = len(ids)
