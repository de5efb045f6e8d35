"""A run directory is the run's own (issue 24, items 2-5): one process at a time, files written by
replace (never through a link), an import never lands in an existing run, interrupted writes
are cleaned up and a full disk is one line."""

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_cli import tiny_args

from lldiff.cli import main
from lldiff.run_lock import LOCK_FILE, DirectoryInUseError, owning

SHORT = ("--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--checkpoint.every_n_train_steps", "2")
HOLDER = textwrap.dedent("""
    import sys, time
    from lldiff.run_lock import owning
    with owning(sys.argv[1], shared=sys.argv[2] == "shared"):
        print("held", flush=True)
        time.sleep(600)
""")


def _hold(directory: Path, shared: bool = False) -> subprocess.Popen:
    """Another process that owns ``directory`` until killed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), "shared" if shared else "exclusive"],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- 2. one process per run directory -------------------------------------------------------------
def test_a_second_fit_on_a_run_in_use_is_refused_with_the_holders_pid(toy_corpus, cache_dir, tmp_path, capsys):
    run = tmp_path / "ar-tiny"
    holder = _hold(run)
    try:
        before = _tree(run)
        with pytest.raises(SystemExit) as exit_info:
            main(tiny_args("ar", toy_corpus, cache_dir, tmp_path, *SHORT))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"run directory {run} is in use by pid {holder.pid}" in err, err
        assert _tree(run) == before  # nothing written: no config, event file or checkpoint
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with owning(run):  # the killed holder's lock went with it
        pass


@pytest.mark.slow
def test_two_real_fits_on_one_run_directory(toy_corpus, cache_dir, tmp_path):
    """The case that once corrupted a run: a second `lldiff fit` started while the first trains."""
    repo = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "lldiff.cli", *tiny_args("ar", toy_corpus, cache_dir, tmp_path),
            "--trainer.max_steps", "100000", "--checkpoint.every_n_train_steps", "50"]
    first = subprocess.Popen(args, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "ar-tiny"
    try:
        deadline = time.monotonic() + 240
        while not (run / "config.yaml").exists() and time.monotonic() < deadline:  # it owns the run and trains
            assert first.poll() is None, "the first fit ended early"
            time.sleep(0.2)
        second = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"lldiff fit: error: run directory {run} is in use by pid {first.pid}; "), second.stderr[-2000:]
        assert not list((run / "checkpoints").glob("last-v*.ckpt")) if (run / "checkpoints").exists() else True
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait(timeout=30)


def test_two_sweeps_on_one_directory(tmp_path):
    """A full sweep owns its --out; jobs of one array (`--only RUN`) share it, not with a full one."""
    out = tmp_path / "sweep"
    holder = _hold(out, shared=True)
    try:
        with pytest.raises(DirectoryInUseError, match=f"sweep directory {out} is in use by pid {holder.pid}"):
            with owning(out, "sweep directory"):
                pass
        with owning(out, "sweep directory", shared=True):  # another --only job beside it
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_sweep_command_refuses_a_directory_in_use(toy_corpus, cache_dir, tmp_path, capsys):
    import yaml
    from test_sweep import toy_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(toy_spec(toy_corpus, cache_dir).to_dict()))
    out = tmp_path / "sweep"
    holder = _hold(out)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", "run", str(spec), "--out", str(out)])
        assert exit_info.value.code == 2
        assert f"sweep directory {out} is in use by pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no spec.yaml, configs or runs
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"LOCAL_RANK": "1"}, {"NODE_RANK": "1"}, {"SLURM_PROCID": "3"}])
def test_the_other_ranks_of_a_job_take_no_lock(env, tmp_path, monkeypatch):
    """Ranks > 0 of a distributed job (torchrun, Lightning's launcher, SLURM) run inside the
    job's one lock, which its first process holds."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    with owning(tmp_path / "run") as lock:
        assert lock is not None
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with owning(tmp_path / "run") as other:
            assert other is None
    if "RANK" in env:  # the global rank decides when it is known
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("RANK", "0")
        with owning(tmp_path / "run") as lock:
            assert lock is not None


# -- 3. writes replace, never write through a link ------------------------------------------------
def test_run_files_replace_links_instead_of_writing_through_them(toy_corpus, cache_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "runs" / "ar-tiny"
    run.mkdir(parents=True)
    for name in ("config.yaml", "tokenizer.json"):
        (elsewhere / name).write_text("precious\n")
        (run / name).symlink_to(elsewhere / name)
    (run / "hparams.yaml").symlink_to(elsewhere / "created-here.yaml")  # a dangling link
    main(tiny_args("ar", toy_corpus, cache_dir, tmp_path / "runs", *SHORT))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["config.yaml", "tokenizer.json"]
    assert all((elsewhere / n).read_text() == "precious\n" for n in ("config.yaml", "tokenizer.json"))
    for name in ("config.yaml", "tokenizer.json", "hparams.yaml"):
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert "model:" in (run / "config.yaml").read_text()


def test_sweep_logs_and_lock_files_replace_links(tmp_path):
    from lldiff.atomic import fresh_file
    from lldiff.sweep.results import ResultsTable

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "001.log").symlink_to(victim)
    with fresh_file(tmp_path / "001.log") as handle:
        handle.write("a run's output\n")
    (tmp_path / "results.lock").symlink_to(victim)
    ResultsTable(tmp_path / "results.csv", "abc").record({"run_id": "r1"})
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "001.log").read_text() == "a run's output\n" and not (tmp_path / "001.log").is_symlink()
    assert not (tmp_path / "results.lock").is_symlink()


# -- 4. an import never lands in an existing run ---------------------------------------------------
def test_import_refuses_a_non_empty_out(tmp_path, capsys):
    from test_interop import TEXTS, write_llada_dir

    from lldiff.data.tokenizer import train_tokenizer

    hf = write_llada_dir(tmp_path / "hf", train_tokenizer(TEXTS, vocab_size=300))
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text("the run's own tokenizer\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "llada", str(hf), "--out", str(run)])
    assert exit_info.value.code == 2
    assert f"--out {run} exists and is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer.json"]
    assert (run / "tokenizer.json").read_text() == "the run's own tokenizer\n"
    (tmp_path / "empty").mkdir()
    main(["import", "llada", str(hf), "--out", str(tmp_path / "empty")])  # an empty directory is fine
    assert (tmp_path / "empty" / "checkpoints" / "imported.ckpt").is_file()


# -- 5. interrupted writes are cleaned up; a full disk is one line ------------------------------------
def test_a_fit_removes_the_staging_files_that_killed_writes_left(toy_corpus, cache_dir, tmp_path, capsys):
    main(tiny_args("ar", toy_corpus, cache_dir, tmp_path, *SHORT, "--trainer.max_steps", "6"))
    run = tmp_path / "ar-tiny"
    checkpoints = run / "checkpoints"
    stale = [checkpoints / ".last.ckpt.1a2b3c4d.partial", checkpoints / ".last.ckpt.partial",
             run / ".config.yaml.k2j4h5g6.tmp.yaml"]
    stale[0].write_bytes(b"PK" * 1000)
    stale[1].mkdir()
    (stale[1] / "__0_0.distcp").write_bytes(b"x" * 100)
    stale[2].write_text("half")
    kept = [checkpoints / "notes.partial", run / ".keep", tmp_path / ".last.ckpt.9f8e7d6c.partial"]
    for path in kept:
        path.write_text("not a staging file of this run\n")
    capsys.readouterr()
    # the same run again (a resume keeps its max_steps): the start of the fit cleans up
    main(tiny_args("ar", toy_corpus, cache_dir, tmp_path, *SHORT, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    assert "removed 3 file(s) left by interrupted writes of this run" in capsys.readouterr().err
    assert not any(os.path.lexists(p) for p in stale)
    assert all(p.is_file() for p in kept)
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after a few bytes."""

    def write(self, data):
        if self.tell() > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(toy_corpus, cache_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    import builtins

    import lldiff.checkpoint_io as checkpoint_io

    writes = []

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        writes.append(path)
        if mode == "wb" and len(writes) > 1:  # the first checkpoint fits, the next does not
            return _FullDisk(path, "wb")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "open", open_on_a_filling_disk, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args("ar", toy_corpus, cache_dir, tmp_path, *SHORT))
    assert exit_info.value.code == 1
    checkpoints = tmp_path / "ar-tiny" / "checkpoints"
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line.lower()]  # (a cold cache prints its progress)
    assert "Traceback" not in stderr and len(err) == 1, stderr
    assert err[0].startswith(f"lldiff fit: error: checkpoint {checkpoints / 'last.ckpt'} not written: no space left "
                             "on the device after ") and "MiB free on" in err[0] and "previous checkpoint is kept" in err[0]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # the step-2 one; no staging file
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2


def test_a_full_disk_is_recognised_however_the_writer_reports_it(tmp_path):
    """torch.save wraps its file's OSError in a RuntimeError; DCP gathers each rank's failure
    into a CheckpointException (the sharded writer). Both are a full disk, named in one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    from lldiff.checkpoint_io import disk_full_error, no_space

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    except RuntimeError as wrapped:
        assert no_space(wrapped) == errno.ENOSPC
    assert no_space(CheckpointException("save failed", {1: (OSError(errno.EDQUOT, "quota"), None)})) == errno.EDQUOT
    assert no_space(RuntimeError("something else")) is None
    message = str(disk_full_error(tmp_path / "last.ckpt", errno.ENOSPC, 3 * 2**20))
    assert message.startswith(f"checkpoint {tmp_path / 'last.ckpt'} not written: no space left on the device "
                              "after 3.0 MiB of it (") and "there is no earlier checkpoint" in message
