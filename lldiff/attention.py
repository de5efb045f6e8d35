"""Scaled dot-product attention with interchangeable backends.

All backends take ``q (B, H, T, hd)``, ``k, v (B, Hkv, S, hd)`` with ``T <= S`` and return
``(B, H, T, hd)``. Causality is bottom-right aligned (query ``i`` sits at absolute
position ``S - T + i``), so the same call serves full sequences and KV-cache decoding.
``key_padding_mask (B, S)`` is True for real tokens. A query row that may attend to no
key at all (a left-padding position under a causal mask) is allowed to attend to every
key so that its (discarded) output stays finite; every backend applies the same rule.

An optional boolean ``attn_mask`` (True = may attend), of shape ``(T, S)`` or
``(B|1, H|1, T, S)``, replaces the causal/bidirectional choice (``causal`` is then
ignored) and is combined with ``key_padding_mask`` by AND; block diffusion (SPEC §9) uses
it for its ``[x_t ⊕ x_0]`` mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _explicit_mask(attn_mask: Tensor, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """Check a user mask (bool, ``(T, S)`` or ``(B|1, H|1, T, S)``) and make it 4-D."""
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a boolean tensor (True = may attend), got dtype {attn_mask.dtype}")
    if attn_mask.dim() == 2:
        attn_mask = attn_mask[None, None]
    elif attn_mask.dim() != 4:
        raise ValueError(f"attn_mask must have shape (T, S) or (B, 1, T, S), got {tuple(attn_mask.shape)}")
    if tuple(attn_mask.shape[-2:]) != (q_len, kv_len):
        raise ValueError(
            f"attn_mask covers {tuple(attn_mask.shape[-2:])} (queries, keys) but attention has "
            f"{q_len} queries and {kv_len} keys"
        )
    return attn_mask.to(device)


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device,
    attn_mask: Tensor | None = None,
) -> Tensor | None:
    """Boolean mask ``(B|1, 1|H, T, S)``, True where a query may attend; None if all may.

    ``attn_mask`` (bool, ``(T, S)`` or ``(B|1, H|1, T, S)``), when given, replaces the
    causal/bidirectional choice and is ANDed with ``key_padding_mask``."""
    if attn_mask is None and not causal and key_padding_mask is None:
        return None
    allowed = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if attn_mask is not None:
        allowed = _explicit_mask(attn_mask, q_len, kv_len, device)
    elif causal:
        offset = kv_len - q_len
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(offset)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    return allowed | empty_rows


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Plain softmax(q k^T / sqrt(d)) v in float32: the ground truth for tests."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                          attn_mask=attn_mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def is_block_mask(mask: object) -> bool:
    """Whether ``mask`` is a FlexAttention ``BlockMask`` (a mask function plus the tiles it
    leaves fully masked) rather than a boolean tensor."""
    return type(mask).__name__ == "BlockMask"


_COMPILED_FLEX = None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: object, key_padding_mask: Tensor | None) -> Tensor:
    """FlexAttention with a ``BlockMask``: compiled on CUDA (its kernels skip the tiles the
    mask leaves empty, e.g. half of block diffusion's ``[x_t ⊕ x_0]`` mask), eager elsewhere
    (the reference: correct forward, slow; tests compare it with SDPA on the CPU)."""
    if key_padding_mask is not None:
        raise ValueError("a FlexAttention BlockMask carries the whole mask: give padding inside its mask function, "
                         "or a boolean attn_mask with key_padding_mask")
    global _COMPILED_FLEX
    import warnings

    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex, dynamic=False)
        return _COMPILED_FLEX(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    with warnings.catch_warnings():  # eager FlexAttention says it is for debugging: here it is the reference
        warnings.filterwarnings("ignore", ".*flex_attention called without torch.compile.*")
        return flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """PyTorch ``scaled_dot_product_attention`` (flash / memory-efficient / math kernels);
    a FlexAttention ``BlockMask`` as ``attn_mask`` goes to :func:`flex_attention`."""
    if is_block_mask(attn_mask):
        return flex_attention(q, k, v, attn_mask, key_padding_mask)
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None and key_padding_mask is None and (not causal or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                          attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def xformers_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """xformers ``memory_efficient_attention`` (CUDA only; install the ``gpu`` extra).

    Any mask (causal, padding, or an explicit ``attn_mask``) goes in as a dense additive
    bias ``(B, H, T, S)``, the same path for all three."""
    if not q.is_cuda:
        raise RuntimeError(
            "attn_backend='xformers' needs CUDA tensors (xformers has no CPU kernels); "
            "use attn_backend='sdpa' on CPU"
        )
    try:
        import xformers.ops as xops
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "attn_backend='xformers' but xformers is not installed; `pip install lldiff[gpu]` "
            "or use attn_backend='sdpa'"
        ) from err
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # xformers wants (B, T, H, hd)
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                          attn_mask=attn_mask)
    bias = None
    if mask is not None:
        # additive bias (B, H, T, S); xformers needs the last dim's storage padded to 8
        b, h, t, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        padded = torch.zeros(b, h, t, (s + 7) // 8 * 8, dtype=q.dtype, device=q.device)
        bias = padded[..., :s]
        bias.masked_fill_(~mask.expand(b, h, t, s), float("-inf"))
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias)
    return out.transpose(1, 2)


BACKENDS = {"sdpa": sdpa_attention, "xformers": xformers_attention, "reference": reference_attention}
