"""Supervised fine-tuning modules, one per objective (:mod:`lldiff.registry`'s ``sft_module``):
LLaDA's Alg. 2 for the MDM (``objectives.mdm_sft_loss``), its AR counterpart
(``objectives.ar_sft_loss``) and its block-diffusion counterpart (``block_diffusion.bd3_sft_loss``).

All start from a pre-trained ``lldiff fit`` checkpoint (``init_from``) of their objective, whose
model shape they take, and train on :class:`lldiff.data.SFTDataModule` batches. All log
``train/loss`` and ``val/nll_per_token``: nats per response token (EOS padding included)
given the prompt, exact for AR and a Monte-Carlo negative-ELBO bound for the diffusion ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lldiff import block_diffusion, objectives, registry
from lldiff.checkpoint import (TOKENIZER_KEY, check_tokenizer, is_hf_directory, read_checkpoint_meta,
                               read_model_weights)
from lldiff.config import SIZES, ModelConfig
from lldiff.data.eval_batches import eval_batch_index, eval_weights
from lldiff.lora import LoraOptions, apply_lora, fp32_restorer, fp32_snapshot, lora_options
from lldiff.modules import AutoregressiveLM, BlockDiffusionLM, MaskedDiffusionLM
from lldiff.registry import Objective

# fields a fine-tuning run may change without invalidating the pre-trained weights
ADJUSTABLE_FIELDS = ("max_seq_len", "rope_base", "attn_backend", "norm_eps")


def read_pretrained(path: str | Path) -> dict[str, Any]:
    """An ``lldiff fit`` checkpoint (a file, read once, or a sharded directory's metadata),
    checked to carry its ``model_config``."""
    if not Path(path).exists():
        raise FileNotFoundError(f"init_from checkpoint {str(path)!r} does not exist")
    if is_hf_directory(Path(path)):  # generate/chat/eval read one in place; training starts from a run
        raise ValueError(f"init_from {str(path)!r} is a Hugging Face directory; import it first: "
                         f"lldiff import llada {path} --out RUN_DIR, then init_from RUN_DIR/checkpoints/imported.ckpt "
                         "and data.init_args.tokenizer_path RUN_DIR")
    state = read_checkpoint_meta(path)
    if state.get("lldiff", {}).get("model_config") is None:
        raise ValueError(f"init_from {str(path)!r} is not an lldiff checkpoint (no model config inside)")
    return state


def _a(label: str) -> str:
    """``label`` with its indefinite article as spoken: "an AR", "an MDM", "a BD3-4"."""
    return f"{'an' if label[:1] in 'AEFHILMNORSX' else 'a'} {label}"


#: ModelConfig fields the objective fixes (``Objective.model_fields``), not the checkpoint's shape
OBJECTIVE_FIELDS = ("attention", "block_size", "mask_id", "causal")


def pretrained_shape(
    init_from: str, saved: dict[str, Any], objective: Objective, vocab_size: int | None, size: str | None,
    overrides: dict[str, Any] | None,
) -> tuple[str, dict[str, Any]]:
    """``(size, model_overrides)`` that rebuild the shape ``saved`` (the checkpoint's model
    config, also one written before the attention kind existed) exactly, after checking that
    it is a model of ``objective`` (the registry's reading of its attention kind and block
    size), its vocabulary against the data's tokenizer and ``size`` if given."""
    config = ModelConfig.from_dict(saved)
    theirs = registry.of_config(config)
    if theirs != objective:
        raise ValueError(f"init_from {init_from!r} holds {_a(theirs.label)} model ({theirs.attention} attention); "
                         f"this fine-tuning module needs {_a(objective.label)} one ({objective.attention} attention; "
                         "use the matching model.class_path)")
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise ValueError(
            f"init_from {init_from!r} was trained with vocab_size={config.vocab_size} but the tokenizer has "
            f"{vocab_size} real tokens; fine-tune with the pre-training run's tokenizer.json "
            "(data.init_args.tokenizer_path: the run directory or the checkpoint)"
        )
    overrides = dict(overrides or {})
    changed = sorted(set(overrides) - set(ADJUSTABLE_FIELDS))
    if changed:
        raise ValueError(f"model_overrides {changed} would change the pre-trained shape; a fine-tuning run may "
                         f"only override {', '.join(ADJUSTABLE_FIELDS)}")
    shape = {k: v for k, v in config.__dict__.items()
             if k not in ("name", "vocab_size", "attn_backend", *OBJECTIVE_FIELDS)}
    if config.mask_id is not None and config.mask_id != config.vocab_size:
        shape["mask_id"] = config.mask_id  # inside the vocabulary (an imported LLaDA): kept where it is
    if size is not None:
        registered = ModelConfig.from_name(size)
        differs = [f for f in shape if f not in ADJUSTABLE_FIELDS and getattr(registered, f) != shape[f]]
        if differs:
            raise ValueError(f"size={size!r} does not match the init_from checkpoint (differs in {differs}); "
                             f"leave size unset to take the checkpoint's shape ({config.name})")
    name = config.name if config.name in SIZES else next(iter(SIZES))
    return size or name, {**shape, **overrides}


class _SFTMixin:
    """What both fine-tuning modules share: start from ``init_from``, score responses only."""

    def _before_init(self: Any, objective: Objective, kwargs: dict[str, Any], init_from: str | None,
                     state: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Before ``LMBase.__init__``: the shape from ``init_from`` (:func:`_resolve_shape`; its
        checkpoint, read once, is returned), and a backbone built on the meta device when the
        weights will come from it."""
        pretrained = _resolve_shape(objective, kwargs, init_from, state)
        self.__dict__["_backbone_on_meta"] = pretrained is not None  # read by LMBase.__init__
        return pretrained

    def _after_init(self: Any, init_from: str | None, pretrained: dict[str, Any] | None,
                    adapters: LoraOptions | None) -> None:
        """After ``LMBase.__init__``: the pre-trained weights, then the LoRA adapters (if any)."""
        self._load_pretrained(init_from, pretrained)
        self._use_lora(adapters)

    def _load_pretrained(self: Any, init_from: str | None, state: dict[str, Any] | None) -> None:
        """Assign ``init_from``'s weights to the backbone, which was built on the meta device:
        the tensors are the checkpoint's own (memory-mapped from a full file, in its stored dtype),
        so nothing full-size is allocated here; :meth:`configure_model` brings them to the run's
        dtype after FSDP2 has sharded them (each process then holds and converts its shard only)."""
        self._pretrained_tokenizer, self._init_from = None, init_from
        if init_from is not None and state is not None:
            self.model.load_state_dict(read_model_weights(init_from, state, self.model), assign=True)
            self.model.reset_rope(device="cpu")  # non-persistent: still on the meta device
            self._pretrained_tokenizer = state["lldiff"].get(TOKENIZER_KEY)

    def configure_model(self: Any) -> None:
        """Compile and shard as pre-training does (``LMBase.configure_model``), then give the
        assigned weights the dtype the run trains in (:func:`training_dtype`; LoRA adapters stay
        float32, see :meth:`_apply`)."""
        super().configure_model()  # type: ignore[misc]
        if self._trainer is None:
            return
        dtype = training_dtype(str(self.trainer.precision))
        if any(p.is_floating_point() and p.dtype != dtype for p in self.model.parameters()):
            self.to(dtype)  # through _apply, as Lightning's own precision conversion goes

    def _use_lora(self: Any, options: LoraOptions | None) -> None:
        """LoRA adapters on the (loaded) backbone, everything else frozen (``lldiff.lora``):
        only the adapters reach the optimizer (``build_optimizer`` takes trainable parameters)."""
        self._lora = options
        if options is not None:
            apply_lora(self.model, options)

    def _apply(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Conversions keep the LoRA adapters in float32 (as peft's own ``PeftModel`` does):
        under ``bf16-true``/``16-true`` the frozen weights become 16-bit while the adapters,
        their gradients and AdamW states stay float32, with their exact values (a resumed
        run's too: Lightning loads the weights before converting the module)."""
        snapshot = fp32_snapshot(self.model) if getattr(self, "_lora", None) is not None else {}
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        restore = fp32_restorer(self.model, snapshot) if snapshot else None
        if restore is not None:  # a second pass, so that FSDP2 re-registers its sharded adapters
            super()._apply(restore, *args, **kwargs)  # type: ignore[misc]
        return result

    def on_save_checkpoint(self: Any, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if self._lora is not None:  # read by lldiff.checkpoint.load_model to merge the adapters
            checkpoint["lldiff"]["lora"] = self._lora.to_dict()

    def on_load_checkpoint(self: Any, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("lldiff", {}).get("lora")
        mine = None if self._lora is None else self._lora.to_dict()
        shape = ("r", "alpha", "target_modules")  # dropout may change on resume
        if (saved is None) != (mine is None) or (saved and any(saved.get(k) != mine[k] for k in shape)):
            raise ValueError(f"the checkpoint was trained with lora={saved} but this module has lora={mine}; "
                             "resume with the run's own model.init_args.lora (its config.yaml)")
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

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
        self._log_progress(loss, processed,
                           processed * self.objective.matmul_flops_per_token(self.config, tokens.shape[1]))
        return loss

    def validation_step(self: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        tokens, response = batch["input_ids"], batch["response_mask"]
        nats = self.response_nats(tokens, response, eval_batch_index(batch, batch_idx))  # lldiff.data.eval_batches
        weight = eval_weights(batch, nats.shape[0], nats.device)
        self.val_nats.update((nats * weight).sum())
        self.val_tokens.update((response.sum(dim=1) * weight).sum())


def training_dtype(precision: str) -> torch.dtype:
    """The parameters' dtype under a Lightning ``precision``: 16-bit for ``bf16-true`` /
    ``16-true``, float64 for ``64-true``, else float32 (the ``*-mixed`` settings autocast over
    float32 weights). A bf16 checkpoint (an imported LLaDA) fine-tuned under ``bf16-mixed`` gets
    float32 master weights."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(
        precision, torch.float32)


def _resolve_shape(objective: Objective, kwargs: dict[str, Any], init_from: str | None,
                   state: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Set ``size``/``model_overrides`` from ``init_from`` (a checkpoint of ``objective``);
    returns the checkpoint, read once (``state``: already read)."""
    if init_from is None:
        if kwargs.get("size") is None:
            raise ValueError("give model.init_args.init_from (a pre-trained checkpoint) or a size to fine-tune from scratch")
        return None
    state = state or read_pretrained(init_from)
    kwargs["size"], kwargs["model_overrides"] = pretrained_shape(
        init_from, state["lldiff"]["model_config"], objective, kwargs.get("vocab_size"), kwargs.get("size"),
        kwargs.get("model_overrides"))
    return state


def _check_sft_options(normalisation: str, prompt_dropout: float) -> None:
    if normalisation not in objectives.SFT_NORMALISATIONS:
        raise ValueError(f"normalisation={normalisation!r}; allowed: {', '.join(objectives.SFT_NORMALISATIONS)}")
    if not 0.0 <= prompt_dropout < 1.0:
        raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout}")


class MaskedDiffusionSFT(_SFTMixin, MaskedDiffusionLM):
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
        _check_sft_options(normalisation, prompt_dropout)
        adapters = lora_options(lora)  # refused before any checkpoint is read
        kwargs["size"] = size
        pretrained = self._before_init(registry.get(self.objective_name), kwargs, init_from)
        super().__init__(*args, **kwargs)
        self._after_init(init_from, pretrained, adapters)

    def sft_loss(self, tokens: Tensor, response: Tensor) -> Tensor:
        return objectives.mdm_sft_loss(self, tokens, response, self.mask_id, normalisation=self.hparams.normalisation,
                                       eps=self.hparams.mask_eps, prompt_dropout=self.hparams.prompt_dropout)

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:
        generator, draws = self.validation_draws(tokens.device, batch_idx)
        return objectives.mdm_elbo_nats(self, tokens, self.mask_id, num_samples=draws, eps=self.hparams.mask_eps,
                                        maskable=response, generator=generator)


class AutoregressiveSFT(_SFTMixin, AutoregressiveLM):
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
        pretrained = self._before_init(registry.get(self.objective_name), kwargs, init_from)
        super().__init__(*args, **kwargs)
        self._after_init(init_from, pretrained, adapters)

    def sft_loss(self, tokens: Tensor, response: Tensor) -> Tensor:
        return objectives.ar_sft_loss(self, tokens, response)

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:
        return (objectives.ar_nll(self, tokens) * response[:, 1:]).sum(dim=1)



class BlockDiffusionSFT(_SFTMixin, BlockDiffusionLM):
    """BD3 supervised fine-tuning: the prompt stays clean, the response's blocks are diffused
    (:func:`lldiff.block_diffusion.bd3_sft_loss`); validation is the response's NELBO given the prompt
    (:func:`lldiff.block_diffusion.bd3_nelbo_nats` with ``maskable`` = the response).

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
        _check_sft_options(normalisation, prompt_dropout)
        adapters = lora_options(lora)  # refused before any checkpoint is read
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive integer or null (the checkpoint's), got {block_size!r}")
        kwargs["size"] = size
        state = read_pretrained(init_from) if init_from is not None else None
        if state is not None:
            theirs = registry.of_config(ModelConfig.from_dict(state["lldiff"]["model_config"]))
            saved_block = theirs.module_args().get("block_size")
            if saved_block is not None and block_size is not None and block_size != saved_block:
                raise ValueError(f"block_size={block_size} but init_from {init_from!r} holds {_a(theirs.label)} model "
                                 f"(block_size={saved_block}); leave block_size unset to take the checkpoint's")
            if block_size is None:
                block_size = saved_block  # None for a checkpoint of another objective: refused just below
        if block_size is None:
            block_size = 16
        pretrained = self._before_init(registry.get(f"bd3-{block_size}"), kwargs, init_from, state)
        super().__init__(*args, block_size=block_size, **kwargs)
        self._after_init(init_from, pretrained, adapters)

    def sft_loss(self, tokens: Tensor, response: Tensor) -> Tensor:
        return block_diffusion.bd3_sft_loss(self, tokens, response, self.mask_id, self.config.block_size,
                            normalisation=self.hparams.normalisation, eps=self.hparams.mask_eps,
                            prompt_dropout=self.hparams.prompt_dropout)

    def response_nats(self, tokens: Tensor, response: Tensor, batch_idx: int) -> Tensor:
        generator, draws = self.validation_draws(tokens.device, batch_idx)
        return block_diffusion.bd3_nelbo_nats(self, tokens, self.mask_id, self.config.block_size, num_samples=draws,
                                              eps=self.hparams.mask_eps, maskable=response, generator=generator)
