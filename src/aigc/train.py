"""The one training loop for gradient-trained families, on accelerate.

AdamW with linear warm-up and cosine decay, gradient clipping and accumulation, bf16 autocast
where the hardware has it, torch.compile where it pays (`resolve_compile`), periodic evaluation
with keep-best, atomic checkpoints, and exact resume: batches come from a seeded generator whose
state is checkpointed with the model, the optimizer and the RNGs (CPU and CUDA: noise and
dropout), so an interrupted and resumed run ends with the same weights as an uninterrupted one
(in fp32).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin
from tqdm.auto import tqdm

from aigc.checkpoint import find_checkpoint, load_optimizer_state, save_checkpoint, save_model_files
from aigc.config import TrainConfig
from aigc.distributed import init_processes, is_main_process, world_size
from aigc.errors import Interrupted
from aigc.fsutil import read_json

LN2 = math.log(2)


@dataclass
class Budget:
    max_steps: int | None  # stop after this many optimizer steps
    max_minutes: float | None  # stop after this much training time (the schedule length is estimated)


def bf16_available() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(choice: str, cpu_bf16: bool = True) -> str:
    """auto: bf16 autocast where the hardware has it and, on a CPU, where the family gains from it."""
    if choice == "auto":
        if not torch.cuda.is_available() and not cpu_bf16:
            return "fp32"
        return "bf16" if bf16_available() else "fp32"
    return choice


_COMPILE_PROBES: dict[tuple, str | None] = {}


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot run on `device` here; None when it can. Inductor builds
    C++ kernels on a CPU (a compiler and Python's headers) and Triton kernels on a GPU: a tiny
    function is compiled once per process to find out (seconds the first time on a machine, then
    from inductor's cache)."""
    from torch._inductor import config as inductor_config

    key = (device.type, str(inductor_config.cpp.cxx), inductor_config.force_disable_caches)
    if key not in _COMPILE_PROBES:
        _COMPILE_PROBES[key] = _probe_compile(device)
    return _COMPILE_PROBES[key]


def _probe_compile(device: torch.device) -> str | None:
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
    elif device.type == "cpu":
        try:
            from torch._inductor import cpp_builder

            cpp_builder.get_cpp_compiler()  # runs `$CXX --version` (g++ by default); raises without one
        except Exception as e:  # no compiler, or a torch whose private inductor API moved
            return f"no C++ compiler for inductor (install g++ or set CXX): {type(e).__name__}"
    else:
        return f"not supported on {device.type}"
    # a new code object per probe: dynamo would reuse the code it compiled for an earlier probe
    namespace: dict = {}
    exec("def probe(x):\n    return torch.relu(2 * x + 1).sum()\n", {"torch": torch}, namespace)
    try:
        torch.compile(namespace["probe"], backend="inductor", fullgraph=True)(torch.ones(16, device=device))
    except Exception as e:  # e.g. no Python headers (Debian: python3-dev), a broken compiler
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"torch.compile failed on a test function: {type(e).__name__}: {first_line[:200]}"
    return None


MIN_COMPILE_MINUTES, MIN_COMPILE_STEPS = 2.0, 1000  # compile=auto: budgets that pay back compiling


def resolve_compile(choice: str, gains: bool, budget: Budget) -> bool:
    """auto: compile the families that gain from it (`Family.compile_gain`, measured) when the budget
    is long enough to pay back the compiling (seconds for gpt on a CPU): at least MIN_COMPILE_MINUTES
    and MIN_COMPILE_STEPS, where given."""
    if choice != "auto":
        return choice == "true"
    return gains and (budget.max_minutes is None or budget.max_minutes >= MIN_COMPILE_MINUTES) and (
        budget.max_steps is None or budget.max_steps >= MIN_COMPILE_STEPS)


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats: the contract every text family's forward meets."""
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def stream_nll(model, ids: np.ndarray, block_size: int, batch_size: int = 16) -> tuple[float, int]:
    """Total NLL (nats) of ids[1:] given what precedes, with a sliding context of block_size.

    Windows advance by half a block, so every scored token (after the first window) sees at
    least block_size/2 tokens of context.
    """
    was_training = model.training
    model.eval()
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids_t)
    stride = max(1, block_size // 2)
    windows = []  # (context start, first scored target index, end)
    start = 1
    while start < n:
        end = min(n, start + (stride if start > 1 else block_size))
        windows.append((max(0, end - 1 - block_size), start, end))
        start = end
    total = 0.0
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
    progress = tqdm(total=n - 1, unit="tok", desc="scoring", leave=False, disable=not sys.stderr.isatty())
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        width = max(e - 1 - c for c, _, e in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (c, s, e) in enumerate(group):
            x[row, : e - 1 - c] = ids_t[c:e - 1]
            # targets ids[c+1:e]; only those at index >= s are scored
            tgt = ids_t[c + 1:e].clone()
            tgt[: s - c - 1] = -100
            y[row, : e - 1 - c] = tgt
        logits = model(input_ids=x.to(device)).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100,
                                 reduction="sum").item()
        progress.update(sum(e - s for _, s, e in group))
    progress.close()
    model.train(was_training)
    return total, n - 1


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def _window_batch(data: torch.Tensor, starts: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = starts[:, None] + torch.arange(block + 1)[None, :]  # (B, block+1)
    chunk = data[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def val_windows(val: torch.Tensor, block_size: int, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Fixed, evenly spaced (x, y) windows of a validation token stream: at most n_batches of `batch` each."""
    if len(val) < block_size + 2:  # tiny validation split: one shorter window
        return [(val[None, :-1], val[None, 1:])]
    starts = torch.linspace(0, len(val) - block_size - 2, n_batches * batch).long()
    return [_window_batch(val, starts[i:i + batch], block_size) for i in range(0, len(starts), batch)]


@runtime_checkable
class Batches(Protocol):
    """What `train_loop` trains on, one implementation per modality: TextBatches, ImageBatches and the
    series modality's SeriesBatches. A batch is a tuple of tensors whose first dimension is the batch."""

    unit: str  # what the rate counts ("tokens", "images", "values"): the loop reports f"{unit}_per_s"
    items_per_sample: int  # units in one sample (a text window: block_size tokens; an image: 1)

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        """n training samples, drawn from `generator` alone (its state is checkpointed: exact resume)."""

    def val_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        """The fixed validation batches: at most n_batches, of at most `batch` samples each."""

    def noise(self, model, n: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The noise the loss draws for n samples ({name: tensor of first dimension n}, sliced like the
        batch), from the global RNG; None where the loss draws none."""

    def loss(self, model, batch: tuple[torch.Tensor, ...], *, phase: str | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The scalar objective of `batch`, through the model's forward (a DDP-wrapped model syncs
        gradients there). `phase`: the family's declared phase being trained, None without phases;
        `noise`: this batch's rows of what `noise` drew, None where it draws none."""

    def val_metrics(self, val_loss: float) -> dict:
        """Metrics derived from the mean validation loss, logged beside it (text: val_bpc)."""


class TextBatches:
    """Training batches for text: random windows of block_size + 1 tokens; fixed, evenly spaced
    validation windows. Every batch is a tuple of tensors whose first dimension is the batch."""

    unit = "tokens"

    def __init__(self, train_ids: np.ndarray, val_ids: np.ndarray, block_size: int, chars_per_val_token: float = 1.0,
                 token_dropout: float = 0.0, unk_id: int | None = None):
        if len(train_ids) < block_size + 2:
            raise ValueError(f"training split has {len(train_ids)} tokens, fewer than block_size + 2 "
                             f"({block_size + 2}); lower block_size")
        self.train = torch.as_tensor(np.asarray(train_ids).astype(np.int64))
        self.val = torch.as_tensor(np.asarray(val_ids).astype(np.int64))
        self.block_size = block_size
        self.items_per_sample = block_size  # tokens per sequence, for the rate
        self.chars_per_val_token = chars_per_val_token
        if token_dropout and unk_id is None:
            raise ValueError("token_dropout needs a vocabulary with <unk> (the char tokenizer)")
        self.token_dropout, self.unk_id = token_dropout, unk_id

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        starts = torch.randint(0, len(self.train) - self.block_size - 1, (n,), generator=generator)
        x, y = _window_batch(self.train, starts, self.block_size)
        if self.token_dropout:  # inputs only: every target is still the real next token
            x = x.masked_fill(torch.rand(x.shape, generator=generator) < self.token_dropout, self.unk_id)
        return x, y

    def val_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        return val_windows(self.val, self.block_size, n_batches, batch)

    def noise(self, model, n: int, device: torch.device) -> None:
        return None  # the loss draws no noise (dropout aside)

    def loss(self, model, batch: tuple[torch.Tensor, ...], *, phase: str | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return lm_loss(model, *batch)  # text families declare no phases and draw no noise

    def val_metrics(self, val_loss: float) -> dict:
        return {"val_bpc": val_loss / LN2 / self.chars_per_val_token}


class ImageBatches:
    """Training batches for images: random draws (with optional horizontal flips) of (x, y) or (x,);
    the validation set in fixed order. The family's forward returns {"loss": ...}: the objective."""

    unit = "images"
    items_per_sample = 1

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor | None, x_val: torch.Tensor,
                 y_val: torch.Tensor | None, hflip: bool = False):
        self.x_train, self.y_train, self.x_val, self.y_val = x_train, y_train, x_val, y_val
        self.hflip = hflip

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(0, len(self.x_train), (n,), generator=generator)
        x = self.x_train[idx]
        if self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return (x,) if self.y_train is None else (x, self.y_train[idx])

    def val_batches(self, n_batches: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        out = []
        for i in range(0, min(len(self.x_val), n_batches * batch), batch):
            x = self.x_val[i:i + batch]
            out.append((x,) if self.y_val is None else (x, self.y_val[i:i + batch]))
        return out

    def noise(self, model, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The noise the family's loss draws for n images (diffusion: t and eps; VAE: eps; GAN: z),
        from the global RNG: the loop draws it for the whole global batch and slices it like the batch."""
        return model.draw_noise(n, device=device)

    def loss(self, model, batch: tuple[torch.Tensor, ...], *, phase: str | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        # forward, not .loss: a DDP-wrapped model syncs gradients in forward
        kwargs = {} if phase is None else {"phase": phase}
        return model(*batch, noise=noise, **kwargs)["loss"]

    def val_metrics(self, val_loss: float) -> dict:
        return {}


class _StopFlag:
    """First Ctrl-C: finish the step, save, exit. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        # signal handlers can only be installed from the main thread (a server runs training elsewhere)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases and norm scales)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def make_optimizers(model, cfg: TrainConfig, phases: tuple[str, ...]) -> dict[str, torch.optim.AdamW]:
    """{"model": optimizer}, or one optimizer per declared phase over `model.phase_parameters(phase)`."""
    if phases:
        return {phase: make_optimizer(model.phase_parameters(phase), cfg) for phase in phases}
    return {"model": make_optimizer(list(model.parameters()), cfg)}


@dataclass
class TrainState:
    """What the training loop carries from step to step."""

    dtype: str  # "bf16" (autocast) or "fp32"
    compiled: bool  # the training forward and backward run under torch.compile
    data_gen: torch.Generator  # draws every training batch (Batches.sample)
    total_steps: int  # the schedule's length: the step budget, else an estimate under a time budget
    estimated: bool  # total_steps is settled: False under a time budget until the first estimate
    step: int = 0  # optimizer steps taken
    elapsed: float = 0.0  # seconds in training steps (not evaluating or saving), by the main process's clock
    best_val: float = math.inf  # the lowest periodic validation loss (without keep_best: the last one)
    best_step: int = -1  # the step of the weights in the run root; -1 before any are saved
    # the fields above are checkpointed (state.json); those below restart with the process
    last_loss: float = math.nan  # the last step's training loss (a GAN: its first phase's)
    elapsed_at_2: float = 0.0  # elapsed after step 2: the first steps are slow (allocation, warm-up), not timed
    window_start: float = 0.0  # perf_counter() when the rate's window began
    window_steps: int = 0  # steps since window_start


def unwrapped(accelerator: Accelerator, model) -> torch.nn.Module:
    """The family's own module: without DDP and without torch.compile's wrapper."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _cuda_devices(accelerator: Accelerator) -> list[torch.device]:
    # on a GPU, noise and dropout draw from its RNG: forked and checkpointed with the CPU's
    return [accelerator.device] if accelerator.device.type == "cuda" else []


def _to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in batch)


def make_accelerator(cfg: TrainConfig, budget: Budget, run_dir: Path, *, resume: bool, cpu_bf16: bool,
                     compile_gain: bool, phases: tuple[str, ...]) -> tuple[Accelerator, str, bool]:
    """The run's Accelerator, its dtype, and whether training runs compiled (resolved, and probed)."""
    dtype = resolve_dtype(cfg.dtype, cpu_bf16)
    # a phase leaves the other phases' parameters without gradients, which DDP must be told
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if phases else []
    if world_size() > 1:
        init_processes()  # before the Accelerator, which would make the group with a shorter timeout
    # accelerate keeps one AcceleratorState per process: a process that trains again (a benchmark, a
    # server) with another dtype must reset it; the process group (PartialState) stays
    AcceleratorState._reset_state()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compiled = resolve_compile(cfg.compile, compile_gain, budget)
    if resume and cfg.compile == "auto":  # as the run started: the compiled and eager sums differ in rounding
        compiled = bool(read_json(find_checkpoint(run_dir) / "state.json").get("compiled", False))
    if compiled and (why := compile_unavailable(device)):
        compiled = False
        if is_main_process():
            print(f"{'warning' if cfg.compile == 'true' else 'note'}: compile={cfg.compile} cannot compile here, "
                  f"training runs eager: {why}", file=sys.stderr)
    # the training forward and backward run compiled; evaluation, sampling and saving use the plain
    # module (`unwrapped`), so evaluation compiles no second graph and saved names stay plain
    accelerator = Accelerator(cpu=device.type == "cpu", kwargs_handlers=ddp,
                              mixed_precision="bf16" if dtype == "bf16" else "no",
                              dynamo_plugin=TorchDynamoPlugin(backend="inductor" if compiled else "no"))
    return accelerator, dtype, compiled


def restore(state: TrainState, run_dir: Path, optimizers: dict[str, torch.optim.Optimizer], budget: Budget,
            accelerator: Accelerator) -> None:
    """Resume from checkpoints/last: the optimizer states, the counters and schedule into `state`, the
    RNGs (batches, CPU, CUDA); the log lines written after the checkpoint are dropped."""
    ckpt = find_checkpoint(run_dir)
    saved_state = read_json(ckpt / "state.json")
    saved = load_optimizer_state(ckpt)
    if set(saved) != set(optimizers):
        raise ValueError(f"{ckpt}: optimizer states {sorted(saved)} do not match this family's "
                         f"{sorted(optimizers)}")
    for key, optimizer in optimizers.items():
        optimizer.load_state_dict(saved[key])
    state.step, state.elapsed = saved_state["step"], saved_state["elapsed_s"]
    best_val = saved_state["best_val_loss"]
    state.best_val = math.inf if best_val is None else best_val  # JSON has no infinity: stored as null
    state.best_step = saved_state["best_step"]
    state.total_steps, state.estimated = saved_state["total_steps"], saved_state["schedule_estimated"]
    if budget.max_steps and not saved_state["schedule_estimated"] and budget.max_steps != saved_state["total_steps"]:
        state.total_steps = budget.max_steps
    state.data_gen.set_state(torch.tensor(saved_state["data_rng"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(saved_state["torch_rng"], dtype=torch.uint8))
    if saved_state.get("cuda_rng") and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(saved_state["cuda_rng"], dtype=torch.uint8), accelerator.device)
    if accelerator.is_main_process:
        _truncate_metrics(run_dir / "metrics.jsonl", state.step)


def train_step(accelerator: Accelerator, model, optimizers: dict[str, torch.optim.Optimizer], data: Batches,
               batch: tuple[torch.Tensor, ...], lr: float, cfg: TrainConfig,
               phases: tuple[str, ...]) -> dict[str, float]:
    """One step of every optimizer (a GAN: one per phase, in order) on this process's slice of the
    global `batch`, in cfg.grad_accum micro-batches; {optimizer name: mean loss of the slice}."""
    micro = cfg.batch_size // (cfg.grad_accum * accelerator.num_processes)
    first = accelerator.process_index * micro * cfg.grad_accum  # every process draws the global batch: its slice
    losses = {}
    for key, optimizer in optimizers.items():
        phase = key if phases else None
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.zero_grad(set_to_none=True)  # a phase also leaves gradients on the other's parameters
        # the noise of the global batch, drawn alike by every process: an image's noise does not
        # depend on how the batch is split (across processes, or into accumulation steps)
        noise = data.noise(unwrapped(accelerator, model), cfg.batch_size, accelerator.device)
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            rows = slice(first + k * micro, first + (k + 1) * micro)
            part = tuple(t[rows] for t in batch)
            part_noise = None if noise is None else {name: t[rows] for name, t in noise.items()}
            # gradients are averaged across processes once per step, after the last micro-batch
            last = k == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss = data.loss(model, _to_device(part, accelerator.device), phase=phase, noise=part_noise)
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss.item() / cfg.grad_accum
        if cfg.grad_clip > 0:
            params = model.parameters() if phase is None else unwrapped(accelerator, model).phase_parameters(phase)
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses[key] = loss_sum
    model.zero_grad(set_to_none=True)
    return losses


def eval_loss(accelerator: Accelerator, model, data: Batches, val_batches: list[tuple[torch.Tensor, ...]],
              seed: int, phase: str | None) -> float:
    """The mean loss of the validation batches (a GAN: the `phase` loss), on the plain model."""
    # the same noise at every evaluation (families draw noise in their losses), and the training
    # RNG untouched: when evaluations happen does not change the weights (exact resume)
    # (the main process alone, on the unwrapped model: no collective operations)
    net = unwrapped(accelerator, model)
    net.eval()
    with torch.random.fork_rng(devices=_cuda_devices(accelerator)), torch.no_grad(), accelerator.autocast():
        torch.manual_seed(seed)
        losses = [data.loss(net, _to_device(batch, accelerator.device), phase=phase).item() for batch in val_batches]
    net.train()
    return float(np.mean(losses))


def save_state(run_dir: Path, accelerator: Accelerator, model, optimizers: dict[str, torch.optim.Optimizer],
               state: TrainState, cfg: TrainConfig) -> None:
    """Write checkpoints/last: the plain model, the optimizers, and state.json with the RNGs as they are now."""
    cuda = bool(_cuda_devices(accelerator))
    save_checkpoint(run_dir, unwrapped(accelerator, model), optimizers, {
        "step": state.step, "elapsed_s": state.elapsed, "best_val_loss": state.best_val, "best_step": state.best_step,
        "total_steps": state.total_steps, "schedule_estimated": state.estimated, "dtype": state.dtype,
        "compiled": state.compiled, "data_rng": state.data_gen.get_state().tolist(),
        "torch_rng": torch.get_rng_state().tolist(),
        "cuda_rng": torch.cuda.get_rng_state(accelerator.device).tolist() if cuda else None,
        "train_config": asdict(cfg)})


def _agree(accelerator: Accelerator, elapsed: float, losses: dict[str, float],
           requested: bool) -> tuple[float, dict[str, float], bool]:
    """Several processes: the main process's clock (so the time budget and the schedule estimate
    agree), the mean loss over the global batch, and a Ctrl-C seen by any of them."""
    world = accelerator.num_processes
    if world == 1:
        return elapsed, losses, requested
    values = torch.tensor([elapsed if accelerator.is_main_process else 0.0, float(requested),
                           *(v / world for v in losses.values())], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum").tolist()
    return values[0], dict(zip(losses, values[2:], strict=True)), values[1] > 0


def _check_finite(losses: dict[str, float], step: int) -> None:
    for key, value in losses.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss{'' if key == 'model' else ' of the ' + key} "
                                     f"became {value} at step {step}; lower lr")


def _estimate_schedule(state: TrainState, budget: Budget, cfg: TrainConfig) -> bool:
    """Time budget: schedule length = steps that fit in the budget at the rate seen so far, first
    after warm-up, then refined at every evaluation (the rate settles later). True when it estimated."""
    if state.step == 2:
        state.elapsed_at_2 = state.elapsed
    first_estimate = max(5, min(cfg.warmup_steps, 20))
    if budget.max_minutes is None or not ((not state.estimated and state.step >= first_estimate)
                                          or (state.step > first_estimate and state.step % cfg.eval_interval == 0)):
        return False
    seconds_per_step = (state.elapsed - state.elapsed_at_2) / (state.step - 2)
    fit = state.step + int((budget.max_minutes * 60 - state.elapsed) / seconds_per_step)
    state.total_steps = min(budget.max_steps, fit) if budget.max_steps else max(state.step + 1, fit)
    state.estimated = True
    return True


def _budget_spent(state: TrainState, budget: Budget) -> bool:
    return (budget.max_steps is not None and state.step >= budget.max_steps) or (
        budget.max_minutes is not None and state.elapsed >= budget.max_minutes * 60)


def _goal(state: TrainState, budget: Budget) -> int | None:
    """The step the run stops at, as shown: a step budget's, else the time budget's estimate."""
    if budget.max_minutes is None:
        return budget.max_steps
    return state.total_steps if state.total_steps < 10**9 else None


def _report(bar: tqdm, state: TrainState, budget: Budget, val_loss: float) -> None:
    if not bar.disable:
        bar.write(f"step {state.step}: loss {state.last_loss:.4f}, val_loss {val_loss:.4f}")
    else:
        print(f"step {state.step}/{_goal(state, budget) or '?'}: loss {state.last_loss:.4f}, "
              f"val_loss {val_loss:.4f}, {state.elapsed:.0f}s", file=sys.stderr)


def _log(accelerator: Accelerator, run_dir: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train_loop(model, data: Batches, cfg: TrainConfig, run_dir: Path, budget: Budget, *,
               resume: bool = False, cpu_bf16: bool = True, compile_gain: bool = False,
               on_eval: Callable | None = None,
               after_step: bool = False, phases: tuple[str, ...] = ()) -> dict:
    """Train `model` in place on `data`; the run root ends holding the best weights.

    `data` gives training batches, validation batches and the loss (see Batches). On resume
    the caller passes the model loaded from checkpoints/last; the optimizer, schedule and RNG
    states are restored here. `on_eval(model, step)` runs on the main process after each
    evaluation (image runs save a sample grid there). With `after_step` (declared by the family)
    the loop calls `model.after_step()` after every optimizer step, e.g. to update EMA weights.
    With `phases` (declared by the family, e.g. a GAN's ("discriminator", "generator")) every phase
    has its own optimizer over `model.phase_parameters(phase)`, and a training step runs the phases
    in order: clear all gradients, accumulate that phase's loss, clip and step its optimizer. Its
    validation loss is the first phase's. Returns the final training metrics.

    Several processes (torchrun; gloo on CPU, NCCL on GPU): cfg.batch_size stays the global batch.
    Every process draws the same global batch (and the noise its loss needs, see ImageBatches.noise)
    and trains on its own slice; DDP averages the gradients, so N processes take the same steps as
    one. The main process alone evaluates, logs and writes; the processes agree on its clock, the
    global batch's loss and a Ctrl-C after every step, so they stop together (docs/runs.md).
    """
    run_dir = Path(run_dir)
    accelerator, dtype, compiled = make_accelerator(cfg, budget, run_dir, resume=resume, cpu_bf16=cpu_bf16,
                                                    compile_gain=compile_gain, phases=phases)
    world, main = accelerator.num_processes, accelerator.is_main_process
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum x processes "
                         f"({cfg.grad_accum} x {world})")
    torch.manual_seed(cfg.seed)
    optimizers = make_optimizers(model, cfg, phases)
    # a time budget's schedule length is estimated after warm-up (10**9 until then)
    state = TrainState(dtype, compiled, torch.Generator().manual_seed(cfg.seed),
                       total_steps=budget.max_steps or 10**9, estimated=budget.max_minutes is None)
    if resume:
        restore(state, run_dir, optimizers, budget, accelerator)
    model, *prepared = accelerator.prepare(model, *optimizers.values())
    optimizers = dict(zip(optimizers, prepared, strict=True))
    # the batches of one process: the same whatever the number of processes (validation loss, keep-best)
    val_batches = data.val_batches(cfg.eval_batches, cfg.batch_size // cfg.grad_accum)
    items_per_step, rate_key = cfg.batch_size * data.items_per_sample, f"{data.unit}_per_s"

    bar = tqdm(total=_goal(state, budget), initial=state.step, unit="step",
               disable=not (sys.stderr.isatty() and main), dynamic_ncols=True)
    model.train()
    state.window_start = time.perf_counter()
    with _StopFlag() as stop:
        while not _budget_spent(state, budget):
            # 1. one step, timed; the processes agree on the clock, the loss and a Ctrl-C
            t0 = time.perf_counter()
            lr = lr_at(state.step, cfg, state.total_steps)
            batch = data.sample(state.data_gen, cfg.batch_size)
            losses = train_step(accelerator, model, optimizers, data, batch, lr, cfg, phases)
            if after_step:
                unwrapped(accelerator, model).after_step()
            state.step += 1
            state.elapsed, losses, stopping = _agree(accelerator, state.elapsed + time.perf_counter() - t0, losses,
                                                     stop.requested)
            state.window_steps += 1
            state.last_loss = losses[next(iter(optimizers))]  # a GAN: the discriminator's loss
            _check_finite(losses, state.step)
            if _estimate_schedule(state, budget, cfg):
                bar.total = _goal(state, budget)
                _log(accelerator, run_dir, {"step": state.step, "schedule_steps": state.total_steps})

            # 2. log
            bar.update(1)
            if state.step % cfg.log_interval == 0:
                rate = state.window_steps * items_per_step / (time.perf_counter() - state.window_start)
                state.window_start, state.window_steps = time.perf_counter(), 0
                bar.set_postfix(loss=f"{state.last_loss:.3f}", **{f"{data.unit}/s": f"{rate:,.0f}"})
                extra = {f"loss_{k}": v for k, v in losses.items()} if phases else {}
                _log(accelerator, run_dir, {"step": state.step, "loss": state.last_loss, **extra, "lr": lr,
                                            rate_key: rate, "elapsed_s": state.elapsed})

            # 3. evaluate, keep the best weights and checkpoint (the main process); the others wait
            done = _budget_spent(state, budget)
            if state.step % cfg.eval_interval == 0 or done:
                if main:
                    val_loss = eval_loss(accelerator, model, data, val_batches, cfg.seed, phases[0] if phases else None)
                    _log(accelerator, run_dir, {"step": state.step, "val_loss": val_loss, **data.val_metrics(val_loss)})
                    _report(bar, state, budget, val_loss)
                    if val_loss < state.best_val or not cfg.keep_best:
                        # without keep_best the run keeps the last weights: report their loss
                        state.best_val = min(val_loss, state.best_val) if cfg.keep_best else val_loss
                        state.best_step = state.step
                        save_model_files(unwrapped(accelerator, model), run_dir)
                    save_state(run_dir, accelerator, model, optimizers, state, cfg)
                    if on_eval is not None:
                        # forked: the training RNG stays the same as the other processes'
                        with torch.random.fork_rng(devices=_cuda_devices(accelerator)):
                            on_eval(unwrapped(accelerator, model), state.step)
                        model.train()
                accelerator.wait_for_everyone()

            # 4. Ctrl-C (seen by any process): save and stop; at the end of the budget the run just ends
            if stopping and not done:
                if main:
                    save_state(run_dir, accelerator, model, optimizers, state, cfg)
                accelerator.wait_for_everyone()  # a process that exits first would make torchrun stop the rest
                bar.close()
                raise Interrupted(state.step)
    bar.close()
    if state.best_step < 0 and main:  # resumed at the end, or no evaluation ran
        save_model_files(unwrapped(accelerator, model), run_dir)
        state.best_step = state.step
    return {"steps": state.step, "train_loss": state.last_loss, "best_step": state.best_step,
            "best_val_loss_periodic": state.best_val, "schedule_steps": state.total_steps,
            "train_time_s": state.elapsed, "dtype": dtype, "compiled": compiled,
            rate_key: state.step * items_per_step / state.elapsed if state.elapsed else math.nan}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop the log lines written after the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
