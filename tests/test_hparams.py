"""The HParams table puts what a scaling study compares first (issue 24 item 19)."""

from __future__ import annotations

from types import SimpleNamespace

from lldiff import registry
from lldiff.config import SIZES
from lldiff.hparams import hparams_table, run_name


def test_the_headline_columns_sort_first_and_bookkeeping_is_dropped(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    config = SIZES["tiny-0.1M"].replace(vocab_size=320)
    module = SimpleNamespace(
        hparams={"_class_path": "lldiff.modules.MaskedDiffusionLM", "_instantiator": "x", "attn_backend": "sdpa",
                 "betas": (0.9, 0.95), "size": "tiny-0.1M", "lr": 1e-3, "warmup_steps": 2},
        objective=registry.get("mdm"), config=config)
    datamodule = SimpleNamespace(hparams={"seq_len": 32, "batch_size": 8}, seq_len=32, batch_size=8)
    trainer = SimpleNamespace(datamodule=datamodule, max_steps=100, world_size=2, accumulate_grad_batches=3)
    table = hparams_table(module, trainer, run="mdm/tiny-0.1M/C1e+11-seed3")
    assert sorted(table)[:8] == ["0 run", "1 objective", "2 size", "3 n_nonemb", "4 lr", "5 max_steps", "6 tokens",
                                 "7 seed"]  # TensorBoard orders the columns by name
    assert table["0 run"] == "mdm/tiny-0.1M/C1e+11-seed3"  # the whole name, not cut
    assert table["3 n_nonemb"] == config.non_embedding_params() and table["7 seed"] == 3
    assert table["6 tokens"] == 100 * 8 * 2 * 3 * 32
    assert not any(k.startswith("_") for k in table) and "size" not in table and "lr" not in table
    assert table["attn_backend"] == "sdpa" and table["data.seq_len"] == 32


def test_run_name_is_the_loggers_whole_path():
    assert run_name(SimpleNamespace(name="mdm/tiny-0.1M", version="C1e+11")) == "mdm/tiny-0.1M/C1e+11"
    assert run_name(SimpleNamespace(name="0003", version="")) == "0003"
    assert run_name(SimpleNamespace(name="lldiff", version=2)) == "lldiff/version_2"
