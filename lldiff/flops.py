"""Compute accounting.

Two counts, used for different things:

* ``scaling_flops`` is SMDM's ``C = 6 * N_nonemb * D``: no attention term, no head,
  identical for MDM and AR. Scaling laws and the logged ``trainer/flops`` use it.
* ``step_flops_per_token`` counts the matmul work a training step really does (forward
  + backward = 3x forward): ``6 * (N_nonemb + d * V)`` for the linear layers and the LM
  head, plus ``12 * n_layer * T * d`` for attention scores and values (PaLM appendix B).
  Throughput (achieved FLOP/s, MFU) uses it.
"""

from __future__ import annotations

from lldiff.config import ModelConfig


def scaling_flops(cfg: ModelConfig, tokens: float) -> float:
    """SMDM's compute C = 6 N D (non-embedding parameters)."""
    return 6.0 * cfg.non_embedding_params() * tokens


def step_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward matmul FLOPs per token at sequence length ``seq_len``."""
    linear = 6.0 * (cfg.non_embedding_params() + cfg.d_model * cfg.vocab_size)
    attention = 12.0 * cfg.n_layer * seq_len * cfg.d_model
    return linear + attention
