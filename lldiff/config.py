"""Model shapes: the `ModelConfig` dataclass and a registry of named sizes.

One backbone serves every objective; what differs is the attention kind (SPEC §1, §9):
``causal`` (AR), ``bidirectional`` (MDM) or ``block`` (BD3: block-causal over blocks of
``block_size`` tokens), and the mask token. A model with a mask token embeds ``mask_id``:
by default a new row ``M = vocab_size`` (lldiff's own MDM and BD3), or an id inside the
vocabulary (an imported LLaDA checkpoint). The LM head always has ``vocab_size`` outputs.
Which objective sets which fields is :mod:`lldiff.objectives`'s business, not this module's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_BACKENDS = ("sdpa", "xformers", "reference")
ATTENTION_KINDS = ("causal", "bidirectional", "block")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the LLaMA-style backbone.

    Attributes:
        name: registry name (informational).
        n_layer: number of transformer blocks.
        d_model: residual width.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA); ``None`` means ``n_heads`` (MHA).
        d_ff: SwiGLU hidden width.
        vocab_size: real vocabulary size V (the LM head's outputs).
        max_seq_len: longest sequence the RoPE tables cover.
        rope_base: RoPE frequency base (SMDM 1e4, LLaDA 5e5).
        norm_eps: RMSNorm epsilon.
        attention: ``causal``, ``bidirectional`` or ``block`` (block-causal: a token attends
            every token of its own block and of earlier blocks).
        block_size: tokens per block for ``attention="block"`` (None otherwise).
        mask_id: the mask token's id; None without a mask token, or (with one) ``vocab_size``:
            an extra embedding row. An id below ``vocab_size`` reuses a vocabulary row (LLaDA's 126336).
        mask_token: whether the backbone embeds a mask token. The objective decides it
            (``Objective.model_fields`` sets it for every model lldiff builds); None, for a
            config written by hand or stored before this field, keeps the old convenience rule:
            a mask token for bidirectional and block attention, none for causal.
        attn_backend: one of ``sdpa`` (default), ``xformers`` (CUDA only), ``reference``.
    """

    name: str = "custom"
    n_layer: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int = 512
    vocab_size: int = 32000
    max_seq_len: int = 2048
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    attention: str = "bidirectional"
    block_size: int | None = None
    mask_id: int | None = None
    mask_token: bool | None = None
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is unknown; allowed: {', '.join(ATTENTION_KINDS)}")
        if self.attention == "block":
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(f"attention='block' needs block_size >= 1, got {self.block_size!r}")
        elif self.block_size is not None:
            raise ValueError(f"block_size={self.block_size} applies to attention='block' only, not {self.attention!r}")
        if self.mask_token not in (None, True, False):
            raise ValueError(f"mask_token must be true, false or null, got {self.mask_token!r}")
        if self.mask_token is False or (self.mask_token is None and self.attention == "causal"):
            if self.mask_id is not None:
                why = ("mask_token=false has no mask token" if self.mask_token is False else
                       "a causal model has no mask token (mask_token: true gives one a mask token)")
                raise ValueError(f"mask_id={self.mask_id}: {why}")
        elif self.mask_id is None:
            object.__setattr__(self, "mask_id", self.vocab_size)
        elif isinstance(self.mask_id, bool) or not isinstance(self.mask_id, int) or not 0 <= self.mask_id <= self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id!r} must be in [0, vocab_size={self.vocab_size}]")
        for field in ("n_layer", "d_model", "n_heads", "d_ff", "vocab_size", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads among the divisors of {self.d_model}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must be a positive divisor of n_heads={self.n_heads}"
            )
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attn_backend={self.attn_backend!r} is unknown; allowed: {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.rope_base <= 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def embedding_rows(self) -> int:
        """Vocabulary rows plus the mask token's own row when it is outside the vocabulary."""
        return self.vocab_size + (1 if self.mask_id == self.vocab_size else 0)

    @property
    def llama_compatible(self) -> bool:
        """Causal attention and no mask token: the backbone a Llama checkpoint describes."""
        return self.attention == "causal" and self.mask_id is None

    @property
    def full_attention(self) -> bool:
        """Every token attends every token (bidirectional): the backbone a LLaDA checkpoint describes."""
        return self.attention == "bidirectional"

    @property
    def earlier_states_fixed(self) -> bool:
        """Whether a token's keys/values never depend on later tokens (causal and block
        attention), so they can be cached across decoding calls."""
        return self.attention != "bidirectional"

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "ModelConfig":
        """A config from a checkpoint's stored dict; dicts written before the attention kind
        existed carry ``causal`` (True: AR; False: MDM with the mask token ``vocab_size``)."""
        fields = dict(fields)
        if "causal" in fields:
            causal = fields.pop("causal")
            fields.setdefault("attention", "causal" if causal else "bidirectional")
        return cls(**fields)

    def replace(self, **changes: Any) -> "ModelConfig":
        if "mask_id" not in changes and self.mask_id in (None, self.vocab_size):
            changes["mask_id"] = None  # the default follows the vocabulary and the attention kind
        return dataclasses.replace(self, **changes)

    def non_embedding_params(self) -> int:
        """Parameters excluding the token embedding and the LM head (SMDM's N).

        For MHA this is SMDM's ``n_layer * (4 d^2 + 3 d d_ff + 2 d) + d``; with GQA the
        key/value projections shrink to ``d * n_kv_heads * head_dim`` each.
        """
        d, kv_dim = self.d_model, self.kv_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv_dim
        mlp = 3 * d * self.d_ff
        norms = 2 * d
        return self.n_layer * (attention + mlp + norms) + d

    def total_params(self) -> int:
        """All parameters: non-embedding + embedding (incl. mask row) + untied head."""
        return self.non_embedding_params() + self.embedding_rows * self.d_model + self.vocab_size * self.d_model

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A registered size, with any field overridden (e.g. ``vocab_size``, ``attention``)."""
        if name not in SIZES:
            raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}; allowed: {allowed}")
        return SIZES[name].replace(**overrides)


def _smdm(name: str, n_layer: int, d_model: int, n_heads: int) -> ModelConfig:
    """SMDM ladder: d_ff = 4d, LLaMA-2 vocabulary, RoPE 1e4, context 2048."""
    return ModelConfig(
        name=name, n_layer=n_layer, d_model=d_model, n_heads=n_heads, d_ff=4 * d_model,
        vocab_size=32000, max_seq_len=2048, rope_base=10_000.0,
    )


def _tiny(name: str, n_layer: int, d_model: int, n_heads: int) -> ModelConfig:
    """CPU sizes for tests, demos and CPU sweeps; the vocabulary comes from the data."""
    return ModelConfig(
        name=name, n_layer=n_layer, d_model=d_model, n_heads=n_heads, d_ff=4 * d_model,
        vocab_size=4096, max_seq_len=1024, rope_base=10_000.0,
    )


_REGISTRY = [
    # tiny CPU sizes (names give non-embedding parameters, rounded): about 1.5-2x apart in N,
    # so CPU iso-FLOP sweeps can sample each budget's optimum from both sides
    _tiny("tiny-0.002M", 1, 12, 2),
    _tiny("tiny-0.004M", 1, 16, 2),
    _tiny("tiny-0.009M", 1, 24, 2),
    _tiny("tiny-0.016M", 1, 32, 2),
    _tiny("tiny-0.03M", 2, 32, 2),
    _tiny("tiny-0.07M", 2, 48, 2),
    _tiny("tiny-0.1M", 2, 64, 2),
    _tiny("tiny-0.2M", 3, 64, 2),
    _tiny("tiny-0.3M", 3, 80, 2),
    _tiny("tiny-0.4M", 3, 96, 3),
    _tiny("tiny-0.6M", 4, 96, 3),
    _tiny("tiny-1M", 4, 128, 4),
    _tiny("tiny-2M", 5, 160, 5),
    _tiny("tiny-3.5M", 6, 192, 6),
    # SMDM ladder (Nie et al. 2024), exact non-embedding counts
    _smdm("smdm-6M", 6, 256, 4),
    _smdm("smdm-19M", 8, 384, 6),
    _smdm("smdm-34M", 8, 512, 8),
    _smdm("smdm-48M", 9, 576, 9),
    _smdm("smdm-66M", 10, 640, 10),
    _smdm("smdm-113M", 12, 768, 12),
    _smdm("smdm-170M", 18, 768, 12),
    _smdm("smdm-268M", 16, 1024, 16),
    _smdm("smdm-472M", 18, 1280, 10),
    _smdm("smdm-1028M", 20, 1792, 14),
    _smdm("smdm-2121M", 28, 2176, 17),
    # LLaDA (Nie et al. 2025, Table 5)
    ModelConfig(name="llada-1B", n_layer=22, d_model=2048, n_heads=32, n_kv_heads=4, d_ff=5634,
                vocab_size=126464, max_seq_len=4096, rope_base=500_000.0),
    ModelConfig(name="llada-8B", n_layer=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=12288,
                vocab_size=126464, max_seq_len=4096, rope_base=500_000.0),
]

SIZES: dict[str, ModelConfig] = {cfg.name: cfg for cfg in _REGISTRY}
