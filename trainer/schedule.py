"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay (WSD) or constant."""

from __future__ import annotations

import math

from trainer.config import ScheduleSection


def lr_at(step: int, total_steps: int, base_lr: float, sched: ScheduleSection) -> float:
    """LR for 0-based optimizer `step` of `total_steps`."""
    if sched.warmup_steps and step < sched.warmup_steps:
        return base_lr * (step + 1) / sched.warmup_steps
    floor = base_lr * sched.min_lr_ratio
    if sched.kind == "constant":
        return base_lr
    if sched.kind == "cosine":
        span = max(1, total_steps - sched.warmup_steps)
        progress = min(1.0, (step - sched.warmup_steps) / span)
        return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable at base_lr, then linear decay to the floor over the last decay_fraction of steps
    decay_steps = max(1, round(total_steps * sched.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return base_lr
    return base_lr + (floor - base_lr) * min(1.0, (step - decay_start + 1) / decay_steps)
