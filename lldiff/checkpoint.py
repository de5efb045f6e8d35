"""Load a trained backbone for sampling and evaluation, without the training stack.

A checkpoint written by ``lldiff fit`` carries the model's ``ModelConfig`` and its weights;
the run directory (``<run>/checkpoints/x.ckpt`` -> ``<run>/tokenizer.json``) holds the
tokenizer. Loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lldiff.config import ModelConfig
from lldiff.data.tokenizer import Tokenizer
from lldiff.model import Transformer


@dataclass
class LoadedModel:
    model: Transformer
    objective: str  # "mdm" or "ar"
    tokenizer: Tokenizer | None
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def find_tokenizer(ckpt: Path) -> Path | None:
    for candidate in (ckpt.parent / "tokenizer.json", ckpt.parent.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    return None


def load_model(
    path: str | Path, *, expect: str | None = None, tokenizer: str | Path | None = None, device: str = "cpu"
) -> LoadedModel:
    """The backbone of an lldiff checkpoint (eval mode) with its tokenizer.

    ``expect="mdm"`` / ``"ar"`` refuses a checkpoint of the other objective with a clear
    message; the tokenizer comes from ``tokenizer`` or the checkpoint's run directory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location=device, weights_only=True)
    if "lldiff" not in state or "model_config" not in state["lldiff"]:
        raise ValueError(f"{path} is not an lldiff checkpoint (no model config inside)")
    config = ModelConfig(**state["lldiff"]["model_config"])
    objective = "ar" if config.causal else "mdm"
    if expect is not None and objective != expect:
        raise ValueError(f"{path} holds an {objective.upper()} model; this needs an {expect.upper()} checkpoint")
    model = Transformer(config)
    weights = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    model.to(device).eval()
    tokenizer_path = Path(tokenizer) if tokenizer else find_tokenizer(path)
    loaded_tokenizer = Tokenizer.from_file(tokenizer_path) if tokenizer_path else None
    if loaded_tokenizer is not None and loaded_tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {loaded_tokenizer.vocab_size} real tokens but the checkpoint's model "
            f"has vocab_size={config.vocab_size}"
        )
    return LoadedModel(model, objective, loaded_tokenizer, path)
