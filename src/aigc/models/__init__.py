"""The family registry: one plain dict literal, one entry per family.

Exceptions to the gradient-trained contract are declared here (`trainer="counts"` for the n-gram's
closed-form fit, `trainer="fit"` for AR's statsmodels estimate, `series=` for a family that also
takes a numeric series), never discovered with `hasattr`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers.utils import logging as hf_logging

from aigc.config import TrainConfig
from aigc.models import ar, dcgan, diffusion, gpt, ngram, rnn, rnn_series, simvp, vae, vae_rnn

hf_logging.disable_progress_bar()  # no "Loading weights" bars around every save and load


@dataclass(frozen=True)
class Family:
    modality: str  # "text", "image", "series" or "video": decides the data loader, the sample format and the metrics
    config: type  # the family's model config dataclass (keys for --set)
    trainer: str  # "gradient": the shared training loop; "counts", "fit": a closed-form fit
    load: Callable  # load(run_dir) -> model
    build: Callable | None = None  # text: build(config, vocab_size, eot_id); image: build(config, shape, classes);
    #                                series: build(config) -> model.fit(x), or with "gradient":
    #                                build(config, context=, loc=, scale=, history=); video (a predictor):
    #                                build(config, frame_shape, context, future); video (stages):
    #                                build(config, frame_shape, frames, context, num_classes)
    init_from: bool = False  # accepts --init-from: a run of the family to continue from (gpt: any GPT-2 folder too)
    init_keys: tuple[str, ...] = ()  # [model] keys a run continued with --init-from may still set (regularisation);
    #                                  the others are the checkpoint's (its architecture)
    # text families with init_from: load_pretrained(dir, eot_id, changes, ids) -> the checkpoint's model, the
    # `changes` (init_keys) applied, rows ids[i] of its vocabulary as row i of the run's (char tokenizers; None: as is)
    load_pretrained: Callable | None = None
    cpu_bf16: bool = True  # dtype=auto uses bf16 autocast on a CPU that has bf16 (False where it is slower)
    compile_gain: bool = False  # compile=auto compiles the model (torch.compile) where it pays back, see train.py
    after_step: bool = False  # the loop calls model.after_step() after every optimizer step (EMA weights)
    sampler_options: tuple[str, ...] = ()  # image families: generate options beyond the seed and class
    bound_score: bool = False  # image families: the loss is a bound, scored on the whole validation set (-ELBO)
    # alternating optimizer steps: one AdamW per phase over model.phase_parameters(phase); each training
    # step runs the phases in order, the loss of each being model(*batch, phase=phase)["loss"] (GANs)
    phases: tuple[str, ...] = ()
    train_config: type = TrainConfig  # the [train] keys and their defaults (a GAN's differ)
    # trained in stages, one training loop each, in this order (vae-rnn: the per-frame VAE, then the recurrent net
    # on its latents); a video family with stages makes clips and predicts them (modalities/video.py)
    stages: tuple[str, ...] = ()
    series: Family | None = None  # the family's variant for a numeric series (modality "series"), if any
    description: str = ""


FAMILIES: dict[str, Family] = {
    "ngram": Family("text", ngram.NGramConfig, "counts", ngram.NGramLM.load,
                    description="character n-gram, interpolated Kneser-Ney (the baseline)"),
    # cpu_bf16: measured by benchmarks/settings.py (benchmarks/results/dtype.md): the text rnn trains faster under
    # bf16 autocast and reaches a lower bits/char at equal time; the series rnn (tiny batches) is slower
    "rnn": Family("text", rnn.RNNConfig, "gradient", rnn.load, rnn.build, init_from=True, init_keys=("dropout",),
                  load_pretrained=rnn.load_pretrained,
                  series=Family("series", rnn_series.SeriesRNNConfig, "gradient", rnn_series.load,
                                rnn_series.build, cpu_bf16=False,
                                description="RNN/GRU/LSTM predicting the next value's mean and variance"),
                  description="embedding + RNN/GRU/LSTM + output layer"),
    # compile_gain: measured by benchmarks/settings.py --setting compile (benchmarks/results/compile.md): gpt trains
    # more tokens in the same time compiled, compiling included; the rnn and the image families do not
    "gpt": Family("text", gpt.GPTConfig, "gradient", gpt.load, gpt.build, init_from=True, init_keys=gpt.DROPOUTS,
                  load_pretrained=gpt.load_pretrained, compile_gain=True, train_config=gpt.GPTTrainConfig,
                  description="GPT-2 architecture (transformers), from scratch or --init-from"),
    "vae": Family("image", vae.VAEConfig, "gradient", vae.VAE.load, vae.build, init_from=True, init_keys=("beta",),
                  bound_score=True, description="convolutional VAE, optionally class-conditional"),
    "dcgan": Family("image", dcgan.DCGANConfig, "gradient", dcgan.DCGAN.load, dcgan.build, init_from=True,
                    after_step=True, sampler_options=("truncation",), phases=dcgan.PHASES,
                    train_config=dcgan.GANTrainConfig,
                    description="DCGAN, non-saturating or hinge loss, EMA generator, truncation"),
    "diffusion": Family("image", diffusion.DiffusionConfig, "gradient", diffusion.Diffusion.load, diffusion.build,
                        init_from=True, init_keys=("dropout", "cond_drop"), after_step=True,
                        sampler_options=("sampler", "steps", "eta", "guidance_scale"),
                        description="DDPM: diffusers' UNet2DModel and samplers, EMA, classifier-free guidance"),
    # a video predictor; vae and diffusion also make clips (frames as channels) when --data is a clip set
    "simvp": Family("video", simvp.SimVPConfig, "gradient", simvp.SimVP.load, simvp.build, init_from=True,
                    init_keys=("l1", "ssim"),
                    description="SimVP-style video predictor (ours): the next frames from the first ones"),
    # a clip generator and a predictor: a per-frame VAE, then a GRU on its latent sequence (two stages, one run)
    "vae-rnn": Family("video", vae_rnn.VAERNNConfig, "gradient", vae_rnn.VAERNN.load, vae_rnn.build,
                      stages=vae_rnn.STAGES, bound_score=True, sampler_options=("temperature",), init_from=True,
                      init_keys=("beta", "temperature", "vae_share"),
                      description="per-frame VAE + GRU over its latent sequence: makes and predicts clips"),
    "ar": Family("series", ar.ARConfig, "fit", ar.AR.load, ar.build,
                 description="autoregressive AR(p), statsmodels estimate, order by BIC"),
}
