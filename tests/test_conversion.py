"""Conversion of an AR run into an MDM or BD3 (SPEC §14, issue 23 step 1): an ordinary fit
whose weights start from the AR's, every weight copied exactly, the mask row as documented."""

import lightning as L
import pytest
import torch

from lldiff.checkpoint import load_model
from lldiff.objectives.bd3.modules import BlockDiffusionLM
from lldiff.objectives.mdm.modules import MaskedDiffusionLM


def _ar_weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}


@pytest.mark.parametrize("module, extra", [(MaskedDiffusionLM, {}), (BlockDiffusionLM, {"block_size": 4})])
@pytest.mark.parametrize("mask_init", ["mean", "zeros"])
def test_init_from_an_ar_run_copies_every_weight_exactly(tiny_runs, module, extra, mask_init):
    ar = _ar_weights(tiny_runs["ar"])
    converted = module(init_from=str(tiny_runs["ar"]), vocab_size=320, mask_init=mask_init, **extra)
    own = converted.model.state_dict()
    assert set(own) == set(ar)
    for key, value in ar.items():
        if key == "embed.weight":
            V = value.shape[0]
            assert own[key].shape[0] == V + 1 and converted.mask_id == V
            assert torch.equal(own[key][:V], value)
            expected = value.mean(0) if mask_init == "mean" else torch.zeros_like(value[0])
            assert torch.equal(own[key][V], expected)
        else:
            assert torch.equal(own[key], value), key
    assert converted.config.name == "tiny-0.1M" and converted.objective.family.name == module.family.name


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 7:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("module, extra, family", [
    (MaskedDiffusionLM, {"anneal_steps": 8}, "mdm"),  # resumed mid-annealing
    (BlockDiffusionLM, {"block_size": 4, "block_schedule": [[0, 1], [3, 32], [6, 4]]}, "bd3"),  # mid-schedule
])
def test_a_converted_fit_records_its_objective_and_source_and_resumes_bit_for_bit(module, extra, family, tiny_runs,
                                                                                  toy_corpus, cache_dir, tmp_path):
    """Crash after step 7, resume from the step-5 checkpoint: the final weights (and the mask row,
    which trains) equal an uninterrupted conversion's bit for bit; each checkpoint records the
    objective of its steps (mdm) and the AR run its weights came from."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lldiff.data import PretrainDataModule

    def run(dirpath, callbacks=(), ckpt_path=None):
        L.seed_everything(0, verbose=False)
        data = PretrainDataModule(source="files", paths=[str(toy_corpus)], max_bytes=None, vocab_size=320, seq_len=32,
                                  batch_size=8, cache_dir=str(cache_dir), seed=1234)
        model = module(init_from=str(tiny_runs["ar"]), vocab_size=320, lr=2e-3, warmup_steps=2,
                       random_length_prob=0.5, **extra)
        ckpt = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_last=True, save_top_k=0)
        trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[ckpt, *callbacks])
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    reference = run(tmp_path / "a")
    meta = torch.load(tmp_path / "a" / "last.ckpt", map_location="cpu", weights_only=True)["lldiff"]
    assert meta["objective"]["family"] == family
    assert meta["converted_from"]["objective"]["family"] == "ar" and meta["converted_from"]["mask_init"] == "mean"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", callbacks=[_Crash()])
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    ar = _ar_weights(tiny_runs["ar"])
    assert not torch.equal(reference.model.state_dict()["head.weight"], ar["head.weight"])  # it trained
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_non_ar_source_is_refused_before_any_work(tiny_runs):
    with pytest.raises(ValueError, match="holds an MDM model; an MDM conversion starts from a run of: ar"):
        MaskedDiffusionLM(init_from=str(tiny_runs["mdm"]), vocab_size=320)


def test_another_shape_or_vocabulary_is_refused(tiny_runs):
    with pytest.raises(ValueError, match="vocab_size=320 but the tokenizer has 300"):
        MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=300)
    with pytest.raises(ValueError, match="does not match the init_from checkpoint"):
        MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320, size="tiny-1M")
    with pytest.raises(ValueError, match="would change the pre-trained shape"):
        MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320, model_overrides={"n_layer": 1})
    with pytest.raises(ValueError, match="mask_init='bos'; allowed: mean, zeros, random"):
        MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320, mask_init="bos")


def test_a_sharded_ar_checkpoint_converts_like_its_full_file(tiny_runs, tmp_path):
    """The DCP shards of the AR run give the same converted weights as its full file."""
    import torch.distributed.checkpoint as dcp

    state = torch.load(tiny_runs["ar"], map_location="cpu", weights_only=True)
    sharded = tmp_path / "sharded.ckpt"
    dcp.save({"state_dict": state["state_dict"]}, checkpoint_id=str(sharded), no_dist=True)
    torch.save({k: v for k, v in state.items() if k != "state_dict"}, sharded / "meta.pt")
    full = MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320).model.state_dict()
    from_shards = MaskedDiffusionLM(init_from=str(sharded), vocab_size=320).model.state_dict()
    for key, value in full.items():
        assert torch.equal(from_shards[key], value), key


def test_annealed_mask_is_causal_at_zero_and_full_at_one_and_opens_the_given_fraction():
    from lldiff.objectives.common.annealing import annealed_mask, opened_fraction

    g = torch.Generator().manual_seed(0)
    assert torch.equal(annealed_mask(16, 0.0, generator=g), torch.ones(16, 16, dtype=torch.bool).tril())
    assert annealed_mask(16, 1.0, generator=g).all()
    mask = annealed_mask(256, 0.3, generator=g)
    future = torch.ones(256, 256, dtype=torch.bool).triu(1)
    assert mask[~future].all() and abs(mask[future].float().mean().item() - 0.3) < 0.01
    assert [opened_fraction(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0] and opened_fraction(0, 0) == 1.0


def test_annealing_at_zero_is_the_ar_and_at_one_the_bidirectional_model(tiny_runs):
    """The converted model under the 0%-opened mask computes the AR's own causal logits (same
    weights, same tokens, no mask token in the input); under the 100%-opened mask, its plain
    bidirectional forward."""
    from lldiff.objectives.common.annealing import annealed_mask

    ar = load_model(tiny_runs["ar"]).model.eval()
    converted = MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320).model.eval()
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        closed = converted(tokens, attn_mask=annealed_mask(24, 0.0))
        opened = converted(tokens, attn_mask=annealed_mask(24, 1.0))
        torch.testing.assert_close(closed, ar(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(opened, converted(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(closed, opened, atol=1e-3)


def test_annealing_is_an_mdm_option_and_refused_for_bd3_and_bad_values():
    with pytest.raises(ValueError, match="anneal_steps must be an integer >= 0"):
        MaskedDiffusionLM(size="tiny-0.1M", vocab_size=320, anneal_steps=-1)
    with pytest.raises(ValueError, match="anneal_steps applies to an MDM conversion"):
        BlockDiffusionLM(size="tiny-0.1M", vocab_size=320, block_size=4, anneal_steps=5)


def test_the_training_loss_at_step_zero_of_an_annealed_conversion_is_the_causal_one(tiny_runs):
    from lldiff.objectives.mdm.loss import mdm_loss

    module = MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320, anneal_steps=10)
    rows = torch.randint(0, 320, (4, 17), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    annealed = module.loss(rows)
    torch.manual_seed(5)
    causal = mdm_loss(module, rows[:, 1:], module.mask_id, attn_mask=torch.ones(16, 16, dtype=torch.bool).tril())
    torch.manual_seed(5)
    full = mdm_loss(module, rows[:, 1:], module.mask_id)
    assert torch.equal(annealed, causal) and not torch.equal(annealed, full)


def test_block_schedule_phases_and_bad_schedules():
    from lldiff.objectives.common.block_schedule import block_size_at, check_schedule_fits, parse_schedule

    wsd = parse_schedule([[0, 1], [4, 4], [8, 16], [12, 16], [20, 4]])
    assert [block_size_at(wsd, s) for s in (0, 3, 4, 8, 19, 20, 99)] == [1, 1, 4, 16, 16, 4, 4]
    check_schedule_fits(wsd, 16, 30)
    with pytest.raises(ValueError, match=r"sizes \[3\] do not divide seq_len=16"):
        check_schedule_fits(parse_schedule([[0, 3]]), 16, 30)
    with pytest.raises(ValueError, match="last phase starts at step 20, not before max_steps=20"):
        check_schedule_fits(wsd, 16, 20)
    with pytest.raises(ValueError, match="must start at 0 and strictly increase"):
        parse_schedule([[0, 1], [5, 4], [5, 16]])
    with pytest.raises(ValueError, match="integer pairs"):
        parse_schedule([[0, 1.5]])


def test_block_schedule_at_b_equal_l_is_the_mdm_loss_and_validation_stays_the_final_objective(tiny_runs):
    bd3 = BlockDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320, block_size=4,
                           block_schedule=[[0, 16], [5, 4]])
    mdm_module = MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320)  # the same weights
    rows = torch.randint(0, 320, (4, 17), generator=torch.Generator().manual_seed(2))
    assert bd3.training_block_size() == 16 and bd3.config.block_size == 4 and bd3.objective.name == "bd3-4"
    with torch.no_grad():
        torch.manual_seed(7)
        scheduled = bd3.loss(rows)
        torch.manual_seed(7)
        mdm = mdm_module.loss(rows)
    torch.testing.assert_close(scheduled, mdm, rtol=1e-5, atol=1e-6)  # same draws, same math


def test_a_schedule_that_does_not_fit_the_run_is_refused_before_the_first_step(tiny_runs, toy_corpus, cache_dir):
    from lldiff.data import PretrainDataModule

    data = PretrainDataModule(source="files", paths=[str(toy_corpus)], max_bytes=None, vocab_size=320, seq_len=32,
                              batch_size=8, cache_dir=str(cache_dir), seed=1234)
    model = BlockDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320, block_size=4, block_schedule=[[0, 1], [10, 4]])
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="last phase starts at step 10, not before max_steps=10"):
        trainer.fit(model, data)
    assert trainer.global_step == 0


def test_a_block_size_one_phase_is_next_token_prediction(tiny_runs):
    """With blocks of one token the masked token at i is predicted from x_<i alone: its logits
    do not change when any later token changes, and do when an earlier one does."""
    from lldiff.objectives.bd3.loss import bd3_logits

    bd3 = BlockDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320, block_size=4,
                           block_schedule=[[0, 1], [5, 4]])
    assert bd3.training_block_size() == 1
    x0 = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(3))
    xt = torch.full_like(x0, bd3.mask_id)  # every token masked
    later, earlier = x0.clone(), x0.clone()
    later[:, 9:] = (later[:, 9:] + 1) % 320
    earlier[:, 3] = (earlier[:, 3] + 1) % 320
    with torch.no_grad():
        base = bd3_logits(bd3.model, xt, x0, 1, flex=False)
        torch.testing.assert_close(bd3_logits(bd3.model, xt, later, 1, flex=False)[:, :9], base[:, :9], rtol=0, atol=0)
        assert not torch.allclose(bd3_logits(bd3.model, xt, earlier, 1, flex=False)[:, 4], base[:, 4])
