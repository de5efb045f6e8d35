"""Compare finished runs side by side from their TensorBoard event files.

    python studies/compare_runs.py runs/mdm-tiny runs/ar-tiny
    python studies/compare_runs.py runs/*  --out comparison.md

For each run directory: objective, model size, last logged validation metrics
(``val/nll_per_token``: exact NLL for AR, Monte-Carlo negative ELBO, an upper bound on the
NLL, for the diffusion objectives (MDM, BD3); ``val/bpb``), tokens and SMDM FLOPs (6 N D) trained on, and the best
validation seen. Writes a markdown table to stdout (and atomically to ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from lldiff import objectives as registry
from lldiff.atomic import write_text
from lldiff.sweep.figures import read_scalars as read_event_scalars


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a run, merged over its event files, ordered by step."""
    series = read_event_scalars(run_dir)
    if not series:
        raise FileNotFoundError(f"{run_dir} has no readable TensorBoard event files (events.out.tfevents.*)")
    return {tag: sorted(points.items()) for tag, points in series.items()}


def objective_of(run_dir: Path, model: dict) -> registry.Objective | None:
    """The run's objective: from its config's model class and init args, else from its last
    checkpoint's model config (an SFT run whose block size comes from the checkpoint)."""
    try:
        return registry.of_module(str(model.get("class_path", "")), model.get("init_args") or {})
    except (ValueError, ImportError, AttributeError):
        pass
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        from lldiff.checkpoint import read_checkpoint_meta
        from lldiff.config import ModelConfig

        try:
            state = read_checkpoint_meta(ckpt)["lldiff"]
            return registry.of_checkpoint(state, ModelConfig.from_dict(state["model_config"]))
        except (KeyError, ValueError, OSError):
            pass
    return None


def describe(run_dir: Path) -> dict[str, object]:
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    model = config.get("model", {})
    scalars = read_scalars(run_dir)
    objective = objective_of(run_dir, model)
    nll = scalars.get("val/nll_per_token", [])
    bpb = scalars.get("val/bpb", [])
    last = lambda tag: scalars[tag][-1][1] if scalars.get(tag) else float("nan")  # noqa: E731
    return {
        "run": run_dir.name,
        "objective": objective.label if objective else "?",
        "exact": objective.exact_likelihood if objective else None,
        "size": model.get("init_args", {}).get("size", "?"),
        "step": nll[-1][0] + 1 if nll else 0,
        "tokens": last("trainer/tokens"),
        "flops": last("trainer/flops"),
        "val_nll": nll[-1][1] if nll else float("nan"),
        "val_bpb": bpb[-1][1] if bpb else float("nan"),
        "best_nll": min((v for _, v in nll if v == v), default=float("nan")),
    }


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| run | objective | size | step | tokens | FLOPs (6ND) | val nats/token | val bits/byte | best nats/token |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['objective']} | {r['size']} | {r['step']} | {r['tokens']:.3g} | {r['flops']:.3g} "
            f"| {r['val_nll']:.4f} | {r['val_bpb']:.4f} | {r['best_nll']:.4f} |"
        )
    lines.append("")
    bounds = sorted({str(r["objective"]) for r in rows if r.get("exact") is False})
    exact = sorted({str(r["objective"]) for r in rows if r.get("exact") is True})
    if bounds:
        lines.append(f"{', '.join(bounds)}: Monte-Carlo negative ELBO per token (an upper bound on the NLL).")
    if exact:
        lines.append(f"{', '.join(exact)}: exact NLL per token.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        parser.error(f"not a run directory: {', '.join(missing)}")
    table = markdown([describe(run) for run in args.runs])
    print(table)
    if args.out:
        write_text(args.out, table + "\n")


if __name__ == "__main__":
    sys.exit(main())
