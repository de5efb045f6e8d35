"""The MDM's log-likelihood (LLaDA Alg. 3, SPEC §5): a Monte-Carlo lower bound on log p(answer |
prompt), the unconditional ELBO, lm-eval's is_greedy, and the multiple-choice scorer.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
import torch.nn.functional as F
from torch import Tensor
from lldiff.objectives.common.guidance import cfg_logits
from lldiff.objectives.common.scoring import Scorer
from lldiff.objectives.common.likelihood import TokenBatch, as_pairs, call_logits, check_answer_ids, check_count, check_prompt_mask, joined, mask_counts, sample_answer_masks, vocab_size_of



Model = Callable[..., Tensor]


def _mdm_group(
    model: Model,
    prompt: Tensor,
    answer: Tensor,
    *,
    mask_id: int,
    n_mc: int,
    batch_size: int,
    cfg_scale: float,
    generator: torch.Generator | None,
    stratified: bool,
    prompt_mask: Tensor | None,
) -> Tensor:
    """Equal-length batch: prompt (B, P), answer (B, L) -> (B,) mean estimate."""
    b, p = prompt.shape
    length = answer.shape[1]
    device = answer.device
    if length == 1:
        n_mc = 1  # l = 1 and the only subset is {0}: a single draw is the exact value
    x0 = torch.cat([prompt.to(answer.dtype), answer], dim=1)  # (B, P+L)
    # counts for every (example, draw): independent offsets per example
    counts = mask_counts(b, length, n_mc, stratified=stratified, device=device, generator=generator)
    counts = counts.reshape(-1)  # (B * n_mc,), example-major; independent offsets per example
    example = torch.arange(b, device=device).repeat_interleave(n_mc)
    attn_full = None
    if prompt_mask is not None:
        attn_full = torch.cat([prompt_mask, torch.ones_like(answer, dtype=torch.bool)], dim=1)
    total = torch.zeros(b, dtype=torch.float64, device=device)
    for start in range(0, b * n_mc, batch_size):
        rows = example[start : start + batch_size]
        l = counts[start : start + batch_size]
        masked = sample_answer_masks(l, length, generator=generator)  # (r, L)
        target = x0[rows]
        ids = target.clone()
        ids[:, p:] = torch.where(masked, torch.full_like(ids[:, p:], mask_id), ids[:, p:])
        attn = None if attn_full is None else attn_full[rows]
        if cfg_scale > 0:
            uncond = ids.clone()
            uncond[:, :p] = mask_id
            both = call_logits(model, torch.cat([ids, uncond]), None if attn is None else torch.cat([attn, attn]))
            cond, unc = both.float().chunk(2, dim=0)
            logits = cfg_logits(cond, unc, cfg_scale)
        else:
            logits = call_logits(model, ids, attn).float()
        logits = logits[:, p:]
        ce = F.cross_entropy(logits.flatten(0, 1), target[:, p:].flatten(), reduction="none").view_as(masked)
        est = -(length / l.double()) * (ce.double() * masked).sum(dim=1)  # (r,)
        total.index_add_(0, rows, est)
    return (total / n_mc).float()


@torch.no_grad()
def mdm_conditional_loglik(
    model: Model,
    prompt: TokenBatch,
    answer: TokenBatch,
    *,
    mask_id: int,
    n_mc: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    stratified: bool = True,
    prompt_mask: Tensor | None = None,
) -> Tensor:
    """Per-example Monte-Carlo lower bound on ``log p(answer | prompt)`` in nats, shape (B,).

    Args:
        model: ``model(ids (N, P+L)) -> logits (N, P+L, V)``, bidirectional denoiser.
        prompt: (B, P) tensor (P may be 0) or a list of B 1-D tensors.
        answer: (B, L) tensor with L >= 1 or a list of B non-empty 1-D tensors. Must not
            contain ``mask_id``.
        mask_id: the mask token id M (= V).
        n_mc: Monte-Carlo draws per example (upstream 128). An answer of length 1 uses one
            draw whatever ``n_mc`` says: masking its only token is then the exact value.
        batch_size: draws (rows) per forward pass; with CFG each pass has twice as many rows
            (conditional and unconditional together, as upstream).
        cfg_scale: classifier-free guidance weight w >= 0; logits ``u + (w+1)(c - u)`` where
            ``u`` sees the whole prompt replaced by M (and the same masked answer). w = 0 is
            no guidance (no unconditional pass at all).
        generator: torch generator for the l values and the masks (reproducibility).
        stratified: stratify the l values over the draws of each example (see
            :func:`sample_mask_counts`); both settings are unbiased.
        prompt_mask: optional (B, P) bool for left-padded tensor prompts, True for real
            tokens; passed to the model as ``attention_mask``.
    """
    check_count("n_mc", n_mc)
    check_count("batch_size", batch_size)
    if not cfg_scale >= 0:  # also rejects NaN
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    is_list, prompts, answers = as_pairs(prompt, answer, "mdm_conditional_loglik")
    pmask = check_prompt_mask(prompt_mask, prompts[0], is_list)
    for a in answers:
        check_answer_ids(a, mask_id, vocab_size=vocab_size_of(model))
    kwargs = {
        "mask_id": mask_id, "n_mc": n_mc, "batch_size": batch_size,
        "cfg_scale": float(cfg_scale), "generator": generator, "stratified": stratified,
    }
    if not is_list:
        return _mdm_group(model, prompts[0], answers[0], prompt_mask=pmask, **kwargs)
    out = [
        _mdm_group(model, p[None], a[None], prompt_mask=None, **kwargs)[0] for p, a in zip(prompts, answers)
    ]
    return torch.stack(out)


@torch.no_grad()
def mdm_elbo(
    model: Model,
    tokens: TokenBatch,
    *,
    mask_id: int,
    n_mc: int = 128,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    stratified: bool = True,
) -> Tensor:
    """Unconditional ELBO in nats per sequence, shape (B,): a Monte-Carlo lower bound on
    ``log p(tokens)`` (l-parametrisation, LLaDA Alg. 3 with an empty prompt). Its
    expectation equals ``-E[objectives.mdm_elbo_nats]`` (t-parametrisation) at eps = 0;
    see the module docstring. ``tokens`` is (B, L) or a list of non-empty 1-D tensors."""
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"mdm_elbo: tokens must be 2-D (B, L), got shape {tuple(tokens.shape)}")
        empty: TokenBatch = tokens.new_zeros(tokens.shape[0], 0)
    else:
        empty = [torch.as_tensor(t).new_zeros(0) for t in tokens]
    return mdm_conditional_loglik(
        model, empty, tokens, mask_id=mask_id, n_mc=n_mc, batch_size=batch_size,
        generator=generator, stratified=stratified,
    )


@torch.no_grad()
def mdm_is_greedy(model: Model, prompt: Tensor, answer: Tensor, *, mask_id: int) -> bool:
    """Whether one forward over the prompt and the fully masked answer predicts the answer by argmax."""
    masked = joined(prompt, torch.full_like(answer, mask_id))
    logits = model(masked)
    logits = getattr(logits, "logits", logits)[0, prompt.numel():]
    if mask_id < logits.shape[-1]:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    return bool((logits.argmax(-1) == answer).all())


def mdm_scorer(
    model: Callable[..., Tensor],
    *,
    mask_id: int,
    n_mc: int = 32,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    seed: int = 0,
) -> Scorer:
    """MDM Monte-Carlo lower bound; every call uses a fresh generator seeded with ``seed``
    (common random numbers across the choices scored with this scorer)."""

    def score(context: Tensor, choice: Tensor) -> float:
        gen = torch.Generator(device=choice.device).manual_seed(seed)
        value = mdm_conditional_loglik(
            model, [context], [choice], mask_id=mask_id, n_mc=n_mc, batch_size=batch_size,
            cfg_scale=cfg_scale, generator=gen,
        )
        return float(value[0])

    return score
