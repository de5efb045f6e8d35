"""A tiny MDM trained on a deterministic toy language must generate it, whatever the sampler."""

import pytest
import torch

from lldiff.sampling import generate, generate_threshold
from lldiff.toy import counting_sequences, train_toy_mdm


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
