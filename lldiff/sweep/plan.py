"""Plan a sweep: one ordinary fit per (objective, size, budget, seed), steps from C = 6 N D."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from lldiff.config import SIZES
from lldiff.data import PretrainDataModule
from lldiff.flops import step_flops_per_token
from lldiff.modules import LMBase
from lldiff.objectives import expected_length
from lldiff.sweep.spec import MODULE_CLASSES, SweepSpec

DATA_CLASS = "lldiff.data.PretrainDataModule"


def _default(cls: type, name: str) -> Any:
    return inspect.signature(cls.__init__).parameters[name].default


def budget_label(budget: float) -> str:
    """``2e+11`` -> ``C2e+11``; 3 significant digits so distinct budgets stay distinct."""
    return f"C{budget:.3g}"


def tokens_per_step(spec: SweepSpec) -> float:
    """Expected tokens per optimizer step over all devices, random-length batches included:
    ``batch * devices * nodes * accumulation * (L (1-p) + p (1+L) / 2)``."""
    seq_len = spec.data.get("seq_len", _default(PretrainDataModule, "seq_len"))
    batch = spec.data.get("batch_size", _default(PretrainDataModule, "batch_size"))
    prob = spec.model.get("random_length_prob", _default(LMBase, "random_length_prob"))
    devices = spec.trainer.get("devices", 1)
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(spec.trainer.get("num_nodes", 1))
    accumulation = int(spec.trainer.get("accumulate_grad_batches", 1))
    return batch * world * accumulation * expected_length(seq_len, prob)


def steps_for_budget(budget: float, n_nonemb: int, step_tokens: float) -> int:
    """``max_steps = C / (6 N tokens_per_step)``, rounded to the nearest step."""
    return round(budget / (6.0 * n_nonemb * step_tokens))


@dataclass(frozen=True)
class RunPlan:
    index: int
    run_id: str  # "<objective>/<size>/<budget label>[-seed<k>]": also its TensorBoard path
    objective: str
    size: str
    n_nonemb: int
    budget: float
    seed: int
    max_steps: int
    tokens_per_step: float
    warmup_steps: int | None
    model_args: dict[str, Any]

    @property
    def tokens(self) -> float:
        return self.max_steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """Planned 6 N D (close to the budget; rounding the steps moves it slightly)."""
        return 6.0 * self.n_nonemb * self.tokens


def matmul_flops(spec: SweepSpec, run: RunPlan) -> float:
    """The run's real training work: forward + backward matmul FLOPs, LM head and attention
    included (``lldiff.flops.step_flops_per_token``); what time and GPU-hours scale with."""
    seq_len = spec.data.get("seq_len", _default(PretrainDataModule, "seq_len"))
    vocab = spec.data.get("vocab_size", _default(PretrainDataModule, "vocab_size"))
    return step_flops_per_token(SIZES[run.size].replace(vocab_size=vocab), seq_len) * run.tokens


def make_plan(spec: SweepSpec) -> list[RunPlan]:
    """All runs, smallest compute first within each budget; validates every budget fits."""
    step_tokens = tokens_per_step(spec)
    runs: list[RunPlan] = []
    too_small = []
    for budget in sorted(spec.budgets):
        for size in spec.sizes:
            n = SIZES[size].non_embedding_params()
            steps = steps_for_budget(budget, n, step_tokens)
            if steps < 1:
                too_small.append(
                    f"{size} (N={n:,}) needs at least {6 * n * step_tokens:.3g} FLOPs for one step of "
                    f"{step_tokens:.0f} tokens, budget {budget:.3g}"
                )
                continue
            for objective in spec.objectives:
                for seed in spec.seeds:
                    version = budget_label(budget) + (f"-seed{seed}" if len(spec.seeds) > 1 else "")
                    args = {**spec.model, **spec.objective_args.get(objective, {}), **spec.size_args.get(size, {})}
                    warmup = args.get("warmup_steps")
                    if spec.warmup_fraction is not None:
                        warmup = max(1, round(spec.warmup_fraction * steps))
                    runs.append(
                        RunPlan(
                            index=len(runs), run_id=f"{objective}/{size}/{version}", objective=objective,
                            size=size, n_nonemb=n, budget=budget, seed=seed, max_steps=steps,
                            tokens_per_step=step_tokens, warmup_steps=warmup, model_args=args,
                        )
                    )
    if too_small:
        raise ValueError("budget too small: " + "; ".join(too_small))
    return runs


def run_config(spec: SweepSpec, run: RunPlan, tb_root: str) -> dict[str, Any]:
    """The LightningCLI config of one run (what `lldiff fit --config` would read)."""
    objective_module = {**run.model_args, "size": run.size}
    if run.warmup_steps is not None:
        objective_module["warmup_steps"] = run.warmup_steps
    data = {**spec.data, "seed": int(spec.data.get("seed", _default(PretrainDataModule, "seed"))) + run.seed}
    logger_name, version = run.run_id.rsplit("/", 1)
    trainer = {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": max(1, min(10, run.max_steps // 20)),
        **spec.trainer,
        "max_steps": run.max_steps,
        "val_check_interval": max(1, run.max_steps // spec.evals_per_run),
        "check_val_every_n_epoch": None,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": tb_root, "name": logger_name, "version": version, "default_hp_metric": False},
        },
    }
    return {
        "seed_everything": run.seed,
        "model": {"class_path": MODULE_CLASSES[run.objective], "init_args": objective_module},
        "data": {"class_path": DATA_CLASS, "init_args": data},
        "trainer": trainer,
        "checkpoint": {"every_n_train_steps": max(1, min(100, run.max_steps // 5))},
    }
