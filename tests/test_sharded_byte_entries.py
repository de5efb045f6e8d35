"""A sharded (DCP) checkpoint's byte entries never run code (issue 24, item 1).

DCP stores what is not a tensor as a pickled "byte entry" that PyTorch's reader unpickles with
``weights_only=False``. A directory whose ``model.embed.weight`` is such an entry is refused by
every command that reads a sharded directory, and the payload never runs; lldiff's own byte
entries (the optimizer's ``param_groups``) still load."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from lldiff.checkpoint import load_model
from lldiff.checkpoint_io import UnsafeCheckpointError, check_sharded_metadata
from lldiff.cli import main


class Payload:
    """Unpickled, it creates ``marker`` (what a crafted entry could do with any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sharded(full_ckpt: Path, out: Path, replace: dict | None = None, extra: dict | None = None) -> Path:
    """A sharded directory shaped like an fsdp2 checkpoint of ``full_ckpt``'s run (DCP shards
    plus a genuine ``meta.pt``), with entries of ``state_dict`` replaced by ``replace``."""
    import torch.distributed.checkpoint as dcp

    full = torch.load(full_ckpt, weights_only=True)
    state = {"state_dict": {**full["state_dict"], **(replace or {})}, **(extra or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=out, no_dist=True)
    torch.save({k: v for k, v in full.items() if k != "state_dict"}, out / "meta.pt")
    return out


@pytest.fixture
def crafted(tiny_runs, tmp_path):
    marker = tmp_path / "payload-ran"
    directory = _sharded(tiny_runs["mdm"], tmp_path / "run" / "checkpoints" / "evil.ckpt",
                         replace={"model.embed.weight": Payload(marker)})
    tokenizer = tiny_runs["mdm"].parent.parent / "tokenizer.json"
    (directory.parent.parent / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory, marker


COMMANDS = {
    "generate": lambda d, out: ["generate", "--ckpt", str(d), "--prompt", "the quick", "--gen-length", "8",
                                "--steps", "8"],
    "chat": lambda d, out: ["chat", "--ckpt", str(d), "--message", "hello", "--length", "8"],
    "export": lambda d, out: ["export", str(d), "--to", "hf", str(out / "hf")],
    "eval": lambda d, out: ["eval", "--ckpt", str(d), "--task", "hellaswag"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_refuse_a_pickled_weight_entry_in_one_line(command, crafted, tmp_path, capsys):
    directory, marker = crafted
    with pytest.raises(SystemExit) as exit_info:
        main(COMMANDS[command](directory, tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    if command != "eval":  # eval names the checkpoint in its own way; it must still refuse it
        assert "'state_dict.model.embed.weight' (in __0_0.distcp)" in err, err
    if command in ("generate", "export"):
        assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "hf").exists()


def test_library_readers_refuse_it(crafted, tmp_path):
    from lldiff.checkpoint import consolidate_checkpoint, read_checkpoint_meta

    directory, marker = crafted
    for read in (check_sharded_metadata, read_checkpoint_meta, load_model,
                 lambda d: consolidate_checkpoint(d, tmp_path / "full.ckpt")):
        with pytest.raises(UnsafeCheckpointError, match="'state_dict.model.embed.weight' \\(in __0_0.distcp\\)"):
            read(directory)
    assert not marker.exists() and not (tmp_path / "full.ckpt").exists()


def test_sft_init_from_refuses_it(crafted):
    from lldiff.objectives.mdm.modules import MaskedDiffusionSFT

    directory, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match="state_dict.model.embed.weight"):
        MaskedDiffusionSFT(init_from=str(directory), vocab_size=320)
    assert not marker.exists()


def test_fsdp2_resume_and_validate_refuse_it(crafted):
    """``--ckpt_path DIR`` under fsdp2 (fit resuming, validate, test) reads the directory through
    FSDP2Strategy.load_checkpoint, which checks it before Lightning's DCP reader sees it."""
    from lldiff.strategies import FSDP2Strategy

    directory, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match="state_dict.model.embed.weight"):
        FSDP2Strategy().load_checkpoint(directory)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_ckpt_path_refuses_it_under_any_strategy(command, crafted, toy_corpus, cache_dir, tmp_path, capsys):
    """``--ckpt_path DIR`` is checked before a strategy reads it (Lightning's own DCP reader
    would unpickle its byte entries, whatever the strategy)."""
    from test_cli import tiny_args

    directory, marker = crafted
    args = tiny_args("mdm", toy_corpus, cache_dir, tmp_path / "runs", "--ckpt_path", str(directory))
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args[1:]])
    assert exit_info.value.code == 2
    assert "'state_dict.model.embed.weight' (in __0_0.distcp)" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "runs" / "mdm-tiny").exists()


def test_an_optimizer_byte_entry_with_code_is_refused_too(tiny_runs, tmp_path):
    """Outside the weights, byte entries must be plain data (what weights_only=True builds)."""
    marker = tmp_path / "payload-ran"
    directory = _sharded(tiny_runs["ar"], tmp_path / "evil.ckpt",
                         extra={"optimizer_0": {"param_groups": [{"lr": 1e-3, "hook": Payload(marker)}]}})
    with pytest.raises(UnsafeCheckpointError, match="optimizer_0.param_groups.0.hook' \\(in __0_0.distcp\\) is not plain"):
        load_model(directory)
    assert not marker.exists()


def test_plain_byte_entries_like_lldiffs_own_still_load(tiny_runs, tmp_path):
    """An fsdp2 checkpoint stores the optimizer's param_groups as byte entries: they load."""
    groups = [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "fused": None, "params": ["model.embed.weight"]}]
    directory = _sharded(tiny_runs["ar"], tmp_path / "sharded.ckpt", extra={"optimizer_0": {"param_groups": groups}})
    full = torch.load(tiny_runs["ar"], weights_only=True)["state_dict"]
    loaded = load_model(directory)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, full[f"model.{name}"]), name
