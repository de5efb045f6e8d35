"""Validation of one fixed tiny model on W processes, for row counts not divisible by W.

Run under torchrun (``tests/test_distributed.py`` launches it with 2 and 3 processes and
compares with one process, run in-process through :func:`validate_job`):

    python -m torch.distributed.run --standalone --nproc-per-node 3 \\
        tests/scripts/distributed_validate.py --corpus toy.txt --cache-dir CACHE --out OUT.json

Rank 0 writes ``{"<objective>/<strategy>/<rows>": val/nll_per_token, ...}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import instantiate_class

from lldiff import registry
from lldiff.data import PretrainDataModule

ROWS = (15, 7, 1)  # validation rows: 5, 3 and 1 batches of BATCH
BATCH = 3


def validate_job(corpus: str, cache_dir: str, *, objective: str, rows: int, strategy: Any = "auto",
                 devices: int = 1) -> float:
    """val/nll_per_token of a tiny model (the same weights on every process) on ``rows``
    validation rows, ``BATCH`` rows per process and batch."""
    L.seed_everything(0, verbose=False)
    dm = PretrainDataModule(source="files", paths=[corpus], vocab_size=320, seq_len=16, batch_size=BATCH,
                            val_max_rows=rows, cache_dir=cache_dir)
    spec = registry.get(objective).module_config()
    extra = {} if registry.get(objective).exact_likelihood else {"eval_mc_samples": 2}
    module = instantiate_class((), {**spec, "init_args": {
        **spec["init_args"], "size": "tiny-0.03M", "vocab_size": dm.vocab_size_real, **extra}})
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    return float(metrics["val/nll_per_token"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--objectives", nargs="+", default=["ar", "mdm"])
    parser.add_argument("--strategies", nargs="+", default=["ddp"])
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = {}
    for objective in args.objectives:
        for strategy in args.strategies:
            for rows in args.rows:
                results[f"{objective}/{strategy}/{rows}"] = validate_job(
                    args.corpus, args.cache_dir, objective=objective, rows=rows, strategy=strategy,
                    devices=args.devices)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
