"""The family registry: one plain dict literal, one entry per family.

Exceptions to the gradient-trained contract are declared here (`trainer="counts"` for the n-gram's
closed-form fit), never discovered with `hasattr`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers.utils import logging as hf_logging

from aigc.models import diffusion, gpt, ngram, rnn, vae

hf_logging.disable_progress_bar()  # no "Loading weights" bars around every save and load


@dataclass(frozen=True)
class Family:
    modality: str  # "text" or "image": decides the data loader, the sample format and the metrics
    config: type  # the family's model config dataclass (keys for --set)
    trainer: str  # "gradient": the shared training loop; "counts": a closed-form fit
    load: Callable  # load(run_dir) -> model
    build: Callable | None = None  # text: build(config, vocab_size, eot_id); image: build(config, shape, classes)
    init_from: bool = False  # accepts --init-from DIR (a pretrained checkpoint)
    cpu_bf16: bool = True  # dtype=auto uses bf16 autocast on a CPU that has bf16 (False where it is slower)
    after_step: bool = False  # the loop calls model.after_step() after every optimizer step (EMA weights)
    sampler_options: tuple[str, ...] = ()  # image families: generate options beyond the seed and class
    description: str = ""


FAMILIES: dict[str, Family] = {
    "ngram": Family("text", ngram.NGramConfig, "counts", ngram.NGramLM.load,
                    description="character n-gram, interpolated Kneser-Ney (the baseline)"),
    # measured: nn.LSTM under CPU bf16 autocast trains ~10x slower than in fp32 (1.1 k vs 12 k tokens/s)
    "rnn": Family("text", rnn.RNNConfig, "gradient", rnn.load, rnn.build, cpu_bf16=False,
                  description="embedding + RNN/GRU/LSTM + output layer"),
    "gpt": Family("text", gpt.GPTConfig, "gradient", gpt.load, gpt.build, init_from=True,
                  description="GPT-2 architecture (transformers), from scratch or --init-from"),
    "vae": Family("image", vae.VAEConfig, "gradient", vae.VAE.load, vae.build,
                  description="convolutional VAE, optionally class-conditional"),
    "diffusion": Family("image", diffusion.DiffusionConfig, "gradient", diffusion.Diffusion.load, diffusion.build,
                        after_step=True, sampler_options=("sampler", "steps", "eta", "guidance_scale"),
                        description="DDPM with a compact UNet, EMA, diffusers samplers, classifier-free guidance"),
}
