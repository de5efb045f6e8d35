"""Per-GPU memory of fine-tuning an imported LLaDA-8B (or any registered size), counted on the
real shapes with PyTorch's fake tensors: no GPU and no weights needed, a few seconds on a CPU.

    python benchmarks/sft_memory.py                             # LLaDA-8B, 4096 tokens, 8 x 80 GB and 1 x 80 GB LoRA
    python benchmarks/sft_memory.py --size llada-1B --gpus 4 --micro-batches 1,2,4
    python benchmarks/sft_memory.py --json out.json

What is counted, per GPU (GiB = 2**30 bytes):

* **states**: parameters, gradients and AdamW's two moments. Full fine-tuning under FSDP2 with
  ``bf16-mixed`` keeps fp32 weights, so 16 bytes per parameter, sharded over the GPUs. LoRA
  keeps the frozen weights in bf16 (2 bytes each, ``precision: bf16-true``) and 16 bytes per
  adapter parameter.
* **gathered weights**: FSDP2 all-gathers one unit at a time, in the dtype it stores (fp32 under
  ``bf16-mixed``): the root unit (embedding + head + final norm) for the whole step, plus two
  blocks (the one running and the one prefetched).
* **activations**: the bytes autograd saves for the backward, *measured* by running the
  backbone's real modules on fake tensors of the real shapes under bf16 autocast with a
  ``saved_tensors_hooks`` that records every saved tensor (views of one storage counted once):
  - with activation checkpointing, each block keeps its input (the residual stream, fp32 under
    ``bf16-mixed``, bf16 under ``bf16-true``) and
    one block at a time is recomputed in the backward (its saved tensors measured here);
  - the LM head and the loss: the plain head saves ``(T, V)`` logits for every position; the
    chunked head (``loss_chunk_tokens``, :mod:`lldiff.losses`) runs on the masked positions only
    (half the response on average for the MDM) and keeps one chunk's logits.
  Transients (a matmul's workspace, the allocator's fragmentation, NCCL buffers) are not in the
  count; the ``headroom`` column leaves 10% of the GPU for them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lldiff.config import ModelConfig
from lldiff.losses import linear_cross_entropy
from lldiff.model import Block, Transformer, rope_tables

GiB = 2**30
LLADA_8B = ModelConfig(name="llada-8B (imported)", n_layer=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=12288,
                       vocab_size=126464, max_seq_len=4096, rope_base=500_000.0, mask_id=126336)
"""GSAI-ML/LLaDA-8B-Base's shape as ``lldiff import llada`` builds it (the mask id inside the vocabulary)."""


class SavedBytes:
    """Sum of the bytes autograd saves inside the ``with`` block, each storage once, leaving out
    the storages of ``exclude`` (parameters and inputs, counted elsewhere)."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.excluded = {t.untyped_storage()._cdata for t in exclude}
        self.storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.excluded:
            self.storages[storage._cdata] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def block_saved_bytes(cfg: ModelConfig, batch: int, tokens: int, param_dtype: torch.dtype, fake: bool = True,
                      lora_rank: int | None = None) -> int:
    """Bytes one block saves for its backward on ``batch`` sequences of ``tokens`` under bf16
    autocast, beyond its weights and input: activations, and the bf16 copies of fp32 weights.
    ``fake``: on fake tensors (no memory, no compute), else on real ones. ``lora_rank``: with
    lldiff.lora's default adapters (their dropout and low-rank activations included)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(param_dtype)
    try:
        with torch.device("meta"):  # the module's structure; its tensors are made below
            block = Block(cfg)
            if lora_rank is not None:
                from lldiff.lora import LoraOptions, apply_lora

                holder = torch.nn.Module()
                holder.blocks = torch.nn.ModuleList([block])
                apply_lora(holder, LoraOptions(r=lora_rank))
    finally:
        torch.set_default_dtype(default)
    with FakeTensorMode() if fake else contextlib.nullcontext():
        weights = {name: torch.randn(p.shape, dtype=p.dtype).requires_grad_(p.requires_grad)
                   for name, p in block.named_parameters()}
        x = torch.randn(batch, tokens, cfg.d_model, requires_grad=True)
        cos, sin = rope_tables(cfg.head_dim, tokens, cfg.rope_base)
        with torch.autocast("cpu", dtype=torch.bfloat16), SavedBytes([x, *weights.values()]) as saved:
            torch.func.functional_call(block, weights, (x, cos.float(), sin.float(), None))
    return saved.total


def head_bytes(cfg: ModelConfig, rows: int, chunk_tokens: int | None, param_dtype: torch.dtype,
               fake: bool = True) -> tuple[int, int]:
    """(bytes the LM head and the cross-entropy save for their backward on ``rows`` scored rows,
    the backward's transient: the gradient of the logits in flight, fp32 and bf16). ``chunk_tokens``
    None is the plain head (every row's logits at once), else :mod:`lldiff.losses`' chunks."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        hidden = torch.randn(rows, cfg.d_model, requires_grad=True)
        weight = torch.randn(cfg.vocab_size, cfg.d_model, requires_grad=True, dtype=param_dtype)
        targets = torch.zeros(rows, dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16), SavedBytes([hidden, weight]) as saved:
            linear_cross_entropy(hidden, weight, targets, chunk_tokens).sum()
    in_flight = rows if chunk_tokens is None else min(rows, chunk_tokens)
    return saved.total, in_flight * cfg.vocab_size * (4 + 2)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Transformer(cfg)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "per_block": blocks // cfg.n_layer, "root": total - blocks}


def lora_parameters(cfg: ModelConfig, rank: int) -> int:
    """Adapters of rank ``rank`` on every attention and MLP projection (lldiff.lora's defaults):
    ``r * (in + out)`` per projection."""
    hd, kv = cfg.head_dim, cfg.kv_heads
    shapes = [(cfg.d_model, (cfg.n_heads + 2 * kv) * hd), (cfg.n_heads * hd, cfg.d_model),
              (cfg.d_model, 2 * cfg.d_ff), (cfg.d_ff, cfg.d_model)]
    return cfg.n_layer * sum(rank * (i + o) for i, o in shapes)


@dataclass
class Row:
    setup: str
    micro_batch: int
    states: float
    gathered: float
    activations: float
    total: float
    fits: str


def plan(cfg: ModelConfig, tokens: int, gpus: int, gpu_gib: float, micro_batches: list[int], chunk: int,
         lora_rank: int) -> tuple[list[Row], dict]:
    counts = parameter_counts(cfg)
    usable = 0.9 * gpu_gib
    full_states = counts["total"] * 16 / gpus / GiB
    full_gathered = (counts["root"] + 2 * counts["per_block"]) * 4 / GiB
    lora_states = (counts["total"] * 2 + lora_parameters(cfg, lora_rank) * 16) / GiB
    # fsdp2_ac on one GPU (the way to activation checkpointing) still unshards the root and two blocks, in bf16
    lora_gathered = (counts["root"] + 2 * counts["per_block"]) * 2 / GiB
    setups = (  # name, states, gathered, weights' dtype, head chunk, LoRA rank
        (f"full SFT, FSDP2 + AC, bf16-mixed, {gpus} GPUs, plain head", full_states, full_gathered, torch.float32, None,
         None),
        (f"full SFT, FSDP2 + AC, bf16-mixed, {gpus} GPUs, chunked head", full_states, full_gathered, torch.float32,
         chunk, None),
        (f"LoRA r={lora_rank}, fsdp2_ac, bf16-true, 1 GPU, chunked head", lora_states, lora_gathered, torch.bfloat16,
         chunk, lora_rank),
    )
    rows, measured = [], {"parameters": counts, "per_micro_batch": {}}
    for name, states, gathered, dtype, head_chunk, rank in setups:
        for b in micro_batches:
            residual = torch.finfo(dtype).bits // 8  # the residual stream has the embedding's dtype
            checkpointed = cfg.n_layer * b * tokens * cfg.d_model * residual  # each block's input, kept
            block = block_saved_bytes(cfg, b, tokens, dtype, lora_rank=rank)  # one block recomputed at a time
            scored = b * tokens if head_chunk is None else b * tokens // 2  # MDM: half the positions masked
            head, transient = head_bytes(cfg, scored, head_chunk, dtype)
            act = (checkpointed + block + head + transient) / GiB
            total = states + gathered + act
            rows.append(Row(name, b, states, gathered, act, total, "yes" if total <= usable else "no"))
            measured["per_micro_batch"][f"{name} | {b}"] = {
                "checkpointed_inputs_gib": checkpointed / GiB, "block_recompute_gib": block / GiB,
                "head_saved_gib": head / GiB, "head_backward_transient_gib": transient / GiB}
    return rows, measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", help="a registered size instead of the imported LLaDA-8B shape")
    parser.add_argument("--tokens", type=int, default=4096, help="sequence length (default 4096, LLaDA's SFT)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs sharing the full fine-tuning (default 8)")
    parser.add_argument("--gpu-gib", type=float, default=80 * 1e9 / GiB, help="memory per GPU in GiB (default 80 GB)")
    parser.add_argument("--micro-batches", default="1,2,4,8", help="sequences per GPU per step (default 1,2,4,8)")
    parser.add_argument("--chunk", type=int, default=4096, help="loss_chunk_tokens (default 4096)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--json", help="write the table and the measured figures here")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_name(args.size) if args.size else LLADA_8B
    micro = [int(b) for b in args.micro_batches.split(",")]
    rows, measured = plan(cfg, args.tokens, args.gpus, args.gpu_gib, micro, args.chunk, args.lora_rank)
    print(f"{cfg.name}: {measured['parameters']['total'] / 1e9:.2f} B parameters, {args.tokens} tokens per "
          f"sequence, {args.gpu_gib:.1f} GiB per GPU (90% usable)")
    one = {k.split(" | ")[0]: v for k, v in measured["per_micro_batch"].items() if k.endswith(f" | {micro[0]}")}
    for name, parts in one.items():
        print(f"  micro-batch {micro[0]}, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    width = max(len(r.setup) for r in rows)
    print(f"{'setup':<{width}} | micro | states | gathered | activations | total GiB | fits")
    for r in rows:
        print(f"{r.setup:<{width}} | {r.micro_batch:>5} | {r.states:6.1f} | {r.gathered:8.1f} | {r.activations:11.1f} | "
              f"{r.total:9.1f} | {r.fits}")
    if args.json:
        from lldiff.atomic import write_text

        write_text(args.json, json.dumps({"measured": measured, "rows": [r.__dict__ for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
