"""The one backbone: a LLaMA-style decoder whose only switch is ``config.attention``.

RoPE, RMSNorm (pre-norm), SwiGLU, no biases, untied LM head, MHA or GQA. Attention is
``causal`` (AR), ``bidirectional`` (MDM) or ``block`` (BD3: a token sees its own block and
every earlier block; blocks of ``block_size`` positions counted from position 0). A model
with a mask token embeds ``mask_id`` (by default one extra row ``M = vocab_size``); the head
always outputs the ``vocab_size`` real tokens, so an extra-row ``M`` is never predicted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lldiff.attention import BACKENDS
from lldiff.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (max_len, head_dim) in the rotate-half layout."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, hd) by per-position tables (T, hd) or (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class LayerKVCache:
    """Keys and values of one layer, kept across decoding calls (see :class:`KVCache`)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.filled = 0  # positions ever written (a truncated cache keeps its later entries for splices)
        self.splice: tuple[int, int] | None = None  # (start, total) while KVCache.spliced is active

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new keys/values (B, Hkv, T, hd) and return all of them so far; inside
        :meth:`KVCache.spliced` return the cached ones with positions ``start..start+T``
        replaced by the new ones (and cut at ``total``), storing nothing."""
        t = k.shape[2]
        if self.splice is not None:
            start, total = self.splice
            if start > self.filled or start + t > total or total > max(self.filled, start + t):
                raise ValueError(f"splice of {t} positions at {start} with {total} keys, but {self.filled} are cached")
            keys = torch.cat([self.k[:, :, :start], k, self.k[:, :, start + t:total]], dim=2)
            values = torch.cat([self.v[:, :, :start], v, self.v[:, :, start + t:total]], dim=2)
            return keys, values
        end = self.length + t
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {end} needed")
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        self.filled = max(self.filled, end)
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One :class:`LayerKVCache` per block; pass it to ``Transformer.forward`` repeatedly.

    By default each call appends its keys/values (exact for causal and block attention,
    whose earlier states never change). :meth:`truncate` forgets positions from some point
    on, and :meth:`spliced` makes calls read the cache without writing it, their own
    keys/values standing in for a stretch of positions: the approximate caches of
    Fast-dLLM for a bidirectional model (prefix cache: ``spliced(start, start + T)``; dual
    cache: ``spliced(start, L)`` after a full-canvas call filled all ``L`` positions).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}")
        self.layers = [LayerKVCache(batch, cfg.kv_heads, max_len, cfg.head_dim, dtype=dtype, device=torch.device(device))
                       for _ in range(cfg.n_layer)]

    @property
    def length(self) -> int:
        """Positions the next appending call follows (the start of a splice while spliced)."""
        layer = self.layers[0]
        return layer.splice[0] if layer.splice is not None else layer.length

    @property
    def key_length(self) -> int | None:
        """Keys a spliced call attends to (None when appending: cached + new)."""
        layer = self.layers[0]
        return layer.splice[1] if layer.splice is not None else None

    def truncate(self, length: int) -> None:
        """Forget positions ``length..`` for appending (their entries stay for splices)."""
        for layer in self.layers:
            if not 0 <= length <= layer.filled:
                raise ValueError(f"cannot truncate a cache of {layer.filled} positions to {length}")
            layer.length = length

    @contextmanager
    def spliced(self, start: int, total: int) -> Iterator["KVCache"]:
        """Calls inside read positions ``0..total`` of the cache, their own keys/values
        replacing positions ``start..start+T``; nothing is written."""
        for layer in self.layers:
            layer.splice = (start, total)
        try:
            yield self
        finally:
            for layer in self.layers:
                layer.splice = None


def block_causal_mask(query_positions: Tensor, key_positions: Tensor, block_size: int) -> Tensor:
    """True where a query may attend a key under block attention: the key's block (position
    // block_size) is the query's or an earlier one. (T,) and (S,) -> (T, S); (B, T) and
    (B, S) -> (B, 1, T, S)."""
    q_block, k_block = query_positions // block_size, key_positions // block_size
    allowed = q_block[..., :, None] >= k_block[..., None, :]
    return allowed[:, None] if allowed.dim() == 3 else allowed


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_padding_mask: Tensor | None,
        cache: LayerKVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        hd, h, kvh = self.cfg.head_dim, self.cfg.n_heads, self.cfg.kv_heads
        q, k, v = self.qkv(x).split([h * hd, kvh * hd, kvh * hd], dim=-1)
        q = q.view(b, t, h, hd).transpose(1, 2)
        k = k.view(b, t, kvh, hd).transpose(1, 2)
        v = v.view(b, t, kvh, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        attend = BACKENDS[self.cfg.attn_backend]
        causal = self.cfg.attention == "causal"
        if attn_mask is None:
            y = attend(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        else:
            y = attend(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, h * hd))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_padding_mask: Tensor | None,
        cache: LayerKVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, key_padding_mask, cache, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab_size), or a readout of the final hidden states
    (``forward(..., readout=f)``: :func:`lldiff.losses.token_ce` reads the CE of selected rows
    in chunks without building the whole logits tensor)."""

    loss_chunk_tokens: int | None = None
    """Rows per LM-head chunk when a loss reads this model out (:mod:`lldiff.losses`); None (the
    class's): losses score the full logits. A LightningModule has its own (``LMBase``'s)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.embedding_rows, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute the (non-persistent) RoPE tables, e.g. after building on the meta device
        and assigning a checkpoint's tensors (``load_state_dict(assign=True)``)."""
        if device is None:
            device = self.embed.weight.device
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_base)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def reset_parameters(self) -> None:
        """SMDM initialisation: N(0, sqrt(2 / 5d)) everywhere, output projections
        N(0, 1 / sqrt(d) / n_layer), RMSNorm weights one."""
        d = self.cfg.d_model
        std = math.sqrt(2.0 / (5.0 * d))
        out_std = 1.0 / math.sqrt(d) / self.cfg.n_layer
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output_proj = name.endswith("attn.proj") or name.endswith("mlp.proj")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_output_proj else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
        *,
        readout: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Args:
            input_ids: (B, T) token ids in ``[0, embedding_rows)``.
            attention_mask: optional (B, S) with S the keys attended (cached + T, or a
                splice's total), True/1 for real tokens, False/0 for padding keys.
            positions: optional (T,) or (B, T) RoPE positions; default ``cached..cached+T-1``.
                Without a KV cache, explicit positions lift the length check: the input may
                be longer than ``max_seq_len`` (block diffusion's ``[x_t ⊕ x_0]``, SPEC §9)
                as long as every position is in ``[0, max_seq_len)``.
            kv_cache: causal and block models only (earlier tokens' states never change):
                keys/values of earlier calls are reused and this call's are appended.
            attn_mask: optional boolean (T, S) or (B|1, 1, T, S), True where a query may
                attend a key; when given it replaces the mask of ``config.attention``
                (and is ANDed with ``attention_mask``).
            readout: optional ``f(hidden, head_weight)``: the call returns ``f`` of the final
                normed hidden states (B, T, d) and the head's weight (V, d) instead of the
                logits (how :func:`lldiff.losses.token_ce` scores selected rows in chunks; it
                runs inside this forward, so FSDP2's gathered weights and autocast apply).
        """
        t = input_ids.shape[1]
        past = 0
        explicit_positions = positions is not None and kv_cache is None
        keys_total = None
        if kv_cache is not None:
            keys_total = kv_cache.key_length
            past = kv_cache.length
            if keys_total is None and past > 0 and not self.cfg.earlier_states_fixed:
                raise ValueError("appending to a KV cache needs causal or block attention: a bidirectional model's "
                                 "earlier states change (fill an empty cache with the whole canvas, then read it "
                                 "with KVCache.spliced: an approximation)")
            if positions is None:
                positions = torch.arange(past, past + t, device=input_ids.device)
        if explicit_positions and positions.device.type != "cpu":
            # the same check without a host sync on every step (BD3 trains with explicit positions)
            torch._assert_async(((positions >= 0) & (positions < self.cfg.max_seq_len)).all(),
                                "RoPE positions outside [0, max_seq_len)")
        elif explicit_positions:  # the positions, not the input length, must fit the RoPE tables
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or high >= self.cfg.max_seq_len:
                raise ValueError(
                    f"RoPE positions span [{low}, {high}] but max_seq_len={self.cfg.max_seq_len} "
                    f"covers [0, {self.cfg.max_seq_len - 1}]; shorten the input or raise max_seq_len"
                )
        elif max(past + t, keys_total or 0) > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {past + t} exceeds max_seq_len={self.cfg.max_seq_len}; "
                "shorten the input or raise max_seq_len"
            )
        if positions is None:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            if cos.dim() == 3:  # (B, T, hd) -> broadcast over heads
                cos, sin = cos[:, None], sin[:, None]
        if attn_mask is None and self.cfg.attention == "block":
            query_pos = positions if positions is not None else torch.arange(past, past + t, device=input_ids.device)
            keys = keys_total if keys_total is not None else past + t
            key_pos = torch.arange(keys, device=input_ids.device) if kv_cache is not None else query_pos
            attn_mask = block_causal_mask(query_pos, key_pos, self.cfg.block_size)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attention_mask, None if kv_cache is None else kv_cache.layers[i], attn_mask)
        hidden = self.norm(x)
        return self.head(hidden) if readout is None else readout(hidden, self.head.weight)

    def compile_blocks(self, **options: Any) -> None:
        """Regional ``torch.compile``: each block compiled in place (``Block.compile``), so
        compilation covers one block's code, which every (identical) block reuses, and the
        state-dict keys stay those of the plain model. Embedding, final norm, head and loss
        stay eager. Idempotent."""
        for block in self.blocks:
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            if getattr(inner, "_compiled_call_impl", None) is None:
                inner.compile(**options)

    @property
    def blocks_compiled(self) -> bool:
        """Whether :meth:`compile_blocks` has compiled the blocks."""
        return all(getattr(getattr(b, "_checkpoint_wrapped_module", b), "_compiled_call_impl", None) is not None
                   for b in self.blocks)
