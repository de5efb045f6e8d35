"""Plan a sweep: one ordinary fit per (objective, size, budget, seed), steps from C = 6 N D."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

from lldiff.config import SIZES, ModelConfig
from lldiff.data import PretrainDataModule
from lldiff.flops import step_flops_per_token
from lldiff.modules import LMBase
from lldiff.objectives import expected_length
from lldiff.sweep.spec import MIN_STEPS, MODULE_CLASSES, SweepSpec

DATA_CLASS = "lldiff.data.PretrainDataModule"


def _default(cls: type, name: str) -> Any:
    return inspect.signature(cls.__init__).parameters[name].default


def budget_label(budget: float) -> str:
    """``2e+11`` -> ``C2e+11``; 3 significant digits so distinct budgets stay distinct."""
    return f"C{budget:.3g}"


def tokens_per_step(spec: SweepSpec) -> float:
    """Expected tokens per optimizer step over all devices, random-length batches included:
    ``batch * devices * nodes * accumulation * (L (1-p) + p (1+L) / 2)``."""
    prob = spec.model.get("random_length_prob", _default(LMBase, "random_length_prob"))
    return world_batch_rows(spec) * expected_length(seq_len_of(spec), prob)


def steps_for_budget(budget: float, flops_per_token: float, step_tokens: float) -> int:
    """``max_steps = C / (flops_per_token * tokens_per_step)``, rounded to the nearest step
    (``flops_per_token`` is ``6 N`` on SMDM's axis)."""
    return round(budget / (flops_per_token * step_tokens))


def model_config(spec: SweepSpec, size: str) -> ModelConfig:
    """The size's shape with the spec's vocabulary (what the run will build)."""
    vocab = spec.data.get("vocab_size", _default(PretrainDataModule, "vocab_size"))
    return SIZES[size].replace(vocab_size=vocab)


def seq_len_of(spec: SweepSpec) -> int:
    return spec.data.get("seq_len", _default(PretrainDataModule, "seq_len"))


def flops_per_token(spec: SweepSpec, size: str, axis: str | None = None) -> float:
    """Training FLOPs per token of ``size`` on a compute axis (default: the spec's):
    ``6nd`` -> ``6 N_nonemb``; ``matmul`` -> ``lldiff.flops.step_flops_per_token`` (forward +
    backward matmuls, LM head and attention at the spec's sequence length)."""
    axis = axis or spec.compute
    cfg = model_config(spec, size)
    if axis == "6nd":
        return 6.0 * cfg.non_embedding_params()
    return step_flops_per_token(cfg, seq_len_of(spec))


def world_batch_rows(spec: SweepSpec) -> int:
    """Rows per optimizer step over all devices and accumulation steps."""
    batch = spec.data.get("batch_size", _default(PretrainDataModule, "batch_size"))
    devices = spec.trainer.get("devices", 1)
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(spec.trainer.get("num_nodes", 1))
    return batch * world * int(spec.trainer.get("accumulate_grad_batches", 1))


def unique_tokens_effective(spec: SweepSpec) -> int | None:
    """``data.unique_tokens`` rounded down to whole batches over all devices, as
    ``PretrainDataModule.unique_tokens_effective`` does (every epoch then visits each of its
    rows exactly once); None without a cap."""
    unique = spec.data.get("unique_tokens")
    if unique is None:
        return None
    batch_tokens = world_batch_rows(spec) // int(spec.trainer.get("accumulate_grad_batches", 1)) * seq_len_of(spec)
    return unique // batch_tokens * batch_tokens


@dataclass(frozen=True)
class RunPlan:
    index: int
    run_id: str  # "<objective>/<size>/<budget or epochs label>[-seed<k>]": also its TensorBoard path
    objective: str
    size: str
    n_nonemb: int
    budget: float  # planned compute on the spec's axis (epoch runs: that of their tokens)
    seed: int
    max_steps: int
    tokens_per_step: float
    warmup_steps: int | None
    model_args: dict[str, Any]
    flops_per_token: float = 0.0  # on the spec's compute axis
    compute: str = "6nd"
    epochs: float | None = None  # passes over the unique tokens (repeated-data sweeps)
    unique_tokens: int | None = None

    @property
    def tokens(self) -> float:
        return self.max_steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """Planned compute on the spec's axis (close to the budget; rounding the steps moves it slightly)."""
        return (self.flops_per_token or 6.0 * self.n_nonemb) * self.tokens

    @property
    def flops_6nd(self) -> float:
        return 6.0 * self.n_nonemb * self.tokens

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.n_nonemb


def matmul_flops(spec: SweepSpec, run: RunPlan) -> float:
    """The run's real training work: forward + backward matmul FLOPs, LM head and attention
    included (``lldiff.flops.step_flops_per_token``); what time and GPU-hours scale with."""
    return flops_per_token(spec, run.size, "matmul") * run.tokens


def width_scaled_lr(lr: float, d_model: int, reference_width: int) -> float:
    """``lr`` for a model of width ``d_model`` when ``lr`` is right at ``reference_width``:
    ``lr * reference_width / d_model`` above it (Adam's rule for hidden weights under muP:
    the update size per coordinate must shrink as 1/width), unchanged at or below it."""
    return lr * min(1.0, reference_width / d_model)


def epoch_label(epochs: float) -> str:
    """``4.0`` -> ``E4``, ``0.5`` -> ``E0.5``."""
    return f"E{epochs:g}"


def _cells(spec: SweepSpec) -> list[tuple[float, str, int, float | None]]:
    """(budget, size, max_steps, epochs) of every planned (size, budget or epochs) cell, checked."""
    step_tokens = tokens_per_step(spec)
    cells, too_few, outside = [], [], {}
    if spec.epochs:
        unique = unique_tokens_effective(spec)
        steps_per_epoch = unique / (world_batch_rows(spec) * seq_len_of(spec))
        over_cap = []
        for epochs in sorted(spec.epochs):
            steps = round(epochs * steps_per_epoch)
            for size in spec.sizes:
                budget = flops_per_token(spec, size) * steps * step_tokens
                if spec.budgets and budget > spec.budgets[0] * (1 + 1e-9):
                    over_cap.append(f"{epoch_label(epochs)} x {size} ({budget:.3g} FLOPs)")
                cells.append((budget, size, steps, epochs))
                if steps < MIN_STEPS:
                    too_few.append(f"{size} x {epoch_label(epochs)}: {steps} steps")
        if over_cap:
            raise ValueError(
                f"epochs {sorted(spec.epochs)} of U={unique} unique tokens need more compute than the budget "
                f"{spec.budgets[0]:.3g} provides ({spec.compute} axis): " + "; ".join(over_cap)
            )
    else:
        for budget in sorted(spec.budgets):
            for size in spec.sizes:
                steps = steps_for_budget(budget, flops_per_token(spec, size), step_tokens)
                if spec.tokens_per_param is not None:
                    ratio = steps * step_tokens / SIZES[size].non_embedding_params()
                    low, high = spec.tokens_per_param
                    if not low <= ratio <= high:
                        outside.setdefault(budget, []).append(size)
                        continue
                if steps < MIN_STEPS:
                    too_few.append(f"{size} x C={budget:.3g}: {steps} steps")
                cells.append((budget, size, steps, None))
    if too_few:
        raise ValueError(
            f"{len(too_few)} (size, budget) cell(s) give fewer than {MIN_STEPS} optimizer steps of "
            f"{step_tokens:.0f} tokens: " + "; ".join(too_few)
            + ". Raise those budgets, drop those sizes, narrow tokens_per_param, or use a smaller batch."
        )
    if spec.tokens_per_param is not None:
        kept = {b: sum(1 for c in cells if c[0] == b) for b in spec.budgets}
        thin = [f"C={b:.3g}: {kept[b]} size(s) kept, {', '.join(outside.get(b, []))} outside" for b in
                sorted(spec.budgets) if kept[b] < 3]
        if thin:
            raise ValueError(
                f"tokens_per_param {list(spec.tokens_per_param)} leaves fewer than 3 sizes (an iso-FLOP parabola "
                "needs 3) at " + "; ".join(thin) + ". Widen the window or add sizes."
            )
    return cells


def make_plan(spec: SweepSpec) -> list[RunPlan]:
    """All runs, smallest compute first within each budget; validates every cell before any run."""
    step_tokens = tokens_per_step(spec)
    unique = unique_tokens_effective(spec)
    runs: list[RunPlan] = []
    for budget, size, steps, epochs in _cells(spec):
        n = SIZES[size].non_embedding_params()
        label = epoch_label(epochs) if epochs is not None else budget_label(budget)
        for objective in spec.objectives:
            for seed in spec.seeds:
                version = label + (f"-seed{seed}" if len(spec.seeds) > 1 else "")
                args = {**spec.model, **spec.objective_args.get(objective, {})}
                if spec.lr_reference_width is not None:
                    base_lr = args.get("lr", _default(LMBase, "lr"))
                    args["lr"] = width_scaled_lr(base_lr, SIZES[size].d_model, spec.lr_reference_width)
                args.update(spec.size_args.get(size, {}))  # an explicit per-size value wins
                warmup = args.get("warmup_steps")
                if spec.warmup_fraction is not None:
                    warmup = max(1, round(spec.warmup_fraction * steps))
                runs.append(
                    RunPlan(
                        index=len(runs), run_id=f"{objective}/{size}/{version}", objective=objective,
                        size=size, n_nonemb=n, budget=budget, seed=seed, max_steps=steps,
                        tokens_per_step=step_tokens, warmup_steps=warmup, model_args=args,
                        flops_per_token=flops_per_token(spec, size), compute=spec.compute, epochs=epochs,
                        unique_tokens=unique,
                    )
                )
    return runs


def fresh_control(spec: SweepSpec, train_tokens: int) -> SweepSpec:
    """The fresh-data control of a repeated-data sweep: the same objectives, sizes, model and
    data without the unique-token cap, one run per epoch count E whose E x U tokens fit in one
    pass over the training split (``train_tokens``), each seeing E x U distinct tokens with the
    same steps, schedule and compute as the repeated run of E epochs. Muennighoff's effective
    data D' of a repeated run is the fresh-data amount that reaches the same loss.

    Raises:
        ValueError: ``spec`` is not a repeated-data sweep, or even 2 epochs of U exceed the split.
    """
    unique = unique_tokens_effective(spec)
    if not spec.epochs or unique is None:
        raise ValueError(f"sweep {spec.name!r} has no epochs and data.unique_tokens: no fresh-data control to derive")
    fresh = [e for e in sorted(spec.epochs) if e > 1 and e * unique <= train_tokens]
    if not fresh:
        raise ValueError(f"sweep {spec.name!r}: 2 epochs of U={unique} tokens need more than the training split's "
                         f"{train_tokens} tokens; no fresh-data control is possible")
    if len(spec.sizes) != 1:
        raise ValueError(f"a fresh-data control is derived for one size; {spec.name!r} has {list(spec.sizes)}")
    size = spec.sizes[0]
    steps_per_epoch = unique / (world_batch_rows(spec) * seq_len_of(spec))
    budgets = [flops_per_token(spec, size) * round(e * steps_per_epoch) * tokens_per_step(spec) for e in fresh]
    data = {k: v for k, v in spec.data.items() if k != "unique_tokens"}
    return replace(spec, name=f"{spec.name}-fresh", epochs=(), budgets=tuple(budgets), data=data,
                               tokens_per_param=None)


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
