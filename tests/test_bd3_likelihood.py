"""BD3 scoring (SPEC §9) against the math:

* the Monte-Carlo bound's mean against its expectation, enumerated over every mask set of every
  block (each block given the clean earlier blocks), for blocks cut by the prompt, full blocks,
  a last partial block and one block over everything (the MDM);
* the same expectation from the t-form NELBO of ``block_diffusion`` (its weights enumerated);
* block_size = 1: the exact chain rule of the network with the mask token as the query, every draw;
* the multiple-choice scorer: common random numbers across choices, the evaluation loop on a BD3
  backbone, guidance refused by the registry; lm-eval's greedy check.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lldiff import objectives as registry
from lldiff.objectives.bd3.decoding import block_generate
from lldiff.objectives.bd3.loss import bd3_logits
from lldiff.config import ModelConfig
from lldiff.evaluation import evaluate_multiple_choice
from lldiff.objectives.bd3.likelihood import bd3_scorer
from lldiff.evaluation.multiple_choice import make_scorer
from lldiff.evaluation.tasks import Example
from lldiff.objectives.bd3.likelihood import bd3_conditional_loglik, bd3_is_greedy
from lldiff.model import Transformer

V = 7


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def block_model(block_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=1, d_model=16, n_heads=2, d_ff=32, vocab_size=V, max_seq_len=32, attention="block",
                      block_size=block_size)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper predictions: a larger spread between mask sets
        model.head.weight.mul_(4.0)
    return model


def expected_loglik(model, prompt, answer, block_size):
    """E[estimate] = -sum_b sum_{S nonempty subset of block b's answer positions}
    P(S) (m_b / |S|) sum_{i in S} CE_i(block b masked on S, earlier blocks clean), with
    P(S) = (1 / m_b) / C(m_b, |S|) (l ~ U{1..m_b}, then a uniform subset of size l)."""
    x0 = torch.cat([prompt, answer])[None]
    n = x0.shape[1]
    total = 0.0
    for b in range(-(-n // block_size)):
        positions = [i for i in range(b * block_size, min(n, (b + 1) * block_size)) if i >= prompt.numel()]
        m = len(positions)
        for size in range(1, m + 1):
            for subset in itertools.combinations(positions, size):
                xt = x0.clone()
                xt[0, list(subset)] = model.cfg.mask_id
                with torch.no_grad():
                    logits = bd3_logits(model, xt, x0, block_size)[0].double()
                ce = F.cross_entropy(logits[list(subset)], x0[0, list(subset)], reduction="sum")
                total += (1 / m) / math.comb(m, size) * (m / size) * float(ce)
    return -total


def t_form_expected_loglik(model, prompt, answer, block_size):
    """The same expectation from the t-form of ``block_diffusion.bd3_nelbo_nats`` at eps = 0
    (t ~ U[0, 1], each answer position of the block masked w.p. t, weight 1/t): a set S of size
    k out of m has weight integral t^k (1 - t)^(m - k) / t dt = (k - 1)! (m - k)! / m!."""
    x0 = torch.cat([prompt, answer])[None]
    n = x0.shape[1]
    total = 0.0
    for b in range(-(-n // block_size)):
        positions = [i for i in range(b * block_size, min(n, (b + 1) * block_size)) if i >= prompt.numel()]
        m = len(positions)
        for size in range(1, m + 1):
            weight = math.factorial(size - 1) * math.factorial(m - size) / math.factorial(m)
            for subset in itertools.combinations(positions, size):
                xt = x0.clone()
                xt[0, list(subset)] = model.cfg.mask_id
                with torch.no_grad():
                    logits = bd3_logits(model, xt, x0, block_size)[0].double()
                total += weight * float(F.cross_entropy(logits[list(subset)], x0[0, list(subset)], reduction="sum"))
    return -total


CASES = [(3, 2, 5), (3, 3, 4), (4, 0, 5), (8, 2, 4), (2, 1, 3)]  # (block_size, prompt length, answer length)


@pytest.mark.parametrize("block_size,p,n", CASES)
def test_monte_carlo_mean_is_the_enumerated_expectation(block_size, p, n):
    model = block_model(block_size, seed=block_size + p)
    gen = torch.Generator().manual_seed(p + n)
    prompt, answer = torch.randint(0, V, (p,), generator=gen), torch.randint(0, V, (n,), generator=gen)
    want = expected_loglik(model, prompt, answer, block_size)
    assert want == pytest.approx(t_form_expected_loglik(model, prompt, answer, block_size), rel=1e-9)
    runs = torch.stack([
        bd3_conditional_loglik(model, [prompt], [answer], mask_id=model.cfg.mask_id, block_size=block_size, n_mc=32,
                               batch_size=16, generator=torch.Generator().manual_seed(seed))[0]
        for seed in range(40)
    ]).double()
    standard_error = runs.std() / math.sqrt(len(runs))
    assert abs(runs.mean() - want) < 4 * standard_error + 1e-4, (float(runs.mean()), want, float(standard_error))
    assert (runs <= 0).all()


def test_block_size_one_is_the_exact_chain_rule_at_every_draw():
    model = block_model(1, seed=3)
    prompt, answer = torch.tensor([1, 2, 3]), torch.tensor([4, 0, 6, 5])
    want = 0.0
    with torch.no_grad():
        for i in range(answer.numel()):  # the clean prefix, then the mask token as the query
            ids = torch.cat([prompt, answer[:i], torch.tensor([model.cfg.mask_id])])[None]
            want += float(model(ids)[0, -1].log_softmax(-1)[answer[i]])
    for seed in range(3):
        got = bd3_conditional_loglik(model, [prompt], [answer], mask_id=model.cfg.mask_id, block_size=1, n_mc=5,
                                     generator=torch.Generator().manual_seed(seed))
        assert float(got[0]) == pytest.approx(want, rel=1e-5)


def test_tensor_batches_score_each_row_like_a_list():
    model = block_model(3, seed=1)
    prompt, answer = torch.randint(0, V, (2, 4)), torch.randint(0, V, (2, 5))
    kw = dict(mask_id=model.cfg.mask_id, block_size=3, n_mc=4)
    batch = bd3_conditional_loglik(model, prompt, answer, generator=torch.Generator().manual_seed(0), **kw)
    listed = bd3_conditional_loglik(model, list(prompt), list(answer), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(batch, listed)
    with pytest.raises(ValueError, match="contains the mask id"):
        bd3_conditional_loglik(model, [prompt[0]], [torch.tensor([model.cfg.mask_id])], **kw)
    with pytest.raises(ValueError, match="n_mc must be a positive integer"):
        bd3_conditional_loglik(model, [prompt[0]], [answer[0]], **{**kw, "n_mc": 0})


def test_scorer_uses_common_random_numbers_across_choices():
    model = block_model(4, seed=2)
    seen = []

    def spy(ids, **kwargs):
        seen.append(ids.clone())
        return model(ids, **kwargs)

    scorer = bd3_scorer(spy, mask_id=model.cfg.mask_id, block_size=4, n_mc=3, seed=7)
    context = torch.tensor([1, 2])
    first, second = scorer(context, torch.tensor([3, 4, 5, 6])), scorer(context, torch.tensor([6, 5, 4, 3]))
    assert torch.equal(seen[0] == model.cfg.mask_id, seen[1] == model.cfg.mask_id)  # the same masks
    assert first == scorer(context, torch.tensor([3, 4, 5, 6])) and first != second


class CharTokenizer:
    eos_id = 0

    def encode(self, text):
        return [1 + (ord(c) % (V - 1)) for c in text]


def test_multiple_choice_on_a_bd3_backbone():
    model = block_model(4, seed=5)
    examples = [Example("abc", ["de", "fgh"], 0), Example("xy", ["z", "zz", "a"], 2)]
    res = evaluate_multiple_choice(model, CharTokenizer(), examples, n_mc=4, batch_size=2, seed=1)
    assert res["objective"] == "bd3-4" and res["n_mc"] == 4
    assert all(math.isfinite(x) and x < 0 for p in res["predictions"] for x in p["loglik"])
    again = evaluate_multiple_choice(model, CharTokenizer(), examples, objective="bd3-4", n_mc=4, batch_size=2, seed=1)
    assert again["predictions"] == res["predictions"]
    with pytest.raises(ValueError, match="applies to MDM checkpoints only; this is a BD3-4 model"):
        evaluate_multiple_choice(model, CharTokenizer(), examples, cfg_scale=1.0)
    with pytest.raises(ValueError, match="objective='mdm' given but the model is a BD3-4 model"):
        evaluate_multiple_choice(model, CharTokenizer(), examples, objective="mdm")
    scorer = make_scorer(registry.get("bd3-4"), model, mask_id=model.cfg.mask_id, n_mc=4, seed=3)
    context, choice = torch.tensor([0, 1, 2]), torch.tensor([3, 4])
    want = bd3_conditional_loglik(model, [context], [choice], mask_id=model.cfg.mask_id, block_size=4, n_mc=4,
                                  generator=torch.Generator().manual_seed(3))
    assert scorer(context, choice) == pytest.approx(float(want[0]))


def test_greedy_check_agrees_with_greedy_block_decoding():
    model = block_model(1, seed=4)  # block size 1: greedy decoding predicts each token from its clean prefix
    prompt = torch.tensor([1, 2, 3])
    out = block_generate(model, prompt[None], gen_length=5, block_size=1, mask_id=model.cfg.mask_id)
    answer = out.answer_ids[0]
    assert bd3_is_greedy(model, prompt, answer, mask_id=model.cfg.mask_id, block_size=1)
    changed = answer.clone()
    changed[2] = (changed[2] + 1) % V
    assert not bd3_is_greedy(model, prompt, changed, mask_id=model.cfg.mask_id, block_size=1)
