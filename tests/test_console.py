"""A fit's console: lldiff's own lines and Lightning's progress, none of the third-party noise
(issue 24 item 14), and a progress bar that counts steps (item 15)."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest

from lldiff import registry
from lldiff.config import SIZES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def lightning_info():
    """Lightning's loggers at INFO (another test may have left them at WARNING)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def test_fit_console_is_lldiff_lines_and_progress_only(toy_corpus, cache_dir, tmp_path, capfd, caplog, lightning_info):
    from lldiff.launch import lightning_cli

    lightning_cli([
        "fit", "--config", str(REPO / "configs" / "mdm-tiny.yaml"),
        "--model.init_args.size", "tiny-0.1M", "--model.init_args.warmup_steps", "1",
        "--data.init_args.source", "files", "--data.init_args.paths", f"[{toy_corpus}]",
        "--data.init_args.max_bytes", "null", "--data.init_args.vocab_size", "320",
        "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4", "--data.init_args.val_max_rows", "4",
        "--data.init_args.cache_dir", str(cache_dir), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    out, err = capfd.readouterr()
    # what Lightning's loggers printed (after other tests, their handler may hold an earlier stderr)
    logged = [record.getMessage() for record in caplog.records if record.levelno >= 20]
    console = (out + err).replace("\r", "\n") + "\n".join(logged)
    for noise in ("GPU available", "TPU available", "Seed set to", "Total FLOPs", "FLOPs ┃", "`Trainer.fit` stopped",
                  "Epoch 0/-"):
        assert noise not in console, noise
    lines = [re.sub(r"^INFO: ", "", line.strip()) for line in err.replace("\r", "\n").splitlines() if line.strip()]
    lines += [line for line in logged if line not in lines]
    progress = re.compile(r"\d+/\d+ \[")  # a tqdm bar (the data's tokenising)
    others = [line for line in lines if not line.startswith("lldiff ") and not progress.search(line)]
    assert lines and not others, others  # stderr: lldiff's lines and progress only
    model = next(line[line.index("lldiff model:"):] for line in lines if "lldiff model:" in line)  # a bar may share its line
    config = SIZES["tiny-0.1M"].replace(vocab_size=320, **registry.get("mdm").model_fields(320))
    flops = registry.get("mdm").matmul_flops_per_token(config, 32)
    assert f"N = {config.non_embedding_params():,} non-embedding" in model
    assert f"{flops:.4g} training FLOPs per token at length 32" in model
    assert re.search(r"step: 4/4", out), out[-500:]  # the bar counts steps of max_steps


def test_evaluation_advice_is_dropped_and_other_warnings_kept():
    from lldiff.quiet import quiet_evaluation_advice

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_evaluation_advice():
            warnings.warn("Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be "
                          "provided during `Trainer` instantiation. Please add the following callbacks: ['X'].")
            warnings.warn("Using `DistributedSampler` with the dataloaders. During `trainer.validate()`, it is "
                          "recommended to use `Trainer(devices=1, num_nodes=1)`")
            warnings.warn("something else")
    assert [str(w.message) for w in caught] == ["something else"]


def test_optuna_study_creation_is_silent(tmp_path, capfd):
    import optuna

    import lldiff  # noqa: F401  (installs the filters)

    optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    optuna.create_study()
    out, err = capfd.readouterr()
    assert "A new study created" not in out + err


def test_other_lightning_info_lines_stay(caplog):
    """Only the listed messages are dropped: another record of the same logger passes."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        logger.info("GPU available: False, used: False")
        logger.info("Restoring states from the checkpoint path at x.ckpt")
    assert [r.getMessage() for r in caplog.records] == ["Restoring states from the checkpoint path at x.ckpt"]
