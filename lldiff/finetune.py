"""Supervised fine-tuning modules (LLaDA Alg. 2 and its AR counterpart), thin over
``objectives.mdm_sft_loss`` / ``objectives.ar_sft_loss``.

Both start from a pre-trained ``lldiff fit`` checkpoint (``init_from``), whose model shape
they take, and train on :class:`lldiff.data.SFTDataModule` batches. Both log
``train/loss`` and ``val/nll_per_token``: nats per response token (EOS padding included)
given the prompt, exact for AR and a Monte-Carlo ELBO bound for the MDM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lldiff import objectives
from lldiff.checkpoint import TOKENIZER_KEY, check_tokenizer, read_checkpoint_meta, read_model_weights
from lldiff.config import SIZES, ModelConfig
from lldiff.flops import step_flops_per_token
from lldiff.modules import AutoregressiveLM, LMBase, MaskedDiffusionLM

# fields a fine-tuning run may change without invalidating the pre-trained weights
ADJUSTABLE_FIELDS = ("max_seq_len", "rope_base", "attn_backend", "norm_eps")


def read_pretrained(path: str | Path) -> dict[str, Any]:
    """An ``lldiff fit`` checkpoint (a file, read once, or a sharded directory's metadata),
    checked to carry its ``model_config``."""
    if not Path(path).exists():
        raise FileNotFoundError(f"init_from checkpoint {str(path)!r} does not exist")
    state = read_checkpoint_meta(path)
    if state.get("lldiff", {}).get("model_config") is None:
        raise ValueError(f"init_from {str(path)!r} is not an lldiff checkpoint (no model config inside)")
    return state


def pretrained_shape(
    init_from: str, saved: dict[str, Any], causal: bool, vocab_size: int | None, size: str | None,
    overrides: dict[str, Any] | None,
) -> tuple[str, dict[str, Any]]:
    """``(size, model_overrides)`` that rebuild the shape ``saved`` (the checkpoint's model
    config) exactly, after checking its objective, its vocabulary against the data's
    tokenizer and ``size`` if given."""
    kind = lambda c: "an AR (causal)" if c else "an MDM (bidirectional)"
    if saved["causal"] != causal:
        raise ValueError(f"init_from {init_from!r} holds {kind(saved['causal'])} model; this fine-tuning module "
                         f"needs {kind(causal)} one (use the matching model.class_path)")
    if vocab_size is not None and saved["vocab_size"] != vocab_size:
        raise ValueError(
            f"init_from {init_from!r} was trained with vocab_size={saved['vocab_size']} but the tokenizer has "
            f"{vocab_size} real tokens; fine-tune with the pre-training run's tokenizer.json "
            "(data.init_args.tokenizer_path: the run directory or the checkpoint)"
        )
    overrides = dict(overrides or {})
    changed = sorted(set(overrides) - set(ADJUSTABLE_FIELDS))
    if changed:
        raise ValueError(f"model_overrides {changed} would change the pre-trained shape; a fine-tuning run may "
                         f"only override {', '.join(ADJUSTABLE_FIELDS)}")
    shape = {k: v for k, v in saved.items() if k not in ("name", "vocab_size", "causal", "attn_backend")}
    if size is not None:
        registered = ModelConfig.from_name(size)
        differs = [f for f in shape if f not in ADJUSTABLE_FIELDS and getattr(registered, f) != shape[f]]
        if differs:
            raise ValueError(f"size={size!r} does not match the init_from checkpoint (differs in {differs}); "
                             f"leave size unset to take the checkpoint's shape ({saved['name']})")
    name = saved["name"] if saved["name"] in SIZES else next(iter(SIZES))
    return size or name, {**shape, **overrides}


class _SFTMixin:
    """What both fine-tuning modules share: start from ``init_from``, score responses only."""

    def _load_pretrained(self: Any, init_from: str | None, state: dict[str, Any] | None) -> None:
        self._pretrained_tokenizer, self._init_from = None, init_from
        if init_from is not None and state is not None:
            self.model.load_state_dict(read_model_weights(init_from, state, self.model))
            self._pretrained_tokenizer = state["lldiff"].get(TOKENIZER_KEY)

    def setup(self: Any, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        if stage == "fit":  # before any step: the SFT data must be encoded as the pre-training was
            check_tokenizer(self._pretrained_tokenizer, self._data_tokenizer(), f"init_from {self._init_from!r}")

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def on_fit_start(self: Any) -> None:
        super().on_fit_start()
        stats = getattr(getattr(self.trainer, "datamodule", None), "stats", None) or {}
        counts = {f"data/{split}_{what}": float(getattr(s, what))
                  for split, s in stats.items() for what in ("examples", "truncated", "dropped")}
        if counts and self.trainer.is_global_zero:
            for logger in self.loggers:  # the over-long policy's counts, next to the curves
                logger.log_metrics(counts, step=0)

    def training_step(self: Any, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        tokens, response = batch["input_ids"], batch["response_mask"]
        loss = self.sft_loss(tokens, response)
        processed = tokens.numel() * self.trainer.world_size
        self.tokens_seen += processed
        self._log_progress(loss, processed, processed * step_flops_per_token(self.config, tokens.shape[1]))
        return loss

    def validation_step(self: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        tokens, response = batch["input_ids"], batch["response_mask"]
        self.val_nats.update(self.response_nats(tokens, response, batch_idx).sum())
        self.val_tokens.update(response.sum())


def _resolve_shape(cls: type[LMBase], kwargs: dict[str, Any], init_from: str | None) -> dict[str, Any] | None:
    """Set ``size``/``model_overrides`` from ``init_from``; returns the checkpoint, read once."""
    if init_from is None:
        if kwargs.get("size") is None:
            raise ValueError("give model.init_args.init_from (a pre-trained checkpoint) or a size to fine-tune from scratch")
        return None
    state = read_pretrained(init_from)
    kwargs["size"], kwargs["model_overrides"] = pretrained_shape(
        init_from, state["lldiff"]["model_config"], cls.causal, kwargs.get("vocab_size"), kwargs.get("size"),
        kwargs.get("model_overrides"))
    return state


class MaskedDiffusionSFT(_SFTMixin, MaskedDiffusionLM):
    """MDM supervised fine-tuning (LLaDA Alg. 2): only response tokens are masked.

    Args (beyond MaskedDiffusionLM's; ``random_length_prob`` does not apply):
        init_from: pre-trained MDM checkpoint; its shape is used (``size`` may stay unset).
        normalisation: ``response_length`` (per example by its response length incl. EOS
            padding, then the batch mean: LLaDA) or ``token`` (over all response tokens: SMDM).
        prompt_dropout: probability that an example's prompt is replaced by mask tokens,
            so the model learns the unconditional distribution for classifier-free guidance.
    """

    def __init__(
        self,
        *args: Any,
        init_from: str | None = None,
        size: str | None = None,
        normalisation: str = "response_length",
        prompt_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if normalisation not in objectives.SFT_NORMALISATIONS:
            raise ValueError(f"normalisation={normalisation!r}; allowed: {', '.join(objectives.SFT_NORMALISATIONS)}")
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout}")
        kwargs["size"] = size
        pretrained = _resolve_shape(type(self), kwargs, init_from)
        super().__init__(*args, **kwargs)
        self._load_pretrained(init_from, pretrained)

    def sft_loss(self, tokens: Tensor, response: Tensor) -> Tensor:
        return objectives.mdm_sft_loss(self, tokens, response, self.mask_id, normalisation=self.hparams.normalisation,
                                       eps=self.hparams.mask_eps, prompt_dropout=self.hparams.prompt_dropout)

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:
        generator = torch.Generator(device=tokens.device).manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        draws = self.hparams.val_mc_samples if fitting else self.hparams.eval_mc_samples
        return objectives.mdm_elbo_nats(self, tokens, self.mask_id, num_samples=draws, eps=self.hparams.mask_eps,
                                        maskable=response, generator=generator)


class AutoregressiveSFT(_SFTMixin, AutoregressiveLM):
    """AR supervised fine-tuning: next-token CE on response tokens only (same data and
    template as the MDM), averaged over the batch's response tokens.

    Args (beyond AutoregressiveLM's; ``random_length_prob`` does not apply):
        init_from: pre-trained AR checkpoint; its shape is used (``size`` may stay unset).
    """

    def __init__(self, *args: Any, init_from: str | None = None, size: str | None = None, **kwargs: Any) -> None:
        kwargs["size"] = size
        pretrained = _resolve_shape(type(self), kwargs, init_from)
        super().__init__(*args, **kwargs)
        self._load_pretrained(init_from, pretrained)

    def sft_loss(self, tokens: Tensor, response: Tensor) -> Tensor:
        return objectives.ar_sft_loss(self, tokens, response)

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:
        return (objectives.ar_nll(self, tokens) * response[:, 1:]).sum(dim=1)

