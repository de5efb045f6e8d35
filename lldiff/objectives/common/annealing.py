"""Attention-mask annealing (DiffuLLaMA, SPEC §14): a conversion from an AR opens the causal
mask to full attention over its first ``anneal_steps`` steps. At step ``s`` a fraction
``p = min(1, s / anneal_steps)`` of the future keys is visible: every (query i, key j > i) pair is
opened independently with probability ``p`` (one draw per step, shared by the batch, from a
generator seeded by the run's seed and the step, so a resumed run draws the same masks). Past
keys and the query itself stay visible. ``p = 0`` is causal attention, ``p = 1`` bidirectional;
validation always uses the final (bidirectional) attention.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_anneal_steps(anneal_steps: int) -> None:
    if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
        raise ValueError(f"anneal_steps must be an integer >= 0 (0: no annealing), got {anneal_steps!r}")


def opened_fraction(step: int, anneal_steps: int) -> float:
    """The fraction of future keys visible at ``step`` (1 once annealing is over or off)."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


def annealed_mask(length: int, opened: float, *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """Boolean (L, L), True where query i may attend key j: ``j <= i`` always, ``j > i`` with
    probability ``opened`` (``u_ij < opened``, u uniform on [0, 1))."""
    if not 0.0 <= opened <= 1.0:
        raise ValueError(f"opened must be in [0, 1], got {opened}")
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    u = torch.rand(length, length, generator=generator, device=generator.device if generator else device)
    return causal | (u.to(causal.device) < opened)


def step_mask(length: int, step: int, anneal_steps: int, seed: int, device: torch.device) -> Tensor | None:
    """This training step's mask, or None once the attention is fully open (the plain forward)."""
    opened = opened_fraction(step, anneal_steps)
    if opened >= 1.0:
        return None
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
    return annealed_mask(length, opened, generator=generator).to(device)
