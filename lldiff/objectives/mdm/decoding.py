"""Masked-diffusion sampling (SPEC §4): LLaDA's reverse process (Alg. 4/5) and Fast-dLLM's
confidence-threshold parallel decoding.

A model is any callable ``model(input_ids (B, T)[, attention_mask (B, T) bool]) -> logits
(B, T, V)``; the attention mask is passed (positionally) only when there is one, so
callables that take ids alone work too. Outputs with a ``.logits`` attribute (Hugging Face
style) are unwrapped. The mask id is ``M``; in this codebase ``M = V`` and the head cannot
predict it, but if a model's head does cover ``M`` (e.g. the released LLaDA, whose mask id
lies inside its vocabulary) the ``M`` logit is set to ``-inf`` so ``M`` is never sampled.

Semantics follow LLaDA's reference ``generate`` (semi-autoregressive blocks, front-loaded
reveal counts, Gumbel-max sampling, low-confidence / random remasking, unsupervised CFG)
without its known defects: CFG works without an attention mask, the unconditional input
masks only the real prompt tokens (left padding stays padding), and EOS suppression is a
logit mask applied after CFG (so no ``inf - inf``).

Fast-dLLM's approximate KV caches (SPEC §10, ``cache="prefix"`` / ``"dual"``, for
``generate`` and ``generate_threshold``; the model must then be an lldiff ``Transformer``,
called as ``model(ids, attention_mask, kv_cache=...)``): at the start of each semi-AR block one
call runs the whole canvas, filling a :class:`lldiff.model.KVCache` (its logits are the
block's first step, identical to exact decoding's). The block's further steps then read the
cached keys/values instead of recomputing them: the prefix cache keeps everything before the
block and feeds ``x[:, block_start:]``; the dual cache also keeps the (masked) suffix after the
block and feeds only the block. Both splice their own keys/values in
(``KVCache.spliced(block_start, L)``) and write nothing, so every block starts from a fresh
full-canvas call. They are approximations for a bidirectional model (the cached states would
change as the block is revealed); they are exact for a model whose earlier states do not
depend on later tokens (the prefix cache with causal attention; both caches with block
attention aligned to the semi-AR blocks), which the tests use. With a cache, a step that
would reveal nothing in any row (``steps`` per block above the block length) reuses the last
logits: no model call. Left padding: the key padding mask covers the whole canvas at every
call (cached padding keys stay masked). CFG: the unconditional rows have their own cache
(rows ``B..2B`` of a batch-2B cache, filled by the same block-start call).

Choices:
    * ``model_calls`` counts forward passes. With CFG the conditional and unconditional
      inputs go through ONE forward of batch 2B, counted as one call; ``forward_rows``
      counts sequences processed (B per call, 2B with CFG) for cost accounting.
    * ``tokens_processed`` counts the token positions fed to the model over all calls and
      rows (B x canvas length per exact call, x2 under CFG): the compute the caches save.
    * ``steps`` may exceed the number of tokens in a block (as upstream): without a cache the
      surplus steps reveal nothing but are still model calls, so ``model_calls == steps``;
      with a cache they make no call (``model_calls = blocks x min(steps per block,
      block_length)``).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
import torch
from torch import Tensor
from lldiff.model import KVCache, Transformer
from lldiff.objectives.common.decoding import Completion, DecodeOptions, SampleOutput, call_model
from lldiff.objectives.common.remasking import REMASKING, add_gumbel_noise, reveal_counts, select_top_k
from lldiff.objectives.common.guidance import cfg_logits, unconditional_input
from lldiff.objectives.common.decoding import check_cache


Model = Callable[..., Any]


class _Stepper:
    """Shared state of the samplers: canvas, masks, one guided forward per call, the cache."""

    def __init__(
        self,
        model: Model,
        prompt: Tensor,
        *,
        gen_length: int,
        mask_id: int,
        temperature: float,
        cfg_scale: float,
        attention_mask: Tensor | None,
        eos_id: int | None,
        forbid_eos: bool,
        generator: torch.Generator | None,
        cache: str = "none",
    ) -> None:
        if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.dtype.is_floating_point:
            raise ValueError(f"prompt must be an integer tensor of shape (B, P), got {getattr(prompt, 'shape', prompt)}")
        if gen_length < 1:
            raise ValueError(f"gen_length must be >= 1, got {gen_length}")
        if not temperature >= 0:  # also NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 (0 = no guidance), got {cfg_scale}")
        if (prompt == mask_id).any():
            raise ValueError(
                f"prompt contains the mask id {mask_id} (also on padding positions); "
                "prompts must hold real token ids only (pad with a real id)"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(prompt.shape):
            raise ValueError(
                f"attention_mask must have the prompt's shape {tuple(prompt.shape)}, got {tuple(attention_mask.shape)}"
            )
        if forbid_eos and eos_id is None:
            raise ValueError("forbid_eos=True needs eos_id")
        b, p = prompt.shape
        device = prompt.device
        self.model, self.mask_id, self.temperature = model, mask_id, temperature
        self.cfg_scale, self.generator = cfg_scale, generator
        self.eos_id = eos_id if forbid_eos else None
        self.prompt_length = p
        self.x = torch.cat([prompt, torch.full((b, gen_length), mask_id, dtype=prompt.dtype, device=device)], dim=1)
        if attention_mask is None:
            self.attention_mask = None
            real = torch.ones(b, p, dtype=torch.bool, device=device)
        else:
            real = attention_mask.to(device=device, dtype=torch.bool)
            self.attention_mask = torch.cat([real, torch.ones(b, gen_length, dtype=torch.bool, device=device)], dim=1)
        self.prompt_real = torch.cat([real, torch.zeros(b, gen_length, dtype=torch.bool, device=device)], dim=1)
        self.model_calls = 0
        self.forward_rows = 0
        self.tokens_processed = 0
        self.cache = cache
        self.kv = None
        if cache != "none":
            self.kv = self._new_cache(b * (2 if cfg_scale > 0 else 1))

    def _new_cache(self, rows: int) -> KVCache:
        if not isinstance(self.model, Transformer):
            raise ValueError(f"cache={self.cache!r} needs an lldiff Transformer (its KV cache); got "  # noqa: TRY004
                             f"{type(self.model).__name__}; use cache='none'")
        parameter = next(self.model.parameters())
        return KVCache(self.model.cfg, rows, self.x.shape[1], dtype=parameter.dtype, device=self.x.device)

    def logits(self, start: int, end: int, first: bool) -> tuple[Tensor, int]:
        """One forward (batch 2B under CFG) for the block ``[start, end)``: logits after CFG
        and EOS/mask suppression, with the canvas column of their first position.

        Without a cache the whole canvas is fed. With one, the block's ``first`` call feeds
        the whole canvas into an emptied cache; later calls feed ``x[:, start:]`` (prefix)
        or ``x[:, start:end]`` (dual), reading the other positions from the cache."""
        x, am = self.x, self.attention_mask
        if self.cfg_scale > 0:
            x = torch.cat([x, unconditional_input(x, self.prompt_real, self.mask_id)])
            am = None if am is None else torch.cat([am, am])
        total = x.shape[1]
        if self.kv is None:
            logits, offset = call_model(self.model, x, am), 0
        elif first:
            self.kv.truncate(0)
            logits, offset = call_model(self.model, x, am, kv_cache=self.kv), 0
        else:
            stop = total if self.cache == "prefix" else end
            with self.kv.spliced(start, total):
                logits, offset = call_model(self.model, x[:, start:stop], am, kv_cache=self.kv), start
        self.model_calls += 1
        self.forward_rows += x.shape[0]
        self.tokens_processed += x.shape[0] * logits.shape[1]
        if self.cfg_scale > 0:
            cond, unc = logits.chunk(2, dim=0)
            logits = cfg_logits(cond, unc, self.cfg_scale)
        suppress = [i for i in (self.mask_id, self.eos_id) if i is not None and i < logits.shape[-1]]
        if suppress:
            logits = logits.clone()
            logits[..., suppress] = float("-inf")
        return logits, offset

    def propose(self, remasking: str, start: int, end: int, first: bool = True) -> tuple[Tensor, Tensor, int]:
        """Candidate tokens x0 (B, T) and their confidences (B, T, float64) at the T canvas
        positions the model returned for the block ``[start, end)`` (the whole canvas without
        a cache and at a block's first call, so these steps compute exactly what the exact
        sampler computes), and the canvas column of the first one."""
        logits, offset = self.logits(start, end, first)
        x0 = add_gumbel_noise(logits, self.temperature, self.generator).argmax(dim=-1)
        if remasking == "low_confidence":
            probs = torch.softmax(logits.to(torch.float64), dim=-1)
            confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
        else:  # random
            confidence = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=self.generator)
        return x0.to(self.x.dtype), confidence, offset

    def block_candidates(self, start: int, end: int, offset: int = 0, width: int | None = None) -> Tensor:
        """(B, width) still-masked positions of the block [start, end) among the canvas
        columns ``offset..offset+width`` (default: the whole canvas)."""
        width = self.x.shape[1] - offset if width is None else width
        columns = torch.arange(offset, offset + width, device=self.x.device)
        in_block = (columns >= start) & (columns < end)
        return (self.x[:, offset:offset + width] == self.mask_id) & in_block

    def reveal(self, start: int, x0: Tensor, transfer: Tensor) -> None:
        """Write ``x0`` (B, T) where ``transfer`` into the canvas columns ``start..start+T``."""
        end = start + x0.shape[1]
        x = self.x.clone()
        x[:, start:end] = torch.where(transfer, x0, x[:, start:end])
        self.x = x

    def output(self, seconds: float, eos_id: int | None) -> SampleOutput:
        return SampleOutput(self.x, self.prompt_length, self.model_calls, self.forward_rows, seconds, eos_id,
                            self.tokens_processed)


def check_blocks(gen_length: int, block_length: int) -> None:
    if gen_length < 1:
        raise ValueError(f"gen_length must be >= 1, got {gen_length}")
    if block_length < 1 or gen_length % block_length:
        raise ValueError(
            f"gen_length={gen_length} must be a positive multiple of block_length={block_length}; "
            f"allowed block lengths divide {gen_length}"
        )


@torch.no_grad()
def generate(
    model: Model,
    prompt: Tensor,
    *,
    gen_length: int,
    steps: int,
    block_length: int,
    mask_id: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: Tensor | None = None,
    eos_id: int | None = None,
    forbid_eos: bool = False,
    generator: torch.Generator | None = None,
    cache: str = "none",
) -> SampleOutput:
    """LLaDA reverse process (Alg. 4, semi-autoregressive Alg. 5 when ``block_length <
    gen_length``): exactly ``steps`` model calls without a cache.

    Args:
        model: callable ids (B, T) [, attention mask (B, T)] -> logits (B, T, V) (an lldiff
            ``Transformer`` with a cache).
        prompt: (B, P) token ids, left-padded when ``attention_mask`` is given.
        gen_length: answer length; a multiple of ``block_length``.
        steps: total steps, a multiple of ``gen_length // block_length`` (each block gets an
            equal share). May exceed the block length: surplus steps reveal nothing (still a
            model call each without a cache, none with one).
        block_length: tokens per semi-autoregressive block (``gen_length`` = one block).
        mask_id: the mask token M.
        temperature: Gumbel-max sampling temperature; 0 = greedy argmax.
        cfg_scale: unsupervised CFG weight w (0 = off, no unconditional forward).
        remasking: ``low_confidence`` (reveal the most probable predictions) or ``random``.
        attention_mask: (B, P) True on real prompt tokens; extended with True over the
            answer and passed to the model at every call.
        eos_id: EOS token (used by ``forbid_eos`` and ``SampleOutput.answer``).
        forbid_eos: set the EOS logit to -inf so EOS is never produced.
        generator: torch RNG for the Gumbel noise and random confidences.
        cache: ``none`` (exact), ``prefix`` or ``dual`` (Fast-dLLM's approximate caches, see
            the module docstring; ``dual`` needs ``block_length < gen_length``).
    """
    check_blocks(gen_length, block_length)
    num_blocks = gen_length // block_length
    if steps < num_blocks or steps % num_blocks:
        raise ValueError(
            f"steps={steps} must be a positive multiple of the number of blocks "
            f"{num_blocks} (= gen_length {gen_length} / block_length {block_length})"
        )
    if remasking not in REMASKING:
        raise ValueError(
            f"remasking={remasking!r} is unknown; allowed: {', '.join(REMASKING)} "
            "(threshold decoding is generate_threshold)"
        )
    check_cache(cache, gen_length=gen_length, block_length=block_length)
    state = _Stepper(
        model, prompt, gen_length=gen_length, mask_id=mask_id, temperature=temperature, cfg_scale=cfg_scale,
        attention_mask=attention_mask, eos_id=eos_id, forbid_eos=forbid_eos, generator=generator, cache=cache,
    )
    steps_per_block = steps // num_blocks
    start_time = time.perf_counter()
    for block in range(num_blocks):
        start = state.prompt_length + block * block_length
        end = start + block_length
        counts = reveal_counts(state.block_candidates(start, end).sum(dim=1), steps_per_block)
        for step in range(steps_per_block):
            if cache != "none" and step > 0 and not counts[:, step].any():
                continue  # reveals nothing in any row: the last logits stand, no call
            x0, confidence, offset = state.propose(remasking, start, end, first=step == 0)
            candidates = state.block_candidates(start, end, offset, x0.shape[1])
            confidence = torch.where(candidates, confidence, float("-inf"))
            state.reveal(offset, x0, select_top_k(confidence, counts[:, step]) & candidates)
    return state.output(time.perf_counter() - start_time, eos_id)


@torch.no_grad()
def generate_threshold(
    model: Model,
    prompt: Tensor,
    *,
    gen_length: int,
    block_length: int,
    mask_id: int,
    threshold: float = 0.9,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    attention_mask: Tensor | None = None,
    eos_id: int | None = None,
    forbid_eos: bool = False,
    generator: torch.Generator | None = None,
    cache: str = "none",
) -> SampleOutput:
    """Fast-dLLM confidence-threshold parallel decoding.

    Blocks are decoded left to right; each call reveals, per row, every masked position of
    the current block whose confidence ``softmax(logits)[x0]`` exceeds ``threshold``, and
    at least the most confident one, until the block is full. The number of model calls
    therefore varies (between ``num_blocks`` and ``gen_length``); see ``model_calls``.
    ``threshold = 1`` decodes one token per call. ``cache`` (``none``, ``prefix``, ``dual``)
    and the other arguments as in ``generate``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    check_blocks(gen_length, block_length)
    check_cache(cache, gen_length=gen_length, block_length=block_length)
    state = _Stepper(
        model, prompt, gen_length=gen_length, mask_id=mask_id, temperature=temperature, cfg_scale=cfg_scale,
        attention_mask=attention_mask, eos_id=eos_id, forbid_eos=forbid_eos, generator=generator, cache=cache,
    )
    start_time = time.perf_counter()
    for block in range(gen_length // block_length):
        start = state.prompt_length + block * block_length
        end = start + block_length
        for call in range(block_length):  # at least one reveal per row per call: bounded
            if not state.block_candidates(start, end).any():
                break
            x0, confidence, offset = state.propose("low_confidence", start, end, first=call == 0)
            candidates = state.block_candidates(start, end, offset, x0.shape[1])
            confidence = torch.where(candidates, confidence, float("-inf"))
            best = select_top_k(confidence, candidates.any(dim=1).long())
            state.reveal(offset, x0, ((confidence > threshold) | best) & candidates)
    return state.output(time.perf_counter() - start_time, eos_id)


@torch.no_grad()
def infill(model: Model, canvas: Tensor, *, mask_id: int, attention_mask: Tensor | None = None) -> Tensor:
    """Fill every ``mask_id`` position of ``canvas`` (B, T), wherever it lies (text on both
    sides), by the reverse process with low-confidence remasking: each model call reveals,
    in every row that still has masks, its single most confident greedy prediction. Rows
    finish after as many calls as they have masks; the canvas's other tokens never change.
    With the masks as a suffix this is ``generate`` with one block and ``steps = gen_length``.
    """
    if not isinstance(canvas, Tensor) or canvas.dim() != 2 or canvas.dtype.is_floating_point:
        raise ValueError(f"canvas must be an integer tensor of shape (B, T), got {getattr(canvas, 'shape', canvas)}")
    x = canvas.clone()
    while (masked := x == mask_id).any():
        logits = call_model(model, x, attention_mask)
        if mask_id < logits.shape[-1]:
            logits = logits.clone()
            logits[..., mask_id] = float("-inf")
        probs = torch.softmax(logits.to(torch.float64), dim=-1)
        confidence, x0 = probs.max(dim=-1)
        confidence = torch.where(masked, confidence, float("-inf"))
        best = select_top_k(confidence, masked.any(dim=1).long()) & masked
        x = torch.where(best, x0.to(x.dtype), x)
    return x


def diffusion_complete(model: Transformer, ids: Tensor, mask: Tensor, options: DecodeOptions, *, eos_id: int,
                       generator: torch.Generator | None = None) -> Completion:
    """The LLaDA reverse process over a ``length`` canvas in semi-autoregressive blocks, or
    threshold decoding; exact or with Fast-dLLM's prefix / dual cache (``options.cache``)."""
    common = {"gen_length": options.length, "block_length": options.block, "mask_id": model.cfg.mask_id,
              "temperature": options.temperature, "cfg_scale": options.cfg_scale, "attention_mask": mask,
              "eos_id": eos_id, "forbid_eos": options.forbid_eos, "generator": generator, "cache": options.cache}
    if options.remasking == "threshold":
        threshold = 0.9 if options.threshold is None else options.threshold
        sample = generate_threshold(model, ids, threshold=threshold, **common)
    else:
        steps = options.length if options.steps is None else options.steps
        sample = generate(model, ids, steps=steps, remasking=options.remasking, **common)
    return Completion(sample.answer(eos_id), sample.model_calls)
