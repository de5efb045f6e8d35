"""A block-size schedule over block diffusion (LLaDA 2.0's Warmup-Stable-Decay, SPEC §14):
``[(step, block_size), ...]``, the first at step 0, steps increasing; from each step on, training
uses that block size's NELBO (``B = L``: the MDM's loss, ``B = 1``: next-token prediction), up to
the next entry or ``max_steps``. The module's own ``block_size`` is the final objective: its
backbone, its validation NELBO at every evaluation (so curves of different schedules compare point
by point) and its decoding. Every phase is counted at BD3's 2L forward.
"""

from __future__ import annotations

from typing import Any


def parse_schedule(schedule: Any) -> list[tuple[int, int]] | None:
    """``schedule`` as a list of ``(step, block_size)`` pairs, refused (one line) unless the
    first step is 0, steps strictly increase and every size is a positive integer."""
    if schedule is None:
        return None
    try:
        pairs = [(int(s), int(b)) for s, b in schedule]
        exact = all(float(s) == i and float(b) == j for (s, b), (i, j) in zip(schedule, pairs))
    except (TypeError, ValueError):
        exact = False
    if not exact or not pairs:
        raise ValueError(f"block_schedule={schedule!r} must be a non-empty list of [step, block_size] integer pairs")
    steps = [s for s, _ in pairs]
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"block_schedule steps {steps} must start at 0 and strictly increase")
    if any(b < 1 for _, b in pairs):
        raise ValueError(f"block_schedule block sizes {[b for _, b in pairs]} must be positive")
    return pairs


def check_schedule_fits(schedule: list[tuple[int, int]], seq_len: int, max_steps: int | None) -> None:
    """Refuse sizes that do not divide ``seq_len`` and a schedule whose last phase starts at or
    after ``max_steps`` (it would never run)."""
    bad = sorted({b for _, b in schedule if seq_len % b})
    if bad:
        divisors = [d for d in range(1, seq_len + 1) if seq_len % d == 0]
        raise ValueError(f"block_schedule sizes {bad} do not divide seq_len={seq_len}; allowed: {', '.join(map(str, divisors))}")
    if max_steps is not None and max_steps >= 0 and schedule[-1][0] >= max_steps:
        raise ValueError(f"block_schedule's last phase starts at step {schedule[-1][0]}, not before max_steps={max_steps}")


def block_size_at(schedule: list[tuple[int, int]], step: int) -> int:
    """The block size training uses at ``step``."""
    return [b for s, b in schedule if s <= step][-1]
