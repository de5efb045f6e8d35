"""The same sweep on GPU nodes: a plan table with a GPU-hours estimate, SLURM array and
torchrun scripts. Each job runs ``lldiff sweep run SPEC --out DIR --only RUN_ID``: the same
code path as a local sweep (resume, final validation, atomic results), with Lightning's
SLURM / torchrun environment detection supplying ranks and devices."""

from __future__ import annotations

import shlex
from pathlib import Path

from lldiff.flops import PEAK_TFLOPS, matmul_precision
from lldiff.sweep.measured import DEFAULT_MFU, GPU_CHECK, Measurement, MfuChoice, choose_mfu, measurements
from lldiff.sweep.plan import RunPlan, matmul_flops
from lldiff.atomic import write_text
from lldiff.sweep.spec import COMPUTE_AXES, SweepSpec


def plan_precision(spec: SweepSpec) -> str:
    """The matmul precision of the spec's runs (``trainer.precision``; lldiff leaves TF32 off,
    so ``32-true`` is fp32)."""
    precision = str(spec.trainer.get("precision", "32-true"))
    try:
        return matmul_precision(precision, tf32=False)
    except ValueError as err:
        raise ValueError(f"sweep spec {spec.name!r}: trainer.precision={precision!r}: {err}") from None


def plan_peak(spec: SweepSpec) -> tuple[float, str]:
    """(peak TFLOP/s per GPU, where it comes from): ``cluster.peak_tflops`` if given, else the
    dense peak of ``cluster.gpu`` at the runs' matmul precision."""
    cluster = spec.cluster
    if cluster.peak_tflops is not None:
        return float(cluster.peak_tflops), "cluster.peak_tflops"
    precision = plan_precision(spec)
    peak = PEAK_TFLOPS[cluster.gpu].get(precision)
    if peak is None:
        raise ValueError(f"sweep spec {spec.name!r}: {cluster.gpu} has no {precision} peak in lldiff.flops.PEAK_TFLOPS; "
                         "set cluster.peak_tflops")
    return peak, f"{cluster.gpu} dense {precision} peak"


def plan_mfu(spec: SweepSpec, objective: str, mfu: float | None = None,
             found: list[Measurement] | None = None) -> MfuChoice:
    """The MFU of one objective's runs: ``mfu`` (``--mfu``), else ``cluster.mfu``, else the one
    measured on ``cluster.gpu`` at the runs' precision (``lldiff.sweep.measured``), else 40%."""
    given = mfu if mfu is not None else spec.cluster.mfu
    found = measurements() if found is None else found
    return choose_mfu(objective, spec.cluster.gpu, plan_precision(spec), given, found)


def gpu_hours(spec: SweepSpec, run: RunPlan, mfu: float | None = None) -> float:
    """Estimated GPU-hours of a run: real matmul FLOPs (head and attention included) over
    ``MFU x peak`` per GPU (:func:`plan_mfu`, :func:`plan_peak`)."""
    return matmul_flops(spec, run) / (plan_mfu(spec, run.objective, mfu).value * plan_peak(spec)[0] * 1e12) / 3600.0


def _percent(value: float) -> str:
    return f"{value:.1%}".replace(".0%", "%")


def mfu_source(spec: SweepSpec, choices: dict[str, MfuChoice], mfu: float | None,
               found: list[Measurement]) -> str:
    """One line saying where the plan's MFU comes from."""
    gpu, precision = spec.cluster.gpu, plan_precision(spec)
    here = [m for m in found if m.gpu == gpu and m.precision == precision]
    measured_here = ""
    if here:
        measured_here = (f"; measured on {gpu} at {precision} by {here[0].benchmark} for {here[0].size}: "
                         + ", ".join(m.describe() for m in here) + f" ({here[0].source})")
    origins = {c.origin for c in choices.values()}
    if origins == {"given"}:
        where = "given by --mfu" if mfu is not None else "from the spec's cluster.mfu, not measured"
        return f"MFU {_percent(next(iter(choices.values())).value)} {where}{measured_here}"
    if origins == {"assumed"}:
        elsewhere = sorted({f"{m.gpu} at {m.precision}" for m in found})
        return (f"MFU {_percent(DEFAULT_MFU)} assumed: nothing measured on {gpu} at {precision}"
                + (f" (measured: {', '.join(elsewhere)})" if elsewhere else "")
                + f"; give --mfu or cluster.mfu, or run `make gpu-check` ({GPU_CHECK}) on that GPU")
    first = next(c.measurement for c in choices.values() if c.measurement is not None)
    parts = []
    for objective, choice in choices.items():
        if choice.origin == "measured":
            parts.append(choice.measurement.describe())
        else:  # measured-other-objective
            parts.append(f"{objective} not measured: the lowest measured, {_percent(choice.value)}")
    dated = f" on {first.measured_at[:10]}" if first.measured_at else ""
    return (f"MFU measured by {first.benchmark}{dated} on {first.device_name} at {precision} for {first.size}, "
            f"{first.batch} x {first.seq_len} tokens per step: {', '.join(parts)} ({first.source}); "
            "the same assumed for every size")


def plan_table(spec: SweepSpec, plan: list[RunPlan], mfu: float | None = None) -> str:
    """The runs with their GPU-hours, totals, and where the MFU and the peak come from;
    ``mfu`` (``--mfu``) overrides the spec's and the measured one."""
    found = measurements()
    choices = {o: plan_mfu(spec, o, mfu, found) for o in dict.fromkeys(r.objective for r in plan)}
    peak, peak_source = plan_peak(spec)
    points = (f"{len(spec.epochs)} epoch counts over U={plan[0].unique_tokens:,} unique tokens" if spec.epochs
              else f"{len(spec.budgets)} budgets")
    cells = len({(r.size, r.budget) for r in plan})
    window = f", D/N in [{spec.tokens_per_param[0]:g}, {spec.tokens_per_param[1]:g}]" if spec.tokens_per_param else ""
    values = {c.value for c in choices.values()}
    mfus = (_percent(values.pop()) if len(values) == 1
            else ", ".join(f"{o} {_percent(c.value)}" for o, c in choices.items()))
    lines = [
        f"sweep {spec.name!r}: {len(plan)} runs = {len(spec.objectives)} objectives x {cells} cells (of "
        f"{len(spec.sizes)} sizes x {points}{window}) x {len(spec.seeds)} seed(s), {plan[0].tokens_per_step:.0f} "
        f"tokens/step; compute axis {spec.compute}: {COMPUTE_AXES[spec.compute]}",
        f"{'#':>3} {'run':<34} {'N':>13} {'steps':>8} {'tokens':>10} {'D/N':>7} {'FLOPs':>10} {'GPU-h':>8}",
    ]
    total_hours = 0.0
    for run in plan:
        hours = matmul_flops(spec, run) / (choices[run.objective].value * peak * 1e12) / 3600.0
        total_hours += hours
        lines.append(
            f"{run.index:>3} {run.run_id:<34} {run.n_nonemb:>13,} {run.max_steps:>8} {run.tokens:>10.3g} "
            f"{run.tokens_per_param:>7.3g} {run.flops:>10.3g} {hours:>8.3g}"
        )
    lines.append(
        f"total: {sum(r.tokens for r in plan):.3g} tokens, {sum(r.flops for r in plan):.3g} FLOPs ({spec.compute}), "
        f"{sum(matmul_flops(spec, r) for r in plan):.3g} real matmul FLOPs, "
        f"~{total_hours:.3g} GPU-hours at MFU {mfus} of {peak:g} TFLOP/s ({peak_source})"
    )
    lines.append(mfu_source(spec, choices, mfu, found))
    return "\n".join(lines)


def _sweep_command(spec_file: Path, out: Path, run_id: str) -> str:
    return f"lldiff sweep run {shlex.quote(str(spec_file))} --out {shlex.quote(str(out))} --only {shlex.quote(run_id)}"


def slurm_script(spec: SweepSpec, plan: list[RunPlan], spec_file: Path, out: Path) -> str:
    c = spec.cluster
    run_ids = " ".join(shlex.quote(r.run_id) for r in plan)
    return f"""#!/bin/bash
#SBATCH --job-name=lldiff-{spec.name}
#SBATCH --array=0-{len(plan) - 1}
#SBATCH --partition={c.partition}
#SBATCH --nodes={c.nodes_per_run}
#SBATCH --ntasks-per-node={c.gpus_per_run}
#SBATCH --gres=gpu:{c.gpus_per_run}
#SBATCH --cpus-per-task={c.cpus_per_task}
#SBATCH --time={c.time}
#SBATCH --output={out}/logs/%A_%a.out
#SBATCH --requeue
# One sweep run per array task. Lightning's SLURMEnvironment picks up ranks from srun; a
# requeued or re-submitted task resumes from its last checkpoint, and a finished run is
# skipped. Set trainer.devices / num_nodes / strategy / precision in the spec to match.
set -euo pipefail
{c.setup}
RUNS=({run_ids})
srun lldiff sweep run {shlex.quote(str(spec_file))} --out {shlex.quote(str(out))} --only "${{RUNS[$SLURM_ARRAY_TASK_ID]}}"
"""


def torchrun_commands(spec: SweepSpec, plan: list[RunPlan], spec_file: Path, out: Path) -> str:
    c = spec.cluster
    lines = [
        "#!/bin/bash",
        "# One torchrun per sweep run (run them on any GPU node, in any order or in parallel;",
        "# each resumes from its checkpoint and a finished one is skipped). For several nodes add",
        "# --nnodes/--rdzv-endpoint as usual.",
        "set -euo pipefail",
    ]
    if c.setup:
        lines.append(c.setup)
    for run in plan:
        command = _sweep_command(spec_file, out, run.run_id).replace("lldiff ", "-m lldiff.cli ", 1)
        lines.append(f"torchrun --standalone --nproc-per-node={c.gpus_per_run} {command}")
    return "\n".join(lines) + "\n"


def emit(spec: SweepSpec, plan: list[RunPlan], spec_file: Path, out: Path, target: Path) -> list[Path]:
    """Write ``sweep.slurm`` and ``torchrun.sh`` into ``target``; returns their paths."""
    paths = [target / "sweep.slurm", target / "torchrun.sh"]
    write_text(paths[0], slurm_script(spec, plan, spec_file, out))
    write_text(paths[1], torchrun_commands(spec, plan, spec_file, out))
    for path in paths:
        path.chmod(0o755)
    return paths
