"""The objective is data (issue 22): every checkpoint records its objective and loading reads it;
checkpoints of the last release (commit ad1a811, before lldiff/objectives/) still load, generate
and resume by the legacy rule; and the restructure changed no output: losses, decoded tokens and
likelihoods equal the old code's on the same weights and seeds (tests/data/pre-objectives/)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lldiff import objectives
from lldiff.checkpoint import load_model
from lldiff.cli import main
from lldiff.launch import lightning_cli
from lldiff.objectives.common.base import LMBase
from lldiff.objectives.ar.decoding import ar_generate
from lldiff.objectives.ar.likelihood import ar_loglik
from lldiff.objectives.ar.loss import ar_sft_loss
from lldiff.objectives.bd3.decoding import block_generate
from lldiff.objectives.bd3.likelihood import bd3_conditional_loglik
from lldiff.objectives.bd3.loss import bd3_sft_loss
from lldiff.objectives.mdm.decoding import generate, generate_threshold
from lldiff.objectives.mdm.likelihood import mdm_conditional_loglik
from lldiff.objectives.mdm.loss import mdm_sft_loss

DATA = Path(__file__).resolve().parent / "data" / "pre-objectives"
OLD = {"ar": "ar", "mdm": "mdm", "bd3": "bd3-4"}  # fixture folder -> the objective it was trained as


# -- every output unchanged -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    return torch.load(DATA / "outputs.pt", weights_only=True)


def _module(name: str, vocab: int) -> LMBase:
    objective = objectives.get(name)
    extra = {} if name == "ar" else {"val_mc_samples": 2, "eval_mc_samples": 2}
    module = objective.module_class()(size="tiny-0.002M", vocab_size=vocab, **objective.module_args(), **extra)
    return module.eval()


@pytest.mark.parametrize("name", ["ar", "mdm", "bd3-4"])
def test_losses_decodes_and_likelihoods_equal_the_old_code(name, golden):
    """The old code's outputs (tests/data/pre-objectives/README.md) on the same weights and seeds:
    equal bit for bit (the computation is the same; only its home moved)."""
    old, rows, prompt, answer = golden[name], golden["rows"], golden["prompt"], golden["answer"]
    torch.manual_seed(0)
    module = _module(name, golden["vocab_size"])
    for key, value in module.model.state_dict().items():  # the same initialisation as the old code's
        assert torch.equal(value, old["state_dict"][key]), key
    torch.manual_seed(5)
    assert torch.equal(module.loss(rows).detach(), old["loss"])
    with torch.no_grad():
        assert torch.equal(module.validation_nats(rows, 0)[0], old["val_nats"])
    model, mask_id, response = module.model, module.model.cfg.mask_id, golden["response"]

    def g(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    with torch.no_grad():
        if name == "ar":
            out = {"sft_loss": ar_sft_loss(model, rows[:, :16], response),
                   "greedy": ar_generate(model, prompt, max_new_tokens=6).tokens,
                   "sampled": ar_generate(model, prompt, max_new_tokens=6, temperature=1.0, top_k=5,
                                          generator=g(3)).tokens,
                   "loglik": ar_loglik(model, prompt, answer)}
        elif name == "mdm":
            out = {"sft_loss": mdm_sft_loss(model, rows[:, :16], response, mask_id, generator=g(4)),
                   "greedy": generate(model, prompt, gen_length=8, steps=8, block_length=4, mask_id=mask_id).canvas,
                   "sampled": generate(model, prompt, gen_length=8, steps=4, block_length=8, mask_id=mask_id,
                                       temperature=1.0, remasking="random", generator=g(3)).canvas,
                   "prefix": generate(model, prompt, gen_length=8, steps=8, block_length=4, mask_id=mask_id,
                                      cache="prefix").canvas,
                   "threshold": generate_threshold(model, prompt, gen_length=8, block_length=4, mask_id=mask_id,
                                                   threshold=0.3).canvas,
                   "loglik": mdm_conditional_loglik(model, prompt, answer, mask_id=mask_id, n_mc=8, generator=g(6))}
        else:
            out = {"sft_loss": bd3_sft_loss(model, rows[:, :16], response, mask_id, 4, generator=g(4)),
                   "greedy": block_generate(model, prompt, gen_length=8, block_size=4, mask_id=mask_id).canvas,
                   "sampled": block_generate(model, prompt, gen_length=8, block_size=4, mask_id=mask_id,
                                             temperature=1.0, steps_per_block=2, generator=g(3)).canvas,
                   "loglik": bd3_conditional_loglik(model, prompt, answer, mask_id=mask_id, block_size=4, n_mc=8,
                                                    generator=g(6))}
    assert set(out) | {"state_dict", "loss", "val_nats"} == set(old)
    for key, value in out.items():
        assert torch.equal(value.detach(), old[key]), key


# -- checkpoints of the last release ----------------------------------------------------------------------
@pytest.fixture
def release_run(tmp_path):
    def make(folder: str) -> Path:
        run = tmp_path / f"{folder}-tiny"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copyfile(DATA / folder / "last.pt", run / "checkpoints" / "last.ckpt")
        for name in ("tokenizer.json", "config.yaml"):
            shutil.copyfile(DATA / folder / name, run / name)
        return run

    return make


@pytest.mark.parametrize("folder", list(OLD))
def test_release_checkpoint_has_no_record_and_loads_by_the_legacy_rule(folder, release_run):
    path = release_run(folder) / "checkpoints" / "last.ckpt"
    state = torch.load(path, weights_only=True)
    assert "objective" not in state["lldiff"]  # written before the record existed
    assert "lldiff.modules." in (DATA / folder / "config.yaml").read_text()  # the old class paths
    loaded = load_model(path, expect=OLD[folder])
    assert loaded.objective == objectives.get(OLD[folder]) and objectives.of_model(loaded.model) == loaded.objective
    reference = torch.load(DATA / "reference_logits.pt", weights_only=True)[folder]  # the old code's forward
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(reference["input_ids"]), reference["logits"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("folder,options", [("ar", ["--max-new-tokens", "4"]), ("mdm", ["--gen-length", "4"]),
                                            ("bd3", ["--max-new-tokens", "4"])])
def test_release_checkpoint_generates(folder, options, release_run, capsys):
    main(["generate", "--ckpt", str(release_run(folder) / "checkpoints" / "last.ckpt"), "--prompt", "the", *options])
    captured = capsys.readouterr()
    assert "model calls" in captured.out + captured.err


@pytest.mark.parametrize("folder", ["bd3", "ar"])
def test_release_run_resumes_through_the_old_class_paths_and_then_records_its_objective(
        folder, release_run, toy_corpus, cache_dir):
    run = release_run(folder)
    lightning_cli([
        "fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
        "--trainer.logger.init_args.save_dir", str(run.parent), "--trainer.max_steps", "6",
        "--data.init_args.paths", f"[{toy_corpus}]", "--data.init_args.cache_dir", str(cache_dir),
    ])
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 6
    assert after["lldiff"]["objective"] == objectives.get(OLD[folder]).record()


# -- the record ----------------------------------------------------------------------------------------
def test_every_new_checkpoint_records_its_objective(tiny_bd3_run, tiny_runs):
    for run, name in ((tiny_bd3_run, None), (tiny_runs["mdm"], "mdm"), (tiny_runs["ar"], "ar")):
        state = torch.load(run, weights_only=True)["lldiff"]
        record = state["objective"]
        assert set(record) == {"name", "family", "params"}
        assert objectives.from_record(record).name == (name or record["name"])
        if name is None:
            assert record["family"] == "bd3" and record["params"] == {"block_size": state["model_config"]["block_size"]}


def test_the_record_not_the_attention_kind_decides(tiny_runs, tmp_path):
    """A checkpoint whose record says another objective than its attention kind would: the record wins
    (so two objectives may share an attention kind)."""
    state = torch.load(tiny_runs["mdm"], weights_only=True)
    assert objectives.of_checkpoint(state["lldiff"], None) == objectives.get("mdm")
    state["lldiff"]["objective"] = {"name": "gpt-uniform", "family": "gpt-uniform", "params": {}}
    path = tmp_path / "unknown.ckpt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="trained as objective 'gpt-uniform', which this version of lldiff does not "
                                         "know; known: ar, mdm, bd3-B"):
        load_model(path)


def test_an_unknown_recorded_objective_is_one_line_exit_2(tiny_runs, tmp_path, capsys):
    state = torch.load(tiny_runs["mdm"], weights_only=True)
    state["lldiff"]["objective"] = {"name": "gpt-uniform", "family": "gpt-uniform", "params": {}}
    path = tmp_path / "unknown.ckpt"
    torch.save(state, path)
    shutil.copyfile(Path(tiny_runs["mdm"]).parent.parent / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--ckpt", str(path), "--prompt", "the"])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "'gpt-uniform'" in err[0] and "known: ar, mdm, bd3-B" in err[0]


def test_a_config_class_of_another_objective_than_the_checkpoints_is_refused_naming_both(tiny_bd3_run):
    state = torch.load(tiny_bd3_run, weights_only=True)
    vocab = state["lldiff"]["model_config"]["vocab_size"]
    module = objectives.get("mdm").module_class()(size="tiny-0.002M", vocab_size=vocab)
    with pytest.raises(ValueError, match=r"holds a BD3-\d+ model \(objective 'bd3-\d+'\) but MaskedDiffusionLM "
                                         r"trains an MDM model \(objective 'mdm'\)"):
        module.on_load_checkpoint(state)


def test_a_record_that_disagrees_with_its_name_is_refused():
    with pytest.raises(ValueError, match="disagrees with its name"):
        objectives.from_record({"name": "bd3-4", "family": "bd3", "params": {"block_size": 8}})


def test_old_class_paths_name_todays_classes():
    import lldiff.finetune
    import lldiff.modules

    for family in objectives.families().values():
        code = family.code()
        module_path, sft_path = family.legacy_class_paths
        assert getattr(lldiff.modules, module_path.rpartition(".")[2]) is code.module
        assert getattr(lldiff.finetune, sft_path.rpartition(".")[2]) is code.sft_module
    with pytest.raises(AttributeError):
        lldiff.modules.NoSuchModule  # noqa: B018


def test_a_bidirectional_objective_may_have_no_mask_token():
    """The mask token is the objective's, not the attention kind's (ModelConfig.mask_token)."""
    from lldiff.config import ModelConfig

    config = ModelConfig(vocab_size=10, attention="bidirectional", mask_token=False)
    assert config.mask_id is None and config.embedding_rows == 10
    assert ModelConfig(vocab_size=10, attention="causal", mask_token=True).mask_id == 10
    with pytest.raises(ValueError, match="mask_id=3: mask_token=false has no mask token"):
        ModelConfig(vocab_size=10, mask_token=False, mask_id=3)


def test_an_old_class_path_and_todays_name_the_same_model_on_resume():
    from lldiff.launch import refuse_replaced_model

    old = {"class_path": "lldiff.modules.BlockDiffusionLM", "init_args": {"block_size": 4}}
    new = {"class_path": "lldiff.objectives.bd3.modules.BlockDiffusionLM", "init_args": {"block_size": 4}}
    assert refuse_replaced_model("last.ckpt", old, new) == {}
    with pytest.raises(ValueError, match="holds a lldiff.modules.MaskedDiffusionLM model"):
        refuse_replaced_model("last.ckpt", new, {"class_path": "lldiff.modules.MaskedDiffusionLM"})
