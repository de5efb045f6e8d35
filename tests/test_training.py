"""Training with Lightning: tiny fits learn, identical batches, exact resume, accounting (every
objective: AR, MDM and BD3 block diffusion)."""

import importlib
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lldiff import objectives as registry
from lldiff.data import PretrainDataModule
from lldiff.objectives.mdm.modules import MaskedDiffusionLM

OBJECTIVES = ("ar", "mdm", "bd3-8")  # seq_len 48: six blocks of 8


def make_dm(toy_corpus, cache_dir, **overrides):
    args = dict(source="files", paths=[str(toy_corpus)], vocab_size=320, seq_len=48, batch_size=16,
                val_max_rows=32, cache_dir=str(cache_dir))
    return PretrainDataModule(**{**args, **overrides})


def make_module(name, dm, **overrides):
    objective = registry.get(name)
    module, _, cls = objective.module.rpartition(".")
    args = dict(size="tiny-0.1M", vocab_size=dm.vocab_size_real, lr=3e-3, warmup_steps=2, **objective.module_args())
    if not objective.exact_likelihood:  # a Monte-Carlo bound: few draws keep the tests fast
        args.update(val_mc_samples=4, eval_mc_samples=4)
    return getattr(importlib.import_module(module), cls)(**{**args, **overrides})


def trainer(max_steps, **overrides):
    args = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                val_check_interval=None, check_val_every_n_epoch=None, limit_val_batches=0)
    return L.Trainer(**{**args, **overrides})


def unigram_entropy(dm):
    rows = torch.from_numpy(dm.train_rows.rows[:].astype("int64"))
    p = torch.bincount(rows.flatten(), minlength=dm.vocab_size_real).double()
    p = p[p > 0] / p.sum()
    return -(p * p.log()).sum().item()


@pytest.mark.parametrize("name,ratio", [("ar", 0.25), ("mdm", 0.5), ("bd3-8", 0.25)])
def test_tiny_fit_learns_well_below_unigram_entropy(name, ratio, toy_corpus, cache_dir):
    """Validation loss (BD3, MDM: a bound on the NLL) far below the data's unigram entropy,
    computed from the training rows: the model learned the context, not token frequencies."""
    L.seed_everything(0, verbose=False)
    dm = make_dm(toy_corpus, cache_dir)
    model = make_module(name, dm, warmup_steps=20)
    trainer(400).fit(model, dm)
    nll = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(model, dm, verbose=False)[0]
    dm.setup("fit")
    entropy = unigram_entropy(dm)
    assert nll["val/nll_per_token"] < ratio * entropy, (nll, entropy)
    assert 0 < nll["val/bpb"] < nll["val/nll_per_token"] / math.log(2)  # more than 1 byte per token


class BatchRecorder(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())


def test_mdm_and_ar_receive_identical_batches(toy_corpus, cache_dir):
    recorded = {}
    for i, name in enumerate(OBJECTIVES):
        L.seed_everything(100 + i, verbose=False)  # different global seeds must not matter
        dm = make_dm(toy_corpus, cache_dir, seed=7)
        recorder = BatchRecorder()
        trainer(6, callbacks=[recorder]).fit(make_module(name, dm), dm)
        recorded[name] = recorder.batches
    assert len(recorded["ar"]) == 6
    for name in OBJECTIVES:
        assert len(recorded[name]) == 6 and all(torch.equal(a, m) for a, m in zip(recorded["ar"], recorded[name]))


def test_mdm_and_ar_truncate_the_same_steps_to_the_same_lengths(toy_corpus, cache_dir):
    tokens = {}
    for i, name in enumerate(OBJECTIVES):
        L.seed_everything(i, verbose=False)
        dm = make_dm(toy_corpus, cache_dir)
        model = make_module(name, dm, random_length_prob=0.5)
        trainer(12).fit(model, dm)
        tokens[name] = model.tokens_seen
    assert tokens["ar"] == tokens["mdm"] == tokens["bd3-8"] < 12 * 16 * 48  # some steps were cut, the same ones


def test_both_objectives_score_the_same_validation_tokens(toy_corpus, cache_dir):
    dm = make_dm(toy_corpus, cache_dir)
    dm.setup("validate")
    rows = next(iter(dm.val_dataloader()))["input_ids"]
    _, ar_tokens = make_module("ar", dm).validation_nats(rows, 0)
    _, mdm_tokens = make_module("mdm", dm).validation_nats(rows, 0)
    _, bd3_tokens = make_module("bd3-8", dm).validation_nats(rows, 0)
    assert torch.equal(ar_tokens, mdm_tokens) and torch.equal(ar_tokens, rows[:, 1:])
    assert torch.equal(bd3_tokens, ar_tokens)


def test_mdm_validation_uses_fixed_draws(toy_corpus, cache_dir):
    dm = make_dm(toy_corpus, cache_dir)
    model = make_module("mdm", dm)
    val = lambda: L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(  # noqa: E731
        model, dm, verbose=False)[0]["val/nll_per_token"]
    assert val() == val()


class Crash(L.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("name", ["ar", "mdm", "bd3-4"])
def test_resumed_run_matches_uninterrupted_run(name, toy_corpus, cache_dir, tmp_path):
    """Crash after step 43, resume from the step-40 checkpoint (mid-epoch): the final weights equal an
    uninterrupted run's bit for bit (same batches, same masks, same random lengths)."""
    def run(dirpath, callbacks=(), ckpt_path=None):
        L.seed_everything(0, verbose=False)
        dm = make_dm(toy_corpus, cache_dir, batch_size=32)  # 24 batches per epoch: resumes mid-epoch 1
        model = make_module(name, dm, random_length_prob=0.5)
        ckpt = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_last=True, save_top_k=0)
        t = trainer(45, callbacks=[ckpt, *callbacks], enable_checkpointing=True, limit_val_batches=1,
                    val_check_interval=4)
        t.fit(model, dm, ckpt_path=ckpt_path)
        return model

    reference = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", callbacks=[Crash(at_step=43)])
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.tokens_seen == reference.tokens_seen
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_checkpoint_loads_with_weights_only(toy_corpus, cache_dir, tmp_path):
    dm = make_dm(toy_corpus, cache_dir)
    model = make_module("mdm", dm)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(3, callbacks=[ckpt], enable_checkpointing=True).fit(model, dm)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3 and state["lldiff"]["model_config"]["vocab_size"] == dm.vocab_size_real
    restored = MaskedDiffusionLM.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(restored.model.head.weight, model.model.head.weight)


def test_tokens_and_flops_accounting(toy_corpus, cache_dir):
    dm = make_dm(toy_corpus, cache_dir)
    model = make_module("ar", dm, random_length_prob=0.0)
    t = trainer(5, log_every_n_steps=5)  # metrics reach Lightning on its logging steps only
    t.fit(model, dm)
    assert model.tokens_seen == 5 * 16 * 48
    assert t.callback_metrics["trainer/flops"].item() == pytest.approx(
        6 * model.config.non_embedding_params() * model.tokens_seen, rel=1e-6)
    cfg, d, layers = model.config, model.config.d_model, model.config.n_layer
    per_token = 6 * (cfg.non_embedding_params() + d * cfg.vocab_size) + 12 * layers * 48 * d
    assert t.callback_metrics["trainer/flops_matmul"].item() == pytest.approx(per_token * model.tokens_seen, rel=1e-6)


def test_sequence_longer_than_model_context_stops_before_training(toy_corpus, cache_dir):
    dm = make_dm(toy_corpus, cache_dir, seq_len=48)
    model = make_module("mdm", dm, model_overrides={"max_seq_len": 32})
    with pytest.raises(ValueError, match="data.seq_len=48 exceeds the model's max_seq_len=32"):
        trainer(2).fit(model, dm)
    assert model.tokens_seen == 0


@pytest.mark.parametrize("compile", [False, True])
def test_state_dict_holds_each_weight_once(compile, toy_corpus, cache_dir):
    dm = make_dm(toy_corpus, cache_dir)
    module = make_module("ar", dm, compile=compile)
    keys = list(module.state_dict())
    assert all(k.startswith("model.") for k in keys)
    assert len(keys) == len(list(module.model.state_dict()))


def test_mdm_uses_eval_mc_samples_outside_fit(toy_corpus, cache_dir):
    dm = make_dm(toy_corpus, cache_dir, val_max_rows=16)
    model = make_module("mdm", dm, val_mc_samples=2, eval_mc_samples=3, warmup_steps=1)
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    t = trainer(1, limit_val_batches=1, val_check_interval=1)
    t.fit(model, dm)
    fit_calls = len(calls)  # 1 training step + 1 validation batch x 2 draws
    calls.clear()
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=1).validate(
        model, dm, verbose=False)
    assert fit_calls == 1 + 2 and len(calls) == 3


def test_bd3_matmul_flops_count_its_2l_forward_and_6nd_does_not(toy_corpus, cache_dir):
    """BD3 runs the backbone on [x_t, x_0] (2L tokens, attention over 2L keys): per training
    token 2 x (6 (N + d V) + 12 n_layer (2L) d) matmul FLOPs, while SMDM's axis stays 6 N D."""
    dm = make_dm(toy_corpus, cache_dir)
    model = make_module("bd3-8", dm, random_length_prob=0.0)
    t = trainer(5, log_every_n_steps=5)
    t.fit(model, dm)
    assert model.tokens_seen == 5 * 16 * 48
    cfg, d, layers = model.config, model.config.d_model, model.config.n_layer
    assert t.callback_metrics["trainer/flops"].item() == pytest.approx(
        6 * cfg.non_embedding_params() * model.tokens_seen, rel=1e-6)
    per_token = 2 * (6 * (cfg.non_embedding_params() + d * cfg.vocab_size) + 12 * layers * (2 * 48) * d)
    assert t.callback_metrics["trainer/flops_matmul"].item() == pytest.approx(per_token * model.tokens_seen, rel=1e-6)
