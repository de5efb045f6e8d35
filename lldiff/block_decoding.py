"""Block diffusion decoding (BD3-LM, Arriola et al. 2025; SPEC §9).

Blocks of ``block_size`` positions are decoded left to right; inside a block the LLaDA reverse
process of :mod:`lldiff.sampling` (a fixed number of steps per block with front-loaded reveal
counts, low-confidence or random remasking, Gumbel-max temperature, unsupervised CFG) or
Fast-dLLM's threshold rule; earlier blocks are clean and never change.

Blocks are aligned to absolute positions: position ``i`` lies in block ``i // block_size``, as in
training (rows start at position 0). A prompt that ends inside a block leaves the first generated
block partly filled by prompt tokens, which are never masked. Left-padded batches: RoPE positions
count real tokens only (``cumsum(attention_mask) - 1``, as :mod:`lldiff.ar_decoding`), so each
row's blocks follow its own real positions and a padded row decodes like the prompt alone.
Rows therefore have their block boundaries at different canvas columns; the decoder runs in
rounds, round ``k`` decoding every row's ``k``-th block that holds answer positions (a row whose
answer needs one block fewer sits the last round out).

The model is any callable ``model(ids (B, T), positions=(B, T)[, attention_mask=(B, T)]) ->
logits (B, T, V)`` whose attention is block-causal in ``positions`` (a
:class:`lldiff.model.Transformer` with ``attention="block"`` builds that mask itself). Each
call gets the canvas up to the end of the furthest current block, never the later blocks: under
block-causal attention they could not change the current block's logits anyway. No KV cache yet
(the clean earlier blocks are recomputed at every call; caching them is exact and is issue 14).
A step with nothing to reveal in any row (more steps than masked positions, e.g. a block that
the prompt partly fills) is skipped: no model call, no random draw. Logits are reused whenever
the input has not changed since the last call (exact: the same input gives the same logits).

EOS: as the MDM sampler, ``forbid_eos`` sets the EOS logit to -inf and answers are cut before
their first EOS. In addition, decoding stops after a round in which every row's answer has
reached an EOS: later blocks cannot change what comes before it (they are decoded after it and
never attended to by it). The positions left masked are then filled with EOS.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lldiff.sampling import (
    Model,
    SampleOutput,
    add_gumbel_noise,
    cfg_logits,
    reveal_counts,
    select_top_k,
    unconditional_input,
)

REMASKING = ("low_confidence", "random", "threshold")


def real_positions(real: Tensor) -> Tensor:
    """RoPE positions (B, T) of a left-padded batch: real tokens count 0, 1, ...; padding gets 0."""
    return (real.long().cumsum(dim=1) - 1).clamp(min=0)


def call_block_model(model: Model, ids: Tensor, positions: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Logits (B, T, V') from a block-attention model callable (``.logits`` unwrapped)."""
    kwargs = {"positions": positions}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = model(ids, **kwargs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape (B, T, V) = {(*ids.shape, 'V')}, got {shape}")
    return logits


def _check(prompt: Tensor, attention_mask: Tensor | None, *, gen_length: int, block_size: int, mask_id: int,
           steps_per_block: int | None, remasking: str, threshold: float | None, temperature: float,
           cfg_scale: float, eos_id: int | None, forbid_eos: bool) -> None:
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.dtype.is_floating_point:
        raise ValueError(f"prompt must be an integer tensor of shape (B, P), got {getattr(prompt, 'shape', prompt)}")
    for name, value in (("gen_length", gen_length), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r} is unknown; allowed: {', '.join(REMASKING)}")
    if steps_per_block is not None:
        if isinstance(steps_per_block, bool) or not isinstance(steps_per_block, int) or steps_per_block < 1:
            raise ValueError(f"steps_per_block must be a positive integer, got {steps_per_block!r}")
        if remasking == "threshold":
            raise ValueError(f"steps_per_block={steps_per_block} has no effect with remasking='threshold' "
                             "(it calls the model until each block is full)")
    if threshold is not None:
        if remasking != "threshold":
            raise ValueError(f"threshold={threshold} needs remasking='threshold' (remasking={remasking!r} ignores it)")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0 (0 = no guidance), got {cfg_scale}")
    if forbid_eos and eos_id is None:
        raise ValueError("forbid_eos=True needs eos_id")
    if (prompt == mask_id).any():
        raise ValueError(f"prompt contains the mask id {mask_id} (also on padding positions); "
                         "prompts must hold real token ids only (pad with a real id)")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(prompt.shape):
            raise ValueError(f"attention_mask must have the prompt's shape {tuple(prompt.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        real = attention_mask.bool()
        if not real[:, -1].all() or (real[:, 1:].long() < real[:, :-1].long()).any():
            raise ValueError("attention_mask must describe left padding (padding first, then the real prompt tokens)")


@torch.no_grad()
def block_generate(
    model: Model,
    prompt: Tensor,
    *,
    gen_length: int,
    block_size: int,
    mask_id: int,
    steps_per_block: int | None = None,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    attention_mask: Tensor | None = None,
    eos_id: int | None = None,
    forbid_eos: bool = False,
    stop_at_eos: bool = True,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Continue each (left-padded) prompt by ``gen_length`` positions, block by block (see the
    module docstring).

    Args:
        model: block-attention model callable (ids, positions=[, attention_mask=]) -> logits.
        prompt: (B, P) token ids, left-padded when ``attention_mask`` is given.
        gen_length: answer positions per row (any number: blocks follow absolute positions,
            the first and last generated blocks may be partial).
        block_size: the model's block size ``B``.
        mask_id: the mask token.
        steps_per_block: model calls per block under ``low_confidence`` / ``random`` remasking
            (default ``block_size``: one token per call). A block's masked positions are revealed
            in front-loaded counts as :func:`lldiff.sampling.reveal_counts`; a step with nothing
            to reveal in any row (more steps than masks, e.g. a partial block) is skipped.
        remasking: ``low_confidence``, ``random`` or ``threshold`` (reveal every masked position
            of the block whose confidence exceeds ``threshold``, default 0.9, and at least the
            most confident one, until the block is full).
        temperature, cfg_scale, eos_id, forbid_eos, generator: as :func:`lldiff.sampling.generate`
            (CFG's unconditional input masks the real prompt tokens only).
        attention_mask: (B, P) True on real prompt tokens (left padding).
        stop_at_eos: stop once every row's answer has reached ``eos_id`` (no effect without it).

    Returns a :class:`lldiff.sampling.SampleOutput` (``prompt_length`` = the padded width P).
    """
    _check(prompt, attention_mask, gen_length=gen_length, block_size=block_size, mask_id=mask_id,
           steps_per_block=steps_per_block, remasking=remasking, threshold=threshold, temperature=temperature,
           cfg_scale=cfg_scale, eos_id=eos_id, forbid_eos=forbid_eos)
    if remasking == "threshold" and threshold is None:
        threshold = 0.9
    steps = block_size if steps_per_block is None else steps_per_block
    b, width = prompt.shape
    device = prompt.device
    real = torch.ones_like(prompt, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    lengths = real.sum(dim=1)  # real prompt tokens per row = position of its first answer token
    x = torch.cat([prompt, torch.full((b, gen_length), mask_id, dtype=prompt.dtype, device=device)], dim=1)
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat([real, torch.ones(b, gen_length, dtype=torch.bool, device=device)], dim=1)
    positions = real_positions(torch.cat([real, torch.ones(b, gen_length, dtype=torch.bool, device=device)], dim=1))
    prompt_real = torch.cat([real, torch.zeros(b, gen_length, dtype=torch.bool, device=device)], dim=1)
    suppress = [mask_id] + ([eos_id] if forbid_eos else [])
    calls = rows = 0
    cached: Tensor | None = None  # logits of the last call, valid while the window's input is unchanged

    def logits_for(end: int) -> Tensor:
        nonlocal calls, rows, cached
        if cached is not None and cached.shape[1] == end:
            return cached
        ids, pos = x[:, :end], positions[:, :end]
        am = None if full_mask is None else full_mask[:, :end]
        if cfg_scale > 0:
            uncond = unconditional_input(ids, prompt_real[:, :end], mask_id)
            both = call_block_model(model, torch.cat([ids, uncond]), torch.cat([pos, pos]),
                                    None if am is None else torch.cat([am, am]))
            cond, unc = both.chunk(2, dim=0)
            logits = cfg_logits(cond, unc, cfg_scale)
        else:
            logits = call_block_model(model, ids, pos, am)
        calls += 1
        rows += b * (2 if cfg_scale > 0 else 1)
        drop = [i for i in suppress if i < logits.shape[-1]]
        if drop:
            logits = logits.clone()
            logits[..., drop] = float("-inf")
        cached = logits
        return logits

    def propose(end: int, how: str) -> tuple[Tensor, Tensor]:
        logits = logits_for(end)
        x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)
        if how == "low_confidence":
            confidence = torch.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
        else:  # random
            confidence = torch.rand(x0.shape, dtype=torch.float64, device=device, generator=generator)
        return x0.to(x.dtype), confidence

    def reveal(end: int, x0: Tensor, transfer: Tensor) -> None:
        nonlocal x, cached
        if transfer.any():
            x = x.clone()
            x[:, :end] = torch.where(transfer, x0, x[:, :end])
            cached = None

    first = lengths // block_size  # block of each row's first answer position
    last = (lengths + gen_length - 1) // block_size
    rounds = int((last - first).max()) + 1
    answer_cols = torch.arange(gen_length, device=device)
    start_time = time.perf_counter()
    for k in range(rounds):
        block = first + k
        lo = (block * block_size - lengths).clamp(min=0)  # this round's answer offsets [lo, hi) per row
        hi = ((block + 1) * block_size - lengths).clamp(max=gen_length)
        live = lo < hi
        end = width + int(hi[live].max())
        in_block = torch.zeros(b, x.shape[1], dtype=torch.bool, device=device)
        in_block[:, width:] = (answer_cols >= lo[:, None]) & (answer_cols < hi[:, None])
        in_block = in_block[:, :end]

        def candidates() -> Tensor:
            return (x[:, :end] == mask_id) & in_block

        if remasking == "threshold":
            for _ in range(block_size):  # at least one reveal per active row per call: bounded
                cand = candidates()
                if not cand.any():
                    break
                x0, confidence = propose(end, "low_confidence")
                confidence = torch.where(cand, confidence, float("-inf"))
                best = select_top_k(confidence, cand.any(dim=1).long())
                reveal(end, x0, ((confidence > threshold) | best) & cand)
        else:
            counts = reveal_counts(candidates().sum(dim=1), steps)
            for step in range(steps):
                if not counts[:, step].any():  # nothing to reveal in any row (more steps than masks): no call
                    continue
                x0, confidence = propose(end, remasking)
                cand = candidates()
                confidence = torch.where(cand, confidence, float("-inf"))
                reveal(end, x0, select_top_k(confidence, counts[:, step]) & cand)
        if stop_at_eos and eos_id is not None and k + 1 < rounds:
            done = x[:, width:] == eos_id
            done &= answer_cols[None, :] < hi[:, None].clamp(min=0)
            if bool(done.any(dim=1).all()):
                x = torch.where(x == mask_id, torch.full_like(x, eos_id), x)
                break
    return SampleOutput(x, width, calls, rows, time.perf_counter() - start_time, eos_id)
