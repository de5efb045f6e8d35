"""What the SFT losses share (SPEC §3): normalisation by response length or by token, and
prompt dropout for classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor



# -- supervised fine-tuning (LLaDA Alg. 2) ----------------------------------------------------
SFT_NORMALISATIONS = ("response_length", "token")


def response_lengths(response: Tensor, normalisation: str) -> Tensor:
    """Each example's response length (B,), after checking the normalisation name and that
    every example has a response token (what every diffusion SFT loss needs first)."""
    if normalisation not in SFT_NORMALISATIONS:
        raise ValueError(f"normalisation={normalisation!r}; allowed: {', '.join(SFT_NORMALISATIONS)}")
    lengths = response.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("every example needs at least one response token")
    return lengths


def normalise_sft(per_example: Tensor, lengths: Tensor, normalisation: str) -> Tensor:
    """``response_length`` (LLaDA): each example's sum by its response length, then the batch
    mean; ``token`` (SMDM): the batch's sum by all its response tokens."""
    if normalisation == "response_length":
        return (per_example / lengths).mean()
    return per_example.sum() / lengths.sum()


def drop_prompts(
    tokens: Tensor, response: Tensor, mask_id: int, prob: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Classifier-free-guidance training: each example's prompt (every non-response
    position) becomes ``mask_id`` with probability ``prob``, so the model also learns the
    unconditional distribution that ``cfg_scale`` sampling contrasts with."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prompt dropout probability must be in [0, 1], got {prob}")
    if prob == 0.0:
        return tokens
    dropped = torch.rand(tokens.shape[0], device=tokens.device, generator=generator) < prob
    return torch.where(dropped[:, None] & ~response, torch.full_like(tokens, mask_id), tokens)
