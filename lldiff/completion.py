"""Answer a batch of prompts with any model: one entry point, :func:`complete`, over the
objectives' decoders (the registry's ``decoder``): AR decoding (``ar_decoding``), the MDM
reverse process (``sampling``) and block diffusion decoding (``block_decoding``).

Used by ``lldiff generate``, ``lldiff chat``, evaluation and the studies. Prompts are token-id
lists of any lengths (left-padded into one batch); answers are cut before their first EOS.
Which :class:`DecodeOptions` fields a decoder uses is the registry's ``decode_options``;
:func:`complete` refuses the others (except those in ``decode_ignores``, which a recipe shared
by several objectives may carry, e.g. the MDM's ``block_length`` passed to an AR model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from lldiff import registry
from lldiff.ar_decoding import ar_generate
from lldiff.block_decoding import block_generate
from lldiff.model import Transformer
from lldiff.registry import Objective, article
from lldiff.sampling import (
    CACHES,
    check_cache,
    generate,
    generate_threshold,
    strip_after_eos,
)

REMASKING = ("low_confidence", "random", "threshold")


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. ``length`` is the MDM's answer canvas and the AR's and BD3's new-token
    budget (``registry``'s ``length_is_budget``).

    MDM: ``steps`` model calls in all (default ``length``), semi-autoregressive blocks of
    ``block_length`` (default ``min(32, length)``; ``length`` = one block), ``remasking``
    ``low_confidence`` (LLaDA's default), ``random`` (Alg. 4) or ``threshold`` (parallel
    decoding above ``threshold`` confidence, default 0.9), ``cfg_scale`` > 0 for
    classifier-free guidance, ``cache`` ``none`` (exact), ``prefix`` or ``dual`` (Fast-dLLM's
    approximate KV caches, SPEC §10; ``dual`` needs more than one block). BD3: the model's own
    blocks, ``steps_per_block`` model calls per block (default: the block size), ``remasking`` /
    ``threshold`` / ``cfg_scale`` /
    ``forbid_eos`` as the MDM. AR: greedy at ``temperature`` 0, else sampling with optional
    ``top_k`` / ``top_p``. Values that would be ignored or replaced are refused (ValueError):
    ``threshold`` without ``remasking="threshold"``, ``steps`` / ``steps_per_block`` with it,
    ``top_k`` / ``top_p`` at ``temperature`` 0, zero ``steps`` / ``block_length``, ``cache="dual"``
    with one block.
    """

    length: int = 64
    temperature: float = 0.0
    steps: int | None = None
    block_length: int | None = None
    remasking: str = "low_confidence"
    threshold: float | None = None  # None: 0.9 under remasking="threshold"
    cfg_scale: float = 0.0
    forbid_eos: bool = False
    top_k: int | None = None
    top_p: float | None = None
    use_cache: bool = True
    steps_per_block: int | None = None  # BD3 (None: the block size)
    cache: str = "none"  # MDM: Fast-dLLM's approximate "prefix" / "dual" KV cache, or "none" (exact)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}; allowed: {', '.join(REMASKING)}")
        for name in ("steps", "block_length", "top_k", "steps_per_block"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.temperature >= 0:  # also NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 (0 = off), got {self.cfg_scale}")
        for name in ("threshold", "top_p"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.threshold is not None and self.remasking != "threshold":
            raise ValueError(f"threshold={self.threshold} needs remasking='threshold' "
                             f"(remasking={self.remasking!r} ignores it)")
        for name in ("steps", "steps_per_block"):
            if getattr(self, name) is not None and self.remasking == "threshold":
                raise ValueError(f"{name}={getattr(self, name)} has no effect with remasking='threshold' (it calls "
                                 "the model until each block is full)")
        if self.temperature == 0:
            for name in ("top_k", "top_p"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)} needs temperature > 0 "
                                     "(greedy decoding at temperature 0 ignores it)")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r}; allowed: {', '.join(CACHES)}")
        if self.cache == "dual":
            check_cache(self.cache, gen_length=self.length, block_length=self.block, names=("length", "block_length"))

    @property
    def block(self) -> int:
        return min(32, self.length) if self.block_length is None else self.block_length

    def given(self) -> dict[str, Any]:
        """The objective-specific fields that differ from their defaults (length and
        temperature apply to every decoder and are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in COMMON and getattr(self, f.name) != f.default}

    @classmethod
    def for_objective(cls, objective: Objective, **values: Any) -> "DecodeOptions":
        """Options for ``objective`` from a recipe of ``values`` for several objectives: the
        fields its decoder does not use (registry ``decode_options``) and None values are
        dropped, so they take their defaults."""
        keep = set(COMMON) | set(objective.decode_options)
        return cls(**{k: v for k, v in values.items() if k in keep and v is not None})


COMMON = ("length", "temperature")


def check_options(options: DecodeOptions, objective: Objective, *, strict: bool = False) -> None:
    """Refuse (ValueError) the fields of ``options`` given for another objective's decoder:
    those not in the registry's ``decode_options`` of ``objective`` (with ``strict=False``
    also tolerating its ``decode_ignores``), naming the objectives they apply to."""
    allowed = set(objective.decode_options) | (set() if strict else set(objective.decode_ignores))
    for name, value in options.given().items():
        if name not in allowed:
            raise ValueError(f"{name}={value} applies to {option_owners(name)} models only; "
                             f"this is {article(objective.label)} {objective.label} model{cache_hint(name, objective)}")


def cache_hint(name: str, objective: Objective) -> str:
    """For ``cache`` given to a decoder with an exact KV cache of its own (``use_cache`` in the
    registry's ``decode_options``): say so; else nothing."""
    if name == "cache" and "use_cache" in objective.decode_options:
        return ", whose decoder uses its exact KV cache, on by default (use_cache)"
    return ""


def option_owners(name: str, kind: str = "decode_options") -> str:
    """The labels of the objective families whose ``kind`` (``decode_options`` or
    ``score_options``) include ``name``: "AR", "MDM and BD3", ..."""
    labels = [family.label for family in registry.FAMILIES.values() if name in getattr(family, kind)]
    return " and ".join(labels) if labels else "no"




@dataclass
class Completion:
    answers: list[list[int]]  # token ids, cut before the first EOS
    model_calls: int
    tokens_processed: int = 0  # token positions the backbone embedded over all calls and rows (complete())


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"):
    """``(ids, attention_mask)`` of the prompts right-aligned in one (B, P) batch."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, tokens in enumerate(prompts):
        ids[row, width - len(tokens):] = torch.tensor(list(tokens))
        mask[row, width - len(tokens):] = True
    return ids.to(device), mask.to(device)


def check_context(prompt_length: int, new: int, context: int) -> None:
    if prompt_length + new > context:
        raise ValueError(f"prompt ({prompt_length} tokens) + {new} new tokens exceeds the model's context "
                         f"max_seq_len={context}; shorten the prompt or the answer length")


@torch.no_grad()
def complete(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    options: DecodeOptions,
    *,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Completion:
    """Answer every prompt (token ids) with ``model`` (any objective's backbone), using the
    decoder the registry names for its objective."""
    objective = registry.of_model(model)
    check_options(options, objective)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    check_context(ids.shape[1], options.length, model.cfg.max_seq_len)
    counted = [0]

    def count(module: Any, inputs: tuple, output: Any) -> None:  # every forward embeds its input ids once
        counted[0] += inputs[0].numel()

    hook = model.embed.register_forward_hook(count)
    try:
        out = objective.decoder()(model, ids, mask, options, eos_id=eos_id, generator=generator)
    finally:
        hook.remove()
    out.tokens_processed = counted[0]
    return out


# -- the registry's decoders: (model, ids (B, P) left-padded, mask (B, P), options) -> Completion ----------


def ar_complete(model: Transformer, ids: Tensor, mask: Tensor, options: DecodeOptions, *, eos_id: int,
                generator: torch.Generator | None = None) -> Completion:
    """AR decoding with a KV cache (``use_cache``), greedy or sampled with ``top_k`` / ``top_p``."""
    out = ar_generate(model, ids, max_new_tokens=options.length, temperature=options.temperature,
                      top_k=options.top_k, top_p=options.top_p, attention_mask=mask, eos_id=eos_id,
                      use_cache=options.use_cache, generator=generator)
    return Completion(strip_after_eos(out.tokens[:, ids.shape[1]:], eos_id), out.model_calls)


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


def block_diffusion_complete(model: Transformer, ids: Tensor, mask: Tensor, options: DecodeOptions, *,
                             eos_id: int, generator: torch.Generator | None = None) -> Completion:
    """Block diffusion decoding in the model's own blocks (``lldiff.block_decoding``)."""
    sample = block_generate(
        model, ids, gen_length=options.length, block_size=model.cfg.block_size, mask_id=model.cfg.mask_id,
        steps_per_block=options.steps_per_block, remasking=options.remasking, threshold=options.threshold,
        temperature=options.temperature, cfg_scale=options.cfg_scale, attention_mask=mask, eos_id=eos_id,
        forbid_eos=options.forbid_eos, generator=generator, use_cache=options.use_cache,
    )
    return Completion(sample.answer(eos_id), sample.model_calls)
