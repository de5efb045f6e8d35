"""Pure tensor functions for block diffusion (BD3-LM, Arriola et al. 2025; SPEC §9).

The sequence is cut into blocks of ``block_size`` tokens. Blocks are modelled left to right
(autoregressively); the tokens inside a block by masked diffusion, conditioned on the clean
earlier blocks. ``block_size = L`` is the masked diffusion model of SPEC §2, ``block_size =
1`` is next-token prediction (with the mask token as the query at the predicted position).

Training is vectorised (SPEC §9): one forward on ``[x_t ⊕ x_0]`` (length 2L), both halves with
RoPE positions ``0..L-1``, under the three-part mask of :func:`block_diffusion_mask`; the
logits are read on the ``x_t`` half. The clean half is processed block-causally, so the
prediction of block ``b`` sees exactly what a block-by-block sampler with a KV cache of the
clean blocks ``< b`` sees.

Choices fixed here (SPEC leaves them open):

* ``seq_len`` need not be a multiple of ``block_size``: block ``b`` is the positions ``i`` with
  ``i // block_size == b``, so the last block is shorter. ``block_size >= seq_len`` is a single
  block (the MDM).
* Loss normalisation is that of :func:`lldiff.objectives.mdm_loss`: the sum over masked tokens
  of ``CE / t_block`` divided by ``B * L`` (all positions).
* ``stratified`` ratios use an independent random offset per block, so each block's ``t``
  covers ``[eps, 1]`` evenly across the batch while the blocks of one row stay independent.
* With one block the random draws are consumed in the same order as
  :func:`lldiff.objectives.mdm_loss` / :func:`~lldiff.objectives.mdm_elbo_nats` (ratios, then
  one uniform per token), so the same generator seed gives the same ``t`` and masks.

Like :mod:`lldiff.objectives`, nothing here knows about Lightning. ``model`` is a callable
``model(tokens, positions=..., attn_mask=...) -> logits`` such as a non-causal
:class:`lldiff.model.Transformer` (whose mask id is ``config.mask_id``). For supervised
fine-tuning the pieces compose: :func:`block_forward_mask` takes ``maskable`` (the prompt stays
clean), :func:`bd3_logits` takes per-row block ids and a key padding mask, and
:func:`bd3_weighted_ce` gives per-sequence sums to normalise as the SFT loss wants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lldiff.losses import logits_ce, token_ce
from lldiff.objectives.common.sft_loss import drop_prompts, normalise_sft, response_lengths

BD3Model = Callable[..., Tensor]


def _check_sizes(seq_len: int, block_size: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of blocks, ``ceil(seq_len / block_size)`` (the last one may be shorter)."""
    _check_sizes(seq_len, block_size)
    return -(-seq_len // block_size)


def block_ids(seq_len: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """Block index of every position, ``i // block_size``, shape (L,) (SPEC §9 ``blk(i)``)."""
    _check_sizes(seq_len, block_size)
    return torch.arange(seq_len, device=device) // block_size


def block_diffusion_mask_from_ids(ids: Tensor) -> Tensor:
    """The SPEC §9 attention mask over ``[x_t ⊕ x_0]`` for arbitrary block ids.

    ``ids`` (L,) or (B, L) gives ``blk(i)`` for the positions of one half (non-decreasing
    for a left-to-right block order, e.g. per-row ids that start a new block at an SFT
    response). Returns a bool mask, True where query ``q`` may attend key ``k``, of shape
    (2L, 2L) or (B, 1, 2L, 2L); rows/columns ``0..L-1`` are ``x_t``, ``L..2L-1`` are ``x_0``:

    * ``x_t -> x_t``: block diagonal, ``blk(q) == blk(k)``;
    * ``x_t -> x_0``: offset block-causal, ``blk(q) > blk(k)`` (clean earlier blocks only);
    * ``x_0 -> x_0``: block causal, ``blk(q) >= blk(k)``;
    * ``x_0 -> x_t``: never.
    """
    q, k = ids[..., :, None], ids[..., None, :]
    top = torch.cat([q == k, q > k], dim=-1)
    bottom = torch.cat([torch.zeros_like(top[..., : ids.shape[-1]]), q >= k], dim=-1)
    mask = torch.cat([top, bottom], dim=-2)
    return mask if ids.dim() == 1 else mask[:, None]


def block_diffusion_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (2L, 2L) attention mask of SPEC §9 for sequences of ``seq_len`` tokens in blocks
    of ``block_size`` (the last block shorter when ``seq_len % block_size``); see
    :func:`block_diffusion_mask_from_ids` for the three parts."""
    return block_diffusion_mask_from_ids(block_ids(seq_len, block_size, device))


def sample_block_mask_ratios(
    batch_size: int,
    n_blocks: int,
    eps: float = 1e-3,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Masking ratios ``t ~ U[eps, 1]``, one per (sequence, block), shape (B, n_blocks)
    (SPEC §9: one ``t_b`` per block).

    ``stratified=True`` draws one uniform offset ``u_b`` per block and sets ``t[i, b] = eps +
    (1-eps) * ((u_b + i/B) mod 1)``: every entry keeps the U[eps, 1] marginal (the loss stays
    unbiased), each block's ratios cover [eps, 1] evenly across the batch, and the ratios of
    different blocks of a row are independent (independent offsets). With ``n_blocks = 1``
    this is exactly :func:`lldiff.objectives.sample_mask_ratio` (same draws)."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if batch_size < 1 or n_blocks < 1:
        raise ValueError(f"batch_size and n_blocks must be positive, got {batch_size}, {n_blocks}")
    if stratified:
        u = torch.rand(n_blocks, device=device, generator=generator)
        grid = (u[None, :] + (torch.arange(batch_size, device=device) / batch_size)[:, None]) % 1.0
    else:
        grid = torch.rand(batch_size, n_blocks, device=device, generator=generator)
    return eps + (1.0 - eps) * grid


def token_ratios(t_blocks: Tensor, ids: Tensor) -> Tensor:
    """Per-token ratios (B, L) from per-block ratios (B, n_blocks) and block ids (L,) or (B, L)."""
    if ids.dim() == 1:
        return t_blocks[:, ids]
    return t_blocks.gather(1, ids)


def block_forward_mask(
    x0: Tensor,
    t_blocks: Tensor,
    mask_id: int,
    block_size: int,
    *,
    maskable: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward process of SPEC §9: token ``i`` of block ``b`` becomes ``mask_id`` with
    probability ``t_blocks[:, b]``, independently. ``maskable`` (B, L) bool restricts
    masking (an SFT prompt stays clean). Returns ``(x_t, masked, t_tok)`` with ``t_tok``
    (B, L) the ratio of each token's block."""
    ids = block_ids(x0.shape[1], block_size, x0.device)
    n = num_blocks(x0.shape[1], block_size)
    if t_blocks.shape != (x0.shape[0], n):
        raise ValueError(f"t_blocks must have shape {(x0.shape[0], n)}, got {tuple(t_blocks.shape)}")
    t_tok = token_ratios(t_blocks, ids)
    draws = torch.rand(x0.shape, device=x0.device, generator=generator)
    masked = draws < t_tok
    if maskable is not None:
        masked &= maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, t_tok


def flex_available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ImportError:  # pragma: no cover - torch without torch.nn.attention
        return False


def use_flex_attention(model: BD3Model, device: torch.device) -> bool:
    """FlexAttention for the training mask on CUDA with the SDPA backend (its compiled
    kernels skip the tiles the mask leaves empty); SDPA with a boolean mask elsewhere."""
    config = getattr(model, "cfg", None) or getattr(model, "config", None)
    backend = getattr(config, "attn_backend", "sdpa")
    return device.type == "cuda" and backend == "sdpa" and flex_available()


def block_diffusion_block_mask(ids: Tensor) -> Any:
    """The mask of :func:`block_diffusion_mask_from_ids` as a FlexAttention ``BlockMask``
    (the same rule written as a mask function of (batch, head, query, key))."""
    from torch.nn.attention.flex_attention import create_block_mask

    seq_len = ids.shape[-1]
    per_row = ids.dim() == 2

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        q_noisy, k_noisy = q < seq_len, k < seq_len
        q_pos, k_pos = torch.where(q_noisy, q, q - seq_len), torch.where(k_noisy, k, k - seq_len)
        q_block, k_block = (ids[b, q_pos], ids[b, k_pos]) if per_row else (ids[q_pos], ids[k_pos])
        diagonal = (q_noisy == k_noisy) & (q_block == k_block)
        offset = q_noisy & ~k_noisy & (q_block > k_block)
        clean = ~q_noisy & ~k_noisy & (q_block >= k_block)
        return diagonal | offset | clean

    batch = ids.shape[0] if per_row else None
    return create_block_mask(mask_mod, batch, None, 2 * seq_len, 2 * seq_len, device=ids.device)


def bd3_logits(
    model: BD3Model,
    xt: Tensor,
    x0: Tensor,
    block_size: int | None = None,
    *,
    ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    flex: bool | None = None,
) -> Tensor:
    """One vectorised forward (SPEC §9): the model sees ``[x_t ⊕ x_0]`` (B, 2L) with RoPE
    positions ``0..L-1`` in both halves and the block diffusion mask; returns the logits of
    the ``x_t`` half, (B, L, V). Block ``b``'s logits depend only on ``x_t``'s block ``b``
    and ``x_0``'s blocks ``< b``.

    Give either ``block_size`` or per-position block ids ``ids`` ((L,) or (B, L)).
    ``key_padding_mask`` (B, L), True for real tokens, is applied to both halves and passed
    on as ``attention_mask``. ``flex`` chooses FlexAttention (a ``BlockMask``) over SDPA with
    a boolean mask; None: FlexAttention on CUDA (:func:`use_flex_attention`) without padding."""
    inputs, kwargs = _bd3_call(model, xt, x0, block_size, ids=ids, key_padding_mask=key_padding_mask, flex=flex)
    return model(inputs, **kwargs)[:, : x0.shape[1]]


def _bd3_call(
    model: BD3Model,
    xt: Tensor,
    x0: Tensor,
    block_size: int | None,
    *,
    ids: Tensor | None,
    key_padding_mask: Tensor | None,
    flex: bool | None,
) -> tuple[Tensor, dict[str, Any]]:
    """The input ``[x_t ⊕ x_0]`` and the keyword arguments of :func:`bd3_logits`'s one call."""
    if xt.shape != x0.shape:
        raise ValueError(f"x_t {tuple(xt.shape)} and x_0 {tuple(x0.shape)} must have the same shape")
    seq_len = x0.shape[1]
    if ids is None:
        if block_size is None:
            raise ValueError("give block_size or ids")
        ids = block_ids(seq_len, block_size, x0.device)
    ids = ids.to(x0.device)
    if flex is None:
        flex = key_padding_mask is None and use_flex_attention(model, x0.device)
    mask = block_diffusion_block_mask(ids) if flex else block_diffusion_mask_from_ids(ids)
    positions = torch.arange(seq_len, device=x0.device).repeat(2)
    kwargs: dict[str, Any] = {"positions": positions, "attn_mask": mask}
    if key_padding_mask is not None:
        kwargs["attention_mask"] = torch.cat([key_padding_mask, key_padding_mask], dim=1)
    return torch.cat([xt, x0], dim=1), kwargs


def bd3_weighted_ce(logits: Tensor, x0: Tensor, masked: Tensor, t_tok: Tensor) -> Tensor:
    """Per-sequence ``sum over masked tokens of CE(logits, x0) / t_block``, shape (B,)
    (SPEC §9). Unmasked tokens contribute exactly zero (also when their ratio is 0)."""
    return _over_ratios(logits_ce(logits, x0) * masked, t_tok)


def _over_ratios(ce: Tensor, t_tok: Tensor) -> Tensor:
    """Per-sequence sum of ``ce / t_tok`` (``ce`` already 0 at unmasked tokens)."""
    return (ce / t_tok.clamp_min(torch.finfo(torch.float32).tiny)).sum(dim=1)


def bd3_masked_ce(
    model: BD3Model,
    xt: Tensor,
    x0: Tensor,
    masked: Tensor,
    t_tok: Tensor,
    block_size: int | None = None,
    *,
    ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    flex: bool | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """:func:`bd3_weighted_ce` of :func:`bd3_logits`, shape (B,), with the LM head run on the
    masked positions of the ``x_t`` half only (:func:`lldiff.losses.token_ce`; the clean half's
    states are never read out). ``targets`` (default ``x0``): the tokens scored, when the
    context half differs from them (an SFT prompt dropped for classifier-free guidance)."""
    inputs, kwargs = _bd3_call(model, xt, x0, block_size, ids=ids, key_padding_mask=key_padding_mask, flex=flex)
    return _over_ratios(token_ce(model, inputs, x0 if targets is None else targets, masked, **kwargs), t_tok)


def bd3_loss(
    model: BD3Model,
    x0: Tensor,
    mask_id: int,
    block_size: int,
    *,
    eps: float = 1e-3,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Block diffusion training loss (SPEC §9): ``sum_b sum_{i in b, masked} CE_i / t_b``
    divided by ``B * L``, from one forward on ``[x_t ⊕ x_0]``.

    Its expectation over the ratios and masks is the negative ELBO per token, an upper bound
    on the NLL per token. ``block_size = L`` is :func:`lldiff.objectives.mdm_loss` (the same
    seed draws the same ``t`` and masks)."""
    b, seq_len = x0.shape
    t = sample_block_mask_ratios(
        b, num_blocks(seq_len, block_size), eps, stratified, generator, device=x0.device
    )
    xt, masked, t_tok = block_forward_mask(x0, t, mask_id, block_size, generator=generator)
    return bd3_masked_ce(model, xt, x0, masked, t_tok, block_size).sum() / x0.numel()


def bd3_nelbo_nats(
    model: BD3Model,
    x0: Tensor,
    mask_id: int,
    block_size: int,
    *,
    num_samples: int,
    eps: float = 1e-3,
    maskable: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte-Carlo negative ELBO in nats per sequence, shape (B,), averaged over
    ``num_samples`` draws of (ratios, masks) (SPEC §9, validation metric as in §6).

    For every (sequence, block) the ``num_samples`` ratios are stratified over [eps, 1]
    (one random offset, evenly spaced: unbiased, lower variance), as
    :func:`lldiff.objectives.mdm_elbo_nats` does per sequence. With ``maskable`` (B, L) bool
    only those positions are masked and scored: the bound on ``-log p(x0[maskable] |
    x0[~maskable])`` (an SFT response given its prompt). Divide by the number of scored
    tokens for nats per token."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    b, seq_len = x0.shape
    offsets = torch.rand(b, num_blocks(seq_len, block_size), device=x0.device, generator=generator)
    total = torch.zeros(b, device=x0.device)
    for k in range(num_samples):
        t = eps + (1.0 - eps) * ((offsets + k / num_samples) % 1.0)
        xt, masked, t_tok = block_forward_mask(x0, t, mask_id, block_size, maskable=maskable, generator=generator)
        total += bd3_masked_ce(model, xt, x0, masked, t_tok, block_size)
    return total / num_samples


def bd3_sft_loss(
    model: BD3Model,
    tokens: Tensor,
    response: Tensor,
    mask_id: int,
    block_size: int,
    *,
    normalisation: str = "response_length",
    eps: float = 1e-3,
    prompt_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SFT loss of the block diffusion model (SPEC §9) on ``prompt + response`` rows.

    Blocks are those of pre-training (position ``i`` in block ``i // block_size``, from the
    row's start), so a block may hold the prompt's end and the response's start. One ratio
    ``t_b ~ U[eps, 1]`` per (row, block); only ``response`` positions (EOS padding included)
    are ever masked, the prompt stays clean in ``x_t`` and is the clean context in ``x_0``.
    One forward on ``[x_t ⊕ x_0]`` (:func:`lldiff.bd3_logits`); the
    per-example sum of ``CE / t_b`` over masked tokens is normalised as
    :func:`lldiff.objectives.mdm_sft_loss` does (``response_length``: per example by its
    response length, then the batch mean; ``token``: by all response tokens).
    ``prompt_dropout`` replaces a whole prompt by mask tokens in both halves (the clean half
    is the context a sampler conditions on), for classifier-free guidance.

    With one block (``block_size >= L``) the random draws, the masks and the loss are those
    of :func:`lldiff.objectives.mdm_sft_loss` with the same generator."""
    if tokens.shape != response.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and response {tuple(response.shape)} must have the same shape")
    lengths = response_lengths(response, normalisation)
    batch, seq_len = tokens.shape
    t = sample_block_mask_ratios(batch, num_blocks(seq_len, block_size), eps,
                                                 generator=generator, device=tokens.device)
    xt, masked, t_tok = block_forward_mask(tokens, t, mask_id, block_size, maskable=response,
                                                           generator=generator)
    # one draw per row (as in mdm_sft_loss); a dropped prompt is masked in both halves
    both = drop_prompts(torch.cat([xt, tokens], dim=1), torch.cat([response, response], dim=1), mask_id,
                                   prompt_dropout, generator=generator)
    per_example = bd3_masked_ce(model, both[:, :seq_len], both[:, seq_len:], masked, t_tok, block_size,
                                targets=tokens)
    return normalise_sft(per_example, lengths, normalisation)
