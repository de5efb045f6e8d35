"""What the likelihood estimators share (SPEC §5): input checks, prompt/answer batches, and the
Monte-Carlo draws of how many answer tokens to mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import torch
from torch import Tensor



Model = Callable[..., Tensor]


TokenBatch = Tensor | Sequence[Tensor]


def check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def vocab_size_of(model: object) -> int | None:
    config = getattr(model, "cfg", None) or getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def check_answer_ids(answer: Tensor, mask_id: int | None, what: str = "answer", *,
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


def as_pairs(prompt: TokenBatch, answer: TokenBatch, what: str) -> tuple[bool, list, list]:
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


def check_prompt_mask(prompt_mask: Tensor | None, prompt: Tensor, is_list: bool) -> Tensor | None:
    if prompt_mask is None:
        return None
    if is_list:
        raise ValueError("prompt_mask is only for equal-length tensor batches; lists need no padding")
    if prompt_mask.shape != prompt.shape:
        raise ValueError(
            f"prompt_mask shape {tuple(prompt_mask.shape)} != prompt shape {tuple(prompt.shape)}"
        )
    return prompt_mask.bool()


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
    check_count("answer length", answer_len)
    check_count("n", n)
    return mask_counts(1, answer_len, n, stratified=stratified, device=device, generator=generator)[0]


def mask_counts(
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


def call_logits(model: Model, ids: Tensor, attn: Tensor | None) -> Tensor:
    return model(ids) if attn is None else model(ids, attention_mask=attn)


def joined(prompt: Tensor, answer: Tensor) -> Tensor:
    return torch.cat([prompt.to(answer.dtype), answer])[None]
