"""Where one training step's time goes (issue 16): a torch.profiler breakdown of one MDM and one
AR step (``--objectives``, also ``bd3-16``) of the real LightningModules, by kernel category.

    python benchmarks/profile_step.py --out /tmp/prof          # GPU: smdm-113M, 16 x 1024, bf16-mixed, ~3 min on an H100/H200
    python benchmarks/profile_step.py --out /tmp/prof --trace  # also a chrome trace per objective (trace-<name>.json.gz)
    python benchmarks/profile_step.py --device cpu --size tiny-0.1M --batch 4 --seq-len 64 --steps 2 --out /tmp/p  # CPU smoke test

Each objective's module comes from its registry entry (``lldiff.objectives.get(name).module`` and
``module_args()``) with the modules' defaults (regional ``torch.compile`` of the blocks on CUDA,
``--compile``; the LM head in chunks of ``loss_chunk_tokens``; fused AdamW from the module's own
``configure_optimizers``). It trains on one fixed random batch of packed rows (B, L+1).

The **bare step** is ``module.loss(rows)`` (under bf16 autocast on CUDA, fp32 on a CPU) + backward +
``clip_grad_norm_(1.0)`` + optimizer and schedule step. After ``--warmup`` steps (compilation) it is

* timed: ``--time-steps`` steps between two device synchronisations -> ms/step, tokens/s, MFU
  (the registry's ``matmul_flops_per_token`` over ``lldiff.flops.device_peak_flops``, as
  ``lldiff.modules`` logs ``perf/mfu``), and the peak device memory;
* split into phases (forward+loss, backward, clip+optimizer), synchronising after each phase;
* profiled: ``--steps`` steps under ``torch.profiler`` (CPU + CUDA activities). Every device
  kernel's time (on a CPU: every op's self CPU time) goes to one category by the kernel's name,
  the op that launched it and that op's ancestors: matmul, attention, elementwise
  (norm/RoPE/SwiGLU/casts, eager), compiled fused (triton), embedding, loss and masking (the
  masking draws, the masked-row selection, the head's cross-entropy: everything of the loss
  outside the backbone and after its final norm except the head's matmul, told apart by
  record_function ranges from hooks on the eager Transformer and its final norm; a backward op
  counts where its autograd node's forward op ran, by the node's sequence number), optimizer
  (clip + AdamW), communication, other. The top names of each category, and of "other", are
  listed so the rules can be refined. On CUDA, wall - kernel time is the device's idle time
  (host-bound launches, syncs such as the MDM's masked-row count).

Then **Lightning overhead**: a ``lightning.Trainer(max_steps=...)`` fit of the same module on a
DataLoader repeating the same batch (TensorBoard logging every 10 steps, as sweeps log), timed over
``--lightning-steps`` steps after the warm-up, minus the bare step. **Data loading**: batches from the real ``PretrainDataModule`` loader over the offline
``stdlib`` corpus (``--data stdlib``; its tokenizer is built in a temporary cache, ``--data-vocab``
tokens: the loading cost does not depend on the vocabulary) plus the host-to-device copy; where the
token cache cannot be built (it needs the ``datasets`` package), the same loader (``PackedRows``
over a memory-mapped ``.npy``, the shuffle sampler) over random rows; ``--data off`` skips it.

On CUDA, ``OUT/profile.json`` also holds each objective's device-side spans of the step's phases
(``device_spans_ms_per_step``, where the profiler records them) and a warning if the kernel time
exceeds the wall time (overlapping streams or something counted twice).

Writes ``OUT/profile.json`` (every figure, rewritten atomically after each objective) and
``OUT/profile_ops.txt`` (the profiler's top-30 op table per objective), and prints a markdown table.
Nothing missing stops the run: a failing part is recorded as ``{"error": ...}`` and the rest goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

if importlib.util.find_spec("lldiff") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lldiff import objectives as registry
from lldiff.atomic import write_text
from lldiff.flops import device_peak_flops

WINDOW_SEED = 1234
"""Seed of the global RNG at the start of both timed windows (bare and Lightning): an MDM step's cost
follows its masking ratio (the head runs on the masked rows), so both windows draw the same ratios."""

CATEGORIES = ("matmul", "attention", "elementwise (norm/RoPE/SwiGLU)", "compiled fused (triton)", "embedding",
              "loss and masking", "optimizer", "communication", "other")
"""The breakdown's rows, in the order printed."""

# record_function ranges this script opens (the step's phases; the backbone's forward and the part
# after its final norm, from module hooks) so ops can be told apart by where they run
R_STEP, R_FORWARD, R_BACKWARD, R_OPTIM = "lldiff/step", "lldiff/forward_loss", "lldiff/backward", "lldiff/optimizer"
R_BACKBONE, R_HEAD = "lldiff/backbone", "lldiff/head_loss"

# patterns on names lower-cased with "_" removed (so NllLossBackward0 and aten::nll_loss_forward agree)
_OPTIM = re.compile(r"optimizer|adam|foreach|clipgrad|lpnorm|multitensorapply|lldiff/optimizer")
_COMM = re.compile(r"nccl|c10d::|allreduce|allgather|reducescatter|alltoall")
_ATTN = re.compile(r"flash|fmha|scaleddotproduct|sdpa|efficientattention|flexattention|attention|xformers|cutlassf|cutlassb")
_MATMUL_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|s16816|s1688|gemv|splitkreduce|wgmma|magma|dotkernel")
_MATMUL_OP = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|addmv|mv|dot|scaledmm|mkldnn.*(mm|linear))$")
_COMPILED = re.compile(r"^triton|cppfused|^graph\d*cpp|compiledfxgraph")  # on a CPU the fused C++ code runs as
# the self time of "## Call CompiledFxGraph <hash> ##"; on a GPU the kernels' own names (triton_...) decide
_EMBED = re.compile(r"embedding")
_CE = re.compile(r"crossentropy|nllloss|logsoftmax|softmax|logsumexp")
_MASKING = re.compile(r"indexbackward|indexput|nonzero|bernoulli|uniform|^aten::rand|distribution|randperm")
_ELEMENTWISE_KERNEL = re.compile(r"elementwise|vectorized|reduce|catarray|copy|norm|fill|silu|sigmoid|rsqrt|pow")
_ELEMENTWISE_OP = re.compile(
    r"^aten::(add|sub|mul|div|neg|silu|sigmoid|gelu|cat|stack|copy|tocopy|clone|contiguous|pow|rsqrt|sqrt|mean|sum|"
    r"exp|cos|sin|rmsnorm|fusedrmsnorm|layernorm|nativelayernorm|fill|zero|zeros|ones|full|clamp|abs|where|lt|gt|"
    r"maximum|minimum|square|reciprocal|index|slice|select)")


def _norm(name: str) -> str:
    return name.lower().replace("_", "")


def categorise(kernel: str | None, chain: list[str]) -> str:
    """The category of a kernel (``kernel``: its name on a GPU, None for a CPU op's self time) launched
    by ``chain[0]``, an op whose ancestors are ``chain[1:]`` (innermost first; may be empty when the
    profiler linked the kernel to no op)."""
    k = _norm(kernel) if kernel else ""
    names = [_norm(n) for n in chain]
    op = names[0] if names else ""
    every = ([k] if k else []) + names
    if any(_OPTIM.search(n) for n in every):
        return "optimizer"
    if any(_COMM.search(n) for n in every):
        return "communication"
    own = k or op  # the kernel's name, or (CPU) the op's
    if _COMPILED.search(own):
        if own.startswith("tritontem") and ("flex" in own or "attention" in own):
            return "attention"
        if own.startswith("tritontem") and "mm" in own:
            return "matmul"
        return "compiled fused (triton)"
    if any(_ATTN.search(n) for n in every):
        return "attention"
    if (k and _MATMUL_KERNEL.search(k)) or _MATMUL_OP.search(op):
        return "matmul"
    if any(_EMBED.search(n) for n in every):
        return "embedding"
    in_backbone = _norm(R_BACKBONE) in names
    in_head = _norm(R_HEAD) in names
    in_loss_outside_backbone = _norm(R_FORWARD) in names and not in_backbone
    if in_head or in_loss_outside_backbone or any(_CE.search(n) for n in every) \
            or (not in_backbone and any(_MASKING.search(n) for n in every)):
        return "loss and masking"
    if (k and _ELEMENTWISE_KERNEL.search(k)) or _ELEMENTWISE_OP.search(op):
        return "elementwise (norm/RoPE/SwiGLU)"
    return "other"


def _chain(event: Any, regions: dict[tuple[Any, int], str] | None = None) -> list[str]:
    """``event``'s name and its ancestors' (innermost first). In the backward, the forward region
    (from :func:`forward_regions`) of the innermost autograd node's forward op is appended as its
    marker, so the backward of the loss counts where its forward does."""
    names, node, found = [], event, False
    while node is not None and len(names) < 64:
        names.append(node.name)
        if regions and not found and "Backward" in node.name and getattr(node, "sequence_nr", -1) >= 0:
            found = True
            region = regions.get((getattr(node, "fwd_thread", None), node.sequence_nr))
            if region is not None:
                names.append(region)
        node = getattr(node, "cpu_parent", None)
    return names


def forward_regions(events: list[Any]) -> dict[tuple[Any, int], str]:
    """(thread, autograd sequence number) of each forward op of the loss -> the marker of where it
    ran: ``lldiff/head_loss`` (after the final norm), ``lldiff/forward_loss`` (outside the backbone:
    masking, reduction) or ``lldiff/backbone``. A backward node carries its forward op's sequence
    number and thread (``fwd_thread``); the last op recorded with a number is the node's creator."""
    regions: dict[tuple[Any, int], str] = {}
    for ev in sorted((e for e in events if _is_cpu(e) and getattr(e, "sequence_nr", -1) >= 0
                      and "Backward" not in e.name), key=lambda e: e.time_range.start):
        chain = _chain(ev)
        if R_FORWARD not in chain:
            continue
        regions[(getattr(ev, "thread", None), ev.sequence_nr)] = (
            R_HEAD if R_HEAD in chain else R_BACKBONE if R_BACKBONE in chain else R_FORWARD)
    return regions


def _is_cpu(event: Any) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CPU")


def _is_annotation(event: Any) -> bool:
    """A device-side copy of a record_function range (kineto's gpu_user_annotation): its span
    covers kernels counted on their own."""
    return bool(getattr(event, "is_user_annotation", False)) \
        or "annotation" in str(getattr(event, "activity_type", "") or "").lower() \
        or event.name.startswith(("lldiff/", "ProfilerStep#"))


_SYNC_NAMES = ("Context Sync", "Stream Sync", "Event Sync", "Stream Wait Event", "Device Synchronize")


def _not_device_work(event: Any) -> bool:
    """Device events that are no work of the device: annotation spans, and CUDA synchronisation
    records (kineto's cuda_sync, when enabled) whose spans are waits."""
    return _is_annotation(event) or "sync" in str(getattr(event, "activity_type", "") or "").lower() \
        or event.name.startswith(_SYNC_NAMES)


def breakdown(events: list[Any], *, device: bool, steps: int, top: int = 6) -> dict[str, Any]:
    """Per-category time per step from the profiler's events: device kernel time (``device``) or
    self CPU time. Returns categories (ms/step, fraction, top names), the top uncategorised names,
    and the totals computed independently of the categories (they should agree)."""
    by_cat: dict[str, float] = defaultdict(float)
    names: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    total = 0.0
    regions = forward_regions(events)
    if device:
        # every device activity (kernel, memcpy, memset) is one non-CPU event with its duration, counted
        # once; the op that launched it is the CPU event whose id is its linked correlation id (or, in
        # a torch without that field, the next unclaimed CPU event listing a kernel of that name)
        launchers = {ev.id: ev for ev in events if _is_cpu(ev) and not getattr(ev, "linked_correlation_id", 0)
                     and getattr(ev, "id", 0)}
        by_name: dict[str, list[Any]] = defaultdict(list)
        for ev in sorted((e for e in events if _is_cpu(e) and getattr(e, "kernels", None)),
                         key=lambda e: e.time_range.start):
            for kernel in ev.kernels:
                by_name[kernel.name].append(ev)
        taken: dict[str, int] = defaultdict(int)
        on_device = sorted((e for e in events if not _is_cpu(e)), key=lambda e: e.time_range.start)
        linked = any(getattr(e, "linked_correlation_id", 0) for e in on_device)
        for ev in on_device:
            if _not_device_work(ev):
                continue
            duration = ev.time_range.elapsed_us()
            launcher = launchers.get(getattr(ev, "linked_correlation_id", None) or -1)
            if launcher is None and not linked and taken[ev.name] < len(by_name.get(ev.name, ())):
                launcher = by_name[ev.name][taken[ev.name]]
                taken[ev.name] += 1
            chain = _chain(launcher, regions) if launcher is not None else []
            cat = categorise(ev.name, chain)
            by_cat[cat] += duration
            names[cat][f"{ev.name[:140]}  <- {launcher.name[:50]}" if launcher is not None else ev.name] += duration
            total += duration
    else:
        for ev in events:
            if not _is_cpu(ev) or getattr(ev, "is_async", False):
                continue
            duration = ev.self_cpu_time_total
            if duration <= 0:
                continue
            cat = categorise(None, _chain(ev, regions))
            by_cat[cat] += duration
            names[cat][ev.name] += duration
            total += duration
    categorised = sum(by_cat.values())

    def per_step(us: float) -> float:
        return us / 1e3 / max(steps, 1)

    table = {}
    for cat in CATEGORIES:
        ranked = sorted(names[cat].items(), key=lambda kv: -kv[1])[:top]
        table[cat] = {"ms_per_step": per_step(by_cat.get(cat, 0.0)),
                      "fraction": by_cat.get(cat, 0.0) / categorised if categorised else 0.0,
                      "top": [[n[:200], per_step(us)] for n, us in ranked]}
    return {
        "time": "device kernel time (CUDA)" if device else "self CPU time",
        "steps": steps,
        "total_ms_per_step": per_step(total),
        "categorised_ms_per_step": per_step(categorised),
        "categories": table,
        "uncategorised_top": [[n[:200], per_step(us)] for n, us in
                              sorted(names["other"].items(), key=lambda kv: -kv[1])[:15]],
    }


# -- the module, the batch and the bare step -----------------------------------------------------
class RepeatRows(Dataset):
    """The same rows again and again (a DataLoader over it yields the one fixed batch)."""

    def __init__(self, rows: torch.Tensor, batches: int) -> None:
        self.rows, self.batches = rows, batches

    def __len__(self) -> int:
        return self.batches * len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i % len(self.rows)]}


def make_module(objective: str, args: argparse.Namespace) -> L.LightningModule:
    """The objective's pre-training module from its registry entry, with the modules' defaults
    (but no random-length truncation: every step trains on the full batch)."""
    entry = registry.get(objective)
    init_args = {**entry.module_args(), "size": args.size, "vocab_size": args.vocab, "random_length_prob": 0.0,
                 "warmup_steps": 1, "compile": args.compile_on}
    if args.loss_chunk_tokens != "default":
        init_args["loss_chunk_tokens"] = None if args.loss_chunk_tokens == "none" else int(args.loss_chunk_tokens)
    module_path, _, class_name = entry.module.rpartition(".")
    torch.manual_seed(0)
    return getattr(importlib.import_module(module_path), class_name)(**init_args)


def _quiet_trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(devices=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


def make_optimizer(module: L.LightningModule, args: argparse.Namespace, max_steps: int) -> tuple[Any, Any, str]:
    """The module's own optimizer and schedule (``configure_optimizers``, which reads the trainer's
    max_steps: a Trainer that never fits is attached for that)."""
    module.trainer = _quiet_trainer(accelerator=args.device, max_steps=max_steps, logger=False)
    try:
        config = module.configure_optimizers()
    finally:
        module.trainer = None
    if isinstance(config, dict):
        scheduler = config.get("lr_scheduler")
        scheduler = scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
        return config["optimizer"], scheduler, "configure_optimizers"
    if isinstance(config, torch.optim.Optimizer):
        return config, None, "configure_optimizers"
    raise TypeError(f"configure_optimizers returned {type(config).__name__}; expected a dict or an optimizer")


class Stepper:
    """The bare step: loss (autocast on CUDA) + backward + clip + optimizer and schedule step."""

    def __init__(self, module: L.LightningModule, rows: torch.Tensor, optimizer: Any, scheduler: Any,
                 args: argparse.Namespace) -> None:
        self.module, self.rows, self.optimizer, self.scheduler = module, rows, optimizer, scheduler
        self.cuda = args.device == "cuda"
        self.autocast = args.autocast

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def forward(self) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext():
            return self.module.loss(self.rows)

    def optimize(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        loss = self.forward()
        loss.backward()
        self.optimize()

    def annotated_step(self) -> None:
        rf = torch.autograd.profiler.record_function
        with rf(R_STEP):
            with rf(R_FORWARD):
                loss = self.forward()
            with rf(R_BACKWARD):
                loss.backward()
            with rf(R_OPTIM):
                self.optimize()

    def timed(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps between two synchronisations (the global RNG seeded
        as the Lightning fit's timed window is, so the MDM draws the same masking ratios there)."""
        self.sync()
        torch.manual_seed(WINDOW_SEED)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return (time.perf_counter() - start) / steps

    def phases(self, steps: int) -> dict[str, float]:
        """Median ms of each phase, synchronising after each (so their sum exceeds a step's time)."""
        times: dict[str, list[float]] = {"forward_loss": [], "backward": [], "clip_optimizer": []}
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            loss = self.forward()
            self.sync()
            t1 = time.perf_counter()
            loss.backward()
            self.sync()
            t2 = time.perf_counter()
            self.optimize()
            self.sync()
            t3 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(dt * 1e3)
        return {key: statistics.median(values) for key, values in times.items()}


@contextlib.contextmanager
def region_markers(model: torch.nn.Module):
    """record_function ranges around the backbone's forward (``lldiff/backbone``) and, inside it,
    after the final norm (``lldiff/head_loss``: the LM head and the loss's readout), from forward
    hooks on the eager Transformer and its final norm (the compiled blocks are not touched)."""
    open_ranges: list[Any] = []
    rf = torch.autograd.profiler.record_function

    def enter(name: str) -> None:
        r = rf(name)
        r.__enter__()
        open_ranges.append(r)

    def leave_all(*_: Any) -> None:
        while open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(lambda *_: enter(R_BACKBONE))]
    norm = getattr(model, "norm", None)
    if isinstance(norm, torch.nn.Module):
        handles.append(norm.register_forward_hook(lambda *_: enter(R_HEAD) if len(open_ranges) == 1 else None))
    handles.append(model.register_forward_hook(leave_all))
    try:
        yield
    finally:
        leave_all()
        for handle in handles:
            handle.remove()


def _profiler_total(averages: Any, *, device: bool) -> float | None:
    """The profiler's own total (us) of self device time (device events only, as its table sums them)
    or self CPU time: a check on the categories' sum."""
    try:
        if not device:
            return float(sum(avg.self_cpu_time_total for avg in averages))
        total = 0.0
        for avg in averages:
            if _is_cpu(avg) or getattr(avg, "is_user_annotation", False):  # as the profiler's own table sums
                continue
            value = getattr(avg, "self_device_time_total", None)
            total += value if value is not None else avg.self_cuda_time_total
        return total
    except Exception:
        return None


def profile_steps(stepper: Stepper, args: argparse.Namespace, name: str) -> tuple[dict[str, Any], str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if stepper.cuda else [])
    stepper.sync()
    with region_markers(stepper.module.model), profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.steps):
            stepper.annotated_step()
        stepper.sync()
    events = list(prof.events())
    result: dict[str, Any] = {}
    averages = prof.key_averages()
    views = (("device", True), ("host", False)) if stepper.cuda else (("host", False),)
    for view, on_device in views:
        result[view] = breakdown(events, device=on_device, steps=args.steps)
        total = _profiler_total(averages, device=on_device)
        result[view]["profiler_total_ms_per_step"] = None if total is None else total / 1e3 / args.steps
    if stepper.cuda:  # device-side spans of this script's ranges (kineto's gpu_user_annotation), if recorded
        spans: dict[str, float] = defaultdict(float)
        for ev in events:
            if not _is_cpu(ev) and _is_annotation(ev) and ev.name.startswith("lldiff/"):
                spans[ev.name] += ev.time_range.elapsed_us() / 1e3 / args.steps
        result["device_spans_ms_per_step"] = dict(spans)
    table = ""
    sort_keys = ("self_cuda_time_total", "self_device_time_total", "cuda_time_total") if stepper.cuda else ()
    for key in (*sort_keys, "self_cpu_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=30, max_name_column_width=90)
            result["op_table_sorted_by"] = key
            break
        except Exception as err:  # a sort key this torch does not know
            table = f"(table sorted by {key} failed: {type(err).__name__}: {err})"
    if args.trace:
        path = args.out / f"trace-{name}.json.gz"
        try:
            prof.export_chrome_trace(str(path))
            result["trace"] = str(path)
        except Exception as err:
            result["trace"] = f"{type(err).__name__}: {err}"
    return result, table


# -- Lightning overhead ------------------------------------------------------------------------
class StepTimer(L.Callback):
    """Device-synchronised time from the end of batch ``warmup - 1`` to the end of the last batch:
    ``steps`` whole loop iterations (fetch, transfer, step, hooks, logging)."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.first, self.last, self.cuda = warmup - 1, warmup + steps - 1, cuda
        self.start = self.end = None

    def _stamp(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first:
            torch.manual_seed(WINDOW_SEED)  # the bare loop's timed steps start so too
            self.start = self._stamp()
        elif batch_idx == self.last:
            self.end = self._stamp()


def _fit_timed(module: L.LightningModule, rows_cpu: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    warmup, steps = max(args.warmup, 1), args.lightning_steps
    timer = StepTimer(warmup, steps, args.device == "cuda")
    loader = DataLoader(RepeatRows(rows_cpu, warmup + steps + 2), batch_size=len(rows_cpu),
                        pin_memory=args.device == "cuda")
    with tempfile.TemporaryDirectory() as logdir:
        trainer = _quiet_trainer(
            accelerator=args.device, precision=args.precision, max_steps=warmup + steps, log_every_n_steps=10,
            logger=L.pytorch.loggers.TensorBoardLogger(logdir, name="", version=""), gradient_clip_val=1.0,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=loader)
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"the fit ran {trainer.global_step} steps, fewer than {warmup + steps}")
    return {"step_ms": (timer.end - timer.start) / steps * 1e3, "steps_timed": steps, "warmup": warmup,
            "log_every_n_steps": 10, "logger": "TensorBoardLogger", "precision": args.precision}


def lightning_step(module: L.LightningModule, rows_cpu: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """A Lightning fit's time per step (the fit clips gradients, as every lldiff config does)."""
    return _fit_timed(module, rows_cpu, args)


# -- data loading --------------------------------------------------------------------------------
def time_loader(loader: DataLoader, args: argparse.Namespace) -> dict[str, Any]:
    """Median ms to fetch a batch from ``loader`` and to copy it to the device."""
    available = len(loader)
    n = min(args.data_batches, available - 1)
    if n < 1:
        raise ValueError(f"only {available} batches of {args.batch} x {args.seq_len + 1} tokens to time")
    batches = iter(loader)
    t0 = time.perf_counter()
    first = next(batches)
    first_ms = (time.perf_counter() - t0) * 1e3
    fetch, copy = [], []
    device = torch.device(args.device)
    for _ in range(n):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        batch["input_ids"].to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        fetch.append((t1 - t0) * 1e3)
        copy.append((t2 - t1) * 1e3)
    return {"batch_shape": list(first["input_ids"].shape), "num_workers": loader.num_workers,
            "pin_memory": loader.pin_memory, "first_batch_ms": first_ms,
            "fetch_ms_per_batch": statistics.median(fetch), "h2d_copy_ms_per_batch": statistics.median(copy),
            "batches_timed": n}


def data_loading(args: argparse.Namespace) -> dict[str, Any]:
    """ms per batch from the real PretrainDataModule loader over the offline stdlib corpus; if that
    cannot be built here (building its token cache needs the ``datasets`` package), the same loader
    (``PackedRows`` over a memory-mapped int32 ``.npy``, the shuffle sampler, ``batch_size``) over
    random rows of the same shape."""
    cache = Path(args.data_cache) if args.data_cache else Path(tempfile.mkdtemp(prefix="lldiff-prof-cache-"))
    try:
        try:
            from lldiff.data import PretrainDataModule

            start = time.perf_counter()
            datamodule = PretrainDataModule(source="stdlib", max_bytes=args.data_bytes, vocab_size=args.data_vocab,
                                            seq_len=args.seq_len, batch_size=args.batch, cache_dir=str(cache))
            datamodule.prepare_data()
            datamodule.setup("fit")
            prepare_s = time.perf_counter() - start
            result = time_loader(datamodule.train_dataloader(), args)
            return {"source": "PretrainDataModule, stdlib corpus (offline)", "vocab": datamodule.vocab_size_real,
                    "prepare_s (tokenizer, tokens, rows; one-off)": prepare_s, **result,
                    "note": "in-process loader as the datamodule builds it without a trainer (pin_memory only "
                            "under a CUDA trainer); token ids < data vocab, which does not change the cost"}
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
        import numpy as np

        from lldiff.data.packing import PackedRows
        from lldiff.data.sampler import DataParallelShuffleSampler

        n_rows = args.batch * (args.data_batches + 2)
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / "synthetic-rows.npy"
        np.save(path, np.random.default_rng(0).integers(0, args.data_vocab, (n_rows, args.seq_len + 1), dtype=np.int32))
        rows = PackedRows(np.load(path, mmap_mode="r"))
        loader = DataLoader(rows, batch_size=args.batch, sampler=DataParallelShuffleSampler(len(rows), 1234),
                            drop_last=True, num_workers=0)
        return {"source": "fallback: PackedRows over a memory-mapped .npy of random rows (the real loader's "
                          "dataset and sampler)", "real_loader_failed": reason, **time_loader(loader, args)}
    finally:
        if not args.data_cache:
            shutil.rmtree(cache, ignore_errors=True)


# -- one objective ------------------------------------------------------------------------------
def _error(err: BaseException) -> dict[str, str]:
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}


def run_objective(name: str, args: argparse.Namespace, peak: float | None) -> tuple[dict[str, Any], str]:
    entry = registry.get(name)
    entry.check_seq_len(args.seq_len)
    device = torch.device(args.device)
    module = make_module(name, args).to(device)
    module.train()
    result: dict[str, Any] = {
        "objective": name, "module": entry.module, "size": args.size,
        "params": sum(p.numel() for p in module.parameters()),
        "compile": module.model.blocks_compiled, "loss_chunk_tokens": module.loss_chunk_tokens,
        "precision": args.precision, "autocast_bf16": args.autocast,
    }
    rows_cpu = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    rows = rows_cpu.to(device)
    total_bare = args.warmup + 2 * args.time_steps + args.phase_steps + args.steps
    optimizer, scheduler, source = make_optimizer(module, args, max_steps=max(total_bare, 10))
    result["optimizer"] = {"class": type(optimizer).__name__, "fused": bool(optimizer.defaults.get("fused")),
                           "from": source}
    stepper = Stepper(module, rows, optimizer, scheduler, args)
    tokens = args.batch * args.seq_len
    flops_per_token = entry.matmul_flops_per_token(module.config, args.seq_len)
    result["tokens_per_step"], result["matmul_flops_per_token"] = tokens, flops_per_token
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.warmup):
        stepper.step()
    stepper.sync()
    result["warmup_s"] = time.perf_counter() - start  # compilation included
    # the order: phases and profile (more warm-up: a CPU step keeps getting faster for tens of steps),
    # then the timed bare steps, the Lightning fit, and the timed bare steps again (drift hits both)
    try:
        result["phases_ms"] = stepper.phases(args.phase_steps)
    except Exception as err:
        result["phases_ms"] = _error(err)
    table = ""
    try:
        result["profile"], table = profile_steps(stepper, args, name)
    except Exception as err:
        result["profile"] = _error(err)
    rounds = [stepper.timed(args.time_steps)]
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    try:
        result["lightning"] = lightning_step(module, rows_cpu, args)
    except Exception as err:
        result["lightning"] = _error(err)
    rounds.append(stepper.timed(args.time_steps))
    step_s = statistics.mean(rounds)
    bare: dict[str, Any] = {"step_ms": step_s * 1e3, "rounds_ms": [r * 1e3 for r in rounds],
                            "steps_timed_per_round": args.time_steps, "tokens_per_s": tokens / step_s,
                            "tflops_per_s": tokens * flops_per_token / step_s / 1e12}
    bare["mfu"] = tokens * flops_per_token / step_s / peak if peak else None
    result["bare"] = bare
    if "error" not in result["lightning"]:
        result["lightning"]["overhead_ms"] = result["lightning"]["step_ms"] - bare["step_ms"]
        result["lightning"]["overhead_fraction"] = result["lightning"]["overhead_ms"] / result["lightning"]["step_ms"]
    device_view = result["profile"].get("device")
    if device_view is not None and not device_view["total_ms_per_step"]:
        result["profile"]["warning"] = "no CUDA kernel was recorded (CUPTI unavailable?): see the host view"
    elif device_view is not None:
        busy = device_view["total_ms_per_step"]
        result["profile"]["device_busy_ms_per_step"] = busy
        result["profile"]["device_idle_ms_per_step"] = bare["step_ms"] - busy
        if busy > 1.05 * bare["step_ms"]:  # kernels overlap (several streams) or something counted twice
            result["profile"]["warning"] = (f"kernel time {busy:.2f} ms/step exceeds the wall time "
                                            f"{bare['step_ms']:.2f} ms/step: overlapping streams or double counting")
    return result, table


# -- report ------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".2f") -> str:
    return "n/a" if not isinstance(value, (int, float)) else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    names = [n for n, r in report["objectives"].items() if "error" not in r]
    lines = []
    recorded = any(_dig(report["objectives"][n], ("profile", "device", "total_ms_per_step")) for n in names)
    view = "device" if report["device"] == "cuda" and recorded else "host"  # host: no kernels were recorded
    what = "CUDA kernel time" if view == "device" else "self CPU time"
    head = "| " + " | ".join([f"ms/step ({what})", *names]) + " |"
    lines += [head, "|" + "---|" * (len(names) + 1)]

    def row(label: str, cells: list[str]) -> None:
        lines.append("| " + " | ".join([label, *cells]) + " |")

    for cat in CATEGORIES:
        cells = []
        for n in names:
            prof = report["objectives"][n].get("profile", {}).get(view)
            c = prof["categories"][cat] if prof else None
            cells.append(f"{c['ms_per_step']:.2f} ({c['fraction']:.0%})" if c else "n/a")
        row(cat, cells)
    def pick(n: str, *keys: str) -> Any:
        return _dig(report["objectives"][n], keys)

    row(f"**total {what}**", [_fmt(pick(n, "profile", view, "total_ms_per_step")) for n in names])
    if view == "device":
        row("device idle (wall - kernels)", [_fmt(pick(n, "profile", "device_idle_ms_per_step")) for n in names])
    row("**bare step wall**", [_fmt(pick(n, "bare", "step_ms")) for n in names])
    row("phases fwd+loss / bwd / clip+opt", [
        " / ".join(_fmt(pick(n, "phases_ms", k), ".1f") for k in ("forward_loss", "backward", "clip_optimizer"))
        for n in names])
    row("Lightning step wall", [_fmt(pick(n, "lightning", "step_ms")) for n in names])
    row("Lightning overhead", [
        f"{_fmt(pick(n, 'lightning', 'overhead_ms'))} ({_fmt(pick(n, 'lightning', 'overhead_fraction'), '.0%')})"
        for n in names])
    data = report.get("data_loading", {})
    data_ms = data.get("fetch_ms_per_batch")
    row("data loading (fetch + H2D)", [
        _fmt(data_ms + data.get("h2d_copy_ms_per_batch", 0.0)) if data_ms is not None else "skipped"] * len(names))
    row("tokens/s (bare)", [_fmt(pick(n, "bare", "tokens_per_s"), ",.0f") for n in names])
    row("MFU (bare)", [_fmt(pick(n, "bare", "mfu"), ".1%") for n in names])
    if report["device"] == "cuda":
        row("peak memory GiB", [_fmt(pick(n, "max_memory_gib")) for n in names])
    notes: list[str] = []
    failed = [f"{n}: {r['error']}" for n, r in report["objectives"].items() if "error" in r]
    return "\n".join(lines + notes + [f"\nFAILED {f}" for f in failed])


def _dig(obj: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/profile-step"))
    parser.add_argument("--objectives", default="mdm,ar", help=f"comma-separated registry names ({registry.allowed()})")
    parser.add_argument("--size", default="smdm-113M")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"],
                        help="bf16-mixed: bf16 autocast on CUDA (a CPU runs fp32 whatever this says)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="regional torch.compile of the blocks (auto: on for CUDA, off for a CPU)")
    parser.add_argument("--loss-chunk-tokens", default="default",
                        help="rows per LM-head chunk: an integer, none (one chunk) or default (the modules')")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--time-steps", type=int, default=20, help="timed (unprofiled) bare steps")
    parser.add_argument("--phase-steps", type=int, default=3, help="steps timed phase by phase")
    parser.add_argument("--lightning-steps", type=int, default=None,
                        help="timed Lightning steps after --warmup (default: --time-steps, the same masking draws)")
    parser.add_argument("--data", default="stdlib", choices=["stdlib", "off"],
                        help="time the real PretrainDataModule loader over the offline stdlib corpus, or skip")
    parser.add_argument("--data-vocab", type=int, default=4096)
    parser.add_argument("--data-bytes", type=int, default=2_000_000)
    parser.add_argument("--data-batches", type=int, default=20)
    parser.add_argument("--data-cache", default=None, help="cache dir for the data (default: a temporary one)")
    parser.add_argument("--trace", action="store_true", help="also write OUT/trace-<objective>.json.gz")
    args = parser.parse_args(argv)
    args.objectives = [n.strip() for n in args.objectives.split(",") if n.strip()]
    for name in args.objectives:
        if not registry.is_known(name):
            parser.error(f"--objectives: unknown objective {name!r}; allowed: {registry.allowed()}")
    if args.loss_chunk_tokens not in ("default", "none") and not args.loss_chunk_tokens.isdigit():
        parser.error(f"--loss-chunk-tokens must be an integer, none or default, got {args.loss_chunk_tokens!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False (use --device cpu for the smoke test)")
    if args.lightning_steps is None:
        args.lightning_steps = args.time_steps
    for key in ("warmup", "steps", "time_steps", "phase_steps", "lightning_steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    args.compile_on = {"auto": args.device == "cuda", "on": True, "off": False}[args.compile]
    if args.device == "cpu":
        args.precision = "32-true"  # fp32 on a CPU
    args.autocast = args.device == "cuda" and args.precision == "bf16-mixed"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    peak, peak_source = device_peak_flops(device, args.precision)
    report: dict[str, Any] = {
        "torch": torch.__version__, "lightning": L.__version__, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "size": args.size, "vocab": args.vocab, "batch": args.batch,
        "seq_len": args.seq_len, "precision": args.precision, "compile": args.compile_on,
        "peak_flops": peak, "peak_source": peak_source,
        "settings": {k: v for k, v in vars(args).items() if k in (
            "warmup", "steps", "time_steps", "phase_steps", "lightning_steps", "loss_chunk_tokens")},
        "categories_note": "time per category of the profiled bare steps; 'profile.device' = CUDA kernel time "
                           "(CUDA only), 'profile.host' = self CPU time of every op; see the top names of each",
        "objectives": {},
    }
    json_path, ops_path = args.out / "profile.json", args.out / "profile_ops.txt"
    tables: list[str] = []

    def save() -> None:
        write_text(json_path, json.dumps(report, indent=2, default=str))
        write_text(ops_path, "\n\n".join(tables) + "\n")

    for name in args.objectives:
        started = time.perf_counter()
        try:
            result, table = run_objective(name, args, peak)
        except Exception as err:  # record and go on: one failing objective must not hide the others
            result, table = _error(err), ""
            if args.compile_on:  # a compile failure must not cost the whole profile: again, eager
                print(f"{name}: FAILED with compiled blocks ({result['error'][:300]}); again without compiling",
                      flush=True)
                failed = result
                try:
                    torch._dynamo.reset()
                    result, table = run_objective(name, argparse.Namespace(**{**vars(args), "compile_on": False}),
                                                  peak)
                    result["compile_failed"] = failed
                except Exception as err2:
                    result = {**failed, "retry_without_compile": _error(err2)}
        if table:
            tables.append(f"== {name}: top-30 ops, {args.steps} profiled steps "
                          f"(sorted by {result.get('profile', {}).get('op_table_sorted_by', '?')}) ==\n{table}")
        result["seconds"] = time.perf_counter() - started
        report["objectives"][name] = result
        print(f"{name}: done in {result['seconds']:.1f}s" + (f" (FAILED: {result['error']})" if "error" in result else ""),
              flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        save()
    if args.data == "off":
        report["data_loading"] = {"skipped": "--data off"}
    else:
        try:
            report["data_loading"] = data_loading(args)
        except Exception as err:
            report["data_loading"] = {"skipped": "the stdlib loader failed; see error", **_error(err)}
    report["markdown"] = markdown(report)
    save()
    print(f"\n{args.size}, {args.batch} x {args.seq_len} tokens, {args.precision}, compile={args.compile_on}, "
          f"{report['device_name']} (peak: {peak_source})\n")
    print(report["markdown"])
    data = report["data_loading"]
    print(f"\ndata loading: {json.dumps({k: v for k, v in data.items() if k != 'traceback'}, default=str)}")
    for name, result in report["objectives"].items():
        view = result.get("profile", {}).get("device" if args.device == "cuda" else "host")
        if view:
            top = ", ".join(f"{n[:70]} {ms:.2f}" for n, ms in view["uncategorised_top"][:5])
            print(f"{name}: top 'other' (ms/step): {top or '-'}")
        warning = _dig(result, ("profile", "warning"))
        if warning:
            print(f"{name}: WARNING {warning}")
    print(f"\nwrote {json_path} and {ops_path}")
    return report


def quiet() -> None:
    """The command line's console: Lightning's banners and third-party warnings off (not when
    :func:`main` is called from a test, whose process other tests share)."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    quiet()
    main()
