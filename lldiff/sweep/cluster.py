"""The same sweep on cluster nodes: a plan table with a device-hours estimate, SLURM array and
torchrun scripts. Each job runs ``lldiff sweep run SPEC --out DIR --only RUN_ID``: the same
code path as a local sweep (resume, final validation, atomic results), with Lightning's
SLURM / torchrun environment detection supplying ranks and devices.

The estimate is for the spec's device kind (``trainer.accelerator``): GPU-hours at an MFU of
``cluster.gpu``'s peak, or, for a CPU spec, CPU process-hours at the fp32 matmul rate measured
on this machine (:func:`lldiff.flops.cpu_matmul_flops`), which the plan says."""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from lldiff.flops import PEAK_TFLOPS, cpu_matmul_flops, matmul_precision
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


def runs_on_cpu(spec: SweepSpec) -> bool:
    """Whether the spec's runs train on CPUs (``trainer.accelerator: cpu``)."""
    return str(spec.trainer.get("accelerator", "auto")) == "cpu"


def plan_table(spec: SweepSpec, plan: list[RunPlan], mfu: float | None = None) -> str:
    """The runs with their device-hours, totals, and where the rate comes from: for a GPU
    spec, the MFU (``mfu`` = ``--mfu`` overrides the spec's and the measured one) of the GPU's
    peak; for a CPU spec, this machine's measured fp32 matmul rate (times ``mfu`` if given)."""
    cpu = runs_on_cpu(spec)
    if cpu:
        rate = cpu_matmul_flops()
        fraction = mfu if mfu is not None else spec.cluster.mfu
        per_second = {o: rate * (fraction or 1.0) for o in dict.fromkeys(r.objective for r in plan)}
    else:
        found = measurements()
        choices = {o: plan_mfu(spec, o, mfu, found) for o in dict.fromkeys(r.objective for r in plan)}
        peak, peak_source = plan_peak(spec)
        per_second = {o: c.value * peak * 1e12 for o, c in choices.items()}
    unit = "CPU-h" if cpu else "GPU-h"
    points = (f"{len(spec.epochs)} epoch counts over U={plan[0].unique_tokens:,} unique tokens" if spec.epochs
              else f"{len(spec.budgets)} budgets")
    cells = len({(r.size, r.budget) for r in plan})
    window = f", D/N in [{spec.tokens_per_param[0]:g}, {spec.tokens_per_param[1]:g}]" if spec.tokens_per_param else ""
    lines = [
        f"sweep {spec.name!r}: {len(plan)} runs = {len(spec.objectives)} objectives x {cells} cells (of "
        f"{len(spec.sizes)} sizes x {points}{window}) x {len(spec.seeds)} seed(s), {plan[0].tokens_per_step:.0f} "
        f"tokens/step; compute axis {spec.compute}: {COMPUTE_AXES[spec.compute]}",
        f"{'#':>3} {'run':<34} {'N':>13} {'steps':>8} {'tokens':>10} {'D/N':>7} {'FLOPs':>10} {unit:>8}",
    ]
    total_hours = 0.0
    for run in plan:
        hours = matmul_flops(spec, run) / per_second[run.objective] / 3600.0
        total_hours += hours
        lines.append(
            f"{run.index:>3} {run.run_id:<34} {run.n_nonemb:>13,} {run.max_steps:>8} {run.tokens:>10.3g} "
            f"{run.tokens_per_param:>7.3g} {run.flops:>10.3g} {hours:>8.3g}"
        )
    totals = (f"total: {sum(r.tokens for r in plan):.3g} tokens, {sum(r.flops for r in plan):.3g} FLOPs ({spec.compute}), "
              f"{sum(matmul_flops(spec, r) for r in plan):.3g} real matmul FLOPs, ")
    if cpu:
        given = "" if fraction is None else f" x {_percent(fraction)} ({'--mfu' if mfu is not None else 'cluster.mfu'})"
        lines.append(totals + f"~{total_hours:.3g} CPU process-hours at {rate / 1e9:.1f} GFLOP/s{given}")
        lines.append(f"a CPU spec (trainer.accelerator: cpu): hours at the fp32 matmul rate measured on this machine "
                     f"now (lldiff.flops.cpu_matmul_flops, 1024x1024 matrices, {torch.get_num_threads()} thread(s): "
                     f"{rate / 1e9:.1f} GFLOP/s per process), not a GPU's"
                     + ("; tiny models train at another rate (small matmuls, the rest of a step, other "
                        "processes), so take it as an order of magnitude; --mfu F scales it" if fraction is None else ""))
        return "\n".join(lines)
    values = {c.value for c in choices.values()}
    mfus = (_percent(values.pop()) if len(values) == 1
            else ", ".join(f"{o} {_percent(c.value)}" for o, c in choices.items()))
    lines.append(totals + f"~{total_hours:.3g} GPU-hours at MFU {mfus} of {peak:g} TFLOP/s ({peak_source})")
    lines.append(mfu_source(spec, choices, mfu, found))
    return "\n".join(lines)


def check_layout(spec: SweepSpec) -> None:
    """Refuse a spec whose runs would not fill the jobs' allocation: ``trainer.num_nodes`` must
    be ``cluster.nodes_per_run`` and an integer ``trainer.devices`` ``cluster.gpus_per_run``
    (devices per node; a CPU spec's processes per node)."""
    c, trainer = spec.cluster, spec.trainer
    nodes, devices = trainer.get("num_nodes", 1), trainer.get("devices", 1)
    differ = []
    if isinstance(nodes, int) and nodes != c.nodes_per_run:
        differ.append(f"trainer.num_nodes={nodes} but cluster.nodes_per_run={c.nodes_per_run}")
    if isinstance(devices, int) and devices > 0 and devices != c.gpus_per_run:
        differ.append(f"trainer.devices={devices} but cluster.gpus_per_run={c.gpus_per_run}")
    if differ:
        raise ValueError(f"sweep spec {spec.name!r}: {'; '.join(differ)}: each job would allocate what its run does "
                         "not use, or start fewer processes than the run waits for; make them equal")


def _environment_lines(spec: SweepSpec) -> list[str]:
    """``cluster.setup``, or, without one, lines saying which environment the job runs in."""
    if spec.cluster.setup:
        return [spec.cluster.setup]
    return [
        "# No cluster.setup in the spec: the job runs in the environment it was started from (sbatch",
        "# exports it); put `source VENV/bin/activate` or `module load ...` in cluster.setup.",
        'command -v lldiff >/dev/null || { echo "lldiff is not on PATH; set cluster.setup in the spec" >&2; exit 1; }',
        'echo "lldiff: $(command -v lldiff) on $(hostname)"',
    ]


def _sweep_command(spec_file: Path, out: Path, run_id: str) -> str:
    return f"lldiff sweep run {shlex.quote(str(spec_file))} --out {shlex.quote(str(out))} --only {shlex.quote(run_id)}"


def slurm_script(spec: SweepSpec, plan: list[RunPlan], spec_file: Path, out: Path) -> str:
    c = spec.cluster
    run_ids = " ".join(shlex.quote(r.run_id) for r in plan)
    gres = "" if runs_on_cpu(spec) else f"#SBATCH --gres=gpu:{c.gpus_per_run}\n"
    environment = "\n".join(_environment_lines(spec))
    return f"""#!/bin/bash
#SBATCH --job-name=lldiff-{spec.name}
#SBATCH --array=0-{len(plan) - 1}
#SBATCH --partition={c.partition}
#SBATCH --nodes={c.nodes_per_run}
#SBATCH --ntasks-per-node={c.gpus_per_run}
{gres}#SBATCH --cpus-per-task={c.cpus_per_task}
#SBATCH --time={c.time}
#SBATCH --output={out}/logs/%A_%a.out
#SBATCH --requeue
# One sweep run per array task. Lightning's SLURMEnvironment picks up ranks from srun; a
# requeued or re-submitted task resumes from its last checkpoint, and a finished run is
# skipped. trainer.devices / num_nodes equal cluster.gpus_per_run / nodes_per_run (checked).
set -euo pipefail
{environment}
RUNS=({run_ids})
srun lldiff sweep run {shlex.quote(str(spec_file))} --out {shlex.quote(str(out))} --only "${{RUNS[$SLURM_ARRAY_TASK_ID]}}"
"""


def torchrun_commands(spec: SweepSpec, plan: list[RunPlan], spec_file: Path, out: Path) -> str:
    """One torchrun per run: ``--standalone`` on one node; with ``nodes_per_run > 1`` a c10d
    rendezvous at ``$MASTER_ADDR:$MASTER_PORT`` (``--standalone`` would ignore ``--nnodes``),
    the same script started on every node of the run."""
    c = spec.cluster
    lines = ["#!/bin/bash"]
    if c.nodes_per_run > 1:
        lines += [
            f"# One torchrun per sweep run, each over {c.nodes_per_run} nodes x {c.gpus_per_run} processes: start",
            "# this script on every node of the run at once, with MASTER_ADDR (the first node's address,",
            "# reachable from the others) and optionally MASTER_PORT (default 29500) set alike on all of them.",
            "# Each run resumes from its checkpoint and a finished one is skipped.",
            "set -euo pipefail",
            ': "${MASTER_ADDR:?set MASTER_ADDR to the first node\'s address on every node}"',
            'MASTER_PORT="${MASTER_PORT:-29500}"',
        ]
    else:
        lines += [
            "# One torchrun per sweep run (run them on any node, in any order or in parallel; each",
            "# resumes from its checkpoint and a finished one is skipped).",
            "set -euo pipefail",
        ]
    lines += _environment_lines(spec)
    for run in plan:
        command = _sweep_command(spec_file, out, run.run_id).replace("lldiff ", "-m lldiff.cli ", 1)
        if c.nodes_per_run > 1:
            rendezvous = (f"--nnodes={c.nodes_per_run} --nproc-per-node={c.gpus_per_run} --rdzv-backend=c10d "
                          f'--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id=lldiff-{spec.name}-{run.index}')
            lines.append(f"torchrun {rendezvous} {command}")
        else:
            lines.append(f"torchrun --standalone --nproc-per-node={c.gpus_per_run} {command}")
    return "\n".join(lines) + "\n"


def emit(spec: SweepSpec, plan: list[RunPlan], spec_file: Path, out: Path, target: Path) -> list[Path]:
    """Write ``sweep.slurm`` and ``torchrun.sh`` into ``target``; returns their paths. A spec
    whose trainer layout differs from its cluster's is refused first (:func:`check_layout`)."""
    check_layout(spec)
    paths = [target / "sweep.slurm", target / "torchrun.sh"]
    write_text(paths[0], slurm_script(spec, plan, spec_file, out))
    write_text(paths[1], torchrun_commands(spec, plan, spec_file, out))
    for path in paths:
        path.chmod(0o755)
    return paths
