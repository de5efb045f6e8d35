"""Figures of a scaling sweep: training curves, iso-FLOP slices, fitted laws.

Rendering is headless: figures are plain ``matplotlib.figure.Figure`` objects drawn on an
Agg canvas (no pyplot, no global backend switch, safe in notebooks and worker processes).
Each figure is saved as PNG and SVG, each written to a temporary file in the target
directory and moved into place with ``os.replace`` (a reader never sees half a file).

The training curves come from the runs' TensorBoard events
(``RUN_DIR/tb/<run_id>/events.out.tfevents.*``): the validation loss against the compute
of the sweep's axis at the same global step (``trainer/flops`` for ``C = 6 N D``,
``trainer/flops_matmul`` for real matmul FLOPs).

Objectives are drawn with :func:`lldiff.sweep.objective_facts.objective_styles` (a fallback
style for any objective not listed there), so a new objective needs no edit here.
"""

from __future__ import annotations

import logging
import math
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
from lldiff.sweep.analysis import DEFAULT_COMPUTE, SweepAnalysis
from lldiff.sweep.bootstrap import ObjectiveBootstrap
from lldiff.sweep.fits import ObjectiveFit
from lldiff.sweep.objective_facts import ObjectiveStyle, objective_name, objective_styles

log = logging.getLogger(__name__)

#: results.csv metric column -> TensorBoard scalar tag.
METRIC_TAGS = {"val_nll_per_token": "val/nll_per_token", "val_bpb": "val/bpb"}
#: axis labels: the quantity, then its unit in brackets (so that labels never nest parentheses)
METRIC_LABELS = {"val_nll_per_token": "validation loss [nats/token]", "val_bpb": "validation loss [bits/byte]"}
#: compute axis (results.csv ``compute``) -> TensorBoard tag of the cumulative FLOPs, axis label.
FLOPS_TAGS = {"6nd": "trainer/flops", "matmul": "trainer/flops_matmul"}
COMPUTE_LABELS = {"6nd": "training compute C = 6ND [FLOPs]",
                  "matmul": "training compute C [real matmul FLOPs: fwd+bwd, LM head and attention included]"}
#: results.csv column holding a run's total FLOPs on each axis (the older ``flops`` is 6ND).
FLOPS_COLUMNS = {"6nd": ("flops_6nd", "flops"), "matmul": ("flops_matmul",)}
FORMATS = ("png", "svg")
#: most sizes named in the loss-vs-FLOPs legend (the colours run from small to large N).
MAX_SIZE_LEGEND = 12


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


def flops_at(steps: np.ndarray, scalars: dict[str, dict[int, float]], n_nonemb: float | None, *,
             tag: str = "trainer/flops", flops_per_token: float | None = None) -> np.ndarray:
    """The cumulative FLOPs ``tag`` at the given steps: logged at the step if it was, else
    ``flops_per_token`` (default ``6 N`` for ``trainer/flops``) times ``trainer/tokens`` logged
    at the step, else linear interpolation in the step between the known values (clamped at
    the ends); NaN when nothing is known."""
    known = dict(scalars.get(tag, {}))
    if flops_per_token is None and tag == "trainer/flops" and n_nonemb:
        flops_per_token = 6.0 * n_nonemb
    if flops_per_token and math.isfinite(flops_per_token):
        for step, tokens in scalars.get("trainer/tokens", {}).items():
            known.setdefault(step, flops_per_token * tokens)
    if not known:
        return np.full(len(steps), np.nan)
    ks = np.array(sorted(known))
    return np.interp(steps, ks, np.array([known[k] for k in ks]))


def read_training_curve(tb_dir: Path, metric: str = "val_nll_per_token", n_nonemb: float | None = None, *,
                        compute: str = DEFAULT_COMPUTE, flops_per_token: float | None = None) -> pd.DataFrame:
    """One run's validation curve: columns ``step``, ``flops`` (on the ``compute`` axis),
    ``loss`` (empty if no events)."""
    scalars = read_scalars(tb_dir)
    values = scalars.get(METRIC_TAGS.get(metric, metric), {})
    steps = np.array(sorted(values), dtype=float)
    flops = flops_at(steps, scalars, n_nonemb, tag=FLOPS_TAGS[compute], flops_per_token=flops_per_token)
    curve = pd.DataFrame({"step": steps, "flops": flops, "loss": [values[int(s)] for s in steps]})
    return curve[np.isfinite(curve["flops"]) & (curve["flops"] > 0) & np.isfinite(curve["loss"])]


def _flops_per_token(row, compute: str) -> float | None:
    """A run's FLOPs per training token on the ``compute`` axis (constant within a run), from
    its results.csv row: ``6 N`` for 6ND, ``flops_matmul / tokens`` for matmul (None if unknown)."""
    if compute == "6nd":
        return 6.0 * float(row.n_nonemb)
    total, tokens = getattr(row, "flops_matmul", math.nan), getattr(row, "tokens", math.nan)
    try:
        value = float(total) / float(tokens)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def load_training_curves(run_dir: Path, results: pd.DataFrame, metric: str = "val_nll_per_token",
                         compute: str = DEFAULT_COMPUTE) -> pd.DataFrame:
    """The validation curves of all runs in ``results`` that have events under
    ``run_dir/tb/<run_id>``, against the FLOPs of the ``compute`` axis; runs without events
    are skipped (logged at debug level)."""
    frames = []
    for row in results.itertuples(index=False):
        tb_dir = Path(run_dir, "tb", *str(row.run_id).split("/"))
        curve = read_training_curve(tb_dir, metric, float(row.n_nonemb), compute=compute,
                                    flops_per_token=_flops_per_token(row, compute))
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


def objective_handles(styles: dict[str, ObjectiveStyle]) -> list[Line2D]:
    return [Line2D([], [], color="0.3", linestyle=s.linestyle, marker=s.marker, label=s.label)
            for s in styles.values()]


def note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4", wrap=True)


# --------------------------------------------------------------------------- figures


def final_flops(points: pd.DataFrame, compute: str = DEFAULT_COMPUTE) -> pd.Series:
    """Each point's trained FLOPs on the ``compute`` axis: the matching results.csv column
    where present and finite, else its planned ``budget``."""
    x = points["budget"].astype(float)
    for col in reversed(FLOPS_COLUMNS[compute]):
        if col in points:
            x = points[col].astype(float).where(np.isfinite(points[col].astype(float)), x)
    return x


def plot_training_curves(curves: pd.DataFrame, points: pd.DataFrame, metric: str = "val_nll_per_token",
                         compute: str = DEFAULT_COMPUTE) -> Figure:
    """Validation loss vs FLOPs: one colour per size, one line style per objective, one line
    per run, the final (seed-averaged) results emphasised as large markers at their trained
    FLOPs. Without curves only the final points are drawn, with a note saying so."""
    fig, (ax,) = new_figure(width=7.5)
    colors = size_colors(points)
    styles = objective_styles(sorted(set(points["objective"]) | set(curves["objective"])))
    for run_id, curve in curves.groupby("run_id", sort=False):
        first = curve.iloc[0]
        ax.plot(curve["flops"], curve["loss"], color=colors.get(first["size"], "0.5"),
                linestyle=styles[first["objective"]].linestyle, linewidth=1.0, alpha=0.8)
    for obj, group in points.assign(_x=final_flops(points, compute)).groupby("objective"):
        ax.scatter(group["_x"], group["loss"], c=[colors[s] for s in group["size"]], marker=styles[obj].marker,
                   s=45, edgecolors="black", linewidths=0.7, zorder=3)
    if curves.empty:
        ax.set_title("final results only (no TensorBoard curves found)", fontsize=9, color="0.4")
    ax.set_xscale("log")
    ax.set_xlabel(COMPUTE_LABELS[compute])
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    shown = list(colors.items())
    if len(shown) > MAX_SIZE_LEGEND:  # many sizes: every k-th (smallest and largest kept) so the legend fits
        keep = np.unique(np.linspace(0, len(shown) - 1, MAX_SIZE_LEGEND).round().astype(int))
        shown = [shown[i] for i in keep]
    size_handles = [Line2D([], [], color=c, linewidth=2, label=s) for s, c in shown]
    ax.legend(handles=size_handles + objective_handles(styles), fontsize=8, ncols=2)
    ax.grid(True, which="both", alpha=0.2)
    return fig


def flops_text(value: float) -> str:
    """``1e+11`` -> ``1e11``, ``2.5e+12`` -> ``2.5e12``: a budget as a legend writes it."""
    mantissa, _, exponent = f"{value:.2g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def budget_label(budget: float, parabola=None) -> str:
    """``C = 1e11 FLOPs, R² 0.97``: a slice's budget with its unit and the parabola's fit."""
    label = f"C = {flops_text(budget)} FLOPs"
    if parabola is not None and parabola.dof > 0 and math.isfinite(parabola.r2):
        label += f", R² {parabola.r2:.2f}"
    elif parabola is not None:
        label += ", exact fit (3 sizes)"
    return label


def draw_isoflop(ax, fit: ObjectiveFit, points: pd.DataFrame, colors: dict[float, tuple[float, ...]]) -> None:
    """One objective's iso-FLOP slices: seed means (with ± one sample std over seeds as error
    bars when a point has several seeds; plain markers when it has one), fitted parabolas with
    their R², their minima (filled star when bracketed, hollow when not: that budget falls back
    to its best size); the legend names each budget in FLOPs and both kinds of star."""
    mine = points[points["objective"] == fit.objective]
    stars = set()
    for budget, group in mine.groupby("budget", sort=True):
        color = colors[float(budget)]
        parabola = fit.parabolas.get(float(budget))
        label = budget_label(float(budget), parabola)
        spread = group["loss_std"].astype(float)
        if (spread.fillna(0.0) > 0).any():
            ax.errorbar(group["n_nonemb"], group["loss"], yerr=spread.fillna(0.0), fmt="o", color=color,
                        markersize=4, capsize=2, label=label)
        else:  # one seed: no spread to show, so no error-bar caps either
            ax.plot(group["n_nonemb"], group["loss"], "o", color=color, markersize=4, label=label)
        if parabola is None:
            continue
        lo, hi = np.log(parabola.n_min / 1.5), np.log(parabola.n_max * 1.5)
        if parabola.usable:
            lo, hi = min(lo, np.log(parabola.n_opt)), max(hi, np.log(parabola.n_opt))
        grid = np.exp(np.linspace(max(lo, np.log(parabola.n_min) - 2.3), min(hi, np.log(parabola.n_max) + 2.3), 100))
        ax.plot(grid, parabola(grid), color=color, linewidth=1.2)
        if parabola.usable:
            ax.plot(parabola.n_opt, parabola.loss_opt, marker="*", markersize=13, color=color,
                    markerfacecolor=color if parabola.bracketed else "none", markeredgecolor="black", zorder=4)
            stars.add(parabola.bracketed)
    if mine.empty:
        note(ax, f"no {objective_name(fit.objective)} runs")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_title(f"{objective_name(fit.objective)}: iso-FLOP slices")
    ax.grid(True, which="both", alpha=0.2)
    handles, _ = ax.get_legend_handles_labels()
    star = dict(marker="*", markersize=10, linestyle="none", markeredgecolor="black")
    if True in stars:
        handles.append(Line2D([], [], markerfacecolor="0.6", label="parabola minimum: the budget's optimum", **star))
    if False in stars:
        handles.append(Line2D([], [], markerfacecolor="none", label="minimum not bracketed: best size used", **star))
    if (mine["loss_std"].astype(float).fillna(0.0) > 0).any():
        handles.append(Line2D([], [], color="0.3", marker="|", linestyle="none", markersize=10,
                              label="error bar: ± 1 sample std over seeds"))
    if handles:
        ax.legend(handles=handles, fontsize=7)


def plot_isoflop(analysis: SweepAnalysis) -> Figure:
    """Final loss vs N per budget with the fitted parabolas and minima, one panel per objective."""
    objectives = analysis.objectives or [analysis.reference]
    fig, axes = new_figure(ncols=len(objectives))
    colors = budget_colors(analysis.points["budget"].astype(float))
    for ax, obj in zip(axes, objectives):
        draw_isoflop(ax, analysis.fits.get(obj, ObjectiveFit(obj)), analysis.points, colors)
    axes[0].set_ylabel(METRIC_LABELS.get(analysis.metric, analysis.metric))
    return fig


def law_label(name: str, exponent: float, se: float) -> str:
    """``MDM: 3.2·C^0.512, s.e. 0.012``: a fitted power law, its exponent's standard error named."""
    return f"{name}·C^{exponent:.3f}" + ("" if np.isnan(se) else f", s.e. {se:.3f}")


def _bootstrap_errors(boot: ObjectiveBootstrap | None, budgets: np.ndarray, values: np.ndarray,
                      column: int) -> np.ndarray | None:
    """(2, B) error-bar lengths from the bootstrap's per-budget 95% intervals (None without)."""
    if boot is None:
        return None
    interval = boot.n_opt_ci95 if column == 1 else boot.loss_opt_ci95
    try:
        lo_hi = np.array([interval(float(c)) for c in budgets], dtype=float).reshape(-1, 2)
    except KeyError:
        return None
    err = np.stack([values - lo_hi[:, 0], lo_hi[:, 1] - values])
    return np.where(np.isfinite(err) & (err >= 0), err, 0.0)


def draw_law(ax, fit: ObjectiveFit, column: int, exclude_extrapolated: bool, style: ObjectiveStyle | None = None,
             boot: ObjectiveBootstrap | None = None) -> None:
    """One objective's optima (N_opt for column 1, L_opt for column 2) with their bootstrap
    95% intervals as error bars, and its fitted laws."""
    style = style or objective_styles([fit.objective])[fit.objective]
    name, color, marker = style.label, style.color, style.marker
    budgets, n_opt, loss_opt = fit.optima(exclude_extrapolated)
    if budgets.size == 0:
        ax.plot([], [], color=color, marker=marker, linestyle="none", label=f"{name} (no iso-FLOP minima)")
        return
    fallback = np.array([s == "frontier" for s in fit.sources(exclude_extrapolated)], dtype=bool)
    values = n_opt if column == 1 else loss_opt
    err = _bootstrap_errors(boot, budgets, values, column)
    if err is not None and (err > 0).any():  # bootstrap 95% intervals; none drawn where they are empty
        ax.errorbar(budgets, values, yerr=err, fmt="none", ecolor=color, elinewidth=1, capsize=3, zorder=2,
                    label=f"{name}: bootstrap 95% interval")
    ax.scatter(budgets[~fallback], values[~fallback], color=color, marker=marker, zorder=3)
    ax.scatter(budgets[fallback], values[fallback], facecolors="none", edgecolors=color, marker=marker,
               zorder=3, label=f"{name} (best measured size: not bracketed)" if fallback.any() else None)
    law = fit.n_opt_law if column == 1 else fit.loss_law
    if law is None:
        ax.plot([], [], color=color, marker=marker, linestyle="none", label=f"{name} (no law fitted)")
        return
    grid = np.logspace(np.log10(budgets.min()) - 0.3, np.log10(budgets.max()) + 0.3, 100)
    ax.plot(grid, law(grid), color=color, linestyle=style.linestyle,
            label=law_label(f"{name}: {law.prefactor:.3g}", law.exponent, law.exponent_se))
    if column == 2 and fit.loss_law_saturating is not None:
        sat = fit.loss_law_saturating
        ax.plot(grid, sat(grid), color=color, linestyle=":", linewidth=1,
                label=f"{name}: {sat.irreducible:.3g} + {sat.prefactor:.3g}·C^-{sat.decay:.3f}")


def plot_laws(analysis: SweepAnalysis) -> Figure:
    """N_opt(C) and L_opt(C) of every objective: per-budget optima (with bootstrap 95% error
    bars when there is a bootstrap) and fitted power laws."""
    fig, (ax_n, ax_l) = new_figure(ncols=2)
    styles = objective_styles(analysis.objectives)
    boots = analysis.bootstrap.objectives if analysis.bootstrap is not None else {}
    for obj, fit in analysis.fits.items():
        draw_law(ax_n, fit, 1, analysis.exclude_extrapolated, styles[obj], boots.get(obj))
        draw_law(ax_l, fit, 2, analysis.exclude_extrapolated, styles[obj], boots.get(obj))
    has_data = any(fit.optima()[0].size for fit in analysis.fits.values())
    for ax, ylabel, title in ((ax_n, "compute-optimal size N_opt [non-embedding parameters]", "N_opt(C)"),
                              (ax_l, f"L_opt: {METRIC_LABELS.get(analysis.metric, analysis.metric)}", "L_opt(C)")):
        if has_data:  # log axes without positive data cannot be drawn
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(COMPUTE_LABELS[analysis.compute])
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
        "loss_vs_flops": lambda: plot_training_curves(curves, analysis.points, analysis.metric, analysis.compute),
        "isoflop": lambda: plot_isoflop(analysis),
        "scaling_laws": lambda: plot_laws(analysis),
    }
    return {stem: save_figure(draw(), out_dir, stem) for stem, draw in figures.items()}
