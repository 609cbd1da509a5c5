"""Learning-rate schedules: a pure function of the step, so the schedule has no state to save beyond it.

Step s (0-based, the s-th optimizer update of `total` steps) uses
    warmup     peak * (s + 1) / warmup_steps                          for s < warmup_steps
    cosine     floor + (peak - floor) * (1 + cos(pi * t)) / 2,  t = (s - warmup) / (total - warmup)
    wsd        peak until the last `decay_fraction` of the steps, then linearly down to floor at the last step
    constant   peak
with floor = peak * min_lr_ratio.
"""

from __future__ import annotations

import math

from kmodel.config import TrainConfig


def lr_at(step: int, train: TrainConfig, total_steps: int) -> float:
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    warmup = min(train.warmup_steps, total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if train.schedule == "constant":
        return peak
    if train.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    # wsd: warmup, stable, then a linear decay over the final decay_fraction of all steps
    decay_steps = max(1, round(train.decay_fraction * total_steps))
    decay_start = max(warmup, total_steps - decay_steps)
    if step < decay_start:
        return peak
    done = (step - decay_start + 1) / max(1, total_steps - decay_start)
    return peak + (floor - peak) * min(done, 1.0)
