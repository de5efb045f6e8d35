"""GPU check of the scale-out paths: strategies x precision x attention backend, with MFU.

Trains the real LightningModules (MDM, AR and BD3, each from its objective's registry entry)
for a few dozen steps on fixed random token
rows through ``lightning.Trainer`` with TensorBoard logging, once per case, and reports
what ``perf/tokens_per_s``, ``perf/flops_per_s`` and ``perf/mfu`` logged (median over the
logging windows after the first, which holds start-up). Before that it compares the
attention backends (sdpa, xformers) against the float32 reference, and the whole
backbone's logits under each backend for every objective's attention kind. After the FSDP2 run it loads the sharded checkpoint
it wrote with ``lldiff.checkpoint.load_model`` on the CPU and compares logits.

    python benchmarks/scaleout_gpu.py --out OUT                     # H100: smdm-113M, 16 x 1024
    python benchmarks/scaleout_gpu.py --out OUT --publish           # also benchmarks/results/scaleout_gpu-<gpu>.json
    python benchmarks/scaleout_gpu.py --compile off --loss-chunk-tokens none   # the eager, one-chunk baseline
    python benchmarks/scaleout_gpu.py --device cpu --size tiny-0.1M --seq-len 64 --batch 4 --steps 12  # smoke test

The modules run with their defaults unless told otherwise: regional ``torch.compile`` on a
CUDA device (``--compile``), the LM head in chunks of 4096 scored rows (``--loss-chunk-tokens``),
fused AdamW. Each case records its MFU, tokens/s, and peak device memory in total and per
training token of the micro-batch; ``per_objective`` sums up the single-device cases (MDM,
AR, BD3) and the MDM's tokens/s relative to the AR's.

Writes ``OUT/scaleout.json`` (every figure, rewritten atomically after each case) and prints a
table. ``--publish`` also writes ``benchmarks/results/scaleout_gpu-<gpu>.json``, which ``lldiff
sweep plan`` reads for its GPU-hours (``lldiff.sweep.measured``; then refresh the table shipped
in that module with ``python -m lldiff.sweep.measured``).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from lightning.pytorch.cli import instantiate_class

from lldiff import objectives as registry
from lldiff.atomic import write_text
from lldiff.attention import BACKENDS
from lldiff.callbacks import RunCheckpoint
from lldiff.checkpoint import is_sharded_checkpoint, load_model
from lldiff.config import ModelConfig
from lldiff.flops import gpu_table_key, matmul_precision
from lldiff.model import Transformer

OBJECTIVES = ("mdm", "ar", "bd3-16")  # registry names; one backbone check and at least one training case each


class RandomRows(Dataset):
    """``length`` fixed random rows of ``seq_len + 1`` tokens (the data cost stays out of the way)."""

    def __init__(self, vocab: int, seq_len: int, length: int) -> None:
        self.rows = torch.randint(0, vocab, (length, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def backend_agreement(device: str) -> dict[str, Any]:
    """Max |backend - float32 reference| for attention calls, and logits of one backbone."""
    result: dict[str, Any] = {}
    backends = ["sdpa"] + (["xformers"] if device == "cuda" else [])
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for causal, padded, kv in ((False, False, 8), (True, False, 8), (False, True, 8), (True, False, 2)):
            q = torch.randn(2, 8, 256, 64, device=device, generator=gen).to(dtype)
            k = torch.randn(2, kv, 256, 64, device=device, generator=gen).to(dtype)
            v = torch.randn(2, kv, 256, 64, device=device, generator=gen).to(dtype)
            mask = None
            if padded:
                mask = torch.ones(2, 256, dtype=torch.bool, device=device)
                mask[0, :37] = False
            ref = BACKENDS["reference"](q.float(), k.float(), v.float(), causal=causal, key_padding_mask=mask)
            for name in backends:
                key = f"{name}/{str(dtype)[6:]}/{'causal' if causal else 'bidir'}{'/padded' if padded else ''}/kv{kv}"
                try:
                    out = BACKENDS[name](q, k, v, causal=causal, key_padding_mask=mask).float()
                    result[key] = (out - ref).abs().max().item()
                except Exception as err:  # e.g. xformers without kernels for this build or dtype
                    result[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    ids = torch.randint(0, 4096, (2, 512), device=device)
    for objective in OBJECTIVES:
        cfg = ModelConfig.from_name("smdm-19M", vocab_size=4096, **registry.get(objective).model_fields(4096))
        torch.manual_seed(0)
        model = Transformer(cfg).to(device)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = {}
            for name in backends:
                model.cfg = cfg.replace(attn_backend=name)
                for block in model.blocks:
                    block.attn.cfg = model.cfg
                try:
                    logits[name] = model(ids).float()
                except Exception as err:
                    result[f"backbone_logits/{objective}/{name}"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        if "xformers" in logits:
            result[f"backbone_logits/{objective}/bf16-autocast/sdpa_vs_xformers"] = (
                logits["sdpa"] - logits["xformers"]).abs().max().item()
            result[f"backbone_logits/{objective}/scale"] = logits["sdpa"].abs().max().item()
    return result


def scalars(logdir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(glob.glob(str(logdir / "events*"))[0])
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_case(name: str, args: argparse.Namespace, *, objective: str, strategy: Any, precision: str,
             backend: str = "sdpa", ckpt: bool = False) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    spec = registry.get(objective).module_config()
    options = {"compile": {"auto": None, "on": True, "off": False}[args.compile]}
    if args.loss_chunk_tokens != "default":
        options["loss_chunk_tokens"] = None if args.loss_chunk_tokens == "none" else int(args.loss_chunk_tokens)
    module = instantiate_class((), {**spec, "init_args": {**spec["init_args"], "size": args.size, "vocab_size": args.vocab,
                                                          "attn_backend": backend, "lr": 3e-4, "warmup_steps": 2,
                                                          "random_length_prob": 0.0, **options}})
    loader = DataLoader(RandomRows(args.vocab, args.seq_len, args.batch * 8), batch_size=args.batch, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    logdir = args.out / "tb" / name
    callbacks = [RunCheckpoint(dirpath=args.out / "ckpt" / name, save_last=True, save_top_k=0)] if ckpt else []
    trainer = L.Trainer(
        accelerator=args.device, devices=1, strategy=strategy, precision=precision, max_steps=args.steps,
        log_every_n_steps=args.log_every, logger=L.pytorch.loggers.TensorBoardLogger(logdir, name="", version=""),
        enable_checkpointing=ckpt, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - start
    logged = scalars(logdir)
    steady = lambda tag: statistics.median(logged[tag][1:] or logged[tag]) if tag in logged else None  # noqa: E731
    tf32 = args.device == "cuda" and torch.get_float32_matmul_precision() != "highest"
    max_memory = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    tokens_per_step = args.batch * args.seq_len
    result = {
        "objective": objective, "strategy": type(trainer.strategy).__name__, "precision": precision,
        "matmul_precision": matmul_precision(precision, tf32=tf32), "backend": backend,
        "activation_checkpointing": bool(getattr(trainer.strategy, "activation_checkpointing", False)),
        "compile": module.model.blocks_compiled, "loss_chunk_tokens": module.loss_chunk_tokens,
        "steps": trainer.global_step, "wall_s": wall, "tokens_per_step": tokens_per_step,
        "tokens_per_s": steady("perf/tokens_per_s"), "flops_per_s": steady("perf/flops_per_s"),
        "mfu": steady("perf/mfu"), "final_loss": logged["train/loss"][-1],
        "max_memory_gib": max_memory / 2**30 if max_memory is not None else None,
        "max_memory_mib_per_token": max_memory / 2**20 / tokens_per_step if max_memory is not None else None,
    }
    if ckpt:
        path = args.out / "ckpt" / name / "last.ckpt"
        probe = torch.randint(0, args.vocab, (2, 64), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            live = module.model(probe.to(module.device)).float().cpu()
        loaded = load_model(path).model  # CPU, this process, no process group needed
        with torch.no_grad():
            result["ckpt_sharded"] = is_sharded_checkpoint(path)
            result["ckpt_logits_max_diff"] = (loaded(probe) - live).abs().max().item()
    return result


def per_objective(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The single-device cases' figures by objective (mixed precision; the tf32 case is
    apart), and the MDM's tokens/s over the AR's (the issue's goal: within 5%)."""
    summary: dict[str, Any] = {}
    for name, result in cases.items():
        if not name.startswith("single-") or name.endswith("tf32") or "error" in result:
            continue
        summary[result["objective"]] = {k: result[k] for k in (
            "mfu", "tokens_per_s", "max_memory_gib", "max_memory_mib_per_token", "compile", "loss_chunk_tokens")}
    if "mdm" in summary and "ar" in summary and summary["ar"]["tokens_per_s"]:
        summary["mdm_over_ar_tokens_per_s"] = summary["mdm"]["tokens_per_s"] / summary["ar"]["tokens_per_s"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/scaleout-gpu"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="smdm-113M")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="regional torch.compile of the blocks (auto: the modules' default, on for CUDA)")
    parser.add_argument("--loss-chunk-tokens", default="default",
                        help="rows per LM-head chunk: an integer, none (one chunk) or default (the modules')")
    parser.add_argument("--publish", action="store_true",
                        help="also write benchmarks/results/scaleout_gpu-<gpu>.json (read by `lldiff sweep plan`)")
    args = parser.parse_args()
    if args.loss_chunk_tokens not in ("default", "none") and not args.loss_chunk_tokens.isdigit():
        parser.error(f"--loss-chunk-tokens must be an integer, none or default, got {args.loss_chunk_tokens!r}")
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"torch": torch.__version__, "lightning": L.__version__, "size": args.size,
                              "batch": args.batch, "seq_len": args.seq_len}
    if args.device == "cuda":
        report["device"] = torch.cuda.get_device_name()
        try:
            import xformers

            report["xformers"] = xformers.__version__
        except ImportError as err:
            report["xformers"] = f"not importable: {err}"
    report["agreement"] = backend_agreement(args.device)
    mixed = "bf16-mixed" if args.device == "cuda" else "32-true"
    cases = {
        "single-mdm": dict(objective="mdm", strategy="auto", precision=mixed),
        "single-ar": dict(objective="ar", strategy="auto", precision=mixed),
        "fsdp2-mdm": dict(objective="mdm", strategy="fsdp2", precision=mixed, ckpt=True),
        "fsdp2-ar": dict(objective="ar", strategy="fsdp2", precision=mixed),
        "fsdp2_ac-mdm": dict(objective="mdm", strategy="fsdp2_ac", precision=mixed),
        "fsdp2_full-mdm": dict(objective="mdm", strategy="fsdp2_full", precision=mixed, ckpt=True),
        "single-bd3-16": dict(objective="bd3-16", strategy="auto", precision=mixed),
        "fsdp2-bd3-16": dict(objective="bd3-16", strategy="fsdp2", precision=mixed, ckpt=True),
    }
    if args.device == "cuda":
        cases["fsdp2-mdm-xformers"] = dict(objective="mdm", strategy="fsdp2", precision=mixed, backend="xformers")
        cases["single-mdm-tf32"] = dict(objective="mdm", strategy="auto", precision="32-true")
    report["cases"] = {}
    for name, case in cases.items():
        if name.endswith("tf32"):
            torch.set_float32_matmul_precision("high")
        try:
            report["cases"][name] = run_case(name, args, **case)
        except Exception as err:  # record and go on: one failing path must not hide the others
            report["cases"][name] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            if name.endswith("tf32"):
                torch.set_float32_matmul_precision("highest")
        report["per_objective"] = per_objective(report["cases"])
        write_text(args.out / "scaleout.json", json.dumps(report, indent=2))
    if args.publish:
        key = gpu_table_key(report.get("device", "")) if args.device == "cuda" else None
        if key is None:
            print(f"--publish: {report.get('device', args.device)!r} is no GPU of lldiff.flops.PEAK_TFLOPS; not published")
        else:
            published = Path(__file__).resolve().parent / "results" / f"scaleout_gpu-{key}.json"
            write_text(published, json.dumps(report, indent=2))
            print(f"published {published}; refresh lldiff.sweep.measured.MEASURED with: python -m lldiff.sweep.measured")
    print(json.dumps(report["agreement"], indent=1))
    print(f"{'case':<20} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'MiB/tok':>8} {'loss':>7}  extra")
    for name, r in report["cases"].items():
        if "error" in r:
            print(f"{name:<20} ERROR {r['error'][:200]}")
            continue
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        per_token = f"{r['max_memory_mib_per_token']:.3f}" if r["max_memory_mib_per_token"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        extra = {k: r[k] for k in ("ckpt_sharded", "ckpt_logits_max_diff") if k in r}
        print(f"{name:<20} {r['tokens_per_s']:>10.0f} {r['flops_per_s'] / 1e12:>8.1f} {mfu:>6} {mem:>8} {per_token:>8} "
              f"{r['final_loss']:>7.3f}  {extra}")
    summary = report["per_objective"]
    if "mdm_over_ar_tokens_per_s" in summary:
        print(f"MDM tokens/s / AR tokens/s (single device): {summary['mdm_over_ar_tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
