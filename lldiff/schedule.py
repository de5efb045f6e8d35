"""Learning-rate schedule: linear warmup, then cosine decay to a floor at ``max_steps``."""

from __future__ import annotations

import math


def smdm_warmup_steps(max_steps: int) -> int:
    """SMDM's rule: ``max(1% of steps, 100)``, never more than ``max_steps``."""
    return min(max(max_steps // 100, 100), max_steps)


def warmup_cosine(step: int, *, max_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Rises linearly to 1 over ``warmup_steps`` (step ``warmup_steps - 1`` reaches 1), then
    follows a half cosine to ``min_ratio``, reached exactly at ``step == max_steps`` and
    held after it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))
