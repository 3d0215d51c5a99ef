"""Preemption: SIGUSR1 asks a training run to checkpoint at the next step boundary and exit.

The contract with slurm/*.sbatch (see slurm/common.sh): SLURM sends USR1 to the batch script
some minutes before the time limit (`#SBATCH --signal=B:USR1@300`) or on
`scancel --signal=USR1 --batch JOB`; the script forwards it to every rank. Each rank only sets a
flag in the handler (no I/O in signal context); the training loop calls `requested()` once per
optimizer step, which all-reduces the flags so that every rank stops after the same step (the
checkpoint is collective), saves, and raises `Preempted`. `Preempted` is a SystemExit with status
PREEMPT_EXIT, so `finally` blocks still close the MLflow run and the process exits 75 without a
traceback; the batch script then requeues the job and the restart resumes from `latest`.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPT_EXIT = 75  # EX_TEMPFAIL: "try again later"; slurm/task.sh knows this number
_requested = False


class Preempted(SystemExit):
    def __init__(self, step: int):
        super().__init__(PREEMPT_EXIT)
        self.step = step


def _on_usr1(signum, frame) -> None:
    global _requested
    _requested = True


def install() -> None:
    """Route SIGUSR1 to the flag (main thread only: Python delivers signals there)."""
    global _requested
    _requested = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _on_usr1)


def requested(device: torch.device | None = None) -> bool:
    """True on every rank as soon as any rank got SIGUSR1 (a collective: call it on all ranks)."""
    flag = _requested
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item() > 0)
    return flag
