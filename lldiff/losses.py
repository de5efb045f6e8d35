"""Per-token cross-entropy from the backbone's final hidden states, in chunks of rows.

Every training loss of every objective (AR, MDM, BD3, their SFT losses) and the validation
scores get their per-token CE from :func:`token_ce`, so all of them share one code path for
the LM head:

* only the rows that are scored are read out: an MDM or BD3 loss scores its masked positions
  only (about half of them on average, ``E[t] = 1/2``), so the head runs on those rows alone
  (BD3's clean half ``x_0`` is never read out at all);
* those rows go through the head in chunks of ``chunk_tokens`` (:func:`linear_cross_entropy`),
  each chunk under gradient checkpointing, so no more than about one chunk of ``(rows, V)``
  logits (and their fp32 copy and softmax) is alive at once, in the forward or the backward.
  The price is the head's forward once more for every chunk but the last (about 1/3 of the
  head's matmul FLOPs when there are many chunks).

The value and the gradients are those of the plain ``F.cross_entropy(model(x).float(), y)``
on the same rows (the same matmul in the same dtype, the CE in fp32), up to float rounding.

A model offers this through two things: an attribute ``loss_chunk_tokens`` (rows per chunk,
an integer) and a ``readout=`` keyword in its call: ``model(ids, ..., readout=f)`` returns
``f(hidden, head_weight)`` with ``hidden`` the final normed states (B, T, d) instead of the
logits. Every :class:`lldiff.modules.LMBase` does (``loss_chunk_tokens``, default 4096), and a
:class:`lldiff.model.Transformer` whose ``loss_chunk_tokens`` is set (the class leaves it None);
the readout runs inside the backbone's forward, so FSDP2's gathered head weight and autocast
apply to it as to the plain head. A model whose ``loss_chunk_tokens`` is None, and any other
callable returning logits (B, T, V), is scored from its full logits (every position), exactly
as before chunking existed.

The masked-row selection reads the number of selected positions, one device-to-host copy per
loss (``nonzero``); the AR pre-training loss selects nothing and has none, nor has any loss of
a model without chunks (``loss_chunk_tokens`` None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 4096
"""Default rows per LM-head chunk of a LightningModule (``loss_chunk_tokens``): a CPU run of
the tiny sizes scores fewer rows per step and never chunks; smdm-113M's 16 x 1024-token AR
batch runs in 4 chunks of 4096 x 32000 logits (0.5 GB in fp32) instead of one of 2 GB."""


def check_chunk_tokens(chunk_tokens: Any) -> None:
    """Refuse a chunk size that is not a positive integer or None."""
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"loss_chunk_tokens must be a positive integer (rows per LM-head chunk) or null "
                         f"(one chunk), got {chunk_tokens!r}")


def _chunk_ce(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """CE of one chunk: the head's matmul in the current (autocast) dtype, the CE in fp32."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """Per-row ``CE(hidden @ weight.T, targets)`` in fp32, shape (N,), from ``hidden`` (N, d),
    the head's ``weight`` (V, d) and ``targets`` (N,), computing at most ``chunk_tokens`` rows
    of logits at a time.

    Every chunk but the last runs under non-reentrant gradient checkpointing: its logits are
    freed once its CE is known and recomputed, one chunk at a time, in the backward. The last
    chunk (processed last, differentiated first) keeps its logits; so do all rows when they fit
    in one chunk (``chunk_tokens`` None or >= N): then this is exactly the plain loss."""
    check_chunk_tokens(chunk_tokens)
    rows = hidden.shape[0]
    if chunk_tokens is None or rows <= chunk_tokens:
        return _chunk_ce(hidden, weight, targets)
    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, rows, chunk_tokens):
        end = min(start + chunk_tokens, rows)
        if differentiable and end < rows:
            parts.append(checkpoint(_chunk_ce, hidden[start:end], weight, targets[start:end],
                                    use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_chunk_ce(hidden[start:end], weight, targets[start:end]))
    return torch.cat(parts)


def selected_ce(hidden: Tensor, weight: Tensor, targets: Tensor, select: Tensor | None = None,
                chunk_tokens: int | None = None) -> Tensor:
    """Per-position CE (B, T) in fp32 from hidden states (B, T, d) and the head's weight (V, d),
    computed on the ``select`` (B, T) bool positions only (all when None) and exactly 0 at the
    others, in chunks of ``chunk_tokens`` selected rows (:func:`linear_cross_entropy`)."""
    if hidden.shape[:2] != targets.shape or (select is not None and select.shape != targets.shape):
        raise ValueError(f"hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)} and select "
                         f"{None if select is None else tuple(select.shape)} must agree on (B, T)")
    # the result is a fresh (B, T) tensor, never a view: it is the backbone's output, on which
    # FSDP2 registers its pre-backward hook (a view would draw its warning, and lose the hook
    # to any in-place op)
    if select is None:
        ce = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_tokens)
        return ce.view(targets.shape).clone()
    picked = select.nonzero(as_tuple=True)  # the selected (b, t): one device-to-host read of their count
    ce = linear_cross_entropy(hidden[picked], weight, targets[picked], chunk_tokens)
    return torch.zeros(targets.shape, dtype=ce.dtype, device=ce.device).index_put(picked, ce)


def logits_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position CE (B, T) in fp32 of full logits (B, T, V): the plain loss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)


def offers_readout(model: Any) -> bool:
    """Whether ``model`` takes ``readout=`` and asks for chunks (an integer
    ``loss_chunk_tokens``; see the module docstring)."""
    return getattr(model, "loss_chunk_tokens", None) is not None


def token_ce(model: Callable[..., Tensor], input_ids: Tensor, targets: Tensor, select: Tensor | None = None,
             **model_kwargs: Any) -> Tensor:
    """Per-position cross-entropy (B, T) in fp32 of ``targets`` (B, T) under the predictions
    of ``model(input_ids, **model_kwargs)`` at its first T output positions (BD3 feeds 2L
    tokens and scores the first L), 0 where ``select`` (B, T) is False.

    A model that offers a readout (:func:`offers_readout`) returns it from the hidden states:
    selected rows only, in chunks of its ``loss_chunk_tokens``. Any other model's logits are
    scored in full and multiplied by ``select`` (no selection: no device-to-host read)."""
    length = targets.shape[1]
    if not offers_readout(model):
        ce = logits_ce(model(input_ids, **model_kwargs)[:, :length], targets)
        return ce if select is None else ce * select
    chunk_tokens = model.loss_chunk_tokens

    def readout(hidden: Tensor, weight: Tensor) -> Tensor:
        return selected_ce(hidden[:, :length], weight, targets, select, chunk_tokens)

    return model(input_ids, readout=readout, **model_kwargs)
