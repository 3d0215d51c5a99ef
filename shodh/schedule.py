"""Leaf: the one learning-rate schedule, shared by tokenizer training and pretraining.

Linear warmup over `warmup` steps to the peak, then a half cosine from the peak down to
`min_ratio` x peak at step `total`, flat after that. Returned as a factor of the peak lr, so it
plugs into `torch.optim.lr_scheduler.LambdaLR` or scales a param group's lr directly.
"""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Factor of the peak lr at optimizer step `step` (0-based): (step + 1) / warmup during warmup
    (the peak is reached on the last warmup step), then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
