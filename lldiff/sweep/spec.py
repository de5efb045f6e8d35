"""Sweep specification: sizes x compute budgets x objectives x seeds over ONE data config.

A spec is a YAML file (or a named preset in ``lldiff/sweep/presets``)::

    name: demo
    objectives: [ar, bd3-4, bd3-16, mdm]   # names of lldiff.objectives: ar, mdm, bd3-B (blocks of B tokens)
    sizes: [tiny-0.1M, tiny-0.4M, tiny-1M]
    budgets: [2.0e11, 6.0e11]         # compute C in FLOPs, on the `compute` axis
    compute: 6nd                      # 6nd: SMDM's C = 6 N D (default); matmul: real training FLOPs
    tokens_per_param: [5, 500]        # per budget, keep the sizes whose D/N lies in this window
    lr_reference_width: 32            # runs wider than this get lr x 32 / d_model (muP's Adam rule)
    seeds: [0]
    data: {source: stdlib, vocab_size: 1024, seq_len: 64, batch_size: 16}   # PretrainDataModule args
    model: {lr: 2.0e-3, random_length_prob: 0.01}   # LMBase args for every run
    objective_args: {mdm: {val_mc_samples: 8}, bd3-4: {lr: 1.0e-2}}   # per-objective model args (never data)
    size_args: {tiny-0.1M: {lr: 3.0e-3}}            # per-size model args (e.g. tuned lr)
    trainer: {accelerator: auto, devices: 1, precision: 32-true}
    warmup_fraction: 0.1              # warmup as a fraction of each run's steps (else model.warmup_steps / SMDM rule)
    evals_per_run: 4                  # validation points along each run (curves)
    final_val_mc_samples: 32          # K Monte-Carlo draws for the MDM's final ELBO (SMDM 128)
    cluster: {partition: gpu, time: "04:00:00", gpus_per_run: 1, gpu: h100-sxm}   # mfu, peak_tflops: see ClusterSpec

Each objective's runs use the registry's module class and init args
(``lldiff.objectives.get(name).module_config()``: ``BlockDiffusionLM`` with ``block_size: B``
for ``bd3-B``); ``objective_args`` are added on top, keyed by the same names.

The two compute axes (``compute``), with which a budget C becomes a number of steps:

* ``6nd``: SMDM's ``C = 6 N D`` (N non-embedding parameters, D training tokens), the same per
  token for every objective; a run of C FLOPs trains on ``D = C / 6N`` tokens whatever its
  objective.
* ``matmul``: the real forward + backward matmul FLOPs per training token, LM head and
  attention included, from the registry (``Objective.matmul_flops_per_token``): equal for AR
  and MDM, about twice as much for BD3, whose training forward runs on ``[x_t ⊕ x_0]`` (2L
  tokens). At equal budget a BD3 run on this axis trains on about half the tokens.

A repeated-data (data-constrained) sweep caps the unique training tokens with
``data.unique_tokens: U`` and gives ``epochs: [1, 4, 16, ...]`` instead of budgets: each run
trains for E passes over the same U tokens (reshuffled every epoch). ``budgets`` may then
hold one value, a compute cap that no run may exceed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lldiff import objectives as registry
from lldiff.config import SIZES

#: the compute axes (see the module docstring: on ``matmul`` BD3 counts its 2L-token training forward)
COMPUTE_AXES = {
    "6nd": "C = 6·N·D (SMDM)",
    "matmul": "real matmul FLOPs (forward+backward, incl. LM head and attention)",
}
MIN_STEPS = 10
"""Fewest optimizer steps a planned run may have: below this, warmup and schedule are noise."""
PRESET_PACKAGE = "lldiff.sweep.presets"


@dataclass(frozen=True)
class ClusterSpec:
    """How the sweep maps onto GPU nodes (used by ``plan`` and the emitted scripts).

    The plan's GPU-hours are real matmul FLOPs / (MFU x peak FLOP/s):

    * ``gpu``: the GPU the jobs run on, a key of ``lldiff.flops.PEAK_TFLOPS`` (``h100-sxm``,
      ``h200-sxm``, ``a100``, ...);
    * ``mfu``: None (default) uses the MFU measured by ``benchmarks/scaleout_gpu.py`` on that
      GPU at the spec's precision, per objective (``lldiff.sweep.measured``), or assumes 40%
      when there is none; a number is used as given. The plan says which;
    * ``peak_tflops``: None (default) is the GPU's dense peak at the matmul precision of
      ``trainer.precision`` (bf16-* -> bf16; 32-true -> fp32: lldiff leaves TF32 off).
    """

    partition: str = "gpu"
    time: str = "04:00:00"
    gpus_per_run: int = 1
    nodes_per_run: int = 1
    cpus_per_task: int = 8
    mfu: float | None = None
    peak_tflops: float | None = None
    gpu: str = "h100-sxm"
    setup: str = ""  # shell lines run before each job (module load, conda activate, ...)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    objectives: tuple[str, ...]
    sizes: tuple[str, ...]
    budgets: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (0,)
    compute: str = "6nd"
    tokens_per_param: tuple[float, float] | None = None
    epochs: tuple[float, ...] = ()
    lr_reference_width: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    objective_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    size_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    warmup_fraction: float | None = None
    evals_per_run: int = 4
    final_val_mc_samples: int = 32
    cluster: ClusterSpec = field(default_factory=ClusterSpec)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that determines the runs' results (not the cluster layout)."""
        payload = {k: v for k, v in asdict(self).items()
                   if k != "cluster" and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("objectives", "sizes", "budgets", "seeds", "epochs"):
            out[key] = list(out[key])
        if out["tokens_per_param"] is not None:
            out["tokens_per_param"] = list(out["tokens_per_param"])
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


#: fields added after sweeps were first written, with their defaults: left at the default they
#: stay out of the fingerprint, so a sweep directory made before they existed still resumes.
_LATER_FIELDS: dict[str, Any] = {"compute": "6nd", "tokens_per_param": None, "epochs": (), "lr_reference_width": None}


def _validate(spec: SweepSpec) -> None:
    def fail(message: str) -> None:
        raise ValueError(f"sweep spec {spec.name!r}: {message}")

    for key in ("objectives", "sizes", "seeds"):
        if not getattr(spec, key):
            fail(f"{key} is empty")
    for key in ("objectives", "sizes", "budgets", "seeds", "epochs"):
        values = list(getattr(spec, key))
        repeated = sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in values if values.count(v) > 1})
        if repeated:
            fail(f"{key} lists {', '.join(repeated)} more than once")
    for objective in spec.objectives:
        try:
            registry.get(objective)
        except ValueError as err:
            fail(str(err))
    if any(registry.get(o).block_size for o in spec.objectives):
        from lldiff.data import PretrainDataModule  # the data default of seq_len

        seq_len = spec.data.get("seq_len", inspect.signature(PretrainDataModule.__init__).parameters["seq_len"].default)
        for objective in spec.objectives:
            try:
                registry.get(objective).check_seq_len(seq_len)
            except ValueError as err:
                fail(str(err))
    if spec.compute not in COMPUTE_AXES:
        fail(f"compute={spec.compute!r} is unknown; allowed: {', '.join(COMPUTE_AXES)}")
    if spec.tokens_per_param is not None:
        window = spec.tokens_per_param
        if len(window) != 2 or not 0 < window[0] < window[1]:
            fail(f"tokens_per_param must be [low, high] with 0 < low < high, got {list(window)}")
    _validate_data_budget(spec, fail)
    width = spec.lr_reference_width
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        fail(f"lr_reference_width must be a positive integer (a d_model) or null, got {width!r}")
    bad = [s for s in spec.sizes if s not in SIZES]
    if bad:
        fail(f"unknown size(s) {bad}; known sizes: {', '.join(SIZES)}")
    for objective, args in spec.objective_args.items():
        try:
            registry.get(objective)
        except ValueError as err:
            fail(f"objective_args: {err}")
        if not isinstance(args, dict):
            fail(f"objective_args.{objective} must be a mapping of model args, got {args!r}")
        if "data" in args or any(k in args for k in ("source", "paths", "seq_len", "vocab_size", "batch_size")):
            fail(
                f"objective_args.{objective} sets data options {sorted(args)}: all objectives must share one data "
                "config (put it under `data:`)"
            )
    fixed = {o: set(registry.get(o).module_args()) for o in {*spec.objectives, *spec.objective_args}}
    clashes = [f"model.{k} ({o})" for o in spec.objectives for k in sorted(fixed[o] & set(spec.model))]
    clashes += [f"objective_args.{o}.{k}" for o, args in spec.objective_args.items()
                for k in sorted(fixed[o] & set(args))]
    clashes += [f"size_args.{size}.{k}" for size, args in spec.size_args.items()
                for k in sorted(set().union(*fixed.values()) & set(args or {}))]
    if clashes:
        fail(f"{', '.join(clashes)} is set by the objective's name (e.g. bd3-4 has block_size 4); remove it")
    unknown_sizes = [s for s in spec.size_args if s not in spec.sizes]
    if unknown_sizes:
        fail(f"size_args names size(s) {unknown_sizes} that are not in sizes {list(spec.sizes)}")
    for reserved in ("size", "vocab_size"):
        if reserved in spec.model:
            fail(f"model.{reserved} is set by the sweep itself; remove it")
    if "max_steps" in spec.trainer or "logger" in spec.trainer:
        fail("trainer.max_steps and trainer.logger are set per run by the sweep; remove them")
    if spec.warmup_fraction is not None and not 0.0 <= spec.warmup_fraction <= 1.0:
        fail(f"warmup_fraction must be in [0, 1], got {spec.warmup_fraction}")
    if spec.evals_per_run < 1 or spec.final_val_mc_samples < 1:
        fail("evals_per_run and final_val_mc_samples must be >= 1")
    _validate_cluster(spec.cluster, fail)


def _validate_cluster(cluster: ClusterSpec, fail) -> None:
    from lldiff.flops import PEAK_TFLOPS

    if cluster.gpu not in PEAK_TFLOPS:
        fail(f"cluster.gpu={cluster.gpu!r} is unknown; allowed: {', '.join(PEAK_TFLOPS)}")
    mfu = cluster.mfu
    if mfu is not None and (isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1):
        fail(f"cluster.mfu must be in (0, 1] (a fraction of the peak) or null (measured), got {mfu!r}")
    peak = cluster.peak_tflops
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak <= 0):
        fail(f"cluster.peak_tflops must be > 0 (TFLOP/s per GPU) or null (cluster.gpu's), got {peak!r}")


def _validate_data_budget(spec: SweepSpec, fail) -> None:
    """Budgets or epochs (with a unique-token cap), never neither."""
    bad = [c for c in spec.budgets if not (isinstance(c, (int, float)) and c > 0)]
    if bad:
        fail(f"budgets must be positive FLOP counts, got {bad}")
    unique = spec.data.get("unique_tokens")
    if unique is not None:
        if isinstance(unique, bool) or not isinstance(unique, int) or unique < 1:
            fail(f"data.unique_tokens must be a positive integer (training tokens), got {unique!r}")
        from lldiff.data import PretrainDataModule  # the data defaults, for the batch check

        defaults = inspect.signature(PretrainDataModule.__init__).parameters
        seq_len = spec.data.get("seq_len", defaults["seq_len"].default)
        batch = spec.data.get("batch_size", defaults["batch_size"].default)
        if unique < seq_len * batch:
            fail(f"data.unique_tokens={unique} is smaller than one batch (batch_size {batch} x seq_len {seq_len} = "
                 f"{batch * seq_len} tokens)")
    if spec.epochs:
        bad = [e for e in spec.epochs if not (isinstance(e, (int, float)) and e > 0)]
        if bad:
            fail(f"epochs must be positive numbers of passes over the unique tokens, got {bad}")
        if unique is None:
            fail("epochs needs data.unique_tokens (the U tokens each epoch passes over)")
        if len(spec.budgets) > 1:
            fail(f"with epochs, budgets may hold one value (a compute cap), got {list(spec.budgets)}")
    elif not spec.budgets:
        fail("budgets is empty (or give epochs with data.unique_tokens for a repeated-data sweep)")


def load_spec(path: str | Path) -> SweepSpec:
    """Read a spec file; a clear error for unknown keys or bad values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {str(path)!r} does not exist")
    return spec_from_dict(yaml.safe_load(path.read_text()) or {}, default_name=path.stem)


def load_preset(name: str) -> SweepSpec:
    available = preset_names()
    if name not in available:
        raise ValueError(f"unknown sweep preset {name!r}; available: {', '.join(available)}")
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return spec_from_dict(yaml.safe_load(text), default_name=name)


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def spec_from_dict(raw: dict[str, Any], default_name: str = "sweep") -> SweepSpec:
    allowed = set(SweepSpec.__dataclass_fields__)
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"unknown sweep spec key(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    raw = dict(raw)
    raw.setdefault("name", default_name)
    cluster = raw.pop("cluster", None) or {}
    unknown = set(cluster) - set(ClusterSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown cluster key(s) {sorted(unknown)}; allowed: {', '.join(ClusterSpec.__dataclass_fields__)}")
    for key in ("objectives", "sizes", "seeds"):
        if key in raw:
            raw[key] = tuple(raw[key])
    for key in ("budgets", "epochs"):
        if key in raw:
            raw[key] = tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                             for v in raw[key] or ())
    if raw.get("tokens_per_param") is not None:
        raw["tokens_per_param"] = tuple(float(v) for v in raw["tokens_per_param"])
    return SweepSpec(**raw, cluster=ClusterSpec(**cluster))
