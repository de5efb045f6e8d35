"""The forward process the masked objectives share (SPEC §2): masking ratios, masks, and the
random-length batches every objective trains on (SPEC §2, 1% of steps).

Pure tensor functions: no Lightning, files or configs.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
from torch import Tensor



Model = Callable[[Tensor], Tensor]


def sample_mask_ratio(
    batch_size: int,
    *,
    eps: float = 1e-3,
    stratified: bool = False,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Masking ratios ``t ~ U[eps, 1]``, one per sequence, shape (B,).

    ``stratified=True`` draws one uniform offset ``u`` and sets ``t_i = eps + (1-eps) *
    ((u + i/B) mod 1)``: every t still has the U[eps, 1] marginal (the loss stays
    unbiased) but the batch covers [eps, 1] evenly, which lowers the loss variance.
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if stratified:
        u = torch.rand(1, device=device, generator=generator)
        grid = (u + torch.arange(batch_size, device=device) / batch_size) % 1.0
    else:
        grid = torch.rand(batch_size, device=device, generator=generator)
    return eps + (1.0 - eps) * grid


def forward_mask(
    x0: Tensor,
    t: Tensor,
    mask_id: int,
    *,
    maskable: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward process q(x_t | x_0): each token independently becomes ``mask_id`` with
    probability ``t`` of its row (LLaDA Alg. 1). ``maskable`` (B, L) bool restricts
    masking (e.g. response tokens only in SFT). Returns ``(x_t, masked)``."""
    draws = torch.rand(x0.shape, device=x0.device, generator=generator)
    masked = draws < t[:, None]
    if maskable is not None:
        masked &= maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def draw_random_length(
    seq_len: int, prob: float, *, generator: torch.Generator | None = None
) -> int:
    """With probability ``prob`` a length uniform on {1, ..., seq_len}; else ``seq_len``."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"random length probability must be in [0, 1], got {prob}")
    coin, uniform = torch.rand(2, generator=generator).tolist()
    if coin < prob:
        return 1 + min(int(uniform * seq_len), seq_len - 1)
    return seq_len


def random_length_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s random length: a fixed function of (data seed, step), so
    every objective's runs truncate the same steps to the same lengths (same tokens, same compute)."""
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + step) % 2**63)


def expected_length(seq_len: int, prob: float) -> float:
    """Average training length with random-length batches: ``L(1-p) + p(1+L)/2``."""
    return seq_len * (1.0 - prob) + prob * (1 + seq_len) / 2
