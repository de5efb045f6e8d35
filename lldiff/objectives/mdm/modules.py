"""The MDM's LightningModules: pre-training (LLaDA Alg. 1) and SFT (Alg. 2).
"""

from __future__ import annotations

from typing import Any
import torch
from torch import Tensor
from lldiff import registry as objectives
from lldiff.objectives.mdm import FAMILY
from lldiff.objectives.mdm.loss import mdm_elbo_nats, mdm_loss, mdm_sft_loss
from lldiff.objectives.common.base import LMBase
from lldiff.objectives.common.annealing import check_anneal_steps, step_mask
from lldiff.objectives.common.conversion import ConversionMixin, check_mask_init, conversion_source
from lldiff.objectives.common.finetuning import SFTMixin, check_sft_options
from lldiff.lora import lora_options



class MaskedDiffusionLM(ConversionMixin, LMBase):
    """Masked diffusion LM (LLaDA / SMDM): bidirectional backbone, mask token ``M = V``.

    Args (beyond LMBase):
        mask_eps: lower end of the masking ratio t ~ U[mask_eps, 1] (LLaDA 1e-3).
        stratified_t: spread t evenly over the batch (unbiased, lower variance).
        val_mc_samples: Monte-Carlo draws of (t, mask) per validation sequence for the
            ELBO during training (cheap curves; same expectation, more noise).
        eval_mc_samples: the same for a standalone ``lldiff validate`` / ``test`` and a
            sweep's final evaluation (SMDM: 128).
        val_seed: seed of the validation draws, so every evaluation of every checkpoint
            uses the same (t, mask) draws (common random numbers).
        init_from: convert a run (SPEC §14): an ``lldiff fit`` checkpoint (file or sharded
            directory) of an objective this family converts from (``Family.converts_from``:
            the AR); its shape is used (``size`` may stay unset), every weight is copied, the
            optimizer starts fresh (:mod:`lldiff.objectives.common.conversion`).
        mask_init: the mask token's embedding row of a conversion: ``mean`` of the source's
            embedding rows (default), ``zeros``, or ``random`` (fresh initialisation).
        anneal_steps: attention-mask annealing (DiffuLLaMA): over the first ``anneal_steps``
            training steps the causal mask opens linearly to full attention, each step a random
            subset of future keys visible (:mod:`lldiff.objectives.common.annealing`); 0 (default):
            full attention from the first step. Validation always attends in full.
    """

    family = FAMILY

    def __init__(
        self,
        *args: Any,
        mask_eps: float = 1e-3,
        stratified_t: bool = False,
        val_mc_samples: int = 8,
        eval_mc_samples: int = 128,
        val_seed: int = 0,
        init_from: str | None = None,
        mask_init: str = "mean",
        anneal_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        check_mask_init(mask_init)
        check_anneal_steps(anneal_steps)
        source = None
        if init_from is not None:  # refused before any weight is built
            source = conversion_source(init_from, objectives.with_params(self.family, self.objective_params), kwargs)
        super().__init__(*args, **kwargs)
        self._convert(init_from, source, mask_init)
        if val_mc_samples < 1 or eval_mc_samples < 1:
            raise ValueError(f"val_mc_samples and eval_mc_samples must be >= 1, got {val_mc_samples}, {eval_mc_samples}")
        if not 0.0 <= mask_eps < 1.0:
            raise ValueError(f"mask_eps must be in [0, 1), got {mask_eps}")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.check_source_tokenizer()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.record_conversion(checkpoint)

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    def loss(self, rows: Tensor) -> Tensor:
        x0 = rows[:, 1:]
        seed = int(getattr(getattr(self._trainer, "datamodule", None), "seed", 0) or 0) if self._trainer else 0
        mask = step_mask(x0.shape[1], self.global_step, self.hparams.anneal_steps, seed, x0.device)
        return mdm_loss(self, x0, self.mask_id, eps=self.hparams.mask_eps, stratified=self.hparams.stratified_t,
                        attn_mask=mask)

    def validation_draws(self, device: torch.device, batch_idx: int) -> tuple[torch.Generator, int]:
        """(a generator seeded by ``val_seed`` and the batch, the number of Monte-Carlo draws):
        ``val_mc_samples`` while fitting, ``eval_mc_samples`` for ``lldiff validate`` / ``test``,
        so every evaluation of every checkpoint sees the same draws."""
        generator = torch.Generator(device=device).manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        return generator, self.hparams.val_mc_samples if fitting else self.hparams.eval_mc_samples

    def validation_nats(self, rows: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        x0 = rows[:, 1:]
        generator, draws = self.validation_draws(x0.device, batch_idx)
        nats = mdm_elbo_nats(
            self, x0, self.mask_id, num_samples=draws, eps=self.hparams.mask_eps,
            generator=generator,
        )
        return nats, x0


class MaskedDiffusionSFT(SFTMixin, MaskedDiffusionLM):
    """MDM supervised fine-tuning (LLaDA Alg. 2): only response tokens are masked.

    Args (beyond MaskedDiffusionLM's; ``random_length_prob`` does not apply):
        init_from: pre-trained MDM checkpoint; its shape is used (``size`` may stay unset).
        normalisation: ``response_length`` (per example by its response length incl. EOS
            padding, then the batch mean: LLaDA) or ``token`` (over all response tokens: SMDM).
        prompt_dropout: probability that an example's prompt is replaced by mask tokens,
            so the model learns the unconditional distribution for classifier-free guidance.
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
        normalisation: str = "response_length",
        prompt_dropout: float = 0.0,
        lora: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_sft_options(normalisation, prompt_dropout)
        adapters = lora_options(lora)  # refused before any checkpoint is read
        kwargs["size"] = size
        pretrained = self._before_init(objectives.with_params(self.family, {}), kwargs, init_from)
        super().__init__(*args, **kwargs)
        self._after_init(init_from, pretrained, adapters)

    def sft_loss(self, tokens: Tensor, response: Tensor) -> Tensor:
        return mdm_sft_loss(self, tokens, response, self.mask_id, normalisation=self.hparams.normalisation,
                                       eps=self.hparams.mask_eps, prompt_dropout=self.hparams.prompt_dropout)

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:
        generator, draws = self.validation_draws(tokens.device, batch_idx)
        return mdm_elbo_nats(self, tokens, self.mask_id, num_samples=draws, eps=self.hparams.mask_eps,
                                        maskable=response, generator=generator)
