"""Pure tensor functions for the pre-training objectives (SPEC §2).

Nothing here knows about Lightning: the functions take tensors (and, for the losses, a
callable model) and return tensors, so tests can check them against the math directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lldiff.losses import logits_ce, token_ce

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


def weighted_masked_ce(logits: Tensor, x0: Tensor, masked: Tensor, t: Tensor) -> Tensor:
    """Per-sequence ``sum over masked positions of CE(logits, x0) / t``, shape (B,)."""
    return (logits_ce(logits, x0) * masked).sum(dim=1) / t


def masked_ce_over_t(model: Model, xt: Tensor, x0: Tensor, masked: Tensor, t: Tensor) -> Tensor:
    """:func:`weighted_masked_ce` of ``model(xt)``, the LM head run on the masked positions
    only (:func:`lldiff.losses.token_ce`), shape (B,)."""
    return token_ce(model, xt, x0, masked).sum(dim=1) / t


def mdm_loss(
    model: Model,
    x0: Tensor,
    mask_id: int,
    *,
    eps: float = 1e-3,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """LLaDA pre-training loss: sum of CE/t over masked tokens divided by B * L.

    Its expectation over t and the mask is the negative ELBO per token, an upper bound
    on the NLL per token.
    """
    t = sample_mask_ratio(x0.shape[0], eps=eps, stratified=stratified, device=x0.device, generator=generator)
    xt, masked = forward_mask(x0, t, mask_id, generator=generator)
    return masked_ce_over_t(model, xt, x0, masked, t).sum() / x0.numel()


def ar_nll(model: Model, tokens: Tensor) -> Tensor:
    """Per-token next-token NLL, shape (B, L-1): tokens[:, 1:] given their prefixes."""
    return token_ce(model, tokens[:, :-1], tokens[:, 1:])


def ar_loss(model: Model, tokens: Tensor) -> Tensor:
    """Ordinary next-token cross-entropy, mean over predicted tokens."""
    return ar_nll(model, tokens).mean()


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


def expected_length(seq_len: int, prob: float) -> float:
    """Average training length with random-length batches: ``L(1-p) + p(1+L)/2``."""
    return seq_len * (1.0 - prob) + prob * (1 + seq_len) / 2


# -- supervised fine-tuning (LLaDA Alg. 2) ----------------------------------------------------
SFT_NORMALISATIONS = ("response_length", "token")


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


def ar_sft_loss(model: Model, tokens: Tensor, response: Tensor) -> Tensor:
    """Next-token CE on response tokens only (prompt tokens are context, never targets),
    averaged over all response tokens of the batch."""
    targets = response[:, 1:]
    if not bool(targets.any()):
        raise ValueError("no response tokens to predict")
    return token_ce(model, tokens[:, :-1], tokens[:, 1:], targets).sum() / targets.sum()


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
