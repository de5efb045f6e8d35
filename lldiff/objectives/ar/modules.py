"""The AR's LightningModules: pre-training (next-token CE) and SFT (CE on response tokens).
"""

from __future__ import annotations

from typing import Any
from torch import Tensor
from lldiff import registry as objectives
from lldiff.objectives.ar import FAMILY
from lldiff.objectives.ar.loss import ar_loss, ar_nll, ar_sft_loss
from lldiff.objectives.common.base import LMBase
from lldiff.objectives.common.finetuning import SFTMixin
from lldiff.lora import lora_options



class AutoregressiveLM(LMBase):
    """Autoregressive baseline: the same backbone, causal, next-token cross-entropy."""

    family = FAMILY

    def loss(self, rows: Tensor) -> Tensor:
        return ar_loss(self, rows)

    def validation_nats(self, rows: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        return ar_nll(self, rows).sum(dim=1), rows[:, 1:]


class AutoregressiveSFT(SFTMixin, AutoregressiveLM):
    """AR supervised fine-tuning: next-token CE on response tokens only (same data and
    template as the MDM), averaged over the batch's response tokens.

    Args (beyond AutoregressiveLM's; ``random_length_prob`` does not apply):
        init_from: pre-trained AR checkpoint; its shape is used (``size`` may stay unset).
        lora: LoRA adapters instead of full fine-tuning (``lldiff.lora.LoraOptions``: ``r``,
            ``alpha``, ``dropout``, ``target_modules``; ``{}`` for the defaults r=16, alpha=32,
            dropout 0.05 on every attention and MLP projection), applied after the pre-trained
            weights are loaded; only the adapters train. Needs peft (``pip install 'lldiff[lora]'``).
    """

    def __init__(self, *args: Any, init_from: str | None = None, size: str | None = None,
                 lora: dict[str, Any] | None = None, **kwargs: Any) -> None:
        adapters = lora_options(lora)  # refused before any checkpoint is read
        kwargs["size"] = size
        pretrained = self._before_init(objectives.with_params(self.family, {}), kwargs, init_from)
        super().__init__(*args, **kwargs)
        self._after_init(init_from, pretrained, adapters)

    def sft_loss(self, tokens: Tensor, response: Tensor) -> Tensor:
        return ar_sft_loss(self, tokens, response)

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:
        return (ar_nll(self, tokens) * response[:, 1:]).sum(dim=1)
