"""A deterministic toy language and tiny models trained on it, for the benchmarks and tests
(``benchmarks/sampling.py``'s toy task; tests load this file by path).

The language: ``x[i+1] = (x[i] + 1) mod V``, so any one token determines the whole
sequence. A tiny model learns it in seconds with its objective's ordinary loss (the MDM's,
or block diffusion's), and a correct sampler must then reproduce it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lldiff import objectives as registry
from lldiff.objectives.bd3.loss import bd3_loss
from lldiff.config import ModelConfig
from lldiff.model import Transformer
from lldiff.objectives.mdm.loss import mdm_loss

VOCAB = 12


def counting_sequences(batch: int, length: int, *, vocab: int = VOCAB, generator: torch.Generator | None = None):
    """(batch, length) rows of the counting language from random starting tokens."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % vocab


def _train(objective: registry.Objective, loss: Callable[[Transformer, Tensor], Tensor], steps: int, seq_len: int, batch: int,
           seed: int) -> Transformer:
    """A 2-layer backbone for ``objective`` trained on the counting language (plain PyTorch loop)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, d_model=64, n_heads=4, d_ff=128, vocab_size=VOCAB, max_seq_len=64,
                      **objective.model_fields(VOCAB))
    model = Transformer(cfg)
    model.objective = objective
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        value = loss(model, counting_sequences(batch, seq_len, generator=data_gen))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    return model.eval()


def train_toy_mdm(steps: int = 600, *, seq_len: int = 16, batch: int = 64, seed: int = 0) -> Transformer:
    """Train a 2-layer bidirectional model on the counting language with the MDM loss."""
    return _train(registry.get("mdm"), lambda model, x0: mdm_loss(model, x0, model.cfg.mask_id), steps, seq_len, batch, seed)


def train_toy_bd3(block_size: int = 4, steps: int = 600, *, seq_len: int = 16, batch: int = 64,
                  seed: int = 0) -> Transformer:
    """Train a 2-layer block-attention model (blocks of ``block_size``) on the counting language
    with the block diffusion loss (SPEC §9)."""
    return _train(registry.with_params(registry.families()["bd3"], {"block_size": block_size}), lambda model, x0: bd3_loss(model, x0, model.cfg.mask_id, block_size),
                  steps, seq_len, batch, seed)
