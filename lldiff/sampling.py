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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lldiff.model import KVCache, Transformer

Model = Callable[..., Any]

REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")  # Fast-dLLM's approximate caches for the semi-AR sampler (SPEC §10)


# ---------------------------------------------------------------------------------------
# pure helpers


def reveal_counts(num_masked: Tensor, steps: int) -> Tensor:
    """Tokens to reveal per step, shape (B, steps), for rows with ``num_masked`` (B,) masks.

    Each step reveals ``m // steps``; the first ``m % steps`` steps reveal one more
    (front-loaded, as LLaDA's ``get_num_transfer_tokens``). Rows sum to ``m``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = num_masked.to(torch.long).reshape(-1, 1)
    if (m < 0).any():
        raise ValueError(f"num_masked must be >= 0, got {num_masked.tolist()}")
    base = m // steps
    remainder = m % steps
    extra = torch.arange(steps, device=m.device)[None, :] < remainder
    return base + extra.long()


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Gumbel-max perturbation: ``argmax`` of the result samples ``softmax(logits / τ)``.

    ``τ = 0`` returns ``logits`` unchanged (greedy). Otherwise returns float64
    ``logits / τ - log(-log u)`` with ``u ~ U(0, 1)`` clamped away from 0 and 1, which is
    the log of LLaDA's ``exp(logits) / (-log u)^τ`` up to the factor ``1/τ`` (same argmax)
    without ever exponentiating the logits. ``-inf`` logits stay ``-inf``.
    """
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    eps = torch.finfo(torch.float64).eps
    u = u.clamp(min=eps, max=1.0 - eps)
    return logits / temperature - torch.log(-torch.log(u))


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Unsupervised classifier-free guidance: ``u + (w + 1) (c - u)``; ``w = 0`` gives ``c``."""
    return uncond + (scale + 1.0) * (cond - uncond)


def strip_after_eos(ids: Tensor, eos_id: int | None) -> list[list[int]]:
    """Rows of ``ids`` (B, L) as lists, each cut before its first ``eos_id`` (if any)."""
    rows = ids.tolist()
    if eos_id is None:
        return rows
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def unconditional_input(x: Tensor, prompt_real: Tensor, mask_id: int) -> Tensor:
    """CFG's unconditional canvas: every real prompt token (``prompt_real`` (B, T) bool,
    False on padding and on the generated part) replaced by ``mask_id``."""
    return torch.where(prompt_real, torch.full_like(x, mask_id), x)


def select_top_k(confidence: Tensor, k: Tensor) -> Tensor:
    """Boolean (B, T) marking the ``k[b]`` highest-confidence positions of each row."""
    k_max = int(k.max().item()) if k.numel() else 0
    selected = torch.zeros_like(confidence, dtype=torch.bool)
    if k_max == 0:
        return selected
    index = torch.topk(confidence, k=k_max, dim=-1).indices
    keep = torch.arange(k_max, device=confidence.device)[None, :] < k[:, None]
    return selected.scatter_(1, index, keep)


# ---------------------------------------------------------------------------------------
# output


@dataclass
class SampleOutput:
    """Result of a sampler.

    Attributes:
        canvas: (B, P + gen_length) prompt followed by the answer.
        prompt_length: P.
        model_calls: forward passes (a CFG cond+uncond pair is one call of batch 2B).
        forward_rows: sequences processed by the model over all calls.
        seconds: wall-clock time of the sampling loop.
        eos_id: EOS id used by ``answer()`` when none is given.
        tokens_processed: token positions fed to the model over all calls and rows (0: not
            counted by this decoder).
    """

    canvas: Tensor
    prompt_length: int
    model_calls: int
    forward_rows: int
    seconds: float = 0.0
    eos_id: int | None = None
    tokens_processed: int = 0

    @property
    def answer_ids(self) -> Tensor:
        """(B, gen_length) generated part of the canvas."""
        return self.canvas[:, self.prompt_length :]

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all positions of all rows) per wall-clock second."""
        return self.answer_ids.numel() / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_processed_per_answer_token(self) -> float:
        """``tokens_processed`` / generated positions (all rows): compute per answer token."""
        return self.tokens_processed / self.answer_ids.numel()

    def answer(self, eos_id: int | None = None) -> list[list[int]]:
        """Generated ids per row, cut before the first EOS (``eos_id`` or ``self.eos_id``)."""
        return strip_after_eos(self.answer_ids, self.eos_id if eos_id is None else eos_id)


# ---------------------------------------------------------------------------------------
# internals


def call_model(model: Model, input_ids: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
    """Logits (B, T, V') from any model callable (mask passed only when given; ``kwargs``
    such as ``kv_cache`` passed on)."""
    if attention_mask is None:
        out = model(input_ids, **kwargs)
    else:
        out = model(input_ids, attention_mask, **kwargs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        expected = (*input_ids.shape, "V")
        raise ValueError(f"model must return logits of shape (B, T, V) = {expected}, got {shape}")
    return logits


def check_cache(cache: str, *, gen_length: int, block_length: int, names: tuple[str, str] = ("gen_length",
                                                                                            "block_length")) -> None:
    """Refuse an unknown cache, and the dual cache without a suffix to keep (one block);
    ``names`` are how the caller spells the answer length and the block length."""
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r} is unknown; allowed: {', '.join(map(repr, CACHES))}")
    if cache == "dual" and block_length >= gen_length:
        length, block = names
        smaller = [d for d in range(1, gen_length) if gen_length % d == 0]
        raise ValueError(
            f"cache='dual' keeps the keys/values after the current block, so it needs more than one block "
            f"({block} < {length}), got {block}={block_length} with {length}={gen_length}; allowed: a {block} "
            f"dividing {gen_length} below it ({', '.join(map(str, smaller)) or 'none'}), or cache='prefix' / 'none'"
        )


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


def _check_blocks(gen_length: int, block_length: int) -> None:
    if gen_length < 1:
        raise ValueError(f"gen_length must be >= 1, got {gen_length}")
    if block_length < 1 or gen_length % block_length:
        raise ValueError(
            f"gen_length={gen_length} must be a positive multiple of block_length={block_length}; "
            f"allowed block lengths divide {gen_length}"
        )


# ---------------------------------------------------------------------------------------
# samplers


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
    _check_blocks(gen_length, block_length)
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
    _check_blocks(gen_length, block_length)
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
