"""Model FLOPs utilisation (MFU) measured on real GPUs, for the sweep plan's GPU-hours.

Two benchmarks write them: ``make gpu-check`` (``benchmarks/gpu_check.py``: the training step
with the user's defaults, per objective, in ``benchmarks/results/gpu-check-<gpu>.json``, dated)
and ``benchmarks/scaleout_gpu.py`` (what ``perf/mfu`` logged, in
``benchmarks/results/scaleout_gpu-<gpu>.json``, undated: older than any dated record).
``lldiff sweep plan`` uses, for the spec's GPU (``cluster.gpu``) and precision, each
objective's figure from the newest record that has one, and says where it comes from. The
figures are found in two places:

* in a source checkout, the benchmark's JSON files themselves (``benchmarks/results`` beside
  the package), so a new benchmark run counts at once;
* otherwise (an installed package has no ``benchmarks/``) :data:`MEASURED`, the same figures
  shipped in this module. A test checks that it equals what the JSON files in the repository
  say; ``python -m lldiff.sweep.measured`` prints it from them after a new benchmark run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lldiff.flops import gpu_table_key, matmul_precision

BENCHMARK = "benchmarks/scaleout_gpu.py"
RESULTS_GLOB = "scaleout_gpu-*.json"
GPU_CHECK = "benchmarks/gpu_check.py"
GPU_CHECK_GLOB = "gpu-check-*.json"
GPU_CHECK_CASE = "defaults"
"""The gpu-check throughput variant a plan uses: what a user's run does (compile, chunked head, fused AdamW)."""
DEFAULT_MFU = 0.4
"""What a plan assumes without a measurement or a given MFU (and says so)."""


@dataclass(frozen=True)
class Measurement:
    """One objective's MFU in one benchmark run on one GPU."""

    gpu: str  # key of lldiff.flops.PEAK_TFLOPS, e.g. "h100-sxm"
    precision: str  # matmul precision of the run (lldiff.flops.PRECISIONS): bf16, tf32, ...
    objective: str  # registry name
    mfu: float
    tokens_per_s: float
    size: str
    batch: int
    seq_len: int
    device_name: str
    case: str  # the benchmark's case name, e.g. "single-mdm"
    source: str  # the JSON file, relative to the repository root
    benchmark: str = BENCHMARK  # the script that measured it
    measured_at: str = ""  # UTC ISO date of the run ("": undated, older than any dated record)

    def describe(self) -> str:
        return f"{self.objective} {self.mfu:.1%} ({self.case})"


#: the newest figures of ``benchmarks/results/{scaleout_gpu,gpu-check}-*.json``, for an installed package
MEASURED: tuple[Measurement, ...] = (
    Measurement(gpu="h100-sxm", precision="bf16", objective="ar", mfu=0.18066845834255219,
                tokens_per_s=190103.5625, size="smdm-113M", batch=16, seq_len=1024,
                device_name="NVIDIA H100 80GB HBM3", case="fsdp2-ar",
                source="benchmarks/results/scaleout_gpu-h100.json"),
    Measurement(gpu="h100-sxm", precision="bf16", objective="mdm", mfu=0.1853381097316742,
                tokens_per_s=195017.078125, size="smdm-113M", batch=16, seq_len=1024,
                device_name="NVIDIA H100 80GB HBM3", case="single-mdm",
                source="benchmarks/results/scaleout_gpu-h100.json"),
    Measurement(gpu="h100-sxm", precision="tf32", objective="mdm", mfu=0.18487074971199036,
                tokens_per_s=97262.65625, size="smdm-113M", batch=16, seq_len=1024,
                device_name="NVIDIA H100 80GB HBM3", case="single-mdm-tf32",
                source="benchmarks/results/scaleout_gpu-h100.json"),
)

_PREFERENCE = ("single", "fsdp2")
"""Cases a plan's figure comes from, best first: one plain device, then FSDP2 without
activation checkpointing (``fsdp2_ac``, ``fsdp2_full`` and the xformers case measure other
things)."""


def repo_results_dir() -> Path | None:
    """``benchmarks/results`` of the source checkout this package runs from, if any."""
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    return results if results.is_dir() else None


def from_report(report: dict[str, Any], source: str) -> list[Measurement]:
    """The plan-worthy figures of one ``scaleout_gpu.py`` report: for each (precision,
    objective), the single-device case if there is one, else the plain FSDP2 one; SDPA only,
    cases that failed or logged no MFU left out."""
    gpu = gpu_table_key(str(report.get("device", "")))
    if gpu is None:
        return []
    best: dict[tuple[str, str], tuple[int, Measurement]] = {}
    for case, result in report.get("cases", {}).items():
        kind = case.split("-", 1)[0]
        if kind not in _PREFERENCE or "error" in result or result.get("mfu") is None:
            continue
        if result.get("backend", "sdpa") != "sdpa" or result.get("activation_checkpointing"):
            continue
        precision = result.get("matmul_precision") or matmul_precision(result["precision"], tf32=case.endswith("tf32"))
        found = Measurement(
            gpu=gpu, precision=precision, objective=result["objective"], mfu=float(result["mfu"]),
            tokens_per_s=float(result["tokens_per_s"]), size=str(report["size"]), batch=int(report["batch"]),
            seq_len=int(report["seq_len"]), device_name=str(report["device"]), case=case, source=source)
        rank = _PREFERENCE.index(kind)
        key = (precision, found.objective)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, found)
    return sorted((m for _, m in best.values()), key=lambda m: (m.gpu, m.precision, m.objective))


def from_gpu_check(report: dict[str, Any], source: str) -> list[Measurement]:
    """The plan-worthy figures of one ``gpu_check.py`` record: each objective's training step
    with the user's defaults at bf16 as a Lightning fit ran it (else the bare step), from a
    full-shape run on a GPU of the peak table (a CPU dry run, tiny shapes, failed or skipped
    rows give nothing)."""
    if report.get("device") != "cuda" or report.get("shapes") != "full":
        return []
    gpu = gpu_table_key(str(report.get("device_name", "")))
    throughput = report.get("sections", {}).get("throughput", {})
    settings = throughput.get("settings", {})
    if gpu is None or settings.get("precision") != "bf16-mixed":
        return []
    found = []
    for objective, variants in throughput.get("rows", {}).items():
        row = variants.get(GPU_CHECK_CASE, {})
        fit = all(isinstance(row.get(f"lightning_{k}"), (int, float)) for k in ("mfu", "tokens_per_s"))
        prefix = "lightning_" if fit else ""
        if not all(isinstance(row.get(f"{prefix}{k}"), (int, float)) for k in ("mfu", "tokens_per_s")):
            continue
        found.append(Measurement(
            gpu=gpu, precision="bf16", objective=objective, mfu=float(row[f"{prefix}mfu"]),
            tokens_per_s=float(row[f"{prefix}tokens_per_s"]), size=str(settings["size"]), batch=int(settings["batch"]),
            seq_len=int(settings["seq_len"]), device_name=str(report["device_name"]),
            case=f"throughput/{GPU_CHECK_CASE}" + (" in a Lightning fit" if fit else " bare step"),
            source=source, benchmark=GPU_CHECK,
            measured_at=str(report.get("date", ""))))
    return sorted(found, key=lambda m: m.objective)


def newest(found: list[Measurement]) -> list[Measurement]:
    """One figure per (gpu, precision, objective): the newest (``measured_at``; undated ones are
    the oldest, and among equals the later in ``found`` wins)."""
    best: dict[tuple[str, str, str], Measurement] = {}
    for m in found:
        key = (m.gpu, m.precision, m.objective)
        if key not in best or m.measured_at >= best[key].measured_at:
            best[key] = m
    return sorted(best.values(), key=lambda m: (m.gpu, m.precision, m.objective))


def read_results(results_dir: Path, root: Path | None = None) -> list[Measurement]:
    """The newest figure per (gpu, precision, objective) of the ``scaleout_gpu-*.json`` and
    ``gpu-check-*.json`` files in ``results_dir`` (sources named relative to ``root``, default
    the directory's grandparent: the repository)."""
    root = root or results_dir.parent.parent
    found: list[Measurement] = []
    for pattern, read in ((RESULTS_GLOB, from_report), (GPU_CHECK_GLOB, from_gpu_check)):
        for path in sorted(results_dir.glob(pattern)):
            source = path.relative_to(root).as_posix() if root in path.parents else str(path)
            found.extend(read(json.loads(path.read_text()), source))
    return newest(found)


def measurements(results_dir: Path | None = None) -> list[Measurement]:
    """The figures a plan uses: those of ``results_dir`` when given, else of the checkout's
    ``benchmarks/results`` when there is one, else :data:`MEASURED`."""
    results_dir = results_dir or repo_results_dir()
    return read_results(results_dir) if results_dir is not None else list(MEASURED)


@dataclass(frozen=True)
class MfuChoice:
    """The MFU a plan uses for one objective, and where it comes from."""

    value: float
    origin: str  # "given", "measured", "measured-other-objective" or "assumed"
    measurement: Measurement | None = None


def choose_mfu(objective: str, gpu: str, precision: str, given: float | None,
               found: list[Measurement]) -> MfuChoice:
    """A given MFU wins; else the measurement for (gpu, precision, objective); else the lowest
    measured for another objective on that gpu and precision; else :data:`DEFAULT_MFU`."""
    if given is not None:
        return MfuChoice(given, "given")
    same = [m for m in found if m.gpu == gpu and m.precision == precision]
    mine = [m for m in same if m.objective == objective]
    if mine:
        return MfuChoice(mine[0].mfu, "measured", mine[0])
    if same:
        lowest = min(same, key=lambda m: m.mfu)
        return MfuChoice(lowest.mfu, "measured-other-objective", lowest)
    return MfuChoice(DEFAULT_MFU, "assumed")


def table_source(found: list[Measurement]) -> str:
    """:data:`MEASURED` as Python source, for pasting after a new benchmark run."""
    lines = ["MEASURED: tuple[Measurement, ...] = ("]
    for m in found:
        lines.append(
            f"    Measurement(gpu={m.gpu!r}, precision={m.precision!r}, objective={m.objective!r}, mfu={m.mfu!r},\n"
            f"                tokens_per_s={m.tokens_per_s!r}, size={m.size!r}, batch={m.batch!r}, seq_len={m.seq_len!r},\n"
            f"                device_name={m.device_name!r}, case={m.case!r},\n"
            f"                source={m.source!r}"
            + (f", benchmark={m.benchmark!r}" if m.benchmark != BENCHMARK else "")
            + (f", measured_at={m.measured_at!r}" if m.measured_at else "") + "),")
    lines.append(")")
    return "\n".join(lines)


if __name__ == "__main__":
    directory = repo_results_dir()
    if directory is None:
        raise SystemExit("no benchmarks/results directory beside this package (run from a source checkout)")
    print(table_source(read_results(directory)))
