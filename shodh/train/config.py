"""Pretraining configuration (section `train`), free of torch/DeepSpeed imports so loading a config is cheap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shodh.errors import check


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    micro_batch: int = 4  # samples per rank per forward
    grad_accum: int = 1  # micro batches per optimizer step
    global_batch: int = 0  # 0: derived (micro_batch * grad_accum * world); else checked against it
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.05  # matrices only; norms, biases and position tables are not decayed
    ds_config: str = ""  # ds_configs/*.json path; empty: zero2_gpu_bf16.json on CUDA, zero2_cpu_fp32.json else
    tokenizer_id: str = ""  # empty: the `id` in ROOT/tokenizer/tokenizer.json
    log_every: int = 10  # train/* and perf/* metrics
    route_every: int = 50  # route/* metrics (also at every validation)
    val_every: int = 100  # val/<domain>/latent_mse (also at the end)
    val_batches: int = 0  # per rank per validation; 0 = the whole val split
    val_micro_batch: int = 8
    ckpt_every: int = 100  # also at the end
    # auto: everything, same world/ep layout; weights: model only, into any layout; elastic: everything,
    # into any valid layout (shodh.train.reshard converts the checkpoint first when the layout differs)
    resume: Literal["auto", "weights", "elastic"] = "auto"
    keep_global_batch: bool = False  # elastic resume: derive grad_accum so micro x accum x world stays the same
    max_bad_steps: int = 5  # stop once this many of the last `bad_window` steps were non-finite (skipped)
    bad_window: int = 50  # steps over which skipped steps are counted (a streak of max_bad_steps counts too)
    trust_checkpoint: bool = False  # resume from / evaluate a checkpoint without shodh's sha256 manifest
    peak_flops: float = 0.0  # per device, FLOP/s, for perf/mfu; 0 = measure a dense matmul at startup

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch", "grad_accum", "log_every", "route_every", "val_every",
                     "ckpt_every", "max_bad_steps", "val_micro_batch"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.global_batch >= 0, "global_batch", f"must be >= 0, got {self.global_batch}")
        check(self.global_batch == 0 or self.global_batch % (self.micro_batch * self.grad_accum) == 0,
              "global_batch", f"must be a multiple of micro_batch * grad_accum = "
              f"{self.micro_batch * self.grad_accum}, got {self.global_batch}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.val_batches >= 0, "val_batches", f"must be >= 0, got {self.val_batches}")
        check(self.peak_flops >= 0, "peak_flops", f"must be >= 0, got {self.peak_flops}")
        check(self.bad_window >= self.max_bad_steps, "bad_window",
              f"must be >= train.max_bad_steps={self.max_bad_steps}, got {self.bad_window}")
