"""The analysis of one iso-FLOP sweep: ``results.csv`` rows -> seed-averaged points ->
per-objective fits (:mod:`lldiff.sweep.fits`) -> every objective compared with the reference ->
bootstrap intervals (:mod:`lldiff.sweep.bootstrap`), as one :class:`SweepAnalysis`.

Pure functions on data frames: no files, no plotting (``lldiff.sweep.report`` writes those).
**Compute** is the planned ``budget`` of a run, on the axis named by the ``compute`` column of
``results.csv``: ``"6nd"`` (SMDM's ``C = 6 N D``; the default, also for files without that
column) or ``"matmul"`` (real forward+backward matmul FLOPs including the LM head and
attention). Losses are validation nats per token (``val_nll_per_token``: exact NLL for AR, a
Monte-Carlo negative ELBO, an upper bound on the NLL, for diffusion objectives).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from lldiff.sweep.bootstrap import (BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, ComparisonBootstrap, SweepBootstrap,
                                    bootstrap_sweep)
from lldiff.sweep.fits import (CELL_KEYS, MultiplierRow, ObjectiveFit, fit_laws, fit_parabolas,
                               multiplier_table)
from lldiff.sweep.objective_facts import DEFAULT_REFERENCE
from lldiff.sweep.spec import COMPUTE_AXES

log = logging.getLogger(__name__)

#: columns ``results.csv`` must have for the analysis (others are carried along).
REQUIRED_COLUMNS: tuple[str, ...] = ("run_id", "objective", "size", "n_nonemb", "budget", "val_nll_per_token")
#: numeric columns averaged over seeds when present.
CARRIED_NUMERIC: tuple[str, ...] = ("tokens", "flops", "flops_6nd", "flops_matmul", "max_steps", "val_bpb",
                                    "wall_time_s")
DEFAULT_COMPUTE = "6nd"


def validate_results(df: pd.DataFrame, metric: str = "val_nll_per_token") -> None:
    """Raise ValueError when ``df`` is empty, lacks a required column (naming them) or mixes
    compute axes."""
    required = tuple(dict.fromkeys((*REQUIRED_COLUMNS, metric)))
    missing = [col for col in required if col not in df.columns]
    if missing:
        raise ValueError(f"results are missing required column(s): {', '.join(missing)} "
                         f"(required: {', '.join(required)})")
    if df.empty:
        raise ValueError("results are empty: no finished runs")
    compute_axis(df)


def compute_axis(df: pd.DataFrame) -> str:
    """The compute axis of ``budget``: the single value of the ``compute`` column, ``"6nd"``
    when the column is absent (results.csv files older than it); empty cells count as
    ``"6nd"`` too (rows written before the column existed).

    Raises:
        ValueError: several axes in one table (budgets on different axes cannot be fitted
            together), or an unknown axis name.
    """
    if "compute" not in df.columns:
        return DEFAULT_COMPUTE
    values = df["compute"].astype(object).where(df["compute"].notna(), DEFAULT_COMPUTE)
    axes = sorted({str(v).strip().lower() or DEFAULT_COMPUTE for v in values})
    unknown = [a for a in axes if a not in COMPUTE_AXES]
    if unknown:
        raise ValueError(f"unknown compute axis {', '.join(map(repr, unknown))} in column 'compute' "
                         f"(known: {', '.join(COMPUTE_AXES)})")
    if len(axes) > 1:
        raise ValueError(f"results mix compute axes {', '.join(axes)} in column 'compute': budgets on "
                         "different axes cannot be fitted together; analyse each sweep separately")
    return axes[0] if axes else DEFAULT_COMPUTE


def _clean(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Lower-case objectives, budgets rounded to 6 significant digits (float noise does not
    split a budget), runs with a non-finite metric dropped (logged)."""
    validate_results(df, metric)
    data = df.copy()
    data["objective"] = data["objective"].astype(str).str.lower()
    data["budget"] = data["budget"].astype(float).map(lambda b: float(f"{b:.6g}"))
    bad = ~np.isfinite(data[metric].astype(float))
    if bad.any():
        log.warning("dropping %d run(s) with a non-finite %s: %s", int(bad.sum()), metric,
                    ", ".join(map(str, data.loc[bad, "run_id"])))
        data = data.loc[~bad]
    return data


def aggregate_seeds(df: pd.DataFrame, metric: str = "val_nll_per_token") -> pd.DataFrame:
    """One row per (objective, size, N, budget): seed mean of ``metric`` as ``loss``, its
    sample std ``loss_std`` (NaN for one seed), ``n_seeds``, and the seed means of the carried
    numeric columns present. Rows with a non-finite metric are dropped (logged). Budgets are
    rounded to 6 significant digits so that float noise does not split a budget."""
    data = _clean(df, metric)
    carried = [col for col in CARRIED_NUMERIC if col in data.columns and col != metric]
    grouped = data.groupby(CELL_KEYS, sort=True)
    out = grouped[carried].mean() if carried else grouped.size().to_frame().iloc[:, :0]
    out["loss"] = grouped[metric].mean()
    out["loss_std"] = grouped[metric].std(ddof=1)
    out["n_seeds"] = grouped[metric].size()
    return out.reset_index().sort_values(["objective", "budget", "n_nonemb"], ignore_index=True)


def cell_samples(df: pd.DataFrame, metric: str = "val_nll_per_token") -> dict[tuple, np.ndarray]:
    """The per-run losses of each (objective, size, N, budget) cell (same cleaning as
    :func:`aggregate_seeds`), for the bootstrap."""
    data = _clean(df, metric)
    return {tuple(key): group[metric].to_numpy(dtype=float) for key, group in data.groupby(CELL_KEYS, sort=True)}


@dataclass
class SweepAnalysis:
    """The analysis of one sweep: seed-averaged points, fits per objective (the reference
    first), multipliers of every other objective vs the reference, the bootstrap."""

    metric: str
    points: pd.DataFrame
    fits: dict[str, ObjectiveFit]
    multipliers: list[MultiplierRow]
    exclude_extrapolated: bool = False
    notes: list[str] = field(default_factory=list)
    reference: str = DEFAULT_REFERENCE
    compute: str = DEFAULT_COMPUTE
    bootstrap: SweepBootstrap | None = None

    @property
    def objectives(self) -> list[str]:
        return list(self.fits)

    @property
    def candidates(self) -> list[str]:
        """The objectives compared with the reference (empty without the reference)."""
        return [o for o in self.fits if o != self.reference] if self.reference in self.fits else []

    def multipliers_for(self, candidate: str) -> list[MultiplierRow]:
        return [row for row in self.multipliers if row.candidate == candidate]

    @property
    def unbracketed(self) -> dict[str, list[float]]:
        """Objective -> its budgets whose optimum is not a bracketed vertex."""
        return {obj: fit.unbracketed for obj, fit in self.fits.items() if fit.unbracketed}

    @property
    def all_bracketed(self) -> bool:
        """Every budget of every objective has a bracketed vertex."""
        return bool(self.fits) and not self.unbracketed


def order_objectives(objectives: Sequence[str], reference: str = DEFAULT_REFERENCE) -> list[str]:
    """The reference first (when present), then the others sorted by name."""
    names = sorted(set(objectives))
    return ([reference] if reference in names else []) + [o for o in names if o != reference]


def analyze_results(df: pd.DataFrame, *, metric: str = "val_nll_per_token", exclude_extrapolated: bool = False,
                    strict: bool = False, reference: str = DEFAULT_REFERENCE,
                    bootstrap: int = BOOTSTRAP_REPLICATES, bootstrap_seed: int = BOOTSTRAP_SEED) -> SweepAnalysis:
    """Seed-average the runs, fit per-budget parabolas and per-objective laws, compare every
    objective with the reference, and bootstrap the whole pipeline.

    Args:
        df: ``results.csv`` as a data frame (one row per finished run).
        metric: the loss column (nats per token by default; ``val_bpb`` also works).
        exclude_extrapolated: leave budgets without a bracketed vertex out of the law fits
            (they are always reported, flagged) instead of using their best measured size.
        strict: raise instead of skipping a budget with fewer than 3 sizes.
        reference: the objective the others are compared with.
        bootstrap: bootstrap replicates (0: no bootstrap, no intervals from it).
        bootstrap_seed: the bootstrap's generator seed.
    """
    reference = reference.lower()
    points = aggregate_seeds(df, metric)  # validates, also the compute axis
    axis = compute_axis(df)
    fits = {obj: fit_laws(fit_parabolas(points, obj, strict), exclude_extrapolated)
            for obj in order_objectives(points["objective"].unique(), reference)}
    notes: list[str] = []
    candidates = [o for o in fits if o != reference]
    multipliers: list[MultiplierRow] = []
    if reference in fits and candidates:
        for cand in candidates:
            multipliers += multiplier_table(fits[reference], fits[cand], exclude_extrapolated)
    else:
        notes.append(f"no compute multiplier: needs both the reference {reference!r} and another objective, "
                     f"got {', '.join(fits)}")
    boot = None
    if bootstrap > 0:
        boot = bootstrap_sweep(fits, points, cell_samples(df, metric), reference=reference, replicates=bootstrap,
                               seed=bootstrap_seed, exclude_extrapolated=exclude_extrapolated)
        multipliers = [_with_intervals(row, boot.comparisons.get(row.candidate)) for row in multipliers]
    return SweepAnalysis(metric, points, fits, multipliers, exclude_extrapolated, notes, reference, axis, boot)


def _with_intervals(row: MultiplierRow, comparison: ComparisonBootstrap | None) -> MultiplierRow:
    if comparison is None:
        return row
    hits = np.flatnonzero(np.isclose(comparison.budgets, row.budget, rtol=1e-9, atol=0))
    if hits.size == 0:
        return row
    j = int(hits[0])
    return replace(row, parametric_ci95=comparison.parametric_ci95(j),
                   nonparametric_ci95=comparison.nonparametric_ci95(j))
