"""Remasking rules of the diffusion decoders (SPEC §4): how many tokens each step reveals,
Gumbel-max sampling, and which positions are revealed (low confidence or random).
"""

from __future__ import annotations

import torch
from torch import Tensor

REMASKING = ("low_confidence", "random")  # the reverse process's rules: which positions a step reveals
DECODER_REMASKING = (*REMASKING, "threshold")  # a decoder's `remasking` option: also Fast-dLLM's threshold


def reveal_counts(num_masked: Tensor, steps: int) -> Tensor:
    """Tokens to reveal per step, shape (B, steps), for rows with ``num_masked`` (B,) masks.

    Each step reveals ``m // steps``; the first ``m % steps`` steps reveal one more
    (front-loaded, as LLaDA's ``get_num_transfer_tokens``). Rows sum to ``m``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = num_masked.to(torch.long).reshape(-1, 1)
    if (m < 0).any():
        raise ValueError(f"num_masked must be >= 0, got {num_masked.tolist()}")
    base = m // steps
    remainder = m % steps
    extra = torch.arange(steps, device=m.device)[None, :] < remainder
    return base + extra.long()


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Gumbel-max perturbation: ``argmax`` of the result samples ``softmax(logits / τ)``.

    ``τ = 0`` returns ``logits`` unchanged (greedy). Otherwise returns float64
    ``logits / τ - log(-log u)`` with ``u ~ U(0, 1)`` clamped away from 0 and 1, which is
    the log of LLaDA's ``exp(logits) / (-log u)^τ`` up to the factor ``1/τ`` (same argmax)
    without ever exponentiating the logits. ``-inf`` logits stay ``-inf``.
    """
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    eps = torch.finfo(torch.float64).eps
    u = u.clamp(min=eps, max=1.0 - eps)
    return logits / temperature - torch.log(-torch.log(u))


def select_top_k(confidence: Tensor, k: Tensor) -> Tensor:
    """Boolean (B, T) marking the ``k[b]`` highest-confidence positions of each row."""
    k_max = int(k.max().item()) if k.numel() else 0
    selected = torch.zeros_like(confidence, dtype=torch.bool)
    if k_max == 0:
        return selected
    index = torch.topk(confidence, k=k_max, dim=-1).indices
    keep = torch.arange(k_max, device=confidence.device)[None, :] < k[:, None]
    return selected.scatter_(1, index, keep)
