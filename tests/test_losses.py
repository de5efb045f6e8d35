"""The chunked LM-head cross-entropy (lldiff.losses) against the plain full-logits loss: values
and gradients (hidden states, head weight, every backbone weight) to 1e-5 in fp32, for the AR,
the MDM (masked rows only, weighted 1/t), BD3, the SFT losses, uneven chunks and a chunk larger
than the rows; no logits tensor larger than one chunk is ever allocated."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lldiff.objectives.bd3 import loss as block_diffusion
from lldiff.config import ModelConfig
from lldiff.losses import linear_cross_entropy, selected_ce, token_ce
from lldiff.model import Transformer
from lldiff.objectives.ar.loss import ar_loss, ar_nll, ar_sft_loss
from lldiff.objectives.common.masking import forward_mask, sample_mask_ratio
from lldiff.objectives.mdm.loss import masked_ce_over_t, mdm_elbo_nats, mdm_loss, mdm_sft_loss

V, D = 37, 16


def plain_ce(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")


def leaf(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), requires_grad=True)


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 23, 24, 1000])
def test_linear_cross_entropy_matches_full_logits_values_and_gradients(chunk):
    """23 rows in chunks of 1, 3 (uneven: 7 x 3 + 2), 7, 23, 24 and 1000 (larger than the rows)."""
    hidden, weight = leaf(23, D, seed=0), leaf(V, D, seed=1)
    targets = torch.randint(0, V, (23,), generator=torch.Generator().manual_seed(2))
    upstream = torch.rand(23, generator=torch.Generator().manual_seed(3))  # per-row weights, like 1/t
    ours = linear_cross_entropy(hidden, weight, targets, chunk)
    grads = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    ref = plain_ce(hidden, weight, targets)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_selected_ce_is_zero_off_the_selection_and_an_empty_selection_gives_zero_gradients():
    hidden, weight = leaf(3, 5, D, seed=0), leaf(V, D, seed=1)
    targets = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(2))
    select = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) < 0.5
    ce = selected_ce(hidden, weight, targets, select, chunk_tokens=2)
    ref = plain_ce(hidden.reshape(-1, D), weight, targets.flatten()).view(3, 5) * select
    torch.testing.assert_close(ce, ref, atol=1e-5, rtol=1e-5)
    assert bool((ce[~select] == 0).all())
    nothing = selected_ce(hidden, weight, targets, torch.zeros_like(select), chunk_tokens=2)
    assert nothing.shape == (3, 5) and not nothing.any()
    grads = torch.autograd.grad(nothing.sum(), (hidden, weight), allow_unused=True, materialize_grads=True)
    assert all(not g.any() for g in grads)


# -- every objective's loss: chunked readout vs the full logits of the same backbone ---------------
def backbone(attention, block_size=None, seed=0):
    fields = {"attention": attention, "block_size": block_size, "mask_id": V if attention != "causal" else None}
    cfg = ModelConfig.from_name("tiny-0.1M", vocab_size=V, n_layer=1, d_model=32, n_heads=2, d_ff=64, **fields)
    torch.manual_seed(seed)
    return Transformer(cfg)


def logits_only(model):
    """The same backbone as a plain callable (no readout): the full-logits path."""
    return lambda ids, *args, **kwargs: model(ids, *args, **kwargs)


def value_and_grads(loss_fn, model):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(loss_of, model, chunk):
    """``loss_of(m)`` with ``m`` the chunked model and with its full-logits twin: equal values
    and gradients of every weight (the head's included), to 1e-5."""
    model.loss_chunk_tokens = chunk
    ours = value_and_grads(lambda: loss_of(model), model)
    ref = value_and_grads(lambda: loss_of(logits_only(model)), model)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    assert ours[1].keys() == ref[1].keys() and "head.weight" in ours[1]
    for name in ref[1]:
        torch.testing.assert_close(ours[1][name], ref[1][name], atol=1e-5, rtol=1e-5, msg=name)
    return ours[0]


def rows(b=3, t=12, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [None, 5, 13, 1000])
def test_ar_loss(chunk):
    x = rows(t=13)
    assert_same(lambda m: ar_loss(m, x), backbone("causal"), chunk)


@pytest.mark.parametrize("chunk", [None, 4, 7, 1000])
def test_mdm_loss_masked_rows_weighted_one_over_t(chunk):
    x0 = rows()
    loss = assert_same(lambda m: mdm_loss(m, x0, V, generator=torch.Generator().manual_seed(5)),
                       backbone("bidirectional"), chunk)
    assert loss > 0


def test_mdm_loss_matches_the_formula_with_its_own_draws():
    """The chunked MDM loss is sum over masked positions of CE/t over B*L, with t and the
    mask drawn as forward_mask draws them."""
    model, x0 = backbone("bidirectional"), rows()
    model.loss_chunk_tokens = 3
    loss = mdm_loss(model, x0, V, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = sample_mask_ratio(3, generator=g)
    xt, masked = forward_mask(x0, t, V, generator=g)
    with torch.no_grad():
        ce = F.cross_entropy(model(xt).flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)
    torch.testing.assert_close(loss.detach(), ((ce * masked).sum(1) / t).sum() / x0.numel(), atol=1e-6, rtol=1e-5)


def test_an_all_unmasked_mdm_batch_behaves_as_the_plain_one():
    """No position masked: loss 0 and all-zero gradients on both paths (no error on the empty
    selection)."""
    model, x0 = backbone("bidirectional"), rows()
    nothing, t = torch.zeros_like(x0, dtype=torch.bool), torch.full((3,), 0.5)
    loss = assert_same(lambda m: masked_ce_over_t(m, x0, x0, nothing, t).sum(), model, 4)
    assert loss == 0
    model.zero_grad()
    masked_ce_over_t(model, x0, x0, nothing, t).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("chunk", [None, 5, 1000])
@pytest.mark.parametrize("block_size", [3, 12])
def test_bd3_loss(chunk, block_size):
    x0 = rows()
    assert_same(lambda m: block_diffusion.bd3_loss(m, x0, V, block_size, generator=torch.Generator().manual_seed(6)),
                backbone("block", block_size), chunk)


def sft_batch():
    tokens = rows(b=2, t=9, seed=3)
    response = torch.zeros(2, 9, dtype=torch.bool)
    response[0, 4:], response[1, 2:] = True, True
    return tokens, response


@pytest.mark.parametrize("normalisation", ["response_length", "token"])
def test_sft_losses(normalisation):
    tokens, response = sft_batch()
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert_same(lambda m: mdm_sft_loss(m, tokens, response, V, normalisation=normalisation,
                                                  prompt_dropout=0.5, generator=g()), backbone("bidirectional"), 4)
    assert_same(lambda m: ar_sft_loss(m, tokens, response), backbone("causal"), 4)
    assert_same(lambda m: block_diffusion.bd3_sft_loss(m, tokens, response, V, 3, normalisation=normalisation,
                                                       prompt_dropout=0.5, generator=g()), backbone("block", 3), 4)


def test_validation_scores_use_the_same_path():
    """The AR's NLL and the MDM's / BD3's Monte-Carlo bounds are unchanged by chunking."""
    x = rows()
    with torch.no_grad():
        for chunk in (None, 4):
            ar, mdm, bd3 = backbone("causal"), backbone("bidirectional"), backbone("block", 4)
            for m in (ar, mdm, bd3):
                m.loss_chunk_tokens = chunk
            torch.testing.assert_close(ar_nll(ar, x), ar_nll(logits_only(ar), x))
            draws = lambda m: mdm_elbo_nats(m, x, V, num_samples=3, generator=torch.Generator().manual_seed(1))  # noqa: E731
            torch.testing.assert_close(draws(mdm), draws(logits_only(mdm)))
            nelbo = lambda m: block_diffusion.bd3_nelbo_nats(m, x, V, 4, num_samples=2,  # noqa: E731
                                                             generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(nelbo(bd3), nelbo(logits_only(bd3)))


def test_token_ce_of_a_logits_callable_is_the_plain_loss():
    logits = torch.randn(2, 4, V)
    targets = rows(b=2, t=4)
    select = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    ce = token_ce(lambda ids: logits, targets, targets, select)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 4) * select
    torch.testing.assert_close(ce, ref)


# -- memory: no tensor of more than one chunk of logits ------------------------------------------
class LargestLogits(TorchDispatchMode):
    """The most elements of any tensor with a vocabulary-sized dimension that an op produced
    (forward and backward): logits, their fp32 copies and softmax, their gradients, the head's
    weight and its gradient."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [None, 64])
def test_no_logits_tensor_larger_than_a_chunk(chunk):
    """AR on 4 x 128 tokens, V=1000: with chunks of 64 rows no op output (forward or backward)
    holds more than 64 x V elements; without chunking the (512, V) logits exist."""
    vocab = 1000
    cfg = ModelConfig.from_name("tiny-0.1M", vocab_size=vocab, n_layer=1, d_model=32, attention="causal", mask_id=None)
    model = Transformer(cfg)
    model.loss_chunk_tokens = chunk
    x = torch.randint(0, vocab, (4, 129))
    with LargestLogits(vocab) as mode:
        ar_loss(model, x).backward()
    if chunk is None:
        assert mode.largest == 4 * 128 * vocab
    else:
        assert mode.largest == chunk * vocab > vocab * cfg.d_model  # (the head's weight: 1000 x 32)
