"""A deterministic toy language and a tiny MDM trained on it, for tests and benchmarks.

The language: ``x[i+1] = (x[i] + 1) mod V``, so any one token determines the whole
sequence. A tiny bidirectional model learns it in seconds with the ordinary MDM loss,
and a correct sampler must then reproduce it exactly.
"""

from __future__ import annotations

import torch

from lldiff.config import ModelConfig
from lldiff.model import Transformer
from lldiff.objectives import mdm_loss

VOCAB = 12


def counting_sequences(batch: int, length: int, *, vocab: int = VOCAB, generator: torch.Generator | None = None):
    """(batch, length) rows of the counting language from random starting tokens."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % vocab


def train_toy_mdm(steps: int = 600, *, seq_len: int = 16, batch: int = 64, seed: int = 0) -> Transformer:
    """Train a 2-layer bidirectional model on the counting language (plain PyTorch loop)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, d_model=64, n_heads=4, d_ff=128, vocab_size=VOCAB, max_seq_len=64, causal=False)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = mdm_loss(model, counting_sequences(batch, seq_len, generator=data_gen), cfg.mask_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()
