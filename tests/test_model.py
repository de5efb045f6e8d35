"""Backbone: parameter accounting, causality invariants, backend agreement, init."""

import math

import pytest
import torch

from lldiff.attention import reference_attention, sdpa_attention, xformers_attention
from lldiff.config import SIZES, ModelConfig
from lldiff.model import KVCache, Transformer

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
    mdm = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=300, attention="bidirectional"))
    ar = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=300, attention="causal"))
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


def _perturb_future(attention, **fields):
    torch.manual_seed(0)
    model = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=50, attention=attention, **fields)).eval()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 7) % 50
    with torch.no_grad():
        return model(x), model(y)


def test_causal_model_ignores_the_future():
    a, b = _perturb_future("causal")
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_bidirectional_model_sees_the_future():
    a, b = _perturb_future("bidirectional")
    assert (a[:, :10] - b[:, :10]).abs().amax(dim=-1).min() > 1e-4  # every earlier position changes


def test_block_model_sees_its_own_block_but_not_later_ones():
    """Tokens 10.. change; with blocks of 4 (0-3, 4-7, 8-11, ...) positions 0-7 cannot see
    them, positions 8 and 9 share a block with 10 and 11 and must."""
    a, b = _perturb_future("block", block_size=4)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert (a[:, 8:10] - b[:, 8:10]).abs().amax(dim=-1).min() > 1e-4


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


@pytest.mark.parametrize("attention,block_size", [("causal", None), ("bidirectional", None), ("block", 4)])
def test_whole_model_backends_agree(attention, block_size):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=37, attention=attention,
                      block_size=block_size)
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
    model = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=30, attention="causal")).eval()
    x = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, positions=torch.arange(8).expand(2, 8)))


# -- block attention (BD3's backbone, SPEC §9) --------------------------------------------
def _by_enumeration(t: int, s: int, block: int, past: int = 0) -> torch.Tensor:
    """Query i (at position past + i) may attend key j iff j's block is i's or an earlier one."""
    return torch.tensor([[j // block <= (past + i) // block for j in range(s)] for i in range(t)])


def _same_weights(model: Transformer, **fields) -> Transformer:
    other = Transformer(model.cfg.replace(**fields)).eval()
    other.load_state_dict(model.state_dict())
    return other


def _block_model(block_size: int, vocab: int = 41, seed: int = 0, **fields) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(n_layer=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=vocab,
                                   attention="block", block_size=block_size, **fields)).eval()


@pytest.mark.parametrize("t,block", [(11, 4), (12, 3), (5, 1), (7, 7)])
def test_block_causal_mask_is_the_enumerated_rule(t, block):
    from lldiff.model import block_causal_mask

    torch.testing.assert_close(block_causal_mask(torch.arange(t), torch.arange(t), block), _by_enumeration(t, t, block))
    positions = torch.stack([torch.arange(t), torch.arange(t)])  # batched: (B, T) -> (B, 1, T, S)
    assert block_causal_mask(positions, positions, block).shape == (2, 1, t, t)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("padded", [False, True])
def test_block_model_equals_the_explicit_block_causal_mask(backend, padded):
    """A plain forward of attention="block" is the same weights under an explicit mask built by
    enumeration, whatever attention kind the model carrying that mask has."""
    model = _block_model(4, attn_backend=backend)
    x = torch.randint(0, 41, (3, 11))
    pad = None
    if padded:
        pad = torch.ones(3, 11, dtype=torch.bool)
        pad[1, 8:] = False  # right padding: the real tokens keep positions 0..7
    mask = _by_enumeration(11, 11, 4)
    bidirectional = _same_weights(model, attention="bidirectional", block_size=None)
    with torch.no_grad():
        plain = model(x, pad)
        torch.testing.assert_close(plain, model(x, pad, attn_mask=mask), rtol=0, atol=1e-6)
        torch.testing.assert_close(plain, bidirectional(x, pad, attn_mask=mask), rtol=0, atol=1e-6)
        assert (plain - bidirectional(x, pad)).abs().max() > 1e-3  # the mask does matter


@pytest.mark.parametrize("block_size", [11, 12, 64])
def test_one_block_covering_the_sequence_is_the_bidirectional_model(block_size):
    model = _block_model(block_size, max_seq_len=64)
    bidirectional = _same_weights(model, attention="bidirectional", block_size=None)
    x = torch.randint(0, 41, (2, 11))
    x[:, 5::3] = model.cfg.mask_id
    with torch.no_grad():
        torch.testing.assert_close(model(x), bidirectional(x), rtol=0, atol=1e-6)


def test_blocks_of_one_token_are_the_causal_model():
    """B = 1: every token sees itself and the past, the causal mask. The causal model has no
    mask row; it gets the block model's weights without it."""
    model = _block_model(1)
    causal = Transformer(model.cfg.replace(attention="causal", block_size=None)).eval()
    state = model.state_dict()
    state["embed.weight"] = state["embed.weight"][: model.cfg.vocab_size]
    causal.load_state_dict(state)
    x = torch.randint(0, 41, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), causal(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("chunks", [[4, 4, 4, 3], [8, 4, 3], [4, 11]])
def test_block_kv_cache_fed_block_by_block_equals_the_uncached_forward(backend, chunks):
    """Earlier blocks never see later ones, so their keys/values can be cached: feeding whole
    blocks (one or several per call; the last one may be partial) gives the uncached logits."""
    from lldiff.model import KVCache

    model = _block_model(4, attn_backend=backend)
    x = torch.randint(0, 41, (2, sum(chunks)))
    x[:, 2::5] = model.cfg.mask_id
    cache = KVCache(model.cfg, batch=2, max_len=x.shape[1])
    with torch.no_grad():
        full = model(x)
        pieces, start = [], 0
        for size in chunks:
            pieces.append(model(x[:, start:start + size], kv_cache=cache))
            start += size
    assert cache.length == x.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_block_kv_cache_split_inside_a_block_is_not_exact():
    """The converse: tokens 0-1 cached before 2-3 (their block mates) were computed without
    them, so a cache is exact at block boundaries only (decoders must feed whole blocks)."""
    from lldiff.model import KVCache

    model = _block_model(4)
    x = torch.randint(0, 41, (1, 8))
    cache = KVCache(model.cfg, batch=1, max_len=8)
    with torch.no_grad():
        full, first = model(x), model(x[:, :2], kv_cache=cache)
    assert (first - full[:, :2]).abs().max() > 1e-3


def test_bidirectional_model_refuses_a_kv_cache():
    from lldiff.model import KVCache

    model = Transformer(SIZES["tiny-0.1M"].replace(vocab_size=30)).eval()
    cache = KVCache(model.cfg, batch=1, max_len=8)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)  # an empty cache may take a whole canvas
    with pytest.raises(ValueError, match="appending to a KV cache needs causal or block attention"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)


# -- the attention kind and the mask token in ModelConfig ----------------------------------------------
def test_mask_id_follows_the_attention_kind():
    base = SIZES["tiny-0.1M"]
    assert base.replace(vocab_size=300, attention="causal").mask_id is None
    assert base.replace(vocab_size=300, attention="bidirectional").mask_id == 300
    assert base.replace(vocab_size=300, attention="block", block_size=8).mask_id == 300
    # the default follows the vocabulary when it changes; an imported id inside it stays
    assert base.replace(vocab_size=300).replace(vocab_size=500).mask_id == 500
    imported = base.replace(vocab_size=300, mask_id=7)
    assert imported.mask_id == 7 and imported.embedding_rows == 300 and imported.replace(n_layer=3).mask_id == 7


def test_old_config_dicts_with_causal_are_converted():
    fields = {k: v for k, v in SIZES["tiny-0.1M"].__dict__.items() if k not in ("attention", "block_size", "mask_id")}
    ar = ModelConfig.from_dict({**fields, "vocab_size": 50, "causal": True})
    mdm = ModelConfig.from_dict({**fields, "vocab_size": 50, "causal": False})
    assert (ar.attention, ar.mask_id, ar.embedding_rows) == ("causal", None, 50)
    assert (mdm.attention, mdm.mask_id, mdm.embedding_rows) == ("bidirectional", 50, 51)
    assert ModelConfig.from_dict(dict(ar.__dict__)) == ar  # today's dicts round-trip


@pytest.mark.parametrize("fields,message", [
    ({"attention": "sliding"}, "attention='sliding' is unknown; allowed: causal, bidirectional, block"),
    ({"attention": "block"}, "attention='block' needs block_size >= 1, got None"),
    ({"attention": "block", "block_size": 0}, "attention='block' needs block_size >= 1, got 0"),
    ({"attention": "bidirectional", "block_size": 4}, "block_size=4 applies to attention='block' only"),
    ({"attention": "causal", "mask_id": 3}, "mask_id=3: a causal model has no mask token"),
    ({"mask_id": 51}, "mask_id=51 must be in \\[0, vocab_size=50\\]"),
])
def test_bad_attention_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=50, **fields)


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


def _splice_model(attention="bidirectional"):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=30, max_seq_len=32,
                      attention=attention, block_size=4 if attention == "block" else None)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_spliced_cache_reads_are_exact_when_nothing_changed(padded):
    """Fast-dLLM's caches read keys/values of a full-canvas call: with the canvas unchanged,
    a prefix-cache call (x[:, s:]) and a dual-cache call (x[:, s:e]) give the full call's logits."""
    model = _splice_model()
    x = torch.randint(0, 30, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    if padded:
        mask[1, :3] = False
    with torch.no_grad():
        full = model(x, mask)
        cache = KVCache(model.cfg, 2, 16)
        model(x, mask, kv_cache=cache)  # fills all 16 positions
        cache.truncate(8)
        with cache.spliced(8, 16):  # prefix cache: feed x[:, 8:]
            prefix = model(x[:, 8:], mask, kv_cache=cache)
        with cache.spliced(8, 16):  # dual cache: feed the block x[:, 8:12], suffix keys from the cache
            dual = model(x[:, 8:12], mask, kv_cache=cache)
    torch.testing.assert_close(prefix, full[:, 8:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dual, full[:, 8:12], atol=1e-5, rtol=1e-5)
    assert cache.length == 8  # splices write nothing


def test_an_appending_cache_on_a_bidirectional_model_is_refused():
    model = _splice_model()
    cache = KVCache(model.cfg, 1, 8)
    model(torch.randint(0, 30, (1, 4)), kv_cache=cache)  # filling an empty cache with a whole canvas is exact
    with pytest.raises(ValueError, match="appending to a KV cache needs causal or block attention"):
        model(torch.randint(0, 30, (1, 4)), kv_cache=cache)


def test_block_model_reads_a_committed_cache_without_writing_it():
    """BD3 decoding: committed clean blocks in the cache, the current block fed spliced (not
    stored) equals the uncached block-causal forward."""
    model = _splice_model("block")
    x = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, 12)
        model(x[:, :8], kv_cache=cache)  # two clean blocks committed
        with cache.spliced(8, 12):
            step = model(x[:, 8:12], kv_cache=cache)
    torch.testing.assert_close(step, full[:, 8:12], atol=1e-5, rtol=1e-5)
    assert cache.length == 8
