"""Hugging Face directories out of lldiff checkpoints, and the ``import``/``export`` commands.

``lldiff export CKPT --to hf OUT_DIR`` asks the registry what the checkpoint's objective is:
a model without a mask token (AR) becomes a Llama directory that
``transformers.LlamaForCausalLM.from_pretrained`` loads with the same logits (lldiff's
backbone with causal attention is exactly Llama: pre-norm RMSNorm, rotate-half RoPE with
``rope_theta``, SwiGLU ``down(silu(gate x) * up x)``, no biases, untied head); a model with
one (MDM, BD3) becomes a LLaDA directory (:func:`lldiff.interop.llada.export_llada`).

``lldiff import llada HF_DIR --out RUN_DIR`` writes an lldiff run directory
(:func:`lldiff.interop.llada.import_llada`); ``load_model`` (hence ``generate``, ``chat``,
``eval``) also reads a LLaDA directory directly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from lldiff.interop.llada import unfused_block
from lldiff.interop.safetensors_io import write_safetensors
from lldiff.model import Transformer

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
    if model.cfg.mask_id is not None or model.cfg.attention != "causal":
        raise ValueError("a Llama export needs an AR model (causal attention, no mask token)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(llama_tensors(model), out, max_shard_bytes=max_shard_bytes)
    (out / "config.json").write_text(json.dumps(llama_config(model, tokenizer), indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, max_len=model.cfg.max_seq_len)
    return out


def export_hf(ckpt: str | Path, out: str | Path, *, dtype: str | None = None, max_shard_bytes: int | None = None,
              tokenizer: str | Path | None = None) -> tuple[Path, str]:
    """Export an lldiff checkpoint as a Hugging Face directory; returns ``(out, format)``,
    format ``llama`` (objectives without a mask token) or ``llada`` (with one)."""
    from lldiff.checkpoint import load_model
    from lldiff.interop.llada import export_llada

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another OUT_DIR")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    loaded = load_model(ckpt, tokenizer=tokenizer)
    model = loaded.model if dtype is None else loaded.model.to(DTYPES[dtype])
    if loaded.objective.mask_token:
        return export_llada(model, loaded.tokenizer, out, max_shard_bytes=max_shard_bytes), "llada"
    return export_llama(model, loaded.tokenizer, out, max_shard_bytes=max_shard_bytes), "llama"


# -- commands ----------------------------------------------------------------------------------
IMPORT_FORMATS = ("llada",)
EXPORT_FORMATS = ("hf",)


def import_main(argv: list[str]) -> None:
    from lldiff.interop.llada import import_llada

    parser = argparse.ArgumentParser(prog="lldiff import", description=(
        "Import a Hugging Face checkpoint directory as an lldiff run directory (checkpoints/imported.ckpt, "
        "tokenizer.json). lldiff generate/chat/eval --ckpt also accept the LLaDA directory itself."))
    parser.add_argument("format", choices=IMPORT_FORMATS, help="the directory's model family")
    parser.add_argument("hf_dir", help="directory with config.json, model.safetensors[.index.json], tokenizer.json")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights' dtype (default: as stored, bfloat16 for LLaDA-8B)")
    args = parser.parse_args(argv)
    ckpt = import_llada(args.hf_dir, args.out, dtype=None if args.dtype is None else DTYPES[args.dtype])
    print(ckpt)


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lldiff export", description=(
        "Export an lldiff checkpoint: AR -> Llama directory (transformers.LlamaForCausalLM), "
        "MDM/BD3 -> LLaDA directory (config.json with auto_map; add LLaDA's modeling_llada.py and "
        "configuration_llada.py from the Hub to load it with trust_remote_code)."))
    parser.add_argument("ckpt", help="lldiff checkpoint (.ckpt file or sharded directory)")
    parser.add_argument("--to", choices=EXPORT_FORMATS, required=True)
    parser.add_argument("out_dir", help="directory to write (must not exist or be empty)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights' dtype (default: as stored)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's run directory)")
    parser.add_argument("--max-shard-gb", type=float, default=None, help="split the weights into shards of this size")
    args = parser.parse_args(argv)
    shard = None if args.max_shard_gb is None else int(args.max_shard_gb * 2**30)
    out, kind = export_hf(args.ckpt, args.out_dir, dtype=args.dtype, max_shard_bytes=shard, tokenizer=args.tokenizer)
    print(f"{out} ({kind} format)")
