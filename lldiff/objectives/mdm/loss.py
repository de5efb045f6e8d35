"""The MDM's losses (SPEC §2, §3, §6): LLaDA's pre-training loss, its validation bound (a
Monte-Carlo negative ELBO) and its SFT loss (Alg. 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import torch
from torch import Tensor
from lldiff.losses import logits_ce, token_ce
from lldiff.objectives.common.sft_loss import drop_prompts, normalise_sft, response_lengths
from lldiff.objectives.common.masking import forward_mask, sample_mask_ratio



Model = Callable[[Tensor], Tensor]


def weighted_masked_ce(logits: Tensor, x0: Tensor, masked: Tensor, t: Tensor) -> Tensor:
    """Per-sequence ``sum over masked positions of CE(logits, x0) / t``, shape (B,)."""
    return (logits_ce(logits, x0) * masked).sum(dim=1) / t


def masked_ce_over_t(model: Model, xt: Tensor, x0: Tensor, masked: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
    """:func:`weighted_masked_ce` of ``model(xt, **model_kwargs)``, the LM head run on the masked
    positions only (:func:`lldiff.losses.token_ce`), shape (B,)."""
    return token_ce(model, xt, x0, masked, **model_kwargs).sum(dim=1) / t


def mdm_loss(
    model: Model,
    x0: Tensor,
    mask_id: int,
    *,
    eps: float = 1e-3,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """LLaDA pre-training loss: sum of CE/t over masked tokens divided by B * L.

    Its expectation over t and the mask is the negative ELBO per token, an upper bound
    on the NLL per token. ``attn_mask`` (L, L) replaces full attention (a conversion's
    annealing, :mod:`lldiff.objectives.common.annealing`).
    """
    t = sample_mask_ratio(x0.shape[0], eps=eps, stratified=stratified, device=x0.device, generator=generator)
    xt, masked = forward_mask(x0, t, mask_id, generator=generator)
    extra = {} if attn_mask is None else {"attn_mask": attn_mask}
    return masked_ce_over_t(model, xt, x0, masked, t, **extra).sum() / x0.numel()


def mdm_elbo_nats(
    model: Model,
    x0: Tensor,
    mask_id: int,
    *,
    num_samples: int,
    eps: float = 1e-3,
    maskable: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte-Carlo negative ELBO in nats per sequence, shape (B,), averaged over
    ``num_samples`` draws of (t, mask). The ``num_samples`` values of t for each
    sequence are stratified over [eps, 1] (unbiased, lower variance). With ``maskable``
    (B, L) bool only those positions are masked and scored: the bound on
    ``-log p(x0[maskable] | x0[~maskable])`` (an SFT response given its prompt)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    b = x0.shape[0]
    total = torch.zeros(b, device=x0.device)
    offsets = torch.rand(b, device=x0.device, generator=generator)
    for k in range(num_samples):
        t = eps + (1.0 - eps) * ((offsets + k / num_samples) % 1.0)
        xt, masked = forward_mask(x0, t, mask_id, maskable=maskable, generator=generator)
        total += masked_ce_over_t(model, xt, x0, masked, t)
    return total / num_samples


def mdm_sft_loss(
    model: Model,
    tokens: Tensor,
    response: Tensor,
    mask_id: int,
    *,
    normalisation: str = "response_length",
    eps: float = 1e-3,
    prompt_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SFT loss of the masked diffusion model on ``prompt + response`` rows.

    ``response`` (B, L) bool marks the response positions, EOS padding included (the model
    must learn to end). Only those are ever masked (each with probability ``t ~ U[eps, 1]``
    of its row); the prompt stays clean. The CE/t of masked positions is summed per example
    and divided by that example's response length L' then averaged over the batch
    (``response_length``, LLaDA), or summed over the batch and divided by all response
    tokens (``token``, SMDM). ``prompt_dropout`` masks whole prompts of the model's input
    with that probability (classifier-free guidance training, see :func:`drop_prompts`).
    """
    lengths = response_lengths(response, normalisation)
    t = sample_mask_ratio(tokens.shape[0], eps=eps, device=tokens.device, generator=generator)
    xt, masked = forward_mask(tokens, t, mask_id, maskable=response, generator=generator)
    xt = drop_prompts(xt, response, mask_id, prompt_dropout, generator=generator)
    return normalise_sft(masked_ce_over_t(model, xt, tokens, masked, t), lengths, normalisation)
