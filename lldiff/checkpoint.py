"""Load a trained backbone for sampling and evaluation, without the training stack.

A checkpoint written by ``lldiff fit`` carries the model's ``ModelConfig`` and its weights;
the run directory (``<run>/checkpoints/x.ckpt`` -> ``<run>/tokenizer.json``) holds the
tokenizer. Two formats, both read on one CPU process without any process group:

* a full checkpoint: one ``.ckpt`` file (single device, DDP, ``fsdp2_full``), read with
  ``torch.load(weights_only=True)``;
* a sharded checkpoint (``fsdp2``): a ``.ckpt`` *directory* holding the weight and
  optimizer shards in PyTorch Distributed Checkpoint (DCP) format plus ``meta.pt`` (the
  rest: loops, ``lldiff`` extras with the model config); only the weights are read.
  ``meta.pt`` is read with ``weights_only=True`` and the DCP ``.metadata`` index with a
  restricted unpickler (:mod:`lldiff.checkpoint_io`; PyTorch's own reader uses plain
  pickle, so a crafted index could run code).
"""

from __future__ import annotations

import argparse
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lldiff import registry
from lldiff.checkpoint_io import (
    check_sharded_metadata,
    load_sharded_metadata,
    safe_filesystem_reader,
    write_file_atomically,
)
from lldiff.config import ModelConfig
from lldiff.registry import Objective
from lldiff.data.tokenizer import Tokenizer
from lldiff.lora import LoraOptions, has_lora_keys, merge_lora_state_dict
from lldiff.model import Transformer
from lldiff.registry import article


@dataclass
class LoadedModel:
    model: Transformer
    objective: Objective  # the registry entry (its .name: "ar", "mdm", "bd3-16", ...)
    tokenizer: Tokenizer | None
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


TOKENIZER_KEY = "tokenizer_sha256"  # in checkpoint["lldiff"]: the fingerprint of the run's tokenizer


def check_tokenizer(saved: str | None, tokenizer: Tokenizer | None, what: str) -> None:
    """Refuse a tokenizer other than the one ``what`` was trained with (same vocabulary size
    or not: ids would mean other strings). Checkpoints from before the fingerprint pass."""
    if saved is None or tokenizer is None or tokenizer.fingerprint == saved:
        return
    raise ValueError(f"{what} was trained with another tokenizer (sha256 {saved[:12]}…) than the one given "
                     f"(sha256 {tokenizer.fingerprint[:12]}…); use the run's own tokenizer.json")


SHARDED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a sharded (DCP) checkpoint directory written by ``ModelParallelStrategy``."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA).is_file() and (path / ".metadata").is_file()


def read_checkpoint_meta(path: str | Path, map_location: str = "cpu") -> dict:
    """The checkpoint dict of a full or sharded checkpoint; a sharded one's holds no
    ``state_dict`` (the shards stay on disk until :func:`read_model_weights`)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        check_sharded_metadata(path)  # before anything else of the directory is trusted
        return torch.load(path / SHARDED_METADATA, map_location=map_location, weights_only=True)
    if path.is_dir():
        hint = f"; its checkpoints are in {path / 'checkpoints'}" if (path / "checkpoints").is_dir() else ""
        raise ValueError(f"{path} is a directory but not a sharded checkpoint (no {SHARDED_METADATA} and .metadata) "
                         f"nor a LLaDA directory (no config.json){hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save's format; a text file or tokenizer.json is not one
        raise ValueError(f"{path} is not a checkpoint (expected a .ckpt file or sharded directory written by lldiff fit)")
    try:  # memory-mapped: tensors are read when used (an 8B checkpoint is not copied into memory here)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=map_location == "cpu")
    except pickle.UnpicklingError as error:  # weights_only refused an object: say so in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} holds objects a checkpoint never needs; refused to load it ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt: {error})") from None


def read_model_weights(path: str | Path, state: dict, model: Transformer) -> dict[str, torch.Tensor]:
    """The backbone's weights (keys without the LightningModule's ``model.`` prefix).

    ``state`` is :func:`read_checkpoint_meta`'s dict. For a sharded checkpoint the DCP
    shards are read into tensors shaped like ``model``'s, on this process alone (DCP needs
    no process group when none is initialised); optimizer shards are not read.

    A LoRA fine-tuning checkpoint's adapters are merged into the plain backbone's weights
    (:func:`lldiff.lora.merge_lora_state_dict`, with the run's ``lldiff.lora`` settings): the
    result loads into a plain ``Transformer``, without peft.
    """
    if not is_sharded_checkpoint(path):
        weights = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
        return _merge_lora(weights, state, path)
    import torch.distributed.checkpoint as dcp

    saved = {k[len("state_dict.model."):]: m for k, m in load_sharded_metadata(path).state_dict_metadata.items()
             if k.startswith("state_dict.model.")}
    if has_lora_keys(saved):  # a LoRA run's shards: read the adapted keys, shaped as saved
        weights = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items()}
    else:
        weights = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    request = {"state_dict": {f"model.{k}": v for k, v in weights.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*assuming the intent is to load in a single process.*")
        dcp.load(request, storage_reader=safe_filesystem_reader(path), no_dist=True)
    return _merge_lora({k[len("model."):]: v for k, v in request["state_dict"].items()}, state, path)


def _merge_lora(weights: dict[str, torch.Tensor], state: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """``weights`` with LoRA adapters (if any) merged in; the rank and alpha come from the
    checkpoint's ``lldiff.lora`` (else its hyper-parameters' ``lora``)."""
    if not has_lora_keys(weights):
        return weights
    settings = state.get("lldiff", {}).get("lora")
    if settings is None:
        settings = (state.get("hyper_parameters") or {}).get("lora")
    if settings is None:
        raise ValueError(f"{path} holds LoRA adapter weights but not their settings (lldiff.lora: r, alpha); "
                         "cannot merge them")
    options = LoraOptions.from_dict(settings)
    return merge_lora_state_dict(weights, r=options.r, alpha=options.alpha)


def consolidate_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint directory's weights and metadata as one full ``.ckpt``
    file, for tools that take a file on one process (``lldiff validate/test --ckpt_path``).

    The optimizer shards are left out: the file evaluates and samples, it does not resume
    training (resume from the directory itself, with ``fsdp2``).
    """
    path, out = Path(path), Path(out)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is not a sharded checkpoint directory (no {SHARDED_METADATA} and .metadata)")
    state = read_checkpoint_meta(path)
    if "lldiff" not in state or "model_config" not in state["lldiff"]:
        raise ValueError(f"{path} is not an lldiff checkpoint (no model config inside)")
    model = Transformer(ModelConfig.from_dict(state["lldiff"]["model_config"]))
    weights = read_model_weights(path, state, model)
    state["state_dict"] = {f"model.{k}": v for k, v in weights.items()}
    return write_file_atomically(out, lambda handle: torch.save(state, handle))  # by replace, never through a link


def find_tokenizer(ckpt: Path) -> Path | None:
    for candidate in (ckpt.parent / "tokenizer.json", ckpt.parent.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    return None


def load_model(
    path: str | Path, *, expect: str | None = None, tokenizer: str | Path | None = None, device: str = "cpu"
) -> LoadedModel:
    """The backbone of an lldiff checkpoint (eval mode) with its tokenizer.

    ``path`` is a full ``.ckpt`` file or a sharded checkpoint directory (``fsdp2``).
    ``expect`` (an objective name) refuses a checkpoint of another objective with a clear
    message; the tokenizer comes from ``tokenizer`` or the checkpoint's run directory.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if is_hf_directory(path):  # a LLaDA directory, read in place (lldiff.interop.llada)
        return _load_hf_directory(path, expect=expect, tokenizer=tokenizer, device=device)
    state = read_checkpoint_meta(path)
    if "lldiff" not in state or "model_config" not in state["lldiff"]:
        raise ValueError(f"{path} is not an lldiff checkpoint (no model config inside)")
    config = ModelConfig.from_dict(state["lldiff"]["model_config"])  # also checkpoints from before `attention`
    objective = registry.of_checkpoint(state["lldiff"], config)
    if expect is not None and objective.name != expect:
        wanted = registry.get(expect).label
        raise ValueError(f"{path} holds {article(objective.label)} {objective.label} model; this needs "
                         f"{article(wanted)} {wanted} checkpoint")
    with torch.device("meta"):  # no allocation or random init: the checkpoint's tensors become the parameters
        model = Transformer(config)
    model.load_state_dict(read_model_weights(path, state, model), assign=True)
    model.reset_rope()
    model.to(device).eval()
    model.objective = objective  # the objective it was trained as (objectives.of_model reads it)
    tokenizer_path = Path(tokenizer) if tokenizer else find_tokenizer(path)
    loaded_tokenizer = Tokenizer.from_file(tokenizer_path) if tokenizer_path else None
    if loaded_tokenizer is not None and loaded_tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {loaded_tokenizer.vocab_size} real tokens but the checkpoint's model "
            f"has vocab_size={config.vocab_size}"
        )
    check_tokenizer(state["lldiff"].get(TOKENIZER_KEY), loaded_tokenizer, str(path))
    return LoadedModel(model, objective, loaded_tokenizer, path)


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face checkpoint directory (``config.json`` inside) rather than an lldiff checkpoint."""
    return path.is_dir() and (path / "config.json").is_file() and not is_sharded_checkpoint(path)


def _load_hf_directory(path: Path, *, expect: str | None, tokenizer: str | Path | None, device: str) -> LoadedModel:
    from lldiff.interop.llada import load_llada

    model, loaded_tokenizer, _ = load_llada(path, device=device)
    objective = registry.of_model(model)  # set by the importer: a LLaDA directory is an MDM
    if expect is not None and objective.name != expect:
        wanted = registry.get(expect).label
        raise ValueError(f"{path} holds {article(objective.label)} {objective.label} model; this needs "
                         f"{article(wanted)} {wanted} checkpoint")
    if tokenizer:
        loaded_tokenizer = Tokenizer.from_file(tokenizer)
        if loaded_tokenizer.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {loaded_tokenizer.vocab_size} real tokens but {path}'s model "
                             f"has vocab_size={model.cfg.vocab_size}")
    return LoadedModel(model, objective, loaded_tokenizer, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lldiff.checkpoint",
        description="Consolidate a sharded (fsdp2) checkpoint directory into one full .ckpt file (no optimizer state).",
    )
    parser.add_argument("checkpoint", help="sharded checkpoint directory, e.g. runs/x/checkpoints/last.ckpt")
    parser.add_argument("out", help="the full checkpoint file to write, e.g. runs/x/checkpoints/last-full.ckpt")
    args = parser.parse_args(argv)
    print(consolidate_checkpoint(args.checkpoint, args.out))


if __name__ == "__main__":
    main()
