"""A run's numbers stay its own: a resume keeps the schedule and the batch shape (refused
otherwise, before anything is written), a standalone validate logs apart from the training
curves, and every fit ends with a validation of its final weights."""

import glob
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lldiff.launch import lightning_cli
from lldiff.run_facts import check_resume
from test_cli import tiny_args


def event_files(directory: Path) -> dict[str, int]:
    return {p: Path(p).stat().st_size for p in glob.glob(str(directory / "events*"))}


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    tags: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(str(directory / "events*"))):
        events = EventAccumulator(path)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            tags.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return tags


@pytest.fixture(scope="module")
def runs(toy_corpus, cache_dir, tmp_path_factory):
    """The save_dir of a finished 12-step AR run, ``ar-tiny`` (validated at steps 6 and 12)."""
    out = tmp_path_factory.mktemp("runs")
    lightning_cli(tiny_args("ar", toy_corpus, cache_dir, out))
    return out


@pytest.fixture
def run(runs):
    return runs / "ar-tiny"


@pytest.mark.parametrize("extra,named", [
    (["--trainer.max_steps", "20"], r"trainer.max_steps=20 \(the run's: 12;"),
    (["--data.init_args.batch_size", "4"], r"data.batch_size=4 x 1 process\(es\) = 4 rows per step \(the run's: 8 x 1 = 8\)"),
    (["--data.init_args.seq_len", "16"], r"data.seq_len=16 \(the run's: 32\)"),
])
def test_a_resume_keeps_the_schedule_and_batches_and_a_refusal_writes_nothing(
        runs, run, extra, named, toy_corpus, cache_dir):
    config, before = (run / "config.yaml").read_bytes(), event_files(run)
    with pytest.raises(ValueError, match=named):
        lightning_cli(tiny_args("ar", toy_corpus, cache_dir, runs, "--ckpt_path", "last", *extra))
    assert (run / "config.yaml").read_bytes() == config and event_files(run) == before
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


def test_refused_fits_leave_no_event_file(runs, run, toy_corpus, cache_dir):
    """A fresh fit into the run and a resume refused while restoring (another model) add no
    event file to it."""
    before = event_files(run)
    with pytest.raises(ValueError, match="already holds a run"):
        lightning_cli(tiny_args("ar", toy_corpus, cache_dir, runs))
    assert event_files(run) == before
    with pytest.raises(ValueError, match="differs from this one: n_layer"):
        lightning_cli(tiny_args("ar", toy_corpus, cache_dir, runs, "--ckpt_path", "last",
                                "--model.init_args.model_overrides", "{n_layer: 3}"))
    assert event_files(run) == before


def test_the_global_batch_is_compared_across_process_counts():
    """2 processes x 8 rows resume as 1 x 16 (the same rows per step); 1 x 8 do not."""
    saved = {"max_steps": 10, "batch_size": 8, "world_size": 2, "seq_len": 32}
    check_resume("x.ckpt", saved, {**saved, "batch_size": 16, "world_size": 1})
    with pytest.raises(ValueError, match=r"data.batch_size=8 x 1 process\(es\) = 8 rows per step \(the run's: 8 x 2 = 16\)"):
        check_resume("x.ckpt", saved, {**saved, "world_size": 1})
    old = {"max_steps": None, "batch_size": 8, "world_size": None, "seq_len": 32}  # before the facts were saved
    check_resume("x.ckpt", old, {**saved, "max_steps": 99, "world_size": 1})
    with pytest.raises(ValueError, match=r"data.batch_size=4 \(the run's: 8\)"):
        check_resume("x.ckpt", old, {**saved, "batch_size": 4, "world_size": 1})


def test_standalone_validate_logs_apart_from_the_run(run, recwarn):
    """`lldiff validate` of a run writes its own event file under RUN/validate/<time>: the
    run's curves and hparams stay as they were (and its checkpoint callback is not told that
    the checkpoints moved there)."""
    before, hparams = event_files(run), (run / "hparams.yaml").read_bytes()
    lightning_cli(["validate", "--config", str(run / "config.yaml"), "--ckpt_path",
                   str(run / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar", "false"])
    assert event_files(run) == before and (run / "hparams.yaml").read_bytes() == hparams
    (own,) = (run / "validate").iterdir()
    assert len(scalars(own)["val/nll_per_token"]) == 1 and not (own / "checkpoints").exists()
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


@pytest.mark.parametrize("at_end", [True, False])
def test_a_fit_shorter_than_val_check_interval_ends_validated(at_end, toy_corpus, cache_dir, tmp_path):
    extra = [] if at_end else ["--validate_at_end", "false"]
    lightning_cli(tiny_args("ar", toy_corpus, cache_dir, tmp_path, "--trainer.max_steps", "5",
                            "--trainer.val_check_interval", "100", *extra))
    tags = scalars(tmp_path / "ar-tiny")
    # Lightning's TensorBoard steps count from 0: the validation after step 5 is at 4
    assert ([step for step, _ in tags["val/nll_per_token"]] == [4]) if at_end else "val/nll_per_token" not in tags


def test_a_fit_validated_at_its_last_step_is_not_validated_twice(run):
    assert [step for step, _ in scalars(run)["val/nll_per_token"]] == [5, 11]  # after steps 6 and 12
