"""Likelihood evaluation (SPEC §5, LLaDA Alg. 3): pure functions, no Lightning.

Conventions: ids ``0..V-1`` are real tokens and the mask id is ``M = V``; a model is any
callable ``model(input_ids (B, T)) -> logits (B, T, V)``. When a padding mask is given it
is passed on as ``model(ids, attention_mask=...)``; otherwise the model is called with the
ids alone. Nothing here switches the model to eval mode or moves it: that is the caller's
job. Everything runs under ``torch.no_grad()``. Results are float32, in nats.

Masked diffusion (MDM)
    :func:`mdm_conditional_loglik` is LLaDA's Monte-Carlo *lower bound* on
    ``log p(answer | prompt)``: draw ``l ~ U{1..L}``, mask exactly ``l`` of the ``L`` answer
    positions uniformly without replacement (the prompt is never masked) and score
    ``-(L / l) * sum over masked positions of CE(logits, answer)``; average ``n_mc`` draws.
    :func:`mdm_elbo` is the same estimator with an empty prompt: the unconditional ELBO
    (a lower bound on ``log p(x)``) in nats per sequence.

    Relation to :func:`lldiff.objectives.mdm_elbo_nats`: that function uses the
    continuous-time *t-parametrisation* of LLaDA Alg. 1 (``t ~ U[eps, 1]``, each token masked
    independently with probability ``t``, weight ``1/t``) and returns the *negative* ELBO (a
    positive upper bound on the NLL). Enumerating mask sets ``S`` with ``|S| = k`` shows the
    two expectations are the same number: the t-form weighs ``f(S)`` by
    ``∫ t^(k-1) (1-t)^(L-k) dt = (k-1)! (L-k)! / L!`` and the l-form by
    ``(1/L) (L/k) / C(L, k)``, the same value. So, for any predictor,
    ``E[mdm_elbo] = -E[mdm_elbo_nats]`` exactly at ``eps = 0`` (up to ``O(eps)`` at the
    default ``eps = 1e-3``). The l-form used here has lower variance (never draws an empty
    mask, bounded weight ``L/l <= L``) and is what LLaDA uses for evaluation.

Autoregressive (AR)
    :func:`ar_loglik` is the exact chain rule ``sum_i log p(answer_i | prompt, answer_<i)``.

Block diffusion (BD3, SPEC §9)
    :func:`bd3_conditional_loglik` is the BD3 lower bound on ``log p(answer | prompt)``:
    the sum over blocks of the MDM bound of each block given the clean earlier blocks, in the
    l-form above applied per block (each block ``b`` with ``m_b`` answer positions draws
    ``l_b ~ U{1..m_b}`` and masks exactly ``l_b`` of them; weight ``m_b / l_b``). Blocks are
    aligned to positions ``0, 1, ...`` of ``prompt + answer``; prompt positions are never
    masked. One ``[x_t ⊕ x_0]`` forward (:func:`lldiff.block_diffusion.bd3_logits`) scores all
    blocks of a draw at once. Its expectation equals ``-E[block_diffusion.bd3_nelbo_nats]``
    with ``maskable`` = the answer at ``eps = 0`` (the enumeration argument above, per block),
    with bounded weights instead of the t-form's ``1/t`` (whose variance is infinite at
    ``eps = 0``). With at most one answer position per block (``block_size = 1``) every draw
    is the same exact value, the chain rule of the network with the mask token as the query.

Greedy checks (lm-eval's ``is_greedy``): :func:`ar_is_greedy`, :func:`mdm_is_greedy`,
:func:`bd3_is_greedy` say whether the answer is the argmax of the predictions that see none of
it (AR: its prefix; MDM: the prompt with the whole answer masked; BD3: each block masked, the
earlier blocks clean).

Ragged batches: every function accepts either equal-length tensors ``(B, P)`` / ``(B, L)``
or lists of 1-D tensors of different lengths; lists are evaluated one example at a time
(no padding, so nothing depends on how the model treats padding). Equal-length tensors
may carry a left-padded prompt with ``prompt_mask (B, P)`` (True for real tokens), passed to
the model as ``attention_mask``. With RoPE, left padding needs no position shift: a common
offset on all real tokens leaves relative positions, hence attention scores, unchanged.
A model with absolute positions must not be given left-padded prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lldiff.block_diffusion import bd3_logits, block_ids
from lldiff.objectives import ar_nll
from lldiff.sampling import cfg_logits

Model = Callable[..., Tensor]
TokenBatch = Tensor | Sequence[Tensor]


# ----------------------------------------------------------------------------- validation


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _vocab_size(model: object) -> int | None:
    config = getattr(model, "cfg", None) or getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def _check_answer_ids(answer: Tensor, mask_id: int | None, what: str = "answer", *,
                      vocab_size: int | None = None) -> None:
    """Real tokens only: not the mask id, not negative, below the vocabulary size (the model's
    ``vocab_size`` when known; else the mask id, which lldiff puts right after the vocabulary,
    while an imported LLaDA has it inside)."""
    limit = vocab_size if vocab_size is not None else mask_id
    if answer.numel() and mask_id is not None and (answer == mask_id).any():
        raise ValueError(f"{what} contains the mask id {mask_id}; {what} tokens must be real tokens")
    if answer.numel() and (answer < 0).any():
        raise ValueError(f"{what} contains a negative token id {int(answer.min())}")
    if answer.numel() and limit is not None and (answer >= limit).any():
        raise ValueError(
            f"{what} contains token id {int(answer.max())} beyond the vocabulary "
            f"(real tokens are [0, {limit}), mask id {mask_id})"
        )


def _as_pairs(prompt: TokenBatch, answer: TokenBatch, what: str) -> tuple[bool, list, list]:
    """Returns ``(is_list, prompts, answers)``; tensors are checked to be 2-D and aligned."""
    p_list = not isinstance(prompt, Tensor)
    a_list = not isinstance(answer, Tensor)
    if p_list or a_list:
        prompts = [torch.as_tensor(p) for p in (prompt if p_list else prompt.unbind(0))]
        answers = [torch.as_tensor(a) for a in (answer if a_list else answer.unbind(0))]
        if len(prompts) != len(answers):
            raise ValueError(f"{what}: got {len(prompts)} prompts but {len(answers)} answers")
        for i, (p, a) in enumerate(zip(prompts, answers)):
            if p.dim() != 1 or a.dim() != 1:
                raise ValueError(
                    f"{what}: example {i} has prompt shape {tuple(p.shape)} and answer shape "
                    f"{tuple(a.shape)}; list entries must be 1-D"
                )
            if a.numel() == 0:
                raise ValueError(f"{what}: answer {i} is empty (answer length 0); need >= 1 token")
        return True, prompts, answers
    if prompt.dim() != 2 or answer.dim() != 2:
        raise ValueError(
            f"{what}: prompt and answer must be 2-D (B, P) and (B, L), got shapes "
            f"{tuple(prompt.shape)} and {tuple(answer.shape)}"
        )
    if prompt.shape[0] != answer.shape[0]:
        raise ValueError(
            f"{what}: prompt batch size {prompt.shape[0]} != answer batch size {answer.shape[0]}"
        )
    if answer.shape[1] == 0:
        raise ValueError(f"{what}: answer is empty (answer length 0); need >= 1 token")
    return False, [prompt], [answer]


def _check_prompt_mask(prompt_mask: Tensor | None, prompt: Tensor, is_list: bool) -> Tensor | None:
    if prompt_mask is None:
        return None
    if is_list:
        raise ValueError("prompt_mask is only for equal-length tensor batches; lists need no padding")
    if prompt_mask.shape != prompt.shape:
        raise ValueError(
            f"prompt_mask shape {tuple(prompt_mask.shape)} != prompt shape {tuple(prompt.shape)}"
        )
    return prompt_mask.bool()


# ----------------------------------------------------------------------------- MDM


def sample_mask_counts(
    answer_len: int,
    n: int,
    *,
    stratified: bool = True,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` numbers of masked answer tokens ``l``, each with marginal ``U{1..L}``, shape (n,).

    ``stratified=True`` draws one offset ``u ~ U[0, 1)`` and sets
    ``l_j = 1 + floor(L * ((u + j/n) mod 1))``: evenly spaced over ``{1..L}`` with a random
    offset like upstream, with every ``l_j`` still exactly uniform, so the estimator stays
    unbiased. (Upstream uses an integer offset and ``torch.round``, whose half-to-even ties
    make some ``l_j`` non-uniform, e.g. L = 3, n = 2 gives the second draw l = 1 w.p. 2/3.) When ``n`` is a
    multiple of ``L`` every value appears exactly ``n / L`` times. ``stratified=False``
    draws the ``l_j`` independently.
    """
    _check_count("answer length", answer_len)
    _check_count("n", n)
    return _mask_counts(1, answer_len, n, stratified=stratified, device=device, generator=generator)[0]


def _mask_counts(
    b: int, answer_len: int, n: int, *, stratified: bool, device, generator: torch.Generator | None
) -> Tensor:
    """(b, n) counts; each row stratified with its own offset."""
    if stratified:
        u = torch.rand(b, 1, device=device, generator=generator, dtype=torch.float64)
        grid = (u + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
    else:
        grid = torch.rand(b, n, device=device, generator=generator, dtype=torch.float64)
    return (1 + (grid * answer_len).floor().long()).clamp_(1, answer_len)


def sample_answer_masks(
    counts: Tensor, answer_len: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Bool (n, L): row j has exactly ``counts[j]`` True positions, a uniformly random subset
    (the ``counts[j]`` smallest of ``L`` iid uniforms)."""
    scores = torch.rand(counts.shape[0], answer_len, device=counts.device, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def _call(model: Model, ids: Tensor, attn: Tensor | None) -> Tensor:
    return model(ids) if attn is None else model(ids, attention_mask=attn)


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
    counts = _mask_counts(b, length, n_mc, stratified=stratified, device=device, generator=generator)
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
            both = _call(model, torch.cat([ids, uncond]), None if attn is None else torch.cat([attn, attn]))
            cond, unc = both.float().chunk(2, dim=0)
            logits = cfg_logits(cond, unc, cfg_scale)
        else:
            logits = _call(model, ids, attn).float()
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
    _check_count("n_mc", n_mc)
    _check_count("batch_size", batch_size)
    if not cfg_scale >= 0:  # also rejects NaN
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    is_list, prompts, answers = _as_pairs(prompt, answer, "mdm_conditional_loglik")
    pmask = _check_prompt_mask(prompt_mask, prompts[0], is_list)
    for a in answers:
        _check_answer_ids(a, mask_id, vocab_size=_vocab_size(model))
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


# ----------------------------------------------------------------------------- AR


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
    is_list, prompts, answers = _as_pairs(prompt, answer, "ar_loglik")
    pmask = _check_prompt_mask(prompt_mask, prompts[0], is_list)
    for a in answers:
        _check_answer_ids(a, mask_id, vocab_size=_vocab_size(model))
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


# ----------------------------------------------------------------------------- BD3


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
            ``[x_t ⊕ x_0]`` mask of :func:`lldiff.block_diffusion.bd3_logits`).
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
    _check_count("n_mc", n_mc)
    _check_count("batch_size", batch_size)
    _check_count("block_size", block_size)
    is_list, prompts, answers = _as_pairs(prompt, answer, "bd3_conditional_loglik")
    if not is_list:
        prompts, answers = list(prompts[0].unbind(0)), list(answers[0].unbind(0))
    out = []
    for p, a in zip(prompts, answers):
        _check_answer_ids(a, mask_id, vocab_size=_vocab_size(model))
        out.append(_bd3_one(model, p, a, mask_id=mask_id, block_size=block_size, n_mc=n_mc, batch_size=batch_size,
                            generator=generator, stratified=stratified))
    return torch.stack(out).float()


# ----------------------------------------------------------------------------- greedy checks


def _joined(prompt: Tensor, answer: Tensor) -> Tensor:
    return torch.cat([prompt.to(answer.dtype), answer])[None]


@torch.no_grad()
def ar_is_greedy(model: Model, prompt: Tensor, answer: Tensor, *, mask_id: int | None = None) -> bool:
    """Whether every answer token is the argmax given the prompt and the answer before it."""
    logits = model(_joined(prompt, answer))
    logits = getattr(logits, "logits", logits)[0, prompt.numel() - 1: -1]
    return bool((logits.argmax(-1) == answer).all())


@torch.no_grad()
def mdm_is_greedy(model: Model, prompt: Tensor, answer: Tensor, *, mask_id: int) -> bool:
    """Whether one forward over the prompt and the fully masked answer predicts the answer by argmax."""
    masked = _joined(prompt, torch.full_like(answer, mask_id))
    logits = model(masked)
    logits = getattr(logits, "logits", logits)[0, prompt.numel():]
    if mask_id < logits.shape[-1]:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    return bool((logits.argmax(-1) == answer).all())


@torch.no_grad()
def bd3_is_greedy(model: Model, prompt: Tensor, answer: Tensor, *, mask_id: int, block_size: int) -> bool:
    """Whether each block's answer positions, all masked with the earlier blocks clean, are
    predicted by argmax (one ``[x_t ⊕ x_0]`` forward)."""
    x0 = _joined(prompt, answer)
    xt = _joined(prompt, torch.full_like(answer, mask_id))
    logits = bd3_logits(model, xt, x0, block_size)[0, prompt.numel():]
    if mask_id < logits.shape[-1]:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    return bool((logits.argmax(-1) == answer).all())
