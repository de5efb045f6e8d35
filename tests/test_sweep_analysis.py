"""Scaling-law analysis: iso-FLOP parabolas, power laws, compute multiplier, the report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lldiff.sweep import analysis
from lldiff.sweep.analysis import (aggregate_seeds, analyze_results, compute_multiplier, fit_isoflop_parabola,
                                   fit_power_law, fit_saturating_power_law, match_compute, nonparametric_multipliers)
from lldiff.sweep.figures import load_training_curves, read_training_curve
from lldiff.sweep.report import analyze

# Chinchilla-like loss surface L(N, D) = E + A / N^alpha + B / D^beta
SURFACE = {"ar": (1.7, 400.0, 410.0, 0.34, 0.28), "mdm": (1.8, 560.0, 600.0, 0.34, 0.28)}


def optimal_n(c: float, surface: tuple[float, ...]) -> float:
    """argmin_N L(N, C / 6N) of the surface: G (C/6)^(beta/(alpha+beta))."""
    _, a, b, alpha, beta = surface
    return (alpha * a / (beta * b)) ** (1 / (alpha + beta)) * (c / 6) ** (beta / (alpha + beta))


def surface_loss(n: float, c: float, surface: tuple[float, ...]) -> float:
    e, a, b, alpha, beta = surface
    return e + a / n**alpha + b / (c / (6 * n)) ** beta


def synthetic_results(budgets, *, seeds=(0,), sizes_per_budget=7, half_width=1.5, noise=0.002, seed=0,
                      objectives=("ar", "mdm")) -> pd.DataFrame:
    """results.csv rows: per budget, sizes log-spaced around the surface's optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for obj in objectives:
        for c in budgets:
            n_star = optimal_n(c, SURFACE[obj])
            for i, r in enumerate(np.linspace(-half_width, half_width, sizes_per_budget)):
                n = round(n_star * math.exp(r))
                for s in seeds:
                    loss = surface_loss(n, c, SURFACE[obj]) + rng.normal(0, noise)
                    tokens = c / (6 * n)
                    rows.append({"run_id": f"{obj}/s{i}/C{c:.0e}/seed{s}", "objective": obj, "size": f"s{i}-{n:.2g}",
                                 "n_nonemb": n, "budget": c, "seed": s, "max_steps": int(tokens // 4096),
                                 "tokens": tokens, "flops": c, "val_nll_per_token": loss,
                                 "val_bpb": loss / math.log(2) / 3.5, "wall_time_s": c / 1e15,
                                 "lr": 2e-4, "batch_size": 8, "seq_len": 512})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- parabola


def test_parabola_recovers_known_vertex():
    rng = np.random.default_rng(1)
    n = np.exp(np.linspace(np.log(3e6), np.log(3e8), 9))
    loss = 0.05 * (np.log(n) - np.log(3e7)) ** 2 + 3.1 + rng.normal(0, 0.002, n.size)
    p = fit_isoflop_parabola(n, loss, budget=1e18)
    assert p.n_opt == pytest.approx(3e7, rel=0.05)
    assert p.loss_opt == pytest.approx(3.1, abs=0.003)
    assert p.usable and not p.extrapolated and p.warning is None
    assert p(3e7) == pytest.approx(p.loss_opt, abs=1e-3)


def test_parabola_flags_downward_and_extrapolated():
    n = np.array([1e6, 1e7, 1e8])
    down = fit_isoflop_parabola(n, -0.1 * (np.log(n) - np.log(1e7)) ** 2 + 3, budget=1e17)
    assert down.opens_downward and not down.usable and math.isnan(down.n_opt)
    assert "opens downward" in down.warning
    edge = fit_isoflop_parabola(n, 0.05 * (np.log(n) - np.log(1e10)) ** 2 + 3, budget=1e17)
    assert edge.extrapolated and edge.n_opt == pytest.approx(1e10, rel=1e-6)
    assert "outside the sampled range" in edge.warning
    flat = fit_isoflop_parabola(n, 3 - 0.01 * np.log(n) + 1e-9 * np.log(n) ** 2)  # vertex at N = e^(5e6)
    assert flat.extrapolated and not flat.usable


def test_parabola_needs_three_distinct_sizes():
    # four points (two seeds) but only two sizes
    with pytest.raises(ValueError, match=r"C=1e\+18.*>= 3 distinct model sizes, got 2"):
        fit_isoflop_parabola([1e6, 1e6, 1e7, 1e7], [3.0, 3.1, 2.9, 2.95], budget=1e18)


# --------------------------------------------------------------------------- power laws


def test_power_law_recovers_exponents():
    rng = np.random.default_rng(2)
    c = np.logspace(15, 20, 8)
    loss = 10 * c**-0.05 * np.exp(rng.normal(0, 0.002, c.size))
    law = fit_power_law(c, loss)
    assert law.exponent == pytest.approx(-0.05, abs=0.003)
    assert law.exponent_ci95[0] < -0.05 < law.exponent_ci95[1]
    assert law.prefactor_ci95[0] < 10 < law.prefactor_ci95[1]
    n_opt = 0.1 * c**0.5 * np.exp(rng.normal(0, 0.02, c.size))
    assert fit_power_law(c, n_opt).exponent == pytest.approx(0.5, abs=0.02)


def test_power_law_two_points_is_exact_without_uncertainty():
    law = fit_power_law([1e18, 1e19], [3.0, 2.7])
    assert law(1e19) == pytest.approx(2.7)
    assert math.isnan(law.exponent_se) and all(math.isnan(v) for v in law.exponent_ci95)
    assert "uncertainty undefined" in law.note
    with pytest.raises(ValueError, match="needs >= 2 distinct"):
        fit_power_law([1e18, 1e18], [3.0, 2.9])


def test_isoflop_analysis_recovers_optimal_exponent():
    """Approach 2 on L = E + A/N^alpha + B/D^beta: N_opt ∝ C^(beta/(alpha+beta)) and
    L_opt - E ∝ C^-(alpha beta/(alpha+beta))."""
    e, _, _, alpha, beta = SURFACE["ar"]
    budgets = np.logspace(17, 21, 7)
    result = analyze_results(synthetic_results(budgets, objectives=("ar",)))
    fit = result.fits["ar"]
    for c, p in fit.parabolas.items():
        assert p.n_opt == pytest.approx(optimal_n(c, SURFACE["ar"]), rel=0.05)
    assert fit.n_opt_law.exponent == pytest.approx(beta / (alpha + beta), abs=0.01)
    assert fit.loss_law_saturating.decay == pytest.approx(alpha * beta / (alpha + beta), abs=0.01)
    assert fit.loss_law_saturating.irreducible == pytest.approx(e, abs=0.03)
    assert result.multipliers == [] and "needs both" in result.notes[0]


def test_saturating_law_needs_four_budgets():
    with pytest.raises(ValueError, match=">= 4 distinct budgets, got 3"):
        fit_saturating_power_law([1e17, 1e18, 1e19], [3.0, 2.8, 2.6])


def test_two_budgets_do_not_crash():
    result = analyze_results(synthetic_results([1e18, 1e19], noise=0.0))
    for fit in result.fits.values():
        assert fit.loss_law is not None and math.isnan(fit.loss_law.exponent_se)
        assert fit.loss_law_saturating is None
        assert any("needs >= 4 budgets" in n for n in fit.notes)
    assert len(result.multipliers) == 2 and all(np.isfinite(r.parametric) for r in result.multipliers)


# --------------------------------------------------------------------------- multiplier


def test_multiplier_of_equal_exponent_power_laws():
    c = np.logspace(15, 20, 6)
    ar, mdm = fit_power_law(c, 10 * c**-0.05), fit_power_law(c, 12 * c**-0.05)
    for budget in (1e15, 1e18, 1e21):
        assert compute_multiplier(ar, mdm, budget) == pytest.approx(1.2**20, rel=1e-6)  # (A_mdm/A_ar)^(1/b)


def test_multiplier_of_different_exponents():
    c = np.logspace(15, 20, 6)
    ar, mdm = fit_power_law(c, 10 * c**-0.05), fit_power_law(c, 14 * c**-0.06)
    for budget in (1e16, 1e19):
        c_prime = (14 / 10 * budget**0.05) ** (1 / 0.06)
        assert compute_multiplier(ar, mdm, budget) == pytest.approx(c_prime / budget, rel=1e-6)
    rising = fit_power_law(c, 2 * c**0.01)  # an MDM loss growing with compute: no multiplier
    assert math.isnan(compute_multiplier(ar, rising, 1e18))
    saturating = analysis.SaturatingPowerLaw(3.0, 50.0, 0.1, 0, 0, 0, 4)  # floor above AR's loss: never reached
    assert compute_multiplier(ar, saturating, 1e20) == math.inf


@pytest.mark.parametrize("b_mdm", [0.05, 0.06])
def test_nonparametric_multiplier_matches_analytic(b_mdm):
    c = np.logspace(15, 20, 6)
    ar_loss, mdm_loss = 10 * c**-0.05, 12 * c**-b_mdm
    slope = fit_power_law(c, mdm_loss).exponent
    matched = nonparametric_multipliers(c, ar_loss, c, mdm_loss, slope)
    analytic = (12 / 10 * c**0.05) ** (1 / b_mdm) / c
    assert [m.c_prime / budget for m, budget in zip(matched, c)] == pytest.approx(analytic, rel=1e-6)
    assert {m.method for m in matched} == {"interpolated", "extrapolated"}


def test_match_compute_without_a_slope_is_unreachable():
    m = match_compute(2.0, [1e18, 1e19], [3.0, 2.8], slope=None)
    assert math.isnan(m.c_prime) and m.method == "unreachable"
    assert match_compute(2.9, [1e18, 1e19], [3.0, 2.8], slope=None).method == "interpolated"


# --------------------------------------------------------------------------- data frames and report


def test_seeds_are_averaged_with_spread():
    df = synthetic_results([1e18, 1e19, 1e20], seeds=(0, 1, 2))
    df.loc[0, "val_nll_per_token"] = float("nan")  # a diverged run is dropped
    df.loc[1, "budget"] *= 1 + 1e-12  # float noise does not split a budget
    points = aggregate_seeds(df)
    assert len(points) == 2 * 3 * 7 and sorted(points["budget"].unique()) == [1e18, 1e19, 1e20]
    assert points["n_seeds"].sum() == len(df) - 1 and (points["loss_std"] > 0).all()
    first = points[(points["objective"] == "ar") & (points["size"] == df.loc[0, "size"])].iloc[0]
    assert first["n_seeds"] == 2 and first["loss"] == pytest.approx(df.loc[1:2, "val_nll_per_token"].mean())


def write_results(run_dir, df: pd.DataFrame) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(run_dir / "results.csv", index=False)


def test_analyze_end_to_end_without_tensorboard(tmp_path):
    df = synthetic_results(np.logspace(17, 20, 4), seeds=(0, 1))
    lone = df[(df["objective"] == "mdm") & (df["budget"] == 1e17)].head(4).assign(budget=3e21)  # 2 sizes x 2 seeds
    write_results(tmp_path / "sweep", pd.concat([df, lone], ignore_index=True))
    report = analyze(tmp_path / "sweep")
    assert report == tmp_path / "sweep" / "analysis" / "report.md"
    text = report.read_text()
    for needle in ("Compute multiplier", "k (power laws)", "SMDM reports roughly 16x", "Fitted laws",
                   "Budgets without a parabola", "got 2", "`lr`: 0.0002", "isoflop.png"):
        assert needle in text, needle
    for stem in ("loss_vs_flops", "isoflop", "scaling_laws"):
        assert (report.parent / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (report.parent / f"{stem}.svg").read_text()[:1000]
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_analyze_reports_the_multiplier(tmp_path):
    df = synthetic_results(np.logspace(17, 20, 4), noise=0.0)
    write_results(tmp_path, df)
    out = analyze(tmp_path, tmp_path / "elsewhere")
    assert out.parent == tmp_path / "elsewhere"
    rows = analyze_results(df).multipliers
    assert len(rows) == 4 and all(r.nonparametric > 1 and r.parametric > 1 for r in rows)  # MDM is worse


def test_training_curves_from_tensorboard(tmp_path):
    SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter
    df = synthetic_results([1e18, 1e19, 1e20], objectives=("ar",), sizes_per_budget=3)
    run = df.iloc[0]
    n = float(run["n_nonemb"])
    writer = SummaryWriter(str(tmp_path / "tb" / run["run_id"]))
    for step in range(0, 31, 10):
        writer.add_scalar("trainer/flops", 6 * n * 1000 * step, step)
    writer.add_scalar("trainer/tokens", 1000.0 * 35, 35)  # validation step without trainer/flops
    for step, loss in ((10, 4.0), (30, 3.5), (35, 3.4)):
        writer.add_scalar("val/nll_per_token", loss, step)
    writer.close()
    curve = read_training_curve(tmp_path / "tb" / run["run_id"], n_nonemb=n)
    assert curve["flops"].tolist() == pytest.approx([6 * n * 1000 * s for s in (10, 30, 35)])
    assert curve["loss"].tolist() == pytest.approx([4.0, 3.5, 3.4])
    curves = load_training_curves(tmp_path, df)  # the other runs have no events: skipped
    assert set(curves["run_id"]) == {run["run_id"]}
    write_results(tmp_path, df)
    assert analyze(tmp_path).is_file()


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.csv"):
        analyze(tmp_path)
    (tmp_path / "results.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        analyze(tmp_path)
    df = synthetic_results([1e18, 1e19, 1e20])
    write_results(tmp_path, df.iloc[:0])
    with pytest.raises(ValueError, match="empty"):
        analyze(tmp_path)
    write_results(tmp_path, df.drop(columns=["n_nonemb", "budget"]))
    with pytest.raises(ValueError, match="missing required column.*n_nonemb, budget"):
        analyze(tmp_path)
    small = df[df["size"].str.startswith(("s0-", "s1-"))]
    write_results(tmp_path, small)
    with pytest.raises(ValueError, match=r"ar: budget C=1e\+18: an iso-FLOP parabola needs >= 3 .*got 2"):
        analyze(tmp_path, strict=True)
    skipped = analyze_results(small).fits["ar"]
    assert not skipped.parabolas and set(skipped.skipped) == {1e18, 1e19, 1e20}
    assert analyze(tmp_path).is_file()  # not strict: the report says why nothing was fitted


def test_required_columns_are_documented():
    assert set(analysis.REQUIRED_COLUMNS) >= {"objective", "n_nonemb", "budget", "val_nll_per_token"}


def test_budgets_without_an_interior_minimum_fall_back_to_the_best_measured_size():
    """Losses falling monotonically with N (the optimum lies below the smallest size) give
    no usable parabola vertex; the optimum is then the best measured run (the frontier),
    and the multiplier still follows the analytic value for those frontier points."""
    rows = []
    for obj, scale in (("ar", 10.0), ("mdm", 12.0)):
        for c in (1e11, 3e11, 1e12):
            frontier = scale * c ** -0.05
            for i, n in enumerate((1e4, 3e4, 1e5, 3e5)):
                rows.append(dict(run_id=f"{obj}/{n:g}/{c:g}", objective=obj, size=f"s{i}", n_nonemb=n, budget=c,
                                 seed=0, val_nll_per_token=frontier * (1 + 0.1 * i ** 1.5)))
    result = analysis.analyze_results(pd.DataFrame(rows))
    for obj, scale in (("ar", 10.0), ("mdm", 12.0)):
        fit = result.fits[obj]
        assert fit.sources() == ["frontier"] * 3
        budgets, n_opt, loss_opt = fit.optima()
        assert list(n_opt) == [1e4] * 3
        assert loss_opt == pytest.approx(scale * budgets ** -0.05)
        assert fit.optima(exclude_extrapolated=True)[0].size == 0
    for row in result.multipliers:
        assert row.parametric == pytest.approx(1.2 ** 20, rel=1e-6)
