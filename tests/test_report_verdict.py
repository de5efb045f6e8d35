"""The sweep report says when its intervals cannot support a conclusion, and what would; its
parabolas carry a goodness of fit; its figures name units and every marker (issue 24 item 20).
All on synthetic results tables (a known loss surface plus noise)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_sweep_analysis import synthetic_results, write_results

from lldiff.sweep.analysis import analyze_results
from lldiff.sweep.figures import plot_isoflop, plot_laws, plot_training_curves
from lldiff.sweep.fits import fit_isoflop_parabola
from lldiff.sweep.report import analyze, support_line


def headline(text: str) -> str:
    return text.split("## Headline", 1)[1].split("\n## ", 1)[0]


def test_a_weak_sweep_says_it_cannot_support_a_conclusion_and_what_would(tmp_path):
    """3 budgets over one decade, one seed, noisy losses: the exponent intervals are wide."""
    write_results(tmp_path, synthetic_results(np.logspace(17, 18, 3), noise=0.3, sizes_per_budget=5))
    top = headline(analyze(tmp_path).read_text())
    assert "**This sweep cannot support a scaling conclusion**" in top
    assert re.search(r"AR's N_opt exponent a: its 95% bootstrap interval \[-?[\d.]+, [\d.]+\] contains 0", top)
    assert "is wider than 0.5" in top  # the MDM's
    for need in ("3+ seeds per point (now 1", "5+ budgets (now 3)", "budgets spanning 2+ decades of compute (now 1.0"):
        assert need in top, need
    assert "This is a point estimate only" in top  # the multiplier sentence is qualified


def test_a_strong_sweep_says_its_conclusions_are_supported():
    analysis = analyze_results(synthetic_results(np.logspace(17, 20, 5), seeds=(0, 1, 2), noise=0.001))
    assert support_line(analysis).startswith("Conclusions supported: every exponent interval excludes 0")


def test_parabolas_report_their_goodness_of_fit(tmp_path):
    x = np.linspace(-1.5, 1.5, 7)
    n = 1e6 * np.exp(x)
    exact = fit_isoflop_parabola(n, 3.0 + 0.1 * x**2)
    assert exact.r2 == pytest.approx(1.0) and exact.rms_residual == pytest.approx(0.0, abs=1e-9) and exact.dof == 4
    bumps = 0.02 * np.array([1, -1, 1, -1, 1, -1, 1])
    noisy = fit_isoflop_parabola(n, 3.0 + 0.1 * x**2 + bumps)
    ss_tot = np.sum((3.0 + 0.1 * x**2 + bumps - np.mean(3.0 + 0.1 * x**2 + bumps)) ** 2)
    resid = 3.0 + 0.1 * x**2 + bumps - noisy(n)
    assert noisy.r2 == pytest.approx(1 - np.sum(resid**2) / ss_tot) and 0 < noisy.r2 < 1
    assert noisy.rms_residual == pytest.approx(np.sqrt(np.mean(resid**2)))
    assert fit_isoflop_parabola(n[:3], 3.0 + 0.1 * x[:3] ** 2 + bumps[:3]).dof == 0
    write_results(tmp_path, synthetic_results(np.logspace(17, 19, 3)))
    text = analyze(tmp_path).read_text()
    optima = text.split("## Iso-FLOP optima", 1)[1].split("\n## ", 1)[0]
    assert "R² of the parabola" in optima and re.search(r"\| R² +\| RMS resid\. +\|", optima)


def _labels(fig) -> list[str]:
    out = []
    for ax in fig.axes:
        out += [ax.get_xlabel(), ax.get_ylabel()]
    return [label for label in out if label]


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_figures_name_units_stars_and_intervals_without_nested_parentheses():
    one_seed = analyze_results(synthetic_results(np.logspace(17, 19, 3), noise=0.001))
    iso = plot_isoflop(one_seed)
    texts = _legend_texts(iso)
    assert "C = 1e17 FLOPs, R² 1.00" in texts and "parabola minimum: the budget's optimum" in texts
    assert not any(ax.containers for ax in iso.axes)  # one seed: plain markers, no empty error bars
    seeds = analyze_results(synthetic_results(np.logspace(17, 19, 3), seeds=(0, 1), noise=0.01))
    iso = plot_isoflop(seeds)
    assert any(ax.containers for ax in iso.axes)
    assert "error bar: ± 1 sample std over seeds" in _legend_texts(iso)
    laws = plot_laws(seeds)
    law_texts = _legend_texts(laws)
    assert any("s.e." in t for t in law_texts) and not any("±" in t for t in law_texts)
    assert any(t.endswith("bootstrap 95% interval") for t in law_texts)
    curves = plot_training_curves(seeds.points.iloc[0:0].assign(run_id=[], flops=[]), seeds.points)
    for fig in (iso, laws, curves):
        for label in _labels(fig):
            assert not re.search(r"\([^)]*\(", label), label  # no nested parentheses
