"""Execute a sweep locally: each run is an ordinary `lldiff fit`, then a final validation.

Re-running the same command skips recorded runs and resumes an interrupted one from its
`last.ckpt` (exactly: see ``tests/test_training.py``). A run's result is appended to
``results.csv`` only after its final validation, atomically and at most once, so killing
the sweep at any moment loses no finished result and never records a run twice.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import yaml

from lldiff.sweep.plan import RunPlan, make_plan, matmul_flops, run_config, seq_len_of, world_batch_rows
from lldiff.atomic import fresh_file, write_text
from lldiff.run_lock import owning
from lldiff.sweep.results import RESULTS_FILE, ResultsTable
from lldiff.sweep.spec import SweepSpec, spec_from_dict

Log = Callable[[str], None]


def check_out_dir(spec: SweepSpec, out: Path) -> ResultsTable:
    """Check that ``out`` is new or belongs to this very spec; reads only."""
    spec_path = out / "spec.yaml"
    if spec_path.is_file():
        existing = spec_from_dict(yaml.safe_load(spec_path.read_text()))
        if existing.fingerprint != spec.fingerprint:
            raise ValueError(
                f"{out} holds a sweep with a different spec ({spec_path}, fingerprint {existing.fingerprint} "
                f"!= {spec.fingerprint}); use another --out directory. Nothing was overwritten."
            )
    table = ResultsTable(out / RESULTS_FILE, spec.fingerprint)
    table.rows()  # fails on a table from another spec, before anything is written
    return table


def prepare_out_dir(spec: SweepSpec, out: Path) -> ResultsTable:
    """Create ``out`` with ``spec.yaml``, or check that it belongs to this very spec. Every
    check reads only; nothing is written into a directory that belongs to another spec."""
    spec_path = out / "spec.yaml"
    table = check_out_dir(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    if not spec_path.is_file():
        write_text(spec_path, spec.to_yaml())
    return table


def check_data(spec: SweepSpec) -> None:
    """Build (or find in the cache) the sweep's one data set and check it can serve every run
    (e.g. ``data.unique_tokens`` within the training split); raises before any run starts.
    Parallel workers then find every cache step built."""
    from lldiff.data import PretrainDataModule

    datamodule = PretrainDataModule(**spec.data)
    datamodule.prepare_data()
    datamodule.setup("fit")


def config_path(out: Path, run: RunPlan) -> Path:
    return out / "configs" / f"{run.index:03d}-{run.run_id.replace('/', '_')}.yaml"


def write_run_configs(spec: SweepSpec, out: Path, plan: list[RunPlan]) -> None:
    for run in plan:
        path = config_path(out, run)
        text = yaml.safe_dump(run_config(spec, run, str(out / "tb")), sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            write_text(path, text)


def execute_run(spec: SweepSpec, out: Path, run: RunPlan, table: ResultsTable) -> dict | None:
    """Fit (resuming if a checkpoint exists), validate with the final K, record the row."""
    from lldiff.launch import lightning_cli, resume_args  # heavy import, only when a run really executes
    from lldiff.quiet import quiet_evaluation_advice

    start = time.perf_counter()
    path = config_path(out, run)
    cli = lightning_cli(["fit", "--config", str(path), *resume_args(yaml.safe_load(path.read_text()))])
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    monte_carlo = "eval_mc_samples" in model.hparams  # a Monte-Carlo validation loss (an ELBO), whatever its name
    if monte_carlo:
        model.hparams.eval_mc_samples = spec.final_val_mc_samples
    loggers, trainer.loggers = trainer.loggers, []  # the final evaluation is not a curve point
    with quiet_evaluation_advice():
        metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    trainer.loggers = loggers
    if not trainer.is_global_zero:
        return None
    hp = model.hparams
    tokens = model.tokens_seen
    flops_6nd = 6.0 * run.n_nonemb * tokens
    flops_matmul = model.matmul_flops_seen or matmul_flops(spec, run)  # a checkpoint from before the counter
    unique = run.unique_tokens
    row = {
        "run_id": run.run_id, "objective": run.objective, "size": run.size, "n_nonemb": run.n_nonemb,
        "budget": run.budget, "seed": run.seed, "max_steps": trainer.global_step, "tokens": tokens,
        "compute": spec.compute, "flops": flops_6nd if spec.compute == "6nd" else flops_matmul,
        "flops_6nd": flops_6nd, "flops_matmul": flops_matmul,
        "unique_tokens": unique if unique is not None else "",
        "epochs": trainer.global_step * world_batch_rows(spec) * seq_len_of(spec) / unique if unique else "",
        "val_nll_per_token": metrics["val/nll_per_token"], "val_bpb": metrics.get("val/bpb", float("nan")),
        "val_mc_samples": spec.final_val_mc_samples if monte_carlo else 0,
        "wall_time_s": round(time.perf_counter() - start, 2), "lr": hp.lr, "warmup_steps": hp.warmup_steps,
        "batch_size": datamodule.batch_size, "seq_len": datamodule.seq_len, "vocab_size": model.config.vocab_size,
        "random_length_prob": hp.random_length_prob,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    table.record(row)
    return row


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def auto_parallel(spec: SweepSpec) -> int:
    """Workers for ``--parallel auto``: one per core for a single-device CPU sweep (tiny
    models gain more from runs side by side than from a second thread per matmul: measured
    1.3-1.4x on 2 cores), else 1 (a GPU run uses its devices itself)."""
    if str(spec.trainer.get("accelerator", "auto")) == "cpu" and spec.trainer.get("devices", 1) in (1, "1"):
        return len(os.sched_getaffinity(0))
    return 1


def run_sweep(
    spec: SweepSpec, out: Path, *, only: list[str] | None = None, parallel: int | str = 1, log: Log = print
) -> list[RunPlan]:
    """Run every planned run not yet recorded in ``out/results.csv``; returns the runs done now.
    ``parallel``: runs at a time in worker processes, or ``"auto"`` (:func:`auto_parallel`)."""
    out = Path(out)
    plan = make_plan(spec)
    check_data(spec)  # before the output directory is touched
    check_out_dir(spec, out)  # also before its lock file is made
    # one sweep per directory; several `--only RUN` jobs (a SLURM array) share it, each run's own
    # directory keeping two of them off one run
    hint = "wait for it to end (jobs with --only RUN may share a directory)"
    with owning(out, "sweep directory", shared=bool(only), hint=hint):
        return _run_planned(spec, out, plan, only, parallel, log)


def _run_planned(spec: SweepSpec, out: Path, plan: list[RunPlan], only: list[str] | None, parallel: int | str,
                 log: Log) -> list[RunPlan]:
    table = prepare_out_dir(spec, out)
    write_run_configs(spec, out, plan)
    if only:
        unknown = set(only) - {r.run_id for r in plan}
        if unknown:
            raise ValueError(f"--only names unknown run(s) {sorted(unknown)}; see `lldiff sweep plan`")
    recorded = table.run_ids()
    todo = [r for r in plan if r.run_id not in recorded and (not only or r.run_id in only)]
    log(f"sweep {spec.name!r}: {len(plan)} runs, {len(recorded)} recorded, {len(todo)} to run -> {out}")
    if not todo:
        return []
    if parallel == "auto":
        parallel = auto_parallel(spec)
    parallel = min(parallel, len(todo))
    work = {r.run_id: matmul_flops(spec, r) for r in todo}  # time scales with real matmul work
    total_work, done_work, started = sum(work.values()), 0.0, time.perf_counter()

    def report(i: int, run: RunPlan, status: str) -> None:
        nonlocal done_work
        done_work += work[run.run_id]
        elapsed = time.perf_counter() - started
        eta = elapsed / done_work * (total_work - done_work)
        log(f"[{i}/{len(todo)}] {run.run_id}: {status}; elapsed {_duration(elapsed)}, left ~{_duration(eta)}")

    if parallel <= 1:
        # the sweep's own progress lines replace Lightning's per-run banners (for the sweep only)
        lightning_log = logging.getLogger("lightning.pytorch")
        level = lightning_log.level
        lightning_log.setLevel(logging.WARNING)
        try:
            for i, run in enumerate(todo, 1):
                log(f"[{i - 1}/{len(todo)}] {run.run_id}: {run.max_steps} steps, {run.tokens:.3g} tokens, "
                    f"{run.flops:.3g} FLOPs")
                row = execute_run(spec, out, run, table)
                report(i, run, f"val {row['val_nll_per_token']:.4f} nats/token" if row else "done")
        finally:
            lightning_log.setLevel(level)
        return todo

    failed = []
    with worker_pool(parallel) as pool:
        # longest runs first (LPT): K workers finish close together
        futures = {pool.submit(_execute_logged, spec, out, run): run
                   for run in sorted(todo, key=lambda r: -work[r.run_id])}
        for i, future in enumerate(as_completed(futures), 1):
            run = futures[future]
            try:
                row = future.result()
            except Exception as err:  # noqa: BLE001 - the other runs go on; named at the end
                failed.append(f"{run.run_id} ({type(err).__name__}: {err}; log: {run_log(out, run)})")
                report(i, run, "FAILED")
                continue
            report(i, run, f"val {row['val_nll_per_token']:.4f} nats/token" if row else "done")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} run(s) failed; re-run the same command to retry them: "
                           + "; ".join(failed))
    return todo


def run_log(out: Path, run: RunPlan) -> Path:
    return out / "logs" / f"{run.index:03d}.log"


@contextmanager
def worker_pool(parallel: int) -> Iterator[ProcessPoolExecutor]:
    """``parallel`` worker processes, each importing Lightning once and running many runs.

    The cores are shared out: each worker uses ``cores // parallel`` intra-op threads (tiny
    models gain more from independent runs side by side than from a second thread per
    matmul). Workers are spawned, not forked, so no OpenMP state is inherited.
    """
    threads = max(1, len(os.sched_getaffinity(0)) // parallel)
    pool = ProcessPoolExecutor(max_workers=parallel, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def _execute_logged(spec: SweepSpec, out: Path, run: RunPlan) -> dict | None:
    """One run in a worker process, its output (Python and native) in ``logs/NNN.log``."""
    log_path = run_log(out, run)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    table = ResultsTable(out / RESULTS_FILE, spec.fingerprint)
    with fresh_file(log_path) as handle, _redirect_output(handle.fileno()):  # replaces a link, never writes through
        return execute_run(spec, out, run, table)


@contextmanager
def _redirect_output(fd: int) -> Iterator[None]:
    """Point this process's stdout and stderr (file descriptors 1 and 2) at ``fd``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for copy in saved:
            os.close(copy)
