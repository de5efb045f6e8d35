"""BD3 decoding (SPEC §9) against limits that must coincide, not against the code:

* one block covering prompt and answer: the backbone is then bidirectional, so the decoder is
  exactly the MDM sampler (same tokens, same random draws, every sampler setting);
* several blocks: the decoder is the MDM sampler run block after block on the block model,
  each block's canvas = everything decoded so far + the block (the definition of BD3 sampling),
  also when the prompt ends inside a block and for a last partial block;
* block_size = 1: greedy next-token decoding of the same network (mask token as the query);
* left padding: a padded batch decodes each prompt exactly as alone (block ids follow real
  positions);
* early stop at EOS changes no answer;
* the KV cache (``use_cache=True``, the default) gives the uncached decoder's tokens and model
  calls at temperature 0 (block sizes 1, 4, 16; prompts ending inside a block and on a
  boundary; threshold decoding; CFG; EOS; left-padded batches whose rows' blocks sit at
  different columns), and feeds the positions it promises.
"""

import pytest
import torch

from lldiff import objectives as registry
from lldiff.objectives.bd3.decoding import block_generate
from lldiff.objectives.common.decoding import DecodeOptions
from lldiff.completion import check_options, complete
from lldiff.config import ModelConfig
from lldiff.model import Transformer
from lldiff.objectives.mdm.decoding import generate, generate_threshold

V = 13


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def block_model(block_size: int, seed: int = 0, max_seq_len: int = 64) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=V, max_seq_len=max_seq_len,
                      attention="block", block_size=block_size)
    return Transformer(cfg).eval()


def bidirectional_copy(model: Transformer) -> Transformer:
    twin = Transformer(model.cfg.replace(attention="bidirectional", block_size=None)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


SETTINGS = [
    dict(steps=8),
    dict(steps=4),
    dict(steps=12),  # more steps than masks: surplus steps reveal nothing (at temperature 0: no draws either)
    dict(steps=8, temperature=1.0),
    dict(steps=4, remasking="random", temperature=0.7),
    dict(steps=8, cfg_scale=1.5),
    dict(steps=8, forbid_eos=True, eos_id=3),
    dict(threshold=0.3),
    dict(threshold=1.0, temperature=1.0),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_one_block_over_everything_is_the_mdm_sampler(setting):
    model = block_model(block_size=16)  # prompt 5 + answer 8 <= 16: one block, all positions see each other
    twin = bidirectional_copy(model)
    prompt = prompts(3, 5)
    setting = dict(setting)
    steps, threshold = setting.pop("steps", None), setting.pop("threshold", None)
    remasking = setting.pop("remasking", "low_confidence")
    common = dict(gen_length=8, mask_id=model.cfg.mask_id, **setting)
    if threshold is None:
        want = generate(twin, prompt, steps=steps, block_length=8, remasking=remasking,
                        generator=torch.Generator().manual_seed(5), **common)
        got = block_generate(model, prompt, block_size=16, steps_per_block=steps, remasking=remasking,
                             generator=torch.Generator().manual_seed(5), **common)
    else:
        want = generate_threshold(twin, prompt, block_length=8, threshold=threshold,
                                  generator=torch.Generator().manual_seed(5), **common)
        got = block_generate(model, prompt, block_size=16, remasking="threshold", threshold=threshold,
                             generator=torch.Generator().manual_seed(5), **common)
    assert torch.equal(got.canvas, want.canvas)
    assert got.prompt_length == want.prompt_length == 5
    if steps is None or steps <= 8:
        assert got.model_calls == want.model_calls  # every call reveals something
    else:
        assert got.model_calls == 8 < want.model_calls == steps  # steps with nothing to reveal make no call


def mdm_block_by_block(model, prompt, *, gen_length, block_size, steps, generator, **kw):
    """BD3 sampling by its definition: block after block, the MDM reverse process on a canvas
    holding everything decoded so far plus the current block's masks (the block model applies
    its block-causal mask from the positions 0..T-1 itself)."""
    canvas, end = prompt, prompt.shape[1] + gen_length
    calls = 0
    while canvas.shape[1] < end:
        stop = min(end, (canvas.shape[1] // block_size + 1) * block_size)
        n = stop - canvas.shape[1]
        out = generate(model, canvas, gen_length=n, block_length=n, steps=steps, mask_id=model.cfg.mask_id,
                       generator=generator, **kw)
        canvas, calls = out.canvas, calls + min(steps, n)
    return canvas, calls


@pytest.mark.parametrize("prompt_len,gen_length,block_size,steps,kw", [
    (5, 9, 4, 4, {}),  # prompt ends inside block 1 (3 masks), full block 2, partial last block (2)
    (8, 8, 4, 2, {}),  # prompt is whole blocks
    (5, 9, 4, 2, {"temperature": 1.0}),  # sampling: no block has fewer masks than steps (the same draws)
    (3, 10, 3, 1, {"remasking": "random", "temperature": 0.5}),
    (6, 7, 8, 5, {}),  # a prompt shorter than a block
])
def test_several_blocks_are_the_mdm_sampler_block_after_block(prompt_len, gen_length, block_size, steps, kw):
    model = block_model(block_size=block_size, seed=prompt_len)
    prompt = prompts(2, prompt_len, seed=prompt_len)
    want, calls = mdm_block_by_block(model, prompt, gen_length=gen_length, block_size=block_size, steps=steps,
                                     generator=torch.Generator().manual_seed(9), **kw)
    for use_cache in [False] if kw.get("temperature") else [False, True]:  # cached: other draws (fed block only)
        got = block_generate(model, prompt, gen_length=gen_length, block_size=block_size, mask_id=model.cfg.mask_id,
                             steps_per_block=steps, generator=torch.Generator().manual_seed(9), use_cache=use_cache,
                             **kw)
        assert torch.equal(got.canvas, want)
        assert got.model_calls == calls  # one call per step that has something to reveal


@pytest.mark.parametrize("remasking", ["low_confidence", "threshold"])
def test_block_size_one_is_greedy_next_token_decoding(remasking):
    model = block_model(block_size=1, seed=3)
    prompt = prompts(2, 4, seed=3)
    x = prompt
    mask = torch.full((2, 1), model.cfg.mask_id)
    with torch.no_grad():
        for _ in range(7):  # each step: the clean prefix and one mask query
            x = torch.cat([x, model(torch.cat([x, mask], dim=1))[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = block_generate(model, prompt, gen_length=7, block_size=1, mask_id=model.cfg.mask_id, remasking=remasking)
    assert torch.equal(got.canvas, x)
    assert got.model_calls == 7


@pytest.mark.parametrize("kw", [{}, {"remasking": "threshold", "threshold": 0.5}, {"steps_per_block": 2},
                                {"cfg_scale": 1.0}])
def test_left_padded_batch_decodes_each_prompt_as_alone(kw):
    model = block_model(block_size=4, seed=4)
    lengths = [3, 4, 5, 8]  # with 8 new tokens in blocks of 4: 3, 2, 3 and 2 blocks to decode
    rows = [prompts(1, n, seed=10 + n)[0].tolist() for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = True
    batch = block_generate(model, ids, gen_length=8, block_size=4, mask_id=model.cfg.mask_id, attention_mask=mask, **kw)
    for r, row in enumerate(rows):
        alone = block_generate(model, torch.tensor([row]), gen_length=8, block_size=4, mask_id=model.cfg.mask_id, **kw)
        assert batch.canvas[r, width:].tolist() == alone.canvas[0, len(row):].tolist(), f"row {r}"


def test_complete_dispatches_to_the_block_decoder_with_padding():
    model = block_model(block_size=4, seed=6)
    rows = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    out = complete(model, rows, DecodeOptions(length=6, steps_per_block=2), eos_id=V + 5, pad_id=0)
    for row, answer in zip(rows, out.answers):
        alone = block_generate(model, torch.tensor([row]), gen_length=6, block_size=4, mask_id=model.cfg.mask_id,
                               steps_per_block=2)
        assert answer == alone.canvas[0, len(row):].tolist()


class EosAt:
    """A hand-made block model: the answer at real position i is token 1 + i % 5, except EOS (0)
    from position ``eos_from[row]`` on; padding-free, positions as given."""

    def __init__(self, eos_from):
        self.eos_from = torch.tensor(eos_from)

    def __call__(self, ids, positions, attention_mask=None):
        pos = positions.expand(ids.shape)
        token = torch.where(pos >= self.eos_from[:, None], 0, 1 + pos % 5)
        return torch.nn.functional.one_hot(token, V).float() * 5.0


def test_early_stop_at_eos_changes_no_answer():
    model = EosAt([6, 9])  # both rows end inside the answer: row 0 in block 1, row 1 in block 2
    prompt = torch.tensor([[7, 8, 9], [7, 8, 9]])
    kw = dict(gen_length=20, block_size=4, mask_id=V, eos_id=0, use_cache=False)  # a plain callable: no cache
    stopped = block_generate(model, prompt, **kw)
    full = block_generate(model, prompt, stop_at_eos=False, **kw)
    assert stopped.answer() == full.answer() == [[4, 5, 1], [4, 5, 1, 2, 3, 4]]
    assert stopped.model_calls < full.model_calls
    assert (stopped.answer_ids[:, 6:] == 0).all()  # the rest is EOS, never the mask token
    forbidden = block_generate(model, prompt, forbid_eos=True, **kw)
    assert (forbidden.answer_ids != 0).all() and forbidden.model_calls == full.model_calls


def test_bad_input_is_refused():
    model = block_model(block_size=4)
    prompt = prompts(1, 3)
    common = dict(block_size=4, mask_id=model.cfg.mask_id)
    for kwargs, message in [
        (dict(gen_length=0), "gen_length must be a positive integer, got 0"),
        (dict(gen_length=4, remasking="threshold", steps_per_block=2), "steps_per_block=2 has no effect"),
        (dict(gen_length=4, threshold=0.5), "threshold=0.5 needs remasking='threshold'"),
        (dict(gen_length=4, remasking="top"), "remasking='top' is unknown"),
        (dict(gen_length=4, steps_per_block=0), "steps_per_block must be a positive integer, got 0"),
        (dict(gen_length=4, temperature=float("nan")), "temperature must be >= 0"),
        (dict(gen_length=4, attention_mask=torch.tensor([[True, True, False]])), "must describe left padding"),
    ]:
        with pytest.raises(ValueError, match=message):
            block_generate(model, prompt, **{**common, **kwargs})
    with pytest.raises(ValueError, match="prompt contains the mask id"):
        block_generate(model, torch.tensor([[1, model.cfg.mask_id]]), gen_length=4, **common)


def test_options_of_other_decoders_are_refused_by_the_registry():
    model = block_model(block_size=4)
    with pytest.raises(ValueError, match="top_k=5 applies to AR models only; this is a BD3-4 model"):
        complete(model, [[1, 2]], DecodeOptions(length=4, temperature=1.0, top_k=5), eos_id=1, pad_id=0)
    bd3, mdm, ar = registry.get("bd3-4"), registry.get("mdm"), registry.get("ar")
    with pytest.raises(ValueError, match="steps_per_block=2 applies to BD3 models only; this is an MDM model"):
        check_options(DecodeOptions(length=8, steps_per_block=2), mdm, strict=True)
    with pytest.raises(ValueError, match="block_length=4 applies to MDM models only; this is a BD3-4 model"):
        check_options(DecodeOptions(length=8, block_length=4), bd3, strict=True)
    check_options(DecodeOptions(length=8, block_length=4), bd3)  # a recipe for several objectives: ignored
    with pytest.raises(ValueError, match="cfg_scale=1.0 applies to MDM and BD3 models only; this is an AR model"):
        check_options(DecodeOptions(length=8, cfg_scale=1.0), ar, strict=True)
    with pytest.raises(ValueError, match="steps_per_block=2 has no effect with remasking='threshold'"):
        DecodeOptions(length=8, remasking="threshold", steps_per_block=2)
    options = DecodeOptions.for_objective(bd3, length=8, steps=4, block_length=4, steps_per_block=2, top_k=None)
    assert (options.steps, options.block_length, options.steps_per_block) == (None, None, 2)


# -- the KV cache (issue 14) ------------------------------------------------------------------------------------------
def uncached_and_cached(model, prompt, **kw):
    kw = dict(mask_id=model.cfg.mask_id, block_size=model.cfg.block_size, **kw)
    return block_generate(model, prompt, use_cache=False, **kw), block_generate(model, prompt, use_cache=True, **kw)


CACHE_SETTINGS = [
    dict(),
    dict(steps_per_block=2),
    dict(steps_per_block=20),  # more steps than masks: the surplus makes no call
    dict(remasking="threshold", threshold=0.2),
    dict(remasking="threshold", threshold=1.0),
    dict(cfg_scale=1.5),
    dict(cfg_scale=1.0, remasking="threshold", threshold=0.2),
    dict(forbid_eos=True, eos_id=3),
]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("prompt_len", [5, 16])  # ends inside a block (B = 4, 16), on a boundary (every B)
@pytest.mark.parametrize("setting", CACHE_SETTINGS, ids=[str(s) for s in CACHE_SETTINGS])
def test_cache_gives_the_uncached_tokens_and_calls(block_size, prompt_len, setting):
    model = block_model(block_size, seed=block_size + prompt_len, max_seq_len=64)
    prompt = prompts(2, prompt_len, seed=prompt_len)
    plain, cached = uncached_and_cached(model, prompt, gen_length=23, **setting)  # last block partial (B = 4, 16)
    assert torch.equal(cached.canvas, plain.canvas)
    assert cached.model_calls == plain.model_calls and cached.forward_rows == plain.forward_rows
    assert cached.tokens_processed < plain.tokens_processed


def test_cache_feeds_the_promised_positions():
    """Per block: min(steps, masks) calls (a step that reveals nothing makes none); its first call
    feeds the columns finished since the previous block's first call plus the block (the prompt's
    clean part at the first block), the others the block alone."""
    block, prompt_len, gen, batch = 4, 6, 13, 2  # blocks at [4, 8) (2 masks), [8, 12), [12, 16), [16, 19)
    model = block_model(block, seed=2)
    for steps in (1, 3, 4, 8):
        plain, cached = uncached_and_cached(model, prompts(batch, prompt_len), gen_length=gen, steps_per_block=steps)
        calls = fed = previous = 0
        for start in range(4, prompt_len + gen, block):
            end = min(start + block, prompt_len + gen)
            n = min(steps, end - max(start, prompt_len))
            calls += n
            fed += (end - previous) + (n - 1) * (end - start)
            previous = start
        assert cached.model_calls == plain.model_calls == calls
        assert cached.tokens_processed == batch * fed
        assert plain.tokens_processed == batch * sum(min(steps, min(s + block, 19) - max(s, 6)) * min(s + block, 19)
                                                     for s in range(4, 19, block))
        assert torch.equal(cached.canvas, plain.canvas)


@pytest.mark.parametrize("block_size,lengths", [
    (4, [3, 4, 5, 8, 1]),  # block boundaries at different columns; rows needing a block fewer sit a round out
    (3, [7, 2, 5]),
    (16, [3, 17, 20]),  # rows in different blocks at once
])
@pytest.mark.parametrize("kw", [{}, {"remasking": "threshold", "threshold": 0.2}, {"steps_per_block": 2},
                                {"cfg_scale": 1.0}])
def test_cache_with_left_padding_decodes_each_prompt_as_alone(block_size, lengths, kw):
    """The cache is indexed by canvas columns, the padding included: rows whose blocks start at
    different columns must never read a cached entry of a block they have not finished, nor
    attend their padding. Each row of the cached padded batch decodes as the prompt alone
    (uncached) and the batch as the uncached batch."""
    model = block_model(block_size, seed=7)
    rows = [prompts(1, n, seed=20 + n)[0].tolist() for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), 2, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = True
    plain, cached = uncached_and_cached(model, ids, gen_length=10, attention_mask=mask, **kw)
    assert torch.equal(cached.canvas, plain.canvas)
    assert cached.model_calls == plain.model_calls
    for r, row in enumerate(rows):
        alone = block_generate(model, torch.tensor([row]), gen_length=10, block_size=block_size,
                               mask_id=model.cfg.mask_id, use_cache=False, **kw)
        assert cached.canvas[r, width:].tolist() == alone.canvas[0, len(row):].tolist(), f"row {r}"


def test_a_cache_that_counts_blocks_in_canvas_columns_fails_the_padding_test(monkeypatch):
    """The padding test has teeth: under left padding canvas columns are not positions, and a
    cached call whose block mask counted key blocks in columns (what the model's own mask does
    with a cache) lets rows attend across their block boundaries and changes the answers."""
    from lldiff.objectives.bd3 import decoding as block_decoding
    from lldiff import model as model_module

    def column_blocks(query_positions, key_positions, block_size):
        columns = torch.arange(key_positions.shape[-1]).expand_as(key_positions)
        return model_module.block_causal_mask(query_positions, columns, block_size)

    model = block_model(4, seed=7)
    rows = [prompts(1, n, seed=20 + n)[0].tolist() for n in (3, 8, 5)]
    ids = torch.full((3, 8), 2, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, 8 - len(row):], mask[r, 8 - len(row):] = torch.tensor(row), True
    kw = dict(gen_length=12, block_size=4, mask_id=model.cfg.mask_id, attention_mask=mask)
    alone = [block_generate(model, torch.tensor([row]), gen_length=12, block_size=4, mask_id=model.cfg.mask_id,
                            use_cache=False).canvas[0, len(row):].tolist() for row in rows]
    assert block_generate(model, ids, **kw).canvas[:, 8:].tolist() == alone
    monkeypatch.setattr(block_decoding, "block_causal_mask", column_blocks)
    wrong = block_generate(model, ids, **kw).canvas[:, 8:].tolist()
    assert wrong[1] == alone[1]  # the unpadded row is right either way
    assert wrong != alone


def test_cache_keeps_the_early_stop_at_eos():
    model = block_model(4, seed=11)
    prompt = prompts(2, 5, seed=11)
    free = block_generate(model, prompt, gen_length=24, block_size=4, mask_id=model.cfg.mask_id, use_cache=False)
    answers = free.answer_ids.tolist()
    eos = next(t for t in answers[0][:8] if t in answers[1][:8])  # a token both rows emit early: decoding stops
    plain, cached = uncached_and_cached(model, prompt, gen_length=24, eos_id=eos)
    assert torch.equal(cached.canvas, plain.canvas) and cached.answer() == plain.answer()
    assert cached.model_calls == plain.model_calls < free.model_calls


def test_cache_with_a_model_that_cannot_hold_it_is_refused():
    torch.manual_seed(0)
    ar = Transformer(ModelConfig(n_layer=1, d_model=32, n_heads=4, d_ff=64, vocab_size=V, max_seq_len=32,
                                 attention="causal"))
    prompt = prompts(1, 3)
    with pytest.raises(ValueError, match="use_cache=True .* needs a bd3-4 model .*; this is an AR model; "
                                         "pass use_cache=False"):
        block_generate(ar, prompt, gen_length=4, block_size=4, mask_id=V)
    with pytest.raises(ValueError, match="needs a bd3-4 model .*; this is a BD3-8 model"):
        block_generate(block_model(8), prompt, gen_length=4, block_size=4, mask_id=V)
    with pytest.raises(ValueError, match="needs an lldiff Transformer with block attention .* got a EosAt"):
        block_generate(EosAt([9]), prompt, gen_length=4, block_size=4, mask_id=V)
    # the registry lets BD3 decoding take the option (lldiff generate / chat --no-cache)
    check_options(DecodeOptions(length=8, use_cache=False), registry.get("bd3-4"), strict=True)
