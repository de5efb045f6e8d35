"""The sweep report: ``analyze(run_dir)`` reads ``results.csv``, fits, draws, writes markdown.

Writes into ``out_dir`` (default ``RUN_DIR/analysis/``): ``report.md`` and the figures
``loss_vs_flops``, ``isoflop`` and ``scaling_laws``, each as ``.png`` and ``.svg``. Every file
is written atomically (temporary file + ``os.replace``). Nothing is printed; warnings about
the fits (extrapolated minima, skipped budgets, ...) go to ``logging`` and into the report.
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
from lldiff.sweep.analysis import (AR, CARRIED_NUMERIC, MDM, REQUIRED_COLUMNS, MultiplierRow, ObjectiveFit,
                                   SweepAnalysis, analyze_results, validate_results)
from lldiff.sweep.figures import METRIC_LABELS, OBJECTIVE_NAMES, load_training_curves, make_figures

log = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
REPORT_FILE = "report.md"
SMDM_MULTIPLIER = 16.0
#: results.csv columns that are not hyperparameters (everything else is listed as one).
KNOWN_COLUMNS = {*REQUIRED_COLUMNS, *CARRIED_NUMERIC, "seed", "val_nll_per_token", "val_bpb", "spec_fingerprint",
                 "finished_at"}


# --------------------------------------------------------------------------- input / output


def load_results(run_dir: str | Path, metric: str = "val_nll_per_token") -> pd.DataFrame:
    """``RUN_DIR/results.csv`` as a data frame.

    Raises:
        FileNotFoundError: no results.csv in ``run_dir``.
        ValueError: the file is empty or lacks required columns (named in the message).
    """
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {Path(run_dir)}: has the sweep finished any run?")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{path} is empty: no finished runs") from err
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
    return OBJECTIVE_NAMES.get(objective, objective)


# --------------------------------------------------------------------------- sections


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


def optima_section(fits: dict[str, ObjectiveFit]) -> list[str]:
    """Per-budget parabola minima of each objective, with flags, and skipped budgets."""
    rows, skipped = [], []
    for obj, fit in fits.items():
        for c, p in sorted(fit.parabolas.items()):
            flag = "opens downward: no minimum" if p.opens_downward else "extrapolated" if p.extrapolated else ""
            found = fit.optimum(c)
            if found and found[2] == "frontier":
                flag += f"; used the best measured size instead: N={num(found[0])}, L={num(found[1], '.4f')}"
            d_opt = c / (6 * p.n_opt) if p.usable else math.nan
            rows.append([name(obj), num(c), str(p.n_sizes), num(p.n_opt), num(d_opt), num(p.loss_opt, ".4f"), flag])
        skipped += [f"- {name(obj)}: {reason}" for _, reason in sorted(fit.skipped.items())]
    lines = ["## Iso-FLOP optima", "",
             "Per budget, a least-squares parabola of loss against ln N; its vertex is (N_opt, L_opt), "
             "D_opt = C / (6 N_opt). *Extrapolated*: the vertex lies outside the sampled sizes.", ""]
    lines += (table(["objective", "budget C", "sizes", "N_opt", "D_opt", "L_opt", "flag"], rows, "lrrrrrl")
              if rows else ["No budget has an iso-FLOP parabola."])
    return lines + (["", "Budgets without a parabola:", *skipped] if skipped else [])


def law_lines(fit: ObjectiveFit) -> list[str]:
    """The fitted laws of one objective as bullet points."""
    out, who = [], name(fit.objective)
    if fit.n_opt_law is not None:
        law = fit.n_opt_law
        out.append(f"- {who}: N_opt = A·C^a with a = {law.exponent:.3f} ± {num(law.exponent_se)} "
                   f"(95% CI {ci(law.exponent_ci95)}), A = {law.prefactor:.3g} (95% CI {ci(law.prefactor_ci95)}), "
                   f"{law.n_points} budgets, R² = {law.r_squared:.4f}; so D_opt ∝ C^{1 - law.exponent:.3f}")
    if fit.loss_law is not None:
        law = fit.loss_law
        lo, hi = law.exponent_ci95
        out.append(f"- {who}: L_opt = A·C^-b with b = {-law.exponent:.4f} ± {num(law.exponent_se)} "
                   f"(95% CI {ci((-hi, -lo))}), A = {law.prefactor:.3g} (95% CI {ci(law.prefactor_ci95)}), "
                   f"R² = {law.r_squared:.4f}")
    if fit.loss_law_saturating is not None:
        sat = fit.loss_law_saturating
        out.append(f"- {who}: L_opt = E + A·C^-b with E = {sat.irreducible:.4f} ± {num(sat.irreducible_se)}, "
                   f"b = {sat.decay:.4f} ± {num(sat.decay_se)}, A = {sat.prefactor:.3g} ± {num(sat.prefactor_se)}")
    out += [f"- {who}: {n}" for n in fit.notes]
    return out or [f"- {who}: no laws fitted"]


def laws_section(analysis: SweepAnalysis) -> list[str]:
    used = ("parabola minima inside the sampled sizes only" if analysis.exclude_extrapolated else
            "the parabola's minimum where it lies inside the sampled sizes, else the best measured size")
    lines = ["## Fitted laws", "",
             f"Ordinary least squares in log-log space on the per-budget optima ({used}); ± is one standard "
             "error, intervals are t-based 95%. With two budgets a line passes exactly through both and the "
             "uncertainty is undefined.", ""]
    for fit in analysis.fits.values():
        lines += law_lines(fit)
    return lines


def interpretation(rows: list[MultiplierRow]) -> str:
    """One sentence on the multipliers, against SMDM's ~16x."""
    ks = np.array([r.nonparametric if np.isfinite(r.nonparametric) else r.parametric for r in rows], dtype=float)
    ks = ks[np.isfinite(ks) & (ks > 0)]
    if ks.size == 0:
        return "No finite multiplier could be estimated at the measured budgets."
    mean = float(np.exp(np.log(ks).mean()))
    spread = f" (from {ks.min():.3g}x to {ks.max():.3g}x)" if ks.size > 1 else ""
    verdict = (f"the MDM needs about {mean:.3g}x{spread} the compute of the AR model to reach the same validation loss"
               if mean >= 1 else f"the MDM reaches the AR model's loss with about {1 / mean:.3g}x less compute{spread}")
    return (f"At the measured budgets {verdict} (geometric mean); SMDM reports roughly {SMDM_MULTIPLIER:.0f}x at "
            "their scale. The MDM's loss is a Monte-Carlo negative ELBO, an upper bound on its NLL, so the "
            "multiplier overstates the MDM's true likelihood gap, if anything.")


def multiplier_section(analysis: SweepAnalysis) -> list[str]:
    lines = ["## Compute multiplier", "",
             "k(C) = C'/C where the MDM trained with C' FLOPs reaches the AR model's L_opt(C). "
             "*Power laws*: from the fitted pure laws L = A·C^-b, C' = (A_mdm / A_ar · C^b_ar)^(1/b_mdm) "
             "(= (A_mdm/A_ar)^(1/b) for all C when the exponents are equal). *Non-parametric*: linear "
             "interpolation of the MDM's measured optima in (ln C, ln L), extrapolated from the nearest measured "
             "budget along the MDM's fitted exponent outside them.", ""]
    rows = [[num(r.budget), num(r.ar_loss_opt, ".4f"), num(r.parametric), num(r.nonparametric), num(r.mdm_compute),
             r.method] for r in analysis.multipliers]
    if rows:
        lines += table(["AR budget C", "AR L_opt", "k (power laws)", "k (non-parametric)", "MDM compute C'", "how"],
                       rows, "rrrrrl")
        lines += ["", interpretation(analysis.multipliers)]
    elif not analysis.notes:
        lines.append("No multiplier: no AR budget has a usable iso-FLOP minimum.")
    lines += [f"- {n}" for n in analysis.notes]
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


def render_report(analysis: SweepAnalysis, results: pd.DataFrame, figures: dict[str, list[Path]],
                  run_dir: Path, report_dir: Path) -> str:
    """The whole markdown report."""
    runs = {obj: int((results["objective"].astype(str).str.lower() == obj).sum()) for obj in (AR, MDM)}
    header = ["# Scaling sweep: MDM vs AR", "",
              f"Sweep `{run_dir}`: {len(results)} finished runs ({runs[AR]} AR, {runs[MDM]} MDM). Metric: "
              f"{METRIC_LABELS.get(analysis.metric, analysis.metric)} on the same validation tokens (AR: exact NLL; "
              "MDM: Monte-Carlo negative ELBO, an upper bound on its NLL). Compute C = 6·N·D with N the "
              "non-embedding parameters (SMDM); fits follow Chinchilla approach 2.", ""]
    sections = [multiplier_section(analysis), laws_section(analysis), optima_section(analysis.fits),
                results_section(analysis.points), figures_section(figures, report_dir),
                hyperparameter_section(results)]
    body = [line for section in sections if section for line in (*section, "")]
    return "\n".join(header + body).rstrip() + "\n"


# --------------------------------------------------------------------------- entry point


def analyze(run_dir: str | Path, out_dir: str | Path | None = None, *, metric: str = "val_nll_per_token",
            exclude_extrapolated: bool = False, strict: bool = False) -> Path:
    """Analyse a finished (or partly finished) sweep and write its report.

    Args:
        run_dir: the sweep directory holding ``results.csv`` (and optionally ``tb/``).
        out_dir: where to write; default ``run_dir/analysis``.
        metric: the loss column to fit (``val_nll_per_token`` or ``val_bpb``).
        exclude_extrapolated: leave parabola minima outside the sampled sizes out of the laws.
        strict: raise on a budget with fewer than 3 sizes instead of skipping it.

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    results = load_results(run_dir, metric)
    analysis = analyze_results(results, metric=metric, exclude_extrapolated=exclude_extrapolated, strict=strict)
    curves = load_training_curves(run_dir, results, metric)
    log.info("%d run(s) with TensorBoard curves", curves["run_id"].nunique())
    figures = make_figures(analysis, curves, out)
    report = out / REPORT_FILE
    write_text(report, render_report(analysis, results, figures, run_dir, out))
    log.info("wrote %s", report)
    return report
