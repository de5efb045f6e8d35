"""Compute accounting and model FLOPs utilisation (MFU).

Two counts, used for different things:

* ``scaling_flops`` is SMDM's ``C = 6 * N_nonemb * D``: no attention term, no head,
  identical for MDM and AR. Scaling laws and the logged ``trainer/flops`` use it.
* ``step_flops_per_token`` counts the matmul work a training step really does (forward
  + backward = 3x forward): ``6 * (N_nonemb + d * V)`` for the linear layers and the LM
  head, plus ``12 * n_layer * T * d`` for attention scores and values (PaLM appendix B;
  the full ``T x T`` score matrix is counted for the causal model too, as PaLM does).
  Throughput (achieved FLOP/s, MFU) uses it. It is per token of the backbone's input: an
  objective whose training forward runs on more than the sequence asks the registry
  (``lldiff.objectives.Objective.matmul_flops_per_token``): BD3 runs the backbone on
  ``[x_t ⊕ x_0]``, ``2L`` tokens with attention over ``2L`` keys, so its training costs
  ``2 * step_flops_per_token(cfg, 2L)`` per sequence token, about twice the MDM's. Sweeps
  plan their ``matmul`` axis with the registry's count, their ``6nd`` axis with ``6 N D``
  for every objective.

MFU is ``achieved FLOP/s / (peak FLOP/s per device * devices)``. The peak comes from
``PEAK_TFLOPS`` (dense tensor-core figures from NVIDIA's datasheets, no 2:4 sparsity) for
the device name and the matmul precision of the run, from an explicit override, or on a
CPU from a short fp32 matmul benchmark measured once per process.
"""

from __future__ import annotations

import functools
import time

import torch

from lldiff.config import ModelConfig

PRECISIONS = ("bf16", "fp16", "tf32", "fp32")
"""Matmul precisions of the peak table: bf16/fp16 tensor cores (fp32 accumulate), TF32
tensor cores (fp32 weights with ``torch.set_float32_matmul_precision('high')``), plain fp32."""

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # Hopper (H100/H200 datasheets; GH200's GPU is an H100 SXM-class part)
    "h200-sxm": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "h200-nvl": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "gh200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "h100-sxm": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "h100-nvl": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "h100-pcie": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    # Ada (L40S/L40/L4 datasheets; RTX 4090: Ada whitepaper, fp32 accumulate)
    "l40s": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "l40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "l4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "rtx-4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    # Ampere (A100 datasheet, SXM and PCIe alike; A10 datasheet, used for AWS's A10G too;
    # RTX A6000 datasheet; RTX 3090: GA102 whitepaper, fp32 accumulate)
    "a100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "a10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "a6000": {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    "rtx-3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    # Volta / Turing (no bf16, no tf32)
    "v100-sxm": {"fp16": 125.0, "fp32": 15.7},
    "v100-pcie": {"fp16": 112.0, "fp32": 14.0},
    "t4": {"fp16": 65.0, "fp32": 8.1},
}
"""Dense peak TFLOP/s per device and matmul precision (no structured sparsity)."""

# (substring of the lower-cased CUDA device name, table key); the first match wins, so the
# more specific names come first ("a100" before "a10", "l40s" before "l40" before "l4").
_GPU_NAMES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gh200",), "gh200"),
    (("h200", "nvl"), "h200-nvl"),
    (("h200",), "h200-sxm"),
    (("h100", "nvl"), "h100-nvl"),
    (("h100", "pcie"), "h100-pcie"),
    (("h100",), "h100-sxm"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("l40s",), "l40s"),
    (("l40",), "l40"),
    (("l4",), "l4"),
    (("4090",), "rtx-4090"),
    (("a100",), "a100"),
    (("a10",), "a10"),  # A10 and A10G
    (("a6000",), "a6000"),
    (("3090",), "rtx-3090"),
    (("v100", "pcie"), "v100-pcie"),
    (("v100",), "v100-sxm"),
    (("t4",), "t4"),
)


def scaling_flops(cfg: ModelConfig, tokens: float) -> float:
    """SMDM's compute C = 6 N D (non-embedding parameters)."""
    return 6.0 * cfg.non_embedding_params() * tokens


def step_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward matmul FLOPs per token at sequence length ``seq_len``."""
    linear = 6.0 * (cfg.non_embedding_params() + cfg.d_model * cfg.vocab_size)
    attention = 12.0 * cfg.n_layer * seq_len * cfg.d_model
    return linear + attention


def gpu_table_key(device_name: str) -> str | None:
    """The ``PEAK_TFLOPS`` key of a CUDA device name (``torch.cuda.get_device_name()``),
    e.g. ``"NVIDIA H100 80GB HBM3"`` -> ``"h100-sxm"``; None for an unknown device."""
    name = device_name.lower()
    for parts, key in _GPU_NAMES:
        if all(part in name for part in parts):
            return key
    return None


def matmul_precision(trainer_precision: str, *, tf32: bool) -> str:
    """The precision the matmuls of a run use, from Lightning's ``trainer.precision``.

    ``bf16-*`` -> ``bf16``, ``16-*`` -> ``fp16``; ``32-true`` -> ``tf32`` when TF32 tensor
    cores are enabled (``tf32=True``: an Ampere or newer GPU with
    ``torch.get_float32_matmul_precision() != "highest"``), else ``fp32``.
    """
    precision = str(trainer_precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if precision.startswith("32"):
        return "tf32" if tf32 else "fp32"
    raise ValueError(f"no peak FLOP/s for trainer precision {precision!r}; known: bf16-*, 16-*, 32-*")


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU at ``precision`` (one of ``PRECISIONS``); None if the
    device is not in the table or lacks that precision (e.g. bf16 on a V100)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown matmul precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    key = gpu_table_key(device_name)
    if key is None or precision not in PEAK_TFLOPS[key]:
        return None
    return PEAK_TFLOPS[key][precision] * 1e12


@functools.cache
def cpu_matmul_flops(n: int = 1024, repeats: int = 4) -> float:
    """This process's fp32 matmul throughput (FLOP/s) on ``n x n`` matrices, with the
    current thread count; measured once per process (about 0.1 s on 2 cores) and cached."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (masking draws) untouched
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2.0 * n**3 * repeats / max(time.perf_counter() - start, 1e-9)


def device_peak_flops(
    device: torch.device, trainer_precision: str, override_tflops: float | None = None
) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from) for MFU.

    ``override_tflops`` wins (TFLOP/s per device); a CUDA device is looked up in
    ``PEAK_TFLOPS``; a CPU is measured with :func:`cpu_matmul_flops` (fp32). None when
    unknown: MFU is then not logged.
    """
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0, got {override_tflops}")
        return override_tflops * 1e12, f"configured {override_tflops:g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, _ = torch.cuda.get_device_capability(device)
        tf32 = major >= 8 and torch.get_float32_matmul_precision() != "highest"
        precision = matmul_precision(trainer_precision, tf32=tf32)
        peak = gpu_peak_flops(name, precision)
        if peak is None:
            return None, f"{name!r} at {precision} is not in lldiff.flops.PEAK_TFLOPS (set model.peak_tflops)"
        return peak, f"{name} {precision} dense peak {peak / 1e12:g} TFLOP/s"
    if device.type == "cpu":
        peak = cpu_matmul_flops()
        return peak, f"measured CPU fp32 matmul {peak / 1e9:.1f} GFLOP/s"
    return None, f"no peak FLOP/s known for device type {device.type!r} (set model.peak_tflops)"


def mfu(flops_per_s: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all ``devices``."""
    if peak_flops_per_device <= 0 or devices < 1:
        raise ValueError(f"need peak > 0 and devices >= 1, got {peak_flops_per_device}, {devices}")
    return flops_per_s / (peak_flops_per_device * devices)


class ThroughputWindow:
    """Tokens and FLOPs trained on since a window opened, for rates without any device sync.

    Times are the starts of consecutive training steps (``time.perf_counter()``): the
    work of step ``k`` is counted once step ``k + 1`` starts, so a rate covers whole steps
    (forward, backward, optimizer, logging, data loading) and never the time of work not
    yet done. On a GPU the host runs ahead of the device by a bounded queue, so rates over
    a window of several steps converge to the device's rate.
    """

    def __init__(self, start: float, tokens: float, flops: float) -> None:
        self.start = start
        self.tokens = 0.0
        self.flops = 0.0
        self._pending = (tokens, flops)

    def step(self, now: float, tokens: float, flops: float) -> tuple[float, float]:
        """Count the previous step as done at ``now`` and hold this one's work; return
        (tokens/s, FLOP/s) over the window so far."""
        self.tokens += self._pending[0]
        self.flops += self._pending[1]
        self._pending = (tokens, flops)
        elapsed = max(now - self.start, 1e-9)
        return self.tokens / elapsed, self.flops / elapsed
