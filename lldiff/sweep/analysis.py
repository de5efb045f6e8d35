"""Scaling-law fits for an iso-FLOP sweep of several objectives (SMDM; Chinchilla approach 2).

Pure functions on numbers and data frames: no files, no plotting.

Conventions (fixed here, used everywhere in ``lldiff.sweep``):

* **Objectives** are a list of names (``"ar"``, ``"mdm"``, ``"bd3-4"``, ...) with one
  *reference* (default ``"ar"``); every other objective is compared with the reference.
  Nothing in this module depends on a particular name other than that default.
* **Compute** is the planned ``budget`` of a run, on the axis named by the ``compute``
  column of ``results.csv``: ``"6nd"`` (SMDM's ``C = 6 * N * D``, ``N`` non-embedding
  parameters, ``D`` tokens; the default, also for files without that column) or
  ``"matmul"`` (real forward+backward matmul FLOPs including the LM head and attention).
  Losses are validation nats per token (``val_nll_per_token``: exact NLL for AR, a
  Monte-Carlo negative ELBO, an upper bound on the NLL, for diffusion objectives).
* **Iso-FLOP parabola**: for one budget, ``loss = a x^2 + b x + c`` with ``x = ln N``
  (natural log), least squares on the seed-averaged loss of each size. Its vertex gives
  ``N_opt = exp(-b / 2a)`` and ``L_opt = c - b^2 / 4a``. The vertex is **bracketed** when
  the parabola opens upward (``a > 0``), the vertex lies strictly inside the sampled
  ``(N_min, N_max)`` and at least one measured size lies strictly below and one strictly
  above it (strictly: by more than ``BRACKET_TOL`` in ``ln N``, so that float noise of a
  vertex sitting on a measured edge does not count as inside). An unbracketed budget falls
  back to its best measured size (the compute frontier, Chinchilla approach 1).
* **Power laws** ``y = A * C^a`` are fitted by ordinary least squares in log-log space
  (``ln y = ln A + a ln C``). For the loss the exponent is negative: ``L_opt = A * C^-b``
  with ``b = -a``. Optionally ``L_opt = E + A * C^-b`` by non-linear least squares.
* **Compute multiplier** ``k(C)``: the factor such that the candidate objective trained
  with ``k * C`` reaches the loss the reference reaches with ``C``. See
  :func:`compute_multiplier` and :func:`nonparametric_multipliers`.
* **Bootstrap** (:func:`bootstrap_sweep`): percentile 95% intervals that propagate the
  noise of every per-budget fit through vertices, power laws and multipliers; see there
  for the resampling scheme.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import pandas as pd
from scipy import optimize, stats

log = logging.getLogger(__name__)

#: columns ``results.csv`` must have for the analysis (others are carried along).
REQUIRED_COLUMNS: tuple[str, ...] = ("run_id", "objective", "size", "n_nonemb", "budget", "val_nll_per_token")
#: numeric columns averaged over seeds when present.
CARRIED_NUMERIC: tuple[str, ...] = ("tokens", "flops", "flops_6nd", "flops_matmul", "max_steps", "val_bpb",
                                    "wall_time_s")
#: the objective every other one is compared with unless told otherwise.
DEFAULT_REFERENCE = "ar"
#: compute axes (the ``compute`` column of results.csv) and how to name them.
COMPUTE_AXES = {"6nd": "C = 6·N·D (SMDM)",
                "matmul": "real matmul FLOPs (forward+backward, incl. LM head and attention)"}
DEFAULT_COMPUTE = "6nd"
#: fewest distinct sizes for an iso-FLOP parabola, fewest budgets for each law.
MIN_SIZES, MIN_BUDGETS_POWER, MIN_BUDGETS_SATURATING = 3, 2, 4
#: how far (in ln N) a vertex must be from a measured size to count as strictly beyond it.
BRACKET_TOL = 1e-9
#: bootstrap defaults: replicates and generator seed (a fixed seed: the report is reproducible).
BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED = 1000, 0

ArrayLike = Sequence[float] | np.ndarray


# --------------------------------------------------------------------------- parabola


@dataclass(frozen=True)
class Parabola:
    """``loss = a (ln N)^2 + b ln N + c`` fitted on one iso-FLOP slice.

    ``n_opt``/``loss_opt`` are the vertex when the parabola opens upward (``a > 0``); when it
    does not they are NaN. ``extrapolated`` is set when the vertex lies outside the sampled
    ``[n_min, n_max]``; :attr:`bracketed` is the stricter test that decides whether the
    vertex is used. ``sizes`` are the distinct measured N. ``warning`` says what is wrong in
    words (None when nothing is).
    """

    coef: tuple[float, float, float]
    n_opt: float
    loss_opt: float
    n_min: float
    n_max: float
    n_sizes: int
    budget: float | None = None
    opens_downward: bool = False
    extrapolated: bool = False
    warning: str | None = None
    sizes: tuple[float, ...] = ()

    @property
    def usable(self) -> bool:
        """True when the vertex is a finite minimum with a positive loss (it may still be
        extrapolated)."""
        return not self.opens_downward and math.isfinite(self.n_opt) and self.loss_opt > 0

    @property
    def bracketed(self) -> bool:
        """The vertex is a minimum (``a > 0``) strictly inside ``(n_min, n_max)`` with at least
        one measured size strictly below and one strictly above it (beyond ``BRACKET_TOL`` in
        ``ln N``). Only bracketed vertices are used as a budget's optimum."""
        if self.coef[0] <= 0 or not self.usable:
            return False
        x_opt = math.log(self.n_opt)
        if not (math.log(self.n_min) + BRACKET_TOL < x_opt < math.log(self.n_max) - BRACKET_TOL):
            return False
        x = np.log(np.asarray(self.sizes or (self.n_min, self.n_max), dtype=float))
        return bool(np.any(x < x_opt - BRACKET_TOL) and np.any(x > x_opt + BRACKET_TOL))

    def __call__(self, n: ArrayLike | float) -> np.ndarray:
        x = np.log(np.asarray(n, dtype=float))
        a, b, c = self.coef
        return a * x**2 + b * x + c


def _budget_name(budget: float | None) -> str:
    return "budget ?" if budget is None else f"budget C={budget:.3g}"


def fit_isoflop_parabola(n: ArrayLike, loss: ArrayLike, *, budget: float | None = None) -> Parabola:
    """Least-squares parabola of ``loss`` against ``ln n`` for one compute budget.

    Args:
        n: non-embedding parameter counts (raw, not logged; repeats allowed, e.g. seeds).
        loss: the loss of each point.
        budget: the budget's C, only used in messages and stored on the result.

    Raises:
        ValueError: fewer than 3 distinct sizes, mismatched lengths, or non-finite/non-positive N.
    """
    n_arr, y = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if n_arr.shape != y.shape or n_arr.ndim != 1:
        raise ValueError(f"{_budget_name(budget)}: n and loss must be 1-D of equal length, "
                         f"got {n_arr.shape} and {y.shape}")
    if not (np.all(np.isfinite(n_arr)) and np.all(n_arr > 0) and np.all(np.isfinite(y))):
        raise ValueError(f"{_budget_name(budget)}: N must be finite and positive and losses finite")
    sizes = tuple(float(v) for v in np.unique(n_arr))
    distinct = len(sizes)
    if distinct < MIN_SIZES:
        raise ValueError(
            f"{_budget_name(budget)}: an iso-FLOP parabola needs >= {MIN_SIZES} distinct model sizes, got {distinct}"
        )
    a, b, c = (float(v) for v in np.polyfit(np.log(n_arr), y, 2))
    n_min, n_max = float(n_arr.min()), float(n_arr.max())
    if a <= 0:
        return Parabola((a, b, c), math.nan, math.nan, n_min, n_max, distinct, budget, opens_downward=True,
                        warning=f"{_budget_name(budget)}: parabola opens downward (a={a:.3g}); no minimum",
                        sizes=sizes)
    x_opt = -b / (2 * a)
    n_opt, loss_opt = (math.exp(x_opt) if x_opt < 700 else math.inf), c - b * b / (4 * a)  # flat: far vertex
    extrapolated = not (n_min <= n_opt <= n_max)
    parabola = Parabola((a, b, c), n_opt, loss_opt, n_min, n_max, distinct, budget, extrapolated=extrapolated,
                        sizes=sizes)
    if extrapolated:
        warning = (f"{_budget_name(budget)}: minimum N={n_opt:.3g} lies outside the sampled range "
                   f"[{n_min:.3g}, {n_max:.3g}] (extrapolated)")
    elif not parabola.bracketed:
        warning = f"{_budget_name(budget)}: minimum N={n_opt:.3g} lies on the edge of the sampled range (not bracketed)"
    else:
        warning = None
    return replace(parabola, warning=warning)


# --------------------------------------------------------------------------- power laws


class LossLaw(Protocol):
    """A fitted L(C) that can be inverted: C(L)."""

    def __call__(self, c: ArrayLike | float) -> np.ndarray: ...

    def inverse(self, loss: ArrayLike | float) -> np.ndarray: ...


@dataclass(frozen=True)
class PowerLaw:
    """``y = prefactor * x ** exponent``, fitted in log-log space.

    Uncertainties are NaN (and ``note`` says why) when the fit has no residual degrees of
    freedom (2 points: the line passes exactly through them). ``prefactor_ci95`` comes from
    the interval of ``ln A``; it is wide because ``A`` is the value at ``x = 1``.
    """

    prefactor: float
    exponent: float
    exponent_se: float
    log_prefactor_se: float
    exponent_ci95: tuple[float, float]
    prefactor_ci95: tuple[float, float]
    n_points: int
    r_squared: float
    x_range: tuple[float, float]
    note: str | None = None

    def __call__(self, x: ArrayLike | float) -> np.ndarray:
        return self.prefactor * np.asarray(x, dtype=float) ** self.exponent

    def inverse(self, y: ArrayLike | float) -> np.ndarray:
        """The x at which the law equals y: ``(y / A) ** (1 / a)`` (NaN for a flat law)."""
        y_arr = np.asarray(y, dtype=float)
        if self.exponent == 0:
            return np.full_like(y_arr, np.nan)
        return (y_arr / self.prefactor) ** (1.0 / self.exponent)


def _positive_pairs(x: ArrayLike, y: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"{what}: x and y must be 1-D of equal length, got {xa.shape} and {ya.shape}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya)) and np.all(xa > 0) and np.all(ya > 0)):
        raise ValueError(f"{what}: x and y must be finite and positive")
    return xa, ya


def fit_power_law(x: ArrayLike, y: ArrayLike) -> PowerLaw:
    """OLS of ``ln y = ln A + a ln x``: standard errors and t-based 95% intervals.

    Raises:
        ValueError: fewer than 2 distinct x, or non-positive / non-finite values.
    """
    xa, ya = _positive_pairs(x, y, "power law")
    if np.unique(xa).size < MIN_BUDGETS_POWER:
        raise ValueError(f"power law: needs >= {MIN_BUDGETS_POWER} distinct x values, got {np.unique(xa).size}")
    u, v = np.log(xa), np.log(ya)
    slope, intercept = (float(t) for t in np.polyfit(u, v, 1))
    residual = v - (intercept + slope * u)
    total = float(np.sum((v - v.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0
    dof = xa.size - 2
    if dof < 1:
        nan2 = (math.nan, math.nan)
        return PowerLaw(math.exp(intercept), slope, math.nan, math.nan, nan2, nan2, int(xa.size), r2,
                        (float(xa.min()), float(xa.max())),
                        note="exact fit through 2 points: uncertainty undefined")
    s2 = float(np.sum(residual**2)) / dof
    sxx = float(np.sum((u - u.mean()) ** 2))
    se_slope = math.sqrt(s2 / sxx)
    se_intercept = math.sqrt(s2 * (1.0 / xa.size + u.mean() ** 2 / sxx))
    t = float(stats.t.ppf(0.975, dof))
    return PowerLaw(
        prefactor=math.exp(intercept), exponent=slope, exponent_se=se_slope, log_prefactor_se=se_intercept,
        exponent_ci95=(slope - t * se_slope, slope + t * se_slope),
        prefactor_ci95=(math.exp(intercept - t * se_intercept), math.exp(intercept + t * se_intercept)),
        n_points=int(xa.size), r_squared=r2, x_range=(float(xa.min()), float(xa.max())),
        note=f"only {dof} residual degree(s) of freedom: wide intervals" if dof < 3 else None,
    )


@dataclass(frozen=True)
class SaturatingPowerLaw:
    """``L = irreducible + prefactor * C ** -decay`` (non-linear least squares).

    Standard errors come from the covariance ``scipy.optimize.curve_fit`` returns (NaN when
    it cannot estimate one). ``inverse`` is infinite for losses at or below ``irreducible``.
    """

    irreducible: float
    prefactor: float
    decay: float
    irreducible_se: float
    prefactor_se: float
    decay_se: float
    n_points: int
    note: str | None = None

    def __call__(self, c: ArrayLike | float) -> np.ndarray:
        return self.irreducible + self.prefactor * np.asarray(c, dtype=float) ** -self.decay

    def inverse(self, loss: ArrayLike | float) -> np.ndarray:
        excess = np.asarray(loss, dtype=float) - self.irreducible
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(excess > 0, (np.maximum(excess, 1e-300) / self.prefactor) ** (-1.0 / self.decay), np.inf)


def fit_saturating_power_law(c: ArrayLike, loss: ArrayLike) -> SaturatingPowerLaw:
    """Fit ``L = E + A C^-b`` with ``0 <= E < min(L)`` and ``0 < b <= 5``.

    Parametrised as ``E + exp(alpha) * (C / C_ref) ** -b`` with ``C_ref`` the geometric mean
    budget (well conditioned); ``A = exp(alpha) * C_ref ** b``.

    Raises:
        ValueError: fewer than 4 distinct budgets (3 parameters plus one degree of freedom).
        RuntimeError: the optimiser did not converge.
    """
    ca, la = _positive_pairs(c, loss, "saturating power law")
    if np.unique(ca).size < MIN_BUDGETS_SATURATING:
        raise ValueError(f"saturating power law: needs >= {MIN_BUDGETS_SATURATING} distinct budgets, "
                         f"got {np.unique(ca).size}")
    log_ref = float(np.mean(np.log(ca)))
    z = np.log(ca) - log_ref

    def model(z_: np.ndarray, e: float, alpha: float, b: float) -> np.ndarray:
        return e + np.exp(alpha - b * z_)

    e_hi = float(la.min()) * (1 - 1e-9)
    slope = np.polyfit(z, np.log(la - 0.5 * la.min()), 1)[0]
    p0 = (0.5 * float(la.min()), float(np.log(la.mean() - 0.5 * la.min())), float(np.clip(-slope, 1e-3, 4.9)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        params, cov = optimize.curve_fit(model, z, la, p0=p0, bounds=([0.0, -np.inf, 1e-6], [e_hi, np.inf, 5.0]),
                                         maxfev=20_000)
    e, alpha, b = (float(p) for p in params)
    var = np.diag(cov) if np.all(np.isfinite(cov)) else np.full(3, np.nan)
    log_a = alpha + b * log_ref
    var_log_a = var[1] + log_ref**2 * var[2] + 2 * log_ref * (cov[1, 2] if np.all(np.isfinite(cov)) else np.nan)
    notes = []
    if e >= e_hi * (1 - 1e-6) or e <= 1e-9:
        notes.append(f"E at its bound ({e:.4g}): the data do not constrain the irreducible loss")
    if ca.size - 3 < 2:
        notes.append(f"only {ca.size - 3} residual degree(s) of freedom")
    return SaturatingPowerLaw(
        irreducible=e, prefactor=math.exp(log_a), decay=b,
        irreducible_se=_sqrt_or_nan(var[0]), prefactor_se=math.exp(log_a) * _sqrt_or_nan(var_log_a),
        decay_se=_sqrt_or_nan(var[2]), n_points=int(ca.size), note="; ".join(notes) or None,
    )


def _sqrt_or_nan(v: float) -> float:
    return math.sqrt(v) if np.isfinite(v) and v >= 0 else math.nan


# --------------------------------------------------------------------------- multiplier


def compute_multiplier(reference_law: LossLaw, candidate_law: LossLaw, c: float) -> float:
    """``k = C' / C`` where ``candidate_law(C') = reference_law(C)``: the candidate needs ``k``
    times the reference's compute.

    For pure power laws ``L = A C^-b`` (``PowerLaw`` with exponent ``-b``), solving
    ``A_cand C'^-b_cand = A_ref C^-b_ref`` gives exactly

        ``C' = (A_cand / A_ref * C^b_ref) ** (1 / b_cand)``,  ``k = C' / C``,

    which is independent of C when ``b_cand = b_ref = b``: ``k = (A_cand / A_ref) ** (1 / b)``.
    With an irreducible term the same definition is solved through ``candidate_law.inverse``;
    ``k`` is ``inf`` when the reference's loss is below the candidate's irreducible loss (never
    reached), and NaN when undefined (e.g. a non-decreasing fitted law).
    """
    if isinstance(candidate_law, PowerLaw) and candidate_law.exponent >= 0:
        return math.nan  # the candidate's fitted loss does not decrease with compute
    with np.errstate(all="ignore"):
        c_prime = float(candidate_law.inverse(reference_law(c)))
    return c_prime / c if not math.isnan(c_prime) else math.nan


@dataclass(frozen=True)
class MatchedCompute:
    """Where the candidate reaches one reference loss: compute ``c_prime`` and how it was found."""

    c_prime: float
    method: str  # "interpolated", "extrapolated" or "unreachable"


def match_compute(target: float, budgets: ArrayLike, losses: ArrayLike, slope: float | None) -> MatchedCompute:
    """The compute at which a measured L_opt(C) curve reaches ``target``.

    Piecewise-linear interpolation in (ln C, ln L) between measured budgets (the first
    crossing in increasing C). Outside the measured losses, extrapolate from the nearest end
    point along a line of log-log ``slope`` (the fitted law's exponent, negative); without a
    usable slope (None or >= 0) the target is ``unreachable`` (NaN).
    """
    c_arr, l_arr = np.asarray(budgets, dtype=float), np.asarray(losses, dtype=float)
    order = np.argsort(c_arr)
    u, v, t = np.log(c_arr[order]), np.log(l_arr[order]), math.log(target)
    for i in range(len(u) - 1):
        lo, hi = sorted((v[i], v[i + 1]))
        if lo <= t <= hi and v[i] != v[i + 1]:
            frac = (t - v[i]) / (v[i + 1] - v[i])
            return MatchedCompute(math.exp(u[i] + frac * (u[i + 1] - u[i])), "interpolated")
    if len(u) == 1 and t == v[0]:
        return MatchedCompute(math.exp(u[0]), "interpolated")
    if slope is None or not slope < 0 or len(u) == 0:
        return MatchedCompute(math.nan, "unreachable")
    end = 0 if t > v[0] else len(u) - 1  # above the first loss: fewer FLOPs than measured
    return MatchedCompute(math.exp(u[end] + (t - v[end]) / slope), "extrapolated")


def match_compute_batch(targets: np.ndarray, budgets: np.ndarray, losses: np.ndarray,
                        slopes: np.ndarray) -> np.ndarray:
    """:func:`match_compute` vectorised over replicates: ``targets`` (R,), ``losses`` (R, B)
    on the fixed increasing ``budgets`` (B,), ``slopes`` (R,) (NaN: no law). Returns C' (R,),
    NaN where unreachable."""
    u = np.log(np.asarray(budgets, dtype=float))
    with np.errstate(all="ignore"):
        t, v = np.log(targets), np.log(losses)
        out = np.full(t.shape, np.nan)
        found = np.zeros(t.shape, dtype=bool)
        for i in range(u.size - 1):
            a, b = v[:, i], v[:, i + 1]
            hit = ~found & (np.minimum(a, b) <= t) & (t <= np.maximum(a, b)) & (a != b)
            out = np.where(hit, u[i] + (t - a) / (b - a) * (u[i + 1] - u[i]), out)
            found |= hit
        if u.size == 1:
            hit = ~found & (t == v[:, 0])
            out, found = np.where(hit, u[0], out), found | hit
        end = np.where(t > v[:, 0], 0, u.size - 1)
        v_end = np.take_along_axis(v, end[:, None], axis=1)[:, 0]
        extrapolated = u[end] + (t - v_end) / slopes
        out = np.where(~found & (slopes < 0), extrapolated, out)
        return np.exp(out)


@dataclass(frozen=True)
class MultiplierRow:
    """The compute multiplier of ``candidate`` vs ``reference`` at one measured reference budget.

    The ``*_ci95`` intervals are bootstrap percentile intervals (NaN without a bootstrap);
    an upper end of ``inf`` means that more than 2.5% of the replicates never reach the loss.
    """

    candidate: str
    reference: str
    budget: float
    reference_loss_opt: float
    parametric: float  # compute_multiplier on the fitted pure power laws
    nonparametric: float  # match_compute on the candidate's measured L_opt(C), / budget
    candidate_compute: float  # the C' of the non-parametric estimate
    method: str
    parametric_ci95: tuple[float, float] = (math.nan, math.nan)
    nonparametric_ci95: tuple[float, float] = (math.nan, math.nan)


def nonparametric_multipliers(reference_budgets: ArrayLike, reference_losses: ArrayLike,
                              candidate_budgets: ArrayLike, candidate_losses: ArrayLike,
                              candidate_slope: float | None) -> list[MatchedCompute]:
    """:func:`match_compute` for every reference (budget, L_opt) against the candidate's
    measured optima."""
    return [match_compute(float(loss), candidate_budgets, candidate_losses, candidate_slope)
            for loss in np.asarray(reference_losses, float)]


# --------------------------------------------------------------------------- data frames


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


CELL_KEYS = ["objective", "size", "n_nonemb", "budget"]


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
class ObjectiveFit:
    """Everything fitted for one objective."""

    objective: str
    parabolas: dict[float, Parabola] = field(default_factory=dict)
    skipped: dict[float, str] = field(default_factory=dict)  # budget -> why no parabola
    frontier: dict[float, tuple[float, float]] = field(default_factory=dict)  # budget -> best measured (N, L)
    n_opt_law: PowerLaw | None = None
    loss_law: PowerLaw | None = None
    loss_law_saturating: SaturatingPowerLaw | None = None
    notes: list[str] = field(default_factory=list)  # why a law is missing, fit caveats

    @property
    def budgets(self) -> list[float]:
        """Every budget with runs, increasing."""
        return sorted(set(self.parabolas) | set(self.frontier) | set(self.skipped))

    def bracketed(self, budget: float) -> bool:
        """Whether ``budget`` has a bracketed parabola vertex (see :attr:`Parabola.bracketed`)."""
        parabola = self.parabolas.get(budget)
        return parabola is not None and parabola.bracketed

    @property
    def unbracketed(self) -> list[float]:
        """The budgets whose optimum is not a bracketed vertex (a fallback or nothing)."""
        return [c for c in self.budgets if not self.bracketed(c)]

    def optimum(self, budget: float, exclude_extrapolated: bool = False) -> tuple[float, float, str] | None:
        """(N_opt, L_opt, source) at ``budget``: the parabola's vertex when it is bracketed
        (``"parabola"``); otherwise the best measured size, the compute frontier
        (``"frontier"``, Chinchilla approach 1), unless ``exclude_extrapolated``, which drops
        such budgets instead."""
        parabola = self.parabolas.get(budget)
        if parabola is not None and parabola.bracketed:
            return parabola.n_opt, parabola.loss_opt, "parabola"
        if exclude_extrapolated or budget not in self.frontier:
            return None
        n_best, loss_best = self.frontier[budget]
        return n_best, loss_best, "frontier"

    def optima(self, exclude_extrapolated: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(budgets, N_opt, L_opt) by increasing budget (see :meth:`optimum`)."""
        budgets = sorted(set(self.parabolas) | set(self.frontier))
        rows = [(c, *found[:2]) for c in budgets if (found := self.optimum(c, exclude_extrapolated))]
        arr = np.asarray(rows, dtype=float).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2]

    def sources(self, exclude_extrapolated: bool = False) -> list[str]:
        """"parabola" or "frontier" for each budget of :meth:`optima`."""
        budgets = sorted(set(self.parabolas) | set(self.frontier))
        return [found[2] for c in budgets if (found := self.optimum(c, exclude_extrapolated))]


def fit_parabolas(points: pd.DataFrame, objective: str, strict: bool = False) -> ObjectiveFit:
    """An iso-FLOP parabola per budget of one objective (budgets with < 3 sizes are skipped
    with the reason, or raise when ``strict``)."""
    fit = ObjectiveFit(objective)
    for budget, group in points[points["objective"] == objective].groupby("budget", sort=True):
        best = group.loc[group["loss"].idxmin()]
        fit.frontier[float(budget)] = (float(best["n_nonemb"]), float(best["loss"]))
        try:
            parabola = fit_isoflop_parabola(group["n_nonemb"], group["loss"], budget=float(budget))
        except ValueError as err:
            if strict:
                raise ValueError(f"{objective}: {err}") from err
            fit.skipped[float(budget)] = str(err)
            log.warning("%s: %s", objective, err)
            continue
        if parabola.warning:
            log.warning("%s: %s", objective, parabola.warning)
        fit.parabolas[float(budget)] = parabola
    return fit


LAW_NAMES = {"n_opt_law": "N_opt = A C^a", "loss_law": "L_opt = A C^-b", "loss_law_saturating": "L_opt = E + A C^-b"}


def fit_laws(fit: ObjectiveFit, exclude_extrapolated: bool = False) -> ObjectiveFit:
    """Fill ``fit``'s N_opt(C), L_opt(C) and saturating laws from its per-budget optima; a law
    that cannot be fitted is left None with the reason in ``fit.notes``."""
    budgets, n_opt, loss_opt = fit.optima(exclude_extrapolated)
    which = "with a bracketed minimum" if exclude_extrapolated else "with an optimum"
    laws = {"n_opt_law": (fit_power_law, n_opt, MIN_BUDGETS_POWER),
            "loss_law": (fit_power_law, loss_opt, MIN_BUDGETS_POWER),
            "loss_law_saturating": (fit_saturating_power_law, loss_opt, MIN_BUDGETS_SATURATING)}
    for name, (fitter, values, needed) in laws.items():
        label = LAW_NAMES[name]
        if budgets.size < needed:
            fit.notes.append(f"{label}: not fitted, needs >= {needed} budgets {which}, "
                             f"got {budgets.size}")
            continue
        try:
            setattr(fit, name, fitter(budgets, values))
        except (ValueError, RuntimeError) as err:
            fit.notes.append(f"{label}: not fitted ({err})")
            continue
        note = getattr(fit, name).note
        if note:
            fit.notes.append(f"{label}: {note}")
    return fit


def multiplier_table(reference: ObjectiveFit, candidate: ObjectiveFit,
                     exclude_extrapolated: bool = False) -> list[MultiplierRow]:
    """Parametric and non-parametric multipliers of ``candidate`` at every usable reference
    budget (no intervals; :func:`analyze_results` adds the bootstrap's)."""
    ref_budgets, _, ref_losses = reference.optima(exclude_extrapolated)
    cand_budgets, _, cand_losses = candidate.optima(exclude_extrapolated)
    slope = candidate.loss_law.exponent if candidate.loss_law is not None else None
    matched = nonparametric_multipliers(ref_budgets, ref_losses, cand_budgets, cand_losses, slope)
    rows = []
    for c, loss, m in zip(ref_budgets, ref_losses, matched):
        parametric = (compute_multiplier(reference.loss_law, candidate.loss_law, float(c))
                      if reference.loss_law is not None and candidate.loss_law is not None else math.nan)
        rows.append(MultiplierRow(candidate.objective, reference.objective, float(c), float(loss), parametric,
                                  m.c_prime / float(c), m.c_prime, m.method))
    return rows


# --------------------------------------------------------------------------- bootstrap


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
    :meth:`ObjectiveFit.optima`). ``failed[r, j]``: in replicate ``r`` the parabola of a budget
    whose optimum is a bracketed vertex did not give a finite positive minimum (opened
    downward or was flat); such replicates are left out of every interval that needs that
    budget and counted in :attr:`failed_fraction`. ``outside[r, j]``: the replicate's vertex
    left the sampled sizes (kept: the estimator of that budget is its vertex).
    """

    objective: str
    budgets: np.ndarray
    sources: list[str]
    methods: list[str]
    n_opt: np.ndarray
    loss_opt: np.ndarray
    failed: np.ndarray
    outside: np.ndarray
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

    @property
    def outside_fraction(self) -> float:
        """Fraction of replicates in which some bracketed vertex left the sampled sizes."""
        return float(self.outside.any(axis=1).mean()) if self.replicates else math.nan

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
    failed, outside = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    methods = []
    for j, (c, source) in enumerate(zip(budgets, sources)):
        n, y, cells = slices[float(c)]
        reps, method = _replicate_slice(cells, n, y, fit.parabolas.get(float(c)), pooled, residual_pool, replicates,
                                        rng)
        methods.append(method)
        if source == "parabola":
            x = np.log(n)
            z = x - x.mean()  # centred for conditioning
            coef = reps @ np.linalg.pinv(np.stack([z**2, z, np.ones_like(z)], axis=1)).T
            a, b, c0 = coef[:, 0], coef[:, 1], coef[:, 2]
            with np.errstate(all="ignore"):
                x_opt, l_opt = x.mean() - b / (2 * a), c0 - b * b / (4 * a)
            bad = ~((a > 0) & np.isfinite(x_opt) & (x_opt < 700) & (l_opt > 0))
            n_opt[:, j] = np.where(bad, np.nan, np.exp(np.where(bad, 0.0, x_opt)))
            loss_opt[:, j] = np.where(bad, np.nan, l_opt)
            failed[:, j] = bad
            outside[:, j] = ~bad & ((x_opt <= x.min()) | (x_opt >= x.max()))
        else:  # fallback: the best measured size of the replicate
            best = reps.argmin(axis=1)
            n_opt[:, j] = n[best]
            loss_opt[:, j] = reps[np.arange(replicates), best]
            failed[:, j] = ~(loss_opt[:, j] > 0)
    ok = ~failed.any(axis=1)
    n_slope, n_icpt = _batch_power_law(budgets, np.where(ok[:, None], n_opt, np.nan))
    l_slope, l_icpt = _batch_power_law(budgets, np.where(ok[:, None], loss_opt, np.nan))
    return ObjectiveBootstrap(fit.objective, budgets, sources, methods, n_opt, loss_opt, failed, outside,
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

    Each replicate then goes through the point estimate's pipeline: a budget whose optimum is
    a bracketed vertex is refitted and its vertex taken (kept even if it wanders outside the
    sampled sizes; counted in ``outside``); a fallback budget takes the replicate's best
    measured size; power laws by OLS per objective; exponent differences and both
    multipliers against the reference. A replicate whose refitted parabola has no minimum is
    counted as failed (per objective) and left out of the intervals, never silently.
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


# --------------------------------------------------------------------------- the sweep


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
