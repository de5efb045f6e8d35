"""Figures of a data-constrained study: final loss vs epochs and vs compute, and each repeated
run's validation curve (from its TensorBoard events) against the epochs seen so far.

Each plot function takes the analysis objects of :mod:`lldiff.sweep.repetition_analysis` and
returns a headless ``matplotlib`` figure (:func:`lldiff.sweep.figures.new_figure`); the report
saves them (:func:`lldiff.sweep.figures.save_figure`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.ticker import FuncFormatter

from lldiff.sweep.figures import COMPUTE_LABELS, new_figure, note, read_scalars
from lldiff.sweep.objective_facts import objective_name, objective_styles
from lldiff.sweep.repetition_analysis import LOSS, Crossover, ObjectiveResult


def num(v: float | None, spec: str = ".3g") -> str:
    """A number for a legend, a table cell or the report's text: an em dash for missing/NaN, ∞ for inf."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return format(v, spec)


def _epoch_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plot_loss_vs_epochs(results: dict[str, ObjectiveResult]):
    fig, (ax,) = new_figure(width=7.0)
    styles = objective_styles(results)
    for obj, res in results.items():
        s = styles[obj]
        t = res.table
        ax.plot(t["epochs"], t["loss"], color=s.color, marker=s.marker, linestyle="-",
                label=f"{s.label}, repeated (best E = {num(res.best_epoch)})")
        ax.plot(res.best_epoch, res.best_loss, marker="*", markersize=14, color=s.color, markeredgecolor="black",
                linestyle="none", zorder=4)
        if not res.fresh.empty and (res.fresh["source"] == "fresh").any():
            ax.plot(res.fresh["x"], res.fresh["loss"], color=s.color, marker=s.marker, markerfacecolor="none",
                    linestyle="--", label=f"{s.label}, fresh data (D/U)")
        if res.fresh_law is not None and res.r_star_fresh is not None and math.isfinite(res.r_star_fresh.r_star):
            grid = np.geomspace(1.0, max(float(t["epochs"].max()), 1.0), 100)
            ax.plot(grid, res.fresh_law(res.r_star_fresh(grid)), color=s.color, linestyle=":", linewidth=1.2,
                    label=f"{s.label}, L_fresh(D'(E)) at R* = {num(res.r_star_fresh.r_star)}")
    _epoch_axis(ax)
    ax.set_xlabel("epochs E = D / U (fresh: D / U with D distinct tokens)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7)
    return fig


def plot_loss_vs_compute(results: dict[str, ObjectiveResult], crossovers: list[Crossover], compute: str | None):
    fig, (ax,) = new_figure(width=7.0)
    styles = objective_styles(results)
    for obj, res in results.items():
        s = styles[obj]
        t = res.table
        ax.plot(t["flops"], t["loss"], color=s.color, marker=s.marker, linestyle="-", label=f"{s.label}, repeated")
        for row in t.itertuples(index=False):
            ax.annotate(f"{row.epochs:g}", (row.flops, row.loss), textcoords="offset points", xytext=(3, 3),
                        fontsize=6, color=s.color)
        fresh = res.fresh[res.fresh["source"] == "fresh"] if not res.fresh.empty else res.fresh
        if not fresh.empty:
            anchor = res.fresh[res.fresh["source"] != "fresh"]
            line = pd.concat([anchor, fresh]).sort_values("flops")
            ax.plot(line["flops"], line["loss"], color=s.color, marker=s.marker, markerfacecolor="none",
                    linestyle="--", label=f"{s.label}, fresh data")
    for c in crossovers:
        if c.compute is not None:
            ax.axvline(c.compute, color="0.4", linestyle=":", linewidth=1,
                       label=f"{objective_name(c.candidate)} < {objective_name(c.reference)} from C ≈ {num(c.compute)}")
    ax.set_xscale("log")
    ax.set_xlabel(COMPUTE_LABELS.get(compute or "", "training compute (FLOPs)"))
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7)
    return fig


def training_curves(repeated_dir: Path, runs: pd.DataFrame, unique_tokens: float) -> pd.DataFrame:
    """Each repeated run's validation curve: run_id, objective, epochs (of the run), step,
    tokens, epochs_so_far (= tokens / U), loss, final. The TensorBoard evaluations are followed
    by the run's final result from results.csv (``final`` True; at its ``tokens``, one step
    after the last evaluation), which may use more Monte Carlo samples than the evaluations
    during training and come after the last of them. Runs without events are skipped."""
    frames = []
    for row in runs.itertuples(index=False):
        scalars = read_scalars(Path(repeated_dir, "tb", *str(row.run_id).split("/")))
        values = scalars.get("val/nll_per_token", {})
        if not values:
            continue
        steps = np.array(sorted(values), dtype=float)
        known = scalars.get("trainer/tokens", {})
        if known:
            ks = np.array(sorted(known), dtype=float)
            tokens = np.interp(steps, ks, [known[int(k)] for k in ks])
        elif getattr(row, "max_steps", None) and math.isfinite(float(row.max_steps)):
            tokens = steps / float(row.max_steps) * float(row.tokens)
        else:
            continue
        steps = np.append(steps, steps[-1] + 1)
        tokens = np.append(tokens, float(row.tokens))
        loss = [values[int(s)] for s in steps[:-1]] + [float(getattr(row, LOSS))]
        frames.append(pd.DataFrame({"run_id": row.run_id, "objective": row.objective, "epochs": row.epochs,
                                    "step": steps, "tokens": tokens, "epochs_so_far": tokens / unique_tokens,
                                    "loss": loss, "final": [False] * (steps.size - 1) + [True]}))
    columns = ["run_id", "objective", "epochs", "step", "tokens", "epochs_so_far", "loss", "final"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def plot_curves_by_epochs(curves: pd.DataFrame, objectives: list[str], results: dict[str, ObjectiveResult],
                          unique_tokens: float):
    fig, axes = new_figure(ncols=len(objectives), width=5.5)
    all_e = sorted({float(v) for r in results.values() for v in r.table["epochs"]})
    norm = LogNorm(vmin=min(all_e), vmax=max(max(all_e), min(all_e) * 2))
    cmap = colormaps["viridis"]
    for ax, obj in zip(axes, objectives):
        mine = curves[curves["objective"] == obj]
        for _, c in mine.groupby("run_id", sort=False):
            c = c[c["epochs_so_far"] > 0].sort_values("step")
            color = cmap(norm(float(c["epochs"].iloc[0])) * 0.9)
            ax.plot(c["epochs_so_far"], c["loss"], color=color, marker=".", markersize=3, linewidth=1.2)
        t = results[obj].table  # the final results (seed means) at their tokens / U
        ax.scatter(t["tokens"] / unique_tokens, t["loss"], c=[cmap(norm(v) * 0.9) for v in t["epochs"]],
                   edgecolors="black", s=30, zorder=3, label="final result of a run of E epochs")
        if mine.empty:
            ax.set_title(f"{objective_name(obj)}: final results only (no TensorBoard curves)", fontsize=9)
        else:
            ax.set_title(f"{objective_name(obj)}: validation loss during training")
        _epoch_axis(ax)
        ax.set_xlabel("epochs so far (tokens / U)")
        ax.grid(True, which="both", alpha=0.2)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation loss (nats/token)")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="run's epochs E (colour)")
    if not objectives:
        note(axes[0], "no runs")
    return fig
