"""Block diffusion (SPEC §9), checked against the math rather than against the code:

* the [x_t ⊕ x_0] mask against a literal double-loop reading of SPEC §9;
* the vectorised 2L forward against a block-by-block forward (what a sampler with a KV
  cache of the clean blocks computes), built here without the 2L trick;
* block_size = L against lldiff.objectives.mdm_loss / mdm_elbo_nats (same draws);
* block_size = 1 against next-token CE of the same network (mask token as the query);
* the validation NELBO against the exact NLL of the model's own block diffusion
  distribution, enumerated over every sequence of a tiny vocabulary;
* the backbone's new ``positions`` / ``attn_mask`` plumbing.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lldiff.attention import reference_attention, sdpa_attention, xformers_attention
from lldiff.objectives.bd3.loss import bd3_logits, bd3_loss, bd3_nelbo_nats, bd3_weighted_ce, block_diffusion_mask, block_diffusion_mask_from_ids, block_forward_mask, block_ids, num_blocks, sample_block_mask_ratios
from lldiff.config import SIZES, ModelConfig
from lldiff.model import Transformer
from lldiff.objectives.mdm.loss import mdm_elbo_nats, mdm_loss


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def _model(vocab: int, *, attention: str = "bidirectional", backend: str = "sdpa", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = SIZES["tiny-0.03M"].replace(vocab_size=vocab, attention=attention, attn_backend=backend, **kw)
    return Transformer(cfg).eval()


# -- the mask ----------------------------------------------------------------------------------
def spec_mask(seq_len: int, block: int) -> torch.Tensor:
    """SPEC §9 read literally: positions 0..L-1 are x_t, L..2L-1 are x_0, blk(i) is the block of
    i within its half; the mask is the OR of the three parts."""
    n = 2 * seq_len
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            q_clean, k_clean = q >= seq_len, k >= seq_len
            bq, bk = (q % seq_len) // block, (k % seq_len) // block
            block_diagonal = q_clean == k_clean and bq == bk
            offset_block_causal = not q_clean and k_clean and bq > bk
            block_causal = q_clean and k_clean and bq >= bk
            mask[q, k] = block_diagonal or offset_block_causal or block_causal
    return mask


@pytest.mark.parametrize("seq_len,block", [(1, 1), (6, 1), (6, 6), (6, 2), (8, 4), (7, 3), (5, 2), (4, 9)])
def test_mask_is_spec_section_9(seq_len, block):
    assert torch.equal(block_diffusion_mask(seq_len, block), spec_mask(seq_len, block))


def test_mask_limits_are_mdm_and_next_token():
    L = 5
    full = block_diffusion_mask(L, L)
    assert full[:L, :L].all() and not full[:L, L:].any()  # one block: x_t sees all of x_t, nothing clean
    one = block_diffusion_mask(L, 1)
    assert torch.equal(one[:L, :L], torch.eye(L, dtype=torch.bool))  # B=1: a query sees only itself ...
    assert torch.equal(one[:L, L:], torch.ones(L, L).tril(-1).bool())  # ... and the strictly earlier clean tokens
    assert torch.equal(one[L:, L:], torch.ones(L, L).tril().bool())  # clean half is causal


def test_per_row_ids_give_per_row_masks():
    ids = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]])  # e.g. SFT rows with different block starts
    masks = block_diffusion_mask_from_ids(ids)
    assert masks.shape == (2, 1, 10, 10)
    assert torch.equal(masks[0, 0], spec_mask(5, 2))
    assert torch.equal(masks[1, 0], block_diffusion_mask_from_ids(ids[1]))
    # row 1: x_t position 1 (block 1) sees x_t block 1 and clean position 0 only
    assert masks[1, 0, 1, 4] and masks[1, 0, 1, 5] and not masks[1, 0, 1, 6]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        block_diffusion_mask(4, 0)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        block_ids(0, 2)
    assert num_blocks(7, 3) == 3 and block_ids(7, 3).tolist() == [0, 0, 0, 1, 1, 1, 2]


# -- ratios ------------------------------------------------------------------------------------
def test_block_ratios_marginals_and_stratification():
    g = torch.Generator().manual_seed(0)
    t = sample_block_mask_ratios(4000, 3, 0.1, False, g)
    assert t.shape == (4000, 3) and t.min() >= 0.1 and t.max() <= 1.0
    # U[0.1, 1]: mean 0.55, sd 0.26; 4000 draws -> standard error 0.004
    assert t.mean(0).sub(0.55).abs().max() < 0.02
    assert abs(torch.corrcoef(t.T)[0, 1].item()) < 0.08  # blocks independent (|r| ~ 1/sqrt(4000))
    s = sample_block_mask_ratios(8, 5, 0.1, True, g)
    for b in range(5):  # each block's ratios are a shifted even grid over [eps, 1]: spacing (1-eps)/B
        gaps = s[:, b].sort().values.diff()
        torch.testing.assert_close(gaps, torch.full((7,), 0.9 / 8), rtol=0, atol=1e-6)
    strat = sample_block_mask_ratios(4, 2000, 0.1, True, g)  # each block's offset is uniform
    assert strat.mean().sub(0.55).abs() < 0.01


# -- the vectorised forward against a block-by-block forward ----------------------------------
def blockwise_logits(model, x0, xt, block):
    """Block b predicted the way a block-by-block sampler computes it, without the 2L trick:
    one forward on x0[:, :start] (clean blocks: each attends to its own and earlier blocks, so
    their states can be cached) followed by x_t's block b (attends to everything before it
    and to its own block), ordinary positions 0..end-1."""
    L = x0.shape[1]
    out = []
    for start in range(0, L, block):
        end = min(start + block, L)
        allowed = torch.zeros(end, end, dtype=torch.bool)
        for q in range(end):
            for k in range(end):
                allowed[q, k] = q >= start or k // block <= q // block
        tokens = torch.cat([x0[:, :start], xt[:, start:end]], dim=1)
        out.append(model(tokens, attn_mask=allowed)[:, start:end])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("seq_len,block", [(8, 2), (7, 3), (6, 1), (6, 6)])
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_vectorised_forward_equals_blockwise_forward(seq_len, block, backend):
    model = _model(19, backend=backend)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 19, (3, seq_len), generator=g)
    xt = torch.where(torch.rand(3, seq_len, generator=g) < 0.5, 19, x0)
    with torch.no_grad():
        torch.testing.assert_close(
            bd3_logits(model, xt, x0, block), blockwise_logits(model, x0, xt, block), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("seq_len,block", [(8, 2), (7, 3), (6, 1)])
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_vectorised_forward_equals_block_model_with_a_kv_cache(seq_len, block, backend):
    """What sampling does (SPEC §9): the clean earlier blocks go through a block-attention
    backbone once, into a KV cache, and the noisy block is read on top of them. That gives
    the training forward's logits, block for block (the cache is exact, not an approximation)."""
    from lldiff.model import KVCache

    model = _model(19, attention="block", block_size=block, backend=backend)
    assert model.cfg.mask_id == 19  # the mask token is the extra row, as for the MDM
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 19, (3, seq_len), generator=g)
    xt = torch.where(torch.rand(3, seq_len, generator=g) < 0.5, 19, x0)
    with torch.no_grad():
        expected = bd3_logits(model, xt, x0, block)
        for start in range(0, seq_len, block):
            end = min(start + block, seq_len)
            cache = KVCache(model.cfg, batch=3, max_len=seq_len)
            if start:
                model(x0[:, :start], kv_cache=cache)
            got = model(xt[:, start:end], kv_cache=cache)
            torch.testing.assert_close(got, expected[:, start:end], rtol=0, atol=1e-5)


# -- block_size = L is the MDM -----------------------------------------------------------------
class Recorder:
    """Wraps a model and keeps the x_t it was shown (the first L tokens of a 2L input)."""

    def __init__(self, model, seq_len):
        self.model, self.seq_len, self.inputs = model, seq_len, []

    def __call__(self, tokens, **kwargs):
        self.inputs.append(tokens[:, : self.seq_len].clone())
        return self.model(tokens, **kwargs)


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("extra", [0, 3])  # block_size = L, and block_size > L (still one block)
def test_one_block_is_mdm_loss(stratified, extra):
    model = _model(23)
    x0 = torch.randint(0, 23, (6, 10), generator=torch.Generator().manual_seed(2))
    mdm, bd3 = Recorder(model, 10), Recorder(model, 10)
    with torch.no_grad():
        for seed in range(3):
            a = mdm_loss(mdm, x0, 23, eps=1e-3, stratified=stratified, generator=torch.Generator().manual_seed(seed))
            b = bd3_loss(bd3, x0, 23, 10 + extra, eps=1e-3, stratified=stratified,
                         generator=torch.Generator().manual_seed(seed))
            assert torch.equal(mdm.inputs[-1], bd3.inputs[-1])  # same t, same masks
            assert (mdm.inputs[-1] == 23).any()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # same math; float rounding only


def test_one_block_nelbo_is_mdm_elbo():
    model = _model(23)
    x0 = torch.randint(0, 23, (4, 9), generator=torch.Generator().manual_seed(3))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :3] = False  # a prompt
    with torch.no_grad():
        for mask in (None, maskable):
            a = mdm_elbo_nats(model, x0, 23, num_samples=5, eps=1e-3, maskable=mask,
                              generator=torch.Generator().manual_seed(0))
            b = bd3_nelbo_nats(model, x0, 23, 9, num_samples=5, eps=1e-3, maskable=mask,
                               generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_prompt_is_never_masked():
    x0 = torch.randint(0, 23, (64, 12))
    maskable = torch.arange(12)[None].expand(64, 12) >= 5
    t = torch.ones(64, num_blocks(12, 4))  # t = 1: everything maskable is masked
    xt, masked, t_tok = block_forward_mask(x0, t, 23, 4, maskable=maskable)
    assert (t_tok == 1).all() and torch.equal(masked, maskable)
    assert torch.equal(xt[:, :5], x0[:, :5]) and (xt[:, 5:] == 23).all()


def test_loss_backpropagates_through_both_halves():
    model = _model(23).train()
    x0 = torch.randint(0, 23, (4, 10), generator=torch.Generator().manual_seed(9))
    loss = bd3_loss(model, x0, 23, 3, stratified=True, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.embed.weight.grad[23].abs().sum() > 0  # the mask row (x_t half) is trained
    assert model.embed.weight.grad[x0[:, :7].unique()].abs().sum() > 0  # clean context (x_0 half) too


# -- block_size = 1 is next-token prediction ---------------------------------------------------
def next_token_ce(model, x0, mask_id):
    """CE of x0[:, i] from a forward on x0[:, :i] + [MASK] at position i, one forward per i.
    SPEC §9's clean half is block causal, i.e. causal for B = 1, so the prefix attends
    causally (the final mask token sees everything before it)."""
    out = []
    for i in range(x0.shape[1]):
        tokens = torch.cat([x0[:, :i], torch.full_like(x0[:, :1], mask_id)], dim=1)
        causal = torch.ones(i + 1, i + 1, dtype=torch.bool).tril()
        logits = model(tokens, attn_mask=causal)[:, i]
        out.append(F.cross_entropy(logits.float(), x0[:, i], reduction="none"))
    return torch.stack(out, dim=1)  # (B, L)


def test_block_size_one_is_next_token_ce():
    model = _model(17)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 17, (16, 8), generator=g)
    with torch.no_grad():
        ce = next_token_ce(model, x0, 17)
        # Exact part. With B = 1 a block is one token, so its input is the mask token when it is
        # masked, and it contributes nothing otherwise: for ANY draw the per-sequence value is
        # sum_i m_i CE_i / t_i. As P(m_i = 1 | t_i) = t_i, E[m_i / t_i] = 1 and the expectation
        # is exactly sum_i CE_i (the loss: their mean over B*L tokens).
        t = 0.05 + 0.95 * torch.rand(16, 8, generator=g)
        masked = torch.rand(16, 8, generator=g) < t
        xt = torch.where(masked, 17, x0)
        per_seq = bd3_weighted_ce(bd3_logits(model, xt, x0, 1), x0, masked, t)
        torch.testing.assert_close(per_seq, (ce * masked / t).sum(1), rtol=1e-5, atol=1e-5)
        # Statistical part: bd3_loss with its own sampler, averaged over n draws. Every token is
        # its own block (own t, own draw), so the loss is a mean of B*L independent terms with
        # Var(m/t) = E[1/t] - 1 = ln(1/eps)/(1-eps) - 1 for t ~ U[eps, 1]; hence
        # Var(loss) = sum_i CE_i^2 (E[1/t]-1) / (BL)^2 exactly, and 5 standard errors bound the
        # gap with probability > 1 - 6e-7 (normal approximation; n = 400 draws).
        eps, n = 0.05, 400
        draws = torch.stack([bd3_loss(model, x0, 17, 1, eps=eps, generator=g) for _ in range(n)])
        var = (ce ** 2).sum() * (math.log(1 / eps) / (1 - eps) - 1) / x0.numel() ** 2
        assert abs(draws.mean() - ce.mean()) < 5 * math.sqrt(var / n)


# -- the NELBO bounds the exact NLL of the model's block diffusion distribution ----------------
def _ratio_moment(p: int, m: int, eps: float) -> float:
    """E[t^p (1-t)^m] for t ~ U[eps, 1] (eps = 0 allowed when p >= 0), expanded binomially."""
    total = 0.0
    for j in range(m + 1):
        q = p + j
        integral = -math.log(eps) if q == -1 else (1 - eps ** (q + 1)) / (q + 1)
        total += math.comb(m, j) * (-1) ** j * integral
    return total / (1 - eps)


def exact_block_quantities(model, x, mask_id, block, eps):
    """Exact NLL, NELBO (eps = 0 by orders and by subsets, and eps) and the single-draw
    NELBO variance, per sequence.

    The continuous-time reverse process of a block reveals its masked tokens one at a time in
    a uniformly random order, drawing each from the model's conditional given the clean earlier
    blocks and the tokens revealed so far; so the model's probability of block b is the
    mixture over orders p(x_b | x_<b) = mean_sigma prod_j p(x_sigma(j) | revealed). Its
    continuous-time NELBO equals E_sigma[-sum_j log p(...)] (any-order AR form): the masked set
    before step j is a uniform k-subset S (k = n-j+1) and the revealed token uniform in S, and
    1/(C(n,k) k) = (k-1)!(n-k)!/n! = E_{t~U[0,1]}[t^k (1-t)^(n-k) / t] is the weight of S in
    E_t E_mask[sum_{i masked} CE_i / t]. Jensen: E_sigma[-log prod] >= -log E_sigma[prod], so
    NELBO_0 >= NLL, with equality for one-token blocks. With t ~ U[eps, 1] the weight of S is
    E[t^(k-1) (1-t)^(n-k)] under that law. Conditionals come from blockwise_logits (no 2L trick).
    """
    n_seq, L = x.shape
    nll = torch.zeros(n_seq, dtype=torch.float64)
    nelbo0, nelbo0_subsets, nelbo_eps, var = (torch.zeros_like(nll) for _ in range(4))
    for start in range(0, L, block):
        pos = list(range(start, min(start + block, L)))
        n = len(pos)
        logp = {}  # masked subset S -> (n_seq, L) log-probs of the true tokens
        for k in range(1, n + 1):
            for subset in itertools.combinations(pos, k):
                xt = x.clone()
                xt[:, list(subset)] = mask_id
                lp = blockwise_logits(model, x, xt, block).double().log_softmax(-1)
                logp[subset] = lp.gather(-1, x[..., None])[..., 0]
        orders = []
        for order in itertools.permutations(pos):
            total = torch.zeros(n_seq, dtype=torch.float64)
            for j, i in enumerate(order):
                total += logp[tuple(sorted(order[j:]))][:, i]
            orders.append(total)
        orders = torch.stack(orders)  # (n!, n_seq)
        nll -= orders.logsumexp(0) - math.log(math.factorial(n))
        nelbo0 -= orders.mean(0)
        first, second = torch.zeros_like(nll), torch.zeros_like(nll)
        for subset, lp in logp.items():
            k, c = len(subset), -lp[:, list(subset)].sum(1)  # c = sum of CE over the masked set
            first += _ratio_moment(k - 1, n - k, eps) * c
            second += _ratio_moment(k - 2, n - k, eps) * c ** 2
            nelbo0_subsets += _ratio_moment(k - 1, n - k, 0.0) * c
        nelbo_eps += first
        var += second - first ** 2  # blocks are independent: variances add
    return nll, nelbo0, nelbo0_subsets, nelbo_eps, var


@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_nelbo_bounds_exact_nll(block):
    V, L, eps, reps = 3, 4, 0.05, 200
    model = _model(V, max_seq_len=8, seed=6)
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # sharp, context-dependent conditionals: a visible Jensen gap
        x = torch.tensor(list(itertools.product(range(V), repeat=L)))  # all 81 sequences
        nll, nelbo0, nelbo0_subsets, nelbo_eps, var = exact_block_quantities(model, x, V, block, eps)
        # the any-order-AR identity: E_t E_mask[sum CE / t] over subsets == the order average
        torch.testing.assert_close(nelbo0_subsets, nelbo0, rtol=0, atol=1e-9)
        # a proper distribution over all V^L sequences
        assert abs(nll.neg().exp().sum().item() - 1.0) < 1e-6
        # the bound, exactly (Jensen); tight for one-token blocks (B = 1: the Monte-Carlo side
        # is test_block_size_one_is_next_token_ce)
        assert (nelbo0 >= nll - 1e-9).all()
        if block == 1:
            torch.testing.assert_close(nelbo0, nll, rtol=0, atol=1e-9)
            return
        # The Monte-Carlo NELBO is unbiased for the exact NELBO: `reps` independent single-draw
        # estimates per sequence (num_samples=1: plain U[eps, 1] ratios, so the exact single-draw
        # variance above applies); 5 standard errors of the mean over all 81 x reps draws.
        mc = bd3_nelbo_nats(model, x.repeat(reps, 1), V, block, num_samples=1, eps=eps,
                            generator=torch.Generator().manual_seed(6)).double()
        se = math.sqrt(var.sum().item() / (reps * len(x) ** 2))
        assert abs(mc.mean() - nelbo_eps.mean()) < 5 * se
        # The validation NELBO as measured lies above the exact NLL. eps > 0 shifts the NELBO by
        # O(eps) (no longer a bound by itself), so check that the exact gap NELBO_eps - NLL
        # exceeds 8 standard errors (about 15 here), then that the estimate clears the NLL.
        gap = (nelbo_eps - nll).mean().item()
        assert gap > 8 * se, (gap, se)
        assert mc.mean() > nll.mean()
        # the stratified estimator (16 samples per sequence, one offset per block) agrees too;
        # its masks are drawn as in the iid case and each ratio is marginally U[eps, 1], so the
        # iid standard error is the scale (stratifying only removes the ratio part of it)
        strat = bd3_nelbo_nats(model, x, V, block, num_samples=16, eps=eps, generator=torch.Generator().manual_seed(7))
        assert abs(strat.double().mean() - nelbo_eps.mean()) < 5 * math.sqrt(var.sum().item() / (16 * len(x) ** 2))


# -- backbone plumbing: positions and attn_mask ------------------------------------------------
def _ar_and_mdm(backend):
    ar = _model(29, attention="causal", backend=backend)
    mdm = _model(29, attention="bidirectional", backend=backend, seed=1)
    state = ar.state_dict()
    embed = mdm.embed.weight.detach().clone()
    embed[:29] = state.pop("embed.weight")  # same weights except the MDM's mask-token row
    mdm.load_state_dict({**state, "embed.weight": embed})
    return ar, mdm


def _left_pad(b, s):
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[0, :3] = False
    return pad


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("padded", [False, True])
def test_explicit_causal_mask_equals_causal_model(backend, padded):
    ar, mdm = _ar_and_mdm(backend)
    x = torch.randint(0, 29, (3, 11))
    pad = _left_pad(3, 11) if padded else None
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = ar(x, pad)
        got = mdm(x, pad, positions=torch.arange(11), attn_mask=causal)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(mdm(x, pad, attn_mask=causal[None, None].expand(3, 1, 11, 11)), expected,
                                   rtol=0, atol=1e-5)
        assert (mdm(x, pad) - expected).abs().max() > 1e-3  # without the mask the MDM looks ahead


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_all_true_mask_equals_bidirectional_call(backend):
    _, mdm = _ar_and_mdm(backend)
    x = torch.randint(0, 29, (3, 11))
    everything = torch.ones(11, 11, dtype=torch.bool)
    with torch.no_grad():
        for pad in (None, _left_pad(3, 11)):
            torch.testing.assert_close(mdm(x, pad, positions=torch.arange(11), attn_mask=everything), mdm(x, pad),
                                       rtol=0, atol=1e-5)


def test_rope_is_indexed_by_positions():
    """A bidirectional model is permutation-equivariant once the positions travel with the
    tokens (RoPE is the only source of order); without them it is not."""
    _, mdm = _ar_and_mdm("sdpa")
    x = torch.randint(0, 29, (2, 9))
    perms = torch.stack([torch.randperm(9), torch.randperm(9)])
    shuffled = x.gather(1, perms)
    with torch.no_grad():
        ref = mdm(x)
        expected = ref.gather(1, perms[..., None].expand(-1, -1, 29))
        torch.testing.assert_close(mdm(shuffled, positions=perms), expected, rtol=0, atol=1e-5)  # (B, S)
        torch.testing.assert_close(mdm(shuffled[:1], positions=perms[0]), expected[:1], rtol=0, atol=1e-5)  # (S,)
        assert (mdm(shuffled) - expected).abs().max() > 1e-3


def test_doubled_input_is_checked_by_positions():
    model = Transformer(ModelConfig(n_layer=1, d_model=32, n_heads=2, d_ff=64, vocab_size=10, max_seq_len=8))
    x = torch.zeros(2, 16, dtype=torch.long)
    mask = block_diffusion_mask(8, 2)
    assert model(x, positions=torch.arange(8).repeat(2), attn_mask=mask).shape == (2, 16, 10)
    with pytest.raises(ValueError, match=r"RoPE positions span \[0, 15\] but max_seq_len=8"):
        model(x, positions=torch.arange(16), attn_mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="sequence length 16 exceeds max_seq_len=8"):
        model(x, attn_mask=torch.ones(16, 16, dtype=torch.bool))


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("shape", ["2d", "4d"])
def test_sdpa_matches_reference_with_explicit_mask(kv_heads, shape):
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, kv_heads, 9, 8, generator=g), torch.randn(
        2, kv_heads, 9, 8, generator=g)
    mask = torch.rand(2, 1, 7, 9, generator=g) < 0.6
    mask[0, 0, 3] = False  # a row with nothing to attend: the empty-row rule of both backends
    mask = mask[0, 0] if shape == "2d" else mask
    for pad in (None, _left_pad(2, 9)):
        ref = reference_attention(q, k, v, causal=True, key_padding_mask=pad, attn_mask=mask)
        out = sdpa_attention(q, k, v, causal=True, key_padding_mask=pad, attn_mask=mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # the mask replaces `causal`: causal=True and causal=False agree once a mask is given
    torch.testing.assert_close(sdpa_attention(q, k, v, causal=False, attn_mask=mask),
                               sdpa_attention(q, k, v, causal=True, attn_mask=mask))


def test_bad_attn_masks_are_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="attn_mask must be a boolean tensor"):
        sdpa_attention(q, q, q, causal=False, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"attn_mask covers \(4, 5\).*4 queries and 4 keys"):
        reference_attention(q, q, q, causal=False, attn_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="xformers"):  # CPU: the backend's own refusal comes first
        xformers_attention(q, q, q, causal=False, attn_mask=torch.ones(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("block_size,kv_heads", [(4, None), (8, 2), (3, None)])
def test_flex_attention_mask_equals_the_boolean_mask(block_size, kv_heads):
    """The FlexAttention BlockMask (used on CUDA) gives the logits of SDPA with the boolean
    mask; checked here with eager FlexAttention on the CPU (forward only)."""
    from lldiff.objectives.bd3.loss import bd3_logits, block_diffusion_block_mask, flex_available

    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_heads=4, n_kv_heads=kv_heads, d_ff=64, vocab_size=20, max_seq_len=16,
                      attention="block", block_size=block_size)
    model = Transformer(cfg).eval()
    x0 = torch.randint(0, 20, (3, 12))
    xt = torch.where(torch.rand(3, 12) < 0.5, torch.full_like(x0, cfg.mask_id), x0)
    with torch.no_grad():
        flex = bd3_logits(model, xt, x0, block_size, flex=True)
        boolean = bd3_logits(model, xt, x0, block_size, flex=False)
    torch.testing.assert_close(flex, boolean, atol=1e-5, rtol=1e-5)
    ids = torch.stack([torch.arange(12) // block_size, (torch.arange(12) + 1) // block_size, torch.zeros(12, dtype=torch.long)])
    with torch.no_grad():  # per-row block ids (SFT: blocks counted from each row's own start)
        flex = bd3_logits(model, xt, x0, ids=ids, flex=True)
        boolean = bd3_logits(model, xt, x0, ids=ids, flex=False)
    torch.testing.assert_close(flex, boolean, atol=1e-5, rtol=1e-5)
    assert type(block_diffusion_block_mask(ids[0])).__name__ == "BlockMask"
