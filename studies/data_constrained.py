"""Data-constrained training: AR vs MDM on a fixed set of unique tokens, repeated (SPEC §11).

Two sweeps and their analysis, each stage resumable (re-running skips finished runs):

1. ``DIR/repeated``: the ``data-constrained`` preset (or ``--spec``): one model size trained on
   the same U unique tokens for E = 1 .. 128 epochs, one run per (objective, E), each with its
   own schedule ending at E x U tokens; MDM and AR see the same batches and compute.
2. ``DIR/fresh``: the fresh-data control (:func:`lldiff.sweep.plan.fresh_control`): the same
   runs on E x U *distinct* tokens for every E whose tokens fit in one pass over the training
   split. Muennighoff's effective data D' of a repeated run is the fresh-data amount that
   reaches its loss; R* comes from D'(E).
3. ``DIR/report.md`` (+ ``results.json``, figures as PNG and SVG, TensorBoard scalars under
   ``DIR/tb``): loss vs epochs and vs compute, each objective's best epoch count, R* with its
   interval, and the compute where the MDM's loss drops below the AR's, if it does.

    python studies/data_constrained.py --preset cpu --out runs/data-constrained    # make data-constrained
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lldiff.sweep.plan import fresh_control
from lldiff.sweep.runner import run_sweep
from lldiff.sweep.spec import SweepSpec, load_preset, load_spec

PRESETS = {"cpu": "data-constrained"}
"""Study presets -> sweep presets (``lldiff/sweep/presets``)."""


def train_split_tokens(spec: SweepSpec) -> int:
    """Training tokens of the sweep's data without the cap (seq_len per packed row)."""
    from lldiff.data import PretrainDataModule

    data = {k: v for k, v in spec.data.items() if k != "unique_tokens"}
    datamodule = PretrainDataModule(**data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return len(datamodule.train_rows) * datamodule.seq_len


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="study preset (default cpu)")
    source.add_argument("--spec", type=Path, help="a repeated-data sweep spec (epochs + data.unique_tokens) instead")
    parser.add_argument("--out", type=Path, required=True, help="study directory")
    parser.add_argument("--parallel", default="auto", help="runs at a time (see lldiff sweep run --help)")
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh-data control (no R* from D')")
    args = parser.parse_args(argv)
    parallel = args.parallel if args.parallel == "auto" else int(args.parallel)
    spec = load_spec(args.spec) if args.spec else load_preset(PRESETS[args.preset])
    if not spec.epochs:
        parser.error(f"{spec.name!r} is not a repeated-data sweep: give epochs and data.unique_tokens")
    fresh = None if args.no_fresh else fresh_control(spec, train_split_tokens(spec))  # checked before any run
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    run_sweep(spec, args.out / "repeated", parallel=parallel)
    if fresh is not None:
        run_sweep(fresh, args.out / "fresh", parallel=parallel)
    from lldiff.sweep.repetition_report import analyze_repetition

    report = analyze_repetition(args.out / "repeated", args.out / "fresh" if fresh is not None else None, args.out)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
