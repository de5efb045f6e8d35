"""Llama-format Hugging Face directories out of lldiff's causal (AR) backbones.

lldiff's backbone with causal attention is exactly Llama: pre-norm RMSNorm, rotate-half RoPE
with ``rope_theta``, SwiGLU ``down(silu(gate x) * up x)``, no biases, untied head; so
``transformers.LlamaForCausalLM.from_pretrained`` loads :func:`export_llama`'s directory with
the same logits. ``lldiff export`` (:mod:`lldiff.convert`) chooses this or the LLaDA
format by objective."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lldiff.interop.common import unfused_block, write_tokenizer_files
from lldiff.interop.safetensors_io import write_safetensors
from lldiff.model import Transformer

LLAMA_BLOCK_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                     "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                     "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def llama_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Llama (transformers) names for an lldiff backbone's weights, fused projections split."""
    cfg, state = model.cfg, model.state_dict()
    out = {"model.embed_tokens.weight": state["embed.weight"][: cfg.vocab_size], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["head.weight"]}
    for i in range(cfg.n_layer):
        out.update({f"model.layers.{i}.{LLAMA_BLOCK_NAMES[piece]}.weight": tensor
                    for piece, tensor in unfused_block(state, cfg, i).items()})
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def llama_config(model: Transformer, tokenizer: Any) -> dict[str, Any]:
    cfg = model.cfg
    dtype = model.embed.weight.dtype
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None),
        "pad_token_id": getattr(tokenizer, "pad_id", None), "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_llama(model: Transformer, tokenizer: Any, out: str | Path, *, max_shard_bytes: int | None = None) -> Path:
    """Write an AR backbone (no mask token, causal attention) as a Llama directory."""
    if not model.cfg.llama_compatible:
        raise ValueError("a Llama export needs an AR model (causal attention, no mask token)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(llama_tensors(model), out, max_shard_bytes=max_shard_bytes)
    (out / "config.json").write_text(json.dumps(llama_config(model, tokenizer), indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, max_len=model.cfg.max_seq_len)
    return out
