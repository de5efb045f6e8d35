"""Fast-dLLM's prefix and dual caches for the MDM sampler (SPEC §10, issue 14 item 2).

The caches are approximations for a bidirectional model, so the tests pin down what is exact:
every block's first call is the exact full-canvas call (so one step per block, and one block
with one step, give exactly the exact decoder's tokens); for a model whose cached states do not
depend on what changes (causal attention: the prefix cache; block attention aligned to the
semi-AR blocks: both caches) the cached decoder equals the exact one at every step; padding
never leaks into a row (a padded batch decodes like each prompt alone); model calls and tokens
processed are what the options promise. Agreement with exact decoding on a trained toy model
is reported, not asserted high.
"""

from __future__ import annotations

import pytest
import torch

from lldiff.objectives.common.decoding import DecodeOptions
from lldiff.completion import complete
from lldiff.config import ModelConfig
from lldiff.model import Transformer
from lldiff.objectives.mdm.decoding import generate, generate_threshold

V = 11  # real tokens 0..10; the mask is V (an extra row) unless said otherwise
CACHED = ("prefix", "dual")


def backbone(attention: str = "bidirectional", block_size: int | None = None, mask_id: int | None = None,
             seed: int = 0) -> Transformer:
    """A random 2-layer backbone with weights scaled up x4, so that its predictions depend on the
    context (at the default initialisation a tiny model predicts almost the same token everywhere)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, d_model=32, n_heads=2, d_ff=64, vocab_size=V, max_seq_len=96,
                      attention=attention, block_size=block_size, mask_id=mask_id)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4.0)
    return model


def prompts(b: int = 3, p: int = 8, high: int = V, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, (b, p), generator=torch.Generator().manual_seed(seed))


def record_calls(model: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, logits) of every forward of ``model`` from now on."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.register_forward_hook(lambda module, args, output: calls.append((args[0].clone(), output.clone())))
    return calls


# --- what is exact ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache", CACHED)
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_one_step_per_block_is_exact_decoding(cache, cfg_scale):
    """Each block's only call is its block-start call over the whole canvas: the exact call."""
    model, prompt = backbone(), prompts()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    common = {"gen_length": 24, "block_length": 8, "mask_id": V, "cfg_scale": cfg_scale, "attention_mask": mask}
    exact = generate(model, prompt, steps=3, **common)
    cached = generate(model, prompt, steps=3, cache=cache, **common)
    assert torch.equal(cached.canvas, exact.canvas)
    assert cached.model_calls == exact.model_calls == 3
    assert cached.tokens_processed == exact.tokens_processed  # every call is a whole-canvas call
    # threshold decoding at a threshold below any argmax probability (>= 1/V) fills a block per call
    exact = generate_threshold(model, prompt, threshold=0.5 / V, **common)
    cached = generate_threshold(model, prompt, threshold=0.5 / V, cache=cache, **common)
    assert torch.equal(cached.canvas, exact.canvas) and cached.model_calls == exact.model_calls == 3


def test_prefix_cache_with_one_block_and_one_step_is_exact_decoding():
    model, prompt = backbone(), prompts()
    exact = generate(model, prompt, gen_length=16, steps=1, block_length=16, mask_id=V)
    cached = generate(model, prompt, gen_length=16, steps=1, block_length=16, mask_id=V, cache="prefix")
    assert torch.equal(cached.canvas, exact.canvas)


@pytest.mark.parametrize("cache", CACHED)
def test_every_block_starts_with_the_exact_full_canvas_call(cache):
    """The first call of each block sees the whole current canvas and returns exactly the logits an
    uncached call on that canvas returns (so its reveals are exact decoding's first step there); the
    block's later calls feed x[:, block_start:] (prefix) or the block alone (dual)."""
    model, prompt = backbone(), prompts(b=2, p=6)
    calls = record_calls(model)
    out = generate(model, prompt, gen_length=12, steps=12, block_length=4, mask_id=V, cache=cache)
    widths = [ids.shape[1] for ids, _ in calls]
    rest = {"prefix": [12, 12, 12, 8, 8, 8, 4, 4, 4], "dual": [4] * 9}[cache]
    assert widths == [18, *rest[0:3], 18, *rest[3:6], 18, *rest[6:9]]
    full_calls = [(ids, logits) for ids, logits in calls if ids.shape[1] == 18]
    for block, (ids, logits) in enumerate(full_calls):
        assert torch.equal(logits, model(ids))  # the exact call on that canvas
        start = 6 + 4 * block
        assert (ids[:, start:] == V).all() and (ids[:, 6:start] != V).all()  # earlier blocks full, rest masked
    assert out.model_calls == 12 and not (out.canvas == V).any()
    # the first call is the exact decoder's first call, so the canvas after the first step is the same
    same = backbone()
    exact_calls = record_calls(same)
    generate(same, prompt, gen_length=12, steps=12, block_length=4, mask_id=V)
    assert torch.equal(exact_calls[0][1], calls[0][1])
    fed = calls[1][0]  # the second call's input: the canvas after the first step, from block_start on
    assert torch.equal(exact_calls[1][0][:, 6:6 + fed.shape[1]], fed)


@pytest.mark.parametrize("steps", [12, 24])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_both_caches_are_exact_for_block_attention_aligned_to_the_blocks(steps, cfg_scale):
    """Under block attention with the model's blocks on the semi-AR blocks, nothing before a block
    depends on it and the block does not see what follows: the cached states are the exact ones,
    so every step (fixed steps, surplus steps, threshold, CFG, padding) equals exact decoding."""
    model = backbone("block", block_size=4)
    prompt = prompts(b=3, p=8)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    common = {"gen_length": 12, "block_length": 4, "mask_id": V, "cfg_scale": cfg_scale, "attention_mask": mask}
    exact = generate(model, prompt, steps=steps, **common)
    assert len(set(exact.answer_ids.flatten().tolist())) > 3  # a model whose answers vary
    for cache in CACHED:
        cached = generate(model, prompt, steps=steps, cache=cache, **common)
        assert torch.equal(cached.canvas, exact.canvas), cache
        threshold = dict(threshold=0.3, **common)
        assert torch.equal(generate_threshold(model, prompt, cache=cache, **threshold).canvas,
                           generate_threshold(model, prompt, **threshold).canvas), cache


def test_prefix_cache_is_exact_for_a_causal_model():
    """Causal attention: earlier states never depend on later tokens, so the prefix cache is exact
    (the dual cache is not: the suffix's states depend on the block). The mask id is a vocabulary
    id here (a causal backbone has no mask row), never in the prompts."""
    model = backbone("causal")
    prompt = prompts(b=3, p=8, high=V - 1)
    common = {"gen_length": 12, "block_length": 4, "mask_id": V - 1}
    exact = generate(model, prompt, steps=12, **common)
    assert torch.equal(generate(model, prompt, steps=12, cache="prefix", **common).canvas, exact.canvas)
    assert torch.equal(generate_threshold(model, prompt, threshold=0.3, cache="prefix", **common).canvas,
                       generate_threshold(model, prompt, threshold=0.3, **common).canvas)


# --- padding --------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", CACHED)
def test_a_cache_never_crosses_a_padding_boundary(cache):
    """A left-padded row decodes as its prompt alone (RoPE is relative, padded keys are masked in
    every call, cached or not), and what the padding holds never matters (bitwise)."""
    model = backbone()
    rows = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    common = {"gen_length": 12, "block_length": 4, "mask_id": V, "cache": cache}
    for decode, kwargs in ((generate, {"steps": 12}), (generate_threshold, {"threshold": 0.6})):
        batch = decode(model, ids, attention_mask=mask, **common, **kwargs)
        other_padding = decode(model, torch.where(mask, ids, 7), attention_mask=mask, **common, **kwargs)
        assert torch.equal(batch.answer_ids, other_padding.answer_ids)
        for row, tokens in enumerate(rows):
            alone = decode(model, torch.tensor([tokens]), **common, **kwargs)
            assert batch.answer_ids[row].tolist() == alone.answer_ids[0].tolist(), (decode.__name__, row)


# --- model calls and tokens processed --------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
@pytest.mark.parametrize("steps", [6, 12, 24])
def test_model_calls_and_tokens_processed_are_what_the_options_promise(steps, cfg_scale):
    """Exact: ``steps`` whole-canvas calls. Cached: per block, one whole-canvas call and then
    ``min(steps per block, block length) - 1`` calls over the block and what follows (prefix) or
    the block alone (dual); surplus steps, which reveal nothing, make no call."""
    model, (b, p), gen, block = backbone(), (2, 5), 12, 4
    prompt = prompts(b=b, p=p)
    total, blocks, rows = p + gen, gen // block, b * (2 if cfg_scale else 1)
    per_block = min(steps // blocks, block)
    outs = {cache: generate(model, prompt, gen_length=gen, steps=steps, block_length=block, mask_id=V,
                            cfg_scale=cfg_scale, cache=cache) for cache in ("none", *CACHED)}
    assert outs["none"].model_calls == steps
    assert outs["none"].tokens_processed == steps * rows * total
    fed = {"prefix": lambda k: total - (p + k * block), "dual": lambda k: block}
    for cache in CACHED:
        out = outs[cache]
        assert out.model_calls == blocks * per_block
        assert out.forward_rows == out.model_calls * rows
        assert out.tokens_processed == rows * sum(total + (per_block - 1) * fed[cache](k) for k in range(blocks))
        assert out.tokens_processed_per_answer_token == out.tokens_processed / (b * gen)


def test_threshold_calls_count_the_block_start_calls():
    prompt = prompts(b=2, p=5)
    for cache in CACHED:
        model = backbone()
        calls = record_calls(model)
        out = generate_threshold(model, prompt, gen_length=12, block_length=4, mask_id=V, threshold=0.7, cache=cache)
        assert out.model_calls == len(calls) and sum(ids.shape[1] == 17 for ids, _ in calls) == 3
        assert out.tokens_processed == sum(ids.numel() for ids, _ in calls)


def test_forbid_eos_holds_with_a_cache():
    model, prompt = backbone(), prompts()
    for cache in CACHED:
        out = generate(model, prompt, gen_length=12, steps=12, block_length=4, mask_id=V, eos_id=3,
                       forbid_eos=True, cache=cache)
        assert not (out.answer_ids == 3).any()


# --- refused ---------------------------------------------------------------------------------


def test_bad_cache_options_are_refused_naming_what_is_allowed():
    model, prompt = backbone(), prompts()
    with pytest.raises(ValueError, match=r"cache='dual' .* needs more than one block .*block_length=8 with "
                                         r"gen_length=8; allowed: a block_length dividing 8 below it \(1, 2, 4\)"):
        generate(model, prompt, gen_length=8, steps=8, block_length=8, mask_id=V, cache="dual")
    with pytest.raises(ValueError, match="cache='dual'"):
        generate_threshold(model, prompt, gen_length=8, block_length=8, mask_id=V, cache="dual")
    with pytest.raises(ValueError, match="cache='kv' is unknown; allowed: 'none', 'prefix', 'dual'"):
        generate(model, prompt, gen_length=8, steps=8, block_length=4, mask_id=V, cache="kv")
    with pytest.raises(ValueError, match="cache='prefix' needs an lldiff Transformer"):
        generate(lambda ids: model(ids), prompt, gen_length=8, steps=8, block_length=4, mask_id=V, cache="prefix")
    with pytest.raises(ValueError, match=r"needs more than one block \(block_length < length\)"):
        DecodeOptions(length=16, cache="dual")
    with pytest.raises(ValueError, match="cache='all'; allowed: none, prefix, dual"):
        DecodeOptions(length=16, cache="all")


def test_complete_refuses_a_cache_for_an_ar_and_names_its_own_cache():
    torch.manual_seed(0)
    ar = Transformer(ModelConfig(n_layer=1, d_model=16, n_heads=2, d_ff=32, vocab_size=V, max_seq_len=64,
                                 attention="causal")).eval()
    with pytest.raises(ValueError, match="cache=prefix applies to MDM models only; this is an AR model, whose "
                                         r"decoder uses its exact KV cache, on by default \(use_cache\)"):
        complete(ar, [[1, 2]], DecodeOptions(length=4, cache="prefix"), eos_id=0, pad_id=0)


def test_complete_decodes_with_a_cache_and_counts_tokens_processed():
    model = backbone()
    exact = complete(model, [[1, 2, 3], [4]], DecodeOptions(length=8, block_length=4), eos_id=V + 5, pad_id=0)
    dual = complete(model, [[1, 2, 3], [4]], DecodeOptions(length=8, block_length=4, cache="dual"),
                    eos_id=V + 5, pad_id=0)
    assert exact.model_calls == dual.model_calls == 8
    assert exact.tokens_processed == 8 * 2 * 11
    assert dual.tokens_processed == 2 * 2 * 11 + 2 * 3 * 2 * 4  # per block: one full call, three of the block
    assert all(len(answer) == 8 for answer in dual.answers)


# --- agreement on a trained toy model (a number, not a bar) --------------------------------------


def test_agreement_with_exact_decoding_on_the_toy_language_is_reported(capsys):
    from conftest import load_benchmark

    toy = load_benchmark("toy")
    counting_sequences, train_toy_mdm = toy.counting_sequences, toy.train_toy_mdm

    model = train_toy_mdm(steps=150, batch=32)
    seqs = counting_sequences(32, 16, generator=torch.Generator().manual_seed(1))
    prompt, target = seqs[:, :4], seqs[:, 4:]
    common = {"gen_length": 12, "block_length": 4, "mask_id": model.cfg.mask_id}
    exact = generate(model, prompt, steps=12, **common)
    lines = []
    for name, out in [("prefix", generate(model, prompt, steps=12, cache="prefix", **common)),
                      ("dual", generate(model, prompt, steps=12, cache="dual", **common)),
                      ("dual+threshold", generate_threshold(model, prompt, threshold=0.9, cache="dual", **common))]:
        agreement = (out.answer_ids == exact.answer_ids).float().mean().item()
        assert 0.0 <= agreement <= 1.0
        match = (out.answer_ids == target).all(1).float().mean().item()
        lines.append(f"{name}: agreement {agreement:.3f}, exact match {match:.3f}, calls {out.model_calls}")
    with capsys.disabled():
        print(f"\ntoy MDM (150 steps): exact decoding exact match "
              f"{(exact.answer_ids == target).all(1).float().mean().item():.3f}; " + "; ".join(lines))
