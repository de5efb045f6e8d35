"""Multiple-choice scoring shared by every objective: a scorer maps (context ids, choice ids) to
a log-likelihood.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import torch
from torch import Tensor



Scorer = Callable[[Tensor, Tensor], float]
"""``scorer(context_ids (P,), choice_ids (L,)) -> log p(choice | context)`` in nats."""


def score_choices(scorer: Scorer, context_ids: Sequence[int] | Tensor, choices_ids: Sequence[Sequence[int] | Tensor]) -> list[float]:
    """``[scorer(context, choice) for choice in choices]`` as floats (1-D long tensors in)."""
    context = torch.as_tensor(context_ids, dtype=torch.long)
    return [float(scorer(context, torch.as_tensor(c, dtype=torch.long))) for c in choices_ids]
