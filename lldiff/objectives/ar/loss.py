"""The AR's losses: next-token cross-entropy for pre-training, the exact per-token NLL for
validation, and the SFT loss on response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from torch import Tensor
from lldiff.losses import token_ce



Model = Callable[[Tensor], Tensor]


def ar_nll(model: Model, tokens: Tensor) -> Tensor:
    """Per-token next-token NLL, shape (B, L-1): tokens[:, 1:] given their prefixes."""
    return token_ce(model, tokens[:, :-1], tokens[:, 1:])


def ar_loss(model: Model, tokens: Tensor) -> Tensor:
    """Ordinary next-token cross-entropy, mean over predicted tokens."""
    return ar_nll(model, tokens).mean()


def ar_sft_loss(model: Model, tokens: Tensor, response: Tensor) -> Tensor:
    """Next-token CE on response tokens only (prompt tokens are context, never targets),
    averaged over all response tokens of the batch."""
    targets = response[:, 1:]
    if not bool(targets.any()):
        raise ValueError("no response tokens to predict")
    return token_ce(model, tokens[:, :-1], tokens[:, 1:], targets).sum() / targets.sum()
