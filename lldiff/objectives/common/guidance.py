"""Unsupervised classifier-free guidance of the diffusion decoders and scorers (SPEC §4).
"""

from __future__ import annotations

import torch
from torch import Tensor



def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Unsupervised classifier-free guidance: ``u + (w + 1) (c - u)``; ``w = 0`` gives ``c``."""
    return uncond + (scale + 1.0) * (cond - uncond)


def unconditional_input(x: Tensor, prompt_real: Tensor, mask_id: int) -> Tensor:
    """CFG's unconditional canvas: every real prompt token (``prompt_real`` (B, T) bool,
    False on padding and on the generated part) replaced by ``mask_id``."""
    return torch.where(prompt_real, torch.full_like(x, mask_id), x)
