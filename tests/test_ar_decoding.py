"""AR decoding: the KV cache changes nothing, padding changes nothing, samplers follow the math."""


import pytest
import torch
from scipy import stats

from lldiff.objectives.ar.decoding import ar_generate, filter_logits, next_token
from lldiff.config import ModelConfig
from lldiff.model import KVCache, Transformer


def tiny_causal(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=23, max_seq_len=64,
                      attention="causal", **overrides)
    return Transformer(cfg).eval()


def test_cached_logits_equal_full_forward():
    model = tiny_causal()
    x = torch.randint(0, 23, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, 12)
        pieces = [model(x[:, :5], kv_cache=cache)] + [model(x[:, i:i + 1], kv_cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None), (0.8, 5, None),
                                                     (1.2, None, 0.9)])
def test_identical_tokens_with_and_without_cache(temperature, top_k, top_p):
    model = tiny_causal()
    prompt = torch.randint(0, 23, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    mask[2, :4] = False
    outs = [ar_generate(model, prompt, max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p,
                        attention_mask=mask, use_cache=cache, generator=torch.Generator().manual_seed(7))
            for cache in (True, False)]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert outs[0].model_calls == outs[1].model_calls == 20


def test_left_padded_prompt_decodes_like_the_unpadded_one():
    model = tiny_causal(seed=1)
    short = torch.randint(0, 23, (1, 4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 4])
    alone = ar_generate(model, short, max_new_tokens=10).tokens[:, 4:]
    batched = ar_generate(model, padded, max_new_tokens=10, attention_mask=mask).tokens[:, 7:]
    assert torch.equal(alone, batched)


def test_greedy_is_argmax_chain():
    model = tiny_causal(seed=2)
    prompt = torch.randint(0, 23, (1, 3))
    out = ar_generate(model, prompt, max_new_tokens=5).tokens
    with torch.no_grad():
        for i in range(3, 8):
            assert out[0, i] == model(out[:, :i])[0, -1].argmax()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 10)
    g = torch.Generator().manual_seed(0)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        assert torch.equal(next_token(logits, temperature=1.0, generator=g, **{"top_k": None, "top_p": None, **kwargs}),
                           logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75 <= 0.8
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_the_tempered_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = next_token(logits.expand(n, 4), temperature=temperature, top_k=None, top_p=None, generator=g)
    counts = torch.bincount(draws, minlength=4).numpy()
    expected = torch.softmax(logits.double() / temperature, -1).numpy() * n
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_top_k_sampling_stays_in_the_top_k():
    logits = torch.randn(1000, 30)
    draws = next_token(logits, temperature=1.5, top_k=3, top_p=None, generator=torch.Generator().manual_seed(1))
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == draws[:, None]).any(-1).all()


def test_eos_rows_stay_finished_and_decoding_stops():
    model = tiny_causal(seed=3)
    prompt = torch.randint(0, 23, (2, 3))
    free = ar_generate(model, prompt, max_new_tokens=12).tokens
    eos = int(free[0, 5])  # a token row 0 emits greedily: make it the EOS
    out = ar_generate(model, prompt, max_new_tokens=12, eos_id=eos)
    for row in out.tokens[:, 3:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == eos).all()
    assert out.model_calls <= 12


def test_bad_input():
    model = tiny_causal()
    prompt = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the context max_seq_len=64"):
        ar_generate(model, prompt, max_new_tokens=10)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        ar_generate(model, prompt[:, :2], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        ar_generate(model, prompt[:, :2], max_new_tokens=2, temperature=1.0, top_p=1.5)
    bidirectional = Transformer(ModelConfig(n_layer=1, d_model=16, n_heads=2, d_ff=32, vocab_size=5))
    with pytest.raises(ValueError, match="needs a causal"):
        ar_generate(bidirectional, prompt[:, :2], max_new_tokens=2)
    cache = KVCache(bidirectional.cfg, 1, 4)
    bidirectional(prompt[:, :2], kv_cache=cache)  # an empty cache may take a whole canvas
    with pytest.raises(ValueError, match="appending to a KV cache needs causal or block attention"):
        bidirectional(prompt[:, :2], kv_cache=cache)
