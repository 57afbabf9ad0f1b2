"""An exponential moving average of a module's parameters, the weights image families sample with.

    ema <- d * ema + (1 - d) * theta,   d = min(decay, (1 + k) / (10 + k)) at the k-th update

The warm-up of d is TensorFlow's ExponentialMovingAverage(num_updates) and diffusers' EMAModel: the
average forgets the random initialisation within the first steps. The weights are a plain dict of
tensors, not buffers, so the optimizer never sees them and they cost nothing in the forward pass;
a model saves them beside its own weights under a prefix (`ema.<name>`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PREFIX = "ema."


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"EMA decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.updates = 0
        self.weights: dict[str, Tensor] = {k: v.detach().clone() for k, v in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One step of the average towards the module's current parameters."""
        k = self.updates
        decay = min(self.decay, (1 + k) / (10 + k))
        params = dict(module.named_parameters())
        for name, ema in self.on(module).items():
            ema.lerp_(params[name].detach(), 1 - decay)
        self.updates = k + 1

    def on(self, module: nn.Module) -> dict[str, Tensor]:
        """The weights on the module's device and dtype (the module moves, e.g. in accelerate's prepare)."""
        for name, p in module.named_parameters():
            if self.weights[name].device != p.device or self.weights[name].dtype != p.dtype:
                self.weights[name] = self.weights[name].to(p)
        return self.weights

    def tensors(self) -> dict[str, Tensor]:
        """`ema.<name>` -> CPU tensor, for a safetensors file beside the model's own weights."""
        return {PREFIX + k: v.detach().contiguous().cpu() for k, v in self.weights.items()}

    def load(self, state: dict[str, Tensor], updates: int, source: object) -> None:
        """Take the `ema.<name>` tensors out of `state` (a loaded safetensors dict, changed in place)."""
        ema = {k[len(PREFIX):]: state.pop(k) for k in list(state) if k.startswith(PREFIX)}
        if set(ema) != set(self.weights):
            raise ValueError(f"{source}: the EMA weights do not match the model's parameters")
        self.weights, self.updates = ema, updates


def pop_ema(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove and return the `ema.*` tensors of a state dict (for a model saved without EMA)."""
    return {k: state.pop(k) for k in list(state) if k.startswith(PREFIX)}
