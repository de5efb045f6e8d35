"""The bootstrap of a sweep's fits: percentile 95% intervals that propagate the noise of every
per-budget fit through vertices, power laws and multipliers (:func:`bootstrap_sweep`).

Vectorised over replicates with numpy; the generator is seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lldiff.sweep.fits import (BRACKET_TOL, CELL_KEYS, MIN_BUDGETS_POWER, MIN_SIZES, ArrayLike,
                               ObjectiveFit, Parabola, match_compute_batch)
from lldiff.sweep.objective_facts import DEFAULT_REFERENCE

#: bootstrap defaults: replicates and generator seed (a fixed seed: the report is reproducible).
BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED = 1000, 0


def percentile_interval(samples: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval (linear interpolation between order statistics) of the non-NaN
    ``samples``. Infinite samples are allowed: where an end falls next to an infinite sample
    it is that infinity (e.g. ``(2.1, inf)`` when more than 2.5% of them are ``inf``).
    ``(nan, nan)`` without samples."""
    v = np.sort(np.asarray(samples, dtype=float).ravel())
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan

    def quantile(p: float) -> float:
        h = (v.size - 1) * p
        lo = int(math.floor(h))
        hi, w = min(lo + 1, v.size - 1), h - lo
        a, b = float(v[lo]), float(v[hi])
        if w == 0 or a == b:
            return a
        if math.isfinite(a) and math.isfinite(b):
            return a + w * (b - a)
        return b if math.isinf(b) else a  # next to an infinity: the infinite (wider) end

    return quantile((1 - level) / 2), quantile((1 + level) / 2)


#: resampling schemes of one iso-FLOP slice (see :func:`bootstrap_sweep`).
RESAMPLING = {
    "seeds": "seeds resampled with replacement within each (size, budget) cell",
    "seeds+pooled": "seeds resampled within cells with >= 2 seeds; Gaussian noise with the objective's pooled "
                    "seed std for single-seed cells",
    "pooled": "Gaussian noise with the objective's pooled seed std (one seed per cell)",
    "residual": "residual bootstrap of the iso-FLOP parabola with its own residuals (one seed per cell)",
    "pooled-residual": "residual bootstrap of the iso-FLOP parabola, residuals pooled over the objective's "
                       "parabolas (one seed per cell)",
    "none": "not resampled (one seed per cell and no residual degrees of freedom: no noise estimate)",
}


def _pooled_seed_std(cells: list[np.ndarray]) -> float | None:
    """sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)) over cells with >= 2 seeds; None without any."""
    dof = sum(len(s) - 1 for s in cells if len(s) >= 2)
    if dof == 0:
        return None
    return math.sqrt(sum(float(np.sum((s - s.mean()) ** 2)) for s in cells if len(s) >= 2) / dof)


def _scaled_residuals(n: np.ndarray, y: np.ndarray, parabola: Parabola | None) -> np.ndarray:
    """The parabola's residuals scaled by ``sqrt(m / (m - 3))`` (empty without residual dof)."""
    m = y.size
    if parabola is None or m <= 3:
        return np.empty(0)
    return (y - parabola(n)) * math.sqrt(m / (m - 3))  # 3 fitted parameters


def _replicate_slice(cells: list[np.ndarray], n: np.ndarray, y: np.ndarray, parabola: Parabola | None,
                     pooled_std: float | None, residual_pool: np.ndarray | None, replicates: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Bootstrap replicates (R, m) of one slice's seed-mean losses and the scheme's name.
    ``residual_pool``: scaled residuals pooled over the objective's parabolas (None: use the
    slice's own)."""
    m = len(cells)
    counts = np.array([len(s) for s in cells])
    if (counts >= 2).all() or pooled_std is not None:
        out = np.empty((replicates, m))
        for i, s in enumerate(cells):
            if len(s) >= 2:  # deviations inflated so that the bootstrap variance of the mean is s^2 / n
                dev = (s - s.mean()) * math.sqrt(len(s) / (len(s) - 1))
                out[:, i] = s.mean() + dev[rng.integers(0, len(s), (replicates, len(s)))].mean(axis=1)
            else:
                out[:, i] = s[0] + rng.normal(0.0, pooled_std, replicates)
        method = "seeds" if (counts >= 2).all() else "pooled" if (counts == 1).all() else "seeds+pooled"
        return out, method
    if residual_pool is not None and residual_pool.size:
        base = parabola(n) if parabola is not None else y  # no parabola (< 3 sizes): around the measured losses
        return base + residual_pool[rng.integers(0, residual_pool.size, (replicates, m))], "pooled-residual"
    residual = _scaled_residuals(n, y, parabola)
    if residual.size:
        return parabola(n) + residual[rng.integers(0, m, (replicates, m))], "residual"
    return np.tile(y, (replicates, 1)), "none"


def _batch_power_law(budgets: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS of ``ln values`` (R, B) on ``ln budgets`` (B,) for every replicate: (slope, intercept),
    NaN where a value is missing or where fewer than 2 budgets."""
    r = values.shape[0]
    if budgets.size < MIN_BUDGETS_POWER:
        return np.full(r, np.nan), np.full(r, np.nan)
    u = np.log(budgets)
    uc = u - u.mean()
    with np.errstate(all="ignore"):
        v = np.log(values)
        slope = (v - v.mean(axis=1, keepdims=True)) @ uc / float(uc @ uc)
        return slope, v.mean(axis=1) - slope * u.mean()


@dataclass
class ObjectiveBootstrap:
    """Bootstrap replicates of one objective's per-budget optima and power laws.

    Arrays have one row per replicate; columns follow ``budgets`` (the budgets of
    :meth:`ObjectiveFit.optima`). Every replicate applies the point estimator itself: the
    refitted parabola's vertex where the replicate brackets it, else the replicate's best
    measured size (``fallback[r, j]``; :meth:`bracket_held` is the fraction of replicates
    without it, a measure of how robust a budget's bracket is). ``failed[r, j]``: the
    optimum's loss is not positive (left out of the intervals; practically never).
    """

    objective: str
    budgets: np.ndarray
    sources: list[str]
    methods: list[str]
    n_opt: np.ndarray
    loss_opt: np.ndarray
    failed: np.ndarray
    fallback: np.ndarray
    n_exponent: np.ndarray
    n_log_prefactor: np.ndarray
    loss_exponent: np.ndarray
    loss_log_prefactor: np.ndarray

    @property
    def replicates(self) -> int:
        return int(self.n_opt.shape[0])

    @property
    def ok(self) -> np.ndarray:
        """Replicates in which every used parabola gave a minimum."""
        return ~self.failed.any(axis=1)

    @property
    def failed_fraction(self) -> float:
        return float(1.0 - self.ok.mean()) if self.replicates else math.nan

    def bracket_held(self, budget: float | None = None) -> float:
        """Fraction of replicates whose parabola brackets its vertex at ``budget`` (None: at
        every budget at once)."""
        if not self.replicates:
            return math.nan
        held = ~self.fallback if budget is None else ~self.fallback[:, [self._column(budget)]]
        return float(held.all(axis=1).mean())

    def _column(self, budget: float) -> int:
        hits = np.flatnonzero(np.isclose(self.budgets, budget, rtol=1e-9, atol=0))
        if hits.size == 0:
            raise KeyError(f"{self.objective}: no bootstrap for budget {budget:.3g}")
        return int(hits[0])

    def n_opt_ci95(self, budget: float) -> tuple[float, float]:
        j = self._column(budget)
        return percentile_interval(self.n_opt[~self.failed[:, j], j])

    def loss_opt_ci95(self, budget: float) -> tuple[float, float]:
        j = self._column(budget)
        return percentile_interval(self.loss_opt[~self.failed[:, j], j])

    def method(self, budget: float) -> str:
        return self.methods[self._column(budget)]

    @property
    def a_ci95(self) -> tuple[float, float]:
        """Exponent ``a`` of ``N_opt = A C^a``."""
        return percentile_interval(self.n_exponent[self.ok])

    @property
    def b_ci95(self) -> tuple[float, float]:
        """Exponent ``b`` of ``L_opt = A C^-b``."""
        return percentile_interval(-self.loss_exponent[self.ok])


@dataclass
class ComparisonBootstrap:
    """Bootstrap replicates of one candidate-vs-reference comparison.

    ``ok``: replicates in which both objectives succeeded (see
    :attr:`ObjectiveBootstrap.failed`); all intervals use those. Multipliers have one column
    per reference budget (``budgets``); a replicate whose candidate never reaches the
    reference's loss (non-decreasing fitted law, nothing to extrapolate along) counts as
    ``inf``.
    """

    candidate: str
    reference: str
    budgets: np.ndarray
    ok: np.ndarray
    delta_a: np.ndarray
    delta_b: np.ndarray
    parametric: np.ndarray
    nonparametric: np.ndarray

    @property
    def used_fraction(self) -> float:
        return float(self.ok.mean()) if self.ok.size else math.nan

    @property
    def delta_a_ci95(self) -> tuple[float, float]:
        """``a_candidate - a_reference`` (N_opt exponents)."""
        return percentile_interval(self.delta_a[self.ok])

    @property
    def delta_b_ci95(self) -> tuple[float, float]:
        """``b_candidate - b_reference`` (L_opt exponents)."""
        return percentile_interval(self.delta_b[self.ok])

    def parametric_ci95(self, j: int) -> tuple[float, float]:
        return percentile_interval(self.parametric[self.ok, j])

    def nonparametric_ci95(self, j: int) -> tuple[float, float]:
        return percentile_interval(self.nonparametric[self.ok, j])


@dataclass
class SweepBootstrap:
    """The bootstrap of a whole sweep: per-objective replicates and comparisons with the
    reference (keyed by candidate)."""

    replicates: int
    seed: int
    objectives: dict[str, ObjectiveBootstrap]
    comparisons: dict[str, ComparisonBootstrap]

    def methods(self, objective: str) -> dict[str, int]:
        """Resampling scheme -> number of budgets using it, for one objective."""
        out: dict[str, int] = {}
        for m in self.objectives[objective].methods:
            out[m] = out.get(m, 0) + 1
        return out


def bootstrap_objective(fit: ObjectiveFit, points: pd.DataFrame, samples: dict[tuple, np.ndarray], *,
                        replicates: int = BOOTSTRAP_REPLICATES, rng: np.random.Generator | None = None,
                        exclude_extrapolated: bool = False, pool_residuals: bool = True) -> ObjectiveBootstrap:
    """Bootstrap replicates of one objective's optima and laws (see :func:`bootstrap_sweep`).

    Args:
        fit: the objective's point-estimate fit (decides, per budget, vertex or fallback).
        points: seed-averaged points (:func:`aggregate_seeds`), any objectives.
        samples: per-run losses of each cell (:func:`cell_samples`).
    """
    rng = rng if rng is not None else np.random.default_rng(BOOTSTRAP_SEED)
    mine = points[points["objective"] == fit.objective]
    budgets, _, _ = fit.optima(exclude_extrapolated)
    sources = fit.sources(exclude_extrapolated)
    slices = {}  # budget -> (N, seed-mean loss, per-run losses of each cell)
    for c, group in mine.groupby("budget", sort=True):
        cells = [samples[key] for key in zip(*(group[k] for k in CELL_KEYS))]
        slices[float(c)] = (group["n_nonemb"].to_numpy(dtype=float), group["loss"].to_numpy(dtype=float), cells)
    pooled = _pooled_seed_std([cell for _, _, cells in slices.values() for cell in cells])
    residual_pool = None
    if pooled is None and pool_residuals:
        residual_pool = np.concatenate([np.empty(0)] + [_scaled_residuals(n, y, fit.parabolas.get(c))
                                                        for c, (n, y, _) in slices.items()])
    shape = (replicates, budgets.size)
    n_opt, loss_opt = np.full(shape, np.nan), np.full(shape, np.nan)
    failed, fallback = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    methods = []
    for j, c in enumerate(budgets):
        n, y, cells = slices[float(c)]
        reps, method = _replicate_slice(cells, n, y, fit.parabolas.get(float(c)), pooled, residual_pool, replicates,
                                        rng)
        methods.append(method)
        best = reps.argmin(axis=1)  # the estimator's fallback: the replicate's best measured size
        n_best, l_best = n[best], reps[np.arange(replicates), best]
        bracketed = np.zeros(replicates, dtype=bool)
        x_opt = l_opt = np.zeros(replicates)
        x = np.log(n)
        if np.unique(x).size >= MIN_SIZES:
            z = x - x.mean()  # centred for conditioning
            coef = reps @ np.linalg.pinv(np.stack([z**2, z, np.ones_like(z)], axis=1)).T
            a, b, c0 = coef[:, 0], coef[:, 1], coef[:, 2]
            with np.errstate(all="ignore"):
                x_opt, l_opt = x.mean() - b / (2 * a), c0 - b * b / (4 * a)
                bracketed = ((a > 0) & (x_opt > x.min() + BRACKET_TOL) & (x_opt < x.max() - BRACKET_TOL)
                             & (l_opt > 0))
        n_opt[:, j] = np.where(bracketed, np.exp(np.where(bracketed, x_opt, 0.0)), n_best)
        loss_opt[:, j] = np.where(bracketed, l_opt, l_best)
        fallback[:, j] = ~bracketed
        failed[:, j] = ~(loss_opt[:, j] > 0)
    ok = ~failed.any(axis=1)
    n_slope, n_icpt = _batch_power_law(budgets, np.where(ok[:, None], n_opt, np.nan))
    l_slope, l_icpt = _batch_power_law(budgets, np.where(ok[:, None], loss_opt, np.nan))
    return ObjectiveBootstrap(fit.objective, budgets, sources, methods, n_opt, loss_opt, failed, fallback,
                              n_slope, n_icpt, l_slope, l_icpt)


def compare_bootstrap(reference: ObjectiveBootstrap, candidate: ObjectiveBootstrap) -> ComparisonBootstrap:
    """Exponent differences and multipliers at every reference budget, replicate by replicate
    (the same formulas as :func:`compute_multiplier` and :func:`match_compute`)."""
    ok = reference.ok & candidate.ok
    delta_a = candidate.n_exponent - reference.n_exponent
    delta_b = reference.loss_exponent - candidate.loss_exponent  # b = -exponent
    c = reference.budgets
    r = ok.size
    parametric = np.full((r, c.size), np.nan)
    nonparametric = np.full((r, c.size), np.nan)
    e_r, la_r = reference.loss_exponent[:, None], reference.loss_log_prefactor[:, None]
    e_c, la_c = candidate.loss_exponent[:, None], candidate.loss_log_prefactor[:, None]
    with np.errstate(all="ignore"):
        if c.size:
            k = np.exp((la_r + e_r * np.log(c) - la_c) / e_c - np.log(c))
            laws = np.isfinite(e_r) & np.isfinite(e_c)
            parametric = np.where(laws & ~(e_c < 0), np.inf, np.where(laws, k, np.nan))
        if c.size and candidate.budgets.size:
            slopes = candidate.loss_exponent
            for j, budget in enumerate(c):
                c_prime = match_compute_batch(reference.loss_opt[:, j], candidate.budgets, candidate.loss_opt, slopes)
                nonparametric[:, j] = np.where(np.isnan(c_prime), np.inf, c_prime / budget)
    parametric[~ok], nonparametric[~ok] = np.nan, np.nan
    return ComparisonBootstrap(candidate.objective, reference.objective, c, ok, delta_a, delta_b, parametric,
                               nonparametric)


def bootstrap_sweep(fits: dict[str, ObjectiveFit], points: pd.DataFrame, samples: dict[tuple, np.ndarray], *,
                    reference: str = DEFAULT_REFERENCE, replicates: int = BOOTSTRAP_REPLICATES,
                    seed: int = BOOTSTRAP_SEED, exclude_extrapolated: bool = False,
                    pool_residuals: bool = True) -> SweepBootstrap:
    """Percentile-bootstrap the whole pipeline: slices -> vertices -> power laws -> multipliers.

    Resampling, per (objective, budget) slice, cell by cell (a cell is one (size, budget)):

    * cells with >= 2 seeds: the seeds are resampled with replacement (nonparametric
      bootstrap over runs); their deviations from the cell mean are inflated by
      ``sqrt(n / (n - 1))`` so that the bootstrap variance of the mean is the unbiased
      ``s^2 / n`` (the plain bootstrap would shrink it by ``(n - 1) / n``: half with 2 seeds);
    * single-seed cells, when the objective has a pooled seed std (from its cells with >= 2
      seeds; pooled per objective because the noise differs, e.g. Monte-Carlo ELBOs): the
      loss plus Gaussian noise with that std;
    * otherwise (one seed everywhere): a residual bootstrap of the slice's parabola, fitted
      values plus residuals resampled with replacement, scaled by ``sqrt(m / (m - 3))`` for
      the 3 fitted parameters (needs >= 4 sizes; with 3 the slice is not resampled: no noise
      estimate, reported as ``"none"``).

    Each replicate then goes through the point estimate's own pipeline, the same estimator on
    resampled data: per budget the refitted parabola's vertex where it is bracketed, else the
    replicate's best measured size (so no replicate is dropped and N_opt stays within what was
    measured; how often the bracket held is reported per budget); power laws by OLS per
    objective; exponent differences and both multipliers against the reference.
    Everything is vectorised over replicates (numpy); the generator is seeded, so the same
    data give the same intervals.
    """
    rng = np.random.default_rng(seed)
    objectives = {obj: bootstrap_objective(fit, points, samples, replicates=replicates, rng=rng,
                                           exclude_extrapolated=exclude_extrapolated, pool_residuals=pool_residuals)
                  for obj, fit in fits.items()}
    comparisons = {}
    if reference in objectives:
        comparisons = {obj: compare_bootstrap(objectives[reference], boot) for obj, boot in objectives.items()
                       if obj != reference}
    return SweepBootstrap(replicates, seed, objectives, comparisons)
