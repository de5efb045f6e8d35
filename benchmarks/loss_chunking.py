"""The chunked LM-head cross-entropy (``lldiff.losses``, ``loss_chunk_tokens``): what it costs on
the CPU tiny runs and what it saves in memory at a GPU shape.

1. CPU step time (forward + backward + AdamW, bare loop, one thread as a sweep's ``--parallel
   auto`` runs) of each objective at the demo sweep's shape (vocabulary 512, 16 x 64 tokens), in
   three modes alternating step by step (ratios: the median of the paired steps' ratios):
   ``plain`` (``loss_chunk_tokens=None``: the full-logits loss lldiff computed before, logits of
   every position, CE, times the mask), ``default`` (``loss_chunk_tokens=4096``: the head on the scored rows only, here
   in one chunk) and ``chunk=256`` (forced chunking with recomputation, to show its cost).
2. Peak memory of the loss head alone (hidden states and head weight as leaves, forward +
   backward) at B=4 (``--batch``), T=1024, V=32000, d=768 (smdm-113M's head), AR (all rows)
   and MDM (masked rows, t ~ U[1e-3, 1] per row), plain vs chunks of 4096 and 1024 rows: the
   process's peak resident memory above what it held before the step (``/proc/self/status``
   VmHWM after resetting it), each case in a fresh process, and the largest tensor with a
   vocabulary-sized dimension any op produced.

    python benchmarks/loss_chunking.py                 # both parts (~5 min on 2 cores)
    python benchmarks/loss_chunking.py --part memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch.cli import instantiate_class

from lldiff import losses, objectives as registry
from lldiff.optim import build_optimizer


@contextmanager
def mode(module: Any, name: str) -> Iterator[None]:
    """``plain``: ``loss_chunk_tokens=None``, every loss scored from full logits (the code
    before chunking); ``default``: 4096; ``chunk=N``: N."""
    chunk = module.hparams.loss_chunk_tokens
    named = {"plain": None, "default": losses.DEFAULT_CHUNK_TOKENS}
    module.hparams.loss_chunk_tokens = named[name] if name in named else int(name.removeprefix("chunk="))
    try:
        yield
    finally:
        module.hparams.loss_chunk_tokens = chunk


def step_times(objective: str, size: str, modes: list[str], rounds: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    spec = registry.get(objective).module_config()
    module = instantiate_class((), {**spec, "init_args": {**spec["init_args"], "size": size, "vocab_size": 512,
                                                          "random_length_prob": 0.0, "warmup_steps": 1}})
    rows = torch.randint(0, 512, (16, 65), generator=torch.Generator().manual_seed(0))
    optimizer, _ = build_optimizer(module.model, max_steps=10_000, lr=1e-4, min_lr_ratio=0.1, weight_decay=0.1,
                                   betas=(0.9, 0.95), warmup_steps=1)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(rounds * steps + 2):
        for name in modes:  # modes alternate step by step: drift of the machine hits all alike
            with mode(module, name):
                start = time.perf_counter()
                module.loss(rows).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i >= 2:  # warm-up
                    times[name].append(time.perf_counter() - start)
    result = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    for name in modes[1:]:  # the median of the step-by-step ratios to the first mode
        result[f"{name}/{modes[0]}"] = statistics.median(a / b for a, b in zip(times[name], times[modes[0]]))
    return result


def memory_case(objective: str, chunk: str, batch: str = "4") -> dict[str, Any]:
    """One case, in this (fresh) process: peak resident memory above the baseline."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b, t, v, d = int(batch), 1024, 32000, 768
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, d, generator=g).mul_(0.5).requires_grad_()
    weight = torch.randn(v, d, generator=g).mul_(0.05).requires_grad_()
    targets = torch.randint(0, v, (b, t), generator=g)
    ratio = 1e-3 + (1 - 1e-3) * torch.rand(b, generator=g)
    select = (torch.rand(b, t, generator=g) < ratio[:, None]) if objective == "mdm" else None

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor) and v in x.shape:
                    Largest.largest = max(Largest.largest, x.numel() * x.element_size())
            return out

    def loss() -> torch.Tensor:
        if chunk == "plain":
            ce = losses.logits_ce(hidden @ weight.T, targets)
            ce = ce if select is None else ce * select
        else:
            ce = losses.selected_ce(hidden, weight, targets, select, int(chunk))
        return ce.mean() if select is None else (ce.sum(1) / ratio).sum() / targets.numel()

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    with Largest():  # shapes only: the dispatch mode's own cost stays out of the timed run
        loss().backward()
    hidden.grad = weight.grad = None
    base = rss("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
    start = time.perf_counter()
    loss().backward()
    seconds = time.perf_counter() - start
    return {"objective": objective, "chunk": chunk, "batch": b, "rows": int(b * t if select is None else select.sum()),
            "peak_above_baseline_mib": (rss("VmHWM:") - base) / 2**20, "largest_vocab_tensor_mib": Largest.largest / 2**20,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["time", "memory", "both"], default="both")
    parser.add_argument("--sizes", default="tiny-0.004M,tiny-1M")
    parser.add_argument("--objectives", default="ar,mdm,bd3-16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--batch", type=int, default=4, help="rows of 1024 tokens in the memory part")
    parser.add_argument("--case", nargs=3, metavar=("OBJECTIVE", "CHUNK", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(memory_case(*args.case)))
        return
    report: dict[str, Any] = {"torch": torch.__version__}
    if args.part in ("time", "both"):
        torch.set_num_threads(1)
        report["step_ms"] = {}
        print(f"{'objective':<8} {'size':<12} {'plain ms':>9} {'default ms':>11} {'ratio':>6} {'chunk=256 ms':>13} {'ratio':>6}")
        for size in args.sizes.split(","):
            for objective in args.objectives.split(","):
                ms = step_times(objective, size, ["plain", "default", "chunk=256"], args.rounds, args.steps)
                report["step_ms"][f"{objective}/{size}"] = ms
                print(f"{objective:<8} {size:<12} {ms['plain']:>9.2f} {ms['default']:>11.2f} "
                      f"{ms['default/plain']:>6.3f} {ms['chunk=256']:>13.2f} {ms['chunk=256/plain']:>6.3f}")
    if args.part in ("memory", "both"):
        report["memory"] = []
        print(f"\nloss head alone, B={args.batch} T=1024 V=32000 d=768, fp32, forward + backward")
        print(f"{'objective':<9} {'chunk':<6} {'rows':>5} {'peak MiB':>9} {'largest V-tensor MiB':>21} {'s':>6}")
        for objective in ("ar", "mdm"):
            for chunk in ("plain", "4096", "1024"):
                out = subprocess.run([sys.executable, __file__, "--case", objective, chunk, str(args.batch)], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                report["memory"].append(r)
                print(f"{objective:<9} {chunk:<6} {r['rows']:>5} {r['peak_above_baseline_mib']:>9.0f} "
                      f"{r['largest_vocab_tensor_mib']:>21.0f} {r['seconds']:>6.2f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
