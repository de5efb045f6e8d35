"""The AR's exact log-likelihood of an answer given a prompt, lm-eval's is_greedy, and the
multiple-choice scorer.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
import torch.nn.functional as F
from torch import Tensor
from lldiff.objectives.ar.loss import ar_nll
from lldiff.objectives.common.scoring import Scorer
from lldiff.objectives.common.likelihood import TokenBatch, as_pairs, check_answer_ids, check_prompt_mask, joined, vocab_size_of



Model = Callable[..., Tensor]


@torch.no_grad()
def ar_loglik(
    model: Model,
    prompt: TokenBatch,
    answer: TokenBatch,
    *,
    prompt_mask: Tensor | None = None,
    mask_id: int | None = None,
) -> Tensor:
    """Exact ``log p(answer | prompt) = sum_i log p(answer_i | prompt, answer_<i)`` in nats,
    shape (B,), for a causal model (logits at position i predict token i+1).

    The prompt must be non-empty (prepend a BOS token to score an unconditional sequence):
    the first answer token is predicted from the last prompt position. ``prompt_mask``
    (B, P) marks real tokens of left-padded tensor prompts (True = real) and is passed as
    ``attention_mask``; each row needs at least one real prompt token. Lists of 1-D
    tensors are scored one example at a time. ``mask_id``, if given, is rejected in
    ``answer`` like in the MDM functions.
    """
    is_list, prompts, answers = as_pairs(prompt, answer, "ar_loglik")
    pmask = check_prompt_mask(prompt_mask, prompts[0], is_list)
    for a in answers:
        check_answer_ids(a, mask_id, vocab_size=vocab_size_of(model))
    if not is_list:
        p = prompts[0].shape[1]
        if p == 0:
            raise ValueError("ar_loglik: prompt is empty (length 0); prepend a BOS token")
        if pmask is not None and not pmask[:, -1].all():
            raise ValueError("ar_loglik: prompt_mask must describe left padding (last prompt token real)")
        return _ar_group(model, prompts[0], answers[0], pmask)
    out = []
    for i, (pr, a) in enumerate(zip(prompts, answers)):
        if pr.numel() == 0:
            raise ValueError(f"ar_loglik: prompt {i} is empty (length 0); prepend a BOS token")
        out.append(_ar_group(model, pr[None], a[None], None)[0])
    return torch.stack(out)


def _ar_group(model: Model, prompt: Tensor, answer: Tensor, pmask: Tensor | None) -> Tensor:
    p = prompt.shape[1]
    tokens = torch.cat([prompt.to(answer.dtype), answer], dim=1)
    if pmask is None:
        nll = ar_nll(model, tokens)  # (B, P+L-1): token j+1 given tokens[:j+1]
    else:
        attn = torch.cat([pmask, torch.ones_like(answer, dtype=torch.bool)], dim=1)
        logits = model(tokens[:, :-1], attention_mask=attn[:, :-1]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
            tokens.shape[0], -1
        )
    return -nll[:, p - 1 :].double().sum(dim=1).float()


@torch.no_grad()
def ar_is_greedy(model: Model, prompt: Tensor, answer: Tensor, *, mask_id: int | None = None) -> bool:
    """Whether every answer token is the argmax given the prompt and the answer before it."""
    logits = model(joined(prompt, answer))
    logits = getattr(logits, "logits", logits)[0, prompt.numel() - 1: -1]
    return bool((logits.argmax(-1) == answer).all())


def ar_scorer(model: Callable[..., Tensor], *, mask_id: int | None = None) -> Scorer:
    """Exact AR log-likelihood; the context must be non-empty (use a boundary token)."""

    def score(context: Tensor, choice: Tensor) -> float:
        return float(ar_loglik(model, [context], [choice], mask_id=mask_id)[0])

    return score
