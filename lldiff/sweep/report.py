"""The sweep report: ``analyze(run_dir)`` reads ``results.csv``, fits, draws, writes markdown.

Writes into ``out_dir`` (default ``RUN_DIR/analysis/``): ``report.md`` and the figures
``loss_vs_flops``, ``isoflop`` and ``scaling_laws``, each as ``.png`` and ``.svg``. Every file
is written atomically (temporary file + ``os.replace``). Nothing is printed; warnings about
the fits (unbracketed minima, skipped budgets, ...) go to ``logging`` and into the report.

The report leads with the headline (is every optimum bracketed; each objective's exponents,
their differences from the reference's and the compute multipliers, all with intervals),
then the details. Objectives are whatever results.csv holds; each one other than the
reference (default ``ar``) is compared with it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from lldiff.atomic import write_text
from lldiff.sweep.analysis import (CARRIED_NUMERIC, REQUIRED_COLUMNS, SweepAnalysis, analyze_results,
                                   validate_results)
from lldiff.sweep.bootstrap import BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, RESAMPLING
from lldiff.sweep.fits import ObjectiveFit
from lldiff.sweep.figures import METRIC_LABELS, load_training_curves, make_figures
from lldiff.sweep.objective_facts import DEFAULT_REFERENCE, exact_likelihood, objective_name
from lldiff.sweep.results import RESULTS_FILE, read_results
from lldiff.sweep.spec import COMPUTE_AXES

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
SMDM_MULTIPLIER = 16.0
#: objectives whose validation loss is an exact NLL (the others report a negative ELBO).
#: results.csv columns that are not hyperparameters (everything else is listed as one).
KNOWN_COLUMNS = {*REQUIRED_COLUMNS, *CARRIED_NUMERIC, "seed", "val_nll_per_token", "val_bpb", "spec_fingerprint",
                 "finished_at", "compute"}


# --------------------------------------------------------------------------- input / output


def load_results(run_dir: str | Path, metric: str = "val_nll_per_token") -> pd.DataFrame:
    """``RUN_DIR/results.csv`` as a data frame.

    Raises:
        FileNotFoundError: no results.csv in ``run_dir``.
        ValueError: the file is empty or lacks required columns (named in the message).
    """
    df = read_results(run_dir)
    path = Path(run_dir) / RESULTS_FILE
    try:
        validate_results(df, metric)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return df


# --------------------------------------------------------------------------- formatting


def num(x: float | None, spec: str = ".3g") -> str:
    """A number for a table cell; an em dash for missing/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec)


def ci(interval: tuple[float, float], spec: str = ".3g") -> str:
    if any(math.isnan(v) for v in interval):
        return "undefined"
    return f"[{num(interval[0], spec)}, {num(interval[1], spec)}]"


def duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def table(header: Iterable[str], rows: Iterable[Iterable[str]], align: str) -> list[str]:
    """A markdown table; ``align`` has one character per column (``l`` or ``r``)."""
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def name(objective: str) -> str:
    return objective_name(objective)


def budget_list(budgets: Iterable[float]) -> str:
    return ", ".join(f"C={num(c)}" for c in budgets)


# --------------------------------------------------------------------------- sections


def bracketing_line(analysis: SweepAnalysis) -> str:
    """The one-line bracketing summary (and which budgets are not bracketed)."""
    if analysis.all_bracketed:
        return "All budgets of all objectives bracketed: **yes**."
    missing = "; ".join(f"{name(obj)}: {budget_list(cs)}" for obj, cs in analysis.unbracketed.items())
    what = ("left out of the law fits" if analysis.exclude_extrapolated else
            "the best measured size is used as that budget's optimum (fallback)")
    return f"All budgets of all objectives bracketed: **no** (not bracketed: {missing}; {what})."


def interval_method_line(analysis: SweepAnalysis) -> str:
    boot = analysis.bootstrap
    if boot is None:
        return "Intervals: t-based 95% for the OLS power laws only (no bootstrap was run)."
    schemes: dict[str, list[str]] = {}  # resampling of an objective's budgets -> objectives
    for obj in boot.objectives:
        methods = boot.methods(obj)
        how = "; ".join(RESAMPLING[m] + (f" ({k} budget{'s' * (k > 1)})" if len(methods) > 1 else "")
                        for m, k in methods.items()) or "no budgets"
        schemes.setdefault(how, []).append(name(obj))
    resampling = "; ".join(f"{how} ({', '.join(objs)})" for how, objs in schemes.items())
    held = ", ".join(f"{name(obj)} {100 * ob.bracket_held():.1f}%" for obj, ob in boot.objectives.items())
    return (f"Intervals: **bootstrap** 95% percentile intervals over {boot.replicates} replicates (seed {boot.seed}), "
            "each replicate re-running the same estimator (vertex where bracketed, else the best measured size) "
            "through power laws and multipliers. Resampling: "
            f"{resampling}. Replicates in which every budget stayed bracketed: {held}. "
            "*t*: the analytic t-based 95% interval of the OLS power law.")


def exponent_rows(analysis: SweepAnalysis) -> list[list[str]]:
    rows = []
    boots = analysis.bootstrap.objectives if analysis.bootstrap is not None else {}
    for obj, fit in analysis.fits.items():
        boot = boots.get(obj)
        nan2 = (math.nan, math.nan)
        a_law, l_law = fit.n_opt_law, fit.loss_law
        a = a_law.exponent if a_law is not None else math.nan
        b = -l_law.exponent if l_law is not None else math.nan
        a_t = a_law.exponent_ci95 if a_law is not None else nan2
        b_t = (-l_law.exponent_ci95[1], -l_law.exponent_ci95[0]) if l_law is not None else nan2
        rows.append([name(obj), num(a, ".3f"), ci(boot.a_ci95 if boot else nan2, ".3f"), ci(a_t, ".3f"),
                     num(b, ".4f"), ci(boot.b_ci95 if boot else nan2, ".4f"), ci(b_t, ".4f"),
                     str(fit.optima(analysis.exclude_extrapolated)[0].size),
                     f"{100 * boot.bracket_held():.1f}%" if boot else "—"])
    return rows


A_WIDTH_MAX = 0.5
"""Widest 95% interval of an N_opt exponent ``a`` that supports a conclusion: Chinchilla's
``a`` is ~0.5, so a wider interval cannot tell it from 0 or 1."""
K_RATIO_MAX = 10.0
"""Widest 95% interval of a compute multiplier (upper / lower end) that supports one number."""
ADVICE = {"seeds": 3, "budgets": 5, "decades": 2.0}
"""What a sweep needs at least before its intervals can be expected to close (the advice given)."""


def exponent_interval(analysis: SweepAnalysis, objective: str, which: str) -> tuple[tuple[float, float], str]:
    """The 95% interval of an objective's ``a`` or ``b`` (bootstrap when run, else t) and its kind."""
    boot = analysis.bootstrap.objectives.get(objective) if analysis.bootstrap is not None else None
    if boot is not None:
        return (boot.a_ci95 if which == "a" else boot.b_ci95), "bootstrap"
    law = analysis.fits[objective].n_opt_law if which == "a" else analysis.fits[objective].loss_law
    if law is None:
        return (math.nan, math.nan), "t"
    lo, hi = law.exponent_ci95
    return ((lo, hi) if which == "a" else (-hi, -lo)), "t"


def multiplier_interval(row) -> tuple[float, float]:
    """The 95% interval of the multiplier a row's estimate uses (non-parametric where finite)."""
    return row.nonparametric_ci95 if np.isfinite(row.nonparametric) else row.parametric_ci95


def unsupported(analysis: SweepAnalysis) -> list[str]:
    """What this sweep's intervals do not support: an exponent interval that is missing,
    contains 0 or is too wide (``a``: wider than :data:`A_WIDTH_MAX`), a multiplier interval
    that is missing, unbounded or spans more than a factor :data:`K_RATIO_MAX`."""
    problems = []
    for obj in analysis.fits:
        (lo, hi), kind = exponent_interval(analysis, obj, "a")
        if not (math.isfinite(lo) and math.isfinite(hi)):
            problems.append(f"{name(obj)}'s N_opt exponent a has no interval")
        elif lo <= 0 <= hi or hi - lo > A_WIDTH_MAX:
            why = "contains 0" if lo <= 0 <= hi else f"is wider than {A_WIDTH_MAX:g}"
            problems.append(f"{name(obj)}'s N_opt exponent a: its 95% {kind} interval {ci((lo, hi), '.3f')} {why}")
        (lo, hi), kind = exponent_interval(analysis, obj, "b")
        if math.isfinite(lo) and math.isfinite(hi) and lo <= 0 <= hi:
            problems.append(f"{name(obj)}'s loss exponent b: its 95% {kind} interval {ci((lo, hi), '.4f')} contains "
                            "0 (the optimal loss is not shown to fall with compute)")
    for cand in analysis.candidates:
        rows = analysis.multipliers_for(cand)
        spans = [multiplier_interval(r) for r in rows]
        wide = [(r, (lo, hi)) for r, (lo, hi) in zip(rows, spans)
                if not (math.isfinite(lo) and math.isfinite(hi) and lo > 0 and hi / lo <= K_RATIO_MAX)]
        if rows and wide:
            shown = "; ".join(f"C={num(r.budget)}: {ci(span)}" for r, span in wide)
            problems.append(f"the compute multiplier of {name(cand)} vs {name(analysis.reference)} is not pinned down "
                            f"(95% intervals missing, unbounded or wider than a factor {K_RATIO_MAX:g}: {shown})")
    return problems


def advice(analysis: SweepAnalysis) -> str:
    """What would let the sweep support its conclusions: seeds, budgets, a wider span, brackets."""
    points = analysis.points
    seeds = int(points["n_seeds"].min()) if len(points) else 0
    budgets = sorted({float(c) for fit in analysis.fits.values() for c in fit.budgets})
    decades = math.log10(budgets[-1] / budgets[0]) if len(budgets) > 1 else 0.0
    needs = []
    if seeds < ADVICE["seeds"]:
        needs.append(f"{ADVICE['seeds']}+ seeds per point (now {seeds}; each optimum's noise shrinks as 1/sqrt(seeds))")
    if len(budgets) < ADVICE["budgets"]:
        needs.append(f"{ADVICE['budgets']}+ budgets (now {len(budgets)})")
    if decades < ADVICE["decades"]:
        needs.append(f"budgets spanning {ADVICE['decades']:g}+ decades of compute (now {decades:.1f}: an exponent's "
                     "interval narrows as the span of ln C grows)")
    if not analysis.all_bracketed:
        needs.append("sizes on both sides of every budget's optimum (some budgets are not bracketed)")
    return "; ".join(needs) if needs else "more seeds and more budgets over a wider span of compute"


def support_line(analysis: SweepAnalysis) -> str:
    """The headline's verdict: whether the intervals support the conclusions, and if not, what would."""
    problems = unsupported(analysis)
    if not problems:
        return (f"Conclusions supported: every exponent interval excludes 0 (a's narrower than {A_WIDTH_MAX:g}) and "
                f"every multiplier is known within a factor {K_RATIO_MAX:g} (95% intervals).")
    return ("**This sweep cannot support a scaling conclusion**: " + "; ".join(problems) + ". The numbers below are "
            f"point estimates, not findings. What would: {advice(analysis)}.")


def headline_section(analysis: SweepAnalysis) -> list[str]:
    """The verdict, bracketing, exponents, exponent differences and multipliers, each with intervals."""
    lines = ["## Headline", "", f"- {support_line(analysis)}", f"- {bracketing_line(analysis)}",
             f"- {interval_method_line(analysis)}", "",
             "Exponents of N_opt = A·C^a and L_opt = A·C^-b:", ""]
    lines += table(["objective", "a", "a 95% (bootstrap)", "a 95% (t)", "b", "b 95% (bootstrap)", "b 95% (t)",
                    "budgets", "replicates bracketed"], exponent_rows(analysis), "lrrrrrrrr")
    ref = analysis.reference
    if analysis.candidates:
        rows = []
        for cand in analysis.candidates:
            fit_c, fit_r = analysis.fits[cand], analysis.fits[ref]
            da = (fit_c.n_opt_law.exponent - fit_r.n_opt_law.exponent
                  if fit_c.n_opt_law is not None and fit_r.n_opt_law is not None else math.nan)
            db = (fit_r.loss_law.exponent - fit_c.loss_law.exponent
                  if fit_c.loss_law is not None and fit_r.loss_law is not None else math.nan)
            comp = analysis.bootstrap.comparisons.get(cand) if analysis.bootstrap is not None else None
            nan2 = (math.nan, math.nan)
            rows.append([f"{name(cand)} − {name(ref)}", num(da, "+.3f"),
                         ci(comp.delta_a_ci95 if comp else nan2, "+.3f"), num(db, "+.4f"),
                         ci(comp.delta_b_ci95 if comp else nan2, "+.4f")])
        lines += ["", f"Exponent differences from the reference ({name(ref)}); an interval containing 0 means the "
                  "sweep cannot tell the exponents apart:", ""]
        lines += table(["difference", "Δa", "Δa 95% (bootstrap)", "Δb", "Δb 95% (bootstrap)"], rows, "lrrrr")
        for cand in analysis.candidates:
            lines += ["", f"Compute multiplier k(C), {name(cand)} vs {name(ref)} (95% bootstrap intervals):", ""]
            rows = [[num(r.budget), num(r.parametric), ci(r.parametric_ci95), num(r.nonparametric),
                     ci(r.nonparametric_ci95), r.method] for r in analysis.multipliers_for(cand)]
            lines += (table([f"{name(ref)} budget C", "k (power laws)", "95%", "k (non-parametric)", "95%", "how"],
                            rows, "rrrrrl") if rows else
                      [f"No multiplier: no {name(ref)} budget has a usable optimum."])
        lines += ["", *interpretation(analysis)]
    return lines


def results_section(points: pd.DataFrame) -> list[str]:
    """The seed-averaged results table."""
    get = lambda row, col: float(row[col]) if col in row and pd.notna(row[col]) else math.nan  # noqa: E731
    rows = []
    for _, r in points.iterrows():
        loss = num(r["loss"], ".4f") + (f" ± {r['loss_std']:.4f}" if r["n_seeds"] > 1 else "")
        rows.append([name(r["objective"]), str(r["size"]), num(float(r["n_nonemb"])), num(float(r["budget"])),
                     num(get(r, "tokens")), num(get(r, "max_steps"), ".0f"), str(int(r["n_seeds"])), loss,
                     num(get(r, "val_bpb"), ".4f"), duration(get(r, "wall_time_s"))])
    header = ["objective", "size", "N (non-emb.)", "budget C", "D (tokens)", "steps", "seeds", "val nats/token",
              "val bits/byte", "wall time"]
    return ["## Results", "", "Seed means (± sample std over seeds); one row per (objective, size, budget).", "",
            *table(header, rows, "llrrrrrrrr")]


def optima_section(analysis: SweepAnalysis) -> list[str]:
    """Per-budget optimum of each objective: bracketed vertex or fallback, with intervals."""
    rows, skipped = [], []
    boots = analysis.bootstrap.objectives if analysis.bootstrap is not None else {}
    six_nd = analysis.compute == "6nd"
    for obj, fit in analysis.fits.items():
        boot = boots.get(obj)
        for c in fit.budgets:
            p = fit.parabolas.get(c)
            found = fit.optimum(c, analysis.exclude_extrapolated)
            if p is None:
                kind, flag = "fallback: best measured size", "no parabola (< 3 sizes)"
            elif p.bracketed:
                kind, flag = "bracketed vertex", ""
            else:
                kind = "fallback: best measured size"
                flag = ("opens downward: no minimum" if p.opens_downward else
                        f"vertex N={num(p.n_opt)} outside the sampled sizes" if p.extrapolated else
                        f"vertex N={num(p.n_opt)} on the edge of the sampled sizes")
            if found is None:
                kind = "left out (not bracketed)"
            n_opt, l_opt = (found[0], found[1]) if found else (math.nan, math.nan)
            n_ci = l_ci = "—"
            if boot is not None and found is not None:
                n_ci, l_ci = ci(boot.n_opt_ci95(c)), ci(boot.loss_opt_ci95(c), ".4f")
                if boot.method(c) == "none":
                    flag = "; ".join(filter(None, [flag, "no noise estimate"]))
            d_opt = c / (6 * n_opt) if six_nd and math.isfinite(n_opt) else math.nan
            rows.append([name(obj), num(c), str(p.n_sizes if p else fit_sizes(analysis, obj, c)), kind, num(n_opt),
                         n_ci, num(d_opt), num(l_opt, ".4f"), l_ci, *fit_quality(p), flag])
        skipped += [f"- {name(obj)}: {reason}" for _, reason in sorted(fit.skipped.items())]
    d_note = ("D_opt = C / (6 N_opt)." if six_nd else
              "D_opt is not shown: on the matmul axis C is not 6·N·D.")
    lines = ["## Iso-FLOP optima", "",
             "Per budget, a least-squares parabola of loss against ln N; its vertex is (N_opt, L_opt) when "
             "*bracketed*: the parabola opens upward and its vertex lies strictly inside the sampled sizes, with a "
             "measured size on each side. Otherwise the budget falls back to its best measured size "
             f"(Chinchilla approach 1). {d_note} Intervals: bootstrap 95% percentile. Goodness of fit: R² of the "
             "parabola over its points and the RMS of its residuals (nats/token); a parabola through 3 sizes "
             "fits them exactly (no residual degrees of freedom: R² says nothing).", ""]
    lines += (table(["objective", "budget C", "sizes", "optimum", "N_opt", "N_opt 95%", "D_opt", "L_opt", "L_opt 95%",
                     "R²", "RMS resid.", "flag"], rows, "lrrlrrrrrrrl")
              if rows else ["No budget has an iso-FLOP parabola."])
    return lines + (["", "Budgets without a parabola:", *skipped] if skipped else [])


def fit_quality(parabola) -> list[str]:
    """``[R², RMS residual]`` of a budget's parabola (``exact`` with no residual degree of freedom)."""
    if parabola is None:
        return ["—", "—"]
    if parabola.dof <= 0:
        return ["exact", "0"]
    return [num(parabola.r2, ".3f"), num(parabola.rms_residual, ".2g")]


def fit_sizes(analysis: SweepAnalysis, objective: str, budget: float) -> int:
    pts = analysis.points
    return int(pts[(pts["objective"] == objective) & (pts["budget"] == budget)]["n_nonemb"].nunique())


def law_lines(fit: ObjectiveFit, six_nd: bool = True) -> list[str]:
    """The fitted laws of one objective as bullet points (``six_nd``: C = 6 N D, so the
    compute-optimal tokens scale as C^(1 - a))."""
    out, who = [], name(fit.objective)
    if fit.n_opt_law is not None:
        law = fit.n_opt_law
        out.append(f"- {who}: N_opt = A·C^a with a = {law.exponent:.3f} ± {num(law.exponent_se)} "
                   f"(t 95% CI {ci(law.exponent_ci95)}), A = {law.prefactor:.3g} (t 95% CI "
                   f"{ci(law.prefactor_ci95)}), {law.n_points} budgets, R² = {law.r_squared:.4f}"
                   + (f"; so D_opt ∝ C^{1 - law.exponent:.3f}" if six_nd else ""))
    if fit.loss_law is not None:
        law = fit.loss_law
        lo, hi = law.exponent_ci95
        out.append(f"- {who}: L_opt = A·C^-b with b = {-law.exponent:.4f} ± {num(law.exponent_se)} "
                   f"(t 95% CI {ci((-hi, -lo))}), A = {law.prefactor:.3g} (t 95% CI {ci(law.prefactor_ci95)}), "
                   f"R² = {law.r_squared:.4f}")
    if fit.loss_law_saturating is not None:
        sat = fit.loss_law_saturating
        out.append(f"- {who}: L_opt = E + A·C^-b with E = {sat.irreducible:.4f} ± {num(sat.irreducible_se)}, "
                   f"b = {sat.decay:.4f} ± {num(sat.decay_se)}, A = {sat.prefactor:.3g} ± {num(sat.prefactor_se)}")
    out += [f"- {who}: {n}" for n in fit.notes]
    return out or [f"- {who}: no laws fitted"]


def laws_section(analysis: SweepAnalysis) -> list[str]:
    used = ("bracketed parabola minima only" if analysis.exclude_extrapolated else
            "the parabola's minimum where it is bracketed, else the best measured size")
    lines = ["## Fitted laws", "",
             f"Ordinary least squares in log-log space on the per-budget optima ({used}); ± is one standard "
             "error, *t* intervals are t-based 95%. With two budgets a line passes exactly through both and the "
             "t interval is undefined; the bootstrap intervals of the headline still exist (they come from "
             "the per-budget fit noise).", ""]
    for fit in analysis.fits.values():
        lines += law_lines(fit, analysis.compute == "6nd")
    return lines


def interpretation(analysis: SweepAnalysis) -> list[str]:
    """A sentence per candidate on its multipliers, and SMDM's ~16x for scale."""
    out, ref = [], analysis.reference
    for cand in analysis.candidates:
        rows = analysis.multipliers_for(cand)
        ks = np.array([r.nonparametric if np.isfinite(r.nonparametric) else r.parametric for r in rows], dtype=float)
        ks = ks[np.isfinite(ks) & (ks > 0)]
        if ks.size == 0:
            out.append(f"- {name(cand)} vs {name(ref)}: no finite multiplier could be estimated at the measured "
                       "budgets.")
            continue
        mean = float(np.exp(np.log(ks).mean()))
        spread = f" (from {ks.min():.3g}x to {ks.max():.3g}x)" if ks.size > 1 else ""
        verdict = (f"the {name(cand)} needs about {mean:.3g}x{spread} the compute of the {name(ref)} to reach the "
                   "same validation loss" if mean >= 1 else
                   f"the {name(cand)} reaches the {name(ref)}'s loss with about {1 / mean:.3g}x less compute{spread}")
        elbo = (f" The {name(cand)}'s loss is a Monte-Carlo negative ELBO, an upper bound on its NLL, so the "
                f"multiplier overstates its true likelihood gap, if anything."
                if not exact_likelihood(cand) and exact_likelihood(ref) else "")
        pinned = all(math.isfinite(lo) and math.isfinite(hi) and lo > 0 and hi / lo <= K_RATIO_MAX
                     for lo, hi in map(multiplier_interval, rows))
        caveat = "" if pinned else (" This is a point estimate only: its 95% intervals do not pin it down (see the "
                                    "verdict above).")
        out.append(f"- {name(cand)} vs {name(ref)}: at the measured budgets {verdict} (geometric mean).{caveat}{elbo}")
    out.append(f"- For scale: SMDM reports roughly {SMDM_MULTIPLIER:.0f}x for MDM vs AR at their scale.")
    return out


def multiplier_section(analysis: SweepAnalysis) -> list[str]:
    ref = name(analysis.reference)
    lines = ["## Compute multiplier", "",
             f"k(C) = C'/C where the candidate trained with C' FLOPs reaches the {ref}'s L_opt(C). *Power laws*: "
             "from the fitted pure laws L = A·C^-b, C' = (A_cand / A_ref · C^b_ref)^(1/b_cand) (= (A_cand/A_ref)^(1/b) "
             "for all C when the exponents are equal). *Non-parametric*: linear interpolation of the candidate's "
             "measured optima in (ln C, ln L), extrapolated from the nearest measured budget along the candidate's "
             "fitted exponent outside them. Intervals: bootstrap 95% percentile; an upper end of inf means more than "
             "2.5% of the replicates never reach the loss."]
    for cand in analysis.candidates:
        rows = [[num(r.budget), num(r.reference_loss_opt, ".4f"), num(r.parametric), ci(r.parametric_ci95),
                 num(r.nonparametric), ci(r.nonparametric_ci95), num(r.candidate_compute), r.method]
                for r in analysis.multipliers_for(cand)]
        lines += ["", f"### {name(cand)} vs {ref}", ""]
        lines += (table([f"{ref} budget C", f"{ref} L_opt", "k (power laws)", "95%", "k (non-parametric)", "95%",
                         f"{name(cand)} compute C'", "how"], rows, "rrrrrrrl") if rows else
                  [f"No multiplier: no {ref} budget has a usable optimum."])
    lines += [""] * bool(analysis.notes) + [f"- {n}" for n in analysis.notes]
    return lines


def bootstrap_section(analysis: SweepAnalysis) -> list[str]:
    """How the intervals were made, per objective and comparison."""
    boot = analysis.bootstrap
    if boot is None:
        return []
    lines = ["## Bootstrap", "",
             f"{boot.replicates} replicates, generator seed {boot.seed}. Per (size, budget) cell: with >= 2 seeds "
             "the seeds are resampled with replacement (deviations from the cell mean inflated by sqrt(n/(n-1)) so "
             "that the variance of the mean is unbiased); single-seed cells get Gaussian noise with the objective's "
             "pooled seed std when it has one, otherwise each parabola is residual-bootstrapped (residuals scaled by "
             "sqrt(m/(m-3)) for its 3 parameters and, by default, pooled over the objective's parabolas: a single "
             "parabola of 5 sizes has only 2 residual degrees of freedom, too few to estimate the noise). Each "
             "replicate re-runs the estimator of the point estimate on its resampled losses: per budget the "
             "parabola's vertex where the replicate brackets it, else its best measured size (no replicate is "
             "dropped). How often each budget stayed bracketed measures how robust its bracket is.", ""]
    rows = []
    for obj, ob in boot.objectives.items():
        methods = "; ".join(f"{m} ×{k}" for m, k in boot.methods(obj).items()) or "—"
        per_budget = ", ".join(f"C={c:.3g}: {100 * ob.bracket_held(float(c)):.0f}%" for c in ob.budgets)
        rows.append([name(obj), methods, f"{100 * ob.bracket_held():.1f}%", per_budget])
    lines += table(["objective", "resampling (budgets)", "all budgets bracketed", "bracketed, per budget"],
                   rows, "llrl")
    unused = {cand: comp for cand, comp in boot.comparisons.items() if comp.used_fraction < 1}
    lines += [""] * bool(unused)
    for cand, comp in unused.items():  # an optimum with a non-positive loss: practically never
        lines.append(f"- {name(cand)} vs {name(comp.reference)}: {100 * (1 - comp.used_fraction):.1f}% of replicates "
                     "had an optimum with a non-positive loss and are left out of the intervals.")
    return lines


def hyperparameter_section(results: pd.DataFrame, limit: int = 6) -> list[str]:
    """The distinct values of every column that is not a known result column."""
    extra = [c for c in results.columns if c not in KNOWN_COLUMNS]
    if not extra:
        return []
    lines = ["## Hyperparameters", "",
             "Distinct values across runs (carried from results.csv, not used by the fits).", ""]
    for col in extra:
        values = pd.unique(results[col].dropna())
        shown = ", ".join(map(str, values[:limit])) + (f", … ({len(values)} values)" if len(values) > limit else "")
        lines.append(f"- `{col}`: {shown or '—'}")
    return lines


def figures_section(figures: dict[str, list[Path]], report_dir: Path) -> list[str]:
    titles = {"loss_vs_flops": "Validation loss vs training FLOPs", "isoflop": "Iso-FLOP slices",
              "scaling_laws": "Fitted laws: N_opt(C) and L_opt(C)"}
    lines = ["## Figures", ""]
    for stem, paths in figures.items():
        rel = [os.path.relpath(p, report_dir) for p in paths]
        png = next((r for r in rel if r.endswith(".png")), rel[0])
        others = ", ".join(f"[{Path(r).suffix[1:]}]({r})" for r in rel)
        lines += [f"![{titles.get(stem, stem)}]({png})", f"{titles.get(stem, stem)} ({others})", ""]
    return lines


def title(analysis: SweepAnalysis) -> str:
    ref = analysis.reference
    if analysis.candidates:
        return ", ".join(f"{name(c)} vs {name(ref)}" for c in analysis.candidates)
    return ", ".join(name(o) for o in analysis.objectives) or "no objectives"


def render_report(analysis: SweepAnalysis, results: pd.DataFrame, figures: dict[str, list[Path]],
                  run_dir: Path, report_dir: Path) -> str:
    """The whole markdown report."""
    objectives = results["objective"].astype(str).str.lower()
    runs = ", ".join(f"{int((objectives == obj).sum())} {name(obj)}" for obj in analysis.objectives)
    exact = [name(o) for o in analysis.objectives if exact_likelihood(o)]
    bounds = [name(o) for o in analysis.objectives if not exact_likelihood(o)]
    kinds = "; ".join(filter(None, [f"{', '.join(exact)}: exact NLL" if exact else "",
                                    f"{', '.join(bounds)}: Monte-Carlo negative ELBO, an upper bound on the NLL"
                                    if bounds else ""]))
    header = [f"# Scaling sweep: {title(analysis)}", "",
              f"Sweep `{run_dir}`: {len(results)} finished runs ({runs}). Metric: "
              f"{METRIC_LABELS.get(analysis.metric, analysis.metric)} on the same validation tokens ({kinds}). "
              f"Reference objective: {name(analysis.reference)}.", "",
              f"Compute axis: {COMPUTE_AXES[analysis.compute]}; N is the non-embedding parameter count. Fits follow "
              "Chinchilla approach 2 (iso-FLOP parabolas).", ""]
    sections = [headline_section(analysis), multiplier_section(analysis), laws_section(analysis),
                optima_section(analysis), bootstrap_section(analysis), results_section(analysis.points),
                figures_section(figures, report_dir), hyperparameter_section(results)]
    body = [line for section in sections if section for line in (*section, "")]
    return "\n".join(header + body).rstrip() + "\n"


# --------------------------------------------------------------------------- entry point


def analyze(run_dir: str | Path, out_dir: str | Path | None = None, *, metric: str = "val_nll_per_token",
            exclude_extrapolated: bool = False, strict: bool = False, reference: str = DEFAULT_REFERENCE,
            bootstrap: int = BOOTSTRAP_REPLICATES, bootstrap_seed: int = BOOTSTRAP_SEED) -> Path:
    """Analyse a finished (or partly finished) sweep and write its report.

    Args:
        run_dir: the sweep directory holding ``results.csv`` (and optionally ``tb/``).
        out_dir: where to write; default ``run_dir/analysis``.
        metric: the loss column to fit (``val_nll_per_token`` or ``val_bpb``).
        exclude_extrapolated: leave budgets without a bracketed vertex out of the laws.
        strict: raise on a budget with fewer than 3 sizes instead of skipping it.
        reference: the objective every other one is compared with.
        bootstrap: bootstrap replicates for the intervals (0: none); ``bootstrap_seed`` seeds them.

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    results = load_results(run_dir, metric)
    analysis = analyze_results(results, metric=metric, exclude_extrapolated=exclude_extrapolated, strict=strict,
                               reference=reference, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed)
    curves = load_training_curves(run_dir, results, metric, analysis.compute)
    log.info("%d run(s) with TensorBoard curves", curves["run_id"].nunique())
    figures = make_figures(analysis, curves, out)
    report = out / REPORT_FILE
    write_text(report, render_report(analysis, results, figures, run_dir, out))
    log.info("wrote %s", report)
    return report
