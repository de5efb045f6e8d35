"""Figures of a scaling sweep: training curves, iso-FLOP slices, fitted laws.

Rendering is headless: figures are plain ``matplotlib.figure.Figure`` objects drawn on an
Agg canvas (no pyplot, no global backend switch, safe in notebooks and worker processes).
Each figure is saved as PNG and SVG, each written to a temporary file in the target
directory and moved into place with ``os.replace`` (a reader never sees half a file).

The training curves come from the runs' TensorBoard events
(``RUN_DIR/tb/<run_id>/events.out.tfevents.*``): the validation loss against
``trainer/flops`` at the same global step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from lldiff.atomic import replacing
from lldiff.sweep.analysis import AR, MDM, ObjectiveFit, SweepAnalysis

log = logging.getLogger(__name__)

#: results.csv metric column -> TensorBoard scalar tag.
METRIC_TAGS = {"val_nll_per_token": "val/nll_per_token", "val_bpb": "val/bpb"}
METRIC_LABELS = {"val_nll_per_token": "validation loss (nats/token)", "val_bpb": "validation bits/byte"}
LINESTYLES = {AR: "-", MDM: "--"}
MARKERS = {AR: "o", MDM: "^"}
OBJECTIVE_COLORS = {AR: "tab:blue", MDM: "tab:red"}
OBJECTIVE_NAMES = {AR: "AR", MDM: "MDM"}
FORMATS = ("png", "svg")


# --------------------------------------------------------------------------- TensorBoard


def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """All scalar series under ``tb_dir`` as ``{tag: {step: value}}``, merged over its event
    files in name (= creation time) order, later files winning on repeated steps. Files
    directly in ``tb_dir`` are used; only when there are none, files in its sub-directories
    (e.g. ``version_*``). Empty when there are none or ``tb_dir`` does not exist."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import: lazily

    files = sorted(tb_dir.glob("events.out.tfevents.*")) or sorted(tb_dir.rglob("events.out.tfevents.*"))
    series: dict[str, dict[int, float]] = {}
    for path in files:
        try:
            acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
            acc.Reload()
        except Exception as err:  # a truncated file from a killed run must not stop the report
            log.warning("skipping unreadable event file %s: %s", path, err)
            continue
        for tag in acc.Tags().get("scalars", []):
            series.setdefault(tag, {}).update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    return series


def flops_at(steps: np.ndarray, scalars: dict[str, dict[int, float]], n_nonemb: float | None) -> np.ndarray:
    """``trainer/flops`` at the given steps: logged at the step if it was, else ``6 N`` times
    ``trainer/tokens`` logged at the step, else linear interpolation in the step between the
    known values (clamped at the ends); NaN when nothing is known."""
    known = dict(scalars.get("trainer/flops", {}))
    if n_nonemb:
        for step, tokens in scalars.get("trainer/tokens", {}).items():
            known.setdefault(step, 6.0 * n_nonemb * tokens)
    if not known:
        return np.full(len(steps), np.nan)
    ks = np.array(sorted(known))
    return np.interp(steps, ks, np.array([known[k] for k in ks]))


def read_training_curve(tb_dir: Path, metric: str = "val_nll_per_token", n_nonemb: float | None = None) -> pd.DataFrame:
    """One run's validation curve: columns ``step``, ``flops``, ``loss`` (empty if no events)."""
    scalars = read_scalars(tb_dir)
    values = scalars.get(METRIC_TAGS.get(metric, metric), {})
    steps = np.array(sorted(values), dtype=float)
    curve = pd.DataFrame({"step": steps, "flops": flops_at(steps, scalars, n_nonemb),
                          "loss": [values[int(s)] for s in steps]})
    return curve[np.isfinite(curve["flops"]) & (curve["flops"] > 0) & np.isfinite(curve["loss"])]


def load_training_curves(run_dir: Path, results: pd.DataFrame, metric: str = "val_nll_per_token") -> pd.DataFrame:
    """The validation curves of all runs in ``results`` that have events under
    ``run_dir/tb/<run_id>``; runs without events are skipped (logged at debug level)."""
    frames = []
    for row in results.itertuples(index=False):
        tb_dir = Path(run_dir, "tb", *str(row.run_id).split("/"))
        curve = read_training_curve(tb_dir, metric, float(row.n_nonemb))
        if curve.empty:
            log.debug("no TensorBoard curve for %s under %s", row.run_id, tb_dir)
            continue
        frames.append(curve.assign(run_id=row.run_id, objective=str(row.objective).lower(), size=row.size,
                                   n_nonemb=row.n_nonemb, budget=row.budget))
    columns = ["run_id", "objective", "size", "n_nonemb", "budget", "step", "flops", "loss"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


# --------------------------------------------------------------------------- saving


def new_figure(ncols: int = 1, width: float = 6.4) -> tuple[Figure, np.ndarray]:
    """A headless figure with ``ncols`` axes side by side."""
    fig = Figure(figsize=(width * ncols, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def save_figure(fig: Figure, out_dir: Path, stem: str, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write ``out_dir/stem.<fmt>`` for each format atomically; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        with replacing(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- helpers


def size_colors(points: pd.DataFrame) -> dict[str, tuple[float, ...]]:
    """One viridis colour per size name, ordered by parameter count."""
    sizes = points.drop_duplicates("size").sort_values("n_nonemb")["size"].tolist()
    cmap = colormaps["viridis"]
    return {s: cmap(i / max(len(sizes) - 1, 1) * 0.9) for i, s in enumerate(sizes)}


def budget_colors(budgets: Iterable[float]) -> dict[float, tuple[float, ...]]:
    """One plasma colour per budget, increasing with C."""
    ordered = sorted(set(budgets))
    cmap = colormaps["plasma"]
    return {c: cmap(i / max(len(ordered) - 1, 1) * 0.85) for i, c in enumerate(ordered)}


def objective_handles(objectives: Iterable[str]) -> list[Line2D]:
    return [Line2D([], [], color="0.3", linestyle=LINESTYLES.get(o, ":"), marker=MARKERS.get(o, "s"),
                   label=OBJECTIVE_NAMES.get(o, o)) for o in objectives]


def note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", wrap=True)


# --------------------------------------------------------------------------- figures


def plot_training_curves(curves: pd.DataFrame, points: pd.DataFrame, metric: str = "val_nll_per_token") -> Figure:
    """Validation loss vs FLOPs: one colour per size, solid AR / dashed MDM, one line per run,
    the final (seed-averaged) results emphasised as large markers at their trained FLOPs.
    Without curves only the final points are drawn, with a note saying so."""
    fig, (ax,) = new_figure(width=7.5)
    colors = size_colors(points)
    for run_id, curve in curves.groupby("run_id", sort=False):
        first = curve.iloc[0]
        ax.plot(curve["flops"], curve["loss"], color=colors.get(first["size"], "0.5"),
                linestyle=LINESTYLES.get(first["objective"], ":"), linewidth=1.0, alpha=0.8)
    x = points["flops"] if "flops" in points else points["budget"]
    for obj, group in points.assign(_x=x).groupby("objective"):
        ax.scatter(group["_x"], group["loss"], c=[colors[s] for s in group["size"]], marker=MARKERS.get(obj, "s"),
                   s=45, edgecolors="black", linewidths=0.7, zorder=3)
    if curves.empty:
        ax.set_title("final results only (no TensorBoard curves found)", fontsize=9, color="0.4")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6 N D (FLOPs)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    size_handles = [Line2D([], [], color=c, linewidth=2, label=s) for s, c in colors.items()]
    ax.legend(handles=size_handles + objective_handles(sorted(points["objective"].unique())), fontsize=8, ncols=2)
    ax.grid(True, which="both", alpha=0.2)
    return fig


def draw_isoflop(ax, fit: ObjectiveFit, points: pd.DataFrame, colors: dict[float, tuple[float, ...]]) -> None:
    """One objective's iso-FLOP slices: seed means (± std), fitted parabolas, their minima
    (filled star inside the sampled range, hollow when extrapolated)."""
    mine = points[points["objective"] == fit.objective]
    for budget, group in mine.groupby("budget", sort=True):
        color = colors[float(budget)]
        ax.errorbar(group["n_nonemb"], group["loss"], yerr=group["loss_std"].fillna(0.0), fmt="o", color=color,
                    markersize=4, capsize=2, label=f"C={budget:.2g}")
        parabola = fit.parabolas.get(float(budget))
        if parabola is None:
            continue
        lo, hi = np.log(parabola.n_min / 1.5), np.log(parabola.n_max * 1.5)
        if parabola.usable:
            lo, hi = min(lo, np.log(parabola.n_opt)), max(hi, np.log(parabola.n_opt))
        grid = np.exp(np.linspace(max(lo, np.log(parabola.n_min) - 2.3), min(hi, np.log(parabola.n_max) + 2.3), 100))
        ax.plot(grid, parabola(grid), color=color, linewidth=1.2)
        if parabola.usable:
            ax.plot(parabola.n_opt, parabola.loss_opt, marker="*", markersize=13, color=color,
                    markerfacecolor="none" if parabola.extrapolated else color, markeredgecolor="black", zorder=4)
    if mine.empty:
        note(ax, f"no {OBJECTIVE_NAMES.get(fit.objective, fit.objective)} runs")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_title(f"{OBJECTIVE_NAMES.get(fit.objective, fit.objective)}: iso-FLOP slices")
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7)


def plot_isoflop(analysis: SweepAnalysis) -> Figure:
    """Final loss vs N per budget with the fitted parabolas and minima, one panel per objective."""
    objectives = list(analysis.fits) or [AR, MDM]
    fig, axes = new_figure(ncols=len(objectives))
    colors = budget_colors(analysis.points["budget"].astype(float))
    for ax, obj in zip(axes, objectives):
        draw_isoflop(ax, analysis.fits.get(obj, ObjectiveFit(obj)), analysis.points, colors)
    axes[0].set_ylabel(METRIC_LABELS.get(analysis.metric, analysis.metric))
    return fig


def law_label(name: str, exponent: float, se: float) -> str:
    return f"{name} C^{exponent:.3f}" + ("" if np.isnan(se) else f" ± {se:.3f}")


def draw_law(ax, fit: ObjectiveFit, column: int, exclude_extrapolated: bool) -> None:
    """One objective's optima (N_opt for column 1, L_opt for column 2) and its fitted laws."""
    budgets, n_opt, loss_opt = fit.optima(exclude_extrapolated)
    if budgets.size == 0:
        ax.plot([], [], color=OBJECTIVE_COLORS.get(fit.objective, "0.3"), marker=MARKERS.get(fit.objective, "s"),
                linestyle="none", label=f"{OBJECTIVE_NAMES.get(fit.objective, fit.objective)} (no iso-FLOP minima)")
        return
    extrapolated = np.array([s == "frontier" for s in fit.sources(exclude_extrapolated)], dtype=bool)
    values = n_opt if column == 1 else loss_opt
    name, color = OBJECTIVE_NAMES.get(fit.objective, fit.objective), OBJECTIVE_COLORS.get(fit.objective, "0.3")
    marker = MARKERS.get(fit.objective, "s")
    ax.scatter(budgets[~extrapolated], values[~extrapolated], color=color, marker=marker, zorder=3)
    ax.scatter(budgets[extrapolated], values[extrapolated], facecolors="none", edgecolors=color, marker=marker,
               zorder=3, label=f"{name} (best measured size: no interior minimum)" if extrapolated.any() else None)
    law = fit.n_opt_law if column == 1 else fit.loss_law
    if law is None or budgets.size == 0:
        ax.plot([], [], color=color, marker=marker, linestyle="none", label=f"{name} (no law fitted)")
        return
    grid = np.logspace(np.log10(budgets.min()) - 0.3, np.log10(budgets.max()) + 0.3, 100)
    ax.plot(grid, law(grid), color=color, linestyle=LINESTYLES.get(fit.objective, ":"),
            label=law_label(f"{name}: {law.prefactor:.3g}", law.exponent, law.exponent_se))
    if column == 2 and fit.loss_law_saturating is not None:
        sat = fit.loss_law_saturating
        ax.plot(grid, sat(grid), color=color, linestyle=":", linewidth=1,
                label=f"{name}: {sat.irreducible:.3g} + {sat.prefactor:.3g} C^-{sat.decay:.3f}")


def plot_laws(analysis: SweepAnalysis) -> Figure:
    """N_opt(C) and L_opt(C): parabola minima and fitted power laws, both objectives."""
    fig, (ax_n, ax_l) = new_figure(ncols=2)
    for fit in analysis.fits.values():
        draw_law(ax_n, fit, 1, analysis.exclude_extrapolated)
        draw_law(ax_l, fit, 2, analysis.exclude_extrapolated)
    has_data = any(fit.optima()[0].size for fit in analysis.fits.values())
    for ax, ylabel, title in ((ax_n, "compute-optimal N_opt", "N_opt(C)"),
                              (ax_l, f"L_opt ({METRIC_LABELS.get(analysis.metric, analysis.metric)})", "L_opt(C)")):
        if has_data:  # log axes without positive data cannot be drawn
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if has_data:  # losses span less than a decade: plain numbers, not 3x10^0
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax_l.yaxis.set_major_formatter(plain)
        ax_l.yaxis.set_minor_formatter(plain)
    else:
        for ax in (ax_n, ax_l):
            note(ax, "no iso-FLOP minima")
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def make_figures(analysis: SweepAnalysis, curves: pd.DataFrame, out_dir: Path) -> dict[str, list[Path]]:
    """Draw and save all figures; returns ``{stem: [png, svg]}``."""
    figures = {
        "loss_vs_flops": lambda: plot_training_curves(curves, analysis.points, analysis.metric),
        "isoflop": lambda: plot_isoflop(analysis),
        "scaling_laws": lambda: plot_laws(analysis),
    }
    return {stem: save_figure(draw(), out_dir, stem) for stem, draw in figures.items()}
