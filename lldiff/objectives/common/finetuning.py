"""What every objective's SFT module shares: starting from a pre-trained run (``init_from``: its
shape, weights on the meta device, tokenizer check), LoRA, and scoring response tokens only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
import torch
from torch import Tensor
from lldiff import objectives
from lldiff.checkpoint import (TOKENIZER_KEY, check_tokenizer, is_hf_directory, read_checkpoint_meta,
                               read_model_weights)
from lldiff.config import SIZES, ModelConfig
from lldiff.lora import LoraOptions, apply_lora, fp32_restorer, fp32_snapshot
from lldiff.objectives import Objective
from lldiff.objectives.common.sft_loss import SFT_NORMALISATIONS



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


def with_article(label: str) -> str:
    """``label`` with its indefinite article as spoken: "an AR", "an MDM", "a BD3-4"."""
    return f"{'an' if label[:1] in 'AEFHILMNORSX' else 'a'} {label}"


#: ModelConfig fields the objective fixes (``Objective.model_fields``), not the checkpoint's shape
OBJECTIVE_FIELDS = ("attention", "block_size", "mask_id", "mask_token", "causal")


def pretrained_shape(
    init_from: str, saved: dict[str, Any], objective: Objective, vocab_size: int | None, size: str | None,
    overrides: dict[str, Any] | None, record: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(size, model_overrides)`` that rebuild the shape ``saved`` (the checkpoint's model
    config, also one written before the attention kind existed) exactly, after checking that
    it is a model of ``objective`` (the registry's reading of its attention kind and block
    size), its vocabulary against the data's tokenizer and ``size`` if given."""
    config = ModelConfig.from_dict(saved)
    theirs = objectives.legacy_objective(config) if record is None else objectives.from_record(record)
    if theirs != objective:
        raise ValueError(f"init_from {init_from!r} holds {with_article(theirs.label)} model ({theirs.attention} attention); "
                         f"this fine-tuning module needs {with_article(objective.label)} one ({objective.attention} attention; "
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


class SFTMixin:
    """What both fine-tuning modules share: start from ``init_from``, score responses only."""

    def _before_init(self: Any, objective: Objective, kwargs: dict[str, Any], init_from: str | None,
                     state: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Before ``LMBase.__init__``: the shape from ``init_from`` (:func:`resolve_shape`; its
        checkpoint, read once, is returned), and a backbone built on the meta device when the
        weights will come from it."""
        pretrained = resolve_shape(objective, kwargs, init_from, state)
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
            from lldiff.run_state import data_tokenizer
            check_tokenizer(self._pretrained_tokenizer, data_tokenizer(self), f"init_from {self._init_from!r}")

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
        self.val_metric.update(self.response_nats(tokens, response, batch_idx), response.sum())


def training_dtype(precision: str) -> torch.dtype:
    """The parameters' dtype under a Lightning ``precision``: 16-bit for ``bf16-true`` /
    ``16-true``, float64 for ``64-true``, else float32 (the ``*-mixed`` settings autocast over
    float32 weights). A bf16 checkpoint (an imported LLaDA) fine-tuned under ``bf16-mixed`` gets
    float32 master weights."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(
        precision, torch.float32)


def resolve_shape(objective: Objective, kwargs: dict[str, Any], init_from: str | None,
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
        kwargs.get("model_overrides"), state["lldiff"].get("objective"))
    return state


def check_sft_options(normalisation: str, prompt_dropout: float) -> None:
    if normalisation not in SFT_NORMALISATIONS:
        raise ValueError(f"normalisation={normalisation!r}; allowed: {', '.join(SFT_NORMALISATIONS)}")
    if not 0.0 <= prompt_dropout < 1.0:
        raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout}")
