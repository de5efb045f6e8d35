"""Block diffusion decoding (BD3-LM, Arriola et al. 2025; SPEC §9), with an exact KV cache.

Blocks of ``block_size`` positions are decoded left to right; inside a block the LLaDA reverse
process of :mod:`lldiff.objectives.mdm.decoding` (a fixed number of steps per block with front-loaded reveal
counts, low-confidence or random remasking, Gumbel-max temperature, unsupervised CFG) or
Fast-dLLM's threshold rule; earlier blocks are clean and never change.

Blocks are aligned to absolute positions: position ``i`` lies in block ``i // block_size``, as in
training (rows start at position 0). A prompt that ends inside a block leaves the first generated
block partly filled by prompt tokens, which are never masked. Left-padded batches: RoPE positions
count real tokens only (``cumsum(attention_mask) - 1``, as :mod:`lldiff.objectives.ar.decoding`), so each
row's blocks follow its own real positions and a padded row decodes like the prompt alone.
Rows therefore have their block boundaries at different canvas columns; the decoder runs in
rounds, round ``k`` decoding every row's ``k``-th block that holds answer positions (a row whose
answer needs one block fewer sits the last round out).

The model is any callable ``model(ids (B, T), positions=(B, T)[, attention_mask=(B, T)]) ->
logits (B, T, V)`` whose attention is block-causal in ``positions`` (a
:class:`lldiff.model.Transformer` with ``attention="block"`` builds that mask itself).
Without a cache (``use_cache=False``) each call gets the canvas up to the end of the furthest
current block, never the later blocks: under block-causal attention they could not change the
current block's logits anyway.

KV cache (``use_cache=True``, the default; an lldiff block-attention Transformer with this
``block_size``): a clean block's keys/values never change (block attention: nothing in it
attends to later blocks), so they are computed once. Each round's first call appends the
blocks finished since the last one (at the first round: the prompt's clean part, i.e. up to
the block holding its last token) together with the current blocks, in one call on the
:class:`lldiff.model.KVCache`, and then truncates the cache to the first column of the earliest
current block; the round's further calls feed only the current blocks (``KVCache.spliced``,
writing nothing). So the model calls are exactly the uncached decoder's (the commit rides on
the next block's first step instead of costing a call of its own), and a block of ``B``
positions decoded in ``s`` calls costs about ``(s + 1) B`` positions fed (its calls, and once
more as the finished block ahead of the next one) instead of ``s`` times the canvas so far.

Left padding: the cache is indexed by canvas columns and holds the padding too, masked as keys; the attention mask is built from each row's real positions (explicit ``attn_mask``:
cached columns are not positions), and rows whose blocks sit at different columns are fed
from the earliest current block's column, so no row reads a cached entry of its own current
block or one computed before its block was finished (tested against the uncached decoder and
against each prompt decoded alone). CFG: the unconditional rows (prompt masked) have their own
cache, rows ``B..2B`` of one batch-2B cache. Same tokens as without the cache at temperature 0;
at temperature > 0 the noise is drawn for the fed columns only (same distribution, other draws).

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

from lldiff import registry
from lldiff.model import KVCache, Transformer, block_causal_mask

from lldiff.objectives.common.decoding import Model, SampleOutput
from lldiff.objectives.common.remasking import add_gumbel_noise, reveal_counts, select_top_k
from lldiff.objectives.common.guidance import cfg_logits, unconditional_input
from lldiff.objectives.common.decoding import Completion, DecodeOptions
from lldiff.objectives.common.remasking import DECODER_REMASKING
from lldiff.objectives.bd3 import FAMILY
from lldiff.registry import article



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
    if remasking not in DECODER_REMASKING:
        raise ValueError(f"remasking={remasking!r} is unknown; allowed: {', '.join(DECODER_REMASKING)}")
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


def _check_cache_model(model: Model, block_size: int) -> None:
    """Refuse ``use_cache=True`` for a model that cannot hold BD3's exact KV cache: anything
    but an lldiff block-attention Transformer whose blocks are the decoder's."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, Transformer) or cfg is None:
        raise ValueError(f"use_cache=True needs an lldiff Transformer with block attention (a bd3-{block_size} model) "
                         f"to hold the KV cache; got a {type(model).__name__}; pass use_cache=False")
    objective = registry.of_model(model)
    if objective != registry.with_params(FAMILY, {"block_size": block_size}):
        raise ValueError(f"use_cache=True (BD3's exact KV cache) needs a bd3-{block_size} model (block attention, "
                         f"block_size={block_size}); this is {article(objective.label)} {objective.label} "
                         "model; pass use_cache=False")


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
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Continue each (left-padded) prompt by ``gen_length`` positions, block by block (see the
    module docstring).

    Args:
        model: block-attention model callable (ids, positions=[, attention_mask=]) -> logits;
            with ``use_cache`` an lldiff :class:`~lldiff.model.Transformer` with block attention
            and ``block_size`` (else ValueError).
        prompt: (B, P) token ids, left-padded when ``attention_mask`` is given.
        gen_length: answer positions per row (any number: blocks follow absolute positions,
            the first and last generated blocks may be partial).
        block_size: the model's block size ``B``.
        mask_id: the mask token.
        steps_per_block: model calls per block under ``low_confidence`` / ``random`` remasking
            (default ``block_size``: one token per call). A block's masked positions are revealed
            in front-loaded counts as :func:`lldiff.objectives.mdm.decoding.reveal_counts`; a step with nothing
            to reveal in any row (more steps than masks, e.g. a partial block) is skipped.
        remasking: ``low_confidence``, ``random`` or ``threshold`` (reveal every masked position
            of the block whose confidence exceeds ``threshold``, default 0.9, and at least the
            most confident one, until the block is full).
        temperature, cfg_scale, eos_id, forbid_eos, generator: as :func:`lldiff.objectives.mdm.decoding.generate`
            (CFG's unconditional input masks the real prompt tokens only).
        attention_mask: (B, P) True on real prompt tokens (left padding).
        stop_at_eos: stop once every row's answer has reached ``eos_id`` (no effect without it).
        use_cache: keep the clean blocks' keys/values in a KV cache and feed only the current
            block (exact; see the module docstring). The same tokens as ``use_cache=False`` at
            temperature 0 and the same model calls; at temperature > 0 the same distribution
            but other random draws (noise is drawn for the fed block only).

    Returns a :class:`lldiff.objectives.mdm.decoding.SampleOutput` (``prompt_length`` = the padded width P;
    ``model_calls``, ``forward_rows`` and ``tokens_processed``: the positions fed over all
    calls and rows, x2 under CFG).
    """
    _check(prompt, attention_mask, gen_length=gen_length, block_size=block_size, mask_id=mask_id,
           steps_per_block=steps_per_block, remasking=remasking, threshold=threshold, temperature=temperature,
           cfg_scale=cfg_scale, eos_id=eos_id, forbid_eos=forbid_eos)
    if use_cache:
        _check_cache_model(model, block_size)
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
    guided = cfg_scale > 0
    copies = 2 if guided else 1  # CFG: conditional and unconditional rows in one call (and one cache of 2B rows)
    cache = None
    if use_cache:
        cache = KVCache(model.cfg, copies * b, x.shape[1], dtype=next(model.parameters()).dtype, device=device)
    committed = 0  # cache: columns [0, committed) hold exact keys/values for every row still decoding
    calls = rows = tokens = 0
    last: tuple[tuple[int, int], Tensor] | None = None  # ((start, end), logits) while that input is unchanged
    fresh = False  # cache: the round's first call still has to append the finished blocks

    def call(ids: Tensor, pos: Tensor, first: int, end: int) -> Tensor:
        """One forward of columns [first, end) (the cache, if any, holding [0, first)), CFG's
        unconditional rows stacked below; logits after CFG and suppression."""
        nonlocal calls, rows, tokens
        am = None if full_mask is None else full_mask[:, :end]
        if guided:
            ids = torch.cat([ids, unconditional_input(ids, prompt_real[:, first:end], mask_id)])
            pos = torch.cat([pos, pos])
            am = None if am is None else torch.cat([am, am])
        if cache is None:
            logits = call_block_model(model, ids, pos, am)
        else:  # explicit block mask over real positions: cached columns are not positions under left padding
            keys = positions[:, :end].repeat(copies, 1)
            mask = block_causal_mask(pos, keys, block_size)
            logits = model(ids, attention_mask=am, positions=pos, kv_cache=cache, attn_mask=mask)
        calls += 1
        rows += ids.shape[0]
        tokens += ids.numel()
        if guided:
            cond, unc = logits.chunk(2, dim=0)
            logits = cfg_logits(cond, unc, cfg_scale)
        drop = [i for i in suppress if i < logits.shape[-1]]
        if drop:
            logits = logits.clone()
            logits[..., drop] = float("-inf")
        return logits

    def logits_for(start: int, end: int) -> Tensor:
        """Logits (B, end - start, V) of columns [start, end): uncached start is 0 (the canvas
        up to ``end``); cached it is the current blocks' first column."""
        nonlocal last, fresh, committed
        if last is not None and last[0] == (start, end):
            return last[1]
        if cache is None:
            logits = call(x[:, :end], positions[:, :end], 0, end)
        elif fresh:  # append the blocks finished since the last commit together with the current ones, then
            # forget the current ones (they change): the cache is exact up to the earliest current block
            logits = call(x[:, committed:end], positions[:, committed:end], committed, end)[:, start - committed:]
            cache.truncate(start)
            committed, fresh = start, False
        else:
            with cache.spliced(start, end):
                logits = call(x[:, start:end], positions[:, start:end], start, end)
        last = ((start, end), logits)
        return logits

    def propose(start: int, end: int, how: str) -> tuple[Tensor, Tensor]:
        logits = logits_for(start, end)
        x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)
        if how == "low_confidence":
            confidence = torch.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
        else:  # random
            confidence = torch.rand(x0.shape, dtype=torch.float64, device=device, generator=generator)
        return x0.to(x.dtype), confidence

    def reveal(start: int, end: int, x0: Tensor, transfer: Tensor) -> None:
        nonlocal x, last
        if transfer.any():
            x = x.clone()
            x[:, start:end] = torch.where(transfer, x0, x[:, start:end])
            last = None

    first = lengths // block_size  # block of each row's first answer position
    final = (lengths + gen_length - 1) // block_size
    rounds = int((final - first).max()) + 1
    answer_cols = torch.arange(gen_length, device=device)
    start_time = time.perf_counter()
    for k in range(rounds):
        block = first + k
        offset = block * block_size - lengths  # answer offset of each row's block start (< 0: inside the prompt)
        lo = offset.clamp(min=0)  # this round's answer offsets [lo, hi) per row
        hi = (offset + block_size).clamp(max=gen_length)
        live = lo < hi
        end = width + int(hi[live].max())
        # the window fed: the canvas up to `end` uncached; cached, from the earliest current block's first
        # column (its prompt part too: prompt tokens in a block attend to the block's masks)
        start = width + int(offset[live].min()) if cache is not None else 0
        fresh, last = True, None
        in_block = torch.zeros(b, x.shape[1], dtype=torch.bool, device=device)
        in_block[:, width:] = (answer_cols >= lo[:, None]) & (answer_cols < hi[:, None])
        in_block = in_block[:, start:end]

        def candidates() -> Tensor:
            return (x[:, start:end] == mask_id) & in_block

        if remasking == "threshold":
            for _ in range(block_size):  # at least one reveal per active row per call: bounded
                cand = candidates()
                if not cand.any():
                    break
                x0, confidence = propose(start, end, "low_confidence")
                confidence = torch.where(cand, confidence, float("-inf"))
                best = select_top_k(confidence, cand.any(dim=1).long())
                reveal(start, end, x0, ((confidence > threshold) | best) & cand)
        else:
            counts = reveal_counts(candidates().sum(dim=1), steps)
            for step in range(steps):
                if not counts[:, step].any():  # nothing to reveal in any row (more steps than masks): no call
                    continue
                x0, confidence = propose(start, end, remasking)
                cand = candidates()
                confidence = torch.where(cand, confidence, float("-inf"))
                reveal(start, end, x0, select_top_k(confidence, counts[:, step]) & cand)
        if stop_at_eos and eos_id is not None and k + 1 < rounds:
            done = x[:, width:] == eos_id
            done &= answer_cols[None, :] < hi[:, None].clamp(min=0)
            if bool(done.any(dim=1).all()):
                x = torch.where(x == mask_id, torch.full_like(x, eos_id), x)
                break
    return SampleOutput(x, width, calls, rows, time.perf_counter() - start_time, eos_id, tokens_processed=tokens)


def block_diffusion_complete(model: Transformer, ids: Tensor, mask: Tensor, options: DecodeOptions, *,
                             eos_id: int, generator: torch.Generator | None = None) -> Completion:
    """Block diffusion decoding in the model's own blocks (``lldiff.objectives.bd3.decoding``)."""
    sample = block_generate(
        model, ids, gen_length=options.length, block_size=model.cfg.block_size, mask_id=model.cfg.mask_id,
        steps_per_block=options.steps_per_block, remasking=options.remasking, threshold=options.threshold,
        temperature=options.temperature, cfg_scale=options.cfg_scale, attention_mask=mask, eos_id=eos_id,
        forbid_eos=options.forbid_eos, generator=generator, use_cache=options.use_cache,
    )
    return Completion(sample.answer(eos_id), sample.model_calls)
