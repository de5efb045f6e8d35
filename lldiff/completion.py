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
from typing import Any

import torch

from lldiff import objectives as registry
from lldiff.model import Transformer
from lldiff.objectives import Objective, article
from lldiff.objectives.common.decoding import Completion, DecodeOptions


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
    labels = [family.label for family in registry.families().values() if name in getattr(family, kind)]
    return " and ".join(labels) if labels else "no"


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


