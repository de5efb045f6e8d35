"""Conversion (SPEC §14): a diffusion pre-training run whose weights start from an AR run.

``init_from`` names an ``lldiff fit`` checkpoint (a full file or a sharded directory) of an
objective the target family lists in ``Family.converts_from`` (the registry's answer, never a
name compared here). The target is built with the checkpoint's shape; every weight of the
source is copied exactly; the embedding rows the target adds (the mask token's, row ``V``) are
initialised by ``mask_init``:

- ``mean`` (default): the mean of the source's embedding rows (a neutral input the AR has
  seen the neighbourhood of; DiffuLLaMA-style conversions start the mask close to the data);
- ``zeros``: a zero row;
- ``random``: the target's own fresh initialisation (SMDM's N(0, sqrt(2/5d))).

The optimizer starts fresh (only weights are read). Each checkpoint records the objective of
its steps (``lldiff.objective``, as every run) and where its weights came from
(``lldiff.converted_from``: the source's path and objective record, and ``mask_init``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lldiff import registry as objectives
from lldiff.checkpoint import TOKENIZER_KEY, check_tokenizer, read_model_weights
from lldiff.config import ModelConfig
from lldiff.registry import Objective
from lldiff.objectives.common.finetuning import pretrained_shape, read_pretrained, with_article

MASK_INITS = ("mean", "zeros", "random")


def check_mask_init(mask_init: str) -> None:
    if mask_init not in MASK_INITS:
        raise ValueError(f"mask_init={mask_init!r}; allowed: {', '.join(MASK_INITS)}")


def conversion_source(init_from: str, target: Objective, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Read ``init_from`` once, refuse it unless the registry says ``target`` converts from its
    objective, and set ``kwargs``' ``size``/``model_overrides`` to its shape (a ``size`` or
    override that changes the shape, or another vocabulary, is refused). Returns the state."""
    state = read_pretrained(init_from)
    meta = state["lldiff"]
    config = ModelConfig.from_dict(meta["model_config"])
    record = meta.get("objective")
    source = objectives.legacy_objective(config) if record is None else objectives.from_record(record)
    if source.family_name not in target.family.converts_from:
        allowed = ", ".join(target.family.converts_from) or "none"
        raise ValueError(f"init_from {init_from!r} holds {with_article(source.label)} model; "
                         f"{with_article(target.label)} conversion starts from a run of: {allowed}")
    kwargs["size"], kwargs["model_overrides"] = pretrained_shape(
        init_from, meta["model_config"], source, kwargs.get("vocab_size"), kwargs.get("size"),
        kwargs.get("model_overrides"), record)
    return state


def source_weights(init_from: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The source backbone's weights (full file or sharded directory, read on this process)."""
    from lldiff.model import Transformer

    with torch.device("meta"):  # a template shaped like the source (sharded reads need one)
        template = Transformer(ModelConfig.from_dict(state["lldiff"]["model_config"]))
    return read_model_weights(init_from, state, template)


@torch.no_grad()
def copy_source_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], mask_init: str) -> None:
    """Copy every source weight into ``model`` exactly (in ``model``'s dtype); the rows of a
    tensor the target has more of (the mask token's embedding) are set by ``mask_init``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"the init_from weights do not fit this model (missing {missing}, unexpected {unexpected})")
    for key, target in own.items():
        source = weights[key]
        rows = source.shape[0] if source.dim() else 0
        if source.shape[1:] != target.shape[1:] or rows > target.shape[0] or (rows < target.shape[0] and key != "embed.weight"):
            raise ValueError(f"init_from weight {key} has shape {tuple(source.shape)}, this model {tuple(target.shape)}")
        target[:rows].copy_(source)
        if rows < target.shape[0]:  # the rows the target adds: the mask token
            if mask_init == "mean":
                target[rows:] = source.to(target.dtype).mean(0, keepdim=True)
            elif mask_init == "zeros":
                target[rows:] = 0


class ConversionMixin:
    """Pre-training modules that can start from another objective's run (``init_from``)."""

    _converted_from: dict[str, Any] | None = None
    _source_tokenizer: str | None = None

    def _convert(self: Any, init_from: str | None, state: dict[str, Any] | None, mask_init: str) -> None:
        """After ``LMBase.__init__``: copy the source's weights (no-op without ``init_from``)."""
        if init_from is None or state is None:
            return
        copy_source_weights(self.model, source_weights(init_from, state), mask_init)
        self.model.reset_rope()
        meta = state["lldiff"]
        self._source_tokenizer = meta.get(TOKENIZER_KEY)
        self._converted_from = {"init_from": str(Path(init_from)), "objective": meta.get("objective"),
                                "mask_init": mask_init}

    def check_source_tokenizer(self: Any) -> None:
        """Before any step: the data must be encoded with the source run's tokenizer."""
        from lldiff.run_state import data_tokenizer

        if self._converted_from is not None:
            check_tokenizer(self._source_tokenizer, data_tokenizer(self), f"init_from {self._converted_from['init_from']!r}")

    def record_conversion(self: Any, checkpoint: dict[str, Any]) -> None:
        if self._converted_from is not None:
            checkpoint["lldiff"]["converted_from"] = self._converted_from
