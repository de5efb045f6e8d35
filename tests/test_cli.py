"""The `lldiff` command: help, config printing, fit -> run directory, refuse/resume, bad input."""

import glob
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lldiff.cli import main
from lldiff.launch import lightning_cli

REPO = Path(__file__).resolve().parents[1]
SHARED_METRICS = {"train/loss", "train/lr", "val/nll_per_token", "val/bpb", "trainer/tokens", "trainer/flops", "perf/tokens_per_s"}


def tiny_args(objective, toy_corpus, cache_dir, out, *extra):
    """The shipped config, shrunk to seconds on the toy corpus."""
    return [
        "fit", "--config", str(REPO / "configs" / f"{objective}-tiny.yaml"),
        "--model.init_args.size", "tiny-0.1M", "--model.init_args.warmup_steps", "2",
        "--data.init_args.source", "files", "--data.init_args.paths", f"[{toy_corpus}]",
        "--data.init_args.max_bytes", "null",
        "--data.init_args.vocab_size", "320", "--data.init_args.seq_len", "32",
        "--data.init_args.batch_size", "8", "--data.init_args.val_max_rows", "16",
        "--data.init_args.cache_dir", str(cache_dir),
        "--trainer.max_steps", "12", "--trainer.val_check_interval", "6",
        "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "5",
        "--trainer.logger.init_args.save_dir", str(out), *extra,
    ]


class StopAfter(L.Callback):
    """Ends a fit after ``step`` optimizer steps, as an interrupted run would (``last.ckpt`` is
    written there); a resume with the run's own ``max_steps`` continues it."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit_until(args, step):
    """``lightning_cli(args)`` (a ``fit`` command line) stopped after ``step`` steps."""
    assert args[0] == "fit"
    cli = lightning_cli(args[1:], run=False)
    cli.trainer.callbacks.append(StopAfter(step))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_help_lists_commands_and_sizes(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for word in ("fit", "validate", "test", "lldiff/objectives/mdm/", "lldiff/objectives/ar/", "bd3-B", "smdm-1028M", "llada-8B"):
        assert word in out


def test_unknown_command_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_fit_help_documents_the_knobs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli(["fit", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for knob in ("--model", "--data", "--trainer.max_steps", "--checkpoint.every_n_train_steps", "--ckpt_path"):
        assert knob in out


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_print_config_resolves_the_shipped_config(objective, capsys):
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--config", str(REPO / "configs" / f"{objective}-tiny.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    expected = {"mdm": "lldiff.objectives.mdm.modules.MaskedDiffusionLM", "ar": "lldiff.objectives.ar.modules.AutoregressiveLM"}[objective]
    assert config["model"]["class_path"] == expected
    assert config["data"]["class_path"] == "lldiff.data.PretrainDataModule"
    assert config["trainer"]["logger"]["init_args"]["name"] == f"{objective}-tiny"


def _scalars(run_dir):
    ea = EventAccumulator(glob.glob(str(run_dir / "events*"))[0])
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_fit_writes_a_self_contained_run_directory(objective, toy_corpus, cache_dir, tmp_path):
    lightning_cli(tiny_args(objective, toy_corpus, cache_dir, tmp_path))
    run = tmp_path / f"{objective}-tiny"
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 12
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 12
    scalars = _scalars(run)
    assert SHARED_METRICS <= set(scalars)  # same names for both objectives: TensorBoard overlays them
    assert all(v == v for _, v in scalars["val/nll_per_token"])  # no NaN placeholder points
    hparams = _hparams_experiment(run)
    assert [m.name.tag for m in hparams.metric_infos] == ["val/nll_per_token", "val/bpb"]
    names = [h.name for h in hparams.hparam_infos]
    assert {"2 size", "4 lr", "3 n_nonemb", "data.seq_len", "data.vocab_size"} <= set(names)
    assert sorted(names)[:5] == ["0 run", "1 objective", "2 size", "3 n_nonemb", "4 lr"]  # TensorBoard sorts by name
    assert not any(name.startswith("_") for name in names)  # no _class_path, _instantiator


def _hparams_experiment(run_dir):
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(glob.glob(str(run_dir / "events*"))[0])
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/experiment"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).experiment


@pytest.mark.parametrize("command", ["validate", "test"])
def test_evaluating_a_run_from_its_saved_config(command, toy_corpus, cache_dir, tmp_path):
    lightning_cli(tiny_args("mdm", toy_corpus, cache_dir, tmp_path))
    run = tmp_path / "mdm-tiny"
    ckpt = run / "checkpoints" / "last.ckpt"
    cli = lightning_cli([command, "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
                         "--trainer.logger", "false", "--model.init_args.eval_mc_samples", "4"])
    metrics = cli.trainer.callback_metrics
    prefix = "val" if command == "validate" else "test"
    assert metrics[f"{prefix}/nll_per_token"] > 0 and metrics[f"{prefix}/bpb"] > 0
    assert torch.load(ckpt, weights_only=True)["global_step"] == 12  # evaluation does not touch the run


def test_checkpoint_of_the_other_objective_is_named(toy_corpus, cache_dir, tmp_path):
    """The CLI takes the model class from the checkpoint's hyperparameters and Lightning's
    load_from_checkpoint refuses a foreign class; a module built by hand and given a checkpoint
    of the other objective is named before any weight loads."""
    import lightning as L

    from lldiff.objectives.mdm.modules import MaskedDiffusionLM

    cli = lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path))
    ar_ckpt = tmp_path / "ar-tiny" / "checkpoints" / "last.ckpt"
    mdm = MaskedDiffusionLM(size="tiny-0.1M", vocab_size=cli.model.config.vocab_size)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="holds an AR model \\(objective .ar.\\) but MaskedDiffusionLM trains an MDM model"):
        trainer.validate(mdm, datamodule=cli.datamodule, ckpt_path=str(ar_ckpt))


def test_fresh_fit_refuses_an_existing_run_and_resume_continues(toy_corpus, cache_dir, tmp_path):
    fit_until(tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--trainer.max_steps", "20"), 12)
    run = tmp_path / "ar-tiny"
    with pytest.raises(ValueError, match="already holds a run.*--ckpt_path last"):
        lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path))
    lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--trainer.max_steps", "20", "--ckpt_path", "last"))
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 20
    assert state["lldiff"]["tokens_seen"] <= 20 * 8 * 32 and state["lldiff"]["tokens_seen"] > 12 * 8 * 32


@pytest.mark.parametrize(
    "extra,error",
    [
        (["--model.init_args.size", "smdm-7M"], "unknown model size 'smdm-7M'"),
        (["--model.init_args.model_overrides", "{max_seq_len: 16}"], "seq_len=32 exceeds the model's max_seq_len=16"),
        (["--model.init_args.model_overrides", "{n_heads: 3}"], "d_model=64 is not divisible by n_heads=3"),
        (["--data.init_args.vocab_size", "100"], "vocab_size=100 is too small"),
    ],
)
def test_bad_input_stops_before_training(extra, error, toy_corpus, cache_dir, tmp_path, capsys):
    with pytest.raises((ValueError, SystemExit)) as info:
        lightning_cli(tiny_args("mdm", toy_corpus, cache_dir, tmp_path, *extra))
    assert error in str(info.value) + capsys.readouterr().err  # raised, or printed by the argument parser
    assert not (tmp_path / "mdm-tiny" / "checkpoints").exists()


def test_missing_data_file_is_named(toy_corpus, cache_dir, tmp_path):
    args = tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--data.init_args.paths", "[/no/such/file.txt]")
    result = subprocess.run([sys.executable, "-m", "lldiff.cli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "/no/such/file.txt" in result.stderr
    assert not (tmp_path / "ar-tiny").exists()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_console_script_runs_the_shipped_config(objective, tmp_path):
    """The shipped config on the default offline corpus, as a user runs it (fewer steps)."""
    lldiff = Path(sys.executable).parent / "lldiff"
    cmd = [str(lldiff), "fit", "--config", f"configs/{objective}-tiny.yaml", "--trainer.max_steps", "200",
           "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=900, capture_output=True)
    nll = _scalars(tmp_path / f"{objective}-tiny")["val/nll_per_token"]
    assert nll[-1][1] < nll[0][1]  # validation improves between the first and last evaluation
