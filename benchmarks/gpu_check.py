"""One check of everything that only a GPU can measure (issue 25), run whenever a GPU is lent.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --sections throughput,fit      # some sections only
    python benchmarks/gpu_check.py --shapes tiny     # on a GPU: the dry run's shapes (gpu-check-<gpu>-tiny.json)

On a CUDA device (about 8 minutes on one H100, start-up included; every section has its own time
budget, ``SECTIONS``) it measures, at bf16:

* ``throughput``: tokens/s, MFU and peak memory per token of one training step (loss, backward,
  clipping, AdamW and schedule: ``benchmarks/profile_step.py``'s bare step) for AR, MDM and
  BD3-16 at smdm-113M, 16 x 1024 tokens, with the defaults a user gets (regional compile, the
  chunked LM head, fused AdamW) and with each of the three off;
* ``fit``: a real ``lldiff fit`` of each shipped tiny config (``configs/{mdm,ar,bd3}-tiny.yaml``)
  in bf16-mixed with clipping and checkpoints every N steps: straight to 2N steps, then the same
  fit crashing after step N + 2 and resumed with ``--ckpt_path last``: the loss is finite and
  falls, and the resumed run ends with the same weights;
* ``flex``: the compiled FlexAttention block mask of BD3's training attention against SDPA with
  the boolean mask, forward and backward, fp32 and bf16 (attention alone and a whole backbone);
* ``xformers``: xformers against SDPA (causal, bidirectional, padded, GQA;
  ``benchmarks/scaleout_gpu.py``'s ``backend_agreement``) when it imports and its kernels load,
  else the record says it is unavailable and why;
* ``fsdp2``: FSDP2 on the one GPU for smdm-1028M (``scaleout_gpu.run_case``): MFU and memory;
* ``decoding``: tokens/s of AR + KV cache, MDM exact / prefix / dual cache / threshold, BD3-16
  with and without its KV cache (random smdm-113M weights, as ``benchmarks/sampling.py`` part 3).

Without a GPU it is the **dry run**: the same code on tiny shapes in fp32 on the CPU (every path
but the CUDA kernels: FlexAttention runs eager and forward only, there is no xformers), in a
couple of minutes. Each section runs in a process of its own with a hard time limit, so one that
fails, hangs or crashes the device records its error (or what it finished) and the others run.

Writes ``benchmarks/results/gpu-check-<device>.json`` (``<device>``: ``lldiff.flops`` key of the
GPU, e.g. ``h100-sxm``, or ``cpu``; rewritten atomically after every section) and the same name
``.md`` (the tables). ``lldiff sweep plan`` plans GPU-hours at the MFU of the newest record for
its GPU (``lldiff.sweep.measured``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # the other benchmarks, imported below, live beside this file
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:  # a checkout without `pip install -e .`
    sys.path.append(str(REPO))

SCHEMA = "lldiff-gpu-check/1"
OBJECTIVES = ("ar", "mdm", "bd3-16")
FIT_CONFIGS = {"mdm": "configs/mdm-tiny.yaml", "ar": "configs/ar-tiny.yaml", "bd3": "configs/bd3-tiny.yaml"}

SECTIONS: dict[str, dict[str, float]] = {
    # seconds each section may take on a CUDA device (8 minutes in all, start-up included) and in
    # the CPU dry run (ceilings for a loaded machine: it takes about 2.5 minutes of CPU time in
    # all); a section still running then is stopped and records what it finished
    "throughput": {"cuda": 150, "cpu": 120},
    "fit": {"cuda": 110, "cpu": 240},
    "flex": {"cuda": 50, "cpu": 60},
    "xformers": {"cuda": 15, "cpu": 30},
    "fsdp2": {"cuda": 80, "cpu": 120},
    "decoding": {"cuda": 40, "cpu": 60},
}
TOTAL_BUDGET_S = {"cuda": 465, "cpu": 600}
"""Whole run, start-up included: 8 minutes on a GPU less a margin; the dry run's ceiling. A section
may use the time the sections before it left unused, never the time reserved for those after it."""

SHAPES: dict[str, dict[str, Any]] = {
    "full": {
        "throughput": {"size": "smdm-113M", "vocab": 32000, "batch": 16, "seq_len": 1024, "warmup": 3,
                       "time_steps": 15},
        "fit": {"half_steps": 60, "size": None,  # the shipped configs (tiny-1M, 16 x 128 tokens) on 1 MB of text
                "overrides": ["--data.init_args.max_bytes", "1000000"]},
        "flex": {"batch": 4, "heads": 12, "kv_heads": 4, "head_dim": 64, "seq_len": 1024, "block": 16,
                 "backbone": "smdm-19M", "backbone_vocab": 4096, "backbone_batch": 4, "backbone_seq_len": 512,
                 "repeats": 10},
        "fsdp2": {"size": "smdm-1028M", "vocab": 32000, "batch": 8, "seq_len": 1024, "steps": 20, "log_every": 5},
        "decoding": {"size": "smdm-113M", "vocab": 32000, "batch": 8, "prompt_len": 64, "new_tokens": 256,
                     "mdm_steps": 64, "block": 32, "bd3_block": 16, "threshold": 0.9},
    },
    "tiny": {
        "throughput": {"size": "tiny-0.1M", "vocab": 256, "batch": 4, "seq_len": 64, "warmup": 1, "time_steps": 2},
        "fit": {"half_steps": 12, "size": "tiny-0.1M",
                "overrides": ["--data.init_args.max_bytes", "300000", "--data.init_args.vocab_size", "512",
                              "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "8",
                              "--data.init_args.val_max_rows", "16", "--model.init_args.lr", "1e-2"]},
        "flex": {"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 16, "seq_len": 64, "block": 16,
                 "backbone": "tiny-0.1M", "backbone_vocab": 256, "backbone_batch": 2, "backbone_seq_len": 32,
                 "repeats": 1},
        "fsdp2": {"size": "tiny-0.1M", "vocab": 256, "batch": 4, "seq_len": 64, "steps": 6, "log_every": 2},
        "decoding": {"size": "tiny-0.1M", "vocab": 256, "batch": 2, "prompt_len": 8, "new_tokens": 32,
                     "mdm_steps": 8, "block": 16, "bd3_block": 16, "threshold": 0.9},
    },
}

GOALS = {"mfu_ar": 0.40, "mfu_mdm": 0.40, "mdm_over_ar_tokens_per_s": 0.95, "bd3_over_mdm_tokens_per_s": 0.45}
"""Issue 25's goals at smdm-113M bf16 on one H100/H200 (memory per token: no higher than before)."""


# -- helpers -----------------------------------------------------------------------------------
def _error(err: BaseException) -> dict[str, str]:
    return {"error": f"{type(err).__name__}: {str(err)[:2000]}", "traceback": traceback.format_exc()[-3000:]}


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def device_key(device_name: str) -> str:
    """``cpu``, the ``lldiff.flops.PEAK_TFLOPS`` key of a GPU (``h100-sxm``), or its name as a slug."""
    if device_name == "cpu":
        return "cpu"
    from lldiff.flops import gpu_table_key

    return gpu_table_key(device_name) or re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


class Budget:
    """A section's deadline: work units ask whether there is time for them."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() > seconds


class Part:
    """A section's results, written atomically after every unit (a section stopped at its time
    limit leaves what it finished)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.data = path, {}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        if self.path is not None:
            from lldiff.atomic import write_text

            write_text(self.path, json.dumps(self.data, indent=1, default=str))


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# -- (a) training-step throughput -----------------------------------------------------------------
VARIANTS = {
    "defaults": {},
    "no compile": {"compile": False},
    "plain head": {"loss_chunk_tokens": "none"},
    "unfused AdamW": {"fused": False},
}
"""What a user gets, then each of its three speed options off."""


def throughput_row(objective: str, variant: dict[str, Any], shapes: dict[str, Any], device: str,
                   peak: float | None, lightning: bool = False) -> dict[str, Any]:
    """One objective's bare training step (profile_step's module, optimizer and step) under one variant;
    ``lightning``: also the same module's step in a ``lightning.Trainer`` fit (profile_step's timer:
    loop, hooks, logging and the host-to-device copy included), as ``lldiff fit`` runs it."""
    from unittest import mock

    import torch

    import profile_step
    from lldiff import registry
    from lldiff.strategies import compile_on

    args = argparse.Namespace(
        size=shapes["size"], vocab=shapes["vocab"], device=device, precision="bf16-mixed" if device == "cuda" else "32-true",
        compile_on=compile_on(variant.get("compile"), torch.device(device)),
        loss_chunk_tokens=variant.get("loss_chunk_tokens", "default"))
    args.autocast = device == "cuda"
    entry = registry.get(objective)
    entry.check_seq_len(shapes["seq_len"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    module = profile_step.make_module(objective, args).to(device)
    module.train()
    steps = shapes["warmup"] + shapes["time_steps"]
    fused = variant.get("fused", True)
    with mock.patch("lldiff.optim.fused_adamw_supported", return_value=False) if not fused else contextlib.nullcontext():
        optimizer, scheduler, _ = profile_step.make_optimizer(module, args, max_steps=max(steps, 10))
    rows = torch.randint(0, shapes["vocab"], (shapes["batch"], shapes["seq_len"] + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)
    stepper = profile_step.Stepper(module, rows, optimizer, scheduler, args)
    start = time.perf_counter()
    for _ in range(shapes["warmup"]):
        stepper.step()
    stepper.sync()
    warmup_s = time.perf_counter() - start
    step_s = stepper.timed(shapes["time_steps"])
    tokens = shapes["batch"] * shapes["seq_len"]
    flops_per_token = entry.matmul_flops_per_token(module.config, shapes["seq_len"])
    peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else None
    loss = float(stepper.forward().detach().float())
    result = {
        "tokens_per_s": tokens / step_s, "step_ms": step_s * 1e3, "tflops_per_s": tokens * flops_per_token / step_s / 1e12,
        "mfu": tokens * flops_per_token / step_s / peak if peak else None,
        "peak_memory_gib": peak_bytes / 2**30 if peak_bytes is not None else None,
        "peak_memory_mib_per_token": peak_bytes / 2**20 / tokens if peak_bytes is not None else None,
        "compile": bool(module.model.blocks_compiled), "loss_chunk_tokens": module.loss_chunk_tokens,
        "fused_adamw": bool(optimizer.defaults.get("fused")), "warmup_s": warmup_s, "loss": loss,
    }
    if lightning:
        fit_args = argparse.Namespace(**vars(args), warmup=shapes["warmup"], lightning_steps=shapes["time_steps"])
        try:
            step_ms = profile_step.lightning_step(module, rows.cpu(), fit_args)["step_ms"]
            result["lightning_tokens_per_s"] = tokens / step_ms * 1e3
            result["lightning_mfu"] = tokens * flops_per_token / step_ms * 1e3 / peak if peak else None
        except Exception as err:
            result["lightning"] = _error(err)
    return result


def section_throughput(shapes: dict[str, Any], device: str, part: Part, budget: Budget) -> None:
    import torch

    from lldiff.flops import device_peak_flops

    torch._dynamo.config.cache_size_limit = 64  # three objectives' blocks compiled in one process
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    peak, peak_source = device_peak_flops(torch.device(device), precision)
    part.put("settings", {**shapes, "precision": precision, "peak_flops": peak, "peak_source": peak_source,
                          "step": "profile_step's bare step: loss + backward + clip_grad_norm_(1.0) + AdamW + schedule",
                          "variants": {k: v or "compile (on CUDA), chunked head, fused AdamW" for k, v in VARIANTS.items()}})
    rows: dict[str, dict[str, Any]] = {}
    for variant_name, variant in VARIANTS.items():  # every objective's defaults first: the figures that matter most
        for objective in OBJECTIVES:
            if not budget.allows(5):
                rows.setdefault(objective, {})[variant_name] = {"skipped": "out of the section's time"}
                continue
            try:
                rows.setdefault(objective, {})[variant_name] = throughput_row(
                    objective, variant, shapes, device, peak, lightning=variant_name == "defaults")
            except Exception as err:
                rows.setdefault(objective, {})[variant_name] = _error(err)
            _free(device)
            part.put("rows", rows)
    part.put("rows", rows)
    part.put("summary", throughput_summary(rows))


def throughput_summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The defaults' figures per objective, the ratios the issue's goals name, and what each option is worth."""
    summary: dict[str, Any] = {}
    defaults = {o: r.get("defaults", {}) for o, r in rows.items()}
    tps = {o: r.get("tokens_per_s") for o, r in defaults.items()}
    for o, r in defaults.items():
        summary[f"mfu_{o}"] = r.get("mfu")
        summary[f"tokens_per_s_{o}"] = r.get("tokens_per_s")
        summary[f"lightning_mfu_{o}"] = r.get("lightning_mfu")
        summary[f"lightning_tokens_per_s_{o}"] = r.get("lightning_tokens_per_s")
        summary[f"peak_memory_mib_per_token_{o}"] = r.get("peak_memory_mib_per_token")
        for variant in VARIANTS:
            other = rows[o].get(variant, {}).get("tokens_per_s")
            if variant != "defaults" and finite(other) and finite(tps.get(o)):
                summary[f"speedup_of_defaults_over_{variant.replace(' ', '_')}_{o}"] = tps[o] / other
    for prefix in ("", "lightning_"):
        rate = {o: summary.get(f"{prefix}tokens_per_s_{o}") for o in defaults}
        if finite(rate.get("mdm")) and finite(rate.get("ar")):
            summary[f"{prefix}mdm_over_ar_tokens_per_s"] = rate["mdm"] / rate["ar"]
        if finite(rate.get("bd3-16")) and finite(rate.get("mdm")):
            summary[f"{prefix}bd3_over_mdm_tokens_per_s"] = rate["bd3-16"] / rate["mdm"]
    return summary


# -- (b) real fits: bf16-mixed, clipping, checkpoints, resume ---------------------------------------
def _train_losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.glob("events*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


class Interrupt(Exception):
    """The simulated crash of :class:`CrashAt`."""


def crash_at(step: int) -> Any:
    """A Lightning callback that raises :class:`Interrupt` once ``step`` optimizer steps are done
    (a crash between two checkpoints: the steps since the last one are lost)."""
    import lightning as L

    class CrashAt(L.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step >= step:
                raise Interrupt(f"simulated crash after step {trainer.global_step}")

    return CrashAt()


def fit_one(name: str, config: str, shapes: dict[str, Any], device: str, out: Path) -> dict[str, Any]:
    """``lldiff fit`` straight to 2N steps; the same fit crashing after step N + 2 (checkpoints every
    N) and resumed with ``--ckpt_path last`` to 2N: loss finite and falling, the same final weights."""
    import torch

    from lldiff.launch import lightning_cli

    n = shapes["half_steps"]
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    cache = out / "data-cache"

    def args(save_dir: Path, *extra: str) -> list[str]:
        argv = ["--config", str(REPO / config), "--trainer.max_steps", str(2 * n),
                "--trainer.precision", precision, "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
                "--trainer.val_check_interval", str(n), "--trainer.log_every_n_steps", str(max(1, n // 8)),
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.gradient_clip_val", "1.0", "--trainer.logger.init_args.save_dir", str(save_dir),
                "--checkpoint.every_n_train_steps", str(n), "--model.init_args.warmup_steps", str(max(1, n // 4)),
                "--data.init_args.cache_dir", str(cache), *shapes["overrides"]]
        if shapes.get("size"):
            argv += ["--model.init_args.size", shapes["size"]]
        return argv + list(extra)

    straight, resumed = out / "straight", out / "resumed"
    start = time.perf_counter()
    run_a = Path(lightning_cli(["fit", *args(straight)]).trainer.log_dir)
    straight_s = time.perf_counter() - start
    start = time.perf_counter()
    crashing = lightning_cli(args(resumed), run=False)  # the same command, its trainer given a crash
    crashing.trainer.callbacks.insert(0, crash_at(n + 2))
    try:
        crashing.trainer.fit(crashing.model, datamodule=crashing.datamodule)
        raise RuntimeError("the run meant to crash did not")
    except Interrupt:
        pass
    run_b = Path(crashing.trainer.log_dir)
    crashed_at = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    del crashing
    lightning_cli(["fit", *args(resumed, "--ckpt_path", "last")])
    resumed_s = time.perf_counter() - start
    a = torch.load(run_a / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    b = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    keys = sorted(a["state_dict"])
    diffs = [(a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in keys]
    scale = max(a["state_dict"][k].float().abs().max().item() for k in keys)
    logged_a, logged_b = _train_losses(run_a), _train_losses(run_b)
    losses = [v for _, v in sorted(logged_a.get("train/loss", []))]
    val = [v for _, v in sorted(logged_a.get("val/nll_per_token", []))]
    straight_losses = dict(logged_a.get("train/loss", []))
    resumed_losses = {s: v for s, v in logged_b.get("train/loss", []) if s > n}  # after the restart
    shared = sorted(set(resumed_losses) & set(straight_losses))
    quarter = max(1, len(losses) // 4)
    first, last = (sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter) if losses else (None, None)
    result = {
        "config": config, "precision": precision, "steps": 2 * n, "crashed_after_step": n + 2,
        "resumed_from_step": crashed_at, "global_step_straight": a["global_step"], "global_step_resumed": b["global_step"],
        "seconds_straight": straight_s, "seconds_crash_and_resume": resumed_s,
        "train_loss_logged": len(losses), "train_loss_first_quarter": first, "train_loss_last_quarter": last,
        "val_nll_first": val[0] if val else None, "val_nll_last": val[-1] if val else None,
        "loss_finite": bool(losses) and all(math.isfinite(v) for v in losses + val),
        "loss_falling": bool(losses) and last < first,
        "resume_weights_max_abs_diff": max(diffs), "weights_max_abs": scale,
        "resume_exact": all(d == 0.0 for d in diffs),
        "resume_loss_max_abs_diff": max((abs(resumed_losses[s] - straight_losses[s]) for s in shared), default=None),
        "resume_steps_compared": len(shared),
    }
    # On a CPU the resumed run is bit-exact. On CUDA the section asks for deterministic kernels, but a
    # kernel without a deterministic version (warned, not refused) may still differ in the last bits:
    # there the verdict allows rounding-level differences and the record keeps the exact figures. A
    # resume that restores the wrong batches, optimizer state, schedule or RNG moves the losses after
    # the restart by the batch-to-batch spread (tenths), far above that.
    weights_tol, loss_tol = (0.0, 0.0) if device == "cpu" else (1e-2 * scale, 1e-2)
    loss_diff = result["resume_loss_max_abs_diff"]
    result["resume_tolerance"] = {"weights_max_abs_diff": weights_tol, "loss_max_abs_diff": loss_tol}
    result["resume_ok"] = (crashed_at == n and a["global_step"] == b["global_step"] == 2 * n
                           and max(diffs) <= weights_tol and loss_diff is not None and loss_diff <= loss_tol)
    result["ok"] = result["loss_finite"] and result["loss_falling"] and result["resume_ok"]
    return result


def section_fit(shapes: dict[str, Any], device: str, part: Part, budget: Budget, workdir: Path) -> None:
    if device == "cuda":  # the resume is compared with the straight run: deterministic kernels where there are
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # (before cuBLAS starts: this process's first)
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    part.put("settings", {**shapes, "how": "lldiff fit of the shipped tiny config straight to 2N steps; the same fit "
                          "crashing after step N + 2 (checkpoints every N), then resumed with --ckpt_path last "
                          "to 2N; final weights and the losses after the restart compared"})
    for name, config in FIT_CONFIGS.items():
        if not budget.allows(10):
            part.put(name, {"skipped": "out of the section's time"})
            continue
        try:
            part.put(name, fit_one(name, config, shapes, device, workdir / name))
        except Exception as err:
            part.put(name, _error(err))
        _free(device)


# -- (c) FlexAttention block mask vs SDPA with the boolean mask ------------------------------------
def _timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats * 1e3


def flex_attention_case(dtype_name: str, shapes: dict[str, Any], device: str) -> dict[str, Any]:
    import torch

    from lldiff.attention import reference_attention, sdpa_attention
    from lldiff.objectives.bd3.loss import block_diffusion_block_mask, block_diffusion_mask_from_ids, block_ids

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    b, h, kv, hd, length = shapes["batch"], shapes["heads"], shapes["kv_heads"], shapes["head_dim"], shapes["seq_len"]
    ids = block_ids(length, shapes["block"], torch.device(device))
    block_mask, boolean = block_diffusion_block_mask(ids), block_diffusion_mask_from_ids(ids)
    backward = device == "cuda"  # FlexAttention has no CPU backward
    q = torch.randn(b, h, 2 * length, hd, device=device, generator=gen).to(dtype).requires_grad_(backward)
    k, v = (torch.randn(b, kv, 2 * length, hd, device=device, generator=gen).to(dtype).requires_grad_(backward)
            for _ in range(2))
    grad_out = torch.randn(b, h, 2 * length, hd, device=device, generator=gen).to(dtype)

    def run(mask: Any) -> tuple[Any, list[Any]]:
        out = sdpa_attention(q, k, v, causal=False, attn_mask=mask)
        if not backward:
            return out.detach(), []
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return out.detach(), [g.detach() for g in grads]

    with torch.no_grad():
        reps = h // kv
        ref = reference_attention(q.float(), k.float().repeat_interleave(reps, 1), v.float().repeat_interleave(reps, 1),
                                  causal=False, attn_mask=boolean)
    flex_out, flex_grads = run(block_mask)
    sdpa_out, sdpa_grads = run(boolean)
    result: dict[str, Any] = {
        "shape": [b, h, kv, 2 * length, hd], "block": shapes["block"], "flex_compiled": device == "cuda",
        "forward_flex_vs_sdpa": (flex_out.float() - sdpa_out.float()).abs().max().item(),
        "forward_flex_vs_fp32_reference": (flex_out.float() - ref).abs().max().item(),
        "forward_sdpa_vs_fp32_reference": (sdpa_out.float() - ref).abs().max().item(),
        "output_scale": ref.abs().max().item(),
    }
    if backward:
        for name, f, s in zip(("dq", "dk", "dv"), flex_grads, sdpa_grads):
            result[f"backward_{name}_flex_vs_sdpa"] = (f.float() - s.float()).abs().max().item()
            result[f"backward_{name}_scale"] = s.float().abs().max().item()
        result["fwd_bwd_ms_flex"] = _timed(lambda: run(block_mask), device, shapes["repeats"])
        result["fwd_bwd_ms_sdpa_boolean"] = _timed(lambda: run(boolean), device, shapes["repeats"])
    else:
        result["backward"] = "not run: FlexAttention has no backward on a CPU (forward runs eager)"
        result["fwd_ms_flex"] = _timed(lambda: run(block_mask), device, shapes["repeats"])
        result["fwd_ms_sdpa_boolean"] = _timed(lambda: run(boolean), device, shapes["repeats"])
    return result


def flex_backbone_case(shapes: dict[str, Any], device: str) -> dict[str, Any]:
    """A BD3-16 backbone's logits and parameter gradients (bf16 autocast on CUDA) through
    ``bd3_logits(flex=True)`` against ``flex=False``."""
    import torch

    from lldiff import registry
    from lldiff.objectives.bd3.loss import bd3_logits
    from lldiff.config import ModelConfig
    from lldiff.model import Transformer

    vocab, length = shapes["backbone_vocab"], shapes["backbone_seq_len"]
    cfg = ModelConfig.from_name(shapes["backbone"], vocab_size=vocab, **registry.get("bd3-16").model_fields(vocab))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, vocab, (shapes["backbone_batch"], length), generator=gen).to(device)
    xt = torch.where(torch.rand(x0.shape, generator=gen).to(device) < 0.5, torch.full_like(x0, cfg.mask_id), x0)
    backward = device == "cuda"
    outs = {}
    for flex in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext(), \
                torch.set_grad_enabled(backward):
            logits = bd3_logits(model, xt, x0, 16, flex=flex).float()
        if backward:
            logits.logsumexp(-1).mean().backward()
        outs[flex] = (logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                        if p.grad is not None})
    result = {"backbone": shapes["backbone"], "autocast": "bf16" if device == "cuda" else "fp32",
              "logits_flex_vs_sdpa": (outs[True][0] - outs[False][0]).abs().max().item(),
              "logits_scale": outs[False][0].abs().max().item()}
    if backward:
        grads_flex, grads_sdpa = outs[True][1], outs[False][1]
        result["grad_flex_vs_sdpa_max"] = max((grads_flex[n] - grads_sdpa[n]).abs().max().item() for n in grads_sdpa)
        result["grad_scale"] = max(g.abs().max().item() for g in grads_sdpa.values())
    return result


def section_flex(shapes: dict[str, Any], device: str, part: Part, budget: Budget) -> None:
    from lldiff.objectives.bd3.loss import flex_available

    if not flex_available():
        part.put("status", "unavailable")
        part.put("reason", "this torch has no torch.nn.attention.flex_attention")
        return
    for key, run in (("attention_fp32", lambda: flex_attention_case("fp32", shapes, device)),
                     ("attention_bf16", lambda: flex_attention_case("bf16", shapes, device)),
                     ("backbone", lambda: flex_backbone_case(shapes, device))):
        if not budget.allows(3):
            part.put(key, {"skipped": "out of the section's time"})
            continue
        try:
            part.put(key, run())
        except Exception as err:
            part.put(key, _error(err))


# -- (d) xformers vs SDPA -------------------------------------------------------------------------
def section_xformers(shapes: dict[str, Any], device: str, part: Part, budget: Budget) -> None:
    if device != "cuda":
        part.put("status", "unavailable")
        part.put("reason", "no CUDA device (xformers has no CPU kernels)")
        return
    try:
        import torch
        import xformers
        import xformers.ops as xops

        part.put("xformers", xformers.__version__)
        q = torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as err:  # not installed, or its kernels do not load for this torch / CUDA
        part.put("status", "unavailable")
        part.put("reason", f"{type(err).__name__}: {str(err).splitlines()[0][:500] if str(err) else ''}")
        return
    from scaleout_gpu import backend_agreement

    agreement = backend_agreement("cuda")
    part.put("agreement_vs_fp32_reference", agreement)
    numbers = {k: v for k, v in agreement.items() if finite(v)}
    worst: dict[str, float] = {}
    for key, value in numbers.items():
        if key.startswith(("sdpa/", "xformers/")):
            backend, dtype = key.split("/")[:2]
            worst[f"{backend}_{dtype}_max_error"] = max(worst.get(f"{backend}_{dtype}_max_error", 0.0), value)
    part.put("worst", worst)
    failures = {k: v for k, v in agreement.items() if isinstance(v, str)}
    part.put("status", "ok" if not failures else "partial")
    if failures:
        part.put("failures", failures)


# -- (e) FSDP2 on one GPU ------------------------------------------------------------------------
def section_fsdp2(shapes: dict[str, Any], device: str, part: Part, budget: Budget, workdir: Path) -> None:
    from scaleout_gpu import run_case

    args = argparse.Namespace(out=workdir, device=device, size=shapes["size"], vocab=shapes["vocab"],
                              seq_len=shapes["seq_len"], batch=shapes["batch"], steps=shapes["steps"],
                              log_every=shapes["log_every"], compile="auto", loss_chunk_tokens="default")
    part.put("settings", {**shapes, "how": "scaleout_gpu.run_case: lightning.Trainer(strategy='fsdp2', devices=1), "
                          "perf/mfu median of the logged windows after the first"})
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    part.put("mdm", run_case("fsdp2-mdm", args, objective="mdm", strategy="fsdp2", precision=precision))


# -- (f) decoding --------------------------------------------------------------------------------
def section_decoding(shapes: dict[str, Any], device: str, part: Part, budget: Budget) -> None:
    import torch

    from lldiff.objectives.ar.decoding import ar_generate
    from lldiff.objectives.bd3.decoding import block_generate
    from lldiff.objectives.mdm.decoding import generate, generate_threshold
    from sampling import Counted, backbone

    s = shapes
    blocks = s["new_tokens"] // s["block"]
    if s["new_tokens"] % s["block"] or s["mdm_steps"] % blocks:
        raise ValueError(f"block {s['block']} must split {s['new_tokens']} new tokens into blocks sharing {s['mdm_steps']} steps")
    per_block_bd3 = int(s["bd3_block"] * s["mdm_steps"] / s["new_tokens"])
    torch.manual_seed(0)
    ar = backbone("ar", s["size"], s["vocab"]).to(device)
    mdm = backbone("mdm", s["size"], s["vocab"]).to(device)
    bd3 = backbone(f"bd3-{s['bd3_block']}", s["size"], s["vocab"]).to(device)
    prompt = torch.randint(0, s["vocab"], (s["batch"], s["prompt_len"]), generator=torch.Generator().manual_seed(1)).to(device)
    part.put("settings", {**s, "weights": "random (fixed-step decoding does not depend on them)",
                          "precision": "fp32 weights, no autocast (as lldiff generate --device cuda)",
                          "bd3_steps_per_block": per_block_bd3})
    n, thr = s["new_tokens"], s["threshold"]
    mdm_args = {"gen_length": n, "block_length": s["block"], "mask_id": mdm.cfg.mask_id}
    bd3_args = {"gen_length": n, "block_size": s["bd3_block"], "mask_id": bd3.cfg.mask_id,
                "steps_per_block": per_block_bd3}
    decoders: dict[str, tuple[Any, Callable[[], Any]]] = {
        "AR + KV cache": (ar, lambda: ar_generate(ar, prompt, max_new_tokens=n, use_cache=True)),
        "AR, no cache": (ar, lambda: ar_generate(ar, prompt, max_new_tokens=n, use_cache=False)),
        "MDM exact": (mdm, lambda: generate(mdm, prompt, steps=s["mdm_steps"], **mdm_args)),
        "MDM + prefix cache": (mdm, lambda: generate(mdm, prompt, steps=s["mdm_steps"], cache="prefix", **mdm_args)),
        "MDM + dual cache": (mdm, lambda: generate(mdm, prompt, steps=s["mdm_steps"], cache="dual", **mdm_args)),
        f"MDM + dual + threshold {thr}": (mdm, lambda: generate_threshold(mdm, prompt, threshold=thr, cache="dual",
                                                                          **mdm_args)),
        f"BD3-{s['bd3_block']} + cache": (bd3, lambda: block_generate(bd3, prompt, use_cache=True, **bd3_args)),
        f"BD3-{s['bd3_block']}, no cache": (bd3, lambda: block_generate(bd3, prompt, use_cache=False, **bd3_args)),
    }
    counters = {id(m): Counted(m) for m in (ar, mdm, bd3)}
    positions = s["batch"] * n
    rows: dict[str, Any] = {}
    with torch.no_grad():
        ar_generate(ar, prompt, max_new_tokens=2)  # warm-up: kernels loaded, allocator primed
        generate(mdm, prompt, steps=1, gen_length=s["block"], block_length=s["block"], mask_id=mdm.cfg.mask_id)
        for name, (model, decode) in decoders.items():
            if not budget.allows(3):
                rows[name] = {"skipped": "out of the section's time"}
                continue
            try:
                _sync(device)
                out, seconds, processed = counters[id(model)].run(lambda: (decode(), _sync(device))[0])
                rows[name] = {"tokens_per_s": positions / seconds, "seconds": seconds, "model_calls": out.model_calls,
                              "tokens_processed_per_answer_token": processed / positions}
            except Exception as err:
                rows[name] = _error(err)
            part.put("rows", rows)
    ratio = {}
    get = lambda name: rows.get(name, {}).get("tokens_per_s")  # noqa: E731
    for num, den, key in (("MDM + dual cache", "MDM exact", "mdm_dual_over_exact"),
                          ("MDM + prefix cache", "MDM exact", "mdm_prefix_over_exact"),
                          (f"BD3-{s['bd3_block']} + cache", f"BD3-{s['bd3_block']}, no cache", "bd3_cache_over_none"),
                          ("AR + KV cache", "AR, no cache", "ar_cache_over_none")):
        if finite(get(num)) and finite(get(den)):
            ratio[key] = get(num) / get(den)
    part.put("speedups", ratio)


SECTION_RUNNERS: dict[str, Callable[..., None]] = {
    "throughput": section_throughput, "fit": section_fit, "flex": section_flex, "xformers": section_xformers,
    "fsdp2": section_fsdp2, "decoding": section_decoding,
}
NEEDS_WORKDIR = {"fit", "fsdp2"}


def run_section(name: str, device: str, shapes_name: str, part_path: Path | None, deadline: float,
                workdir: Path) -> dict[str, Any]:
    """One section in this process: its results (also written to ``part_path`` as they come). Each
    section seeds what it draws itself (and imports only what it needs: a section with nothing to
    do here ends in a second)."""
    part = Part(part_path)
    shapes = SHAPES[shapes_name].get(name, {})
    budget = Budget(deadline)
    runner = SECTION_RUNNERS[name]
    extra = {"workdir": workdir} if name in NEEDS_WORKDIR else {}
    try:
        runner(shapes, device, part, budget, **extra)
        part.data.setdefault("status", "ok")
    except Exception as err:
        part.data.update({"status": "error", **_error(err)})
    part.save()
    return part.data


# -- the whole check --------------------------------------------------------------------------
def _child(name: str, args: argparse.Namespace, budget_s: float, workdir: Path, part_path: Path) -> dict[str, Any]:
    """Run a section in a process of its own, stopped (with its whole process group) at ``budget_s``."""
    deadline = time.time() + budget_s - 5  # the section's own units stop a little before the hard limit
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--device", args.device,
           "--shapes", args.shapes, "--part", str(part_path), "--deadline", str(deadline), "--workdir", str(workdir)]
    log_path = workdir.parent / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            rc = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    data = json.loads(part_path.read_text()) if part_path.exists() else {}
    if rc == 0 and not data:
        data.update(status="error", error="the section's process wrote no results")
    tail = log_path.read_text(errors="replace")[-3000:]
    if rc is None:
        data.update(status="timeout", error=f"stopped at its time limit of {budget_s:.0f} s", log_tail=tail)
    elif rc != 0 and data.get("status") in (None, "ok"):
        data.update(status="error", error=f"the section's process exited with {rc}", log_tail=tail)
    return data


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def goals(report: dict[str, Any], results_dir: Path) -> dict[str, Any]:
    """The issue's goals against this run's throughput figures (they apply to smdm-113M on a GPU)."""
    summary = report["sections"].get("throughput", {}).get("summary", {})
    out: dict[str, Any] = {"applies": report["device"] == "cuda" and report["shapes"] == "full"}
    for key, target in GOALS.items():  # as a Lightning fit runs (what the 18.5% was), else the bare step
        fit_value = summary.get(f"lightning_{key}")
        value = fit_value if finite(fit_value) else summary.get(key)
        out[key] = {"value": value, "goal": f">= {target}", "met": value >= target if finite(value) else None,
                    "from": "Lightning fit" if finite(fit_value) else "bare step"}
    before = results_dir / f"scaleout_gpu-{report['device_key'].split('-')[0]}.json"
    if before.exists() and report["device"] == "cuda":  # scaleout_gpu.py's bf16 one-device (else FSDP2) case
        old = json.loads(before.read_text())
        tokens = old.get("batch", 0) * old.get("seq_len", 0)
        for o in ("mdm", "ar"):
            cases = [old.get("cases", {}).get(f"{kind}-{o}", {}) for kind in ("single", "fsdp2")]
            gib = next((c["max_memory_gib"] for c in cases if finite(c.get("max_memory_gib"))), None)
            now = summary.get(f"peak_memory_mib_per_token_{o}")
            if gib is not None and tokens and finite(now):
                was = gib * 1024 / tokens
                out[f"memory_per_token_{o}"] = {"value": now, "before": was, "source": before.name, "met": now <= was}
    return out


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if finite(value) else "-"


def markdown(report: dict[str, Any]) -> str:
    """The record's tables."""
    sec = report["sections"]
    lines = [f"# GPU check: {report['device_name']} ({report['date']})", "",
             f"torch {report['torch']}, lightning {report['lightning']}, shapes `{report['shapes']}`"
             + (" (CPU dry run: tiny shapes, fp32; no figure here is a GPU figure)" if report["device"] == "cpu" else ""),
             "", "| section | status | seconds | budget |", "|---|---|---|---|"]
    for name, data in sec.items():
        lines.append(f"| {name} | {data.get('status')} | {_fmt(data.get('seconds'), '.0f')} | {_fmt(data.get('budget_s'), '.0f')} |")
    thr = sec.get("throughput", {})
    if thr.get("rows"):
        s = thr.get("settings", {})
        lines += ["", f"## Training step: {s.get('size')}, {s.get('batch')} x {s.get('seq_len')} tokens, {s.get('precision')}",
                  "", "| objective | variant | tokens/s | MFU | in a Lightning fit: tokens/s, MFU | peak GiB | "
                  "MiB/token | compile | chunk | fused |", "|---|---|---|---|---|---|---|---|---|---|"]
        for objective, variants in thr["rows"].items():
            for variant, r in variants.items():
                if "tokens_per_s" not in r:
                    lines.append(f"| {objective} | {variant} | {(r.get('error') or r.get('skipped', ''))[:80]} ||||||||")
                    continue
                in_fit = (f"{_fmt(r['lightning_tokens_per_s'], ',.0f')}, {_fmt(r['lightning_mfu'], '.1%')}"
                          if "lightning_tokens_per_s" in r else "-")
                lines.append(f"| {objective} | {variant} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['mfu'], '.1%')} | "
                             f"{in_fit} | "
                             f"{_fmt(r['peak_memory_gib'], '.1f')} | {_fmt(r['peak_memory_mib_per_token'], '.3f')} | "
                             f"{r['compile']} | {r['loss_chunk_tokens']} | {r['fused_adamw']} |")
    fit = sec.get("fit", {})
    rows = {k: v for k, v in fit.items() if isinstance(v, dict) and "config" in v}
    if rows:
        lines += ["", "## lldiff fit, checkpoint, resume", "",
                  "| run | precision | steps | loss first/last quarter | finite | falling | resume max diff | resume ok |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {r['config']} | {r['precision']} | {r['steps']} | {_fmt(r['train_loss_first_quarter'], '.3f')}"
                         f" / {_fmt(r['train_loss_last_quarter'], '.3f')} | {r['loss_finite']} | {r['loss_falling']} | "
                         f"{_fmt(r['resume_weights_max_abs_diff'], '.2e')} | {r['resume_ok']} |")
    flex = sec.get("flex", {})
    cases = {k: v for k, v in flex.items() if isinstance(v, dict) and "forward_flex_vs_sdpa" in v}
    if cases:
        lines += ["", "## FlexAttention block mask vs SDPA + boolean mask (max abs diff)", "",
                  "| case | forward | dq | dk | dv | ms flex | ms sdpa |", "|---|---|---|---|---|---|---|"]
        for name, r in cases.items():
            ms = ("fwd_bwd_ms_flex", "fwd_bwd_ms_sdpa_boolean") if "fwd_bwd_ms_flex" in r else ("fwd_ms_flex", "fwd_ms_sdpa_boolean")
            lines.append(f"| {name} | {_fmt(r['forward_flex_vs_sdpa'], '.2e')} | "
                         + " | ".join(_fmt(r.get(f"backward_{g}_flex_vs_sdpa"), ".2e") for g in ("dq", "dk", "dv"))
                         + f" | {_fmt(r.get(ms[0]), '.2f')} | {_fmt(r.get(ms[1]), '.2f')} |")
    xf = sec.get("xformers", {})
    if xf:
        lines += ["", f"## xformers: {xf.get('status')}" + (f" ({xf['reason']})" if xf.get("reason") else "")]
    if xf.get("worst"):
        lines += [f"- {k}: {v:.2e}" for k, v in xf["worst"].items()]
    fsdp = sec.get("fsdp2", {}).get("mdm", {})
    if "tokens_per_s" in fsdp:
        s = sec["fsdp2"].get("settings", {})
        lines += ["", f"## FSDP2, one device, {s.get('size')} MDM, {s.get('batch')} x {s.get('seq_len')}", "",
                  f"tokens/s {_fmt(fsdp['tokens_per_s'], ',.0f')}, MFU {_fmt(fsdp['mfu'], '.1%')}, "
                  f"peak {_fmt(fsdp['max_memory_gib'], '.1f')} GiB ({_fmt(fsdp['max_memory_mib_per_token'], '.3f')} MiB/token)"]
    dec = sec.get("decoding", {})
    if dec.get("rows"):
        s = dec.get("settings", {})
        lines += ["", f"## Decoding: {s.get('size')} random weights, batch {s.get('batch')}, {s.get('new_tokens')} new tokens",
                  "", "| decoder | tokens/s | model calls | tokens processed / answer token |", "|---|---|---|---|"]
        for name, r in dec["rows"].items():
            lines.append(f"| {name} | {_fmt(r.get('tokens_per_s'), ',.0f')} | {r.get('model_calls', '-')} | "
                         f"{_fmt(r.get('tokens_processed_per_answer_token'), '.1f')} |")
    g = report.get("goals", {})
    if g.get("applies"):
        lines += ["", "## Issue 25's goals", ""]
        for key, v in g.items():
            if isinstance(v, dict):
                verdict = {True: "met", False: "not met", None: "not measured"}[v.get("met")]
                goal = v.get("goal") or f"<= {_fmt(v.get('before'), '.3f')} MiB/token, {v.get('source')}"
                lines.append(f"- {key}: {_fmt(v.get('value'), '.3f')} (goal {goal}"
                             f"{', ' + v['from'] if v.get('from') else ''}): {verdict}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: cuda when a GPU is visible, else the CPU dry run")
    parser.add_argument("--shapes", choices=list(SHAPES), help="full (default on a GPU) or tiny (the dry run's)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--results", type=Path, default=HERE / "results",
                        help="where gpu-check-<device>.json/.md go (default benchmarks/results)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the sections in this process (faster to start; no hard time limit, no isolation)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every time budget (a slow machine)")
    # a section's own process (internal)
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = time.time()
    if args.section:
        run_section(args.section, args.device, args.shapes, args.part, args.deadline, args.workdir)
        return None
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(SECTIONS)}")
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    import lightning as L
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False (leave --device auto for the CPU dry run)")
    args.shapes = args.shapes or ("full" if args.device == "cuda" else "tiny")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report: dict[str, Any] = {
        "schema": SCHEMA, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": args.device, "device_name": name, "device_key": device_key(name), "shapes": args.shapes,
        "torch": torch.__version__, "cuda": torch.version.cuda, "lightning": L.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "git_commit": _git_commit(),
        "budget_s": TOTAL_BUDGET_S[args.device] * args.budget_scale, "sections": {},
    }
    stem = f"gpu-check-{report['device_key']}" + ("-tiny" if args.device == "cuda" and args.shapes == "tiny" else "")
    json_path, md_path = args.results / f"{stem}.json", args.results / f"{stem}.md"
    from lldiff.atomic import write_text

    def save() -> None:
        report["seconds"] = time.time() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the sections' processes (not in-process ones)
        report["cpu_s_sections"] = usage.ru_utime + usage.ru_stime
        report["goals"] = goals(report, args.results)
        write_text(json_path, json.dumps(report, indent=1, default=str))
        write_text(md_path, markdown(report))

    end = started + report["budget_s"]
    scratch = Path(tempfile.mkdtemp(prefix="lldiff-gpu-check-"))
    try:
        for i, section in enumerate(sections):
            reserved = sum(SECTIONS[later][args.device] * args.budget_scale for later in sections[i + 1:])
            budget = max(min(SECTIONS[section][args.device] * args.budget_scale, end - time.time()),
                         end - time.time() - reserved)
            if budget < 10:
                report["sections"][section] = {"status": "skipped", "error": "the check's total time was spent"}
                save()
                continue
            print(f"[gpu-check] {section}: up to {budget:.0f} s ...", flush=True)
            t0 = time.time()
            workdir = scratch / section
            workdir.mkdir()
            if args.in_process:
                data = run_section(section, args.device, args.shapes, None, t0 + budget, workdir)
            else:
                data = _child(section, args, budget, workdir, scratch / f"{section}.json")
            data["seconds"], data["budget_s"] = time.time() - t0, budget
            report["sections"][section] = data
            print(f"[gpu-check] {section}: {data.get('status')} in {data['seconds']:.0f} s"
                  + (f" ({data['error'][:300]})" if data.get("error") else ""), flush=True)
            save()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    save()
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return report


def quiet() -> None:
    """The command line's console: third-party warnings and Lightning's banners off (the record
    holds what matters); not when :func:`main` is called from a test, whose process others share."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for logger in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the corpus's tokenising bars


if __name__ == "__main__":
    quiet()
    main()
