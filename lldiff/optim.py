"""Optimizer and learning-rate schedule: AdamW, linear warmup, cosine to a floor at ``max_steps``."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


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


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """AdamW's fused kernel (one pass over each tensor: measured 1.7-2.8x faster steps on a
    2-core CPU for tiny-0.004M .. tiny-1M, the same update to float rounding) for plain
    floating-point tensors on the CPU or a CUDA device; FSDP2's sharded DTensors keep the
    default implementation."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(
        not isinstance(p, DTensor) and p.is_floating_point()
        and p.device.type in ("cpu", "cuda") for p in params
    )


def build_optimizer(
    model: torch.nn.Module,
    *,
    max_steps: int,
    lr: float,
    min_lr_ratio: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int | None = None,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW (decay on matrices, not on norm gains; fused where :func:`fused_adamw_supported`)
    and a per-step warmup-cosine schedule whose floor ``lr * min_lr_ratio`` is reached exactly
    at ``max_steps``."""
    if max_steps is None or max_steps <= 0:
        raise ValueError(f"max_steps={max_steps}: the cosine schedule ends at max_steps, so set a positive value")
    warmup = smdm_warmup_steps(max_steps) if warmup_steps is None else warmup_steps
    if not 0 <= warmup <= max_steps:
        raise ValueError(f"warmup_steps={warmup} must be in [0, max_steps={max_steps}]")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused_adamw_supported(params))
    # The fused kernel can unscale fp16 gradients itself, and says so; Lightning then refuses
    # gradient clipping under *any* mixed precision, bf16 included (which has no scaler at all),
    # because the clip would see scaled gradients. lldiff clips, so the optimizer declines:
    # under 16-mixed the GradScaler unscales before the clip and calls the plain step, under
    # bf16-mixed nothing reads the flag.
    optimizer._step_supports_amp_scaling = False
    schedule = LambdaLR(
        optimizer,
        partial(warmup_cosine, max_steps=max_steps, warmup_steps=warmup, min_ratio=min_lr_ratio),
    )
    return optimizer, schedule
