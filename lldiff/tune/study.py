"""Create or join a study and run trials until it holds ``n_trials``.

``n_trials`` is a target for the *study*, not for one worker: each worker, under a lock
on the storage's claim file, counts the trials the study holds (running, complete, pruned
or failed) and creates the next one only while that count is below ``n_trials``. So K
workers on one study together run exactly ``n_trials`` trials, each number once, and
re-running a finished command runs nothing (raise ``--n-trials`` to add trials).
``optuna.study.MaxTrialsCallback`` cannot promise this: it checks only after a trial ends,
counts finished trials only, and each worker starts its first trial unchecked, so K
workers overshoot by up to K-1.

A trial is an ordinary fit (``lldiff.cli.lightning_cli``) of the study's base config with
the trial's sampled values, plus ``StepPruningCallback``. Its value is
``val/nll_per_token`` at the last step (lower is better).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from lldiff.atomic import write_text
from lldiff.tune import TuneError
from lldiff.tune.pruning import StepPruningCallback
from lldiff.tune.setup import TuneSetup, trial_config, trial_dir
from lldiff.tune.storage import StudyStorage, claim_lock

SETUP_ATTR = "lldiff_setup"
BINDING_FILE = "tune.json"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")

Log = Callable[[str], None]


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """``tpe`` (with the constant liar, so parallel workers do not all try the same point) or ``random``."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise TuneError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def make_pruner(name: str, setup: TuneSetup, startup_trials: int = 5, warmup_steps: int = 0) -> optuna.pruners.BasePruner:
    """``median``: prune a trial whose best value so far is worse than the median of earlier
    trials at the same global step (after ``startup_trials`` finished trials, from step
    ``warmup_steps`` on); ``hyperband``: successive halving over steps; ``none``."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=setup.eval_every, max_resource=setup.max_steps)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise TuneError(f"unknown pruner {name!r}; allowed: {', '.join(PRUNERS)}")


def worker_seed(seed: int | None, worker_index: int, existing_trials: int) -> int | None:
    """A distinct sampler seed per worker and per resumption (same seed, same state: same draws)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, worker_index, existing_trials]).generate_state(1)[0])


def bind_out_dir(out: Path, study_name: str, storage: StudyStorage) -> None:
    """Record which study ``out`` belongs to (trial directories are named by trial number);
    refuse a directory that holds another study's trials."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / BINDING_FILE
    binding = {"study_name": study_name, "storage": storage.label}
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != binding:
            raise TuneError(f"{out} holds trials of study {existing['study_name']!r} in {existing['storage']!r}, "
                            f"not {study_name!r} in {storage.label!r}; use another --out. Nothing was changed.")
        return
    write_text(path, json.dumps(binding, indent=2) + "\n")


def open_study(
    storage: StudyStorage,
    study_name: str,
    setup: TuneSetup | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study or join it (``load_if_exists``). With ``setup``, a study created
    for a different objective, size, step budget, space or base config is refused."""
    with claim_lock(storage.claim_lock):  # workers starting together create it (and record the setup) once
        try:
            study = optuna.create_study(
                storage=storage.storage, study_name=study_name, direction="minimize",
                sampler=sampler, pruner=pruner, load_if_exists=True,
            )
        except ValueError as error:  # e.g. an existing study with other directions
            raise TuneError(f"study {study_name!r} in {storage.label!r}: {error}") from None
        if study.directions != [optuna.study.StudyDirection.MINIMIZE]:
            raise TuneError(f"study {study_name!r} in {storage.label!r} does not minimise one value "
                            f"(directions {study.directions}); it is not an lldiff study")
        if setup is not None:
            _check_setup(study, storage, setup)
    return study


def _check_setup(study: optuna.Study, storage: StudyStorage, setup: TuneSetup) -> None:
    """Record ``setup`` in a new study; refuse one recorded with another setup."""
    described = json.loads(json.dumps(setup.describe()))  # as the storage returns it
    recorded = study.user_attrs.get(SETUP_ATTR)
    if recorded is None:
        study.set_user_attr(SETUP_ATTR, described)
    elif recorded != described:
        differs = {k: (recorded.get(k), described[k]) for k in described if recorded.get(k) != described[k]}
        raise TuneError(
            f"study {study.study_name!r} in {storage.label!r} was created with another setup; differing "
            + "; ".join(f"{k}: study has {old!r}, this run has {new!r}" for k, (old, new) in differs.items())
            + ". Use another --study-name."
        )


def load_study(storage: StudyStorage, study_name: str) -> optuna.Study:
    """An existing study (for ``lldiff tune best``); the error lists the studies there."""
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage.storage)]
    if study_name not in names:
        raise TuneError(f"no study {study_name!r} in {storage.label!r}; studies there: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=storage.storage)


def run_trial(setup: TuneSetup, trial: optuna.Trial, out: Path) -> float:
    """Fit one trial; returns ``val/nll_per_token`` at the last step. Raises
    ``optuna.TrialPruned`` when the pruner stops it (or its validation is not finite)."""
    from lldiff.launch import lightning_cli  # heavy import, only when a trial really runs

    values = setup.space.suggest(trial)
    directory = trial_dir(out, trial.number)
    config_path = directory / "trial.yaml"
    write_text(config_path, yaml.safe_dump(trial_config(setup, values, out, trial.number), sort_keys=False))
    trial.set_user_attr("dir", str(directory))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    cli = lightning_cli(["--config", str(config_path)], run=False)
    callback = StepPruningCallback(trial)
    cli.trainer.callbacks.append(callback)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if callback.last_step != setup.max_steps or cli.trainer.global_step != setup.max_steps:
        raise RuntimeError(f"trial {trial.number} ended at step {cli.trainer.global_step} with its last validation "
                           f"at step {callback.last_step}; expected both at max_steps={setup.max_steps}")
    return float(callback.last_value)


def count_started(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: every state but WAITING (enqueued, not started)."""
    return sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))


def run_worker(
    study: optuna.Study,
    lock: Path | None,
    n_trials: int,
    trial_fn: Callable[[optuna.Trial], float],
    log: Log = print,
) -> list[int]:
    """Claim and run trials (``trial_fn(trial) -> value``) until the study holds ``n_trials``;
    returns the numbers run here. ``lock`` is the storage's claim file (``StudyStorage.claim_lock``).

    ``optuna.TrialPruned`` records the trial as PRUNED (at its last reported value). Any
    other exception records it as FAIL and propagates: a bug stops the worker rather than
    failing every remaining trial.
    """
    numbers: list[int] = []
    while True:
        with claim_lock(lock):
            if count_started(study) >= n_trials:
                return numbers
            trial = study.ask()
        numbers.append(trial.number)
        start = time.perf_counter()
        try:
            value = trial_fn(trial)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            outcome = f"PRUNED: {pruned}"
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            study.tell(trial, value)
            outcome = f"COMPLETE: {value:.4f}"
        log(f"trial {trial.number} ({_params_text(trial.params)}) {outcome} [{time.perf_counter() - start:.1f}s]")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """One line per trial instead of Lightning's banners (as the sweep runner does)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_format(v)}" for k, v in sorted(params.items()))


def last_step(trial: FrozenTrial) -> int | None:
    return max(trial.intermediate_values) if trial.intermediate_values else None


def summary_table(study: optuna.Study) -> str:
    """One line per trial: number, state, value, last reported step, parameters."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    names = sorted({name for t in trials for name in t.params})
    header = ["number", "state", "value", "step", *names]
    rows = [header]
    for t in trials:
        value = "" if t.value is None else (f"{t.value:.4f}" if math.isfinite(t.value) else str(t.value))
        step = last_step(t)
        rows.append([str(t.number), t.state.name, value, "" if step is None else str(step),
                     *(_format(t.params[n]) if n in t.params else "" for n in names)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def best_trial(study: optuna.Study) -> FrozenTrial:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        states = {}
        for t in study.get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        raise TuneError(f"study {study.study_name!r} has no complete trial yet (trials by state: {states or 'none'})")
    return study.best_trial
