"""Autoregressive decoding for the causal backbone: greedy, temperature, top-k, top-p.

Batched prompts of different lengths are LEFT-padded with an attention mask; RoPE
positions count real tokens only (a padded prompt decodes exactly like the unpadded one).
With ``use_cache=True`` the prompt is encoded once and each new token costs one
single-position forward over the KV cache; without it every step re-encodes the whole
sequence. Both give identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lldiff import registry
from lldiff.model import KVCache, Transformer
from lldiff.objectives.common.decoding import Completion, DecodeOptions, strip_after_eos
from lldiff.objectives.ar import FAMILY


@dataclass
class ARSampleOutput:
    tokens: Tensor  # (B, P + new): prompt followed by the generated tokens
    model_calls: int  # forward passes


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the ``top_k`` largest logits and/or the smallest set whose probability reaches
    ``top_p`` (nucleus); the rest become -inf. (B, V) -> (B, V)."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Greedy at temperature 0, else a draw from the filtered, tempered distribution. (B,)"""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(model: Transformer, prompt: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
           top_p: float | None) -> None:
    if not isinstance(model, Transformer) or registry.of_model(model).family is not FAMILY:
        raise ValueError("AR decoding needs a causal lldiff Transformer (an AutoregressiveLM's .model); "
                         f"got {type(model).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        for name, value in (("top_k", top_k), ("top_p", top_p)):
            if value is not None:
                raise ValueError(f"{name}={value} needs temperature > 0 (greedy decoding at temperature 0 ignores it)")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the context "
            f"max_seq_len={model.cfg.max_seq_len}"
        )


@torch.no_grad()
def ar_generate(
    model: Transformer,
    prompt: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: Tensor | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> ARSampleOutput:
    """Continue each (left-padded) prompt by up to ``max_new_tokens`` tokens.

    Rows that emitted ``eos_id`` keep emitting it; decoding stops early once every row has.
    """
    _check(model, prompt, max_new_tokens, temperature, top_k, top_p)
    batch, device = prompt.shape[0], prompt.device
    mask = torch.ones_like(prompt, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    sample = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    tokens, calls = prompt, 0
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = KVCache(model.cfg, batch, prompt.shape[1] + max_new_tokens, device=device,
                    dtype=next(model.parameters()).dtype) if use_cache else None
    step_ids, step_positions = prompt, positions
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(step_ids, mask, step_positions, kv_cache=cache)
        else:
            logits = model(tokens, mask, positions)
        calls += 1
        token = next_token(logits[:, -1], **sample)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished |= token == eos_id
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        new_position = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        positions = torch.cat([positions, new_position], dim=1)
        step_ids, step_positions = token[:, None], new_position
        if eos_id is not None and bool(finished.all()):
            break
    return ARSampleOutput(tokens=tokens, model_calls=calls)


def ar_complete(model: Transformer, ids: Tensor, mask: Tensor, options: DecodeOptions, *, eos_id: int,
                generator: torch.Generator | None = None) -> Completion:
    """AR decoding with a KV cache (``use_cache``), greedy or sampled with ``top_k`` / ``top_p``."""
    out = ar_generate(model, ids, max_new_tokens=options.length, temperature=options.temperature,
                      top_k=options.top_k, top_p=options.top_p, attention_mask=mask, eos_id=eos_id,
                      use_cache=options.use_cache, generator=generator)
    return Completion(strip_after_eos(out.tokens[:, ids.shape[1]:], eos_id), out.model_calls)
