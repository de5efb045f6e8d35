"""Tiny fits under a strategy, recording the global-batch loss of every step.

Run under torchrun with 2 processes it executes the distributed checks of
``tests/test_distributed.py`` in one launch (imports and process-group start-up are paid
once); ``fit_job`` also serves the test's single-process reference run in-process:

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/scripts/distributed_fit.py --corpus toy.txt --cache-dir CACHE --out OUT

Each job writes ``OUT/<job>.json`` from rank 0: ``losses`` (mean over all ranks' rows,
one per optimizer step), ``tokens_seen``, and where asked ``logits`` of the live model on a
fixed input (``probe_logits``) and the checkpoint written (``ckpt``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class

from lldiff import objectives as registry
from lldiff.callbacks import RunCheckpoint
from lldiff.data import PretrainDataModule
from lldiff.strategies import FSDP2Strategy, count_sharded_blocks

GLOBAL_BATCH = 16
SEQ_LEN = 32
PROBE = torch.arange(2 * SEQ_LEN).remainder(300).view(2, SEQ_LEN)  # fixed input for logits


class LossRecorder(L.Callback):
    """Mean loss over every rank's rows at each step (ranks hold equal batches)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))


class Crash(L.Callback):
    """Fail after ``step`` optimizer steps on every rank, as a killed job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"simulated crash after step {self.step}")


class SimulatedCrash(RuntimeError):
    pass


def build_module(objective: str, **init_args: Any) -> L.LightningModule:
    """The pre-training LightningModule of ``objective`` (a registry name), as LightningCLI
    builds it from the registry's config section."""
    spec = registry.get(objective).module_config()
    return instantiate_class((), {**spec, "init_args": {**spec["init_args"], **init_args}})


def fit_job(
    corpus: str, cache_dir: str, *, objective: str, strategy: Any = "auto", devices: int = 1, steps: int = 12,
    ckpt_dir: str | None = None, ckpt_every: int = 1000, crash_at: int | None = None, resume: str | None = None,
    probe: bool = False,
) -> dict[str, Any]:
    """Fit a tiny model on the toy corpus with a global batch of ``GLOBAL_BATCH`` rows.

    ``ckpt_dir``: RunCheckpoint there (``last.ckpt`` every ``ckpt_every`` steps and at the
    end); ``crash_at``: fail after that step (the result then holds the steps done).
    """
    L.seed_everything(0, verbose=False)
    dm = PretrainDataModule(source="files", paths=[corpus], vocab_size=320, seq_len=SEQ_LEN,
                            batch_size=GLOBAL_BATCH // devices, val_max_rows=16, cache_dir=cache_dir)
    extra = {} if registry.get(objective).exact_likelihood else {"val_mc_samples": 1}  # a bound: Monte Carlo
    module = build_module(objective, size="tiny-0.03M", vocab_size=dm.vocab_size_real, lr=3e-3, warmup_steps=2,
                          random_length_prob=0.0, **extra)
    recorder = LossRecorder()
    callbacks: list[L.Callback] = [recorder]
    if ckpt_dir is not None:
        callbacks.append(RunCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=ckpt_every))
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, callbacks=callbacks,
    )
    try:
        trainer.fit(module, dm, ckpt_path=resume)
    except SimulatedCrash:
        pass
    result: dict[str, Any] = {"losses": recorder.losses, "tokens_seen": module.tokens_seen,
                              "world_size": trainer.world_size, "rank": trainer.global_rank,
                              "sharded_blocks": count_sharded_blocks(module.model)}
    if torch.distributed.is_initialized():
        # the ranks' masking streams must differ (Lightning seeds every process alike)
        states: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, torch.get_rng_state().tolist())
        result["rng_states_distinct"] = len({tuple(s) for s in states}) == len(states)
    if ckpt_dir is not None:
        result["ckpt"] = str(Path(ckpt_dir) / "last.ckpt")
    if probe:
        with torch.no_grad():  # every rank runs it: FSDP2 gathers the weights
            result["logits"] = module.model(PROBE).tolist()
    return result


def jobs(out: Path, ckpt_at: int) -> dict[str, dict[str, Any]]:
    """The distributed checks, in order (2 processes)."""
    return {
        "ddp_ar": dict(objective="ar", strategy="ddp"),
        "ddp_mdm": dict(objective="mdm", strategy="ddp"),
        "fsdp2_full_ar": dict(objective="ar", strategy=FSDP2Strategy(save_distributed_checkpoint=False),
                              ckpt_dir=str(out / "fsdp2_full_ar"), probe=True),
        "fsdp2_mdm": dict(objective="mdm", strategy="fsdp2"),
        # sharded checkpoint after ckpt_at steps, crash two steps later, resume from it
        "fsdp2_mdm_crashed": dict(objective="mdm", strategy="fsdp2", ckpt_dir=str(out / "fsdp2_mdm_crashed"),
                                  ckpt_every=ckpt_at, crash_at=ckpt_at + 2),
        "fsdp2_mdm_resumed": dict(objective="mdm", strategy="fsdp2", ckpt_dir=str(out / "fsdp2_mdm_resumed"),
                                  resume=str(out / "fsdp2_mdm_crashed" / "last.ckpt"), probe=True),
        "fsdp2_ac_ar": dict(objective="ar", strategy="fsdp2_ac"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ckpt-at", type=int, default=5, help="step of the checkpoint the resumed run starts from")
    parser.add_argument("--only", nargs="*", help="run only these jobs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, job in jobs(args.out, args.ckpt_at).items():
        if args.only and name not in args.only:
            continue
        result = fit_job(args.corpus, args.cache_dir, devices=2, steps=args.steps, **job)
        if result["rank"] == 0:
            (args.out / f"{name}.json").write_text(json.dumps(result))
            print(f"{name}: {len(result['losses'])} steps, last loss {result['losses'][-1]:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
