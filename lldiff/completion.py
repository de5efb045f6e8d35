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
    decoding above ``threshold`` confidence), ``cfg_scale`` > 0 for classifier-free guidance.
    AR: greedy at ``temperature`` 0, else sampling with optional ``top_k`` / ``top_p``.
    """

    length: int = 64
    temperature: float = 0.0
    steps: int | None = None
    block_length: int | None = None
    remasking: str = "low_confidence"
    threshold: float = 0.9
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

    @property
    def block(self) -> int:
        return self.block_length or min(32, self.length)


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
        sample = generate_threshold(model, ids, threshold=options.threshold, **common)
    else:
        sample = generate(model, ids, steps=options.steps or options.length, remasking=options.remasking, **common)
    return Completion(sample.answer(eos_id), sample.model_calls)
