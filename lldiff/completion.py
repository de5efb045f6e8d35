"""Answer a batch of prompts with either kind of model: one entry point over the MDM
reverse process (``sampling``) and AR decoding (``ar_decoding``).

Used by ``lldiff generate``, ``lldiff chat`` and the studies. Prompts are token-id lists of
any lengths (left-padded into one batch); answers are cut before their first EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lldiff.ar_decoding import ar_generate
from lldiff.model import Transformer
from lldiff.sampling import generate, generate_threshold, strip_after_eos

REMASKING = ("low_confidence", "random", "threshold")


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. ``length`` is the MDM's answer canvas and the AR's new-token budget.

    MDM: ``steps`` model calls in all (default ``length``), semi-autoregressive blocks of
    ``block_length`` (default ``min(32, length)``; ``length`` = one block), ``remasking``
    ``low_confidence`` (LLaDA's default), ``random`` (Alg. 4) or ``threshold`` (parallel
    decoding above ``threshold`` confidence, default 0.9), ``cfg_scale`` > 0 for
    classifier-free guidance. AR: greedy at ``temperature`` 0, else sampling with optional
    ``top_k`` / ``top_p``. Values that would be ignored or replaced are refused (ValueError):
    ``threshold`` without ``remasking="threshold"``, ``steps`` with it, ``top_k`` / ``top_p`` at
    ``temperature`` 0, zero ``steps`` / ``block_length``.
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

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}; allowed: {', '.join(REMASKING)}")
        for name in ("steps", "block_length", "top_k"):
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
        if self.steps is not None and self.remasking == "threshold":
            raise ValueError(f"steps={self.steps} has no effect with remasking='threshold' (it calls the model "
                             "until each block is full)")
        if self.temperature == 0:
            for name in ("top_k", "top_p"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)} needs temperature > 0 "
                                     "(greedy decoding at temperature 0 ignores it)")

    @property
    def block(self) -> int:
        return min(32, self.length) if self.block_length is None else self.block_length


@dataclass
class Completion:
    answers: list[list[int]]  # token ids, cut before the first EOS
    model_calls: int


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
    """Answer every prompt (token ids) with ``model`` (an MDM or an AR backbone)."""
    if not model.cfg.causal:
        for name in ("top_k", "top_p"):
            if getattr(options, name) is not None:
                raise ValueError(f"{name}={getattr(options, name)} applies to AR models only; this is an MDM")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    check_context(ids.shape[1], options.length, model.cfg.max_seq_len)
    if model.cfg.causal:
        out = ar_generate(model, ids, max_new_tokens=options.length, temperature=options.temperature,
                          top_k=options.top_k, top_p=options.top_p, attention_mask=mask, eos_id=eos_id,
                          use_cache=options.use_cache, generator=generator)
        return Completion(strip_after_eos(out.tokens[:, ids.shape[1]:], eos_id), out.model_calls)
    common = {"gen_length": options.length, "block_length": options.block, "mask_id": model.cfg.mask_id,
                  "temperature": options.temperature, "cfg_scale": options.cfg_scale, "attention_mask": mask,
                  "eos_id": eos_id, "forbid_eos": options.forbid_eos, "generator": generator}
    if options.remasking == "threshold":
        threshold = 0.9 if options.threshold is None else options.threshold
        sample = generate_threshold(model, ids, threshold=threshold, **common)
    else:
        steps = options.length if options.steps is None else options.steps
        sample = generate(model, ids, steps=steps, remasking=options.remasking, **common)
    return Completion(sample.answer(eos_id), sample.model_calls)
