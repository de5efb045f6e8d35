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


def best_epoch(epochs: ArrayLike, losses: ArrayLike) -> float:
    """The epoch count with the lowest loss (the earliest among equal losses)."""
    e, loss = _pairs(epochs, losses)
    return float(e[int(np.argmin(loss))])


@dataclass(frozen=True)
class RepetitionFit:
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

    @property
    def bounded(self) -> str:
        lo, hi = self.r_star_ci95
        if lo > 0 and math.isfinite(hi):
            return "interval"
        if lo > 0:
            return "lower"
        return "upper" if math.isfinite(hi) else "none"

    @property
    def only_lower_bound(self) -> bool:
        """The data are consistent with ``R* -> inf``: report ``R* >= r_star_ci95[0]``."""
        return self.bounded == "lower"

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
    if math.isinf(hi) and lo > 0:
        notes.append(f"consistent with R* -> inf: only a lower bound, R* >= {lo:.3g}")
    elif lo == 0 and math.isfinite(hi):
        notes.append(f"consistent with R* -> 0: only an upper bound, R* <= {hi:.3g}")
    elif lo == 0:
        notes.append("R* is not constrained by these data")
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
