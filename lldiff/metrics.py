"""The evaluation metric every objective reports: nats per scored token and bits per byte,
summed over the batches of an epoch and across devices (a torchmetrics ``Metric``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class NatsPerToken(Metric):
    """Sums of nats, scored tokens and their UTF-8 bytes; :meth:`compute` gives
    ``{"nll_per_token": nats / tokens, "bpb": nats / (ln 2 * bytes)}`` (``bpb`` only when bytes
    were counted)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("nats", "tokens", "bytes"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, nats: Tensor, tokens: Tensor | int, bytes: Tensor | None = None) -> None:
        self.nats += nats.sum()
        self.tokens += tokens
        if bytes is not None:
            self.bytes += bytes.sum()

    def compute(self) -> dict[str, Tensor]:
        out = {"nll_per_token": self.nats / self.tokens}
        if self.bytes > 0:
            out["bpb"] = self.nats / (math.log(2) * self.bytes)
        return out
