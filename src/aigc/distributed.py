"""Several processes (torchrun): the main process alone writes the run; the others learn its results.

Under `torchrun --nproc_per_node N -m aigc train ...` every process runs the same command. Each
one resolves the same configuration, data, tokenizer and initial model (all set by the seed; DDP
also copies the main process's weights to the others when training starts) and trains on its
share of every batch (train.train_loop). The main process (global rank 0) alone claims and writes
the run directory, logs, checkpoints and scores the result; `on_main` hands the others what it
returned (the run directory's path, the final metrics) or the error that stopped it, so that no
process waits for one that failed. With one process these are plain calls. See docs/runs.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from aigc.errors import UserError

T = TypeVar("T")
WAIT = timedelta(hours=2)  # how long a process waits for the others (the main process scores a run alone)


def world_size() -> int:
    """The number of processes the launcher started (torchrun sets WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Global rank 0 (torchrun sets RANK), or the only process. Needs no process group, so a
    process may ask before the group exists (an error message printed by the main process alone)."""
    return os.environ.get("RANK", "0") == "0"


def check_gpus(local_processes: int, gpus: int) -> None:
    """NCCL runs one process per GPU: more processes on a machine than it has GPUs is an error
    (NCCL's own is 'Duplicate GPU detected'), with the two ways out."""
    if gpus and local_processes > gpus:
        raise UserError(f"{local_processes} processes on this machine but {gpus} GPU(s): NCCL needs one GPU per "
                        f"process; use --nproc_per_node {gpus}, or train on the CPU with CUDA_VISIBLE_DEVICES=")


def init_processes():
    """The process group (gloo on CPU, NCCL on GPU), made once per process: train_loop's Accelerator
    reuses it. Only under a launcher (world_size() > 1)."""
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", world_size())), torch.cuda.device_count())
    return PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)


def on_main(fn: Callable[..., T], *args) -> T:
    """fn(*args) on the main process only; every process returns its result, or raises its error
    (a UserError as itself, anything else as a RuntimeError that names it). All processes must call
    it at the same point: it is a collective operation."""
    if world_size() == 1:
        return fn(*args)
    from accelerate.utils import broadcast_object_list

    init_processes()
    message: list = [None, None, None]  # result, error kind, error text
    error = None
    if is_main_process():
        try:
            message[0] = fn(*args)
        except BaseException as e:  # the others must learn of it, or they wait for ever
            error = e
            message[1:] = ["UserError" if isinstance(e, UserError) else type(e).__name__, str(e)]
    broadcast_object_list(message, from_process=0)
    if error is not None:
        raise error
    if message[1] == "UserError":
        raise UserError(message[2])
    if message[1] is not None:
        raise RuntimeError(f"the main process stopped: {message[1]}: {message[2]}")
    return message[0]


def end_processes() -> None:
    """Under a launcher, at the end of a command that succeeded: wait for every process, then close
    the process group, so that no process exits while another still talks to it."""
    if world_size() == 1:
        return
    state = init_processes()
    state.wait_for_everyone()
    state.destroy_process_group()
