"""Objectives against the math: masking rates, loss expectations, random lengths, schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from lldiff.optim import smdm_warmup_steps, warmup_cosine
from lldiff.objectives.ar.loss import ar_nll
from lldiff.objectives.common.masking import draw_random_length, expected_length, forward_mask, sample_mask_ratio
from lldiff.objectives.mdm.loss import mdm_elbo_nats, mdm_loss


class ConstantPredictor(torch.nn.Module):
    """Ignores its input and predicts one fixed distribution over V tokens."""

    def __init__(self, probs):
        super().__init__()
        self.logits = probs.log()

    def forward(self, ids):
        return self.logits.expand(*ids.shape, -1)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.9])
def test_masking_rate_matches_t(t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 10, (64, 512), generator=g)
    ratios = torch.full((64,), t)
    xt, masked = forward_mask(x0, ratios, mask_id=10, generator=g)
    n = masked.numel()
    tolerance = 5 * math.sqrt(t * (1 - t) / n)  # 5 sigma binomial
    assert abs(masked.float().mean().item() - t) < tolerance
    assert (xt[masked] == 10).all() and (xt[~masked] == x0[~masked]).all()


def test_maskable_restricts_masking():
    x0 = torch.randint(0, 10, (8, 20))
    maskable = torch.zeros(8, 20, dtype=torch.bool)
    maskable[:, 12:] = True
    xt, masked = forward_mask(x0, torch.ones(8), 10, maskable=maskable)
    assert masked[:, 12:].all() and not masked[:, :12].any()
    assert (xt[:, :12] == x0[:, :12]).all()


@pytest.mark.parametrize("stratified", [False, True])
def test_mask_ratio_marginal_is_uniform(stratified):
    g = torch.Generator().manual_seed(1)
    eps = 1e-3
    t = torch.cat([sample_mask_ratio(16, eps=eps, stratified=stratified, generator=g) for _ in range(500)])
    assert t.min() >= eps and t.max() <= 1
    assert stats.kstest(((t - eps) / (1 - eps)).numpy(), "uniform").pvalue > 1e-3


def test_stratified_ratios_cover_the_interval():
    t = sample_mask_ratio(8, eps=0.0, stratified=True, generator=torch.Generator().manual_seed(0))
    assert sorted(torch.floor(t * 8).long().tolist()) == list(range(8))  # one per stratum


@pytest.mark.parametrize("stratified", [False, True])
def test_weighted_loss_expectation_is_the_cross_entropy(stratified):
    """For a predictor that ignores its input, E_t E_mask[sum_masked CE / t] / L equals
    the per-token CE exactly: P(masked | t) / t = 1."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.2, 0.2, 0.1])
    model = ConstantPredictor(probs)
    x0 = torch.randint(0, 4, (32, 16))
    exact = -probs.log()[x0].mean().item()
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([mdm_loss(model, x0, 4, stratified=stratified, generator=g) for _ in range(3000)])
    sem = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - exact) < 5 * sem + 1e-4
    assert sem < 0.02 * exact  # the test has power


def test_elbo_estimator_expectation():
    torch.manual_seed(0)
    probs = torch.tensor([0.6, 0.3, 0.1])
    model = ConstantPredictor(probs)
    x0 = torch.randint(0, 3, (4, 12))
    exact = -probs.log()[x0].sum(dim=1)  # nats per sequence
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([mdm_elbo_nats(model, x0, 3, num_samples=4, generator=g) for _ in range(2000)])
    sem = draws.std(dim=0) / math.sqrt(len(draws))
    assert ((draws.mean(dim=0) - exact).abs() < 5 * sem + 1e-4).all()


def test_elbo_of_a_perfect_predictor_is_zero():
    x0 = torch.randint(0, 5, (2, 10))
    oracle = lambda xt: torch.nn.functional.one_hot(x0, 5).float() * 100.0  # noqa: E731
    assert mdm_elbo_nats(oracle, x0, 5, num_samples=3).abs().max() < 1e-6


def test_ar_nll_is_chain_rule():
    probs = torch.tensor([0.7, 0.2, 0.1])
    x = torch.tensor([[0, 1, 2, 0]])
    nll = ar_nll(ConstantPredictor(probs), x)
    torch.testing.assert_close(nll, -probs.log()[x[:, 1:]])


def test_random_length_frequency_and_uniformity():
    g = torch.Generator().manual_seed(0)
    seq_len, p, n = 16, 0.2, 20000
    lengths = torch.tensor([draw_random_length(seq_len, p, generator=g) for _ in range(n)])
    # a truncated draw equals seq_len with probability 1/L, so P(length < L) = p (L-1)/L
    short = (lengths < seq_len).float().mean().item()
    expected_short = p * (seq_len - 1) / seq_len
    assert abs(short - expected_short) < 5 * math.sqrt(expected_short * (1 - expected_short) / n)
    counts = torch.bincount(lengths[lengths < seq_len], minlength=seq_len)[1:seq_len]
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3  # uniform over {1..L-1}
    mean_len = lengths.float().mean().item()
    assert mean_len == pytest.approx(expected_length(seq_len, p), rel=0.01)


def test_random_length_default_never_truncates_at_zero():
    assert all(draw_random_length(32, 0.0) == 32 for _ in range(100))
    with pytest.raises(ValueError, match="probability"):
        draw_random_length(32, 1.5)


def test_schedule_warmup_then_cosine_to_floor():
    max_steps, warmup, floor = 1000, 100, 0.1
    lr = [warmup_cosine(s, max_steps=max_steps, warmup_steps=warmup, min_ratio=floor) for s in range(1201)]
    assert lr[0] == pytest.approx(1 / warmup) and lr[warmup - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lr[:warmup], lr[1:warmup]))
    assert all(a >= b for a, b in zip(lr[warmup:max_steps], lr[warmup + 1 : max_steps + 1]))
    assert lr[max_steps] == pytest.approx(floor, abs=1e-12)
    assert lr[max_steps - 1] > floor and all(v == floor for v in lr[max_steps:])
    mid = warmup + (max_steps - warmup) // 2
    assert lr[mid] == pytest.approx(floor + (1 - floor) / 2)


def test_smdm_warmup_rule():
    assert smdm_warmup_steps(50_000) == 500
    assert smdm_warmup_steps(2_000) == 100
    assert smdm_warmup_steps(60) == 60


def test_fused_adamw_follows_the_reference_update():
    """The optimizer lldiff builds (fused AdamW on plain CPU tensors) takes the same steps as
    PyTorch's single-tensor AdamW with the same groups, to float rounding."""
    from lldiff.model import Transformer
    from lldiff.config import ModelConfig
    from lldiff.optim import build_optimizer, fused_adamw_supported

    torch.manual_seed(0)
    fused_model = Transformer(ModelConfig(n_layer=2, d_model=32, n_heads=2, d_ff=64, vocab_size=50, max_seq_len=16))
    reference_model = Transformer(fused_model.cfg)
    reference_model.load_state_dict(fused_model.state_dict())
    assert fused_adamw_supported(list(fused_model.parameters()))
    fused, _ = build_optimizer(fused_model, max_steps=10, lr=1e-2, min_lr_ratio=0.1, weight_decay=0.1,
                               betas=(0.9, 0.95), warmup_steps=0)
    assert fused.defaults["fused"]
    groups = [{"params": [p for p in reference_model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in reference_model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    ids = torch.randint(0, 50, (4, 16))
    for _ in range(10):
        for model, optimizer in ((fused_model, fused), (reference_model, reference)):
            F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
