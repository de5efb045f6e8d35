"""What the Llama and LLaDA exporters share: the split of lldiff's fused projections, the
tokenizer files ``AutoTokenizer`` reads, and the dtype names of ``--dtype``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lldiff.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_tokenizer_files(tokenizer: Any, out: Path, *, max_len: int) -> None:
    """``tokenizer.json`` plus the ``tokenizer_config.json`` / ``special_tokens_map.json`` that
    ``AutoTokenizer`` (PreTrainedTokenizerFast) reads."""
    tokenizer.save(out / "tokenizer.json")
    backend = tokenizer.backend

    def token(i: int | None) -> str | None:
        return None if i is None or i >= backend.get_vocab_size(with_added_tokens=True) else backend.id_to_token(i)

    special = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
               "pad_token": token(tokenizer.pad_id), "mask_token": token(tokenizer.mask_id)}
    special = {k: v for k, v in special.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def unfused_block(state: dict[str, torch.Tensor], cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    """Block ``i`` of an lldiff state dict with its fused projections split: ``q, k, v`` from
    ``attn.qkv`` (``[q | k | v]``), ``gate, up`` from ``mlp.gate_up``, plus ``o``, ``down`` and
    the two norms (the names every exporter maps to its own)."""
    o, hd = f"blocks.{i}.", cfg.head_dim
    q, k, v = state[f"{o}attn.qkv.weight"].split([cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd])
    gate, up = state[f"{o}mlp.gate_up.weight"].chunk(2, dim=0)
    return {"q": q, "k": k, "v": v, "o": state[f"{o}attn.proj.weight"], "gate": gate, "up": up,
            "down": state[f"{o}mlp.proj.weight"], "attn_norm": state[f"{o}attn_norm.weight"],
            "mlp_norm": state[f"{o}mlp_norm.weight"]}
