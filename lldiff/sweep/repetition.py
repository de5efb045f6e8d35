"""Data-constrained training: the repetition fit of Muennighoff et al. (2023), best epoch, crossover.

Pure functions on numbers: no files, no plotting.

With ``U`` unique tokens trained for ``D`` tokens, i.e. ``E = D / U`` epochs, the *effective
data* is

    ``D'(E) = U + U R* (1 - exp(-(E - 1) / R*))``   (``E >= 1``; ``D' = U E`` for ``E <= 1``)

so repeated tokens are worth less and less, ``R*`` being the number of repetitions over which
their value decays by ``1/e`` ("half-life"); ``D' -> U E`` as ``R* -> inf`` (repeats as good as
fresh data) and ``D' -> U`` as ``R* -> 0`` (repeats worthless). At a fixed model size the loss
is modelled as ``L(E) = L_inf + B / D'(E)^beta`` (:func:`fit_repetition_decay`).

**Interval for R*: profile likelihood**, not a bootstrap. For each ``R*`` the other
parameters are profiled out (``L_inf`` and ``B`` by linear least squares at each ``beta``,
``beta`` by a bounded 1-D search), giving ``RSS(R*)``; the 95% interval is the connected set
around the best ``R*`` where ``RSS(R*) <= RSS_min (1 + F_0.95(1, n - p) / (n - p))`` (the
F-based profile interval for non-linear least squares with unknown noise, ``p`` fitted
parameters). Reasons: a curve has a handful of epochs (8 for E = 1, 2, 4, ..., 128), too few
for a residual bootstrap of a 4-parameter non-linear model, and ``R*`` is often only bounded
(the data fit as well with ``R* -> inf``); the profile evaluates the limits ``R* = 0`` and
``R* = inf`` exactly (``D' = U`` and ``D' = U E``), so "consistent with ``R* -> inf``" is a
test, reported as a lower bound, rather than an artefact of a search range. The search runs
in ``ln R*`` (the loss depends on ``R*`` roughly logarithmically), ``beta`` in
``BETA_BOUNDS`` (> 0) and ``B > 0`` throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ArrayLike = Sequence[float] | np.ndarray

#: search range of the loss exponent (beta > 0) and of R* (beyond: the limits 0 and inf).
BETA_BOUNDS = (1e-3, 4.0)
R_STAR_MIN = 1e-2
R_STAR_SPAN = 1e4  # the grid's top is R_STAR_SPAN times the largest epoch
GRID_POINTS = 161
BETA_GRID_POINTS = 160


def effective_data(epochs: ArrayLike | float, unique_tokens: float, r_star: float) -> np.ndarray:
    """Muennighoff's effective data ``D'(E)`` (tokens) for ``E`` epochs of ``U`` unique tokens.

    ``r_star = inf`` gives ``U E`` (repeats as good as new), ``r_star = 0`` gives ``U`` for
    ``E >= 1``; below one epoch every token is unique and ``D' = U E``.
    """
    e = np.asarray(epochs, dtype=float)
    if r_star == math.inf:
        return unique_tokens * e
    if r_star <= 0:
        return unique_tokens * np.minimum(e, 1.0)
    repeated = unique_tokens + unique_tokens * r_star * -np.expm1(-(np.maximum(e, 1.0) - 1.0) / r_star)
    return np.where(e <= 1.0, unique_tokens * e, repeated)


def interval_kind(interval: tuple[float, float]) -> str:
    """What a 95% interval of R* bounds: ``"interval"`` (both ends finite and the lower one
    positive), ``"lower"`` (only a lower bound: the data are consistent with ``R* -> inf``),
    ``"upper"`` (only an upper bound) or ``"none"`` (also for a NaN interval)."""
    lo, hi = interval
    if math.isnan(lo) or math.isnan(hi):
        return "none"
    if lo > 0:
        return "interval" if math.isfinite(hi) else "lower"
    return "upper" if math.isfinite(hi) else "none"


def interval_notes(lo: float, hi: float) -> list[str]:
    """What an R* interval with an open end means, in words (empty for a two-sided one)."""
    if math.isinf(hi) and lo > 0:
        return [f"consistent with R* -> inf: only a lower bound, R* >= {lo:.3g}"]
    if lo == 0 and math.isfinite(hi):
        return [f"consistent with R* -> 0: only an upper bound, R* <= {hi:.3g}"]
    if lo == 0:
        return ["R* is not constrained by these data"]
    return []


def best_epoch(epochs: ArrayLike, losses: ArrayLike) -> float:
    """The epoch count with the lowest loss (the earliest among equal losses)."""
    e, loss = _pairs(epochs, losses)
    return float(e[int(np.argmin(loss))])


class _RStarInterval:
    """What the 95% interval ``r_star_ci95`` of a fit of R* bounds."""

    r_star_ci95: tuple[float, float]

    @property
    def bounded(self) -> str:
        """``"interval"``, ``"lower"``, ``"upper"`` or ``"none"`` (see :func:`interval_kind`)."""
        return interval_kind(self.r_star_ci95)

    @property
    def only_lower_bound(self) -> bool:
        """The data are consistent with ``R* -> inf``: report ``R* >= r_star_ci95[0]``."""
        return self.bounded == "lower"


@dataclass(frozen=True)
class RepetitionFit(_RStarInterval):
    """``L(E) = l_inf + b / D'(E)^beta`` fitted on one model size's loss-vs-epochs curve.

    ``r_star_ci95`` is the profile-likelihood 95% interval; its lower end is 0 and/or its
    upper end ``inf`` when the data are consistent with that limit (:attr:`bounded` says
    which: ``"interval"``, ``"lower"`` (only a lower bound: consistent with ``R* -> inf``),
    ``"upper"`` (only an upper bound) or ``"none"``). ``r_star`` itself is ``inf`` when the best
    fit is the ``R* -> inf`` limit. ``b`` is for ``D'`` in tokens (``b = b_rel U^beta`` with
    ``b_rel`` the coefficient for ``D'`` in units of ``U``). ``note`` says which epochs were
    fitted and what is at a bound.
    """

    r_star: float
    r_star_ci95: tuple[float, float]
    l_inf: float
    b: float
    beta: float
    unique_tokens: float
    best_epoch: float
    epochs: tuple[float, ...]  # the epochs fitted
    excluded_epochs: tuple[float, ...]  # later epochs left out (see through_best)
    rss: float
    n_params: int
    note: str

    def effective_data(self, epochs: ArrayLike | float) -> np.ndarray:
        return effective_data(epochs, self.unique_tokens, self.r_star)

    def __call__(self, epochs: ArrayLike | float) -> np.ndarray:
        """The fitted loss at ``epochs``."""
        return self.l_inf + self.b * self.effective_data(epochs) ** -self.beta


def _pairs(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1 or xa.size == 0:
        raise ValueError(f"need two 1-D sequences of equal, non-zero length, got {xa.shape} and {ya.shape}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise ValueError("values must be finite")
    order = np.argsort(xa, kind="stable")
    return xa[order], ya[order]


def _linear_fit(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares ``y = c + s z`` for each row of ``z`` (K, n) with ``s >= 0``: (rss, c, s)."""
    zm = z.mean(axis=1, keepdims=True)
    zc = z - zm
    szz = np.sum(zc**2, axis=1)
    with np.errstate(all="ignore"):
        s = np.where(szz > 0, zc @ (y - y.mean()) / np.where(szz > 0, szz, 1.0), 0.0)
    s = np.maximum(s, 0.0)  # B > 0: a negative slope is clipped to the B -> 0+ limit (a constant)
    c = y.mean() - s * zm[:, 0]
    rss = np.sum((y - c[:, None] - s[:, None] * z) ** 2, axis=1)
    return rss, c, s


class _Profile:
    """RSS of the best (L_inf, B, beta) at a given R*, on D' in units of U."""

    def __init__(self, epochs: np.ndarray, losses: np.ndarray, beta: float | None) -> None:
        self.e, self.y, self.fixed_beta = epochs, losses, beta
        self.betas = (np.array([beta]) if beta is not None else
                      np.geomspace(BETA_BOUNDS[0], BETA_BOUNDS[1], BETA_GRID_POINTS))

    def x(self, r_star: float) -> np.ndarray:
        return effective_data(self.e, 1.0, r_star)

    def best(self, r_star: float) -> tuple[float, float, float, float]:
        """(rss, l_inf, b_rel, beta) minimising the RSS at ``r_star``."""
        log_x = np.log(self.x(r_star))
        rss, c, s = _linear_fit(np.exp(-np.outer(self.betas, log_x)), self.y)
        i = int(np.argmin(rss))
        if self.fixed_beta is not None:
            return float(rss[i]), float(c[i]), float(s[i]), float(self.betas[i])
        lo, hi = self.betas[max(i - 1, 0)], self.betas[min(i + 1, self.betas.size - 1)]

        def at(log_beta: float) -> float:
            return float(_linear_fit(np.exp(-math.exp(log_beta) * log_x)[None, :], self.y)[0][0])

        found = optimize.minimize_scalar(at, bounds=(math.log(lo), math.log(hi)), method="bounded",
                                         options={"xatol": 1e-7})
        beta = math.exp(found.x) if found.fun < rss[i] else float(self.betas[i])
        rss_b, c_b, s_b = _linear_fit(np.exp(-beta * log_x)[None, :], self.y)
        return float(rss_b[0]), float(c_b[0]), float(s_b[0]), beta

    def rss(self, r_star: float) -> float:
        return self.best(r_star)[0]


def fit_repetition_decay(epochs: ArrayLike, losses: ArrayLike, unique_tokens: float, *, through_best: bool = True,
                         beta: float | None = None) -> RepetitionFit:
    """Fit ``L(E) = L_inf + B / D'(E)^beta`` with Muennighoff's ``D'`` to one loss-vs-epochs curve.

    Args:
        epochs: epoch counts ``E = D / U`` (any order; e.g. 1, 2, 4, ..., 128).
        losses: the validation loss after each.
        unique_tokens: ``U``.
        through_best: fit only the epochs up to and including the best one (default): a loss
            that rises again (overfitting) is outside what the form can express and would
            drag the fit; False fits every epoch.
        beta: fix the loss exponent (e.g. from the iso-FLOP fits) instead of fitting it; one
            parameter fewer, so a curve with few epochs before overfitting can still be fitted.

    Returns:
        :class:`RepetitionFit` with R*, its profile-likelihood 95% interval (see the module
        docstring), L_inf, B, beta and a note on what was fitted.

    Raises:
        ValueError: non-positive epochs or ``unique_tokens``, or too few epochs to fit (at
            least one more than the fitted parameters: 5, or 4 with ``beta`` fixed).
    """
    e_all, l_all = _pairs(epochs, losses)
    if np.any(e_all <= 0) or not unique_tokens > 0:
        raise ValueError("epochs and unique_tokens must be positive")
    if beta is not None and not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    best = best_epoch(e_all, l_all)
    keep = e_all <= best if through_best else np.ones(e_all.size, dtype=bool)
    e, y = e_all[keep], l_all[keep]
    n_params = 3 if beta is not None else 4
    if np.unique(e).size < n_params + 1:
        where = " up to the best one" if through_best else ""
        raise ValueError(f"repetition fit: needs >= {n_params + 1} distinct epochs{where} ({n_params} parameters "
                         f"and one residual degree of freedom), got {np.unique(e).size}"
                         + (f" (best epoch {best:g})" if through_best else ""))
    profile = _Profile(e, y, beta)

    # ln R* on a grid, then the limits R* = 0 and R* = inf exactly, then a local refinement.
    grid = np.geomspace(R_STAR_MIN, R_STAR_SPAN * max(float(e.max()), 1.0), GRID_POINTS)
    rss_grid = np.array([profile.rss(r) for r in grid])
    rss_zero, rss_inf = profile.rss(0.0), profile.rss(math.inf)
    i = int(np.argmin(rss_grid))
    log_r = math.log(grid[i])
    if 0 < i < grid.size - 1:
        found = optimize.minimize_scalar(lambda t: profile.rss(math.exp(t)), method="bounded",
                                         bounds=(math.log(grid[i - 1]), math.log(grid[i + 1])),
                                         options={"xatol": 1e-6})
        if found.fun <= rss_grid[i]:
            log_r = float(found.x)
    r_star = math.exp(log_r)
    rss_min = profile.rss(r_star)
    if rss_inf <= rss_min:
        r_star, rss_min = math.inf, rss_inf
    elif rss_zero < rss_min:
        r_star, rss_min = 0.0, rss_zero
    rss_best, l_inf, b_rel, beta_hat = profile.best(r_star)

    dof = e.size - n_params
    threshold = rss_min * (1.0 + float(stats.f.ppf(0.95, 1, dof)) / dof)
    lo, hi = _profile_interval(profile, grid, rss_grid, r_star, rss_zero, rss_inf, threshold)

    notes = []
    excluded = tuple(float(v) for v in e_all[~keep])
    if through_best and excluded:
        notes.append(f"fitted on the {e.size} epochs up to and including the best one (E={best:g}); "
                     f"{len(excluded)} later epoch(s) left out ({', '.join(f'{v:g}' for v in excluded)}): the loss "
                     "rises again (overfitting), which the Muennighoff form cannot express")
    else:
        notes.append(f"fitted on all {e.size} epochs")
    if beta is not None:
        notes.append(f"beta fixed at {beta:g}")
    elif beta_hat <= BETA_BOUNDS[0] * 1.0001 or beta_hat >= BETA_BOUNDS[1] * 0.9999:
        notes.append(f"beta at its bound ({beta_hat:.3g}): L_inf and B are not constrained")
    notes += interval_notes(lo, hi)
    return RepetitionFit(r_star=r_star, r_star_ci95=(lo, hi), l_inf=l_inf, b=b_rel * unique_tokens**beta_hat,
                         beta=beta_hat, unique_tokens=float(unique_tokens), best_epoch=best,
                         epochs=tuple(float(v) for v in e), excluded_epochs=excluded, rss=rss_best,
                         n_params=n_params, note="; ".join(notes))


def _profile_interval(profile: _Profile, grid: np.ndarray, rss_grid: np.ndarray, r_star: float, rss_zero: float,
                      rss_inf: float, threshold: float) -> tuple[float, float]:
    """The connected set ``{R*: RSS(R*) <= threshold}`` around ``r_star``, its ends found by
    root finding in ``ln R*`` between the last grid point inside and the first outside; 0 /
    inf where it reaches those limits. An end beyond the grid but short of the limit (the
    profile crosses between ``R_STAR_MIN`` and 0, or between the grid's top and inf) is
    reported as the grid's end."""
    log_grid = np.log(grid)

    def crossing(inside: float, outside: float) -> float:
        return math.exp(optimize.brentq(lambda t: profile.rss(math.exp(t)) - threshold, inside, outside, xtol=1e-6))

    finite = 0 < r_star < math.inf
    if math.isinf(r_star):
        hi = math.inf
    else:
        hi = math.inf if rss_inf <= threshold else float(grid[-1])
        inside = math.log(r_star) if finite else None
        for j in range(int(np.searchsorted(grid, r_star, side="right")), grid.size):
            if rss_grid[j] > threshold:
                hi = crossing(inside, log_grid[j]) if inside is not None else float(grid[0])
                break
            inside = log_grid[j]
    if r_star == 0:
        lo = 0.0
    else:
        lo = 0.0 if rss_zero <= threshold else float(grid[0])
        inside = math.log(r_star) if finite else None
        for j in range(int(np.searchsorted(grid, r_star, side="left")) - 1, -1, -1):
            if rss_grid[j] > threshold:
                lo = crossing(inside, log_grid[j]) if inside is not None else float(grid[-1])
                break
            inside = log_grid[j]
    return lo, hi


def crossover_compute(reference_compute: ArrayLike, reference_loss: ArrayLike, candidate_compute: ArrayLike,
                      candidate_loss: ArrayLike) -> float | None:
    """The compute at which the candidate's loss first drops below the reference's.

    Both series are interpolated linearly in ``ln C`` (loss linear between measured points)
    on the compute range they share; the first downward crossing of ``candidate - reference``
    is solved exactly on those interpolants (exact for losses linear in ``ln C``). If the
    candidate is already strictly below at the smallest shared compute, that compute is
    returned (the crossover is there or earlier). None when the candidate never drops below
    inside the shared range, or the ranges do not overlap.

    Raises:
        ValueError: mismatched lengths, non-finite values, or non-positive compute.
    """
    cr, lr = _pairs(reference_compute, reference_loss)
    cc, lc = _pairs(candidate_compute, candidate_loss)
    if np.any(cr <= 0) or np.any(cc <= 0):
        raise ValueError("compute must be positive")
    lo, hi = max(cr[0], cc[0]), min(cr[-1], cc[-1])
    if lo > hi:
        return None
    grid = np.unique(np.concatenate([cr, cc]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    u = np.log(grid)
    d = np.interp(u, np.log(cc), lc) - np.interp(u, np.log(cr), lr)
    if d[0] < 0:
        return float(grid[0])
    for i in range(d.size - 1):
        if d[i] >= 0 > d[i + 1]:
            return float(math.exp(u[i] + d[i] / (d[i] - d[i + 1]) * (u[i + 1] - u[i])))
    return None


# --------------------------------------------------------------------------- fresh-data control
#
# Muennighoff's *definition* of effective data: D'(E) is the amount of fresh (never repeated)
# data that reaches the loss of E epochs of U unique tokens. With a fresh-data control (the same
# model trained on D = U, 2U, 4U, ... distinct tokens) D' is read off the fresh curve, and R* is
# the one parameter of ``D'/U = 1 + R* (1 - exp(-(E - 1)/R*))`` fitted to those D'. Everything
# below works in units of U (``x = D / U``).

#: exponent bounds of the fresh-data law (beyond them the fit says so in its note).
FRESH_BETA_BOUNDS = (1e-3, 4.0)
#: significance level of the F test that keeps the offset ``E_inf`` of the fresh-data law.
FRESH_OFFSET_ALPHA = 0.05


@dataclass(frozen=True)
class FreshLaw:
    """The fresh-data loss ``L(x) = e_inf + b x^-beta`` with ``x = D / U`` (data in units of U).

    ``kind`` is ``"offset"`` (``e_inf`` fitted) or ``"power"`` (``e_inf = 0``: a straight line in
    log-log space, fitted by least squares on the loss); see :func:`fit_fresh_law` for the choice.
    ``x_range`` is the fitted data range: an inversion outside it is an extrapolation.
    """

    kind: str
    e_inf: float
    b: float
    beta: float
    x_range: tuple[float, float]
    n_points: int
    rss: float
    note: str

    def __call__(self, x: ArrayLike | float) -> np.ndarray:
        return self.e_inf + self.b * np.asarray(x, dtype=float) ** -self.beta

    def inverse(self, loss: ArrayLike | float) -> np.ndarray:
        """The data ``x`` (units of U) at which the law reaches ``loss``; ``inf`` at or below the
        asymptote ``e_inf`` (the law never gets there)."""
        y = np.asarray(loss, dtype=float) - self.e_inf
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(y > 0, (np.where(y > 0, y, 1.0) / self.b) ** (-1.0 / self.beta), math.inf)
        return x

    def log_slope(self, x: ArrayLike | float) -> np.ndarray:
        """``dL / d ln x`` (negative): a loss error ``s`` is an error ``s / |dL/d ln x|`` in ``ln x``."""
        return -self.beta * self.b * np.asarray(x, dtype=float) ** -self.beta

    @property
    def min_loss(self) -> float:
        """The lowest loss the law reaches (as ``x -> inf``)."""
        return self.e_inf


def _fresh_profile(log_x: np.ndarray, y: np.ndarray, offset: bool) -> tuple[float, float, float, float]:
    """Least squares of ``y = c + b x^-beta`` (``c = 0`` unless ``offset``; ``b >= 0``) over
    ``beta`` in :data:`FRESH_BETA_BOUNDS`: a log-spaced grid, then a bounded refinement.
    Returns (rss, c, b, beta)."""

    def solve(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = np.exp(-np.outer(betas, log_x))
        if offset:
            return _linear_fit(z, y)
        b = np.maximum(z @ y / np.sum(z**2, axis=1), 0.0)
        return np.sum((y - b[:, None] * z) ** 2, axis=1), np.zeros_like(b), b

    betas = np.geomspace(FRESH_BETA_BOUNDS[0], FRESH_BETA_BOUNDS[1], 200)
    rss, _, _ = solve(betas)
    i = int(np.argmin(rss))
    lo, hi = betas[max(i - 1, 0)], betas[min(i + 1, betas.size - 1)]
    found = optimize.minimize_scalar(lambda t: float(solve(np.array([math.exp(t)]))[0][0]), method="bounded",
                                     bounds=(math.log(lo), math.log(hi)), options={"xatol": 1e-9})
    beta = math.exp(found.x) if found.fun <= rss[i] else float(betas[i])
    r, c, b = solve(np.array([beta]))
    return float(r[0]), float(c[0]), float(b[0]), beta


def fit_fresh_law(x: ArrayLike, losses: ArrayLike, *, alpha: float = FRESH_OFFSET_ALPHA) -> FreshLaw:
    """Fit the fresh-data curve ``L(x)`` (``x = D / U``, e.g. 1, 2, 4, 8, 16) for inverting it.

    Two nested forms, both by least squares on the loss:

    * ``"power"``: ``L = b x^-beta`` (a straight line in log-log space; 2 parameters);
    * ``"offset"``: ``L = e_inf + b x^-beta`` (Muennighoff's / Chinchilla's form; 3 parameters).

    With 4-5 points the offset is often ill-conditioned (``e_inf`` trades off against ``beta``
    and its inverse blows up near ``e_inf``), so it is used only when the data demand it: at
    least 4 distinct ``x``, a fit with ``0 < e_inf < min(L)``, ``beta`` inside its bounds, and
    an F test of the extra parameter against the power law significant at ``alpha``
    (``F = (RSS_power - RSS_offset) / (RSS_offset / (n - 3))`` on ``(1, n - 3)`` degrees of
    freedom). Otherwise the power law, with the reason in ``note``.

    Raises:
        ValueError: fewer than 2 distinct ``x``, non-positive ``x`` or losses, or non-finite values.
    """
    xs, y = _pairs(x, losses)
    if np.any(xs <= 0) or np.any(y <= 0):
        raise ValueError("fresh-data law: data and losses must be positive")
    n = int(np.unique(xs).size)
    if n < 2:
        raise ValueError(f"fresh-data law: needs >= 2 distinct data amounts, got {n}")
    log_x = np.log(xs)
    x_range = (float(xs.min()), float(xs.max()))
    rss_p, _, b_p, beta_p = _fresh_profile(log_x, y, offset=False)
    power_note = ""
    if n < 4:
        power_note = f"{n} points: too few for the offset form (3 parameters + 1 residual degree of freedom)"
    else:
        rss_o, e_inf, b_o, beta_o = _fresh_profile(log_x, y, offset=True)
        dof = y.size - 3
        f_stat = math.inf if rss_o <= 1e-30 * max(rss_p, 1e-300) else (rss_p - rss_o) / (rss_o / dof)
        p_value = 0.0 if math.isinf(f_stat) else float(stats.f.sf(max(f_stat, 0.0), 1, dof))
        interior = FRESH_BETA_BOUNDS[0] * 1.001 < beta_o < FRESH_BETA_BOUNDS[1] * 0.999
        if not (0 < e_inf < float(y.min()) and b_o > 0):
            power_note = f"offset form rejected: E_inf = {e_inf:.4g} outside (0, min L = {y.min():.4g})"
        elif not interior:
            power_note = f"offset form rejected: its exponent is at a bound ({beta_o:.3g})"
        elif p_value >= alpha:
            power_note = (f"offset form rejected: the extra parameter is not significant "
                          f"(F test p = {p_value:.2g} >= {alpha:g})")
        else:
            note = (f"offset power law L = E_inf + B (D/U)^-beta on {y.size} points (F test against the pure power "
                    f"law p = {p_value:.2g})")
            return FreshLaw("offset", e_inf, b_o, beta_o, x_range, y.size, rss_o, note)
    note = f"power law L = B (D/U)^-beta (straight line in log-log) on {y.size} points; {power_note}"
    if not FRESH_BETA_BOUNDS[0] * 1.001 < beta_p < FRESH_BETA_BOUNDS[1] * 0.999:
        note += f"; exponent at a bound ({beta_p:.3g}): the fresh loss barely changes with data"
    return FreshLaw("power", 0.0, b_p, beta_p, x_range, y.size, rss_p, note)


def effective_data_from_fresh(law: FreshLaw, losses: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Muennighoff's effective data of repeated runs from a fitted fresh-data law: ``x' = D'/U``
    with ``L_fresh(x') = loss``, and whether each is an extrapolation (outside the law's
    fitted ``x`` range; ``inf`` where the loss is at or below the law's asymptote)."""
    y = np.asarray(losses, dtype=float)
    x = law.inverse(y)
    lo, hi = law.x_range
    tol = 1e-9
    return x, ~((x >= lo * (1 - tol)) & (x <= hi * (1 + tol)))


@dataclass(frozen=True)
class RStarFit(_RStarInterval):
    """R* fitted to effective data ``x' = D'/U`` at epoch counts ``E`` (see :func:`fit_r_star`).

    ``r_star_ci95`` is the 95% likelihood interval (0 / ``inf`` at an end consistent with that
    limit; ``nan`` when there is no residual degree of freedom to estimate the noise);
    :attr:`bounded` as for :class:`RepetitionFit`.
    """

    r_star: float
    r_star_ci95: tuple[float, float]
    epochs: tuple[float, ...]  # the epochs fitted (E > 1, up to the best epoch)
    effective_epochs: tuple[float, ...]  # their D'/U
    excluded_epochs: tuple[float, ...]  # later epochs left out (past the best one)
    rss: float  # in (ln D')^2
    note: str

    def __call__(self, epochs: ArrayLike | float) -> np.ndarray:
        """The fitted ``D'/U`` at ``epochs``."""
        return effective_data(epochs, 1.0, self.r_star)


def _log_rss(e: np.ndarray, log_x: np.ndarray, r_star: float, w: np.ndarray | None = None) -> float:
    r2 = (log_x - np.log(effective_data(e, 1.0, r_star))) ** 2
    return float(np.sum(r2 if w is None else w * r2))


def fit_r_star(epochs: ArrayLike, effective_epochs: ArrayLike, *, best: float | None = None,
               weights: ArrayLike | None = None) -> RStarFit:
    """Fit the one parameter ``R*`` of ``D'/U = 1 + R* (1 - exp(-(E - 1)/R*))`` by (weighted)
    least squares in ``ln D'`` (the errors of a D' read off a power law are multiplicative).

    Args:
        epochs: epoch counts ``E``.
        effective_epochs: ``D'/U`` at each (e.g. from :func:`effective_data_from_fresh`);
            non-finite ones are left out (noted).
        best: fit only ``E <= best`` (the best epoch: a loss that rises again is overfitting,
            which the form cannot express). Epochs ``E <= 1`` are always left out: the form
            gives ``D' = U`` there whatever ``R*``.
        weights: relative inverse variances of ``ln D'`` (default equal). For D' read off a
            fresh-data law from losses with equal noise, ``FreshLaw.log_slope(D'/U)**2``: the
            same loss error is a larger ``ln D'`` error where the law is flat (large D', near
            its floor), so those points count less. Only ratios matter (the noise scale is
            estimated from the residuals).

    The 95% interval is the likelihood (profile) interval of non-linear least squares with
    unknown noise, ``{R*: RSS(R*) <= RSS_min (1 + F_0.95(1, n-1) / (n-1))}``, searched in
    ``ln R*`` with the limits ``R* = 0`` (``D' = U``) and ``R* = inf`` (``D' = U E``) evaluated
    exactly, so "consistent with ``R* -> inf``" (a lower bound only) is a test, not an artefact
    of a search range. With a single point ``R*`` is solved exactly and has no interval
    (``nan``).

    Raises:
        ValueError: mismatched lengths, non-positive values, or no usable epoch ``E > 1``.
    """
    e_all = np.asarray(epochs, dtype=float)
    x_all = np.asarray(effective_epochs, dtype=float)
    if e_all.shape != x_all.shape or e_all.ndim != 1:
        raise ValueError(f"need two 1-D sequences of equal length, got {e_all.shape} and {x_all.shape}")
    if np.any(~np.isfinite(e_all)) or np.any(e_all <= 0):
        raise ValueError("epochs must be positive and finite")
    if np.any(x_all[np.isfinite(x_all)] <= 0):
        raise ValueError("effective data must be positive")
    w_all = np.ones_like(e_all) if weights is None else np.asarray(weights, dtype=float)
    if w_all.shape != e_all.shape:
        raise ValueError(f"weights: expected shape {e_all.shape}, got {w_all.shape}")
    notes = []
    keep = (e_all > 1) & np.isfinite(x_all)
    if weights is not None:
        bad_w = keep & ~(np.isfinite(w_all) & (w_all > 0))
        if bad_w.any():
            raise ValueError(f"weights must be positive and finite where fitted (E={e_all[bad_w].tolist()})")
    if np.any((e_all > 1) & ~np.isfinite(x_all)):
        bad = e_all[(e_all > 1) & ~np.isfinite(x_all)]
        notes.append(f"no finite D' at E={', '.join(f'{v:g}' for v in bad)} (left out)")
    excluded = np.zeros_like(keep)
    if best is not None:
        excluded = keep & (e_all > best)
        keep &= e_all <= best
    order = np.argsort(e_all[keep], kind="stable")
    e, log_x = e_all[keep][order], np.log(x_all[keep][order])
    w = None if weights is None else w_all[keep][order] / w_all[keep].max(initial=1.0)
    if e.size == 0:
        raise ValueError("R* fit: needs at least one epoch count E > 1 with a finite D'"
                         + (f" up to the best epoch (E={best:g})" if best is not None else ""))
    if excluded.any():
        notes.append(f"fitted on E={', '.join(f'{v:g}' for v in e)} (up to the best epoch {best:g}); "
                     f"{int(excluded.sum())} later epoch(s) left out (overfitting)")
    else:
        notes.append(f"fitted on E={', '.join(f'{v:g}' for v in e)}")
    if w is not None:
        notes.append("weighted by the fresh law's slope squared (equal loss noise)")
    rss_zero, rss_inf = _log_rss(e, log_x, 0.0, w), _log_rss(e, log_x, math.inf, w)
    grid = np.geomspace(R_STAR_MIN, R_STAR_SPAN * max(float(e.max()), 1.0), GRID_POINTS)
    rss_grid = np.array([_log_rss(e, log_x, r, w) for r in grid])
    i = int(np.argmin(rss_grid))
    r_star, rss_min = float(grid[i]), float(rss_grid[i])
    lo_b, hi_b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, grid.size - 1)])
    found = optimize.minimize_scalar(lambda t: _log_rss(e, log_x, math.exp(t), w), method="bounded",
                                     bounds=(lo_b, hi_b), options={"xatol": 1e-9})
    if found.fun <= rss_min:
        r_star, rss_min = math.exp(found.x), float(found.fun)
    if rss_inf <= rss_min:
        r_star, rss_min = math.inf, rss_inf
    elif rss_zero < rss_min:
        r_star, rss_min = 0.0, rss_zero

    dof = e.size - 1
    if dof == 0:
        notes.append("one point: R* solved exactly, no interval (no residual degree of freedom)")
        return RStarFit(r_star, (math.nan, math.nan), tuple(e.tolist()), tuple(np.exp(log_x).tolist()),
                        tuple(e_all[excluded].tolist()), rss_min, "; ".join(notes))
    # a floor keeps an exact (noise-free) fit from collapsing the interval below float precision
    threshold = max(rss_min, 1e-24 * e.size) * (1.0 + float(stats.f.ppf(0.95, 1, dof)) / dof)
    profile = _RStarProfile(e, log_x, w)
    lo, hi = _profile_interval(profile, grid, rss_grid, r_star, rss_zero, rss_inf, threshold)  # type: ignore[arg-type]
    notes += interval_notes(lo, hi)
    return RStarFit(r_star, (lo, hi), tuple(e.tolist()), tuple(np.exp(log_x).tolist()),
                    tuple(e_all[excluded].tolist()), rss_min, "; ".join(notes))


class _RStarProfile:
    """The RSS of :func:`fit_r_star` at a given R* (duck-types ``_Profile.rss`` for
    :func:`_profile_interval`)."""

    def __init__(self, epochs: np.ndarray, log_x: np.ndarray, weights: np.ndarray | None) -> None:
        self.e, self.log_x, self.w = epochs, log_x, weights

    def rss(self, r_star: float) -> float:
        return _log_rss(self.e, self.log_x, r_star, self.w)
