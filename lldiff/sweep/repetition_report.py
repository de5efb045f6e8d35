"""Report of a data-constrained study (SPEC §11): repeated data vs the fresh-data control.

``analyze_repetition(repeated_dir, fresh_dir=None, out_dir=None)`` reads two sweep directories
(``results.csv`` + TensorBoard events under ``tb/<run_id>``):

* ``repeated_dir``: one model size trained on the same ``U`` unique tokens for ``E`` epochs, one
  run per (objective, E) (``unique_tokens`` and ``epochs`` filled in);
* ``fresh_dir`` (optional): the fresh-data control (:func:`lldiff.sweep.plan.fresh_control`), the
  same runs on ``E x U`` distinct tokens for the ``E`` that fit in one pass over the data.

and writes into ``out_dir`` (default ``repeated_dir/analysis``), each file atomically:
``report.md``, ``results.json``, the figures ``loss_vs_epochs``, ``loss_vs_compute`` and
``curves_by_epochs`` (PNG + SVG), and TensorBoard scalars and the report's text under
``out_dir/tb/data_constrained``.

The numbers come from :mod:`lldiff.sweep.repetition_analysis` (how R* is estimated, how the
fresh runs are placed on the epochs axis), the figures from :mod:`lldiff.sweep.repetition_figures`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lldiff.atomic import write_text
from lldiff.sweep.figures import save_figure
from lldiff.sweep.objective_facts import DEFAULT_REFERENCE, exact_likelihood, objective_name
from lldiff.sweep.repetition import RepetitionFit, RStarFit
from lldiff.sweep.repetition_analysis import (LOSS, Crossover, ObjectiveResult, analyze_objective, compare, load_fresh,
                                              load_repeated, seed_mean)
from lldiff.sweep.repetition_figures import (num, plot_curves_by_epochs, plot_loss_vs_compute, plot_loss_vs_epochs,
                                             training_curves)

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
JSON_FILE = "results.json"
TB_RUN = "data_constrained"
#: SPEC §11 (Muennighoff et al. 2023; Prabhudesai et al. 2025): published values, for comparison.
PUBLISHED = {"ar": {"r_star": 15.0, "useful_epochs": 4.0}, "mdm": {"r_star": 500.0, "useful_epochs": 100.0}}
PUBLISHED_TEXT = ("Published (SPEC §11; Muennighoff et al. 2023, Prabhudesai et al. 2025): AR R* ≈ 15, MDM R* ≈ 500; "
                  "AR gains from up to ~4 epochs, MDM from up to ~100; at enough compute the MDM's best loss is "
                  "lower (3.51 vs 3.71 on C4 at 100M unique tokens).")
#: objectives whose validation loss is an exact NLL (the others report a bound, the negative ELBO).


# --------------------------------------------------------------------------- formatting


def r_star_text(fit: RStarFit | RepetitionFit | None) -> str:
    """``R* = 2.7 (95% CI 1.0–7.9)``, ``R* ≥ 120 (...)``, etc."""
    if fit is None:
        return "not estimated"
    lo, hi = fit.r_star_ci95
    kind = fit.bounded
    if math.isnan(lo) or math.isnan(hi):
        return f"R* = {num(fit.r_star)} (one point: no interval)"
    if kind == "interval":
        return f"R* = {num(fit.r_star)} (95% CI {num(lo)}–{num(hi)})"
    if kind == "lower":
        return f"R* ≥ {num(lo)} (95% lower bound; consistent with R* → ∞; best fit {num(fit.r_star)})"
    if kind == "upper":
        return f"R* ≤ {num(hi)} (95% upper bound; consistent with R* → 0; best fit {num(fit.r_star)})"
    return f"R* unconstrained (best fit {num(fit.r_star)})"


def primary_r_star_text(res: ObjectiveResult) -> str:
    if res.primary == "fresh":
        text = r_star_text(res.r_star_fresh) + " from the fresh-data control"
        fitted = res.table[res.table["epochs"].isin(res.r_star_fresh.epochs)]
        n_out = int(fitted["extrapolated"].sum())
        if n_out:
            text += (f" (D' extrapolated beyond the fresh data at {n_out} of the {len(fitted)} fitted epochs; "
                     f"inside the fresh range only: {r_star_text(res.r_star_fresh_interpolated)})")
        return text
    if res.primary == "direct":
        return r_star_text(res.direct) + " from the direct fit (no fresh-data estimate)"
    reasons = "; ".join(res.notes.get(k, "") for k in ("r_star_fresh", "direct") if res.notes.get(k))
    return f"R* not estimated ({reasons})"


def crossover_text(c: Crossover) -> str:
    cand, ref = objective_name(c.candidate), objective_name(c.reference)
    if c.compute is None:
        text = (f"{cand}'s repeated-data loss does not drop below {ref}'s in the measured range "
                f"(C = {num(c.compute_range[0])}–{num(c.compute_range[1])} FLOPs)")
    elif c.already_below:
        text = (f"{cand}'s loss is already below {ref}'s at the smallest shared compute (C = {num(c.compute)} FLOPs, "
                f"E ≈ {num(c.epochs)}): the crossover is there or earlier")
    else:
        text = f"{cand}'s repeated-data loss drops below {ref}'s at C ≈ {num(c.compute)} FLOPs (E ≈ {num(c.epochs)})"
    if c.compute is not None:
        if c.compute_vs_best is None:
            text += f", but never below {ref}'s best loss (its lowest at any compute measured)"
        elif c.compute_vs_best > c.compute * (1 + 1e-9):
            text += (f", and below {ref}'s best loss so far from C ≈ {num(c.compute_vs_best)} FLOPs "
                     f"(E ≈ {num(c.epochs_vs_best)})")
        else:
            text += f" (also below {ref}'s best loss so far there)"
    if c.loss_ratio is not None:
        text += f"; at E = {num(c.common_epoch)} the {cand}/{ref} loss ratio is {c.loss_ratio:.3f}"
    return text


def headline(results: dict[str, ObjectiveResult], crossovers: list[Crossover], unique_tokens: float, size: str,
             fresh: bool) -> str:
    parts = [f"U = {unique_tokens:,.0f} unique tokens, model {size}, E = "
             f"{', '.join(num(v) for v in sorted({v for r in results.values() for v in r.table['epochs']}))} epochs"
             + ("" if fresh else ", no fresh-data control") + "."]
    best = "; ".join(f"{objective_name(o)} E = {num(r.best_epoch)} (loss {r.best_loss:.4f}; "
                     f"{r.loss_at_largest:.4f} at E = {num(r.largest_epoch)})" for o, r in results.items())
    parts.append(f"Best epoch count: {best}.")
    parts.append("R*: " + "; ".join(f"{objective_name(o)} {primary_r_star_text(r)}" for o, r in results.items())
                 + ".")
    cross = [r for r in results.values() if r.primary == "fresh" and r.direct is not None]
    if cross:
        parts.append("Direct fit (cross-check): " + "; ".join(f"{objective_name(r.objective)} {r_star_text(r.direct)}"
                                                             for r in cross) + ".")
    for c in crossovers:
        parts.append(crossover_text(c)[0].upper() + crossover_text(c)[1:] + ".")
    parts.append(PUBLISHED_TEXT)
    return " ".join(parts)


def _table_lines(res: ObjectiveResult, compute_label: str) -> list[str]:
    lines = [f"| E | tokens | compute ({compute_label}) | val loss | val bits/byte | fresh loss, same tokens | D'/U |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res.table.itertuples(index=False):
        mark = " (best)" if row.epochs == res.best_epoch else ""
        d = num(row.d_prime_u, ".3f") + ("*" if row.extrapolated and math.isfinite(row.d_prime_u) else "")
        if row.extrapolated and not math.isfinite(row.d_prime_u):
            d = "below the fresh law's floor"
        lines.append(f"| {num(row.epochs)}{mark} | {row.tokens:,.0f} | {row.flops:.3e} | {row.loss:.4f} | "
                     f"{num(row.bpb, '.4f')} | {num(row.fresh_loss, '.4f')} | {d} |")
    return lines


def _fresh_lines(res: ObjectiveResult) -> list[str]:
    if res.fresh.empty or not (res.fresh["source"] == "fresh").any():
        return []
    lines = ["", "Fresh-data points (the repeated E = 1 run and the control):", "",
             "| D/U | tokens | compute | val loss | source |", "|---:|---:|---:|---:|---|"]
    for row in res.fresh.itertuples(index=False):
        lines.append(f"| {row.x:.3f} | {row.tokens:,.0f} | {row.flops:.3e} | {row.loss:.4f} | {row.source} |")
    return lines


def render_report(results: dict[str, ObjectiveResult], crossovers: list[Crossover], meta: dict[str, Any],
                  figures: dict[str, list[Path]], out_dir: Path) -> str:
    compute_label = meta["compute"] or "FLOPs"
    lines = ["# Data-constrained training: repeated vs fresh data", "",
             headline(results, crossovers, meta["unique_tokens"], meta["size"], meta["fresh_dir"] is not None), "",
             f"Repeated-data sweep: `{meta['repeated_dir']}`; fresh-data control: "
             + (f"`{meta['fresh_dir']}`" if meta["fresh_dir"] else "none") + f". Reference objective: "
             f"{objective_name(meta['reference'])}. Losses are validation nats/token (seed means).", ""]
    for obj, res in results.items():
        name = objective_name(obj)
        lines += [f"## {name}", "", *_table_lines(res, compute_label), *_fresh_lines(res), ""]
        lines.append(f"- Best epoch count: E = {num(res.best_epoch)} (loss {res.best_loss:.4f}); at the largest, "
                     f"E = {num(res.largest_epoch)}: {res.loss_at_largest:.4f}.")
        if res.fresh_law is not None:
            law = res.fresh_law
            form = (f"{law.e_inf:.4f} + {law.b:.4f} (D/U)^-{law.beta:.4f}" if law.kind == "offset"
                    else f"{law.b:.4f} (D/U)^-{law.beta:.4f}")
            lines.append(f"- Fresh-data law: L = {form}; {law.note}.")
        if res.r_star_fresh is not None:
            lines.append(f"- R* from the fresh-data control: {r_star_text(res.r_star_fresh)}; {res.r_star_fresh.note}"
                         + (f"; {res.notes['r_star_fresh']}" if "r_star_fresh" in res.notes else "") + ".")
            if res.r_star_fresh_interpolated is not None:
                lines.append(f"- Sensitivity, D' inside the fresh range only: "
                             f"{r_star_text(res.r_star_fresh_interpolated)}; {res.r_star_fresh_interpolated.note}.")
        else:
            lines.append(f"- R* from the fresh-data control: not estimated ({res.notes.get('r_star_fresh', '')}).")
        if res.direct is not None:
            d = res.direct
            lines.append(f"- Direct fit L(E) = L_inf + B/D'(E)^beta: {r_star_text(d)}, L_inf = {d.l_inf:.4f}, "
                         f"beta = {d.beta:.3g}; {d.note}" + (f"; {res.notes['direct']}" if "direct" in res.notes
                                                             else "") + ".")
        else:
            lines.append(f"- Direct fit: not possible ({res.notes.get('direct', '')}).")
        if not exact_likelihood(obj):
            lines.append(f"- {name}'s validation loss is its negative ELBO, an upper bound on its NLL.")
        lines.append("")
    if crossovers:
        lines += ["## Crossover", ""]
        lines += [f"- {crossover_text(c)}." for c in crossovers]
        lines += ["", "Final losses of the runs, interpolated linearly in log compute between measured runs "
                  "(`crossover_compute`); the epoch count at the crossover is interpolated likewise. A reference "
                  "whose loss rises again (overfitting) is crossed early; \"best loss so far\" compares with the "
                  "reference's running minimum over compute instead (its best run at any compute up to there).", ""]
    lines += ["## Figures", ""]
    titles = {"loss_vs_epochs": "Final validation loss vs epochs (dashed, hollow: fresh data at the same tokens; "
                                "dotted: the R* model on the fresh law)",
              "loss_vs_compute": "Final validation loss vs training compute",
              "curves_by_epochs": "Validation loss during training vs epochs so far (tokens / U), coloured by E"}
    for stem, paths in figures.items():
        rel = [os.path.relpath(p, out_dir) for p in paths]
        png = next((r for r in rel if r.endswith(".png")), rel[0])
        lines += [f"![{titles.get(stem, stem)}]({png})", "", f"{titles.get(stem, stem)} ({', '.join(rel)})", ""]
    lines += ["## Method", "",
              "- Effective data D' (Muennighoff et al. 2023): the fresh data reaching a repeated run's loss. The fresh "
              "curve (the repeated E = 1 run at D = U plus the control at D = E U) is fitted with "
              "`fit_fresh_law`: L = E_inf + B (D/U)^-beta when the offset is significant (F test, p < 0.05, >= 4 "
              "points, 0 < E_inf < min L), else the pure power law L = B (D/U)^-beta (a straight line in "
              "log-log). D'/U is its inverse at each repeated loss; values outside the fresh range are marked * "
              "(extrapolated).",
              "- R* is the one parameter of D'/U = 1 + R* (1 − exp(−(E − 1)/R*)), fitted by least squares in ln D' "
              "on the epochs 1 < E <= best epoch (a rising loss is overfitting, which the form cannot express), "
              "weighted by the fresh law's (dL/d ln D)^2 at each D': equal noise on the losses is larger noise on "
              "ln D' where the law is flat (large, extrapolated D'), so those points count less. "
              "Its 95% interval is the likelihood (profile) interval RSS(R*) <= RSS_min (1 + F_0.95(1, n−1)/(n−1)) "
              "in ln R*, with R* = 0 and R* = ∞ evaluated exactly; an interval reaching ∞ is reported as a lower "
              "bound only.",
              "- Direct fit (`fit_repetition_decay`): L(E) = L_inf + B / D'(E)^beta on the loss-vs-epochs curve up "
              "to the best epoch, profile-likelihood interval for R*; needs 5 epochs (4 with beta fixed).", "",
              PUBLISHED_TEXT, ""]
    return "\n".join(lines)



# --------------------------------------------------------------------------- outputs


def _jsonable(v: Any) -> Any:
    """NaN -> null, ±inf -> "inf"/"-inf", numpy scalars -> Python."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        if math.isnan(f):
            return None
        return ("inf" if f > 0 else "-inf") if math.isinf(f) else f
    return v


def _fit_json(fit: RStarFit | RepetitionFit | None) -> dict[str, Any] | None:
    if fit is None:
        return None
    out = {"r_star": fit.r_star, "ci95": list(fit.r_star_ci95), "bounded": fit.bounded,
           "only_lower_bound": fit.bounded == "lower", "epochs": list(fit.epochs),
           "excluded_epochs": list(fit.excluded_epochs), "note": fit.note, "text": r_star_text(fit)}
    if isinstance(fit, RStarFit):
        out["effective_epochs"] = list(fit.effective_epochs)
    else:
        out.update(l_inf=fit.l_inf, beta=fit.beta, b=fit.b)
    return out


def results_json(results: dict[str, ObjectiveResult], crossovers: list[Crossover], meta: dict[str, Any]) -> dict:
    objectives = {}
    for obj, r in results.items():
        law = r.fresh_law
        objectives[obj] = {
            "best_epoch": r.best_epoch, "best_loss": r.best_loss, "largest_epoch": r.largest_epoch,
            "loss_at_largest_epoch": r.loss_at_largest, "exact_likelihood": exact_likelihood(obj),
            "r_star": {"primary": r.primary,
                       "value": (r.r_star_fresh.r_star if r.primary == "fresh" else
                                 r.direct.r_star if r.primary == "direct" else None),
                       "ci95": (list(r.r_star_fresh.r_star_ci95) if r.primary == "fresh" else
                                list(r.direct.r_star_ci95) if r.primary == "direct" else None),
                       "fresh": _fit_json(r.r_star_fresh),
                       "fresh_interpolated_only": _fit_json(r.r_star_fresh_interpolated),
                       "direct": _fit_json(r.direct)},
            "fresh_law": None if law is None else {"kind": law.kind, "e_inf": law.e_inf, "b": law.b,
                                                   "beta": law.beta, "x_range": list(law.x_range),
                                                   "note": law.note},
            "notes": dict(r.notes),
            "table": r.table.to_dict(orient="records"),
            "fresh_points": r.fresh.to_dict(orient="records") if not r.fresh.empty else [],
            "published": PUBLISHED.get(obj),
        }
    return _jsonable({**{k: (str(v) if isinstance(v, Path) else v) for k, v in meta.items()},
                      "objectives": objectives,
                      "crossovers": [{"candidate": c.candidate, "reference": c.reference, "found": c.compute is not None,
                                      "compute": c.compute, "epochs": c.epochs, "already_below": c.already_below,
                                      "compute_range": list(c.compute_range), "common_epoch": c.common_epoch,
                                      "compute_vs_best": c.compute_vs_best, "epochs_vs_best": c.epochs_vs_best,
                                      "loss_ratio_at_common_epoch": c.loss_ratio, "text": crossover_text(c)}
                                     for c in crossovers]})


def write_tensorboard(out_dir: Path, results: dict[str, ObjectiveResult], crossovers: list[Crossover],
                      markdown: str) -> Path:
    """Scalars (step = epochs) and the report's text under ``out_dir/tb/data_constrained``,
    written to a temporary directory and swapped in (a re-run replaces, never duplicates)."""
    from torch.utils.tensorboard import SummaryWriter

    target = Path(out_dir) / "tb" / TB_RUN
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{TB_RUN}."))
    try:
        with SummaryWriter(str(tmp)) as writer:
            for obj, r in results.items():
                for row in r.table.itertuples(index=False):
                    step = round(float(row.epochs))
                    writer.add_scalar(f"{TB_RUN}/{obj}/val_loss", row.loss, step)
                    if math.isfinite(row.bpb):
                        writer.add_scalar(f"{TB_RUN}/{obj}/val_bpb", row.bpb, step)
                    if math.isfinite(row.fresh_loss):
                        writer.add_scalar(f"{TB_RUN}/{obj}/fresh_val_loss", row.fresh_loss, step)
                    if math.isfinite(row.d_prime_u):
                        writer.add_scalar(f"{TB_RUN}/{obj}/effective_epochs", row.d_prime_u, step)
                writer.add_scalar(f"{TB_RUN}/{obj}/best_epoch", r.best_epoch, 0)
                fit = r.r_star_fresh if r.primary == "fresh" else r.direct
                if fit is not None and math.isfinite(fit.r_star):
                    writer.add_scalar(f"{TB_RUN}/{obj}/r_star", fit.r_star, 0)
            for c in crossovers:
                if c.compute is not None:
                    writer.add_scalar(f"{TB_RUN}/crossover/{c.candidate}_vs_{c.reference}_compute", c.compute, 0)
            writer.add_text(f"{TB_RUN}/report", markdown, 0)
        old = target.with_name(f".{TB_RUN}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> an ordinary directory
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------- entry point


def analyze_repetition(repeated_dir: Path | str, fresh_dir: Path | str | None = None,
                       out_dir: Path | str | None = None, *, reference: str = DEFAULT_REFERENCE) -> Path:
    """Analyse a data-constrained study and write its report; returns the path of ``report.md``.

    Args:
        repeated_dir: the repeated-data sweep directory (``results.csv``, ``tb/``).
        fresh_dir: the fresh-data control's sweep directory, or None (R* then from the direct fit).
        out_dir: where to write (default ``repeated_dir/analysis``).
        reference: the objective the others are compared with (when present; else the first by name).

    Raises:
        ValueError: a directory without results.csv, a table that is not a repeated-data sweep
            (or, for ``fresh_dir``, one that is), mixed ``unique_tokens``, several model sizes.
    """
    repeated_dir = Path(repeated_dir)
    out = Path(out_dir) if out_dir is not None else repeated_dir / "analysis"
    raw, unique_tokens = load_repeated(repeated_dir)
    fresh_raw = load_fresh(Path(fresh_dir)) if fresh_dir is not None else None
    repeated = seed_mean(raw, ["objective", "epochs"])
    fresh = None
    if fresh_raw is not None:
        fresh = seed_mean(fresh_raw, ["objective", "budget" if "budget" in fresh_raw else "tokens"])
    names = sorted(set(repeated["objective"]))
    ref = reference if reference in names else names[0]
    order = [ref] + [o for o in names if o != ref]
    results = {o: analyze_objective(o, repeated, unique_tokens, fresh) for o in order}
    crossovers = [compare(results[o], results[ref]) for o in order[1:]]
    if fresh is not None:
        extra = sorted(set(fresh["objective"]) - set(names))
        if extra:
            log.warning("fresh-data control has objectives without repeated runs (ignored): %s", extra)
    computes = sorted(set(raw["compute"].dropna().astype(str))) if "compute" in raw else []
    meta = {"repeated_dir": str(repeated_dir), "fresh_dir": str(fresh_dir) if fresh_dir is not None else None,
            "unique_tokens": unique_tokens, "size": str(raw["size"].iloc[0]),
            "n_nonemb": float(raw["n_nonemb"].iloc[0]) if "n_nonemb" in raw else None,
            "compute": computes[0] if len(computes) == 1 else None, "reference": ref, "loss": LOSS}

    figures = {
        "loss_vs_epochs": save_figure(plot_loss_vs_epochs(results), out, "loss_vs_epochs"),
        "loss_vs_compute": save_figure(plot_loss_vs_compute(results, crossovers, meta["compute"]), out,
                                       "loss_vs_compute"),
        "curves_by_epochs": save_figure(plot_curves_by_epochs(training_curves(repeated_dir, raw, unique_tokens),
                                                              order, results, unique_tokens), out,
                                        "curves_by_epochs"),
    }
    markdown = render_report(results, crossovers, meta, figures, out)
    report = out / REPORT_FILE
    write_text(out / JSON_FILE, json.dumps(results_json(results, crossovers, meta), indent=2) + "\n")
    write_tensorboard(out, results, crossovers, markdown)
    write_text(report, markdown)
    return report
