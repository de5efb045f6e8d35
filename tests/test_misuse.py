"""Misuse that once lost data, ran code or silently did something else (issue 12): each is now
an atomic write, a refusal, or one clear line."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import fit_until, tiny_args

from lldiff.checkpoint import load_model, read_checkpoint_meta
from lldiff.checkpoint_io import (
    UnsafeCheckpointError,
    load_sharded_metadata,
    publish_directory,
    replace_directory,
    staging_path,
    write_file_atomically,
)
from lldiff.cli import main
from lldiff.launch import lightning_cli

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def _other_filesystem_than(path: Path) -> Path | None:
    """A writable directory on another filesystem than ``path`` (tmpfs), or None."""
    if SHM.is_dir() and os.access(SHM, os.W_OK) and os.stat(SHM).st_dev != os.stat(path).st_dev:
        return SHM
    return None


# -- 1. a checkpoint write never destroys the previous checkpoint -----------------------------------
WRITER = textwrap.dedent("""
    import sys, torch, lightning as L
    from lldiff.callbacks import use_atomic_checkpoints
    target = sys.argv[1]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    if sys.argv[2] == "lldiff":
        use_atomic_checkpoints(trainer.strategy)  # what `lldiff fit` does to every trainer
    trainer.strategy.save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)
    print("ready", flush=True)
    big = {"step": 2, "w": torch.randn(96 * 2**20)}  # 384 MB: a write that takes a while
    while True:
        trainer.strategy.save_checkpoint(big, target)
""")


def _kill_once(cmd: list[str], writing: callable, env: dict | None = None) -> None:
    """Start a writer script, wait for its "ready" line (first checkpoint complete), poll until
    ``writing()`` says it is in the middle of the next one, then SIGKILL it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        writing()  # the state before the next write
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not writing():
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _kill_mid_write(target: Path, io: str, tmpdir: Path) -> None:
    """Kill the file writer once it has started the big checkpoint: a staging file beside the
    target grows, or the target itself changes."""
    first: list = []

    def writing() -> bool:
        now = target.stat() if target.exists() else None
        if not first:
            first.append(now)
            return False
        staged = [p for p in target.parent.iterdir() if p != target and p.is_file() and p.stat().st_size > 0]
        return bool(staged) or now is None or (now.st_size, now.st_mtime_ns) != (first[0].st_size, first[0].st_mtime_ns)

    _kill_once([sys.executable, "-c", WRITER, str(target), io], writing, env={**os.environ, "TMPDIR": str(tmpdir)})


def test_killed_checkpoint_write_with_tmpdir_on_another_filesystem_keeps_a_loadable_checkpoint(tmp_path):
    """Lightning's own IO stages in $TMPDIR and copies onto the target: killed mid-copy it
    leaves a truncated file. lldiff's is staged beside the target and renamed."""
    other = _other_filesystem_than(tmp_path)
    if other is None:
        pytest.skip("no second filesystem (tmpfs /dev/shm) to put TMPDIR on")
    tmpdir = Path(other) / f"lldiff-test-{os.getpid()}"
    tmpdir.mkdir(exist_ok=True)
    try:
        for attempt in range(3):  # each kill lands mid-write; three of them, at different points
            target = tmp_path / f"run{attempt}" / "last.ckpt"
            target.parent.mkdir()
            _kill_mid_write(target, "lldiff", tmpdir)
            state = torch.load(target, weights_only=True)  # complete: the old or the new one
            assert state["step"] in (1, 2) and state["w"].numel() in (1000, 96 * 2**20)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_staging_file(tmp_path):
    target = tmp_path / "last.ckpt"
    write_file_atomically(target, lambda handle: torch.save({"step": 1}, handle))

    def full_disk(handle):
        handle.write(b"PK" * 1000)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="no space left on the device"):
        write_file_atomically(target, full_disk)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


DIRECTORY_WRITER = textwrap.dedent("""
    import sys, torch, torch.distributed.checkpoint as dcp, warnings
    from lldiff.checkpoint_io import replace_directory
    warnings.simplefilter("ignore")
    target = sys.argv[1]
    with replace_directory(target) as staging:
        dcp.save({"state_dict": {"w": torch.ones(10)}}, checkpoint_id=staging, no_dist=True)
    print("ready", flush=True)
    while True:
        with replace_directory(target) as staging:
            dcp.save({"state_dict": {"w": torch.randn(64 * 2**20)}}, checkpoint_id=staging, no_dist=True)
""")


def test_killed_sharded_checkpoint_write_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "last.ckpt"
    staging = staging_path(target)

    def writing() -> bool:  # the staging directory of the next checkpoint has bytes in it
        files = list(staging.glob("*")) if staging.is_dir() else []
        return any(f.stat().st_size > 0 for f in files if f.exists())

    _kill_once([sys.executable, "-c", DIRECTORY_WRITER, str(target)], writing)
    import torch.distributed.checkpoint as dcp

    from lldiff.checkpoint_io import safe_filesystem_reader

    metadata = load_sharded_metadata(target)
    shape = metadata.state_dict_metadata["state_dict.w"].size
    request = {"state_dict": {"w": torch.empty(shape)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(request, storage_reader=safe_filesystem_reader(target), no_dist=True)
    assert shape[0] in (10, 64 * 2**20)
    if shape[0] == 10:
        assert torch.equal(request["state_dict"]["w"], torch.ones(10))


@pytest.mark.parametrize("exchange", [True, False])
def test_publishing_a_directory_replaces_the_old_one_whole(exchange, tmp_path, monkeypatch):
    import lldiff.checkpoint_io as checkpoint_io

    if not exchange:  # the two-rename fallback (no renameat2)
        monkeypatch.setattr(checkpoint_io, "_exchange", lambda a, b: False)
    target = tmp_path / "last.ckpt"
    with replace_directory(target) as staging:
        (staging / "a").write_text("old")
    with replace_directory(target) as staging:
        (staging / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # nothing staged is left behind
    with pytest.raises(RuntimeError), replace_directory(target) as staging:
        (staging / "c").write_text("half")
        raise RuntimeError("a writer failed")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    staging = staging_path(target)
    staging.mkdir()
    (staging / "d").write_text("newer")
    publish_directory(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["d"]


def test_the_cli_writes_checkpoints_through_the_atomic_io(toy_corpus, cache_dir, tmp_path):
    from lldiff.callbacks import AtomicCheckpointIO

    cli = lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path)[1:], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# -- 2. loading never runs code ---------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_sharded_directory(ckpt: Path, out: Path, marker: Path) -> Path:
    """A directory shaped like an fsdp2 checkpoint (a genuine meta.pt) whose DCP index runs
    a command when unpickled."""
    out.mkdir()
    state = torch.load(ckpt, weights_only=True)
    state.pop("state_dict")
    torch.save(state, out / "meta.pt")
    (out / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return out


def test_a_crafted_sharded_checkpoint_does_not_run_its_payload(tiny_runs, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    crafted = _crafted_sharded_directory(tiny_runs["mdm"], tmp_path / "evil.ckpt", marker)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt", str(crafted), "--prompt", "hello", "--gen-length", "8", "--steps", "8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "posix.system" in err or "os.system" in err
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint_meta(crafted)
    from lldiff.checkpoint import consolidate_checkpoint

    with pytest.raises(UnsafeCheckpointError):
        consolidate_checkpoint(crafted, tmp_path / "out.ckpt")
    assert not marker.exists()


def test_a_genuine_sharded_checkpoint_still_loads(tiny_runs, tmp_path):
    import torch.distributed.checkpoint as dcp

    full = torch.load(tiny_runs["ar"], weights_only=True)
    directory = tmp_path / "sharded.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": full["state_dict"]}, checkpoint_id=directory, no_dist=True)
    torch.save({k: v for k, v in full.items() if k != "state_dict"}, directory / "meta.pt")
    loaded = load_model(directory)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, full["state_dict"][f"model.{name}"]), name


@pytest.mark.parametrize("extra,error", [
    (["--weights_only", "false"], "--weights_only false is refused"),
    (["--ckpt_path", "https://example.com/x.ckpt"], "local paths only"),
])
def test_pickle_loading_options_are_refused(extra, error, toy_corpus, cache_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args("ar", toy_corpus, cache_dir, tmp_path, *extra))
    assert exit_info.value.code == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "ar-tiny").exists()


# -- 3. silent swaps are errors --------------------------------------------------------------------
def test_a_checkpoint_of_another_objective_or_size_is_refused_not_swapped_in(tiny_runs, toy_corpus, cache_dir, tmp_path):
    ar = str(tiny_runs["ar"])
    with pytest.raises(ValueError, match="holds a lldiff.objectives.ar.modules.AutoregressiveLM model but the config asks for "
                                         "lldiff.objectives.mdm.modules.MaskedDiffusionLM"):
        lightning_cli(tiny_args("mdm", toy_corpus, cache_dir, tmp_path, "--ckpt_path", ar))
    with pytest.raises(ValueError, match="size='tiny-0.4M' \\(checkpoint: 'tiny-0.1M'\\)"):
        lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--ckpt_path", ar,
                                "--model.init_args.size", "tiny-0.4M"))


def test_a_checkpoint_of_another_block_size_is_refused_not_swapped_in(tiny_bd3_run, toy_corpus, cache_dir, tmp_path):
    """bd3-4 and bd3-8 share a class and every weight shape: only the block size tells them
    apart, so it is part of what the weights are (a setting from the command line must not
    silently turn one into the other)."""
    bd3 = str(tiny_bd3_run)
    with pytest.raises(ValueError, match="block_size=8 \\(checkpoint: 4\\)"):
        lightning_cli(tiny_args("bd3", toy_corpus, cache_dir, tmp_path, "--ckpt_path", bd3,
                                "--model.init_args.block_size", "8"))
    with pytest.raises(ValueError, match="holds a lldiff.objectives.bd3.modules.BlockDiffusionLM model but the config asks for "
                                         "lldiff.objectives.mdm.modules.MaskedDiffusionLM"):
        lightning_cli(tiny_args("mdm", toy_corpus, cache_dir, tmp_path, "--ckpt_path", bd3))
    assert load_model(bd3, expect="bd3-4").objective.block_size == 4
    with pytest.raises(ValueError, match="holds a BD3-4 model; this needs an MDM checkpoint"):
        load_model(bd3, expect="mdm")


def test_settings_given_with_a_checkpoint_win_over_its_hyperparameters(tiny_runs, toy_corpus, cache_dir, tmp_path):
    """Lightning would replace every model setting by the checkpoint's: the command line's stay."""
    cli = lightning_cli(["validate", *tiny_args("mdm", toy_corpus, cache_dir, tmp_path)[1:], "--trainer.logger", "false",
                         "--ckpt_path", str(tiny_runs["mdm"]), "--model.init_args.eval_mc_samples", "3"])
    assert cli.model.hparams.eval_mc_samples == 3  # the checkpoint says 128


def test_a_refused_resume_leaves_the_run_config_alone(toy_corpus, cache_dir, tmp_path):
    lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path))
    config = tmp_path / "ar-tiny" / "config.yaml"
    before = config.read_bytes()
    with pytest.raises(ValueError, match="differs from this one: n_layer"):
        lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--ckpt_path", "last",
                                "--model.init_args.model_overrides", "{n_layer: 3}"))
    assert config.read_bytes() == before
    assert yaml.safe_load(before)["model"]["init_args"]["model_overrides"] is None


def test_resume_last_without_a_run_says_it_starts_fresh(toy_corpus, cache_dir, tmp_path, capsys, recwarn):
    lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "2"))
    err = capsys.readouterr().err
    assert "no checkpoint to resume in" in err and "starting a new run" in err
    assert not [w for w in recwarn if "no last checkpoint" in str(w.message)]
    assert (tmp_path / "ar-tiny" / "config.yaml").is_file()  # a fresh run writes its config


def test_resuming_mid_epoch_does_not_warn_about_the_dataloader(toy_corpus, cache_dir, tmp_path):
    """Lightning calls the data order "not resumable"; lldiff's datamodule restores it exactly.
    Run as a user does (pytest resets import-time warning filters after collection)."""
    fit_until(tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--trainer.max_steps", "14"), 12)
    resume = tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "14")
    result = subprocess.run([sys.executable, "-m", "lldiff.cli", *resume], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "not resumable" not in result.stderr and "LeafSpec" not in result.stderr
    assert torch.load(tmp_path / "ar-tiny" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 14


def _other_tokenizer(tokenizer_path: Path, out: Path) -> Path:
    """A tokenizer with the same vocabulary size, trained on other text."""
    from lldiff.data.tokenizer import Tokenizer, train_tokenizer

    size = Tokenizer.from_file(tokenizer_path).vocab_size
    texts = [f"zebra quantum {i} xylophone jukebox {i * 7} vortex {i % 13}" for i in range(3000)]
    other = train_tokenizer(texts, vocab_size=size)
    assert other.vocab_size == size and other.fingerprint != Tokenizer.from_file(tokenizer_path).fingerprint
    return other.save(out)


def test_a_tokenizer_from_another_corpus_is_refused(tiny_runs, tmp_path):
    ckpt = tiny_runs["mdm"]
    assert read_checkpoint_meta(ckpt)["lldiff"]["tokenizer_sha256"]
    other = _other_tokenizer(ckpt.parent.parent / "tokenizer.json", tmp_path / "other.json")
    with pytest.raises(ValueError, match="was trained with another tokenizer"):
        load_model(ckpt, tokenizer=other)
    assert load_model(ckpt, tokenizer=ckpt.parent.parent / "tokenizer.json").tokenizer is not None


def test_sft_with_another_tokenizer_is_refused_before_training(tiny_runs, tmp_path):
    from test_sft_training import _sft_file

    other = _other_tokenizer(tiny_runs["ar"].parent.parent / "tokenizer.json", tmp_path / "other.json")
    with pytest.raises(ValueError, match="was trained with another tokenizer"):
        lightning_cli([
            "fit", "--config", str(REPO / "configs" / "sft-ar-tiny.yaml"),
            "--model.init_args.init_from", str(tiny_runs["ar"]), "--data.init_args.tokenizer_path", str(other),
            "--data.init_args.train_files", f"[{_sft_file(tmp_path / 'sft.jsonl')}]",
            "--data.init_args.max_length", "32", "--data.init_args.batch_size", "8", "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
        ])
    assert not (tmp_path / "sft-ar-tiny").exists()  # 5: a failed fit leaves no run directory


# -- 5. one line, exit 2 ----------------------------------------------------------------------------
def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Seed set" not in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("what", ["text", "tokenizer", "missing"])
def test_a_non_checkpoint_given_as_checkpoint_is_one_line(what, tiny_runs, tmp_path, capsys):
    path = {"text": tmp_path / "notes.txt", "tokenizer": tiny_runs["ar"].parent.parent / "tokenizer.json",
            "missing": tmp_path / "nope.ckpt"}[what]
    if what == "text":
        path.write_text("just some words\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt", str(path), "--prompt", "hi"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert str(path) in line and ("is not a checkpoint" in line or "does not exist" in line)


def test_fit_mistakes_are_one_line_and_debug_shows_the_traceback(toy_corpus, cache_dir, tmp_path, capsys):
    args = tiny_args("mdm", toy_corpus, cache_dir, tmp_path, "--model.init_args.size", "smdm-7M")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "unknown model size 'smdm-7M'" in _one_error_line(capsys)
    with pytest.raises(ValueError, match="unknown model size"):
        main([*args, "--debug"])


def test_a_fit_that_fails_in_setup_leaves_no_run_directory(toy_corpus, cache_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(tiny_args("mdm", toy_corpus, cache_dir, tmp_path, "--model.init_args.model_overrides", "{max_seq_len: 16}"))
    assert "exceeds the model's max_seq_len=16" in _one_error_line(capsys)
    assert not (tmp_path / "mdm-tiny").exists()
