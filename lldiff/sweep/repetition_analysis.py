"""The analysis of a data-constrained study (SPEC §11): the repeated-data sweep's and the
fresh-data control's ``results.csv`` tables, read and validated -> seed means -> each objective's
best epoch count and R* estimates (:class:`ObjectiveResult`) -> each objective compared with the
reference (:class:`Crossover`). Pure functions on data frames: no plotting
(:mod:`lldiff.sweep.repetition_figures`), no files written (:mod:`lldiff.sweep.repetition_report`).

Per objective: the best epoch count; R* (Muennighoff's repetition "half-life") estimated two
ways: (a) from the fresh-data control, the primary estimate when there is one: the fresh
curve is fitted (:func:`lldiff.sweep.repetition.fit_fresh_law`), each repeated run's loss is
mapped to the fresh data ``D'`` reaching it, and R* is the one parameter of
``D'/U = 1 + R* (1 - exp(-(E-1)/R*))`` fitted on the epochs up to the best one
(:func:`lldiff.sweep.repetition.fit_r_star`, likelihood interval); (b) the direct fit of the
loss-vs-epochs curve (:func:`lldiff.sweep.repetition.fit_repetition_decay`) as a cross-check.
Every objective other than the reference (``ar`` when present) is compared with it: the
compute where its repeated-data loss drops below the reference's, and the loss ratio at the
largest common epoch count.

Losses are seed means per (objective, E). The fresh-data runs are placed at ``x = D/U`` "epochs'
worth" of data: ``x = E_r * tokens / tokens_r`` with ``r`` the repeated run of the same
objective nearest in tokens (so a fresh run with the same steps as the repeated run of ``E``
epochs sits exactly at ``x = E``, and the repeated ``E = 1`` run, itself fresh, at ``x = 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lldiff.sweep.objective_facts import objective_name
from lldiff.sweep.repetition import (FreshLaw, RepetitionFit, RStarFit, best_epoch, crossover_compute,
                                     effective_data_from_fresh, fit_fresh_law, fit_r_star, fit_repetition_decay)
from lldiff.sweep.results import RESULTS_FILE, read_results

LOSS = "val_nll_per_token"
#: a fresh run matches a repeated epoch count when their data differ by less than this factor.
MATCH_TOLERANCE = 1.05


# --------------------------------------------------------------------------- loading


def _read_results(directory: Path, what: str) -> pd.DataFrame:
    path = Path(directory) / RESULTS_FILE
    try:
        df = read_results(directory, what)
    except FileNotFoundError as err:  # this module's loaders raise ValueError for every bad input
        raise ValueError(str(err)) from err
    missing = [c for c in ("run_id", "objective", "size", "tokens", LOSS) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    df = df.copy()
    df["objective"] = df["objective"].astype(str).str.lower()
    for col in ("tokens", "flops", "budget", "epochs", "unique_tokens", LOSS, "val_bpb", "n_nonemb"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["flops"] = df["flops"] if "flops" in df else np.nan
    if "budget" in df:  # an older table without ``flops``: the planned budget
        df["flops"] = df["flops"].where(np.isfinite(df["flops"]), df["budget"])
    if not np.all(np.isfinite(df[LOSS])):
        raise ValueError(f"{path}: non-finite {LOSS} in run(s) {df.loc[~np.isfinite(df[LOSS]), 'run_id'].tolist()}")
    return df


def _one_size(df: pd.DataFrame, path: Path) -> None:
    sizes = sorted(df["size"].astype(str).unique())
    if len(sizes) > 1:
        raise ValueError(f"{path}: a data-constrained report covers one model size; found {sizes} "
                         "(analyse each size's runs in its own directory)")


def load_repeated(directory: Path) -> tuple[pd.DataFrame, float]:
    """The repeated-data runs of ``directory/results.csv`` and their ``U``.

    Raises:
        ValueError: no results.csv, a table that is not a repeated-data sweep (no ``epochs``
            / ``unique_tokens`` values), mixed ``U``, or more than one model size.
    """
    path = Path(directory) / RESULTS_FILE
    df = _read_results(Path(directory), "repeated-data sweep")
    for col in ("epochs", "unique_tokens"):
        if col not in df or not np.any(np.isfinite(df[col])):
            raise ValueError(f"{path} is not a repeated-data sweep: no {col!r} values (a sweep with epochs and "
                             "data.unique_tokens is needed)")
    bad = df.loc[~(np.isfinite(df["epochs"]) & np.isfinite(df["unique_tokens"])), "run_id"].tolist()
    if bad:
        raise ValueError(f"{path}: run(s) without epochs/unique_tokens in a repeated-data sweep: {bad}")
    if np.any(df["epochs"] <= 0):
        raise ValueError(f"{path}: non-positive epochs {sorted(df.loc[df['epochs'] <= 0, 'epochs'].unique())}")
    uniques = sorted(float(u) for u in df["unique_tokens"].unique())
    if len(uniques) > 1:
        shown = [f"{u:.0f}" if u == round(u) else f"{u:g}" for u in uniques]
        raise ValueError(f"{path}: mixed unique_tokens values {shown}; the runs must share U")
    if not uniques[0] > 0:
        raise ValueError(f"{path}: unique_tokens must be positive, got {uniques[0]:g}")
    _one_size(df, path)
    return df, uniques[0]


def load_fresh(directory: Path) -> pd.DataFrame:
    """The fresh-data control's runs (no unique-token cap).

    Raises:
        ValueError: no results.csv, rows with ``epochs``/``unique_tokens`` (a repeated sweep, not
            its control), or more than one model size.
    """
    path = Path(directory) / RESULTS_FILE
    df = _read_results(Path(directory), "fresh-data control")
    capped = [c for c in ("epochs", "unique_tokens") if c in df and np.any(np.isfinite(df[c]))]
    if capped:
        raise ValueError(f"{path} is not a fresh-data control: it has {capped} values (a repeated-data sweep?)")
    _one_size(df, path)
    return df


def seed_mean(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    numeric = [c for c in ("tokens", "flops", "epochs", "unique_tokens", LOSS, "val_bpb", "n_nonemb") if c in df
               and c not in keys]
    out = df.groupby(keys, as_index=False).agg(**{c: (c, "mean") for c in numeric},
                                                n_seeds=("run_id", "size"), loss_std=(LOSS, "std"))
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- analysis


@dataclass
class ObjectiveResult:
    """Everything the report says about one objective."""

    objective: str
    table: pd.DataFrame  # one row per E: epochs, tokens, flops, loss, bpb, fresh_loss, d_prime_u, extrapolated
    fresh: pd.DataFrame  # fresh-data points (x = D/U, tokens, flops, loss), incl. the repeated E = 1 run
    best_epoch: float
    best_loss: float
    largest_epoch: float
    loss_at_largest: float
    fresh_law: FreshLaw | None = None
    r_star_fresh: RStarFit | None = None
    r_star_fresh_interpolated: RStarFit | None = None  # only D' inside the fresh range (sensitivity)
    direct: RepetitionFit | None = None
    notes: dict[str, str] = field(default_factory=dict)  # fresh_law / r_star_fresh / direct -> why not / caveat

    @property
    def primary(self) -> str | None:
        """Which R* estimate leads: ``"fresh"``, ``"direct"`` or None."""
        if self.r_star_fresh is not None:
            return "fresh"
        return "direct" if self.direct is not None else None


@dataclass
class Crossover:
    candidate: str
    reference: str
    compute: float | None  # where the candidate's repeated loss first drops below the reference's
    epochs: float | None  # the candidate's epoch count there (interpolated in log C)
    already_below: bool  # below at the smallest shared compute (the crossover is there or earlier)
    compute_range: tuple[float, float]  # the shared compute range searched
    common_epoch: float | None  # largest epoch count both have
    loss_ratio: float | None  # candidate / reference loss there
    #: where the candidate's loss drops below the reference's best loss at any compute up to there
    #: (the reference's running minimum): beating the reference's best, not just its overfitted runs
    compute_vs_best: float | None = None
    epochs_vs_best: float | None = None


def _match_fresh(fresh: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Place fresh runs at ``x = D/U`` relative to the repeated runs (see the module docstring)."""
    log_t = np.log(table["tokens"].to_numpy(float))
    rows = []
    for row in fresh.itertuples(index=False):
        j = int(np.argmin(np.abs(log_t - math.log(row.tokens))))
        x = float(table["epochs"].iloc[j]) * row.tokens / float(table["tokens"].iloc[j])
        matched = abs(math.log(row.tokens) - log_t[j]) < math.log(MATCH_TOLERANCE)
        rows.append({"x": x, "tokens": row.tokens, "flops": row.flops, "loss": getattr(row, LOSS),
                     "bpb": getattr(row, "val_bpb", math.nan), "n_seeds": row.n_seeds,
                     "epochs_matched": float(table["epochs"].iloc[j]) if matched else math.nan, "source": "fresh"})
    return pd.DataFrame(rows)


def analyze_objective(objective: str, repeated: pd.DataFrame, unique_tokens: float,
                      fresh: pd.DataFrame | None) -> ObjectiveResult:
    """Best epoch, fresh law, R* (both ways) of one objective from its seed-averaged runs."""
    mine = repeated[repeated["objective"] == objective].sort_values("epochs").reset_index(drop=True)
    e, loss = mine["epochs"].to_numpy(float), mine[LOSS].to_numpy(float)
    best = best_epoch(e, loss)
    table = pd.DataFrame({"epochs": e, "tokens": mine["tokens"].to_numpy(float),
                          "flops": mine["flops"].to_numpy(float), "loss": loss,
                          "bpb": mine["val_bpb"].to_numpy(float) if "val_bpb" in mine else np.nan,
                          "n_seeds": mine["n_seeds"].to_numpy(int), "fresh_loss": np.nan, "d_prime_u": np.nan,
                          "extrapolated": False})
    result = ObjectiveResult(objective, table, pd.DataFrame(), best, float(loss[e == best][0]), float(e[-1]),
                             float(loss[-1]))

    # the fresh curve: the repeated E = 1 run (fresh data at D = U) and the control's runs
    points = []
    if np.any(e == 1.0):
        i = int(np.flatnonzero(e == 1.0)[0])
        points.append({"x": 1.0, "tokens": table["tokens"][i], "flops": table["flops"][i], "loss": loss[i],
                       "bpb": table["bpb"][i], "n_seeds": table["n_seeds"][i], "epochs_matched": 1.0,
                       "source": "repeated E=1"})
    frame = pd.DataFrame(points)
    if fresh is not None:
        mine_fresh = fresh[fresh["objective"] == objective]
        if not mine_fresh.empty:
            frame = pd.concat([frame, _match_fresh(mine_fresh, table)], ignore_index=True)
    result.fresh = frame.sort_values("x").reset_index(drop=True) if not frame.empty else frame
    for row in result.fresh.itertuples(index=False):
        if math.isfinite(row.epochs_matched):
            table.loc[table["epochs"] == row.epochs_matched, "fresh_loss"] = row.loss

    # (a) R* from the fresh-data control
    if fresh is None:
        result.notes["r_star_fresh"] = "no fresh-data control"
    elif result.fresh.empty or (result.fresh["source"] == "fresh").sum() == 0:
        result.notes["r_star_fresh"] = f"the fresh-data control has no {objective_name(objective)} runs"
    elif 1.0 not in set(e):
        result.notes["r_star_fresh"] = "no repeated E = 1 run (the fresh curve's anchor at D = U)"
    else:
        try:
            law = fit_fresh_law(result.fresh["x"], result.fresh["loss"])
        except ValueError as err:
            result.notes["r_star_fresh"] = f"fresh-data law not fitted: {err}"
        else:
            result.fresh_law = law
            x_prime, extrapolated = effective_data_from_fresh(law, loss)
            x_prime = np.where(e == 1.0, 1.0, x_prime)  # D'(1) = U by definition (the anchor)
            extrapolated = extrapolated & (e != 1.0)
            table["d_prime_u"], table["extrapolated"] = x_prime, extrapolated
            # equal loss noise -> ln D' noise 1/|dL/d ln D'|: weights = slope^2 (flat law, large D': less)
            with np.errstate(invalid="ignore", over="ignore"):
                weights = np.where(np.isfinite(x_prime), law.log_slope(np.where(np.isfinite(x_prime), x_prime, 1.0))
                                   ** 2, np.nan)
            try:
                result.r_star_fresh = fit_r_star(e, x_prime, best=best, weights=weights)
            except ValueError as err:
                result.notes["r_star_fresh"] = str(err)
            else:
                fitted = (e > 1) & (e <= best) & np.isfinite(x_prime)
                outside = e[fitted & extrapolated]
                if outside.size:
                    result.notes["r_star_fresh"] = (
                        f"D' at E={', '.join(f'{v:g}' for v in outside)} is extrapolated beyond the fresh data "
                        f"(D/U in [{law.x_range[0]:g}, {law.x_range[1]:g}])")
                    inside = fitted & ~extrapolated
                    if inside.any():
                        try:
                            result.r_star_fresh_interpolated = fit_r_star(e[inside], x_prime[inside],
                                                                          weights=weights[inside])
                        except ValueError:
                            pass

    # (b) the direct fit of the loss-vs-epochs curve
    try:
        result.direct = fit_repetition_decay(e, loss, unique_tokens)
    except ValueError as err:
        reason = str(err)
        if result.fresh_law is not None and result.fresh_law.kind == "offset":
            try:  # one parameter fewer: the fresh law's exponent
                result.direct = fit_repetition_decay(e, loss, unique_tokens, beta=result.fresh_law.beta)
                result.notes["direct"] = f"beta fixed at the fresh-data law's {result.fresh_law.beta:.3g} ({reason})"
            except ValueError as err2:
                result.notes["direct"] = f"{reason}; with beta fixed from the fresh law: {err2}"
        else:
            result.notes["direct"] = reason
    return result


def compare(candidate: ObjectiveResult, reference: ObjectiveResult) -> Crossover:
    """Where ``candidate``'s repeated loss drops below ``reference``'s, on the compute axis."""
    ct, rt = candidate.table, reference.table
    cc, cl = ct["flops"].to_numpy(float), ct["loss"].to_numpy(float)
    rc, rl = rt["flops"].to_numpy(float), rt["loss"].to_numpy(float)
    ok_c, ok_r = np.isfinite(cc) & (cc > 0), np.isfinite(rc) & (rc > 0)
    cc, cl, rc, rl = cc[ok_c], cl[ok_c], rc[ok_r], rl[ok_r]
    lo, hi = max(cc.min(initial=math.inf), rc.min(initial=math.inf)), min(cc.max(initial=0), rc.max(initial=0))
    at = crossover_compute(rc, rl, cc, cl) if cc.size and rc.size else None
    u, ce = np.log(cc), ct["epochs"].to_numpy(float)[ok_c]
    order = np.argsort(u)

    def epochs_at(c: float | None) -> float | None:
        return None if c is None else float(np.exp(np.interp(math.log(c), u[order], np.log(ce[order]))))

    already = False
    if at is not None:
        already = bool(at <= lo * (1 + 1e-12) and np.interp(math.log(lo), u[order], cl[order])
                       < np.interp(math.log(lo), np.log(rc)[np.argsort(rc)], rl[np.argsort(rc)]))
    r_order = np.argsort(rc, kind="stable")
    best_so_far = np.minimum.accumulate(rl[r_order])
    at_best = crossover_compute(rc[r_order], best_so_far, cc, cl) if cc.size and rc.size else None
    common = sorted(set(ct["epochs"]) & set(rt["epochs"]))
    ratio = None
    if common:
        e_max = common[-1]
        ratio = float(ct.loc[ct["epochs"] == e_max, "loss"].iloc[0] / rt.loc[rt["epochs"] == e_max, "loss"].iloc[0])
    return Crossover(candidate.objective, reference.objective, at, epochs_at(at), already, (float(lo), float(hi)),
                     common[-1] if common else None, ratio, at_best, epochs_at(at_best))
