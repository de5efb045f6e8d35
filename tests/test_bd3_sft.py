"""BD3 supervised fine-tuning against the math: the prompt is never masked (in either half of
``[x_t ⊕ x_0]``), the loss is an unbiased estimate of the response cross-entropy, one block
(``block_size >= L``) is exactly the MDM's SFT, and a BD3 checkpoint fine-tunes with its own
block size (other objectives and block sizes are refused by name)."""

import math
from pathlib import Path

import pytest
import torch

from lldiff import objectives as registry
from lldiff.objectives.bd3 import loss as block_diffusion
from lldiff.checkpoint import load_model
from lldiff.objectives.bd3.loss import bd3_sft_loss
from lldiff.objectives.ar.modules import AutoregressiveSFT
from lldiff.objectives.bd3.modules import BlockDiffusionSFT
from lldiff.objectives.mdm.modules import MaskedDiffusionSFT
from lldiff.objectives.common.finetuning import pretrained_shape

REPO = Path(__file__).resolve().parents[1]
MASK = 8  # vocabulary 0..7, the mask token is id 8


class Recorder(torch.nn.Module):
    """Fixed per-position logits on both halves; records every ``[x_t ⊕ x_0]`` it is given."""

    def __init__(self, logits):
        super().__init__()
        self.fixed, self.inputs = logits, []

    def forward(self, ids, attention_mask=None, positions=None, attn_mask=None):
        self.inputs.append(ids.clone())
        return self.fixed.expand(ids.shape[0], -1, -1).repeat(1, 2, 1)


def batch():
    tokens = torch.tensor([[5, 6, 7, 1, 2, 0, 0], [5, 6, 1, 2, 3, 4, 0]])  # 0 = EOS padding
    response = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return tokens, response


@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 16])
def test_prompt_is_never_masked_and_each_response_token_with_probability_mean_t(block_size):
    """Over many draws: no prompt position of x_t is ever masked, the clean half x_0 is the
    clean row, every response position is masked sometimes, and a response token is masked
    with probability E[t] = (1 + eps) / 2 (the ratio of its block is U[eps, 1])."""
    tokens, response = batch()
    model = Recorder(torch.zeros(1, 7, MASK))
    g = torch.Generator().manual_seed(0)
    eps = 0.2
    for _ in range(600):
        bd3_sft_loss(model, tokens, response, MASK, block_size, eps=eps, generator=g)
    seen = torch.stack(model.inputs)  # (draws, B, 2L)
    xt, x0 = seen[..., :7], seen[..., 7:]
    assert bool((xt[:, ~response] == tokens[~response]).all())  # the prompt: always clean
    assert bool((x0 == tokens).all())  # the context half: always the clean row
    masked = xt == MASK
    assert bool(masked.any(dim=0)[response].all())  # every response position is masked sometimes
    assert masked[:, response].float().mean().item() == pytest.approx((1 + eps) / 2, abs=0.03)


def test_prompt_dropout_hides_the_whole_prompt_in_both_halves():
    tokens, response = batch()
    model = Recorder(torch.zeros(1, 7, MASK))
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        assert torch.isfinite(bd3_sft_loss(model, tokens, response, MASK, 2, prompt_dropout=0.25, generator=g))
    seen = torch.stack(model.inputs)
    xt, x0 = seen[..., :7], seen[..., 7:]
    dropped = (x0[:, ~response] == MASK).view(len(seen), -1)
    per_row = torch.stack([(x0[:, i][:, ~response[i]] == MASK).all(dim=1) for i in range(2)], dim=1)
    kept = torch.stack([(x0[:, i][:, ~response[i]] == tokens[i][~response[i]]).all(dim=1) for i in range(2)], dim=1)
    assert bool((per_row | kept).all()) and dropped.any()  # a prompt is hidden whole or not at all
    for i in range(2):  # the same prompts are hidden in x_t, the response half of x_0 stays clean
        assert bool((xt[:, i][:, ~response[i]] == x0[:, i][:, ~response[i]]).all())
        assert bool((x0[:, i][:, response[i]] == tokens[i][response[i]]).all())
    assert 0.17 < per_row.float().mean().item() < 0.33  # about prompt_dropout of the examples


@pytest.mark.parametrize("block_size", [2, 3])
def test_loss_expectation_is_the_response_cross_entropy(block_size):
    """For input-independent logits, E over (t_b, masks) of sum_{masked} CE / t_b = sum of the
    response's CE (P(masked | t_b) / t_b = 1 for every token, whatever its block)."""
    tokens, response = batch()
    probs = torch.softmax(torch.randn(MASK, generator=torch.Generator().manual_seed(2)), -1)
    model = Recorder(probs.log().expand(1, 7, MASK))
    ce = -probs.log()[tokens]
    exact = {"response_length": ((ce * response).sum(1) / response.sum(1)).mean().item(),
             "token": ((ce * response).sum() / response.sum()).item()}
    for normalisation, value in exact.items():
        g = torch.Generator().manual_seed(3)
        draws = torch.stack([bd3_sft_loss(model, tokens, response, MASK, block_size, normalisation=normalisation,
                                          eps=0.05, generator=g) for _ in range(1500)])
        sem = draws.std().item() / math.sqrt(len(draws))
        assert abs(draws.mean().item() - value) < 5 * sem + 1e-4, normalisation


def _pair(block_size, **kwargs):
    """An MDM SFT module and a BD3 one with the same weights (the backbones' parameters are the same)."""
    torch.manual_seed(0)
    args = dict(size="tiny-0.016M", vocab_size=MASK, val_mc_samples=4, eval_mc_samples=4, **kwargs)
    mdm, bd3 = MaskedDiffusionSFT(**args), BlockDiffusionSFT(block_size=block_size, **args)
    bd3.model.load_state_dict(mdm.model.state_dict())
    return mdm, bd3


@pytest.mark.parametrize("block_size", [7, 8, 64])
@pytest.mark.parametrize("normalisation,dropout", [("response_length", 0.0), ("token", 0.0), ("response_length", 0.5)])
def test_one_block_is_the_masked_diffusion_sft(block_size, normalisation, dropout):
    """block_size >= L: one block, one ratio per row, x_t attends only itself: the same draws
    give the same masks and the same loss as MaskedDiffusionSFT, and the same validation bound."""
    tokens, response = batch()
    mdm, bd3 = _pair(block_size, normalisation=normalisation, prompt_dropout=dropout)
    for seed in range(4):
        torch.manual_seed(seed)
        a = mdm.sft_loss(tokens, response)
        torch.manual_seed(seed)
        b = bd3.sft_loss(tokens, response)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bd3.response_nats(tokens, response, 3), mdm.response_nats(tokens, response, 3),
                               rtol=1e-5, atol=1e-5)


def test_smaller_blocks_are_another_objective():
    """The equality above is not vacuous: with blocks of 2 the same seeds give other losses."""
    tokens, response = batch()
    mdm, bd3 = _pair(2)
    differ = []
    for seed in range(4):
        torch.manual_seed(seed)
        a = mdm.sft_loss(tokens, response)
        torch.manual_seed(seed)
        differ.append(not torch.isclose(bd3.sft_loss(tokens, response), a, rtol=1e-4))
    assert any(differ)


def test_normalisation_and_block_ratios_match_a_hand_computation():
    tokens, response = batch()
    logits = torch.randn(1, 7, MASK, generator=torch.Generator().manual_seed(5))
    for normalisation in ("response_length", "token"):
        g = torch.Generator().manual_seed(6)
        loss = bd3_sft_loss(Recorder(logits), tokens, response, MASK, 3, normalisation=normalisation, generator=g)
        g = torch.Generator().manual_seed(6)  # replay: one ratio per (row, block of 3), then one uniform per token
        t = block_diffusion.sample_block_mask_ratios(2, 3, generator=g)
        masked = (torch.rand(tokens.shape, generator=g) < t[:, torch.arange(7) // 3]) & response
        ce = -torch.log_softmax(logits.expand(2, -1, -1), -1).gather(-1, tokens[..., None])[..., 0]
        per_example = (ce * masked / t[:, torch.arange(7) // 3]).sum(1)
        lengths = response.sum(1)
        expected = (per_example / lengths).mean() if normalisation == "response_length" else per_example.sum() / lengths.sum()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_input_is_named():
    tokens, response = batch()
    model = Recorder(torch.zeros(1, 7, MASK))
    with pytest.raises(ValueError, match="normalisation='mean'; allowed: response_length, token"):
        bd3_sft_loss(model, tokens, response, MASK, 2, normalisation="mean")
    with pytest.raises(ValueError, match="at least one response token"):
        bd3_sft_loss(model, tokens, torch.zeros_like(response), MASK, 2)
    with pytest.raises(ValueError, match="block_size must be a positive integer or null"):
        BlockDiffusionSFT(size="tiny-0.016M", vocab_size=MASK, block_size=0)
    with pytest.raises(ValueError, match=r"prompt_dropout must be in \[0, 1\)"):
        BlockDiffusionSFT(size="tiny-0.016M", vocab_size=MASK, prompt_dropout=1.0)


def test_checkpoints_from_before_the_attention_kind_are_read():
    """A stored model config with ``causal`` (before the registry) is read by its objective."""
    old = dict(name="tiny-0.016M", n_layer=1, d_model=32, n_heads=2, n_kv_heads=None, d_ff=128, vocab_size=64,
               max_seq_len=1024, rope_base=10_000.0, norm_eps=1e-5, causal=False, attn_backend="sdpa")
    size, overrides = pretrained_shape("old.ckpt", old, registry.get("mdm"), 64, None, None)
    assert size == "tiny-0.016M" and not {"causal", "attention", "block_size", "mask_id"} & set(overrides)
    with pytest.raises(ValueError, match=r"holds an MDM model \(bidirectional attention\); this fine-tuning module "
                                         r"needs a BD3-4 one \(block attention"):
        pretrained_shape("old.ckpt", old, registry.get("bd3-4"), 64, None, None)
    with pytest.raises(ValueError, match="holds an AR model"):
        pretrained_shape("old.ckpt", {**old, "causal": True}, registry.get("mdm"), 64, None, None)


# --------------------------------------------------------------------------- from a BD3 checkpoint


@pytest.fixture(scope="module")
def bd3_run(toy_corpus, cache_dir, tmp_path_factory):
    """A tiny BD3 pre-trained with the shipped configs/bd3-tiny.yaml (block_size 8)."""
    from lldiff.launch import lightning_cli

    out = tmp_path_factory.mktemp("bd3-run")
    lightning_cli([
        "fit", "--config", str(REPO / "configs" / "bd3-tiny.yaml"),
        "--model.init_args.size", "tiny-0.016M", "--model.init_args.warmup_steps", "2",
        "--model.init_args.random_length_prob", "0.0", "--model.init_args.val_mc_samples", "2",
        "--data.init_args.source", "files", "--data.init_args.paths", f"[{toy_corpus}]",
        "--data.init_args.max_bytes", "null", "--data.init_args.vocab_size", "320",
        "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "8", "--data.init_args.val_max_rows", "8",
        "--data.init_args.cache_dir", str(cache_dir), "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out),
    ])
    return out / "bd3-tiny" / "checkpoints" / "last.ckpt"


def test_bd3_sft_takes_the_checkpoints_block_size_and_weights(bd3_run):
    loaded = load_model(bd3_run)
    assert loaded.objective.name == "bd3-8" and loaded.config.block_size == 8
    vocab = loaded.config.vocab_size
    fresh = BlockDiffusionSFT(init_from=str(bd3_run), vocab_size=vocab)
    assert fresh.config.block_size == 8 and fresh.objective.name == "bd3-8" and fresh.config.name == "tiny-0.016M"
    assert fresh.hparams.block_size == 8  # recorded resolved: the run's config.yaml rebuilds the same model
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    assert BlockDiffusionSFT(init_from=str(bd3_run), vocab_size=vocab, block_size=8).config.block_size == 8
    with pytest.raises(ValueError, match="block_size=4 but init_from .* holds a BD3-8 model .*leave block_size unset"):
        BlockDiffusionSFT(init_from=str(bd3_run), vocab_size=vocab, block_size=4)
    with pytest.raises(ValueError, match=r"holds a BD3-8 model \(block attention\); this fine-tuning module needs an MDM"):
        MaskedDiffusionSFT(init_from=str(bd3_run), vocab_size=vocab)
    with pytest.raises(ValueError, match="holds a BD3-8 model .*needs an AR"):
        AutoregressiveSFT(init_from=str(bd3_run), vocab_size=vocab)


def test_bd3_sft_refuses_other_objectives_checkpoints(tiny_runs):
    mdm = str(tiny_runs["mdm"])
    vocab = load_model(mdm).config.vocab_size
    with pytest.raises(ValueError, match=r"holds an MDM model \(bidirectional attention\); this fine-tuning module "
                                         r"needs a BD3-16 one"):
        BlockDiffusionSFT(init_from=mdm, vocab_size=vocab)


def test_finetune_a_bd3_with_the_shipped_config(bd3_run, tmp_path):
    import json
    import random

    from lldiff.launch import lightning_cli
    from lldiff.sweep.figures import read_scalars

    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    records = [{"prompt": " ".join(rng.sample(words, 3)), "response": " ".join(rng.sample(words, 2))} for _ in range(48)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cli = lightning_cli([
        "fit", "--config", str(REPO / "configs" / "sft-bd3-tiny.yaml"),
        "--model.init_args.init_from", str(bd3_run), "--data.init_args.tokenizer_path", str(bd3_run.parent.parent),
        "--data.init_args.train_files", f"[{data}]", "--data.init_args.max_length", "32",
        "--data.init_args.batch_size", "8", "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
        "--trainer.log_every_n_steps", "2", "--model.init_args.warmup_steps", "2", "--model.init_args.val_mc_samples", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    assert cli.trainer.global_step == 6 and cli.model.config.block_size == 8
    ckpt = tmp_path / "sft-bd3-tiny" / "checkpoints" / "last.ckpt"
    assert load_model(ckpt).objective.name == "bd3-8"
    scalars = read_scalars(ckpt.parent.parent)
    (nll,) = scalars["val/nll_per_token"].values()
    assert 0 < nll < 50 and scalars["train/loss"]
    # the real matmul FLOPs count BD3's 2L-token forward: per token 2 (6 (N + d V) + 12 n_layer 2w d) at batch
    # width w <= 32, against 6 (N + d V) + 12 n_layer w d for one copy
    cfg, step = cli.model.config, max(scalars["trainer/flops_matmul"])
    flops, tokens = scalars["trainer/flops_matmul"][step], scalars["trainer/tokens"][step]
    linear = 6 * (cfg.non_embedding_params() + cfg.d_model * cfg.vocab_size)
    assert 2 * linear * tokens < flops <= 2 * (linear + 12 * cfg.n_layer * 64 * cfg.d_model) * tokens
