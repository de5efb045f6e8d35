"""Backbone: parameter accounting, causality invariants, backend agreement, init."""

import math

import pytest
import torch

from lldiff.attention import reference_attention, sdpa_attention, xformers_attention
from lldiff.config import SIZES, ModelConfig
from lldiff.model import Transformer

SMDM_FIGURES = {"smdm-6M": 6_294_784, "smdm-113M": 113_265_408, "smdm-1028M": 1_027_677_952}


@pytest.mark.parametrize("name,expected", SMDM_FIGURES.items())
def test_smdm_non_embedding_params_exact(name, expected):
    assert SIZES[name].non_embedding_params() == expected


@pytest.mark.parametrize("name", [n for n in SIZES if n.startswith("smdm-")])
def test_smdm_ladder_formula_and_name(name):
    cfg = SIZES[name]
    d, n = cfg.d_model, cfg.n_layer
    assert cfg.non_embedding_params() == n * (4 * d * d + 3 * d * cfg.d_ff + 2 * d) + d
    assert cfg.head_dim in (64, 128)
    assert round(cfg.non_embedding_params() / 1e6) == int(name.split("-")[1].rstrip("M"))


def test_llada_shapes():
    assert round(SIZES["llada-8B"].non_embedding_params() / 1e9, 2) == 6.98
    assert round(SIZES["llada-1B"].non_embedding_params() / 1e9, 2) == 0.97


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_module_parameters_match_accounting(n_kv_heads):
    cfg = ModelConfig(n_layer=2, d_model=64, n_heads=4, n_kv_heads=n_kv_heads, d_ff=96, vocab_size=50)
    model = Transformer(cfg)
    non_emb = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("embed", "head")))
    assert non_emb == cfg.non_embedding_params()
    assert sum(p.numel() for p in model.parameters()) == cfg.total_params()


def test_ar_and_mdm_differ_by_one_embedding_row():
    mdm = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=300, causal=False))
    ar = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=300, causal=True))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(mdm) - count(ar) == mdm.cfg.d_model
    assert mdm.embed.num_embeddings == 301 and ar.embed.num_embeddings == 300
    assert mdm.cfg.mask_id == 300 and ar.cfg.mask_id is None


def test_head_never_emits_mask():
    cfg = SIZES["tiny-0.1M"].replace(vocab_size=40)
    model = Transformer(cfg)
    with torch.no_grad():
        model.embed.weight[cfg.mask_id].fill_(3.0)  # even a loud mask embedding
        logits = model(torch.full((2, 9), cfg.mask_id))
    assert logits.shape == (2, 9, 40)  # no logit exists for id 40 = [MASK]
    assert int(logits.argmax(-1).max()) < cfg.mask_id


def _perturb_future(causal):
    torch.manual_seed(0)
    model = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=50, causal=causal)).eval()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 7) % 50
    with torch.no_grad():
        return model(x), model(y)


def test_causal_model_ignores_the_future():
    a, b = _perturb_future(causal=True)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_bidirectional_model_sees_the_future():
    a, b = _perturb_future(causal=False)
    assert (a[:, :10] - b[:, :10]).abs().amax(dim=-1).min() > 1e-4  # every earlier position changes


def _qkv(b=2, h=4, kvh=4, t=11, s=11, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, kvh, s, d, generator=g),
            torch.randn(b, kvh, s, d, generator=g))


def _left_padding(b=2, s=11):
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, :3] = False  # row 0 left-padded by 3
    mask[1, :1] = False
    return mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("q_len", [11, 4])
def test_sdpa_matches_reference(causal, padded, kv_heads, q_len):
    q, k, v = _qkv(kvh=kv_heads, t=q_len)
    pad = _left_padding() if padded else None
    ref = reference_attention(q, k, v, causal=causal, key_padding_mask=pad)
    out = sdpa_attention(q, k, v, causal=causal, key_padding_mask=pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_reference_attention_is_softmax_math():
    q, k, v = _qkv(b=1, h=1, kvh=1, t=3, s=3, d=2)
    scores = (q[0, 0] @ k[0, 0].T) / math.sqrt(2)
    scores = scores + torch.triu(torch.full((3, 3), float("-inf")), 1)
    expected = torch.softmax(scores, -1) @ v[0, 0]
    torch.testing.assert_close(reference_attention(q, k, v, causal=True)[0, 0], expected)


def test_padding_keys_are_ignored():
    q, k, v = _qkv(b=1, t=6, s=6)
    pad = torch.tensor([[False, False, True, True, True, True]])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :2] += 5.0
    v2[:, :, :2] -= 5.0
    for causal in (True, False):
        a = sdpa_attention(q, k, v, causal=causal, key_padding_mask=pad)[:, :, 2:]
        b = sdpa_attention(q, k2, v2, causal=causal, key_padding_mask=pad)[:, :, 2:]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_whole_model_backends_agree(causal):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=37, causal=causal)
    sdpa, ref = Transformer(cfg).eval(), Transformer(cfg.replace(attn_backend="reference")).eval()
    ref.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 37, (3, 13))
    pad = torch.ones(3, 13, dtype=torch.bool)
    pad[1, :4] = False
    with torch.no_grad():
        for mask in (None, pad):
            torch.testing.assert_close(sdpa(x, mask), ref(x, mask), rtol=0, atol=1e-5)


def test_xformers_backend_fails_clearly_on_cpu():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="xformers"):
        xformers_attention(q, k, v, causal=True)


def test_smdm_initialisation_std():
    cfg = ModelConfig(n_layer=4, d_model=256, n_heads=4, d_ff=1024, vocab_size=1000)
    model = Transformer(cfg)
    std = math.sqrt(2 / (5 * 256))
    out_std = 1 / math.sqrt(256) / 4
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.head.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.blocks[1].attn.proj.weight.std().item() == pytest.approx(out_std, rel=0.02)
    assert model.blocks[2].mlp.proj.weight.std().item() == pytest.approx(out_std, rel=0.02)


def test_rope_positions_argument_matches_default():
    model = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=30, causal=True)).eval()
    x = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, positions=torch.arange(8).expand(2, 8)))


# -- bad input ---------------------------------------------------------------------------
def test_unknown_size_is_named():
    with pytest.raises(ValueError, match="unknown model size .smdm-7M..*known sizes: tiny-0.002M, tiny-0.004M, tiny-0.009M"):
        ModelConfig.from_name("smdm-7M")


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="d_model=100 is not divisible by n_heads=3"):
        ModelConfig(d_model=100, n_heads=3)


def test_bad_kv_heads_and_backend():
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        ModelConfig(d_model=128, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="attn_backend='flash'.*sdpa, xformers, reference"):
        ModelConfig(attn_backend="flash")


def test_sequence_longer_than_context_is_refused():
    model = Transformer(ModelConfig(n_layer=1, d_model=32, n_heads=2, d_ff=64, vocab_size=10, max_seq_len=8))
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
