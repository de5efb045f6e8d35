"""Plan a sweep: one ordinary fit per (objective, size, budget, seed), steps from the budget C
on the spec's compute axis: ``6nd`` (SMDM's ``C = 6 N D``, the same per token for every
objective) or ``matmul`` (the registry's real matmul FLOPs per training token,
``Objective.matmul_flops_per_token``: BD3's training forward on ``[x_t ⊕ x_0]`` costs about
twice the AR's or the MDM's, so at equal budget a BD3 run takes about half the steps)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

from lldiff import objectives as registry
from lldiff.config import SIZES, ModelConfig
from lldiff.data import PretrainDataModule
from lldiff.objectives.common.base import LMBase
from lldiff.objectives.common.masking import expected_length
from lldiff.sweep.spec import MIN_STEPS, SweepSpec

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


def model_config(spec: SweepSpec, size: str, objective: str | None = None) -> ModelConfig:
    """The size's shape with the spec's vocabulary and, given an objective, its attention
    kind, block size and mask token (what the run will build)."""
    vocab = spec.data.get("vocab_size", _default(PretrainDataModule, "vocab_size"))
    fields = registry.get(objective).model_fields(vocab) if objective is not None else {}
    return SIZES[size].replace(vocab_size=vocab, **fields)


def seq_len_of(spec: SweepSpec) -> int:
    return spec.data.get("seq_len", _default(PretrainDataModule, "seq_len"))


def flops_per_token(spec: SweepSpec, size: str, axis: str | None = None, objective: str | None = None) -> float:
    """Training FLOPs per token of ``size`` on a compute axis (default: the spec's):
    ``6nd`` -> ``6 N_nonemb`` (any objective); ``matmul`` -> the objective's
    ``registry.get(objective).matmul_flops_per_token`` (forward + backward matmuls, LM head
    and attention at the spec's sequence length; BD3 runs them on 2L tokens)."""
    axis = axis or spec.compute
    if axis == "6nd":
        return 6.0 * model_config(spec, size).non_embedding_params()
    if objective is None:
        raise ValueError(f"FLOPs per token on the {axis!r} axis depend on the objective; give one")
    return registry.get(objective).matmul_flops_per_token(model_config(spec, size, objective), seq_len_of(spec))


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
    included (the registry's ``matmul_flops_per_token`` of its objective); what time and
    GPU-hours scale with."""
    return flops_per_token(spec, run.size, "matmul", run.objective) * run.tokens


def width_scaled_lr(lr: float, d_model: int, reference_width: int) -> float:
    """``lr`` for a model of width ``d_model`` when ``lr`` is right at ``reference_width``:
    ``lr * reference_width / d_model`` above it (Adam's rule for hidden weights under muP:
    the update size per coordinate must shrink as 1/width), unchanged at or below it."""
    return lr * min(1.0, reference_width / d_model)


def epoch_label(epochs: float) -> str:
    """``4.0`` -> ``E4``, ``0.5`` -> ``E0.5``."""
    return f"E{epochs:g}"


@dataclass(frozen=True)
class Cell:
    """One (size, budget or epochs) cell of the plan, and per objective ``(budget, steps)``:
    on the ``6nd`` axis both are the same for every objective; on the ``matmul`` axis a budget
    cell gives each objective its own steps, an epochs cell its own compute."""

    budget: float  # the budget it was planned for (epochs cells: the largest objective compute)
    size: str
    epochs: float | None
    runs: dict[str, tuple[float, int]]


def _cells(spec: SweepSpec) -> list[Cell]:
    """Every planned (size, budget or epochs) cell, checked."""
    step_tokens = tokens_per_step(spec)
    cells: list[Cell] = []
    too_few, outside = [], {}
    if spec.epochs:
        unique = unique_tokens_effective(spec)
        steps_per_epoch = unique / (world_batch_rows(spec) * seq_len_of(spec))
        over_cap = []
        for epochs in sorted(spec.epochs):
            steps = round(epochs * steps_per_epoch)
            for size in spec.sizes:
                runs = {o: (flops_per_token(spec, size, objective=o) * steps * step_tokens, steps)
                        for o in spec.objectives}
                for objective, (budget, _) in runs.items():
                    if spec.budgets and budget > spec.budgets[0] * (1 + 1e-9):
                        over_cap.append(f"{epoch_label(epochs)} x {size}{_who(spec, objective)} ({budget:.3g} FLOPs)")
                cells.append(Cell(max(b for b, _ in runs.values()), size, epochs, runs))
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
                runs = {}
                for objective in spec.objectives:
                    steps = steps_for_budget(budget, flops_per_token(spec, size, objective=objective), step_tokens)
                    if spec.tokens_per_param is not None:
                        ratio = steps * step_tokens / SIZES[size].non_embedding_params()
                        low, high = spec.tokens_per_param
                        if not low <= ratio <= high:
                            outside.setdefault((budget, objective), []).append(size)
                            continue
                    runs[objective] = (budget, steps)
                    if steps < MIN_STEPS:
                        cell = f"{size} x C={budget:.3g}{_who(spec, objective)}: {steps} steps"
                        if cell not in too_few:
                            too_few.append(cell)
                if runs:
                    cells.append(Cell(budget, size, None, runs))
    if too_few:
        raise ValueError(
            f"{len(too_few)} (size, budget) cell(s) give fewer than {MIN_STEPS} optimizer steps of "
            f"{step_tokens:.0f} tokens: " + "; ".join(too_few)
            + ". Raise those budgets, drop those sizes, narrow tokens_per_param, or use a smaller batch."
        )
    if spec.tokens_per_param is not None:
        thin = []
        for budget in sorted(spec.budgets):
            for objective in spec.objectives:
                kept = sum(1 for c in cells if c.budget == budget and objective in c.runs)
                if kept < 3:
                    thin.append(f"C={budget:.3g}{_who(spec, objective)}: {kept} size(s) kept, "
                                f"{', '.join(outside.get((budget, objective), []))} outside")
        thin = list(dict.fromkeys(thin))
        if thin:
            raise ValueError(
                f"tokens_per_param {list(spec.tokens_per_param)} leaves fewer than 3 sizes (an iso-FLOP parabola "
                "needs 3) at " + "; ".join(thin) + ". Widen the window or add sizes."
            )
    return cells


def _who(spec: SweepSpec, objective: str) -> str:
    """`` (bd3-4)`` where the objectives' FLOPs per token differ (the matmul axis), else nothing."""
    differ = len({flops_per_token(spec, spec.sizes[0], objective=o) for o in spec.objectives}) > 1
    return f" ({objective})" if differ else ""


def make_plan(spec: SweepSpec) -> list[RunPlan]:
    """All runs, smallest compute first within each budget; validates every cell before any run."""
    step_tokens = tokens_per_step(spec)
    unique = unique_tokens_effective(spec)
    runs: list[RunPlan] = []
    for cell in _cells(spec):
        size, epochs = cell.size, cell.epochs
        n = SIZES[size].non_embedding_params()
        for objective in spec.objectives:
            if objective not in cell.runs:
                continue
            budget, steps = cell.runs[objective]
            label = epoch_label(epochs) if epochs is not None else budget_label(budget)
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
                        flops_per_token=flops_per_token(spec, size, objective=objective), compute=spec.compute,
                        epochs=epochs, unique_tokens=unique,
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
    per_token = {o: flops_per_token(spec, size, objective=o) for o in spec.objectives}
    if len(set(per_token.values())) > 1:
        raise ValueError(
            f"sweep {spec.name!r}: on the {spec.compute} axis the objectives' FLOPs per token differ ("
            + ", ".join(f"{o}: {v:.4g}" for o, v in per_token.items()) + "), so one list of budgets cannot give "
            "every objective the steps of its repeated runs; use compute: 6nd or one sweep per cost")
    steps_per_epoch = unique / (world_batch_rows(spec) * seq_len_of(spec))
    budgets = [next(iter(per_token.values())) * round(e * steps_per_epoch) * tokens_per_step(spec) for e in fresh]
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
    module = registry.get(run.objective).module_config()  # class path and the args the name fixes (block_size)
    return {
        "seed_everything": run.seed,
        "model": {"class_path": module["class_path"], "init_args": {**module["init_args"], **objective_module}},
        "data": {"class_path": DATA_CLASS, "init_args": data},
        "trainer": trainer,
        "checkpoint": {"every_n_train_steps": max(1, min(100, run.max_steps // 5))},
    }
