"""BD3's log-likelihood (SPEC §9): a Monte-Carlo lower bound on log p(answer | prompt) block by
block, lm-eval's is_greedy, and the multiple-choice scorer.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
import torch.nn.functional as F
from torch import Tensor
from lldiff.objectives.bd3.loss import bd3_logits, block_ids
from lldiff.objectives.common.scoring import Scorer
from lldiff.objectives.common.likelihood import TokenBatch, as_pairs, check_answer_ids, check_count, joined, vocab_size_of



Model = Callable[..., Tensor]


def _bd3_one(
    model: Model, prompt: Tensor, answer: Tensor, *, mask_id: int, block_size: int, n_mc: int, batch_size: int,
    generator: torch.Generator | None, stratified: bool,
) -> Tensor:
    """One example: prompt (P,), answer (L,) -> scalar mean estimate (float64)."""
    p, length = prompt.numel(), answer.numel()
    device = answer.device
    x0 = torch.cat([prompt.to(answer.dtype), answer])[None]  # (1, T)
    total_len = p + length
    ids = block_ids(total_len, block_size, device)  # (T,)
    n_blocks = int(ids[-1]) + 1
    maskable = torch.arange(total_len, device=device) >= p
    m = torch.zeros(n_blocks, dtype=torch.long, device=device).index_add_(0, ids, maskable.long())  # (n_blocks,)
    if int(m.max()) <= 1:
        n_mc = 1  # every block has at most one answer position: l = 1, one subset, the exact value
    # l for every (draw, block): U{1..m_b}, stratified over the draws with one offset per block
    if stratified:
        u = torch.rand(1, n_blocks, device=device, generator=generator, dtype=torch.float64)
        grid = (u + torch.arange(n_mc, device=device, dtype=torch.float64)[:, None] / n_mc) % 1.0
    else:
        grid = torch.rand(n_mc, n_blocks, device=device, generator=generator, dtype=torch.float64)
    counts = torch.minimum(1 + (grid * m).floor().long(), m)  # (n_mc, n_blocks); 0 where m_b = 0
    weight = m.double() / counts.clamp(min=1)  # (n_mc, n_blocks): m_b / l_b
    # sort key: block first, then the maskable positions in random order, then the prompt positions
    order_base = ids.double() * 4.0 + torch.where(maskable, 0.0, 2.0).double()
    block_start = ids * block_size
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n_mc, batch_size):
        l = counts[start:start + batch_size]  # (r, n_blocks)
        r = l.shape[0]
        key = order_base + torch.rand(r, total_len, device=device, generator=generator, dtype=torch.float64)
        rank_in_block = key.argsort(dim=1).argsort(dim=1) - block_start  # maskable positions first in their block
        masked = (rank_in_block < l[:, ids]) & maskable
        target = x0.expand(r, -1)
        xt = torch.where(masked, torch.full_like(target, mask_id), target)
        logits = bd3_logits(model, xt, target, block_size).float()
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(r, total_len)
        total += (ce.double() * masked * weight[start:start + batch_size][:, ids]).sum()
    return -total / n_mc


@torch.no_grad()
def bd3_conditional_loglik(
    model: Model,
    prompt: TokenBatch,
    answer: TokenBatch,
    *,
    mask_id: int,
    block_size: int,
    n_mc: int = 128,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    stratified: bool = True,
) -> Tensor:
    """Per-example Monte-Carlo lower bound on ``log p(answer | prompt)`` in nats under block
    diffusion with blocks of ``block_size`` (see the module docstring), shape (B,).

    Args:
        model: ``model(ids (N, 2T), positions=(2T,), attn_mask=...) -> logits``: a
            block-attention :class:`lldiff.model.Transformer` (any model that takes the
            ``[x_t ⊕ x_0]`` mask of :func:`lldiff.objectives.bd3.loss.bd3_logits`).
        prompt: (B, P) tensor (P may be 0) or a list of 1-D tensors; no padding (the blocks
            are aligned to the first position).
        answer: (B, L) tensor with L >= 1 or a list of non-empty 1-D tensors, without ``mask_id``.
        mask_id, block_size: the model's mask token and block size.
        n_mc: Monte-Carlo draws per example (one draw when no block holds two answer
            positions: the value is then exact).
        batch_size: draws per forward pass (each a sequence of 2 (P + L) tokens).
        generator: RNG of the l values and the masks.
        stratified: stratify each block's l over the draws (both settings are unbiased).
    """
    check_count("n_mc", n_mc)
    check_count("batch_size", batch_size)
    check_count("block_size", block_size)
    is_list, prompts, answers = as_pairs(prompt, answer, "bd3_conditional_loglik")
    if not is_list:
        prompts, answers = list(prompts[0].unbind(0)), list(answers[0].unbind(0))
    out = []
    for p, a in zip(prompts, answers):
        check_answer_ids(a, mask_id, vocab_size=vocab_size_of(model))
        out.append(_bd3_one(model, p, a, mask_id=mask_id, block_size=block_size, n_mc=n_mc, batch_size=batch_size,
                            generator=generator, stratified=stratified))
    return torch.stack(out).float()


@torch.no_grad()
def bd3_is_greedy(model: Model, prompt: Tensor, answer: Tensor, *, mask_id: int, block_size: int) -> bool:
    """Whether each block's answer positions, all masked with the earlier blocks clean, are
    predicted by argmax (one ``[x_t ⊕ x_0]`` forward)."""
    x0 = joined(prompt, answer)
    xt = joined(prompt, torch.full_like(answer, mask_id))
    logits = bd3_logits(model, xt, x0, block_size)[0, prompt.numel():]
    if mask_id < logits.shape[-1]:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    return bool((logits.argmax(-1) == answer).all())


def bd3_scorer(
    model: Callable[..., Tensor],
    *,
    mask_id: int,
    block_size: int,
    n_mc: int = 32,
    batch_size: int = 32,
    seed: int = 0,
) -> Scorer:
    """BD3 Monte-Carlo lower bound (blocks of ``block_size`` from the first position); every
    call uses a fresh generator seeded with ``seed`` (common random numbers across choices)."""

    def score(context: Tensor, choice: Tensor) -> float:
        gen = torch.Generator(device=choice.device).manual_seed(seed)
        value = bd3_conditional_loglik(model, [context], [choice], mask_id=mask_id, block_size=block_size,
                                       n_mc=n_mc, batch_size=batch_size, generator=gen)
        return float(value[0])

    return score
