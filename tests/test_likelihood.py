"""Likelihood estimators (SPEC §5) checked against exact enumeration and hand computation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.special import beta as beta_fn
from scipy.special import betainc

from lldiff.objectives.ar.likelihood import ar_loglik
from lldiff.objectives.mdm.likelihood import mdm_conditional_loglik, mdm_elbo
from lldiff.objectives.common.likelihood import sample_answer_masks, sample_mask_counts
from lldiff.objectives.mdm.loss import mdm_elbo_nats

V = 4  # real tokens 0..3
M = V  # mask id


class TableModel:
    """Deterministic model whose logits depend on every visible token (and its position):
    ``logits[i] = bias[i] + sum_j W[x_j, j, i]`` over all j (bidirectional) or j <= i (causal).
    Records every input it sees."""

    def __init__(self, max_len: int = 8, *, causal: bool = False, seed: int = 0, scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.w = scale * torch.randn(V + 1, max_len, max_len, V, generator=g, dtype=torch.float64)
        self.bias = scale * torch.randn(max_len, V, generator=g, dtype=torch.float64)
        self.causal = causal
        self.inputs: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.inputs.append(ids.clone())
        t = ids.shape[1]
        contrib = self.w[ids, torch.arange(t)][:, :, :t]  # (B, j, i, V)
        if self.causal:
            contrib = contrib * torch.ones(t, t, dtype=torch.float64).triu()[None, :, :, None]
        return (self.bias[:t] + contrib.sum(dim=1)).float()


def uniform_model(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*ids.shape, V)


def exact_expectations(model, prompt: torch.Tensor, answer: torch.Tensor) -> dict[str, float]:
    """Enumerate every mask set S of the answer. ``l_form`` is E over l ~ U{1..L}, S uniform
    of size l of ``-(L/l) sum_{i in S} CE_i``; ``unweighted`` drops the L/l factor (a wrong
    estimator, for power checks); ``t_form(eps)`` is the continuous-time negative ELBO."""
    p, length = prompt.numel(), answer.numel()
    f = {}
    for k in range(1, length + 1):
        for subset in itertools.combinations(range(length), k):
            ids = torch.cat([prompt, answer]).clone()
            ids[[p + i for i in subset]] = M
            logits = model(ids[None])[0, p:].double()
            ce = F.cross_entropy(logits, answer, reduction="none")
            f[subset] = ce[list(subset)].sum().item()
    l_form = sum(-(length / len(s)) * v / (length * math.comb(length, len(s))) for s, v in f.items())
    unweighted = sum(-v / (length * math.comb(length, len(s))) for s, v in f.items())

    def t_form(eps: float) -> float:
        total = 0.0
        for s, v in f.items():
            k = len(s)
            integral = beta_fn(k, length - k + 1) * (1.0 - betainc(k, length - k + 1, eps))
            total += v * integral / (1.0 - eps)
        return total

    return {"l_form": l_form, "unweighted": unweighted, "t_form": t_form}


# ----------------------------------------------------------------------------- MDM: unbiasedness


@pytest.mark.parametrize("stratified", [True, False])
def test_mc_mean_matches_exact_enumeration(stratified):
    model = TableModel(seed=1)
    pairs = [
        (torch.tensor([1, 3]), torch.tensor([0, 2, 1, 3])),
        (torch.tensor([2, 2]), torch.tensor([3, 3, 0, 1])),
    ]
    copies = 1500
    prompt = torch.stack([p for p, _ in pairs]).repeat_interleave(copies, dim=0)
    answer = torch.stack([a for _, a in pairs]).repeat_interleave(copies, dim=0)
    gen = torch.Generator().manual_seed(123)
    # n_mc = 3 is not a multiple of L = 4: stratification is non-trivial
    est = mdm_conditional_loglik(
        model, prompt, answer, mask_id=M, n_mc=3, batch_size=1024, generator=gen, stratified=stratified
    ).double()
    for g, (p, a) in enumerate(pairs):
        exact = exact_expectations(model, p, a)
        chunk = est[g * copies : (g + 1) * copies]  # iid across examples
        mean, se = chunk.mean().item(), chunk.std().item() / math.sqrt(copies)
        assert se > 0
        assert abs(mean - exact["l_form"]) < 5 * se, (mean, exact["l_form"], se)
        # power: the test would catch a missing L/l weight and is precise relative to |E|
        assert abs(exact["unweighted"] - exact["l_form"]) > 10 * se
        assert se < 0.02 * abs(exact["l_form"])


def test_mc_mean_matches_exact_enumeration_tiny_transformer():
    from lldiff.config import ModelConfig
    from lldiff.model import Transformer

    torch.manual_seed(0)
    net = Transformer(ModelConfig(n_layer=1, d_model=16, n_heads=2, d_ff=32, vocab_size=V, attention="bidirectional"))
    with torch.no_grad():
        net.head.weight.mul_(20.0)  # make logits far from uniform so masking matters
    net.eval()

    def model(ids):
        with torch.no_grad():
            return net(ids)

    p, a = torch.tensor([2, 0]), torch.tensor([1, 3, 2])
    exact = exact_expectations(model, p, a)
    copies = 1200
    est = mdm_conditional_loglik(
        model, p.repeat(copies, 1), a.repeat(copies, 1), mask_id=M, n_mc=2, batch_size=2400,
        generator=torch.Generator().manual_seed(5),
    ).double()
    mean, se = est.mean().item(), est.std().item() / math.sqrt(copies)
    assert abs(mean - exact["l_form"]) < 5 * se, (mean, exact["l_form"], se)
    assert abs(exact["unweighted"] - exact["l_form"]) > 10 * se


def test_mask_counts_and_masks():
    gen = torch.Generator().manual_seed(0)
    # stratified, n a multiple of L: every l exactly n/L times
    for _ in range(20):
        counts = sample_mask_counts(4, 12, stratified=True, generator=gen)
        assert torch.bincount(counts, minlength=5)[1:].tolist() == [3, 3, 3, 3]
    # every draw's marginal is uniform, including the case where upstream's rounding is not
    draws = torch.stack([sample_mask_counts(3, 2, stratified=True, generator=gen) for _ in range(6000)])
    for j in range(2):
        freq = torch.bincount(draws[:, j], minlength=4)[1:].double() / draws.shape[0]
        assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.025), freq
    plain = sample_mask_counts(5, 5000, stratified=False, generator=gen)
    assert plain.min() >= 1 and plain.max() <= 5
    # masks: exactly l positions, uniform over positions
    counts = torch.randint(1, 6, (4000,), generator=gen)
    masks = sample_answer_masks(counts, 5, generator=gen)
    assert torch.equal(masks.sum(dim=1), counts)
    per_pos = masks[counts == 2].double().mean(dim=0)
    assert torch.allclose(per_pos, torch.full((5,), 0.4, dtype=torch.float64), atol=0.04)


# ----------------------------------------------------------------------------- MDM: limits


def test_uniform_predictor_is_exact_for_every_draw():
    answer = torch.randint(0, V, (6, 5), generator=torch.Generator().manual_seed(0))
    prompt = torch.randint(0, V, (6, 3), generator=torch.Generator().manual_seed(1))
    for stratified in (True, False):
        est = mdm_conditional_loglik(
            uniform_model, prompt, answer, mask_id=M, n_mc=1, stratified=stratified,
            generator=torch.Generator().manual_seed(2),
        )
        assert torch.allclose(est, torch.full((6,), -5 * math.log(V)), atol=1e-5)


def test_perfect_predictor_gives_zero():
    prompt, answer = torch.tensor([[0, 1]]), torch.tensor([[2, 3, 1, 0]])
    truth = torch.cat([prompt, answer], dim=1)

    def perfect(ids):
        return 50.0 * F.one_hot(truth.expand(ids.shape[0], -1), V).float()

    est = mdm_conditional_loglik(perfect, prompt, answer, mask_id=M, n_mc=16)
    assert -1e-4 < est.item() <= 0.0


def test_single_token_answer_uses_one_exact_draw():
    model = TableModel(seed=3)
    prompt, answer = torch.tensor([[1, 2, 0]]), torch.tensor([[3]])
    est = mdm_conditional_loglik(model, prompt, answer, mask_id=M, n_mc=128, batch_size=8)
    assert len(model.inputs) == 1 and model.inputs[0].shape[0] == 1
    logits = model(torch.tensor([[1, 2, 0, M]]))[0, -1].double()
    assert est.item() == pytest.approx(-F.cross_entropy(logits, answer[0]).item(), abs=1e-5)


def test_minibatching_and_generator_reproducibility():
    model = TableModel(seed=4)
    prompt, answer = torch.tensor([[1, 2], [0, 0]]), torch.tensor([[3, 0, 1], [2, 2, 1]])
    a = mdm_conditional_loglik(model, prompt, answer, mask_id=M, n_mc=10, batch_size=3,
                               generator=torch.Generator().manual_seed(9))
    assert max(x.shape[0] for x in model.inputs) == 3 and len(model.inputs) == 7  # ceil(20 / 3)
    # the masks do not depend on batch_size: the same generator gives the same estimate
    b = mdm_conditional_loglik(model, prompt, answer, mask_id=M, n_mc=10, batch_size=20,
                               generator=torch.Generator().manual_seed(9))
    assert torch.allclose(a, b, atol=1e-6)
    for ids in model.inputs:
        assert (ids[:, :2] != M).all()  # the prompt is never masked
        assert ((ids[:, 2:] == M).sum(dim=1) >= 1).all()


def test_ragged_lists():
    model = TableModel(seed=5)
    prompts = [torch.tensor([1]), torch.tensor([2, 3, 0]), torch.tensor([], dtype=torch.long)]
    answers = [torch.tensor([0, 1, 2]), torch.tensor([3]), torch.tensor([1, 1])]
    est = mdm_conditional_loglik(model, prompts, answers, mask_id=M, n_mc=4,
                                 generator=torch.Generator().manual_seed(0))
    assert est.shape == (3,)
    # a list of one example equals the tensor path with the same generator
    single = mdm_conditional_loglik(model, prompts[:1], answers[:1], mask_id=M, n_mc=4,
                                    generator=torch.Generator().manual_seed(1))
    tensor = mdm_conditional_loglik(model, prompts[0][None], answers[0][None], mask_id=M, n_mc=4,
                                    generator=torch.Generator().manual_seed(1))
    assert torch.allclose(single, tensor)
    uni = mdm_conditional_loglik(uniform_model, prompts, answers, mask_id=M, n_mc=3)
    assert torch.allclose(uni, torch.tensor([-3.0, -1.0, -2.0]) * math.log(V), atol=1e-5)


# ----------------------------------------------------------------------------- CFG


def test_cfg_zero_equals_no_cfg():
    model = TableModel(seed=6)
    prompt, answer = torch.tensor([[1, 2]]), torch.tensor([[3, 0, 1]])
    plain = mdm_conditional_loglik(model, prompt, answer, mask_id=M, n_mc=8,
                                   generator=torch.Generator().manual_seed(0))
    n_calls = len(model.inputs)
    zero = mdm_conditional_loglik(model, prompt, answer, mask_id=M, n_mc=8, cfg_scale=0.0,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, zero)
    assert all((ids[:, :2] != M).all() for ids in model.inputs[n_calls:])  # no unconditional pass


def test_cfg_unconditional_pass_masks_whole_prompt():
    model = TableModel(seed=7)
    prompt, answer = torch.tensor([[1, 2, 3]]), torch.tensor([[3, 0, 1, 2]])
    mdm_conditional_loglik(model, prompt, answer, mask_id=M, n_mc=6, batch_size=6, cfg_scale=1.0)
    (ids,) = model.inputs
    cond, uncond = ids.chunk(2)
    assert (cond[:, :3] == prompt).all()
    assert (uncond[:, :3] == M).all()
    assert torch.equal(cond[:, 3:], uncond[:, 3:])  # same masked answer in both passes


def test_cfg_formula_single_token():
    model = TableModel(seed=8)
    prompt, answer = torch.tensor([[1, 2]]), torch.tensor([[0]])
    w = 1.5
    est = mdm_conditional_loglik(model, prompt, answer, mask_id=M, cfg_scale=w)
    c = model(torch.tensor([[1, 2, M]]))[0, -1].double()
    u = model(torch.tensor([[M, M, M]]))[0, -1].double()
    expected = -F.cross_entropy(u + (w + 1) * (c - u), answer[0]).item()
    assert est.item() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- unconditional ELBO


def test_mdm_elbo_matches_mdm_elbo_nats_context_independent():
    g = torch.Generator().manual_seed(0)
    table = 2.0 * torch.randn(5, V, generator=g)

    def fixed(ids):
        return table[: ids.shape[1]].expand(ids.shape[0], -1, -1)

    x = torch.tensor([2, 0, 3, 1, 1])
    exact = -F.cross_entropy(table, x, reduction="sum").item()  # = E of both estimators
    copies = 2000
    tokens = x.repeat(copies, 1)
    elbo = mdm_elbo(fixed, tokens, mask_id=M, n_mc=2, batch_size=4000, generator=g).double()
    se = elbo.std().item() / math.sqrt(copies)
    assert abs(elbo.mean().item() - exact) < 5 * se + 1e-6
    nelbo = mdm_elbo_nats(fixed, tokens, M, num_samples=2, generator=g).double()
    se_t = nelbo.std().item() / math.sqrt(copies)
    assert abs(-nelbo.mean().item() - exact) < 5 * se_t


def test_l_form_equals_t_form_exactly_and_mdm_elbo_nats_agrees():
    model = TableModel(seed=9)
    x = torch.tensor([3, 1, 0, 2])
    empty = torch.tensor([], dtype=torch.long)
    exact = exact_expectations(model, empty, x)
    # enumeration identity: E_l[-(L/l) sum CE] == -E_t[sum CE / t] at eps = 0
    assert exact["l_form"] == pytest.approx(-exact["t_form"](0.0), rel=1e-10)
    copies = 3000
    g = torch.Generator().manual_seed(1)
    elbo = mdm_elbo(model, x.repeat(copies, 1), mask_id=M, n_mc=4, batch_size=4096, generator=g).double()
    se = elbo.std().item() / math.sqrt(copies)
    assert abs(elbo.mean().item() - exact["l_form"]) < 5 * se
    nelbo = mdm_elbo_nats(model, x.repeat(copies, 1), M, num_samples=4, generator=g).double()
    se_t = nelbo.std().item() / math.sqrt(copies)
    assert abs(nelbo.mean().item() - exact["t_form"](1e-3)) < 5 * se_t
    assert se_t < 0.05 * abs(exact["l_form"])


# ----------------------------------------------------------------------------- AR


def chain_rule(model, prompt: torch.Tensor, answer: torch.Tensor) -> float:
    """Position by position with separate forward passes on growing prefixes."""
    seq = prompt.clone()
    total = 0.0
    for tok in answer:
        logits = model(seq[None])[0, -1].double()
        total += logits.log_softmax(-1)[tok].item()
        seq = torch.cat([seq, tok[None]])
    return total


def test_ar_loglik_matches_chain_rule_table_model():
    model = TableModel(causal=True, seed=10)
    prompt = torch.tensor([[1, 3, 0], [2, 2, 2]])
    answer = torch.tensor([[2, 0, 1, 3], [0, 0, 1, 1]])
    got = ar_loglik(model, prompt, answer)
    for b in range(2):
        assert got[b].item() == pytest.approx(chain_rule(model, prompt[b], answer[b]), abs=1e-4)


def test_ar_loglik_matches_chain_rule_tiny_transformer_and_left_padding():
    from lldiff.config import ModelConfig
    from lldiff.model import Transformer

    torch.manual_seed(0)
    net = Transformer(ModelConfig(n_layer=2, d_model=16, n_heads=2, d_ff=32, vocab_size=V, attention="causal"))
    with torch.no_grad():
        net.head.weight.mul_(10.0)
    net.eval()
    prompt, answer = torch.tensor([1, 3]), torch.tensor([2, 0, 1])
    got = ar_loglik(net, prompt[None], answer[None])
    with torch.no_grad():
        assert got.item() == pytest.approx(chain_rule(net, prompt, answer), abs=1e-4)
    # a left-padded batch with an attention mask gives the same values (RoPE is relative)
    prompts = torch.tensor([[0, 0, 1, 3], [2, 1, 0, 3]])
    pmask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    answers = torch.tensor([[2, 0, 1], [1, 1, 2]])
    padded = ar_loglik(net, prompts, answers, prompt_mask=pmask)
    ragged = ar_loglik(net, [prompts[0, 2:], prompts[1]], list(answers))
    assert torch.allclose(padded, ragged, atol=1e-4)


def test_mdm_left_padding_matches_unpadded():
    from lldiff.config import ModelConfig
    from lldiff.model import Transformer

    torch.manual_seed(1)
    net = Transformer(ModelConfig(n_layer=1, d_model=16, n_heads=2, d_ff=32, vocab_size=V, attention="bidirectional"))
    net.eval()
    answer = torch.tensor([[2, 0, 1]])
    padded = mdm_conditional_loglik(net, torch.tensor([[0, 0, 1, 3]]), answer, mask_id=M, n_mc=5,
                                    prompt_mask=torch.tensor([[False, False, True, True]]),
                                    generator=torch.Generator().manual_seed(3))
    plain = mdm_conditional_loglik(net, torch.tensor([[1, 3]]), answer, mask_id=M, n_mc=5,
                                   generator=torch.Generator().manual_seed(3))
    assert torch.allclose(padded, plain, atol=1e-4)


def test_ar_uniform_model():
    prompt, answer = torch.tensor([[1, 2]]), torch.tensor([[0, 3, 3, 1, 2]])
    assert ar_loglik(uniform_model, prompt, answer).item() == pytest.approx(-5 * math.log(V), abs=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_mc": 0}, "n_mc"),
        ({"batch_size": 0}, "batch_size"),
        ({"cfg_scale": -0.5}, "cfg_scale"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mdm_conditional_loglik(uniform_model, torch.tensor([[1]]), torch.tensor([[2]]), mask_id=M, **kwargs)


def test_bad_answers():
    with pytest.raises(ValueError, match="empty"):
        mdm_conditional_loglik(uniform_model, torch.tensor([[1]]), torch.zeros(1, 0, dtype=torch.long), mask_id=M)
    with pytest.raises(ValueError, match="empty"):
        mdm_conditional_loglik(uniform_model, [torch.tensor([1])], [torch.tensor([], dtype=torch.long)], mask_id=M)
    with pytest.raises(ValueError, match="mask id 4"):
        mdm_conditional_loglik(uniform_model, torch.tensor([[1]]), torch.tensor([[2, M]]), mask_id=M)
    with pytest.raises(ValueError, match="mask id 4"):
        mdm_elbo(uniform_model, torch.tensor([[M, 1]]), mask_id=M, n_mc=2)
    with pytest.raises(ValueError, match="empty"):
        ar_loglik(uniform_model, torch.tensor([[1]]), torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt is empty"):
        ar_loglik(uniform_model, torch.zeros(1, 0, dtype=torch.long), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="mask id 4"):
        ar_loglik(uniform_model, torch.tensor([[1]]), torch.tensor([[M]]), mask_id=M)
    with pytest.raises(ValueError, match="batch size"):
        mdm_conditional_loglik(uniform_model, torch.tensor([[1], [2]]), torch.tensor([[2]]), mask_id=M)
