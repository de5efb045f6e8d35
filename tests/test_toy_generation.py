"""A tiny MDM and a tiny BD3 trained on a deterministic toy language must generate it,
whatever the sampler (for BD3 also: prompts ending inside a block, left-padded batches)."""

import pytest
import torch

from lldiff.objectives.bd3.decoding import block_generate
from lldiff.objectives.common.decoding import DecodeOptions
from lldiff.completion import complete
from lldiff.objectives.mdm.decoding import generate, generate_threshold
from conftest import load_benchmark

_toy = load_benchmark("toy")
VOCAB, counting_sequences, train_toy_bd3, train_toy_mdm = (
    _toy.VOCAB, _toy.counting_sequences, _toy.train_toy_bd3, _toy.train_toy_mdm)


@pytest.fixture(scope="module")
def toy():
    model = train_toy_mdm()  # ~15 s on 2 CPU cores
    seqs = counting_sequences(128, 16, generator=torch.Generator().manual_seed(1))
    return model, seqs[:, :4], seqs[:, 4:]


@pytest.mark.parametrize("block_length,steps", [(12, 12), (4, 12), (4, 6)])
def test_low_confidence_sampling_generates_the_language(toy, block_length, steps):
    model, prompt, target = toy
    out = generate(model, prompt, gen_length=12, steps=steps, block_length=block_length, mask_id=model.cfg.mask_id)
    assert out.model_calls == steps
    assert torch.equal(out.canvas[:, :4], prompt)
    assert (out.answer_ids == target).all(1).float().mean() == 1.0


def test_threshold_decoding_needs_3x_fewer_calls_at_no_loss(toy):
    model, prompt, target = toy
    fixed = generate(model, prompt, gen_length=12, steps=12, block_length=12, mask_id=model.cfg.mask_id)
    fast = generate_threshold(model, prompt, gen_length=12, block_length=12, mask_id=model.cfg.mask_id,
                              threshold=0.95)
    accuracy = lambda out: (out.answer_ids == target).all(1).float().mean().item()  # noqa: E731
    assert accuracy(fast) == accuracy(fixed) == 1.0
    assert 3 * fast.model_calls <= fixed.model_calls


@pytest.fixture(scope="module")
def toy_bd3():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and immune to a busy machine
    try:
        model = train_toy_bd3(block_size=4, steps=400)  # ~15 s on one CPU core
    finally:
        torch.set_num_threads(before)
    return model, counting_sequences(128, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prompt_len", [1, 4, 6])  # prompts ending inside a block and on a block boundary
@pytest.mark.parametrize("kw", [{}, {"steps_per_block": 2}, {"remasking": "threshold", "threshold": 0.9}])
def test_block_diffusion_generates_the_language(toy_bd3, prompt_len, kw):
    model, seqs = toy_bd3
    out = block_generate(model, seqs[:, :prompt_len], gen_length=16 - prompt_len, block_size=4,
                         mask_id=model.cfg.mask_id, **kw)
    assert torch.equal(out.canvas[:, :prompt_len], seqs[:, :prompt_len])
    assert (out.answer_ids == seqs[:, prompt_len:]).all(1).float().mean() == 1.0
    blocks = 4 - prompt_len // 4
    if "steps_per_block" in kw:
        assert out.model_calls <= 2 * blocks
    if "threshold" in kw:
        assert out.model_calls < 16 - prompt_len  # several tokens per call


def test_block_diffusion_left_padded_batch_generates_the_language(toy_bd3):
    model, seqs = toy_bd3
    prompts = [seqs[i, : 1 + i % 6].tolist() for i in range(24)]  # lengths 1..6: every block alignment
    out = complete(model, prompts, DecodeOptions(length=8), eos_id=VOCAB + 5, pad_id=0)
    for i, answer in enumerate(out.answers):
        n = len(prompts[i])
        assert answer == seqs[i, n:n + 8].tolist(), i
