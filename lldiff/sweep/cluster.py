"""The same sweep on GPU nodes: a plan table with a GPU-hours estimate, SLURM array and
torchrun scripts. Each job runs ``lldiff sweep run SPEC --out DIR --only RUN_ID``: the same
code path as a local sweep (resume, final validation, atomic results), with Lightning's
SLURM / torchrun environment detection supplying ranks and devices."""

from __future__ import annotations

import shlex
from pathlib import Path

from lldiff.sweep.plan import RunPlan, matmul_flops
from lldiff.atomic import write_text
from lldiff.sweep.spec import COMPUTE_AXES, SweepSpec


def gpu_hours(spec: SweepSpec, run: RunPlan) -> float:
    """Estimated GPU-hours of a run at the spec's MFU: real matmul FLOPs (head and attention
    included) over ``mfu * peak`` per GPU."""
    return matmul_flops(spec, run) / (spec.cluster.mfu * spec.cluster.peak_tflops * 1e12) / 3600.0


def plan_table(spec: SweepSpec, plan: list[RunPlan]) -> str:
    points = (f"{len(spec.epochs)} epoch counts over U={plan[0].unique_tokens:,} unique tokens" if spec.epochs
              else f"{len(spec.budgets)} budgets")
    cells = len({(r.size, r.budget) for r in plan})
    window = f", D/N in [{spec.tokens_per_param[0]:g}, {spec.tokens_per_param[1]:g}]" if spec.tokens_per_param else ""
    lines = [
        f"sweep {spec.name!r}: {len(plan)} runs = {len(spec.objectives)} objectives x {cells} cells (of "
        f"{len(spec.sizes)} sizes x {points}{window}) x {len(spec.seeds)} seed(s), {plan[0].tokens_per_step:.0f} "
        f"tokens/step; compute axis {spec.compute}: {COMPUTE_AXES[spec.compute]}",
        f"{'#':>3} {'run':<34} {'N':>13} {'steps':>8} {'tokens':>10} {'D/N':>7} {'FLOPs':>10} {'GPU-h':>8}",
    ]
    total_hours = 0.0
    for run in plan:
        hours = gpu_hours(spec, run)
        total_hours += hours
        lines.append(
            f"{run.index:>3} {run.run_id:<34} {run.n_nonemb:>13,} {run.max_steps:>8} {run.tokens:>10.3g} "
            f"{run.tokens_per_param:>7.3g} {run.flops:>10.3g} {hours:>8.3g}"
        )
    lines.append(
        f"total: {sum(r.tokens for r in plan):.3g} tokens, {sum(r.flops for r in plan):.3g} FLOPs ({spec.compute}), "
        f"{sum(matmul_flops(spec, r) for r in plan):.3g} real matmul FLOPs, "
        f"~{total_hours:.3g} GPU-hours at MFU {spec.cluster.mfu:.0%} of {spec.cluster.peak_tflops:g} TFLOP/s"
    )
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
