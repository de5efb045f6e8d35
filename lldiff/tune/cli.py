"""`lldiff tune run|best`: Optuna search over fit hyperparameters (see README, "Hyperparameter search")."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from lldiff.atomic import fresh_file
from lldiff.tune import TuneError

DEFAULT_STUDY = "lldiff-tune"


def build_parser() -> argparse.ArgumentParser:
    from lldiff.tune.study import PRUNERS, SAMPLERS

    parser = argparse.ArgumentParser(
        prog="lldiff tune", description="Optuna hyperparameter search over `lldiff fit` runs. `tune run` also takes "
        "config overrides for every trial, as `lldiff fit` does: --data.init_args.val_max_rows 16, "
        "--trainer.precision bf16-mixed, ...")
    sub = parser.add_subparsers(dest="action", required=True)

    run = sub.add_parser("run", help="run trials until the study holds --n-trials (create or join the study)")
    run.add_argument("--config", type=Path, required=True, help="base fit config (e.g. configs/mdm-tiny.yaml)")
    run.add_argument("--space", type=Path, required=True, help="search space YAML (e.g. configs/tune/lr-warmup.yaml)")
    run.add_argument("--objective", help="ar, mdm or bd3-B, e.g. bd3-4 (default: the config's model.class_path "
                     "and block_size)")
    run.add_argument("--size", help="model size (default: the config's model.init_args.size)")
    run.add_argument("--max-steps", type=int, help="optimizer steps per trial (default: the config's trainer.max_steps)")
    run.add_argument("--evals", type=int, default=4,
                     help="validations per trial, every max_steps/evals steps: the pruning points (default 4)")
    run.add_argument("--n-trials", type=int, required=True,
                     help="trials the STUDY should hold, over all workers (a re-run adds only the missing ones)")
    run.add_argument("--out", type=Path, required=True, help="directory: trials/NNNN (TensorBoard), study.db, logs/")
    run.add_argument("--storage", help="sqlite:///PATH (default OUT/study.db), any RDB URL, or journal:PATH / PATH.log")
    run.add_argument("--study-name", default=DEFAULT_STUDY, help=f"default {DEFAULT_STUDY}")
    run.add_argument("--workers", type=int, default=1,
                     help="worker processes on this machine (this one + K-1 subprocesses; default 1)")
    run.add_argument("--sampler", default="tpe", help=f"one of {', '.join(SAMPLERS)} (default tpe)")
    run.add_argument("--seed", type=int, help="sampler seed (each worker derives its own from it)")
    run.add_argument("--pruner", default="median", help=f"one of {', '.join(PRUNERS)} (default median)")
    run.add_argument("--pruner-startup-trials", type=int, default=5,
                     help="median: finished trials before any pruning (default 5)")
    run.add_argument("--pruner-warmup-steps", type=int, default=0,
                     help="median: no pruning before this global step (default 0)")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep each trial's final last.ckpt")
    run.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)  # set for subprocess workers

    best = sub.add_parser("best", help="trials table and best parameters; optionally write them into a sweep spec")
    best.add_argument("--out", type=Path, help="a `tune run` directory (its tune.json names storage and study)")
    best.add_argument("--storage", help="the study's storage (default: from OUT/tune.json, else OUT/study.db)")
    best.add_argument("--study-name", help=f"default: from OUT/tune.json, else {DEFAULT_STUDY}")
    best.add_argument("--into-spec", metavar="SPEC_OR_PRESET", help="sweep spec file or preset to copy with the best params")
    best.add_argument("--size", help="size_args entry to write (default: the study's size)")
    best.add_argument("--spec-out", type=Path, help="where the updated spec is written (required with --into-spec)")
    return parser


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from lldiff.tune.setup import load_setup, parse_overrides
    from lldiff.tune.storage import resolve_storage
    from lldiff.tune.study import (
        best_trial, bind_out_dir, count_started, make_pruner, make_sampler, open_study, quiet_lightning,
        run_trial, run_worker, summary_table, worker_seed,
    )

    if args.n_trials < 1:
        raise TuneError(f"--n-trials must be >= 1, got {args.n_trials}")
    if args.workers < 1:
        raise TuneError(f"--workers must be >= 1, got {args.workers}")
    if args.pruner_startup_trials < 0 or args.pruner_warmup_steps < 0:
        raise TuneError("--pruner-startup-trials and --pruner-warmup-steps must be >= 0")
    setup = load_setup(args.config, args.space, objective=args.objective, size=args.size,
                       max_steps=args.max_steps, evals=args.evals, keep_checkpoints=args.keep_checkpoints,
                       overrides=parse_overrides(args.overrides))
    pruner = make_pruner(args.pruner, setup, args.pruner_startup_trials, args.pruner_warmup_steps)
    make_sampler(args.sampler, None)  # checks the name before any work
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = resolve_storage(args.storage, out)
    bind_out_dir(out, args.study_name, storage)
    study = open_study(storage, args.study_name, setup, pruner=pruner)
    existing = count_started(study)
    study.sampler = make_sampler(args.sampler, worker_seed(args.seed, args.worker_index, existing))
    tag = f"[worker {args.worker_index}] " if args.workers > 1 or args.worker_index else ""
    print(f"{tag}study {args.study_name!r} in {storage.label}: {existing}/{args.n_trials} trials; "
          f"{setup.objective} {setup.size}, {setup.max_steps} steps, validation every {setup.eval_every}")

    # SIGTERM (kill, scancel, a parent worker giving up) unwinds like Ctrl-C: the running trial is told FAIL
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    children = _launch_workers(args, argv, storage.spec, out) if args.worker_index == 0 else []
    try:
        with quiet_lightning():
            numbers = run_worker(study, storage.claim_lock, args.n_trials, lambda trial: run_trial(setup, trial, out),
                                 log=lambda line: print(tag + line, flush=True))
    except BaseException:
        for process, _ in children:
            process.terminate()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    failed = [(i, log) for i, (process, log) in enumerate(children, 1) if process.wait() != 0]
    print(f"{tag}ran trials {numbers or 'none'}")
    if args.worker_index:
        return 0
    print("\n" + summary_table(study))
    for i, log in failed:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        print(f"\nworker {i} failed; the end of {log}:\n{tail}", file=sys.stderr)
    try:
        best = best_trial(study)
        print(f"\nbest: trial {best.number}, val/nll_per_token {best.value:.4f}: {json.dumps(best.params)}")
    except TuneError as error:
        print(f"\n{error}")
    print(f"next: lldiff tune best --out {out} --into-spec SPEC_OR_PRESET --spec-out NEW.yaml; "
          f"optuna-dashboard {storage.label}")
    return 1 if failed else 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _launch_workers(args: argparse.Namespace, argv: list[str], storage_spec: str, out: Path) -> list:
    """Start ``--workers - 1`` subprocess workers on the same study (logs in OUT/logs)."""
    children = []
    if args.workers > 1:
        (out / "logs").mkdir(exist_ok=True)
    for index in range(1, args.workers):
        command = [sys.executable, "-m", "lldiff.cli", "tune", "run", *argv,
                   "--storage", storage_spec, "--workers", "1", "--worker-index", str(index)]
        log = out / "logs" / f"worker-{index}.log"
        with fresh_file(log) as handle:  # replaces a link standing there, never writes through it
            children.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT), log))
    return children


def _best(args: argparse.Namespace) -> int:
    from lldiff.tune.export import write_best_into_spec
    from lldiff.tune.storage import resolve_storage
    from lldiff.tune.study import BINDING_FILE, SETUP_ATTR, best_trial, load_study, summary_table

    binding = {}
    if args.out is not None and (args.out / BINDING_FILE).is_file():
        binding = json.loads((args.out / BINDING_FILE).read_text())
    if args.storage is None and args.out is None:
        raise TuneError("give --out (a `tune run` directory) or --storage")
    storage_spec = args.storage or binding.get("storage")
    if storage_spec is not None and "***" in storage_spec:
        raise TuneError(f"{args.out / BINDING_FILE} names a storage with a hidden password; give --storage")
    if storage_spec is None and not (args.out / "study.db").is_file():
        raise TuneError(f"{args.out} holds no study.db (nor a {BINDING_FILE}); give the run's --out or --storage")
    storage = resolve_storage(storage_spec, args.out or Path("."))
    study = load_study(storage, args.study_name or binding.get("study_name", DEFAULT_STUDY))
    if args.into_spec is not None and args.spec_out is None:
        raise TuneError("--into-spec needs --spec-out PATH (where the updated spec is written)")
    print(summary_table(study))
    best = best_trial(study)
    print(f"\nbest: trial {best.number}, val/nll_per_token {best.value:.4f}: {json.dumps(best.params)}")
    if args.into_spec is None:
        return 0
    size = args.size or study.user_attrs.get(SETUP_ATTR, {}).get("size")
    if size is None:
        raise TuneError("the study records no size; give --size")
    update = write_best_into_spec(args.into_spec, size, best.params, args.spec_out)
    print(f"wrote {args.spec_out}: size_args[{size}] += {json.dumps(update.written)}")
    for note in update.notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str]) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.action != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra  # `run`: config overrides for every trial, as `lldiff fit` takes them
    try:
        code = _run(args, argv[1:]) if args.action == "run" else _best(args)
    except TuneError as error:
        print(f"lldiff tune: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if code:
        raise SystemExit(code)
