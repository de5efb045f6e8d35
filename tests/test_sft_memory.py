"""benchmarks/sft_memory.py: the fake-tensor count equals the same count on real tensors, and
its totals add up (the README's LLaDA-8B memory table comes from it)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lldiff.config import ModelConfig
from lldiff.model import Transformer

SPEC = importlib.util.spec_from_file_location("sft_memory", Path(__file__).parents[1] / "benchmarks" / "sft_memory.py")
sft_memory = importlib.util.module_from_spec(SPEC)
sys.modules["sft_memory"] = sft_memory  # dataclasses look their module up
SPEC.loader.exec_module(sft_memory)

TINY = ModelConfig(n_layer=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=320, max_seq_len=64,
                   mask_id=300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_counts_equal_real_ones(dtype):
    fake = sft_memory.block_saved_bytes(TINY, 2, 32, dtype, fake=True)
    real = sft_memory.block_saved_bytes(TINY, 2, 32, dtype, fake=False)
    assert fake == real > 0
    for chunk in (None, 16):
        assert sft_memory.head_bytes(TINY, 48, chunk, dtype, fake=True) == \
            sft_memory.head_bytes(TINY, 48, chunk, dtype, fake=False)


def test_chunking_keeps_one_chunk_of_logits():
    plain, plain_transient = sft_memory.head_bytes(TINY, 64, None, torch.float32)
    chunked, chunked_transient = sft_memory.head_bytes(TINY, 64, 16, torch.float32)
    logits = 64 * TINY.vocab_size * 4  # the plain head keeps every row's fp32 log-softmax
    assert plain >= logits and chunked < plain - 0.7 * logits
    assert (plain_transient, chunked_transient) == (64 * 320 * 6, 16 * 320 * 6)


def test_plan_adds_up():
    rows, measured = sft_memory.plan(TINY, 32, gpus=2, gpu_gib=1.0, micro_batches=[1, 2], chunk=16, lora_rank=4)
    params = sum(p.numel() for p in Transformer(TINY).parameters())
    assert measured["parameters"]["total"] == params
    full = rows[0]
    assert full.states == pytest.approx(params * 16 / 2 / 2**30)
    for row in rows:
        assert row.total == pytest.approx(row.states + row.gathered + row.activations)
    assert rows[1].activations > rows[0].activations  # two sequences hold more than one
