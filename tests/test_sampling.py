"""Masked-diffusion samplers (SPEC §4) against the math and invariants, with fake models."""

import math

import pytest
import torch

from lldiff.objectives.common.remasking import add_gumbel_noise, reveal_counts
from lldiff.objectives.common.guidance import cfg_logits
from lldiff.objectives.mdm.decoding import generate, generate_threshold, infill
from lldiff.objectives.common.decoding import strip_after_eos
from lldiff.objectives.common.decoding import SampleOutput

V = 7  # real tokens 0..6
M = V  # mask id


# ---------------------------------------------------------------------------------------
# fake models


class Recorder:
    """Wraps a model callable and records every input (ids, attention mask)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def __call__(self, ids, attention_mask=None):
        self.calls.append((ids.clone(), None if attention_mask is None else attention_mask.clone()))
        return self.inner(ids) if attention_mask is None else self.inner(ids, attention_mask)


class LinearModel:
    """Random but fixed: logits[t] = W[ids[t]] + mean_s U[ids[s]] (depends on context)."""

    def __init__(self, seed=0, vocab=V):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(vocab + 1, vocab, generator=g)
        self.u = torch.randn(vocab + 1, vocab, generator=g)

    def __call__(self, ids, attention_mask=None):
        ctx = self.u[ids]
        if attention_mask is not None:
            ctx = ctx * attention_mask[..., None]
        return self.w[ids] + ctx.mean(dim=1, keepdim=True)


class Oracle:
    """Predicts ``target`` (T,) at every position with softmax probability ``conf`` (T,),
    the rest of the mass spread evenly (so conf > 1/V keeps target the argmax). Takes ids only."""

    def __init__(self, target, conf, vocab=V):
        target, conf = torch.as_tensor(target), torch.as_tensor(conf, dtype=torch.float64)
        rest = ((1 - conf) / (vocab - 1)).log()
        logits = rest[:, None].repeat(1, vocab)
        logits[torch.arange(len(target)), target] = conf.log()
        self.logits = logits.float()

    def __call__(self, ids):
        return self.logits[: ids.shape[1]].expand(ids.shape[0], -1, -1)


def canvases(rec, out):
    """Conditional canvas before every call, then the final canvas."""
    b = out.canvas.shape[0]
    return [ids[:b] for ids, _ in rec.calls] + [out.canvas]


def prompt_batch(b=3, p=4, seed=1):
    return torch.randint(0, V, (b, p), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# pure helpers


def test_reveal_counts_exact_and_invariants():
    assert reveal_counts(torch.tensor([10, 7, 3]), 4).tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [1, 1, 1, 0]]
    for m in range(0, 40):
        for s in range(1, 12):
            c = reveal_counts(torch.tensor([m]), s)[0]
            assert c.sum() == m
            assert (c[:-1] >= c[1:]).all()  # front-loaded
            assert c.max() - c.min() <= 1


def test_gumbel_temperature_zero_is_identity_and_noise_is_safe():
    logits = torch.randn(2, 3, 5)
    assert add_gumbel_noise(logits, 0.0) is logits
    huge = torch.tensor([[1e4, 0.0, -1e4, float("-inf")]])
    noisy = add_gumbel_noise(huge, 0.5, torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.float64
    assert torch.isfinite(noisy[0, :3]).all() and noisy[0, 3] == float("-inf")
    assert noisy.argmax().item() == 0


def test_gumbel_max_samples_softmax_over_temperature():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.3]).expand(40_000, 4)
    tau = 0.7
    g = torch.Generator().manual_seed(0)
    draws = add_gumbel_noise(logits, tau, g).argmax(-1)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = torch.softmax(logits[0].double() / tau, -1)
    sigma = (expected * (1 - expected) / draws.numel()).sqrt()
    assert ((freq - expected).abs() < 5 * sigma).all()


def test_cfg_logits_formula():
    c, u = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    torch.testing.assert_close(cfg_logits(c, u, 0.0), c)
    torch.testing.assert_close(cfg_logits(c, u, 1.5), u + 2.5 * (c - u))


def test_strip_after_eos():
    ids = torch.tensor([[1, 2, 6, 3, 6], [1, 2, 3, 4, 5], [6, 1, 1, 1, 1]])
    assert strip_after_eos(ids, 6) == [[1, 2], [1, 2, 3, 4, 5], []]
    assert strip_after_eos(ids, None) == ids.tolist()


# ---------------------------------------------------------------------------------------
# generate: step-by-step invariants


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("gen_length,block_length,steps", [(12, 4, 6), (12, 12, 5), (8, 4, 12)])
def test_each_step_reveals_counted_positions_inside_current_block(
    remasking, temperature, gen_length, block_length, steps
):
    prompt = prompt_batch()
    b, p = prompt.shape
    rec = Recorder(LinearModel())
    out = generate(
        rec, prompt, gen_length=gen_length, steps=steps, block_length=block_length, mask_id=M,
        temperature=temperature, remasking=remasking, generator=torch.Generator().manual_seed(3),
    )
    assert out.canvas.shape == (b, p + gen_length)
    assert out.model_calls == steps == len(rec.calls)
    assert out.forward_rows == steps * b
    spb = steps // (gen_length // block_length)
    counts = reveal_counts(torch.full((b,), block_length), spb)
    history = canvases(rec, out)
    assert (history[0][:, p:] == M).all()
    for i, (before, after) in enumerate(zip(history[:-1], history[1:])):
        assert torch.equal(after[:, :p], prompt)  # prompt never changes
        revealed = (before == M) & (after != M)
        assert ((before != M) <= (after == before)).all()  # revealed tokens never change
        start = p + (i // spb) * block_length
        outside = torch.ones(p + gen_length, dtype=torch.bool)
        outside[start : start + block_length] = False
        assert not revealed[:, outside].any()
        assert revealed.sum(1).tolist() == counts[:, i % spb].tolist()
        if (i + 1) % spb == 0:  # block complete at its last step
            assert (after[:, start : start + block_length] != M).all()
    assert (out.canvas != M).all()


def test_temperature_zero_is_deterministic_and_sampling_reproducible():
    prompt = prompt_batch()
    kw = dict(gen_length=8, steps=8, block_length=4, mask_id=M)
    a = generate(LinearModel(), prompt, **kw, generator=torch.Generator().manual_seed(0)).canvas
    b = generate(LinearModel(), prompt, **kw, generator=torch.Generator().manual_seed(1)).canvas
    assert torch.equal(a, b)
    hot = dict(kw, temperature=2.0)
    s1 = generate(LinearModel(), prompt, **hot, generator=torch.Generator().manual_seed(0)).canvas
    s2 = generate(LinearModel(), prompt, **hot, generator=torch.Generator().manual_seed(0)).canvas
    s3 = generate(LinearModel(), prompt, **hot, generator=torch.Generator().manual_seed(1)).canvas
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)


def test_low_confidence_reveals_most_confident_first():
    target = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 1, 2])  # 2 prompt + 8 answer positions
    conf = torch.tensor([0.5, 0.5, 0.3, 0.9, 0.5, 0.7, 0.2, 0.95, 0.6, 0.4])
    prompt = torch.tensor([[0, 0]])
    rec = Recorder(Oracle(target, conf))
    out = generate(rec, prompt, gen_length=8, steps=8, block_length=4, mask_id=M)
    history = canvases(rec, out)
    order = [int(((b == M) & (a != M))[0].nonzero()) for b, a in zip(history[:-1], history[1:])]
    # block 1 = positions 2..5 by confidence, then block 2 = 6..9 (0.95 first even though 0.9 > 0.7)
    assert order == [3, 5, 4, 2, 7, 8, 9, 6]
    assert torch.equal(out.canvas[0, 2:], target[2:])


def test_random_remasking_order_is_random_but_respects_blocks():
    target = torch.arange(10) % V
    conf = torch.linspace(0.2, 0.9, 10)
    orders = set()
    for seed in range(6):
        rec = Recorder(Oracle(target, conf))
        out = generate(rec, torch.tensor([[1, 2]]), gen_length=8, steps=8, block_length=4, mask_id=M,
                       remasking="random", generator=torch.Generator().manual_seed(seed))
        history = canvases(rec, out)
        order = tuple(int(((b == M) & (a != M))[0].nonzero()) for b, a in zip(history[:-1], history[1:]))
        assert sorted(order[:4]) == [2, 3, 4, 5] and sorted(order[4:]) == [6, 7, 8, 9]
        orders.add(order)
        assert torch.equal(out.canvas[0, 2:], target[2:])
    assert len(orders) > 1


def test_steps_beyond_block_length_reveal_nothing_but_count():
    out = generate(LinearModel(), prompt_batch(), gen_length=4, steps=6, block_length=4, mask_id=M)
    assert out.model_calls == 6 and (out.canvas != M).all()


# ---------------------------------------------------------------------------------------
# left padding and CFG


def left_padded():
    prompt = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 6]])  # pad id 0
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    return prompt, mask


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_left_padding_mask_is_extended_and_prompt_untouched(cfg_scale):
    prompt, mask = left_padded()
    rec = Recorder(LinearModel())
    out = generate(rec, prompt, gen_length=6, steps=6, block_length=3, mask_id=M,
                   attention_mask=mask, cfg_scale=cfg_scale)
    b, p = prompt.shape
    full = torch.cat([mask, torch.ones(b, 6, dtype=torch.bool)], 1)
    for ids, am in rec.calls:
        reps = ids.shape[0] // b
        assert reps == (2 if cfg_scale else 1)
        assert torch.equal(am, full.repeat(reps, 1))
        assert torch.equal(ids[:b, :p], prompt)
    assert torch.equal(out.canvas[:, :p], prompt)
    assert out.forward_rows == 6 * b * (2 if cfg_scale else 1) and out.model_calls == 6


def test_cfg_unconditional_input_masks_only_real_prompt_tokens():
    prompt, mask = left_padded()
    b, p = prompt.shape
    rec = Recorder(LinearModel())
    generate(rec, prompt, gen_length=4, steps=4, block_length=4, mask_id=M, attention_mask=mask, cfg_scale=1.0)
    for ids, _ in rec.calls:
        cond, uncond = ids[:b], ids[b:]
        assert (uncond[:, :p][mask] == M).all()
        assert torch.equal(uncond[:, :p][~mask], prompt[~mask])  # padding stays padding
        assert torch.equal(uncond[:, p:], cond[:, p:])
    # without an attention mask the whole prompt is masked (upstream crashes here)
    rec = Recorder(LinearModel())
    generate(rec, prompt, gen_length=4, steps=2, block_length=4, mask_id=M, cfg_scale=1.0)
    assert all((ids[b:, :p] == M).all() and ids.shape[0] == 2 * b for ids, _ in rec.calls)


def test_cfg_zero_equals_plain_conditional():
    prompt = prompt_batch()
    kw = dict(gen_length=8, steps=4, block_length=4, mask_id=M, temperature=1.0)
    plain = generate(LinearModel(), prompt, **kw, generator=torch.Generator().manual_seed(5))
    rec = Recorder(LinearModel())
    zero = generate(rec, prompt, **kw, cfg_scale=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain.canvas, zero.canvas)
    assert all(ids.shape[0] == prompt.shape[0] for ids, _ in rec.calls)


def test_cfg_combines_conditional_and_unconditional_logits():
    c, u = torch.tensor([0.0, 1.0, 0.5, 0, 0, 0, 0]), torch.tensor([0.0, 2.0, 0.0, 0, 0, 0, 0])

    def model(ids):  # unconditional rows are recognised by their masked prompt
        rows = torch.where((ids[:, :1] == M)[:, :, None], u, c)
        return rows.expand(-1, ids.shape[1], -1)

    prompt = torch.tensor([[3, 3]])
    kw = dict(gen_length=4, steps=2, block_length=4, mask_id=M)
    assert (generate(model, prompt, **kw).canvas[0, 2:] == 1).all()  # argmax c
    # u + 2 (c - u) = [0, 0, 1, ...]
    assert (generate(model, prompt, **kw, cfg_scale=1.0).canvas[0, 2:] == 2).all()


# ---------------------------------------------------------------------------------------
# EOS, mask logits, model adapters


def test_forbid_eos_never_produces_eos():
    eos = 6
    oracle = Oracle(torch.full((12,), eos), torch.full((12,), 0.9))
    prompt = torch.tensor([[1, 2, 3, 4]])
    kw = dict(gen_length=8, steps=4, block_length=4, mask_id=M, eos_id=eos)
    free = generate(oracle, prompt, **kw)
    assert (free.canvas[0, 4:] == eos).all() and free.answer() == [[]]
    for temperature in (0.0, 1.0):
        out = generate(oracle, prompt, **kw, forbid_eos=True, temperature=temperature,
                       generator=torch.Generator().manual_seed(0), cfg_scale=0.5)
        assert not (out.canvas == eos).any()
        assert out.answer() == out.canvas[:, 4:].tolist()


def test_mask_logit_is_never_sampled_and_hf_outputs_unwrapped():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    def model(ids, attention_mask=None):  # head covers M and prefers it strongly
        logits = torch.zeros(*ids.shape, V + 1)
        logits[..., M] = 100.0
        logits[..., 3] = 1.0
        return Out(logits)

    out = generate(model, prompt_batch(), gen_length=4, steps=4, block_length=2, mask_id=M)
    assert (out.canvas[:, 4:] == 3).all()


def test_output_reports_speed():
    out = generate(LinearModel(), prompt_batch(), gen_length=4, steps=2, block_length=4, mask_id=M)
    assert out.seconds > 0 and out.tokens_per_second > 0 and out.answer_ids.shape == (3, 4)


# ---------------------------------------------------------------------------------------
# threshold decoding


def test_threshold_confident_model_needs_one_call_per_block():
    target = torch.tensor([1, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    rec = Recorder(Oracle(target, torch.full((10,), 0.99)))
    out = generate_threshold(rec, torch.tensor([[1, 1]]), gen_length=8, block_length=4, mask_id=M, threshold=0.9)
    assert out.model_calls == 2 == len(rec.calls)
    assert torch.equal(out.canvas[0, 2:], target[2:])


def test_threshold_reveals_above_threshold_or_at_least_the_best():
    target = torch.arange(14) % V
    conf = torch.tensor([0.5, 0.5, 0.95, 0.3, 0.92, 0.4, 0.2, 0.25, 0.96, 0.97, 0.98, 0.99])
    conf = torch.cat([conf, torch.tensor([0.5, 0.5])])
    prompt = torch.tensor([[0, 0], [3, 4]])
    rec = Recorder(Oracle(target, conf))
    out = generate_threshold(rec, prompt, gen_length=12, block_length=6, mask_id=M, threshold=0.9)
    history = canvases(rec, out)
    for before, after in zip(history[:-1], history[1:]):
        revealed = (before == M) & (after != M)
        assert (revealed.sum(1) >= 1).all()
    first = (history[0] == M) & (history[1] != M)
    assert first[0].nonzero().flatten().tolist() == [2, 4]  # both above 0.9
    # block 1: {2,4} then 5, 3, 7, 6 one at a time; block 2: {8..11} then 12, 13
    assert out.model_calls == 5 + 3 == len(rec.calls)
    assert (out.canvas != M).all() and torch.equal(out.canvas[:, 2:], target[2:].expand(2, -1))


def test_threshold_one_is_sequential():
    oracle = Oracle(torch.zeros(9, dtype=torch.long), torch.full((9,), 0.99))
    out = generate_threshold(oracle, torch.tensor([[1]]), gen_length=8, block_length=4, mask_id=M, threshold=1.0)
    assert out.model_calls == 8


# ---------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gen_length=10, block_length=4), "gen_length=10 must be a positive multiple of block_length=4"),
        (dict(block_length=0), "block_length=0"),
        (dict(steps=3), "steps=3 must be a positive multiple of the number of blocks 2"),
        (dict(steps=1), "steps=1"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(cfg_scale=-1.0), "cfg_scale must be >= 0"),
        (dict(remasking="threshold"), "remasking='threshold' is unknown; allowed: low_confidence, random"),
        (dict(forbid_eos=True), "forbid_eos=True needs eos_id"),
        (dict(attention_mask=torch.ones(3, 2, dtype=torch.bool)), "attention_mask must have the prompt's shape"),
        (dict(gen_length=0, block_length=1), "gen_length must be >= 1"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    base = dict(gen_length=8, steps=4, block_length=4, mask_id=M)
    with pytest.raises(ValueError, match=match):
        generate(LinearModel(), prompt_batch(), **{**base, **kwargs})


def test_prompt_with_mask_id_and_bad_logits_rejected():
    prompt = prompt_batch()
    prompt[1, 2] = M
    with pytest.raises(ValueError, match="prompt contains the mask id 7"):
        generate(LinearModel(), prompt, gen_length=4, steps=4, block_length=4, mask_id=M)
    with pytest.raises(ValueError, match="prompt must be an integer tensor"):
        generate(LinearModel(), prompt.float(), gen_length=4, steps=4, block_length=4, mask_id=M)
    with pytest.raises(ValueError, match="model must return logits of shape"):
        generate(lambda ids: ids.float(), prompt_batch(), gen_length=4, steps=4, block_length=4, mask_id=M)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.01])
def test_threshold_out_of_range_rejected(threshold):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        generate_threshold(
            LinearModel(), prompt_batch(), gen_length=4, block_length=4, mask_id=M, threshold=threshold
        )
    with pytest.raises(ValueError, match="gen_length=6 must be a positive multiple of block_length=4"):
        generate_threshold(LinearModel(), prompt_batch(), gen_length=6, block_length=4, mask_id=M)


def test_reveal_counts_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        reveal_counts(torch.tensor([3]), 0)


# ---------------------------------------------------------------------------------------
# end to end with the real backbone


def test_real_backbone_left_padded_batch():
    from lldiff.config import ModelConfig
    from lldiff.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=32, n_heads=2, d_ff=64, vocab_size=11, max_seq_len=64, attention="bidirectional")
    model = Transformer(cfg).eval()
    prompt = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    for fn, kw in [(generate, dict(steps=4)), (generate_threshold, dict(threshold=0.5))]:
        out = fn(model, prompt, gen_length=8, block_length=4, mask_id=cfg.mask_id, attention_mask=mask,
                 cfg_scale=0.5, eos_id=10, forbid_eos=True, **kw)
        assert out.canvas.shape == (2, 12)
        assert torch.equal(out.canvas[:, :4], prompt)
        answer = out.canvas[:, 4:]
        assert ((answer >= 0) & (answer < 11) & (answer != 10)).all()
        assert len(out.answer()) == 2
    assert math.isfinite(out.seconds)
    assert SampleOutput is type(out)


# ---------------------------------------------------------------------------------------
# agreement with a transcription of LLaDA's reference sampler (greedy, so no RNG involved)


def upstream_generate(model, prompt, steps, gen_length, block_length, cfg_scale, mask_id, attention_mask):
    """LLaDA ``generate.py`` (temperature 0, low_confidence), transcribed; the model takes
    (ids, mask). Its CFG needs an attention mask, so the tests always pass one."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    attention_mask = torch.cat([attention_mask, torch.ones(prompt.shape[0], gen_length, dtype=torch.bool)], -1)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for nb in range(num_blocks):
        s0, s1 = prompt.shape[1] + nb * block_length, prompt.shape[1] + (nb + 1) * block_length
        num_transfer = reveal_counts((x[:, s0:s1] == mask_id).sum(1), steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x]), torch.cat([attention_mask, attention_mask]))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask)
            x0 = torch.argmax(logits, dim=-1)
            x0_p = torch.gather(torch.softmax(logits, -1), -1, x0[..., None]).squeeze(-1)
            x0_p[:, s1:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer[j, select] = True
            x[transfer] = x0[transfer]
    return x


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
@pytest.mark.parametrize("gen_length,block_length,steps", [(12, 4, 6), (12, 12, 12), (8, 2, 4)])
def test_matches_llada_reference_sampler(cfg_scale, gen_length, block_length, steps):
    prompt = prompt_batch(b=4, p=5, seed=7)
    full = torch.ones_like(prompt, dtype=torch.bool)
    for seed in range(3):
        model = LinearModel(seed=seed)
        ours = generate(model, prompt, gen_length=gen_length, steps=steps, block_length=block_length,
                        mask_id=M, cfg_scale=cfg_scale, attention_mask=full).canvas
        ref = upstream_generate(model, prompt, steps, gen_length, block_length, cfg_scale, M, full)
        assert torch.equal(ours, ref)


# ---------------------------------------------------------------------------------------
# infilling: masks anywhere in the canvas


def test_infill_with_a_masked_suffix_is_generate_with_one_block_and_one_token_per_step():
    model = LinearModel(seed=3)
    prompt = prompt_batch(b=4, p=5, seed=2)
    reference = generate(model, prompt, gen_length=6, steps=6, block_length=6, mask_id=M)
    canvas = torch.cat([prompt, torch.full((4, 6), M)], dim=1)
    assert torch.equal(infill(model, canvas, mask_id=M), reference.canvas)


def test_infill_fills_only_the_masks_most_confident_first_each_row_at_its_own_pace():
    target = torch.tensor([1, 2, 3, 4, 5, 6])
    rec = Recorder(Oracle(target, [0.9, 0.3, 0.8, 0.5, 0.95, 0.6]))
    canvas = torch.tensor([[0, M, M, 3, M, 5], [M, 6, 6, 6, 6, M]])
    out = infill(rec, canvas, mask_id=M)
    assert torch.equal(out, torch.tensor([[0, 2, 3, 3, 5, 5], [1, 6, 6, 6, 6, 6]]))
    assert len(rec.calls) == 3  # the row with the most masks sets the number of calls
    # row 0 reveals position 4 (0.95), then 2 (0.8), then 1 (0.3); row 1 reveals 0 (0.9), then 5, then nothing
    steps = [ids[0].tolist() for ids, _ in rec.calls]
    assert steps[1] == [0, M, M, 3, 5, 5] and steps[2] == [0, M, 3, 3, 5, 5]
    assert rec.calls[1][0][1].tolist() == [1, 6, 6, 6, 6, M] and rec.calls[2][0][1].tolist() == [1, 6, 6, 6, 6, 6]


def test_infill_without_masks_calls_nothing_and_rejects_floats():
    rec = Recorder(LinearModel())
    canvas = prompt_batch()
    assert torch.equal(infill(rec, canvas, mask_id=M), canvas) and not rec.calls
    with pytest.raises(ValueError, match="integer tensor"):
        infill(rec, canvas.float(), mask_id=M)
