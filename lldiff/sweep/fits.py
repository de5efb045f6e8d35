"""Scaling-law fits of an iso-FLOP sweep (SMDM; Chinchilla approach 2): iso-FLOP parabolas,
power laws, compute multipliers, and everything fitted for one objective.

Pure functions on numbers and data frames of seed-averaged points: no files, no plotting.
The conventions (fixed here, used everywhere in ``lldiff.sweep``):

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

#: fewest distinct sizes for an iso-FLOP parabola, fewest budgets for each law.
MIN_SIZES, MIN_BUDGETS_POWER, MIN_BUDGETS_SATURATING = 3, 2, 4
#: how far (in ln N) a vertex must be from a measured size to count as strictly beyond it.
BRACKET_TOL = 1e-9
#: the columns of a (seed-averaged) point: one cell of the sweep.
CELL_KEYS = ["objective", "size", "n_nonemb", "budget"]

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
    r2: float = math.nan  # goodness of fit: 1 - SS_res / SS_tot over the fitted points (NaN: all losses equal)
    rms_residual: float = math.nan  # sqrt(SS_res / points), in the loss's unit
    dof: int = 0  # residual degrees of freedom: points - 3 (0: the parabola passes through every point)

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
    x = np.log(n_arr)
    ss_res = float(np.sum((y - (a * x**2 + b * x + c)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    quality = {"r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
               "rms_residual": math.sqrt(ss_res / y.size), "dof": int(y.size - 3)}
    if a <= 0:
        return Parabola((a, b, c), math.nan, math.nan, n_min, n_max, distinct, budget, opens_downward=True,
                        warning=f"{_budget_name(budget)}: parabola opens downward (a={a:.3g}); no minimum",
                        sizes=sizes, **quality)
    x_opt = -b / (2 * a)
    n_opt, loss_opt = (math.exp(x_opt) if x_opt < 700 else math.inf), c - b * b / (4 * a)  # flat: far vertex
    extrapolated = not (n_min <= n_opt <= n_max)
    parabola = Parabola((a, b, c), n_opt, loss_opt, n_min, n_max, distinct, budget, extrapolated=extrapolated,
                        sizes=sizes, **quality)
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
