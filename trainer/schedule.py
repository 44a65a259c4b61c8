"""Learning-rate schedule: a pure function of the number of updates already applied (0 for the first)."""
from __future__ import annotations

import math


def learning_rate(count: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1, schedule: str = "cosine") -> float:
    """Linear warmup to peak_lr over warmup_steps (the first update already gets peak_lr / warmup_steps),
    then cosine (or linear, or constant) decay to min_lr_ratio * peak_lr at total_steps."""
    if count < warmup_steps:
        return peak_lr * (count + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((count - warmup_steps) / decay_steps, 1.0)
    min_lr = peak_lr * min_lr_ratio
    if schedule == "linear":
        return peak_lr - (peak_lr - min_lr) * progress
    if schedule == "cosine":
        return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule must be cosine, linear or constant, got {schedule!r}")
