"""SFT objectives against the math: the prompt is never masked nor scored, EOS padding is."""

import math

import pytest
import torch
from lldiff.objectives.ar.loss import ar_sft_loss
from lldiff.objectives.common.masking import forward_mask, sample_mask_ratio
from lldiff.objectives.common.sft_loss import drop_prompts
from lldiff.objectives.mdm.loss import mdm_sft_loss



class Recorder(torch.nn.Module):
    """Fixed per-position logits; records the inputs it is given."""

    def __init__(self, logits):
        super().__init__()
        self.fixed, self.inputs = logits, []

    def forward(self, ids):
        self.inputs.append(ids.clone())
        return self.fixed.expand(ids.shape[0], -1, -1)


def batch():
    tokens = torch.tensor([[5, 6, 7, 1, 2, 0, 0], [5, 6, 1, 2, 3, 4, 0]])  # 0 = EOS padding
    response = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return tokens, response


def test_prompt_is_never_masked():
    tokens, response = batch()
    model = Recorder(torch.zeros(1, 7, 8))
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        mdm_sft_loss(model, tokens, response, mask_id=8, generator=g)
    seen = torch.stack(model.inputs)
    assert (seen[:, ~response] == tokens[~response]).all()  # prompt always clean
    assert (seen[:, response] == 8).any()  # responses do get masked


def test_prompt_is_never_in_the_loss_and_eos_padding_is():
    tokens, response = batch()
    logits = torch.randn(1, 7, 8)
    changed = logits.clone()
    changed[:, ~response[0]] += torch.randn(1, int((~response[0]).sum()), 8) * 5  # garbage at prompt positions
    a, b = (mdm_sft_loss(Recorder(x), tokens[:1], response[:1], 8, generator=torch.Generator().manual_seed(1))
            for x in (logits, changed))
    assert a == b
    eos_changed = logits.clone()
    eos_changed[0, 5:, 0] -= 10  # make the EOS padding targets unlikely
    losses = [mdm_sft_loss(Recorder(x), tokens[:1], response[:1], 8, eps=0.999,
                                      generator=torch.Generator().manual_seed(2)) for x in (logits, eos_changed)]
    assert losses[1] > losses[0]  # EOS padding is part of the target


def _hand_computed(tokens, response, logits, t, masked):
    ce = -torch.log_softmax(logits.expand(tokens.shape[0], -1, -1), -1).gather(-1, tokens[..., None])[..., 0]
    per_example = (ce * masked).sum(1) / t
    return per_example, response.sum(1)


@pytest.mark.parametrize("normalisation", ["response_length", "token"])
def test_normalisations_match_hand_computation(normalisation):
    tokens, response = batch()
    logits = torch.randn(1, 7, 8)
    g = torch.Generator().manual_seed(3)
    loss = mdm_sft_loss(Recorder(logits), tokens, response, 8, normalisation=normalisation, generator=g)
    g = torch.Generator().manual_seed(3)  # replay the same draws
    t = sample_mask_ratio(2, generator=g)
    _, masked = forward_mask(tokens, t, 8, maskable=response, generator=g)
    per_example, lengths = _hand_computed(tokens, response, logits, t, masked)
    expected = (per_example / lengths).mean() if normalisation == "response_length" else per_example.sum() / lengths.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sft_loss_expectation_is_response_cross_entropy():
    """For input-independent logits the expectation over t and masks is the mean per-token CE
    of the response (as for pre-training: P(masked | t) / t = 1)."""
    tokens, response = batch()
    probs = torch.softmax(torch.randn(8), -1)
    model = Recorder(probs.log().expand(1, 7, 8))
    ce = -probs.log()[tokens]
    exact = ((ce * response).sum(1) / response.sum(1)).mean().item()
    g = torch.Generator().manual_seed(4)
    draws = torch.stack([mdm_sft_loss(model, tokens, response, 8, generator=g) for _ in range(4000)])
    sem = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - exact) < 5 * sem + 1e-4


def test_ar_sft_loss_scores_response_tokens_only():
    tokens, response = batch()
    logits = torch.randn(1, 6, 8)
    loss = ar_sft_loss(Recorder(logits), tokens, response)
    nll = -torch.log_softmax(logits.expand(2, -1, -1), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    expected = (nll * response[:, 1:]).sum() / response[:, 1:].sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_sft_input():
    tokens, response = batch()
    with pytest.raises(ValueError, match="normalisation='mean'"):
        mdm_sft_loss(Recorder(torch.zeros(1, 7, 8)), tokens, response, 8, normalisation="mean")
    with pytest.raises(ValueError, match="at least one response token"):
        mdm_sft_loss(Recorder(torch.zeros(1, 7, 8)), tokens, torch.zeros_like(response), 8)


def test_prompt_dropout_hides_whole_prompts_from_the_input_only():
    tokens, response = batch()
    model = Recorder(torch.zeros(1, 7, 8))
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        loss = mdm_sft_loss(model, tokens, response, mask_id=8, prompt_dropout=0.25, generator=g)
        assert torch.isfinite(loss)  # the targets are still the clean tokens
    seen = torch.stack(model.inputs)  # (draws, B, L)
    prompt_hidden = (seen == 8) | response  # per example: all prompt positions masked, or none
    whole = prompt_hidden.all(dim=2)
    none = ((seen == 8) & ~response).sum(dim=2) == 0
    assert bool((whole | none).all())
    assert 0.17 < whole.float().mean() < 0.33  # about prompt_dropout of the examples
    assert drop_prompts(tokens, response, 8, 0.0) is tokens
