"""What a study trains: one base fit config, and per trial that config with the sampled
values on top (the very config `lldiff fit --config` would read).

Every trial of a study shares the base config (objective, size, data, seed, steps), so
trials differ only in the searched parameters. A trial validates every ``max_steps / evals``
optimizer steps (the pruning points, keyed on the global step; the last one, at
``max_steps``, is the trial's value) and logs to TensorBoard in ``OUT/trials/NNNN``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from lldiff import objectives as registry
from lldiff.config import SIZES
from lldiff.tune import TuneError, read_yaml
from lldiff.tune.space import SearchSpace, load_space

DEFAULT_DATA_CLASS = "lldiff.data.PretrainDataModule"

# Qualified init args a search may not sample, and why (the study or each trial sets them).
RESERVED = {
    "model.size": "a study is for one size (give --size)",
    "model.vocab_size": "it is linked from the data (search data.vocab_size instead)",
    "trainer.max_steps": "every trial runs --max-steps steps",
    "trainer.max_epochs": "every trial runs --max-steps steps",
    "trainer.val_check_interval": "validation (the pruning points) runs every max_steps / --evals steps",
    "trainer.check_val_every_n_epoch": "validation is keyed on steps, not epochs",
    "trainer.logger": "each trial logs to OUT/trials/NNNN",
    "trainer.callbacks": "not a hyperparameter",
    "trainer.default_root_dir": "each trial logs to OUT/trials/NNNN",
}


@dataclass(frozen=True)
class TuneSetup:
    """A study's fixed part. ``base`` is the fit config with objective and size applied."""

    base: dict[str, Any]
    objective: str
    size: str
    space: SearchSpace
    max_steps: int
    evals: int = 4
    keep_checkpoints: bool = False

    @property
    def eval_every(self) -> int:
        """Optimizer steps between validations: ``max_steps / evals`` (an exact divisor)."""
        return self.max_steps // self.evals

    def describe(self) -> dict[str, Any]:
        """What a study records (JSON): a worker with a different setup may not join it."""
        config_hash = hashlib.sha256(json.dumps(self.base, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {
            "objective": self.objective, "size": self.size, "max_steps": self.max_steps, "evals": self.evals,
            "space": self.space.to_dict(), "base_config_sha256": config_hash,
        }


def init_args(cls: type) -> dict[str, Any]:
    """Named init args of ``cls`` with their defaults (``inspect.Parameter.empty`` if none),
    following ``**kwargs`` into the bases' ``__init__`` (MaskedDiffusionLM -> LMBase)."""
    args: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                args.setdefault(p.name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return args


def _import(class_path: str, what: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise TuneError(f"{what} {class_path!r} cannot be imported: {error}") from None


def load_setup(
    config: str | Path,
    space: str | Path,
    *,
    objective: str | None = None,
    size: str | None = None,
    max_steps: int | None = None,
    evals: int = 4,
    keep_checkpoints: bool = False,
    overrides: list[tuple[str, Any]] = (),
) -> TuneSetup:
    """Read the base fit config and the space file, with ``overrides`` (:func:`apply_overrides`)
    on top; every error names the bad value."""
    from lightning.pytorch import Trainer

    base = apply_overrides(_read_config(config), list(overrides))
    if base.pop("ckpt_path", None) is not None:  # a run's saved config.yaml says ckpt_path: null
        raise TuneError(f"{config}: ckpt_path is set; every trial trains from scratch (remove it)")
    base.pop("weights_only", None)  # a `fit` option of the saved config.yaml, not a trial's
    model = base.setdefault("model", {})
    class_path = model.get("class_path")
    model_args = dict(model.get("init_args") or {})
    if objective is None:
        try:
            objective = registry.of_module(str(class_path), model_args).name
        except ValueError as error:
            raise TuneError(f"{config}: model.class_path {class_path!r} is not an objective's class ({error}); "
                            "give --objective") from None
    try:
        chosen = registry.get(objective)
    except ValueError as error:
        raise TuneError(str(error)) from None
    module = chosen.module_config()  # the class and the init args the name fixes (block_size for bd3-B)
    model_cls = _import(module["class_path"], "model class")
    model_defaults = init_args(model_cls)
    if class_path != module["class_path"]:  # switching objective: keep the args the new class takes
        model_args = {k: v for k, v in model_args.items() if k in model_defaults}
    size = size if size is not None else model_args.get("size", model_defaults["size"])
    if size not in SIZES:
        raise TuneError(f"unknown size {size!r}; known sizes: {', '.join(SIZES)}")
    base["model"] = {"class_path": module["class_path"],
                     "init_args": {**model_args, **module["init_args"], "size": size}}

    data = base.setdefault("data", {})
    data.setdefault("class_path", DEFAULT_DATA_CLASS)
    data_cls = _import(data["class_path"], "data class")
    targets = {"model": set(model_defaults), "data": set(init_args(data_cls)), "trainer": set(init_args(Trainer))}
    for group in ("model", "data"):
        unknown = set(base[group].get("init_args") or {}) - targets[group]
        if unknown:
            raise TuneError(f"{config}: unknown {group}.init_args {sorted(unknown)} for {base[group]['class_path']}")
    unknown = set(base.get("trainer") or {}) - targets["trainer"]
    if unknown:
        raise TuneError(f"{config}: unknown trainer option(s) {sorted(unknown)}; see `lldiff fit --help`")

    reserved = {**RESERVED, **{f"model.{k}": f"the objective {objective} fixes it (choose another with --objective)"
                               for k in module["init_args"]}}
    if max_steps is None:
        max_steps = (base.get("trainer") or {}).get("max_steps")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise TuneError(f"{config} sets no trainer.max_steps >= 1 (got {max_steps!r}); give --max-steps")
    if max_steps < 1:
        raise TuneError(f"--max-steps must be >= 1, got {max_steps}")
    if not 1 <= evals <= max_steps:
        raise TuneError(f"--evals must be in [1, max_steps={max_steps}], got {evals}")
    if max_steps % evals:
        raise TuneError(f"--max-steps {max_steps} is not a multiple of --evals {evals}: validation runs every "
                        "max_steps / evals steps, and the last one (the trial's value) must be at the last step")
    setup = TuneSetup(
        base=base, objective=objective, size=size, space=load_space(space, targets, reserved),
        max_steps=max_steps, evals=evals, keep_checkpoints=keep_checkpoints,
    )
    _check_warmup(setup)
    return setup


def _check_warmup(setup: TuneSetup) -> None:
    """A trial's warmup is at most half its steps: its value is read at ``max_steps``, and a
    warmup that fills most of a short trial leaves the cosine no room (at ``warmup = max_steps``
    the trial never decays), so the search would compare schedules instead of settings. Checked
    for the searched range, the config's value and, when neither sets it, SMDM's default
    ``max(1% of steps, 100)``, before any trial runs."""
    limit = setup.max_steps // 2
    searched = {p.arg: p for p in setup.space.params if p.group == "model"}
    spec = searched.get("warmup_steps")
    if spec is None:
        value = setup.base["model"]["init_args"].get("warmup_steps")
        if value is None:
            from lldiff.optim import smdm_warmup_steps

            value, where = smdm_warmup_steps(setup.max_steps), "the default warmup_steps (SMDM's max(1% of steps, 100))"
        else:
            where = f"model.init_args.warmup_steps={value}"
        if isinstance(value, int) and value > limit:
            raise TuneError(f"{where} is {value} steps, more than half of --max-steps {setup.max_steps}; allowed: at "
                            f"most {limit} (give --model.init_args.warmup_steps N, or search warmup_steps)")
        return
    values = [v for v in spec.choices if isinstance(v, (int, float))] if spec.kind == "categorical" else [spec.high]
    if values and max(values) > limit:
        raise TuneError(f"search space warmup_steps reaches {max(values)}, more than half of --max-steps "
                        f"{setup.max_steps}; allowed: at most {limit} (a longer warmup leaves a trial's cosine "
                        "too few steps)")


OVERRIDE_GROUPS = ("model", "data", "trainer", "checkpoint", "seed_everything")


def apply_overrides(base: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """``base`` with ``lldiff fit``-style overrides, e.g. ``("data.init_args.val_max_rows", 16)``,
    applied to every trial (a key path into the config; the value already parsed as YAML).
    What the study itself sets is refused, naming the option that sets it."""
    cfg = copy.deepcopy(base)
    for key, value in overrides:
        parts = key.split(".")
        if parts[0] not in OVERRIDE_GROUPS or any(not p for p in parts):
            raise TuneError(f"unknown option --{key}; config overrides start with "
                            + ", ".join(f"--{g}." for g in OVERRIDE_GROUPS[:-1]) + " or are --seed_everything")
        qualified = f"{parts[0]}.{parts[-1]}" if len(parts) > 1 else parts[0]
        if qualified in RESERVED or key in ("model.init_args.size", "model.class_path"):
            reason = RESERVED.get(qualified, "give --size or --objective")
            raise TuneError(f"--{key} cannot be overridden in a study: {reason}")
        node = cfg
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise TuneError(f"--{key}: {part!r} is {child!r} in the config, not a mapping")
            node = child
        node[parts[-1]] = value
    return cfg


def parse_overrides(extra: list[str]) -> list[tuple[str, Any]]:
    """``["--data.init_args.val_max_rows", "16", "--trainer.precision=bf16-mixed"]`` ->
    ``[("data.init_args.val_max_rows", 16), ("trainer.precision", "bf16-mixed")]`` (values read
    as YAML, like ``lldiff fit``'s command line)."""
    import yaml

    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or item == "--":
            raise TuneError(f"unexpected argument {item!r}; config overrides are --KEY VALUE, e.g. "
                            "--data.init_args.val_max_rows 16")
        if "=" in item:
            key, text = item[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise TuneError(f"{item} needs a value (--KEY VALUE)")
            key, text = item[2:], extra[i + 1]
            i += 2
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs


def _read_config(path: str | Path) -> dict[str, Any]:
    raw = read_yaml(path, "base config")
    if not isinstance(raw, dict):
        raise TuneError(f"base config {str(path)!r} is not a mapping (a fit config like configs/mdm-tiny.yaml)")
    return raw


def trial_dir(out: Path, number: int) -> Path:
    """Where trial ``number`` logs (TensorBoard events, config.yaml, hparams.yaml)."""
    return Path(out) / "trials" / f"{number:04d}"


def trial_config(setup: TuneSetup, values: dict[str, Any], out: Path, number: int) -> dict[str, Any]:
    """The full fit config of one trial: the base config, the sampled values, the study's
    step budget and validation points, and a logger writing to ``trial_dir(out, number)``."""
    cfg = copy.deepcopy(setup.base)
    groups = setup.space.groups(values)
    for group in ("model", "data"):
        cfg[group]["init_args"] = {**(cfg[group].get("init_args") or {}), **groups.get(group, {})}
    trainer = {**(cfg.get("trainer") or {}), **groups.get("trainer", {})}
    trainer.pop("max_epochs", None)
    accumulate = int(trainer.get("accumulate_grad_batches", 1))
    trainer.update(
        max_steps=setup.max_steps,
        val_check_interval=setup.eval_every * accumulate,  # Lightning counts batches, not steps
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger={
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            # name, not version: a version "0003" would be read as the integer 3 (-> version_3)
            "init_args": {"save_dir": str(Path(out) / "trials"), "name": f"{number:04d}", "version": "",
                          "default_hp_metric": False},
        },
    )
    cfg["trainer"] = trainer
    # one last.ckpt at the end when kept; otherwise a trial writes no checkpoint at all
    cfg["checkpoint"] = {**(cfg.get("checkpoint") or {}), "every_n_train_steps": setup.max_steps,
                         "save_last": setup.keep_checkpoints, "save_top_k": 0}
    return cfg
