"""Learning-rate schedule: optional linear warmup, then optional cosine decay."""

from __future__ import annotations

import math


def lr_at_step(
    step: int,
    base_lr: float,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr: float = 0.0,
    cosine: bool = False,
) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Warmup rises linearly to ``base_lr`` over ``warmup_steps``; with ``cosine`` the rate then
    falls along a half cosine to ``min_lr`` at ``total_steps``. Without either it is constant.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if not cosine or total_steps is None or total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
