"""What every decoder shares: the model call, the sampler's output, cutting answers at EOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from torch import Tensor
from lldiff.registry import Objective
from lldiff.objectives.common.remasking import DECODER_REMASKING
from dataclasses import fields



Model = Callable[..., Any]


@dataclass
class SampleOutput:
    """Result of a sampler.

    Attributes:
        canvas: (B, P + gen_length) prompt followed by the answer.
        prompt_length: P.
        model_calls: forward passes (a CFG cond+uncond pair is one call of batch 2B).
        forward_rows: sequences processed by the model over all calls.
        seconds: wall-clock time of the sampling loop.
        eos_id: EOS id used by ``answer()`` when none is given.
        tokens_processed: token positions fed to the model over all calls and rows (0: not
            counted by this decoder).
    """

    canvas: Tensor
    prompt_length: int
    model_calls: int
    forward_rows: int
    seconds: float = 0.0
    eos_id: int | None = None
    tokens_processed: int = 0

    @property
    def answer_ids(self) -> Tensor:
        """(B, gen_length) generated part of the canvas."""
        return self.canvas[:, self.prompt_length :]

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all positions of all rows) per wall-clock second."""
        return self.answer_ids.numel() / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_processed_per_answer_token(self) -> float:
        """``tokens_processed`` / generated positions (all rows): compute per answer token."""
        return self.tokens_processed / self.answer_ids.numel()

    def answer(self, eos_id: int | None = None) -> list[list[int]]:
        """Generated ids per row, cut before the first EOS (``eos_id`` or ``self.eos_id``)."""
        return strip_after_eos(self.answer_ids, self.eos_id if eos_id is None else eos_id)


def call_model(model: Model, input_ids: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
    """Logits (B, T, V') from any model callable (mask passed only when given; ``kwargs``
    such as ``kv_cache`` passed on)."""
    if attention_mask is None:
        out = model(input_ids, **kwargs)
    else:
        out = model(input_ids, attention_mask, **kwargs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        expected = (*input_ids.shape, "V")
        raise ValueError(f"model must return logits of shape (B, T, V) = {expected}, got {shape}")
    return logits


def strip_after_eos(ids: Tensor, eos_id: int | None) -> list[list[int]]:
    """Rows of ``ids`` (B, L) as lists, each cut before its first ``eos_id`` (if any)."""
    rows = ids.tolist()
    if eos_id is None:
        return rows
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. ``length`` is the MDM's answer canvas and the AR's and BD3's new-token
    budget (``registry``'s ``length_is_budget``).

    MDM: ``steps`` model calls in all (default ``length``), semi-autoregressive blocks of
    ``block_length`` (default ``min(32, length)``; ``length`` = one block), ``remasking``
    ``low_confidence`` (LLaDA's default), ``random`` (Alg. 4) or ``threshold`` (parallel
    decoding above ``threshold`` confidence, default 0.9), ``cfg_scale`` > 0 for
    classifier-free guidance, ``cache`` ``none`` (exact), ``prefix`` or ``dual`` (Fast-dLLM's
    approximate KV caches, SPEC §10; ``dual`` needs more than one block). BD3: the model's own
    blocks, ``steps_per_block`` model calls per block (default: the block size), ``remasking`` /
    ``threshold`` / ``cfg_scale`` /
    ``forbid_eos`` as the MDM. AR: greedy at ``temperature`` 0, else sampling with optional
    ``top_k`` / ``top_p``. Values that would be ignored or replaced are refused (ValueError):
    ``threshold`` without ``remasking="threshold"``, ``steps`` / ``steps_per_block`` with it,
    ``top_k`` / ``top_p`` at ``temperature`` 0, zero ``steps`` / ``block_length``, ``cache="dual"``
    with one block.
    """

    length: int = 64
    temperature: float = 0.0
    steps: int | None = None
    block_length: int | None = None
    remasking: str = "low_confidence"
    threshold: float | None = None  # None: 0.9 under remasking="threshold"
    cfg_scale: float = 0.0
    forbid_eos: bool = False
    top_k: int | None = None
    top_p: float | None = None
    use_cache: bool = True
    steps_per_block: int | None = None  # BD3 (None: the block size)
    cache: str = "none"  # MDM: Fast-dLLM's approximate "prefix" / "dual" KV cache, or "none" (exact)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.remasking not in DECODER_REMASKING:
            raise ValueError(f"remasking={self.remasking!r}; allowed: {', '.join(DECODER_REMASKING)}")
        for name in ("steps", "block_length", "top_k", "steps_per_block"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.temperature >= 0:  # also NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 (0 = off), got {self.cfg_scale}")
        for name in ("threshold", "top_p"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.threshold is not None and self.remasking != "threshold":
            raise ValueError(f"threshold={self.threshold} needs remasking='threshold' "
                             f"(remasking={self.remasking!r} ignores it)")
        for name in ("steps", "steps_per_block"):
            if getattr(self, name) is not None and self.remasking == "threshold":
                raise ValueError(f"{name}={getattr(self, name)} has no effect with remasking='threshold' (it calls "
                                 "the model until each block is full)")
        if self.temperature == 0:
            for name in ("top_k", "top_p"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)} needs temperature > 0 "
                                     "(greedy decoding at temperature 0 ignores it)")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r}; allowed: {', '.join(CACHES)}")
        if self.cache == "dual":
            check_cache(self.cache, gen_length=self.length, block_length=self.block, names=("length", "block_length"))

    @property
    def block(self) -> int:
        return min(32, self.length) if self.block_length is None else self.block_length

    def given(self) -> dict[str, Any]:
        """The objective-specific fields that differ from their defaults (length and
        temperature apply to every decoder and are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in COMMON and getattr(self, f.name) != f.default}

    @classmethod
    def for_objective(cls, objective: Objective, **values: Any) -> "DecodeOptions":
        """Options for ``objective`` from a recipe of ``values`` for several objectives: the
        fields its decoder does not use (registry ``decode_options``) and None values are
        dropped, so they take their defaults."""
        keep = set(COMMON) | set(objective.decode_options)
        return cls(**{k: v for k, v in values.items() if k in keep and v is not None})


@dataclass
class Completion:
    answers: list[list[int]]  # token ids, cut before the first EOS
    model_calls: int
    tokens_processed: int = 0  # token positions the backbone embedded over all calls and rows (complete())


COMMON = ("length", "temperature")


CACHES = ("none", "prefix", "dual")  # Fast-dLLM's approximate caches for the semi-AR sampler (SPEC §10)


def check_cache(cache: str, *, gen_length: int, block_length: int, names: tuple[str, str] = ("gen_length",
                                                                                            "block_length")) -> None:
    """Refuse an unknown cache, and the dual cache without a suffix to keep (one block);
    ``names`` are how the caller spells the answer length and the block length."""
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r} is unknown; allowed: {', '.join(map(repr, CACHES))}")
    if cache == "dual" and block_length >= gen_length:
        length, block = names
        smaller = [d for d in range(1, gen_length) if gen_length % d == 0]
        raise ValueError(
            f"cache='dual' keeps the keys/values after the current block, so it needs more than one block "
            f"({block} < {length}), got {block}={block_length} with {length}={gen_length}; allowed: a {block} "
            f"dividing {gen_length} below it ({', '.join(map(str, smaller)) or 'none'}), or cache='prefix' / 'none'"
        )
