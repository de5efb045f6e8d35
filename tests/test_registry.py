"""The objective registry (lldiff.objectives): names and refusals, the backbone fields each objective
fixes and back (every family), FLOPs per training token by hand, plot styles; and checkpoints
written by the code before the registry (commit bb6fffa, `causal` in their model config): they
load with the logits that code computed, `lldiff generate` answers from them, and a fit resumes
from them.

The fixtures in tests/data/pre-registry/ were made by that commit's own code (see the README
there); they are stored as ``last.pt`` (``*.ckpt`` is git-ignored) and copied into a run
directory laid out as ``lldiff fit`` writes one.
"""

import importlib
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import instantiate_class

from lldiff import flops, objectives as registry
from lldiff.checkpoint import load_model
from lldiff.cli import main
from lldiff.config import SIZES, ModelConfig
from lldiff.launch import lightning_cli
from lldiff.model import Transformer

DATA = Path(__file__).resolve().parent / "data" / "pre-registry"
NAMES = ["ar", "mdm", "bd3-1", "bd3-4", "bd3-16"]  # every family, BD3 at several block sizes
V = 50


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# -- names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,family,block,attention,mask_token,label", [
    ("ar", "ar", None, "causal", False, "AR"),
    ("mdm", "mdm", None, "bidirectional", True, "MDM"),
    ("bd3-1", "bd3", 1, "block", True, "BD3-1"),
    ("bd3-4", "bd3", 4, "block", True, "BD3-4"),
    ("bd3-16", "bd3", 16, "block", True, "BD3-16"),
])
def test_get_spells_out_each_objective(name, family, block, attention, mask_token, label):
    entry = registry.get(name)
    assert (entry.name, entry.family_name, entry.block_size) == (name, family, block)
    assert (entry.attention, entry.mask_token, entry.label) == (attention, mask_token, label)
    assert registry.is_known(name) and registry.get(name) == entry


@pytest.mark.parametrize("name,message", [
    ("bd3-0", "objective 'bd3-0': the block size must be >= 1"),
    ("bd3-x", "unknown objective 'bd3-x'; allowed: ar, mdm, bd3-B"),
    ("bd3", "unknown objective 'bd3'; allowed: ar, mdm, bd3-B"),  # the family needs its block size
    ("bd3-", "unknown objective 'bd3-'"),
    ("BD3-4", "unknown objective 'BD3-4'"),
    ("gpt", "unknown objective 'gpt'; allowed: ar, mdm, bd3-B \\(block diffusion with blocks of B tokens"),
    (4, "objective must be a name, got 4; allowed: ar, mdm"),
    (None, "objective must be a name, got None"),
])
def test_bad_names_are_refused_with_the_allowed_ones(name, message):
    with pytest.raises(ValueError, match=message):
        registry.get(name)
    assert not registry.is_known(name)


# -- the backbone each objective fixes, and back --------------------------------------------------
@pytest.mark.parametrize("name,fields,rows", [
    ("ar", {"attention": "causal", "block_size": None, "mask_id": None, "mask_token": False}, V),
    ("mdm", {"attention": "bidirectional", "block_size": None, "mask_id": V, "mask_token": True}, V + 1),
    ("bd3-4", {"attention": "block", "block_size": 4, "mask_id": V, "mask_token": True}, V + 1),
])
def test_model_fields(name, fields, rows):
    assert registry.get(name).model_fields(V) == fields
    config = SIZES["tiny-0.03M"].replace(vocab_size=V, **fields)
    assert config.embedding_rows == rows  # the mask token is one extra row, the AR has none


@pytest.mark.parametrize("name", NAMES)
def test_the_legacy_rule_and_of_model_round_trip(name):
    """A model without a record is read by the legacy rule (its attention kind and block size); a
    model that carries its objective (set by the modules and by load_model) is read from that."""
    entry = registry.get(name)
    config = SIZES["tiny-0.03M"].replace(vocab_size=V, **entry.model_fields(V))
    assert registry.legacy_objective(config) == entry
    assert registry.legacy_objective(ModelConfig.from_dict(dict(config.__dict__))) == entry  # as a checkpoint stores it
    model = Transformer(config)
    assert registry.of_model(model) == entry
    model.objective = registry.get("bd3-2")  # the record wins over the attention kind
    assert registry.of_model(model) == registry.get("bd3-2")


def test_the_round_trip_covers_every_family():
    assert {registry.get(name).family_name for name in NAMES} == set(registry.families())


@pytest.mark.parametrize("name", NAMES)
def test_the_registered_module_builds_that_objective(name):
    entry = registry.get(name)
    spec = entry.module_config()
    assert spec == {"class_path": entry.module, "init_args": entry.module_args()}
    module = instantiate_class((), {**spec, "init_args": {**spec["init_args"], "size": "tiny-0.03M", "vocab_size": V}})
    assert module.objective == entry and registry.of_model(module.model) == entry


def test_module_config_for_lightning_cli():
    assert registry.get("bd3-4").module_config() == {"class_path": "lldiff.objectives.bd3.modules.BlockDiffusionLM",
                                                     "init_args": {"block_size": 4}}
    assert registry.get("mdm").module_config(sft=True) == {"class_path": "lldiff.objectives.mdm.modules.MaskedDiffusionSFT",
                                                          "init_args": {}}
    assert registry.get("ar").module_args() == {}


@pytest.mark.parametrize("family", list(registry.families()))
def test_every_import_path_of_a_family_resolves(family):
    """The classes and functions the registry names exist (a typo would surface only when a
    sweep, an evaluation or a decoder first asks for it)."""
    entry = registry.get(family if registry.is_known(family) else f"{family}-4")
    assert isinstance(_class(entry.module), type) and isinstance(_class(entry.sft_module), type)
    assert callable(entry.decoder()) and callable(entry.scorer())
    assert entry.elbo() is None if entry.exact_likelihood else callable(entry.elbo())


def test_the_legacy_rule_refuses_what_no_objective_has():
    class Config:
        attention = "sliding"

    with pytest.raises(ValueError, match="no objective has attention='sliding'; allowed kinds: causal, bidirectional"):
        registry.legacy_objective(Config())
    with pytest.raises(ValueError, match="carries no ModelConfig"):
        registry.of_model(object())


def test_what_evaluation_asks():
    ar, mdm, bd3 = registry.get("ar"), registry.get("mdm"), registry.get("bd3-4")
    assert (ar.exact_likelihood, mdm.exact_likelihood, bd3.exact_likelihood) == (True, False, False)
    # zero-shot infilling: only the bidirectional MDM conditions on text after the gap
    assert (ar.infill_sees_right_context, mdm.infill_sees_right_context, bd3.infill_sees_right_context) == (
        False, True, False)


# -- compute -------------------------------------------------------------------------------------------
def test_matmul_flops_per_token_by_hand():
    """tiny-0.03M at V = 320: 2 layers, d 32, d_ff 128. Linear layers 6 (N + dV) per token,
    attention 12 n_layer T d at length T. AR and MDM: one forward at L = 32; BD3 at any block
    size runs the backbone on [x_t, x_0] (2L = 64 tokens) per L training tokens: 2x an MDM
    forward at 2L."""
    config = ModelConfig.from_name("tiny-0.03M", vocab_size=320)
    linear = 6 * (2 * (4 * 32 * 32 + 3 * 32 * 128 + 2 * 32) + 32 + 32 * 320)  # 259_008
    at_32, at_64 = linear + 12 * 2 * 32 * 32, linear + 12 * 2 * 64 * 32  # 283_584, 308_160
    assert flops.step_flops_per_token(config, 32) == at_32 == 283_584
    assert flops.step_flops_per_token(config, 64) == at_64 == 308_160
    assert registry.get("ar").matmul_flops_per_token(config, 32) == at_32
    assert registry.get("mdm").matmul_flops_per_token(config, 32) == at_32
    for name in ("bd3-1", "bd3-4", "bd3-32"):
        assert registry.get(name).matmul_flops_per_token(config, 32) == 2 * at_64 == 616_320
        assert registry.get(name).matmul_flops_per_token(config, 32) == 2 * registry.get("mdm").matmul_flops_per_token(
            config, 64)


# -- presentation ----------------------------------------------------------------------------------------
def test_styles_are_distinct():
    shown = [registry.get(name) for name in ("ar", "mdm", "bd3-4", "bd3-16")]
    styles = [entry.style for entry in shown]
    assert all(style is not None for style in styles)
    for attribute in ("color", "marker", "linestyle", "label"):
        values = [getattr(style, attribute) for style in styles]
        assert len(set(values)) == len(values), (attribute, values)
    assert [style.label for style in styles] == [entry.label for entry in shown]


# -- checkpoints written before the registry (commit bb6fffa) ---------------------------------------------
@pytest.fixture
def old_run(tmp_path):
    """A copy of the pre-registry run of an objective, laid out as `lldiff fit` wrote it:
    <save_dir>/<o>-tiny/{checkpoints/last.ckpt, tokenizer.json, config.yaml}."""

    def make(objective: str) -> Path:
        run = tmp_path / f"{objective}-tiny"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copyfile(DATA / objective / "last.pt", run / "checkpoints" / "last.ckpt")
        for name in ("tokenizer.json", "config.yaml"):
            shutil.copyfile(DATA / objective / name, run / name)
        return run

    return make


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_old_checkpoint_holds_the_old_format(objective):
    """What the fixtures are: a model config with `causal` and nothing of today's fields."""
    stored = torch.load(DATA / objective / "last.pt", weights_only=True)["lldiff"]["model_config"]
    assert stored["causal"] is (objective == "ar")
    assert "attention" not in stored and "mask_id" not in stored and "block_size" not in stored


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_old_checkpoint_loads_with_the_logits_of_the_old_code(objective, old_run):
    path = old_run(objective) / "checkpoints" / "last.ckpt"
    loaded = load_model(path, expect=objective)
    assert loaded.objective == registry.get(objective) and loaded.objective.name == objective
    assert loaded.model.cfg.attention == {"mdm": "bidirectional", "ar": "causal"}[objective]
    assert loaded.model.cfg.mask_id == {"mdm": 259, "ar": None}[objective]  # old MDMs: the extra row V
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 259
    reference = torch.load(DATA / "reference_logits.pt", weights_only=True)[objective]  # the old code's forward
    state = torch.load(path, weights_only=True)
    rebuilt = Transformer(ModelConfig.from_dict(state["lldiff"]["model_config"])).eval()
    rebuilt.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
    with torch.no_grad():
        logits = loaded.model(reference["input_ids"])
        torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(rebuilt(reference["input_ids"]), logits, rtol=0, atol=0)


def test_old_checkpoint_of_the_other_objective_is_named(old_run):
    with pytest.raises(ValueError, match="holds an MDM model; this needs an AR checkpoint"):
        load_model(old_run("mdm") / "checkpoints" / "last.ckpt", expect="ar")
    with pytest.raises(ValueError, match="holds an AR model; this needs a BD3-4 checkpoint"):
        load_model(old_run("ar") / "checkpoints" / "last.ckpt", expect="bd3-4")


@pytest.mark.parametrize("objective,options", [
    ("mdm", ["--gen-length", "8", "--steps", "4"]),
    ("ar", ["--max-new-tokens", "8"]),
])
def test_generate_answers_from_an_old_checkpoint(objective, options, old_run, capsys):
    main(["generate", "--ckpt", str(old_run(objective) / "checkpoints" / "last.ckpt"), "--prompt", "the quick",
          *options])
    captured = capsys.readouterr()
    assert "the quick" in captured.out + captured.err and "model calls" in captured.out + captured.err


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_fit_resumes_from_an_old_checkpoint(objective, old_run, toy_corpus, cache_dir):
    """`lldiff fit --config <run>/config.yaml --ckpt_path last` on a pre-registry run: the model,
    optimizer, loops and data order come back (step 3 -> 6, the next validation, where the run
    writes its checkpoint; tokens counted on), and the new checkpoint is in today's format."""
    run = old_run(objective)
    before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert before["global_step"] == 3
    lightning_cli([
        "fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
        "--trainer.logger.init_args.save_dir", str(run.parent), "--trainer.max_steps", "6",
        "--data.init_args.paths", f"[{toy_corpus}]", "--data.init_args.cache_dir", str(cache_dir),
    ])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # moved run: no last-v1.ckpt
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 6
    rows = before["datamodule_hyper_parameters"]["batch_size"]
    seq_len = before["datamodule_hyper_parameters"]["seq_len"]
    assert after["lldiff"]["tokens_seen"] == before["lldiff"]["tokens_seen"] + 3 * rows * seq_len
    assert after["lldiff"]["model_config"]["attention"] == {"mdm": "bidirectional", "ar": "causal"}[objective]
    assert "causal" not in after["lldiff"]["model_config"]
    changed = [k for k in before["state_dict"] if not torch.equal(before["state_dict"][k], after["state_dict"][k])]
    assert changed  # three more optimizer steps
    assert load_model(run / "checkpoints" / "last.ckpt", expect=objective).objective.name == objective


@pytest.mark.parametrize("name,seq_len,ok", [("bd3-4", 32, True), ("bd3-32", 32, True), ("bd3-5", 32, False),
                                             ("bd3-64", 32, False), ("ar", 7, True), ("mdm", 7, True)])
def test_block_size_must_divide_the_training_length(name, seq_len, ok):
    if ok:
        registry.get(name).check_seq_len(seq_len)
    else:
        with pytest.raises(ValueError, match=f"{name}: block_size=.* must divide seq_len={seq_len}; allowed"):
            registry.get(name).check_seq_len(seq_len)


def test_a_bd3_fit_whose_blocks_do_not_tile_the_rows_stops_before_training(toy_corpus, cache_dir, tmp_path, capsys):
    repo = Path(__file__).resolve().parents[1]
    args = ["fit", "--config", str(repo / "configs" / "bd3-tiny.yaml"), "--model.init_args.size", "tiny-0.1M",
            "--model.init_args.block_size", "5", "--data.init_args.source", "files",
            "--data.init_args.paths", f"[{toy_corpus}]", "--data.init_args.max_bytes", "null",
            "--data.init_args.vocab_size", "320", "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "8",
            "--data.init_args.cache_dir", str(cache_dir), "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "bd3-5: block_size=5 must divide seq_len=32" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.ckpt"))
