"""`lldiff sweep run|plan|analyze`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lldiff.sweep.spec import SweepSpec, load_preset, load_spec, preset_names


def _spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SweepSpec:
    if (args.spec is None) == (args.preset is None):
        parser.error("give a spec file or --preset NAME (one of: " + ", ".join(preset_names()) + ")")
    return load_spec(args.spec) if args.spec else load_preset(args.preset)


def _parallel(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"--parallel must be a positive integer or auto, got {value!r}")
    return k


def _mfu(value: str) -> float:
    try:
        mfu = float(value)
    except ValueError:
        mfu = 0.0
    if not 0 < mfu <= 1:
        raise argparse.ArgumentTypeError(f"--mfu must be a fraction in (0, 1] (0.4 is 40%), got {value!r}")
    return mfu


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lldiff sweep",
        description="Scaling sweeps of the objectives (ar, mdm, bd3-B) on a compute axis: C = 6 N D or real matmul FLOPs.")
    sub = parser.add_subparsers(dest="action", required=True)

    run = sub.add_parser("run", help="run (or resume) a sweep locally, one run after another")
    run.add_argument("spec", nargs="?", type=Path, help="sweep spec YAML")
    run.add_argument("--preset", help="a built-in spec instead: " + ", ".join(preset_names()))
    run.add_argument("--out", type=Path, required=True, help="sweep directory (results.csv, tb/, configs/)")
    run.add_argument("--only", nargs="+", metavar="RUN_ID", help="run just these runs (cluster jobs use this)")
    run.add_argument("--parallel", type=_parallel, default="auto", metavar="K|auto",
                     help="runs at a time in K worker processes, the cores shared out among them; auto (default): "
                          "one per core for a CPU sweep on one device, else 1")

    plan = sub.add_parser("plan", help="print runs, steps, tokens, FLOPs and GPU-hours (CPU-hours for a CPU spec); "
                          "emit cluster scripts")
    plan.add_argument("spec", nargs="?", type=Path, help="sweep spec YAML")
    plan.add_argument("--preset", help="a built-in spec instead: " + ", ".join(preset_names()))
    plan.add_argument("--emit", type=Path, metavar="DIR", help="write sweep.slurm and torchrun.sh into DIR")
    plan.add_argument("--out", type=Path, help="sweep directory the emitted jobs write to, created with spec.yaml "
                      "and logs/ (default: DIR; one of another spec is refused)")
    plan.add_argument("--mfu", type=_mfu, help="model FLOP utilisation in (0, 1] for the GPU-hours, instead of the "
                      "spec's cluster.mfu or the newest measured on cluster.gpu (make gpu-check, benchmarks/scaleout_gpu.py)")

    analyze = sub.add_parser("analyze", help="iso-FLOP fits, scaling laws, compute multiplier, figures, report")
    analyze.add_argument("run_dir", type=Path, help="a sweep directory with results.csv")
    analyze.add_argument("--out", type=Path, help="where figures and report.md go (default RUN_DIR/analysis)")
    analyze.add_argument("--fresh", type=Path, metavar="DIR",
                         help="a repeated-data sweep's fresh-data control (R* from effective data)")
    return parser


def analyze_sweep(run_dir: Path, out: Path | None, fresh: Path | None) -> Path:
    """The iso-FLOP report, or the repeated-data report for a sweep of epochs."""
    import pandas as pd

    from lldiff.sweep.results import RESULTS_FILE

    results = run_dir / RESULTS_FILE
    repeated = results.is_file() and "epochs" in pd.read_csv(results, nrows=1000).dropna(axis=1, how="all")
    if repeated or fresh is not None:
        from lldiff.sweep.repetition_report import analyze_repetition

        return analyze_repetition(run_dir, fresh, out)
    from lldiff.sweep.report import analyze

    return analyze(run_dir, out)


def headline_of(markdown: str) -> str:
    """The report's ``## Headline`` section (empty when it has none), for the console."""
    lines = markdown.splitlines()
    if "## Headline" not in lines:
        return ""
    start = lines.index("## Headline") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip()


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action == "analyze":
        report = analyze_sweep(args.run_dir, args.out, args.fresh)
        headline = headline_of(report.read_text())
        print(f"{headline}\n\nreport: {report}" if headline else f"report: {report}")
        return
    spec = _spec(args, parser)
    if args.action == "run":
        from lldiff.sweep.runner import run_sweep

        run_sweep(spec, args.out, only=args.only, parallel=args.parallel)
        print(f"results: {args.out / 'results.csv'}   analyse: lldiff sweep analyze {args.out}")
        return
    from lldiff.sweep.cluster import check_layout, emit, plan_table
    from lldiff.sweep.plan import make_plan

    plan_runs = make_plan(spec)
    if args.emit:
        check_layout(spec)  # before anything is printed as planned or written
    print(plan_table(spec, plan_runs, mfu=args.mfu))
    if args.emit:
        from lldiff.sweep.runner import prepare_out_dir

        out = (args.out or args.emit).resolve()
        existed = (out / "spec.yaml").is_file()
        prepare_out_dir(spec, out)  # refuses a directory of another spec
        (out / "logs").mkdir(exist_ok=True)  # SLURM will not start a job whose --output dir is missing
        state = "exists, holds this spec: kept" if existed else "created with spec.yaml and logs/"
        print(f"sweep directory {out} ({state}); the jobs write runs and results.csv there")
        for path in emit(spec, plan_runs, out / "spec.yaml", out, args.emit):
            print(f"wrote {path}")
