"""Training-step throughput: Lightning vs a bare PyTorch loop, for each objective (MDM, AR,
BD3 block diffusion; any registry names with --objectives) in one run, and where a step's
time goes.

Both loops train the same LightningModule (same backbone, objective, AdamW, schedule and
gradient clipping) on the same fixed batch. Each timed iteration covers everything a step
costs: fetching the batch, forward, backward, clipping, optimizer and scheduler steps, and
(for Lightning) its loop, hooks and logging. Rounds alternate bare and Lightning so drift
in the machine hits both alike; the median step time of each is reported.

    python benchmarks/train_throughput.py                      # smdm-6M (d=256), L=256, B=8
    python benchmarks/train_throughput.py --size tiny-1M --steps 20
    python benchmarks/train_throughput.py --quick              # a minute: tiny-1M, 8 x 64 tokens, 2 rounds
    python benchmarks/train_throughput.py --objectives mdm,bd3-4,bd3-16
    python benchmarks/train_throughput.py --breakdown          # the demo sweep's smallest model, 1 thread

``--breakdown`` splits one step into its phases (the demo sweep's shape by default:
tiny-0.004M, vocabulary 512, 16 x 64 tokens, one thread per run as ``--parallel auto`` gives):
data loading (the real ``PretrainDataModule`` loader over the offline corpus), forward (the
objective's loss), backward, and clipping + optimizer + schedule; then the Lightning step with
metrics handed over every ``log_every_n_steps`` (10, as sweeps do) and every step (what each
step cost before lldiff logged only on Lightning's logging steps). "Lightning and hooks" is the
Lightning step minus the bare phases.

Achieved GFLOP/s counts the matmul work of a step per training token, from the objective
registry (``Objective.matmul_flops_per_token``: 6 x (non-embedding + head) parameters +
attention at length L; BD3 runs its backbone on [x_t, x_0], twice the work at length 2L),
compared with this machine's fp32 matmul throughput measured at the start. tokens/s counts
training tokens (L per row) for every objective, so BD3's tokens/s is comparable with the
others' while its GFLOP/s says how busy the machine was.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning.pytorch.cli import instantiate_class

from lldiff import objectives as registry
from lldiff.objectives.common.base import LMBase
from lldiff.optim import build_optimizer


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


class RepeatBatch(Dataset):
    def __init__(self, rows: torch.Tensor, length: int) -> None:
        self.rows, self.length = rows, length

    def __len__(self) -> int:
        return self.length * len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i % len(self.rows)]}


def make_module(objective: str, args: argparse.Namespace) -> LMBase:
    """The objective's pre-training module (from the registry), as LightningCLI builds it."""
    torch.manual_seed(0)
    spec = registry.get(objective).module_config()
    init_args = {**spec["init_args"], "size": args.size, "vocab_size": args.vocab, "random_length_prob": 0.0,
                 "warmup_steps": 1, "lr": 3e-4}
    return instantiate_class((), {**spec, "init_args": init_args})


def bare_step_times(module: LMBase, loader: DataLoader, steps: int) -> list[float]:
    hp = module.hparams
    optimizer, scheduler = build_optimizer(
        module.model, max_steps=steps, lr=hp.lr, min_lr_ratio=hp.min_lr_ratio, weight_decay=hp.weight_decay,
        betas=hp.betas, warmup_steps=hp.warmup_steps,
    )
    module.train()
    times, last = [], time.perf_counter()
    for i, batch in enumerate(loader):
        if i == steps:
            break
        loss = module.loss(batch["input_ids"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.stamps.append(time.perf_counter())


def lightning_step_times(module: LMBase, loader: DataLoader, steps: int, logdir: str,
                         log_every_n_steps: int = 10) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=L.pytorch.loggers.TensorBoardLogger(logdir),
        log_every_n_steps=log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, limit_val_batches=0, callbacks=[timer],
    )
    start = time.perf_counter()
    timer.stamps.append(start)
    trainer.fit(module, train_dataloaders=loader)
    # first interval includes Trainer set-up; drop it like the bare loop's warm-up
    return [b - a for a, b in zip(timer.stamps[1:], timer.stamps[2:])]


def phase_times(module: LMBase, loader: DataLoader, steps: int) -> dict[str, list[float]]:
    """Per-step seconds of each phase of a bare training step (same work as ``bare_step_times``)."""
    hp = module.hparams
    optimizer, scheduler = build_optimizer(
        module.model, max_steps=steps, lr=hp.lr, min_lr_ratio=hp.min_lr_ratio, weight_decay=hp.weight_decay,
        betas=hp.betas, warmup_steps=hp.warmup_steps,
    )
    module.train()
    times: dict[str, list[float]] = {"data loading": [], "forward (loss)": [], "backward": [],
                                     "clip + optimizer + schedule": []}
    batches = iter(loader)
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        loss = module.loss(batch["input_ids"])
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(dt)
    return times


def breakdown(args: argparse.Namespace) -> None:
    """Where a tiny model's step goes, per objective, medians over alternating rounds."""
    from lldiff.data import PretrainDataModule

    torch.set_num_threads(args.threads)
    datamodule = PretrainDataModule(source="stdlib", max_bytes=2_000_000, vocab_size=args.vocab,
                                    seq_len=args.seq_len, batch_size=args.batch)
    datamodule.prepare_data()
    datamodule.setup("fit")
    args.vocab = datamodule.vocab_size_real
    loader = datamodule.train_dataloader()
    steps = args.steps + args.warmup
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {args.size}, batch {args.batch} x "
          f"{args.seq_len} tokens, vocabulary {args.vocab}; medians over {args.rounds} rounds of {args.steps} steps")
    with tempfile.TemporaryDirectory() as logdir:
        for name in args.objectives:
            phases: dict[str, list[float]] = {}
            lightning: dict[int, list[float]] = {10: [], 1: []}
            for _ in range(args.rounds):
                for phase, values in phase_times(make_module(name, args), loader, steps).items():
                    phases.setdefault(phase, []).extend(values[args.warmup:])
                for every in lightning:
                    lightning[every] += lightning_step_times(make_module(name, args), loader, steps + 1, logdir,
                                                             log_every_n_steps=every)[args.warmup:]
            median = {phase: statistics.median(v) for phase, v in phases.items()}
            step = statistics.median(lightning[10])
            rows = [*median.items(), ("Lightning loop, hooks, logging", step - sum(median.values()))]
            print(f"\n{registry.get(name).label}: Lightning step {step * 1e3:.2f} ms (metrics every 10 steps); "
                  f"{statistics.median(lightning[1]) * 1e3:.2f} ms when every step hands its metrics to Lightning")
            for phase, seconds in rows:
                print(f"  {phase:<32} {seconds * 1e3:>7.2f} ms  {seconds / step:>6.1%}")


THROUGHPUT_DEFAULTS = {"size": "smdm-6M", "vocab": 4096, "seq_len": 256, "batch": 8, "steps": 12}
QUICK_DEFAULTS = {"size": "tiny-1M", "vocab": 512, "seq_len": 64, "batch": 8, "steps": 6, "rounds": 2}
"""``--quick``: a look at the table in about a minute on two CPU cores (noisier medians)."""
BREAKDOWN_DEFAULTS = {"size": "tiny-0.004M", "vocab": 512, "seq_len": 64, "batch": 16, "steps": 100}
"""``--breakdown`` defaults to the demo sweep's smallest model, as one of its runs sees it."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", help="model size (default smdm-6M; with --breakdown tiny-0.004M)")
    parser.add_argument("--vocab", type=int, help="vocabulary (default 4096; with --breakdown 512)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 256; with --breakdown 64)")
    parser.add_argument("--batch", type=int, help="rows per batch (default 8; with --breakdown 16)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default 12; with --breakdown 100)")
    parser.add_argument("--objectives", default="mdm,ar,bd3-16",
                        help="comma-separated registry names (default mdm,ar,bd3-16; allowed: "
                        f"{registry.allowed()})")
    parser.add_argument("--rounds", type=int, help="rounds, alternating which loop runs first (default 4; "
                        "with --quick 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--quick", action="store_true",
                        help="small and short: tiny-1M, vocab 512, 8 x 64 tokens, 6 steps x 2 rounds")
    parser.add_argument("--breakdown", action="store_true",
                        help="split a step into phases (defaults: tiny-0.004M, vocab 512, 16 x 64, 1 thread)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for --breakdown")
    args = parser.parse_args()
    args.objectives = [name.strip() for name in args.objectives.split(",") if name.strip()]
    for name in args.objectives:
        if not registry.is_known(name):
            parser.error(f"--objectives: unknown objective {name!r}; allowed: {registry.allowed()}")
    if args.quick and args.breakdown:
        parser.error("--quick and --breakdown are two modes; choose one")
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):  # no per-fit banners between the tables
        logging.getLogger(name).setLevel(logging.WARNING)
    L.seed_everything(0, verbose=False)
    defaults = BREAKDOWN_DEFAULTS if args.breakdown else QUICK_DEFAULTS if args.quick else THROUGHPUT_DEFAULTS
    for key, value in {"rounds": 4, **defaults}.items():  # what was not given
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.breakdown:
        breakdown(args)
        return

    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul 2048^3: {peak:.1f} GFLOP/s")
    rows = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
    loader = DataLoader(RepeatBatch(rows, args.steps + args.warmup + 2), batch_size=args.batch)
    tokens_per_step = args.batch * args.seq_len
    width = max(9, *(len(name) for name in args.objectives))
    header = (f"{'objective':<{width}} {'loop':<10} {'ms/step':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'of matmul':>10}"
              "   [ms/step quartiles]")
    results = {}
    with tempfile.TemporaryDirectory() as logdir:
        for name in args.objectives:
            flops_per_token = registry.get(name).matmul_flops_per_token(make_module(name, args).config, args.seq_len)
            times = {"bare": [], "lightning": []}
            for round_ in range(args.rounds):
                order = ("bare", "lightning") if round_ % 2 == 0 else ("lightning", "bare")  # no order bias
                for loop in order:
                    if loop == "bare":
                        steps = bare_step_times(make_module(name, args), loader, args.steps + args.warmup)
                    else:
                        steps = lightning_step_times(make_module(name, args), loader, args.steps + args.warmup + 1,
                                                     logdir)
                    times[loop] += steps[args.warmup :]
            for loop, values in times.items():
                quartiles = statistics.quantiles(values, n=4)
                results[name, loop] = statistics.median(values)
                results[name, loop, "iqr"] = (quartiles[0], quartiles[2])
            results[name, "flops_per_token"] = flops_per_token
        print(f"\nmodel {args.size}, batch {args.batch} x {args.seq_len} tokens, vocab {args.vocab}, "
              f"median of {args.rounds * args.steps} steps per loop\n{header}")
        for name in args.objectives:
            for loop in ("bare", "lightning"):
                step = results[name, loop]
                tps = tokens_per_step / step
                gflops = tps * results[name, "flops_per_token"] / 1e9
                lo, hi = results[name, loop, "iqr"]
                print(f"{name:<{width}} {loop:<10} {step * 1e3:>9.1f} {tps:>10.0f} {gflops:>9.1f} {gflops / peak:>9.0%}"
                      f"   [{lo * 1e3:.0f}-{hi * 1e3:.0f}]")
        print()
        for name in args.objectives:
            ratio = results[name, "bare"] / results[name, "lightning"]
            print(f"{name}: Lightning throughput / bare PyTorch = {ratio:.3f}x")
        if "mdm" in args.objectives:  # what a training token costs each objective, against the MDM's
            print()
            for name in (n for n in args.objectives if n != "mdm"):
                costs = ", ".join(f"{loop} {results[name, loop] / results['mdm', loop]:.2f}x" for loop in ("bare", "lightning"))
                flops = results[name, "flops_per_token"] / results["mdm", "flops_per_token"]
                print(f"{name}: time per training token / MDM's = {costs} (matmul FLOPs {flops:.2f}x)")


if __name__ == "__main__":
    main()
