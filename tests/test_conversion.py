"""Conversion of an AR run into an MDM or BD3 (SPEC §14, issue 23 step 1): an ordinary fit
whose weights start from the AR's, every weight copied exactly, the mask row as documented."""

import lightning as L
import pytest
import torch

from lldiff.objectives.bd3.modules import BlockDiffusionLM
from lldiff.objectives.mdm.modules import MaskedDiffusionLM


def _ar_weights(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
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


def test_a_converted_fit_records_its_objective_and_source_and_resumes_bit_for_bit(tiny_runs, toy_corpus, cache_dir,
                                                                                  tmp_path):
    """Crash after step 7, resume from the step-5 checkpoint: the final weights (and the mask row,
    which trains) equal an uninterrupted conversion's bit for bit; each checkpoint records the
    objective of its steps (mdm) and the AR run its weights came from."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lldiff.data import PretrainDataModule

    def run(dirpath, callbacks=(), ckpt_path=None):
        L.seed_everything(0, verbose=False)
        data = PretrainDataModule(source="files", paths=[str(toy_corpus)], max_bytes=None, vocab_size=320, seq_len=32,
                                  batch_size=8, cache_dir=str(cache_dir), seed=1234)
        model = MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320, lr=2e-3, warmup_steps=2,
                                  random_length_prob=0.5)
        ckpt = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_last=True, save_top_k=0)
        trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[ckpt, *callbacks])
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    reference = run(tmp_path / "a")
    meta = torch.load(tmp_path / "a" / "last.ckpt", map_location="cpu", weights_only=False)["lldiff"]
    assert meta["objective"]["family"] == "mdm"
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

    state = torch.load(tiny_runs["ar"], map_location="cpu", weights_only=False)
    sharded = tmp_path / "sharded.ckpt"
    dcp.save({"state_dict": state["state_dict"]}, checkpoint_id=str(sharded), no_dist=True)
    torch.save({k: v for k, v in state.items() if k != "state_dict"}, sharded / "meta.pt")
    full = MaskedDiffusionLM(init_from=str(tiny_runs["ar"]), vocab_size=320).model.state_dict()
    from_shards = MaskedDiffusionLM(init_from=str(sharded), vocab_size=320).model.state_dict()
    for key, value in full.items():
        assert torch.equal(from_shards[key], value), key
