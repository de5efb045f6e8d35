"""BD3's LightningModules: pre-training (SPEC §9) and SFT (the response's blocks diffused).
"""

from __future__ import annotations

from typing import Any
from torch import Tensor
from lldiff import registry as objectives
from lldiff.objectives.bd3 import FAMILY
from lldiff.objectives.bd3.loss import bd3_loss, bd3_nelbo_nats, bd3_sft_loss
from lldiff.config import ModelConfig
from lldiff.objectives.mdm.modules import MaskedDiffusionLM
from lldiff.objectives.common.block_schedule import block_size_at, check_schedule_fits, parse_schedule
from lldiff.objectives.common.finetuning import SFTMixin, check_sft_options, read_pretrained, with_article
from lldiff.lora import lora_options



class BlockDiffusionLM(MaskedDiffusionLM):
    """BD3-LM block diffusion (SPEC §9): blocks of ``block_size`` tokens left to right, masked
    diffusion inside each block; ``block_size = L`` is the MDM, ``1`` next-token prediction.

    Training runs the backbone once on ``[x_t ⊕ x_0]`` (2L tokens) with the three-part mask,
    one masking ratio per block; validation reports the NELBO per token on the same tokens
    and under the same metric names as the AR and the MDM (a bound, like the MDM's).

    Args (beyond MaskedDiffusionLM's, whose masking and validation options apply per block):
        block_size: tokens per block (``bd3-B`` in sweep specs): with a schedule, the final objective
            (backbone, validation NELBO at every evaluation, decoding).
        block_schedule: ``[[step, block_size], ...]`` (LLaDA 2.0 WSD): the block size training uses
            from each step on (:mod:`lldiff.objectives.common.block_schedule`); None: ``block_size``
            throughout.
    """

    family = FAMILY

    def __init__(self, *args: Any, block_size: int = 16, block_schedule: list[list[int]] | None = None,
                 **kwargs: Any) -> None:
        self._schedule = parse_schedule(block_schedule)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if kwargs.get("anneal_steps"):
            raise ValueError("anneal_steps applies to an MDM conversion (it opens causal attention to full); "
                             "block diffusion keeps its block mask: leave anneal_steps at 0")
        self.objective_params = {"block_size": block_size}  # before LMBase builds the backbone from it
        super().__init__(*args, **kwargs)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        seq_len = getattr(getattr(self._trainer, "datamodule", None), "seq_len", None) if self._trainer else None
        if stage == "fit" and self._schedule is not None and seq_len is not None:  # before any step
            check_schedule_fits(self._schedule, int(seq_len), self.trainer.max_steps)

    def training_block_size(self) -> int:
        """The block size of this step's loss (the schedule's, else the objective's)."""
        return self.config.block_size if self._schedule is None else block_size_at(self._schedule, self.global_step)

    def loss(self, rows: Tensor) -> Tensor:
        return bd3_loss(self, rows[:, 1:], self.mask_id, self.training_block_size(),
                                        eps=self.hparams.mask_eps, stratified=self.hparams.stratified_t)

    def validation_nats(self, rows: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        x0 = rows[:, 1:]
        generator, draws = self.validation_draws(x0.device, batch_idx)
        nats = bd3_nelbo_nats(self, x0, self.mask_id, self.config.block_size, num_samples=draws,
                                              eps=self.hparams.mask_eps, generator=generator)
        return nats, x0


class BlockDiffusionSFT(SFTMixin, BlockDiffusionLM):
    """BD3 supervised fine-tuning: the prompt stays clean, the response's blocks are diffused
    (:func:`lldiff.bd3_sft_loss`); validation is the response's NELBO given the prompt
    (:func:`lldiff.bd3_nelbo_nats` with ``maskable`` = the response).

    Args (beyond BlockDiffusionLM's; ``random_length_prob`` does not apply):
        init_from: pre-trained BD3 checkpoint; its shape and block size are used.
        block_size: None takes the checkpoint's (16 without ``init_from``); another value
            than the checkpoint's is refused.
        normalisation: ``response_length`` (LLaDA) or ``token`` (SMDM), as for the MDM.
        prompt_dropout: probability that an example's prompt is replaced by mask tokens
            (classifier-free guidance training).
        lora: LoRA adapters instead of full fine-tuning (``lldiff.lora.LoraOptions``: ``r``,
            ``alpha``, ``dropout``, ``target_modules``; ``{}`` for the defaults r=16, alpha=32,
            dropout 0.05 on every attention and MLP projection), applied after the pre-trained
            weights are loaded; only the adapters train. Needs peft (``pip install 'lldiff[lora]'``).
    """

    def __init__(
        self,
        *args: Any,
        init_from: str | None = None,
        size: str | None = None,
        block_size: int | None = None,
        normalisation: str = "response_length",
        prompt_dropout: float = 0.0,
        lora: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_sft_options(normalisation, prompt_dropout)
        adapters = lora_options(lora)  # refused before any checkpoint is read
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive integer or null (the checkpoint's), got {block_size!r}")
        kwargs["size"] = size
        state = read_pretrained(init_from) if init_from is not None else None
        if state is not None:
            theirs = objectives.of_checkpoint(state["lldiff"], ModelConfig.from_dict(state["lldiff"]["model_config"]))
            saved_block = theirs.block_size if theirs.family is self.family else None
            if saved_block is not None and block_size is not None and block_size != saved_block:
                raise ValueError(f"block_size={block_size} but init_from {init_from!r} holds {with_article(theirs.label)} model "
                                 f"(block_size={saved_block}); leave block_size unset to take the checkpoint's")
            if block_size is None:
                block_size = saved_block  # None for a checkpoint of another objective: refused just below
        if block_size is None:
            block_size = 16
        pretrained = self._before_init(objectives.with_params(self.family, {"block_size": block_size}), kwargs, init_from, state)
        super().__init__(*args, block_size=block_size, **kwargs)
        self._after_init(init_from, pretrained, adapters)

    def sft_loss(self, tokens: Tensor, response: Tensor) -> Tensor:
        return bd3_sft_loss(self, tokens, response, self.mask_id, self.config.block_size,
                            normalisation=self.hparams.normalisation, eps=self.hparams.mask_eps,
                            prompt_dropout=self.hparams.prompt_dropout)

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:
        generator, draws = self.validation_draws(tokens.device, batch_idx)
        return bd3_nelbo_nats(self, tokens, self.mask_id, self.config.block_size, num_samples=draws,
                                              eps=self.hparams.mask_eps, maskable=response, generator=generator)
